//! Integration tests: the real server on `127.0.0.1:0`, driven over TCP.

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::thread;
use std::time::{Duration, Instant};

use chatterbox::config::Config;
use common::Running;
use serde_json::json;
use tungstenite::protocol::frame::coding::CloseCode;

#[test]
fn http_endpoints_and_errors() {
    let s = Running::memory();
    let ok = s.http("GET /health HTTP/1.1\r\nHost: t\r\n\r\n");
    assert!(ok.starts_with("HTTP/1.1 200 OK\r\n"), "{ok}");
    assert!(ok.ends_with("\r\n\r\nok"));
    assert!(
        s.http("GET /nope HTTP/1.1\r\n\r\n")
            .starts_with("HTTP/1.1 404")
    );
    let r = s.http("POST /health HTTP/1.1\r\nContent-Length: 0\r\n\r\n");
    assert!(
        r.starts_with("HTTP/1.1 405") && r.contains("Allow: GET, HEAD\r\n"),
        "{r}"
    );
    assert!(
        s.http("\x01\x02garbage\r\n\r\n")
            .starts_with("HTTP/1.1 400")
    );
    let big = format!("GET / HTTP/1.1\r\nX: {}\r\n\r\n", "a".repeat(9000));
    assert!(s.http(&big).starts_with("HTTP/1.1 431"));
    let no_key = "GET /ws HTTP/1.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Version: 13\r\n\r\n";
    assert!(s.http(no_key).starts_with("HTTP/1.1 400"));
    let page = s.http("GET / HTTP/1.1\r\n\r\n");
    assert!(page.contains("Content-Type: text/html"), "{page}");
    s.stop();
}

#[test]
fn two_members_chat_and_the_api_sees_them() {
    let s = Running::memory();
    let mut a = s.client("alice");
    let mut b = s.client("bob");
    a.until(|e| e["joined"] == "bob");
    a.send(json!({"command":"broadcast","message":"hello","request_id":"r"}));
    let got = b.until(|e| e["event"] == "broadcast" && e["member"] == "alice");
    assert_eq!(
        (got["message"].as_str(), got["id"].as_u64()),
        (Some("hello"), Some(1))
    );
    assert_eq!(a.until(|e| e["event"] == "ack")["id"], 1);
    assert_eq!(s.get_json("/api/members"), json!(["alice", "bob"]));
    let stats = s.get_json("/api/stats");
    assert_eq!(stats["members"], 2);
    let msgs = s.get_json("/api/rooms/general/messages?limit=5");
    assert_eq!(msgs["messages"][0]["message"], "hello");
    assert_eq!(s.get_json("/api/rooms/ghost")["error"], "not_found");
    let taken = s.http("GET /ws?name=ALICE HTTP/1.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n");
    assert!(taken.starts_with("HTTP/1.1 409"), "{taken}");
    drop(b);
    s.stop();
}

#[test]
fn oversized_frame_closes_with_1009() {
    let s = Running::memory();
    let mut a = s.client("big");
    a.send(json!({"command":"broadcast","message":"x".repeat(9000)}));
    assert_eq!(a.close_code(), Some(u16::from(CloseCode::Size)));
    s.stop();
}

#[test]
fn shutdown_sends_1001_and_returns() {
    let s = Running::memory();
    let mut a = s.client("a");
    s.stopper.stop();
    assert_eq!(a.close_code(), Some(1001));
    s.stop();
}

#[test]
fn idle_member_is_closed_with_1000() {
    let s = Running::start(Config {
        db_path: ":memory:".into(),
        idle_timeout: Duration::from_millis(300),
        ..Config::default()
    });
    let mut a = s.client("sleepy");
    let started = Instant::now();
    assert_eq!(a.close_code(), Some(1000));
    assert!(started.elapsed() < Duration::from_secs(5));
    s.stop();
}

#[test]
fn a_partial_head_is_dropped_at_the_deadline() {
    let s = Running::start(Config {
        db_path: ":memory:".into(),
        head_timeout: Duration::from_millis(200),
        ..Config::default()
    });
    let mut sock = TcpStream::connect(s.addr).unwrap();
    sock.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    sock.write_all(b"GET /health HTTP/1.1\r\nHost:").unwrap();
    let mut buf = [0u8; 64];
    assert_eq!(
        sock.read(&mut buf).unwrap_or(0),
        0,
        "closed without an answer"
    );
    s.stop();
}

#[test]
fn slow_consumer_is_closed_and_others_get_everything_in_order() {
    let s = Running::start(Config {
        db_path: ":memory:".into(),
        rate_per_sec: 100_000,
        rate_burst: 100_000,
        ..Config::default()
    });
    // A member that never reads: a raw upgrade, then silence. Its kernel buffers fill first,
    // then its queue on the server passes max-pending-output.
    let stalled = TcpStream::connect(s.addr).unwrap();
    (&stalled)
        .write_all(b"GET /ws?name=stalled HTTP/1.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n")
        .unwrap();
    let mut sender = s.client("sender");
    let mut reader = s.client("reader");
    let n = 4000u64;
    let seen = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
    let seen_by_reader = seen.clone();
    let collector = thread::spawn(move || {
        let mut next = 0;
        while next < n {
            let e = reader.recv();
            if e["event"] == "broadcast" && e["member"] == "sender" {
                assert_eq!(e["data"]["i"], next, "in order, none lost");
                next += 1;
                seen_by_reader.store(next, std::sync::atomic::Ordering::SeqCst);
            }
        }
        (next, reader)
    });
    // `message` is capped at 1000 characters; the bulk rides in `data`.
    let pad = "y".repeat(6000);
    for i in 0..n {
        sender.send(
            json!({"command":"broadcast","message":"m","echo":false,"data":{"i":i,"pad":pad}}),
        );
        // The reader is a real client that keeps up: stay at most 20 messages ahead of it, so
        // only the stalled member falls behind.
        while i >= 20 && seen.load(std::sync::atomic::Ordering::SeqCst) < i - 20 {
            thread::sleep(Duration::from_micros(200));
        }
    }
    let (got, _reader) = collector.join().unwrap();
    assert_eq!(got, n);
    let stats = s.get_json("/api/stats");
    assert_eq!(stats["slow_consumers_closed"], 1, "{stats}");
    assert_eq!(s.get_json("/api/members"), json!(["sender", "reader"]));
    drop(stalled);
    s.stop();
}

#[cfg(feature = "sqlite")]
#[test]
fn sqlite_history_and_ids_survive_a_restart() {
    let dir = std::env::temp_dir().join(format!("chatterbox-it-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let db = dir.join("h.db").to_string_lossy().into_owned();
    let cfg = || Config {
        db_path: db.clone(),
        ..Config::default()
    };

    let s = Running::start(cfg());
    let mut a = s.client("a");
    for i in 0..5 {
        a.send(
            json!({"command":"broadcast","message":format!("m{i}"),"request_id":format!("r{i}")}),
        );
    }
    for _ in 0..5 {
        a.until(|e| e["event"] == "ack");
    }
    s.stop();

    let s = Running::start(cfg());
    let mut b = s.client("b");
    b.send(json!({"command":"history","room":"general","limit":10}));
    let h = b.until(|e| {
        e["event"] == "history"
            && e.get("request_id").is_none()
            && !e["messages"].as_array().unwrap().is_empty()
    });
    let ids: Vec<u64> = h["messages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["id"].as_u64().unwrap())
        .collect();
    assert_eq!(ids, vec![1, 2, 3, 4, 5]);
    b.send(json!({"command":"broadcast","message":"next"}));
    assert_eq!(
        b.until(|e| e["event"] == "broadcast" && e["member"] == "b")["id"],
        6
    );
    s.stop();
    let _ = std::fs::remove_dir_all(&dir);
}
