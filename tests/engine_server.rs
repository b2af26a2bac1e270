//! The SQLite engine wired into the real server, end to end on 127.0.0.1:0: join pages read on
//! the reader thread arrive in order with live traffic (no gap, no duplicate), `history` and
//! the REST page are answered when the read completes, and a restart reads it all back.

#![cfg(feature = "sqlite")]

mod common;

use std::time::Duration;

use chatterbox::config::Config;
use serde_json::{Value, json};
use tungstenite::Message;
use tungstenite::stream::MaybeTlsStream;

use common::{Running, status};

fn temp_db(name: &str) -> String {
    let dir = std::env::temp_dir().join(format!(
        "chatterbox-engine-server-{}-{name}",
        std::process::id()
    ));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir.join("h.db").to_string_lossy().into_owned()
}

fn sqlite(path: &str) -> Running {
    Running::start(Config {
        db_path: path.into(),
        rate_burst: 10_000,
        rate_per_sec: 10_000,
        ..Config::default()
    })
}

/// A raw client: every event it gets, the welcome's included.
struct Raw {
    ws: tungstenite::WebSocket<MaybeTlsStream<std::net::TcpStream>>,
}

impl Raw {
    fn connect(srv: &Running, name: &str) -> Raw {
        let (ws, _) = tungstenite::connect(format!("ws://{}/ws?name={name}", srv.addr)).unwrap();
        if let MaybeTlsStream::Plain(s) = ws.get_ref() {
            // Only turns a hang into a failure.
            s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
        }
        Raw { ws }
    }
    fn send(&mut self, v: Value) {
        self.ws.send(Message::text(v.to_string())).unwrap();
    }
    fn recv(&mut self) -> Value {
        loop {
            match self.ws.read().expect("an event") {
                Message::Text(t) => return serde_json::from_str(t.as_str()).unwrap(),
                Message::Close(c) => panic!("closed: {c:?}"),
                _ => {}
            }
        }
    }
}

fn ids(v: &Value) -> Vec<u64> {
    v["messages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["id"].as_u64().unwrap())
        .collect()
}

#[test]
fn a_joiner_gets_its_page_then_exactly_the_newer_messages_and_rest_reads_are_answered() {
    let path = temp_db("join");
    let srv = sqlite(&path);
    let mut a = Raw::connect(&srv, "a");
    while a.recv()["event"] != "history" {}
    // Traffic before, during and after the join; none of it waits for an ack.
    for i in 1..=30 {
        a.send(json!({"command":"broadcast","message":format!("m{i}")}));
    }
    let mut b = Raw::connect(&srv, "b");
    for i in 31..=60 {
        a.send(json!({"command":"broadcast","message":format!("m{i}")}));
    }
    let welcome: Vec<Value> = (0..3).map(|_| b.recv()).collect();
    assert_eq!(welcome[0]["event"], "me", "{welcome:?}");
    assert_eq!(welcome[1]["joined"], "b", "{welcome:?}");
    assert_eq!(welcome[2]["event"], "history", "{welcome:?}");
    let mut seen = ids(&welcome[2]);
    let from_page = seen.len();
    while seen.last().copied().unwrap_or(0) < 60 {
        let e = b.recv();
        assert_ne!(e["event"], "history", "one page only");
        if let Some(id) = e["id"].as_u64() {
            seen.push(id);
        }
    }
    let first = seen[0];
    assert_eq!(
        seen,
        (first..=60).collect::<Vec<_>>(),
        "no gap, no duplicate ({from_page} from the page)"
    );
    assert!(
        first <= 11,
        "the page holds the newest 50 of what came before"
    );

    // `history` and the REST page, read on the reader thread.
    b.send(json!({"command":"history","room":"general","before":11,"limit":5,"request_id":"h"}));
    let h = loop {
        let e = b.recv();
        if e["event"] == "history" {
            break e;
        }
    };
    assert_eq!(
        (ids(&h), &h["request_id"]),
        (vec![6, 7, 8, 9, 10], &json!("h"))
    );
    let page = srv.get_json("/api/rooms/general/messages?limit=3");
    assert_eq!(ids(&page), vec![58, 59, 60]);
    assert_eq!(page["more"], true);
    let r = srv.http("GET /api/rooms/nowhere/messages HTTP/1.1\r\nHost: t\r\n\r\n");
    assert_eq!(status(&r), 404, "a room that never was: {r}");

    // A room out of memory with stored messages: its page comes from the disk.
    b.send(json!({"command":"join","room":"dev"}));
    b.send(json!({"command":"broadcast","room":"dev","message":"d1","request_id":"d"}));
    while b.recv()["event"] != "ack" {}
    b.send(json!({"command":"leave","room":"dev","request_id":"l"}));
    while b.recv()["request_id"] != "l" {}
    let page = srv.get_json("/api/rooms/dev/messages");
    assert_eq!(ids(&page), vec![1]);
    drop((a, b));
    srv.stop();

    // After a restart everything is read back through the engine.
    let srv = sqlite(&path);
    let page = srv.get_json("/api/rooms/general/messages?limit=200");
    assert_eq!(ids(&page), (1..=60).collect::<Vec<_>>());
    let mut c = Raw::connect(&srv, "c");
    let welcome: Vec<Value> = (0..3).map(|_| c.recv()).collect();
    assert_eq!(ids(&welcome[2]), (11..=60).collect::<Vec<_>>());
    c.send(json!({"command":"broadcast","message":"after","request_id":"x"}));
    let ack = loop {
        let e = c.recv();
        if e["event"] == "ack" {
            break e;
        }
    };
    let id = ack["id"].as_u64().unwrap();
    assert!(id > 60, "ids go on above the stored ones: {id}");
    srv.stop();
    let _ = std::fs::remove_dir_all(std::path::Path::new(&path).parent().unwrap());
}

/// Each connection's commands are answered in the order they came, whichever engine answers
/// and however late: a broadcast to a room new to the server waits for the room's last id and
/// a reservation (reader and writer threads), and the `ping` sent right behind it is not
/// answered before it; a `join` page read on the reader thread comes before the answers to
/// the commands behind it.
#[test]
fn a_connections_answers_keep_the_order_of_its_commands() {
    let path = temp_db("order");
    let srv = sqlite(&path);
    let mut a = Raw::connect(&srv, "a");
    while a.recv()["event"] != "history" {}
    let rounds = 20;
    for i in 0..rounds {
        let room = format!("fresh{i}");
        a.send(json!({"command":"join","room":room}));
        a.send(json!({"command":"broadcast","room":room,"message":"first"}));
        a.send(json!({"command":"ping"}));
    }
    let mut order = Vec::new();
    let mut pongs = 0;
    while pongs < rounds {
        let e = a.recv();
        let tag = match e["event"].as_str() {
            Some("pong") => {
                pongs += 1;
                "pong".to_string()
            }
            Some("history") => format!("history {}", e["room"].as_str().unwrap()),
            Some("broadcast") if e["id"].is_u64() => {
                format!("echo {}", e["room"].as_str().unwrap())
            }
            _ => continue,
        };
        order.push(tag);
    }
    let expected: Vec<String> = (0..rounds)
        .flat_map(|i| {
            [
                format!("history fresh{i}"),
                format!("echo fresh{i}"),
                "pong".into(),
            ]
        })
        .collect();
    assert_eq!(order, expected, "answers out of the order of the commands");
    srv.stop();
}
