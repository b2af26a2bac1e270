//! Issue 9, the core's reply bounds, against the real server on `127.0.0.1:0`:
//! a history page or a `list` bigger than the output bound no longer closes the member who asked
//! for it (on join, after a restart, at a small `--max-pending-output`).

mod common;

use std::time::Duration;

use chatterbox::config::Config;
use common::{Client, Running};
use serde_json::{Value, json};

/// The recipe: 1,000 × "💣" (4,000 bytes of text) and 3,500 characters of `data`,
/// within every default limit; 50 of them make a join page of ~380 KB.
fn bomb(i: usize) -> Value {
    json!({
        "command": "broadcast",
        "message": "💣".repeat(1000),
        "data": format!("{i:04}{}", "x".repeat(3496)),
        "request_id": format!("b{i}"),
        "echo": false,
    })
}

/// Enough tokens for the recipe's 50 broadcasts in a burst.
fn roomy(cfg: Config) -> Config {
    Config {
        rate_burst: 1000,
        ..cfg
    }
}

#[cfg(feature = "sqlite")]
fn temp_db(name: &str) -> String {
    let dir = std::env::temp_dir().join(format!("chatterbox-core-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir.join("h.db").to_string_lossy().into_owned()
}

/// Sends the 50 bombs and waits for the last ack (the store holds them all).
fn drop_bombs(c: &mut Client) {
    for i in 0..50 {
        c.send(bomb(i));
    }
    c.until(|e| e["event"] == "ack" && e["request_id"] == "b49");
}

fn ids(page: &Value) -> Vec<u64> {
    page["messages"]
        .as_array()
        .expect("messages")
        .iter()
        .map(|m| m["id"].as_u64().unwrap())
        .collect()
}

/// A newcomer gets a cut page with `more:true`, stays connected, and pages back to the first
/// message with `history before`.
fn newcomer_pages_through_the_bombs(running: &Running) {
    let mut url_client = connect_raw(running, "newcomer");
    let page = url_client.until(|e| e["event"] == "history");
    let first = ids(&page);
    assert!(!first.is_empty(), "at least one message: {first:?}");
    assert!(first.len() < 50, "the page is cut by bytes: {first:?}");
    // The number docs/PROTOCOL.md gives: at the defaults, 8 of these messages fit a page.
    assert_eq!(
        first,
        (43..=50).collect::<Vec<u64>>(),
        "8 messages in 64 KiB"
    );
    assert_eq!(page["more"], true);
    assert_eq!(*first.last().unwrap(), 50, "the newest messages come first");
    let mut seen = first.clone();
    let mut before = first[0];
    loop {
        url_client.send(json!({"command":"history","room":"general","before":before,"limit":200}));
        let page = url_client.until(|e| e["event"] == "history");
        let got = ids(&page);
        assert!(!got.is_empty(), "a page before {before} is not empty");
        assert!(*got.last().unwrap() < before);
        seen.splice(0..0, got.iter().copied());
        before = got[0];
        if page["more"] == false {
            break;
        }
    }
    assert_eq!(
        seen,
        (1..=50).collect::<Vec<_>>(),
        "every message, once, in order"
    );
    url_client.send(json!({"command":"ping","request_id":"still-here"}));
    let pong = url_client.until(|e| e["event"] == "pong");
    assert_eq!(pong["request_id"], "still-here");
}

/// A client like `Running::client`, but that does not insist on `history` (the unfixed server
/// closes before it): reading stops at the close and fails the test with its code.
fn connect_raw(running: &Running, name: &str) -> Client {
    let url = format!("ws://{}/ws?name={name}", running.addr);
    let (ws, _) = tungstenite::connect(url).expect("upgrade");
    if let tungstenite::stream::MaybeTlsStream::Plain(s) = ws.get_ref() {
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    }
    Client { ws }
}

#[test]
fn a_join_page_over_the_output_bound_is_cut_and_the_joiner_stays() {
    let running = Running::start(roomy(Config {
        db_path: ":memory:".into(),
        ..Config::default()
    }));
    let mut sender = running.client("sender");
    drop_bombs(&mut sender);
    newcomer_pages_through_the_bombs(&running);
    // The REST page is cut the same way.
    let rest = running.get_json("/api/rooms/general/messages?limit=200");
    let got = ids(&rest);
    assert!(!got.is_empty() && got.len() < 50, "{got:?}");
    assert_eq!(rest["more"], true);
    assert_eq!(*got.last().unwrap(), 50);
    running.stop();
}

#[cfg(feature = "sqlite")]
#[test]
fn the_bombs_do_not_lock_joiners_out_after_a_restart() {
    let db = temp_db("bombs");
    let cfg = roomy(Config {
        db_path: db.clone(),
        ..Config::default()
    });
    let running = Running::start(cfg.clone());
    let mut sender = running.client("sender");
    drop_bombs(&mut sender);
    drop(sender);
    running.stop();
    let running = Running::start(cfg);
    newcomer_pages_through_the_bombs(&running);
    // A resume from the start is cut too, oldest first.
    let mut c = running.client("resumer");
    c.send(json!({"command":"join","room":"general","since":0}));
    let page = c.until(|e| e["event"] == "history");
    let got = ids(&page);
    assert!(!got.is_empty() && got.len() < 50, "{got:?}");
    assert_eq!(got[0], 1, "a resume page starts after `since`");
    assert_eq!(page["more"], true);
    running.stop();
}

#[test]
fn a_list_bigger_than_the_output_bound_reaches_the_asker() {
    // 150 names of 32 characters make a `list` of ~5.3 KB, over a 4 KiB bound.
    let running = Running::start(Config {
        db_path: ":memory:".into(),
        max_pending_output: 4096,
        notice_max_members: 0,
        ..Config::default()
    });
    let mut asker = running.client("asker");
    let mut others = Vec::new();
    for i in 0..150 {
        others.push(running.client(&format!("{i:03}{}", "n".repeat(29))));
    }
    asker.send(json!({"command":"list","request_id":"all"}));
    let list = asker.until(|e| e["event"] == "list");
    assert_eq!(list["members"].as_array().unwrap().len(), 151);
    asker.send(json!({"command":"ping"}));
    asker.until(|e| e["event"] == "pong");
    running.stop();
}
