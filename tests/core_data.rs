//! Issue 9: `data` comes back as the very bytes the client sent, against the real server on
//! `127.0.0.1:0`: in the live event, in `history`, on the REST page, and after a restart.

mod common;

use common::{Client, Running};
use serde_json::json;
use tungstenite::Message;

#[cfg(feature = "sqlite")]
fn temp_db(name: &str) -> String {
    let dir = std::env::temp_dir().join(format!("chatterbox-data-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir.join("h.db").to_string_lossy().into_owned()
}

/// `data` values that a round trip through a parsed JSON value would change.
const FRAGILE: &[&str] = &[
    "-0",
    "1e-400",
    "123456789012345678901234567890",
    r#"{"a":1,"a":2}"#,
    r#"{ "spaced" : [1, 2.50, "\u00e9"] }"#,
];

/// The next text frame, as the server wrote it.
fn recv_text(c: &mut Client) -> String {
    loop {
        match c.ws.read().expect("a frame") {
            Message::Text(t) => return t.as_str().to_string(),
            Message::Close(f) => panic!("closed: {f:?}"),
            _ => {}
        }
    }
}

fn recv_text_until(c: &mut Client, event: &str) -> String {
    let tag = format!(r#""event":"{event}""#);
    loop {
        let t = recv_text(c);
        if t.contains(&tag) {
            return t;
        }
    }
}

/// Every fragile value appears, byte for byte, as a `data` field of `text`, in order.
fn assert_verbatim(text: &str) {
    let mut rest = text;
    for raw in FRAGILE {
        let needle = format!(r#""data":{raw}}}"#);
        let at = rest
            .find(&needle)
            .unwrap_or_else(|| panic!("{needle} not in {text}"));
        rest = &rest[at + needle.len()..];
    }
}

fn send_fragile(c: &mut Client) {
    for (i, raw) in FRAGILE.iter().enumerate() {
        let frame = format!(
            r#"{{"command":"broadcast","message":"m{i}","data":{raw},"request_id":"f{i}"}}"#
        );
        c.ws.send(Message::text(frame)).unwrap();
        let live = recv_text_until(c, "broadcast");
        assert_eq!(
            live.split_once(r#""data":"#).map(|(_, d)| d),
            Some(format!("{raw}}}").as_str()),
            "live event: {live}"
        );
    }
    c.until(|e| e["event"] == "ack" && e["request_id"] == format!("f{}", FRAGILE.len() - 1));
}

fn assert_history_verbatim(running: &Running) {
    let mut c = running.client("reader");
    c.send(json!({"command":"history","room":"general"}));
    assert_verbatim(&recv_text_until(&mut c, "history"));
    let rest = running.http("GET /api/rooms/general/messages HTTP/1.1\r\nHost: t\r\n\r\n");
    assert_verbatim(rest.split_once("\r\n\r\n").expect("a body").1);
}

#[test]
fn data_is_relayed_and_stored_as_the_bytes_sent() {
    let running = Running::memory();
    let mut c = running.client("writer");
    send_fragile(&mut c);
    assert_history_verbatim(&running);
    // A direct message carries its data the same way, to both ends.
    let mut b = running.client("other");
    for raw in FRAGILE {
        let frame = format!(r#"{{"command":"direct","to":"other","message":"d","data":{raw}}}"#);
        c.ws.send(Message::text(frame)).unwrap();
        let want = format!(r#""data":{raw}}}"#);
        for end in [&mut c, &mut b] {
            let got = recv_text_until(end, "direct");
            assert!(got.ends_with(&want), "{got}");
        }
    }
    running.stop();
}

#[cfg(feature = "sqlite")]
#[test]
fn data_survives_a_restart_byte_for_byte() {
    let db = temp_db("verbatim");
    let cfg = chatterbox::config::Config {
        db_path: db,
        ..Default::default()
    };
    let running = Running::start(cfg.clone());
    let mut c = running.client("writer");
    send_fragile(&mut c);
    drop(c);
    running.stop();
    let running = Running::start(cfg);
    assert_history_verbatim(&running);
    running.stop();
}
