//! Behind a reverse proxy, end to end on 127.0.0.1:0 (issue 13): with `--trusted-proxies`
//! the loopback peer plays the proxy, and the client is who its `X-Forwarded-For` or
//! `Forwarded` names — per-address caps count that address, the proxy's own address holds no
//! share, the origin check uses `X-Forwarded-Host`; from an untrusted peer the same headers
//! change nothing. Also the operator's view: `HEAD`, `/health` as JSON, the process gauges of
//! `/metrics`, the start-up lines and a bad `--trusted-proxies` refused at start. (Cargo
//! feature `deploy`; `tests/deploy_small.rs` checks the build without it.)

#![cfg(feature = "deploy")]

mod common;

use std::io::{BufRead, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use chatterbox::config::{Config, SettingValue};
use chatterbox::proxy::TrustedProxies;
use common::{Running, status};
use serde_json::{Value, json};
use tungstenite::client::IntoClientRequest;
use tungstenite::http::HeaderValue;
use tungstenite::stream::MaybeTlsStream;

fn behind_proxy(trusted: &str, per_ip: usize) -> Running {
    Running::start(Config {
        db_path: ":memory:".into(),
        max_connections_per_ip: per_ip,
        trusted_proxies: TrustedProxies::parse_setting(trusted).unwrap(),
        ..Config::default()
    })
}

/// An upgrade request as nginx passes it on: `Host` rewritten to the upstream, the extra
/// header lines (each ending in CRLF) added.
fn proxied_upgrade(addr: SocketAddr, extra: &str) -> String {
    format!(
        "GET /ws HTTP/1.1\r\nHost: {addr}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n{extra}\r\n"
    )
}

/// Sends `request` on a new socket and reads the response head; the socket stays open (a
/// member stays connected) for as long as the caller keeps it.
fn hold(addr: SocketAddr, request: &str) -> (u16, TcpStream) {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    s.write_all(request.as_bytes()).unwrap();
    let mut got = Vec::new();
    let mut byte = [0u8; 1];
    while !got.ends_with(b"\r\n\r\n") {
        match s.read(&mut byte) {
            Ok(1) => got.push(byte[0]),
            _ => break,
        }
    }
    (status(&String::from_utf8_lossy(&got)), s)
}

/// Upgrades through "the proxy" as client `xff`; the status and the held socket.
fn member_as(addr: SocketAddr, xff: &str) -> (u16, TcpStream) {
    hold(
        addr,
        &proxied_upgrade(addr, &format!("X-Forwarded-For: {xff}\r\n")),
    )
}

/// Retries `f` until it is true; only turns a hang into a failure (drops are asynchronous).
fn eventually(what: &str, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !f() {
        assert!(Instant::now() < deadline, "never: {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn members_behind_a_trusted_proxy_are_counted_by_their_forwarded_address() {
    let s = behind_proxy("127.0.0.1", 2);
    let (a1, _h1) = member_as(s.addr, "198.51.100.1");
    let (a2, _h2) = member_as(s.addr, "198.51.100.1");
    assert_eq!((a1, a2), (101, 101));
    // The third from that client is over its cap, through the same proxy...
    assert_eq!(member_as(s.addr, "198.51.100.1").0, 429);
    // ...and what the client wrote left of the proxy's hop does not get it out of it.
    assert_eq!(member_as(s.addr, "6.6.6.6, 198.51.100.1").0, 429);
    // Other clients through the same proxy are not affected: the proxy's own address (five
    // sockets open from it now) holds no share of the per-address cap.
    let (b, _hb) = member_as(s.addr, "198.51.100.2");
    let (c, _hc) = member_as(s.addr, "[2001:db8::7]:4711");
    let (d, _hd) = hold(
        s.addr,
        &proxied_upgrade(s.addr, "Forwarded: for=\"[2001:db8::8]:1\";proto=https\r\n"),
    );
    assert_eq!((b, c, d), (101, 101, 101));
    assert_eq!(s.get_json("/api/members").as_array().unwrap().len(), 5);
    s.stop();
}

#[test]
fn a_forwarded_address_is_freed_when_its_connection_goes() {
    let s = behind_proxy("127.0.0.1", 1);
    let (first, held) = member_as(s.addr, "198.51.100.1");
    assert_eq!(first, 101);
    assert_eq!(member_as(s.addr, "198.51.100.1").0, 429);
    drop(held);
    // Its slot comes back once the server has seen it go (and a refusal takes none for good).
    let mut kept = None;
    eventually("the forwarded address's slot is freed", || {
        let (st, h) = member_as(s.addr, "198.51.100.1");
        kept = Some(h);
        st == 101
    });
    drop(kept);
    s.stop();
}

#[test]
fn a_proxy_holding_many_sockets_does_not_lock_out_its_clients() {
    let s = behind_proxy("127.0.0.1", 2);
    // Idle upstream sockets (a proxy's keep-alive pool, heads not yet sent): at accept, an
    // untrusted address would be refused past 2.
    let idle: Vec<TcpStream> = (0..6)
        .map(|_| TcpStream::connect(s.addr).unwrap())
        .collect();
    let (st, _m) = member_as(s.addr, "198.51.100.9");
    assert_eq!(st, 101);
    // A request through it that names nobody counts against the proxy itself.
    let (p1, _p1) = hold(s.addr, &proxied_upgrade(s.addr, ""));
    let (p2, _p2) = hold(
        s.addr,
        &proxied_upgrade(s.addr, "X-Forwarded-For: unknown\r\n"),
    );
    let (p3, _p3) = hold(
        s.addr,
        &proxied_upgrade(s.addr, "Forwarded: for=_hidden\r\n"),
    );
    assert_eq!((p1, p2, p3), (101, 101, 429));
    drop(idle);
    s.stop();
}

#[test]
fn forwarding_headers_from_an_untrusted_peer_change_nothing() {
    // Loopback is not in the list: these headers are a client's lies.
    let s = behind_proxy("10.0.0.0/8", 2);
    let (a, _a) = member_as(s.addr, "198.51.100.1");
    let (b, _b) = member_as(s.addr, "198.51.100.2");
    assert_eq!((a, b), (101, 101));
    assert_eq!(
        member_as(s.addr, "198.51.100.3").0,
        429,
        "counted as 127.0.0.1"
    );
    let f = hold(
        s.addr,
        &proxied_upgrade(s.addr, "Forwarded: for=198.51.100.4\r\n"),
    );
    assert_eq!(f.0, 429);
    s.stop();
    let s = behind_proxy("10.0.0.0/8", 10);
    let forged = proxied_upgrade(
        s.addr,
        "Origin: https://chat.example\r\nX-Forwarded-Host: chat.example\r\n",
    );
    assert_eq!(
        status(&s.http(&forged)),
        403,
        "the forwarded host is not believed"
    );
    s.stop();
}

#[test]
fn behind_a_trusted_proxy_the_origin_check_uses_the_forwarded_host() {
    let s = behind_proxy("127.0.0.1", 10);
    // nginx's default proxy_pass: Host is the upstream's address, the browser's is forwarded.
    let browser = "Origin: https://chat.example\r\nX-Forwarded-For: 198.51.100.1\r\n";
    let r = proxied_upgrade(
        s.addr,
        &format!("{browser}X-Forwarded-Host: chat.example\r\n"),
    );
    assert_eq!(status(&s.http(&r)), 101);
    let r = proxied_upgrade(
        s.addr,
        &format!("{browser}Forwarded: for=1.2.3.4;host=chat.example\r\n"),
    );
    assert_eq!(status(&s.http(&r)), 101);
    // Without it the browser gets the 403 it got before; a foreign page still gets it.
    assert_eq!(status(&s.http(&proxied_upgrade(s.addr, browser))), 403);
    let r = proxied_upgrade(
        s.addr,
        &format!("{browser}X-Forwarded-Host: evil.example\r\n"),
    );
    assert_eq!(status(&s.http(&r)), 403);
    s.stop();
}

#[test]
fn the_host_allow_list_checks_the_forwarded_host_too() {
    let s = Running::start(Config {
        db_path: ":memory:".into(),
        allowed_hosts: "chat.example".into(),
        trusted_proxies: TrustedProxies::parse_setting("127.0.0.1").unwrap(),
        ..Config::default()
    });
    let get = |extra: &str| {
        status(&s.http(&format!(
            "GET /api/stats HTTP/1.1\r\nHost: {}\r\n{extra}\r\n",
            s.addr
        )))
    };
    assert_eq!(
        get(""),
        421,
        "the upstream address is not a name the server answers to"
    );
    assert_eq!(get("X-Forwarded-Host: chat.example\r\n"), 200);
    assert_eq!(get("X-Forwarded-Host: evil.example\r\n"), 421);
    s.stop();
}

#[test]
fn a_client_through_the_proxy_chats() {
    let s = behind_proxy("127.0.0.1", 1);
    let connect = |name: &str, xff: &str| {
        let mut req = format!("ws://{}/ws?name={name}", s.addr)
            .into_client_request()
            .unwrap();
        req.headers_mut()
            .insert("X-Forwarded-For", HeaderValue::from_str(xff).unwrap());
        let (ws, _) = tungstenite::connect(req).expect("upgrade");
        if let MaybeTlsStream::Plain(t) = ws.get_ref() {
            t.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        }
        let mut c = common::Client { ws };
        c.until(|e| e["event"] == "history");
        c
    };
    // One connection per address allowed, two addresses: both are in.
    let mut alice = connect("alice", "198.51.100.1");
    let mut bob = connect("bob", "198.51.100.2");
    alice.until(|e| e["joined"] == "bob");
    bob.send(json!({"command": "broadcast", "message": "hi via the proxy"}));
    let got = alice.until(|e| e["event"] == "broadcast" && e["member"] == "bob");
    assert_eq!(got["message"], "hi via the proxy");
    s.stop();
}

#[test]
fn head_answers_every_get_endpoint_without_a_body() {
    let s = Running::memory();
    for path in [
        "/health",
        "/",
        "/api/stats",
        "/api/rooms",
        "/api/members",
        "/api/rooms/general",
        "/api/rooms/general/messages",
        "/metrics",
        "/api/rooms/nope",
    ] {
        let get = s.http(&format!("GET {path} HTTP/1.1\r\nHost: t\r\n\r\n"));
        let head = s.http(&format!("HEAD {path} HTTP/1.1\r\nHost: t\r\n\r\n"));
        let (get_head, get_body) = get.split_once("\r\n\r\n").unwrap();
        assert!(
            head.ends_with("\r\n\r\n"),
            "{path}: no body after the head: {head:?}"
        );
        assert_eq!(status(&head), status(&get), "{path}");
        let lines = |h: &str| -> Vec<String> {
            h.lines()
                .filter(|l| !l.starts_with("Content-Length"))
                .map(str::to_string)
                .collect()
        };
        assert_eq!(lines(head.trim_end()), lines(get_head), "{path}");
        if !matches!(path, "/metrics" | "/api/stats") {
            // (Those two change between the requests: uptime, counters.)
            assert!(
                head.contains(&format!("Content-Length: {}\r\n", get_body.len())),
                "{path}: {head}"
            );
        }
    }
    // The upgrade is GET only; other methods are told both.
    let r = s.http("HEAD /ws HTTP/1.1\r\nHost: t\r\n\r\n");
    assert!(
        r.starts_with("HTTP/1.1 405") && r.contains("Allow: GET\r\n"),
        "{r}"
    );
    let r = s.http("POST /api/stats HTTP/1.1\r\nHost: t\r\nContent-Length: 0\r\n\r\n");
    assert!(r.contains("Allow: GET, HEAD\r\n"), "{r}");
    s.stop();
}

#[test]
fn health_answers_json_when_asked() {
    let s = Running::memory();
    let _m = s.client("alice");
    let r = s.http("GET /health HTTP/1.1\r\nHost: t\r\nAccept: application/json\r\n\r\n");
    assert!(r.contains("Content-Type: application/json\r\n"), "{r}");
    let v: Value = serde_json::from_str(r.split_once("\r\n\r\n").unwrap().1).unwrap();
    assert_eq!(v["status"], "ok");
    assert_eq!(
        (v["members"].as_u64(), v["rooms"].as_u64()),
        (Some(1), Some(1))
    );
    // The member's socket and this request's.
    assert_eq!(v["connections"].as_u64(), Some(2));
    assert!(v["uptime_secs"].is_u64());
    let keys: Vec<&String> = v.as_object().unwrap().keys().collect();
    assert_eq!(keys.len(), 5, "{v}");
    // Anything else gets the plain answer, as before.
    for accept in [
        "",
        "Accept: */*\r\n",
        "Accept: text/plain\r\n",
        "Accept: application/json;q=0\r\n",
    ] {
        let r = s.http(&format!("GET /health HTTP/1.1\r\nHost: t\r\n{accept}\r\n"));
        assert!(r.ends_with("\r\n\r\nok"), "{accept}: {r}");
    }
    s.stop();
}

#[test]
fn metrics_carry_process_gauges_and_build_info() {
    let s = Running::memory();
    let r = s.http("GET /metrics HTTP/1.1\r\nHost: t\r\n\r\n");
    let value = |name: &str| -> u64 {
        r.lines()
            .find_map(|l| l.strip_prefix(&format!("{name} ")))
            .unwrap_or_else(|| panic!("no {name} in {r}"))
            .parse()
            .unwrap()
    };
    // A running server has megabytes resident and a listener, a poll and this socket open.
    assert!(value("process_resident_memory_bytes") > 1 << 20);
    assert!(value("process_open_fds") >= 3);
    assert!(r.contains("# TYPE process_open_fds gauge\n"));
    let features: Vec<&str> = [
        ("sqlite", cfg!(feature = "sqlite")),
        ("deploy", true),
        ("server-api", cfg!(feature = "server-api")),
        ("admin-page", cfg!(feature = "admin-page")),
        ("tls", cfg!(feature = "tls")),
        ("cluster", cfg!(feature = "cluster")),
    ]
    .into_iter()
    .filter_map(|(name, on)| on.then_some(name))
    .collect();
    let build = format!(
        "chatterbox_build_info{{version=\"{}\",features=\"{}\"}} 1\n",
        env!("CARGO_PKG_VERSION"),
        features.join(",")
    );
    assert!(r.contains(&build), "{r}");
    s.stop();
}

/// The binary's log up to and including the line that starts with `last`.
fn startup_log(args: &[&str], env: &[(&str, &str)], last: &str) -> Vec<String> {
    let mut child = Command::new(env!("CARGO_BIN_EXE_chatterbox"))
        .args(["--host", "127.0.0.1", "--port", "0"])
        .args(args)
        .envs(env.iter().copied())
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = std::io::BufReader::new(child.stderr.take().unwrap()).lines();
    let mut got = Vec::new();
    for line in lines.by_ref() {
        let line = line.unwrap();
        let done = line.contains(last);
        got.push(line);
        if done {
            break;
        }
    }
    let _ = child.kill();
    let _ = child.wait();
    got
}

#[test]
fn startup_says_what_is_in_force_one_line_each() {
    let log = startup_log(
        &[
            "--db-path",
            ":memory:",
            "--allowed-origins",
            "https://chat.example",
        ],
        &[("TRUSTED_PROXIES", "10.0.0.0/8, ::1"), ("JWT_SECRET", "k")],
        "trusted proxies:",
    );
    let find = |what: &str| {
        log.iter()
            .find(|l| l.contains(what))
            .unwrap_or_else(|| panic!("no '{what}' in {log:#?}"))
            .clone()
    };
    assert!(
        find(&format!(
            "chatterbox {} (features: ",
            env!("CARGO_PKG_VERSION")
        ))
        .contains("INFO")
    );
    assert!(find("chatterbox listening on 127.0.0.1:").ends_with("(plain)"));
    assert!(find("store: memory").contains("INFO"));
    assert!(find("auth: JWT (HS256), audience: any, issuer: any").contains("INFO"));
    assert!(find("origin rule: only https://chat.example").contains("INFO"));
    assert!(find("trusted proxies: 10.0.0.0/8,::1/128").contains("INFO"));
    let log = startup_log(&["--db-path", ":memory:"], &[], "trusted proxies:");
    assert!(log.iter().any(|l| l.contains("auth: off")));
    assert!(
        log.iter()
            .any(|l| l.contains("origin rule: same host only"))
    );
    assert!(log.iter().any(|l| l.contains("trusted proxies: none")));
}

#[test]
fn a_bad_trusted_proxy_list_is_refused_at_start() {
    for (args, env) in [
        (vec!["--trusted-proxies", "10.0.0.0/33"], vec![]),
        (vec!["--trusted-proxies", "127.0.0.1,proxy.local"], vec![]),
        (vec![], vec![("TRUSTED_PROXIES", "10.0.0.1:80")]),
    ] {
        let out = Command::new(env!("CARGO_BIN_EXE_chatterbox"))
            .args(["--db-path", ":memory:", "--port", "0"])
            .args(&args)
            .envs(env.iter().copied())
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{args:?} {env:?}: {err}");
        assert!(err.contains("--trusted-proxies"), "{err}");
        if !env.is_empty() {
            assert!(err.contains("TRUSTED_PROXIES"), "{err}");
        }
    }
}
