//! Closes the server decides, against the real server: once a close is decided, the
//! connection is served no more, even for frames that arrived in the same read.

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use chatterbox::config::Config;
use common::{Running, upgrade_request};

/// A masked client text frame (mask key 0, so the payload goes as is).
fn text_frame(payload: &[u8]) -> Vec<u8> {
    assert!(payload.len() < 126);
    let mut f = vec![0x81, 0x80 | payload.len() as u8, 0, 0, 0, 0];
    f.extend_from_slice(payload);
    f
}

/// Reads until the server closes the stream; returns everything it sent.
fn read_to_close(s: &mut TcpStream) -> Vec<u8> {
    let mut got = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        match s.read(&mut chunk) {
            Ok(0) | Err(_) => return got,
            Ok(n) => got.extend_from_slice(&chunk[..n]),
        }
    }
}

#[test]
fn frames_behind_a_flood_close_are_not_served() {
    let s = Running::start(Config {
        db_path: ":memory:".into(),
        rate_per_sec: 1,
        rate_burst: 2,
        flood_close_after: 2,
        ..Config::default()
    });
    let mut c = TcpStream::connect(s.addr).unwrap();
    c.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    // The head and every frame in one write, so that they are read in one turn: 2 commands
    // within the burst, 3 rate-limited ones (the third past `flood_close_after` closes), then
    // 20 more that must not reach the core.
    let mut bytes = upgrade_request("/ws?name=flooder", "").into_bytes();
    let cmd = br#"{"command":"list"}"#;
    for _ in 0..25 {
        bytes.extend_from_slice(&text_frame(cmd));
    }
    c.write_all(&bytes).unwrap();
    let got = read_to_close(&mut c);
    let close = [0x88, 21, 0x03, 0xF0];
    let at = got
        .windows(4)
        .position(|w| w == close)
        .expect("a 1008 close frame");
    assert_eq!(&got[at + 4..at + 23], b"rate limit exceeded");

    let deadline = Instant::now() + Duration::from_secs(10);
    let stats = loop {
        let stats = s.get_json("/api/stats");
        if stats["flood_closed"] == 1 || Instant::now() > deadline {
            break stats;
        }
    };
    assert_eq!(stats["flood_closed"], 1);
    assert_eq!(stats["rate_limited"], 3);
    assert_eq!(
        stats["messages_in"], 5,
        "only the frames up to the close are served: {stats}"
    );
}

#[test]
fn a_client_that_goes_away_without_a_close_frame_is_no_protocol_error() {
    let s = Running::memory();
    let mut watcher = s.client("watcher");
    for how in [std::net::Shutdown::Write, std::net::Shutdown::Both] {
        let mut c = TcpStream::connect(s.addr).unwrap();
        c.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        c.write_all(upgrade_request("/ws?name=leaver", "").as_bytes())
            .unwrap();
        let mut got = Vec::new();
        let mut chunk = [0u8; 4096];
        while !String::from_utf8_lossy(&got).contains(r#""event":"history""#) {
            let n = c.read(&mut chunk).unwrap();
            assert!(n > 0, "closed before the welcome");
            got.extend_from_slice(&chunk[..n]);
        }
        // FIN (or FIN and drop) with no close frame: the member leaves as on any disconnect.
        c.shutdown(how).unwrap();
        drop(c);
        watcher.until(|e| e["left"] == "leaver");
    }
    let metrics = s.http("GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n");
    assert!(
        metrics.contains(r#"chatterbox_closed_total{reason="protocol_error"} 0"#),
        "{metrics}"
    );
}
