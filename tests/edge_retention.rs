//! SQLite history retention through the real server: `--history-max-per-room` and
//! `--history-max-age` delete the oldest messages off the loop; `history` and `join since`
//! answer what is left; ids are never reused, across leaving a room and across a restart.

#![cfg(feature = "sqlite")]

mod common;

use std::time::{Duration, Instant};

use chatterbox::config::Config;
use serde_json::{Value, json};

use common::{Client, Running};

fn temp_db(name: &str) -> String {
    let dir = std::env::temp_dir().join(format!(
        "chatterbox-retention-{}-{name}",
        std::process::id()
    ));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir.join("h.db").to_string_lossy().into_owned()
}

fn config(db: &str, max_age: u64, per_room: u64) -> Config {
    Config {
        db_path: db.into(),
        history_max_age: max_age,
        history_max_per_room: per_room,
        rate_burst: 10_000,
        rate_per_sec: 10_000,
        ..Config::default()
    }
}

/// Broadcasts `n` messages to `room` and waits for each ack; returns their ids.
fn post(c: &mut Client, room: &str, n: usize) -> Vec<u64> {
    (0..n)
        .map(|i| {
            let rid = format!("{room}-{i}");
            c.send(
                json!({"command": "broadcast", "room": room, "message": format!("m{i}"),
                          "request_id": rid}),
            );
            let ack = c.until(|e| e["event"] == "ack" && e["request_id"] == rid.as_str());
            ack["id"].as_u64().unwrap()
        })
        .collect()
}

fn ids(event: &Value) -> Vec<u64> {
    event["messages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["id"].as_u64().unwrap())
        .collect()
}

/// Asks `history` of `room` until its ids are `want` (pruning runs on the writer, after the
/// acks); only a generous deadline, to turn a hang into a failure.
fn history_becomes(c: &mut Client, room: &str, want: &[u64]) -> Value {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        c.send(json!({"command": "history", "room": room, "limit": 100}));
        let h = c.until(|e| e["event"] == "history" && e["room"] == room);
        if ids(&h) == want {
            return h;
        }
        assert!(
            Instant::now() < deadline,
            "history of {room} stays {:?}",
            ids(&h)
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn the_per_room_cap_keeps_the_newest_and_pruned_ranges_answer_what_is_left() {
    let db = temp_db("cap");
    let running = Running::start(config(&db, 0, 5));
    let mut c = running.client("keeper");
    c.send(json!({"command": "join", "room": "r"}));
    c.until(|e| e["event"] == "history" && e["room"] == "r");
    assert_eq!(post(&mut c, "r", 20), (1..=20).collect::<Vec<_>>());
    let h = history_becomes(&mut c, "r", &[16, 17, 18, 19, 20]);
    assert_eq!(h["more"], false, "nothing older is left");
    // A page before a pruned id: empty, not an error.
    c.send(json!({"command": "history", "room": "r", "before": 10}));
    let h = c.until(|e| e["event"] == "history" && e["room"] == "r");
    assert_eq!((ids(&h), &h["more"]), (vec![], &json!(false)));
    // Resuming from inside the pruned range gets what is left.
    c.send(json!({"command": "leave", "room": "r"}));
    c.send(json!({"command": "join", "room": "r", "since": 3}));
    let h = c.until(|e| e["event"] == "history" && e["room"] == "r");
    assert_eq!(ids(&h), vec![16, 17, 18, 19, 20]);
    // The REST page agrees.
    let page = running.get_json("/api/rooms/r/messages?limit=50");
    assert_eq!(ids(&page), vec![16, 17, 18, 19, 20]);
    // `general` has its own cap.
    assert_eq!(post(&mut c, "general", 2), vec![1, 2]);
    drop(c);
    running.stop();

    // After a restart the room continues at 21 and the cap still holds.
    let running = Running::start(config(&db, 0, 5));
    let mut c = running.client("keeper");
    c.send(json!({"command": "join", "room": "r"}));
    let h = c.until(|e| e["event"] == "history" && e["room"] == "r");
    assert_eq!(ids(&h), vec![16, 17, 18, 19, 20]);
    assert_eq!(post(&mut c, "r", 1), vec![21]);
    history_becomes(&mut c, "r", &[17, 18, 19, 20, 21]);
    running.stop();
}

#[test]
fn a_room_emptied_by_age_continues_above_its_last_id() {
    let db = temp_db("age");
    let running = Running::start(config(&db, 1, 0));
    let mut c = running.client("ager");
    c.send(json!({"command": "join", "room": "old"}));
    c.until(|e| e["event"] == "history" && e["room"] == "old");
    assert_eq!(post(&mut c, "old", 3), vec![1, 2, 3]);
    // Every message goes once it is a second old.
    history_becomes(&mut c, "old", &[]);
    // Out of memory (the last member left) and back: the id comes from the store's marks.
    c.send(json!({"command": "leave", "room": "old", "request_id": "bye"}));
    c.until(|e| e["event"] == "ack" && e["request_id"] == "bye");
    c.send(json!({"command": "join", "room": "old"}));
    let h = c.until(|e| e["event"] == "history" && e["room"] == "old");
    assert_eq!(ids(&h), Vec::<u64>::new());
    assert_eq!(post(&mut c, "old", 1), vec![4], "an id is never reused");
    history_becomes(&mut c, "old", &[]);
    drop(c);
    running.stop();
    let running = Running::start(config(&db, 1, 0));
    let mut c = running.client("ager");
    c.send(json!({"command": "join", "room": "old"}));
    c.until(|e| e["event"] == "history" && e["room"] == "old");
    assert_eq!(post(&mut c, "old", 1), vec![5], "nor after a restart");
    running.stop();
}

#[test]
fn retention_flags_and_variables_reach_the_config() {
    use chatterbox::config::Cli;
    let env = |k: &str| (k == "HISTORY_MAX_AGE").then(|| "3600".to_string());
    let Cli::Run(cfg) =
        Config::from_args(["--history-max-per-room".to_string(), "7".to_string()], env).unwrap()
    else {
        panic!("not a run");
    };
    assert_eq!((cfg.history_max_age, cfg.history_max_per_room), (3600, 7));
    let e = Config::from_args(["--history-max-per-room=-3".to_string()], |_| None).unwrap_err();
    assert!(e.contains("--history-max-per-room"), "{e}");
}
