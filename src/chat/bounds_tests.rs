//! Unit tests of the core's bounds (issue 9): pages cut by bytes, replies told apart from room
//! traffic, a capped dedup map. No sockets, no clock, no disk.

use std::time::{Duration, Instant};

use serde_json::{Value, json};

use super::*;
use crate::store::StoredMessage;
use crate::store::memory::MemoryStore;

fn now() -> Now {
    Now {
        mono: Instant::now(),
        unix_ms: 1_700_000_000_000,
    }
}

fn chat(cfg: Config) -> Chat {
    let per_room = cfg.memory_history_per_room;
    Chat::new(
        Config {
            rate_burst: 10_000,
            ..cfg
        },
        Box::new(crate::store::engine::Immediate::new(MemoryStore::new(
            per_room,
        ))),
        counted_ids(),
    )
}

fn send(chat: &mut Chat, out: &mut impl Outbox, conn: ConnId, cmd: Value) {
    chat.handle_text(now(), conn, &cmd.to_string(), out);
}

fn message(id: u64, bytes: usize) -> StoredMessage {
    StoredMessage {
        id,
        member: "m".into(),
        message: "x".repeat(bytes),
        ts: 1,
        data: None,
    }
}

fn page_ids(page: &Page) -> Vec<u64> {
    page.messages.iter().map(|m| m.id).collect()
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
fn a_page_is_cut_by_bytes_at_the_end_the_next_page_continues_from() {
    // Ids of two digits each, so that every message is `one` long.
    let one = json_len(&message(11, 100)) + 1;
    let full = || Page {
        messages: (11..=20).map(|id| message(id, 100)).collect(),
        more: false,
    };
    let mut backwards = full();
    cut_page(&mut backwards, 3 * one, true);
    assert_eq!(page_ids(&backwards), vec![18, 19, 20], "the newest stay");
    assert!(backwards.more);
    let mut forwards = full();
    cut_page(&mut forwards, 3 * one + one / 2, false);
    assert_eq!(page_ids(&forwards), vec![11, 12, 13], "the oldest stay");
    assert!(forwards.more);
    let mut fits = full();
    cut_page(&mut fits, 10 * one, true);
    assert_eq!((fits.messages.len(), fits.more), (10, false), "nothing cut");
    let mut tiny = full();
    cut_page(&mut tiny, 1, true);
    assert_eq!(page_ids(&tiny), vec![20], "a page always holds one message");
    assert!(tiny.more);
    let mut empty = Page::default();
    cut_page(&mut empty, 1, false);
    assert_eq!(empty, Page::default());
}

#[test]
fn the_issues_bombs_make_cut_pages_that_page_on_to_the_first() {
    let cfg = Config::default();
    let max_page = cfg.page_bytes();
    let mut chat = chat(cfg);
    let mut out = Recorder::default();
    chat.connect(now(), 1, Some("sender"), None, &mut out);
    for i in 0..50 {
        let cmd = json!({
            "command": "broadcast",
            "message": "💣".repeat(1000),
            "data": format!("{i:04}{}", "x".repeat(3496)),
        });
        send(&mut chat, &mut out, 1, cmd);
    }
    out.sent.clear();
    chat.connect(now(), 2, Some("joiner"), None, &mut out);
    let page = out.events(2, "history").remove(0);
    let got = ids(&page);
    assert!(got.len() > 1 && got.len() < 50, "{got:?}");
    assert_eq!(*got.last().unwrap(), 50);
    assert_eq!(page["more"], true);
    assert!(
        page["messages"].to_string().len() <= max_page,
        "within the byte bound"
    );
    let mut seen = got;
    while seen[0] > 1 {
        let cmd = json!({"command":"history","room":"general","before":seen[0],"limit":200});
        send(&mut chat, &mut out, 2, cmd);
        let page = out.events(2, "history").remove(0);
        let got = ids(&page);
        assert_eq!(
            page["more"],
            got[0] > 1,
            "more says whether older ones exist"
        );
        seen.splice(0..0, got);
    }
    assert_eq!(seen, (1..=50).collect::<Vec<_>>());
    let token = chat.request_rest_page("general", None, Some(200), &mut out);
    let mut pages = chat.take_rest_pages();
    assert_eq!(pages.len(), 1, "the memory engine answers at once");
    let (answered, page) = pages.remove(0);
    assert_eq!(answered, token);
    let rest = page.unwrap().unwrap();
    assert!(
        rest.more && rest.messages.len() < 50,
        "the REST page is cut too"
    );
}

/// An outbox that notes whether each frame went out as a reply or as room traffic.
#[derive(Default)]
struct Kinds {
    replies: Vec<(ConnId, String)>,
    sends: Vec<(ConnId, String)>,
}

impl Outbox for Kinds {
    fn send(&mut self, to: ConnId, payload: &Payload) {
        self.sends.push((to, payload.json().to_string()));
    }
    fn reply(&mut self, to: ConnId, payload: &Payload) {
        self.replies.push((to, payload.json().to_string()));
    }
    fn close(&mut self, _: ConnId, _: Close) {}
}

fn events(list: &[(ConnId, String)], conn: ConnId) -> Vec<String> {
    list.iter()
        .filter(|(c, _)| *c == conn)
        .map(|(_, j)| {
            let v: Value = serde_json::from_str(j).unwrap();
            v["event"].as_str().unwrap().to_string()
        })
        .collect()
}

#[test]
fn answers_to_a_members_own_commands_are_replies_room_traffic_is_not() {
    let mut chat = chat(Config::default());
    let mut out = Kinds::default();
    chat.connect(now(), 1, Some("a"), None, &mut out);
    assert_eq!(events(&out.replies, 1), ["me", "history"], "the welcome");
    assert_eq!(
        events(&out.sends, 1),
        ["broadcast"],
        "its join notice is room traffic"
    );
    chat.connect(now(), 2, Some("b"), None, &mut out);
    out = Kinds::default();
    for cmd in [
        json!({"command":"me"}),
        json!({"command":"list"}),
        json!({"command":"rooms"}),
        json!({"command":"history","room":"general"}),
        json!({"command":"ping"}),
        json!({"command":"fly"}),
        json!({"command":"direct","to":"b","message":"hi"}),
    ] {
        send(&mut chat, &mut out, 1, cmd);
    }
    assert_eq!(
        events(&out.replies, 1),
        ["me", "list", "rooms", "history", "pong", "error", "direct"]
    );
    assert!(events(&out.sends, 1).is_empty());
    assert_eq!(events(&out.sends, 2), ["direct"], "b did not ask for it");
    out = Kinds::default();
    send(
        &mut chat,
        &mut out,
        1,
        json!({"command":"broadcast","message":"x"}),
    );
    assert_eq!(
        events(&out.sends, 1),
        ["broadcast"],
        "the echo is room traffic"
    );
    assert_eq!(events(&out.sends, 2), ["broadcast"]);
}

#[test]
fn the_dedup_map_never_exceeds_its_cap_and_recent_ids_still_dedup() {
    let cap = 100;
    let mut chat = chat(Config {
        max_dedup_entries: cap,
        ..Config::default()
    });
    let mut out = Recorder::default();
    chat.connect(now(), 1, Some("a"), None, &mut out);
    let mut at = now();
    for i in 0..1000 {
        at.mono += Duration::from_millis(1);
        let cmd = json!({"command":"broadcast","message":"m","msg_id":format!("k{i}")});
        chat.handle_text(at, 1, &cmd.to_string(), &mut out);
        assert!(chat.dedup.len() <= cap, "{} entries", chat.dedup.len());
        chat.dedup.assert_consistent();
    }
    assert_eq!(chat.dedup.len(), cap);
    assert_eq!(chat.stats().broadcasts, 1000);
    // The newest `cap` are remembered: repeats of them are not stored again.
    for i in 900..1000 {
        let cmd = json!({"command":"broadcast","message":"m","msg_id":format!("k{i}")});
        chat.handle_text(at, 1, &cmd.to_string(), &mut out);
    }
    assert_eq!(chat.stats().broadcasts, 1000, "recent msg_ids still dedup");
    // The oldest were forgotten first: a retry of one is new again.
    let cmd = json!({"command":"broadcast","message":"m","msg_id":"k0"});
    chat.handle_text(at, 1, &cmd.to_string(), &mut out);
    assert_eq!(chat.stats().broadcasts, 1001);
    assert!(chat.dedup.len() <= cap);
}
