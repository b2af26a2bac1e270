//! Security integration tests: origin checks, JWT authentication, connection caps.

mod common;

use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use chatterbox::auth;
use chatterbox::config::Config;
use common::{Running, status, upgrade_request};
use serde_json::json;

const SECRET: &str = "test-secret";

fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

fn memory(f: impl FnOnce(&mut Config)) -> Running {
    let mut cfg = Config {
        db_path: ":memory:".into(),
        ..Config::default()
    };
    f(&mut cfg);
    Running::start(cfg)
}

#[test]
fn browser_origins_must_match_the_host_by_default() {
    let s = memory(|_| {});
    let same = upgrade_request("/ws", "Origin: http://localhost\r\n");
    assert_eq!(status(&s.http(&same)), 101);
    let evil = upgrade_request("/ws", "Origin: http://evil.example\r\n");
    assert_eq!(status(&s.http(&evil)), 403);
    let lookalike = upgrade_request("/ws", "Origin: http://localhost.evil.example\r\n");
    assert_eq!(status(&s.http(&lookalike)), 403);
    assert_eq!(
        status(&s.http(&upgrade_request("/ws", ""))),
        101,
        "no Origin: not a browser"
    );
    s.stop();
}

#[test]
fn an_allow_list_is_matched_exactly() {
    let s = memory(|c| c.allowed_origins = "https://chat.example".into());
    let ok = upgrade_request("/ws", "Origin: https://chat.example\r\n");
    assert_eq!(status(&s.http(&ok)), 101);
    for bad in [
        "https://chat.example.evil",
        "https://evilchat.example",
        "http://chat.example",
        "http://localhost",
    ] {
        let r = upgrade_request("/ws", &format!("Origin: {bad}\r\n"));
        assert_eq!(status(&s.http(&r)), 403, "{bad}");
    }
    s.stop();
}

#[test]
fn with_a_secret_only_valid_tokens_get_in() {
    let s = memory(|c| c.jwt_secret = SECRET.into());
    let exp = now_secs() + 3600;
    assert_eq!(
        status(&s.http(&upgrade_request("/ws", ""))),
        401,
        "no token"
    );
    let good = auth::sign(
        &json!({"sub":"user-42","name":"carol","exp":exp}),
        SECRET.as_bytes(),
    );
    let r = s.http(&upgrade_request(&format!("/ws?token={good}"), ""));
    assert_eq!(status(&r), 101);
    assert!(
        r.contains(r#""member":"carol""#) && r.contains(r#""id":"user-42""#),
        "{r}"
    );
    // Without a `name` claim `sub` is the name (issue 11): `?name=` may only repeat it.
    let bearer = auth::sign(&json!({"sub":"user-43","exp":exp}), SECRET.as_bytes());
    let r = s.http(&upgrade_request(
        "/ws?name=dave",
        &format!("Authorization: Bearer {bearer}\r\n"),
    ));
    assert_eq!(status(&r), 403, "{r}");
    let r = s.http(&upgrade_request(
        "/ws?name=user-43",
        &format!("Authorization: Bearer {bearer}\r\n"),
    ));
    assert_eq!(status(&r), 101);
    assert!(r.contains(r#""member":"user-43""#), "{r}");

    let wrong_key = auth::sign(&json!({"sub":"x","exp":exp}), b"guess");
    let expired = auth::sign(&json!({"sub":"x","exp":now_secs() - 1}), SECRET.as_bytes());
    let none = "eyJhbGciOiJub25lIn0.eyJzdWIiOiJ4In0.";
    let mut tampered = good.clone();
    tampered.replace_range(good.len() - 4.., "AAAA");
    for token in [
        wrong_key.as_str(),
        expired.as_str(),
        none,
        tampered.as_str(),
        "garbage",
    ] {
        let r = s.http(&upgrade_request(&format!("/ws?token={token}"), ""));
        assert_eq!(status(&r), 401, "{token}: {r}");
        assert!(!r.contains(token), "the answer never echoes the token");
    }
    s.stop();
}

#[test]
fn a_session_ends_with_1008_when_its_token_expires() {
    let s = memory(|c| c.jwt_secret = SECRET.into());
    // Two seconds, not one: with one, a second boundary between minting and connecting (a
    // loaded machine) made the token expired at connect, and the upgrade failed.
    let token = auth::sign(&json!({"sub":"u","exp":now_secs() + 2}), SECRET.as_bytes());
    let url = format!("ws://{}/ws?token={token}", s.addr);
    let (ws, _) = tungstenite::connect(url).expect("upgrade");
    let mut c = common::Client { ws };
    // Only the token can close it this soon (frame timeout 60 s, idle 300 s); the read
    // timeout turns a missing close into a failure.
    if let tungstenite::stream::MaybeTlsStream::Plain(t) = c.ws.get_ref() {
        t.set_read_timeout(Some(Duration::from_secs(15))).unwrap();
    }
    assert_eq!(c.close_code(), Some(1008));
    s.stop();
}

#[test]
fn connection_caps_answer_503_and_429() {
    let s = memory(|c| {
        c.max_connections = 2;
        c.max_connections_per_ip = 100;
    });
    let _a = s.client("a");
    let _b = s.client("b");
    assert_eq!(status(&s.http(&upgrade_request("/ws", ""))), 503);
    assert_eq!(
        status(&s.http("GET /health HTTP/1.1\r\n\r\n")),
        200,
        "HTTP still answers"
    );
    s.stop();

    let s = memory(|c| c.max_connections_per_ip = 1);
    let _a = s.client("a");
    assert_eq!(status(&s.http(&upgrade_request("/ws", ""))), 429);
    drop(_a);
    // The slot frees when the member leaves; the server notices the close at once.
    let deadline = Instant::now() + Duration::from_secs(5);
    while status(&s.http(&upgrade_request("/ws", ""))) != 101 {
        assert!(Instant::now() < deadline, "the per-IP slot was never freed");
        std::thread::sleep(Duration::from_millis(20));
    }
    s.stop();
}

#[test]
fn a_connect_storm_with_slowloris_heads_neither_crashes_nor_wedges_the_server() {
    use std::io::{Read, Write};
    use std::net::TcpStream;
    let s = memory(|c| {
        c.head_timeout = Duration::from_millis(500);
        c.max_connections = 600;
        c.max_connections_per_ip = 1000;
        c.notice_max_members = 0;
    });
    let addr = s.addr;
    // Four kinds of clients, 1,600 sockets in all, opened as fast as four threads can:
    // full upgrades (some refused with 503 past the cap), half-open heads, silent sockets.
    let workers: Vec<_> = (0..4)
        .map(|w| {
            std::thread::spawn(move || {
                let mut held = Vec::new();
                for i in 0..400 {
                    let mut sock = TcpStream::connect(addr).expect("the listener keeps accepting");
                    match (w + i) % 4 {
                        0 | 1 => sock
                            .write_all(upgrade_request("/ws", "").as_bytes())
                            .unwrap(),
                        2 => sock.write_all(b"GET /ws HTTP/1.1\r\nHost: slow").unwrap(),
                        _ => {}
                    }
                    held.push(((w + i) % 4, sock));
                }
                held
            })
        })
        .collect();
    let held: Vec<_> = workers
        .into_iter()
        .flat_map(|w| w.join().unwrap())
        .collect();
    // At the socket cap new sockets are dropped at accept; the head deadline frees the slots
    // that half-open heads hold, so the server answers again within it.
    let deadline = Instant::now() + Duration::from_secs(3);
    while status(&s.http("GET /health HTTP/1.1\r\n\r\n")) != 200 {
        assert!(Instant::now() < deadline, "the server stopped answering");
        std::thread::sleep(Duration::from_millis(50));
    }

    // Every half-open or silent socket is closed by the head deadline.
    let started = Instant::now();
    for (kind, mut sock) in held.iter().filter(|(k, _)| *k >= 2).map(|(k, s)| (*k, s)) {
        sock.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let mut buf = [0u8; 64];
        let n = sock.read(&mut buf).unwrap_or(0);
        assert_eq!(n, 0, "kind {kind}: closed without an answer");
    }
    assert!(started.elapsed() < Duration::from_secs(5));

    // Each upgrade became a member, was refused with 503 past the member cap, or (past the
    // socket cap of max-connections + 256) was closed at accept without an answer.
    let (mut upgraded, mut refused, mut dropped) = (0, 0, 0);
    for (_, mut sock) in held.iter().filter(|(k, _)| *k < 2).map(|(k, s)| (*k, s)) {
        sock.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let mut buf = [0u8; 12];
        match sock.read_exact(&mut buf) {
            Ok(()) if &buf[9..12] == b"101" => upgraded += 1,
            Ok(()) if &buf[9..12] == b"503" => refused += 1,
            Ok(()) => panic!("unexpected status {:?}", String::from_utf8_lossy(&buf)),
            Err(_) => dropped += 1,
        }
    }
    assert_eq!(upgraded + refused + dropped, 800);
    assert!(upgraded > 0 && upgraded <= 600, "{upgraded} members");
    assert_eq!(
        s.get_json("/api/stats")["members"],
        upgraded,
        "every 101 is a member"
    );
    drop(held);

    // When the storm is gone, the slots are free again and chat works.
    let deadline = Instant::now() + Duration::from_secs(5);
    while s.get_json("/api/stats")["members"] != 0 {
        assert!(Instant::now() < deadline, "closed sockets were not noticed");
        std::thread::sleep(Duration::from_millis(20));
    }
    let mut a = s.client("after");
    a.send(json!({"command":"ping"}));
    assert_eq!(a.until(|e| e["event"] == "pong")["event"], "pong");
    s.stop();
}
