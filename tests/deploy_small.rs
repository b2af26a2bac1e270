//! The smallest build, without the cargo feature `deploy`: `--trusted-proxies` is refused at
//! start naming the feature, forwarding headers change nothing, `/health` stays plain text
//! whatever is asked, and `HEAD` and the start-up lines are there all the same.

#![cfg(not(feature = "deploy"))]

mod common;

use std::process::Command;

use common::{Running, status};

#[test]
fn a_trusted_proxy_list_is_refused_naming_the_feature() {
    let out = Command::new(env!("CARGO_BIN_EXE_chatterbox"))
        .args([
            "--db-path",
            ":memory:",
            "--port",
            "0",
            "--trusted-proxies",
            "127.0.0.1",
        ])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(
        err.contains("--trusted-proxies") && err.contains("cargo feature `deploy`"),
        "{err}"
    );
    // Empty is the default, and fine.
    let out = Command::new(env!("CARGO_BIN_EXE_chatterbox"))
        .args(["--trusted-proxies", "", "--help"])
        .output()
        .unwrap();
    assert!(out.status.success());
}

#[test]
fn forwarding_headers_change_nothing_and_health_stays_plain() {
    let s = Running::start(chatterbox::config::Config {
        db_path: ":memory:".into(),
        max_connections_per_ip: 1,
        ..Default::default()
    });
    let _held = s.client("alice");
    let r = s.http(&common::upgrade_request(
        "/ws?name=bob",
        "X-Forwarded-For: 198.51.100.1\r\n",
    ));
    assert_eq!(status(&r), 429, "{r}");
    drop(_held);
    // The one connection this address may hold is free once the server has seen alice go;
    // until then a new connection is turned away at accept, with no answer.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    let r = loop {
        let r = s.http("GET /health HTTP/1.1\r\nHost: t\r\nAccept: application/json\r\n\r\n");
        if !r.is_empty() || std::time::Instant::now() > deadline {
            break r;
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    };
    assert!(r.ends_with("\r\n\r\nok"), "{r}");
    s.stop();
}

#[test]
fn head_is_answered_without_a_body() {
    let s = Running::memory();
    for path in ["/health", "/", "/api/stats", "/metrics"] {
        let r = s.http(&format!("HEAD {path} HTTP/1.1\r\nHost: t\r\n\r\n"));
        assert!(
            r.starts_with("HTTP/1.1 200 OK\r\n") && r.ends_with("\r\n\r\n"),
            "{path}: {r}"
        );
        assert!(
            !r.contains("Content-Length: 0\r\n"),
            "{path}: the GET length: {r}"
        );
    }
    s.stop();
}

#[test]
fn the_start_up_lines_are_there_all_the_same() {
    use std::io::BufRead;
    let mut child = common::binary_command::<&str>(&[]).spawn().unwrap();
    let lines = std::io::BufReader::new(child.stderr.take().unwrap()).lines();
    let mut log = Vec::new();
    for line in lines {
        let line = line.unwrap();
        let last = line.contains("trusted proxies:");
        log.push(line);
        if last {
            break;
        }
    }
    let _ = child.kill();
    let _ = child.wait();
    for want in [
        "(features: )",
        "(plain)",
        "store: memory",
        "auth: off",
        "origin rule: same host only",
        "trusted proxies: none",
    ] {
        assert!(log.iter().any(|l| l.contains(want)), "{want}: {log:#?}");
    }
}
