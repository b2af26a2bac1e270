//! Unit tests of the chat core: no sockets, no clock, no disk.

use std::time::{Duration, Instant};

use serde_json::{Value, json};

use super::*;
use crate::store::HistoryStore;
use crate::store::StoredMessage;
use crate::store::engine::Immediate;
use crate::store::memory::MemoryStore;

struct T {
    chat: Chat,
    out: Recorder,
    now: Now,
}

impl T {
    fn new() -> T {
        T::with(Config::default())
    }
    fn with(cfg: Config) -> T {
        let per_room = cfg.memory_history_per_room;
        T {
            chat: Chat::new(
                cfg,
                Box::new(Immediate::new(MemoryStore::new(per_room))),
                counted_ids(),
            ),
            out: Recorder::default(),
            now: Now {
                mono: Instant::now(),
                unix_ms: 1_700_000_000_000,
            },
        }
    }
    /// Member `a` on connection 1 has sent ten messages to `general` (ids 1 to 10).
    fn with_ten_messages(cfg: Config) -> T {
        let mut t = T::with(Config {
            rate_burst: 1000,
            ..cfg
        });
        t.connect(1, Some("a"));
        for i in 0..10 {
            t.send(1, json!({"command":"broadcast","message":format!("{i}")}));
        }
        t
    }
    /// A chat whose store is durable only up to the ticket the returned cell holds.
    fn with_slow_store() -> (T, std::rc::Rc<std::cell::Cell<u64>>) {
        let durable = std::rc::Rc::new(std::cell::Cell::new(0));
        let store = SlowStore {
            inner: MemoryStore::new(10),
            durable: durable.clone(),
        };
        let mut t = T::new();
        t.chat = Chat::new(
            Config::default(),
            Box::new(Immediate::new(store)),
            counted_ids(),
        );
        (t, durable)
    }
    fn connect(&mut self, conn: ConnId, name: Option<&str>) {
        self.chat.connect(self.now, conn, name, None, &mut self.out);
        self.chat.rooms.assert_consistent();
    }
    fn send(&mut self, conn: ConnId, cmd: Value) {
        self.chat
            .handle_text(self.now, conn, &cmd.to_string(), &mut self.out);
        self.chat.rooms.assert_consistent();
        self.chat.dedup.assert_consistent();
    }
    fn advance(&mut self, d: Duration) {
        self.now.mono += d;
        self.now.unix_ms += d.as_millis() as u64;
    }
    /// The one event `conn` got in answer to `cmd`.
    fn ask(&mut self, conn: ConnId, cmd: Value) -> Value {
        self.out.sent.clear();
        self.send(conn, cmd);
        let mut got = self.out.take(conn);
        assert_eq!(got.len(), 1, "expected one answer, got {got:?}");
        got.remove(0)
    }
    fn error_code(&mut self, conn: ConnId, cmd: Value) -> String {
        let e = self.ask(conn, cmd);
        assert_eq!(e["event"], "error", "{e}");
        e["code"].as_str().unwrap().to_string()
    }
}

fn names(v: &Value) -> Vec<&str> {
    v["members"]
        .as_array()
        .unwrap()
        .iter()
        .map(|n| n.as_str().unwrap())
        .collect()
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
fn payloads_are_one_final_unmasked_text_frame() {
    let p = Payload::new(r#"{"event":"pong","ts":1}"#);
    assert_eq!(
        &p.bytes()[..2],
        &[0x81, 23],
        "FIN + text, unmasked, 7-bit length"
    );
    assert_eq!(p.json(), r#"{"event":"pong","ts":1}"#);
    let long = format!(r#"{{"event":"system","message":"{}"}}"#, "x".repeat(300));
    let p = Payload::new(&long);
    let len = (long.len() as u16).to_be_bytes();
    assert_eq!(
        &p.bytes()[..4],
        &[0x81, 126, len[0], len[1]],
        "16-bit length past 125 bytes"
    );
    assert_eq!(p.json(), long);
}

#[test]
fn welcome_is_me_then_joined_then_history() {
    let mut t = T::new();
    t.connect(1, Some("alice"));
    let got = t.out.take(1);
    assert_eq!(got.len(), 3, "{got:?}");
    assert_eq!(got[0]["event"], "me");
    assert_eq!(got[0]["member"], "alice");
    let id = got[0]["id"].as_str().unwrap();
    assert_eq!(uuid::Uuid::parse_str(id).unwrap().get_version_num(), 4);
    assert_eq!(
        id, "00000000-0000-4000-8000-000000000001",
        "the first counted id"
    );
    assert_eq!(
        got[1],
        json!({"event":"broadcast","room":"general","member":"system","message":"alice has joined!","joined":"alice"})
    );
    assert_eq!(
        got[2],
        json!({"event":"history","room":"general","messages":[],"more":false})
    );
}

#[test]
fn member_ids_come_from_the_source_unless_authentication_gives_one() {
    let mut t = T::new();
    t.connect(1, Some("a"));
    t.chat
        .connect(t.now, 2, Some("b"), Some("sub-42".into()), &mut t.out);
    t.connect(3, Some("c"));
    let id = |t: &mut T, conn| t.out.events(conn, "me")[0]["id"].clone();
    assert_eq!(id(&mut t, 1), "00000000-0000-4000-8000-000000000001");
    assert_eq!(id(&mut t, 2), "sub-42", "the token's subject");
    assert_eq!(
        id(&mut t, 3),
        "00000000-0000-4000-8000-000000000002",
        "a supplied id takes none from the source"
    );

    let mut next = 0;
    let ids: MemberIds = Box::new(move || {
        next += 7;
        format!("id-{next}")
    });
    let mut chat = Chat::new(
        Config::default(),
        Box::new(Immediate::new(MemoryStore::new(10))),
        ids,
    );
    let mut out = Recorder::default();
    for conn in [1, 2] {
        chat.connect(t.now, conn, None, None, &mut out);
    }
    assert_eq!(out.events(1, "me")[0]["id"], "id-7");
    assert_eq!(out.events(2, "me")[0]["id"], "id-14");
}

#[test]
fn counted_ids_are_shaped_like_uuid_v4() {
    let mut ids = counted_ids();
    for n in 1..=300u64 {
        let id = ids();
        let uuid = uuid::Uuid::parse_str(&id).unwrap();
        assert_eq!(uuid.get_version_num(), 4, "{id}");
        assert_eq!(uuid.get_variant(), uuid::Variant::RFC4122, "{id}");
        assert_eq!(u64::from_str_radix(&id[24..], 16).unwrap(), n);
    }
}

#[test]
fn assigned_names_are_unique_and_numbered() {
    let mut t = T::new();
    t.connect(1, None);
    t.connect(2, Some("member2"));
    t.connect(3, None);
    assert_eq!(t.chat.member_names(), vec!["member1", "member2", "member3"]);
}

#[test]
fn names_are_checked_before_the_upgrade() {
    let mut t = T::new();
    t.connect(1, Some("Alice"));
    assert_eq!(
        t.chat.check_name("alice").unwrap_err().status,
        409,
        "case-insensitive"
    );
    assert_eq!(t.chat.check_name("bad name").unwrap_err().status, 400);
    assert_eq!(t.chat.check_name("System").unwrap_err().status, 400);
    assert!(t.chat.check_name("bob").is_ok());
}

#[test]
fn broadcast_reaches_everyone_with_gapless_ids() {
    let mut t = T::new();
    t.connect(1, Some("a"));
    t.connect(2, Some("b"));
    t.out.sent.clear();
    t.send(
        1,
        json!({"command":"broadcast","message":"hi","data":{"k":[1,{"z":null}]}}),
    );
    t.send(2, json!({"command":"broadcast","message":"yo"}));
    for conn in [1, 2] {
        let got = t.out.events(conn, "broadcast");
        assert_eq!(got.len(), 2);
        assert_eq!(got[0]["member"], "a");
        assert_eq!(got[0]["id"], 1);
        assert_eq!(got[0]["ts"], 1_700_000_000_000u64);
        assert_eq!(got[0]["data"], json!({"k":[1,{"z":null}]}));
        assert_eq!(got[1]["id"], 2);
        assert!(got[1].get("data").is_none());
    }
}

#[test]
fn alone_sender_is_told_and_echo_false_skips_the_sender() {
    let mut t = T::new();
    t.connect(1, Some("a"));
    t.out.sent.clear();
    t.send(1, json!({"command":"broadcast","message":"anyone?"}));
    let got = t.out.take(1);
    assert!(
        got.iter().any(|e| e
            == &json!({"event":"system","message":"No other members are currently connected."}))
    );
    t.connect(2, Some("b"));
    t.out.sent.clear();
    t.send(
        1,
        json!({"command":"broadcast","message":"quiet","echo":false}),
    );
    assert!(
        t.out.take(1).is_empty(),
        "no echo, no notice: someone else is here"
    );
    assert_eq!(t.out.events(2, "broadcast")[0]["message"], "quiet");
}

#[test]
fn request_id_is_echoed_by_reply_ack_and_error() {
    let mut t = T::new();
    t.connect(1, Some("a"));
    let pong = t.ask(1, json!({"command":"ping","request_id":"p"}));
    assert_eq!(
        (pong["event"].as_str(), pong["request_id"].as_str()),
        (Some("pong"), Some("p"))
    );
    assert!(pong["ts"].is_u64());
    t.out.sent.clear();
    t.send(
        1,
        json!({"command":"broadcast","message":"x","request_id":"b"}),
    );
    let acks = t.out.events(1, "ack");
    assert_eq!(
        acks,
        vec![json!({"event":"ack","request_id":"b","room":"general","id":1})]
    );
    let err = t.ask(1, json!({"command":"nope","request_id":"e"}));
    assert_eq!(
        (err["code"].as_str(), err["request_id"].as_str()),
        (Some("unknown_command"), Some("e"))
    );
}

#[test]
fn bad_input_gets_the_right_code_and_changes_nothing() {
    let mut t = T::new();
    t.connect(1, Some("a"));
    t.out.sent.clear();
    t.chat.handle_text(t.now, 1, "{not json", &mut t.out);
    assert_eq!(t.out.take(1)[0]["code"], "bad_json");
    t.chat.handle_binary(t.now, 1, &mut t.out);
    assert_eq!(t.out.take(1)[0]["code"], "bad_json");
    assert_eq!(t.error_code(1, json!({"command":"broadcast"})), "invalid");
    assert_eq!(
        t.error_code(1, json!({"command":"broadcast","message":"   "})),
        "invalid"
    );
    assert_eq!(
        t.error_code(1, json!({"command":"broadcast","message":"x".repeat(1001)})),
        "invalid"
    );
    assert_eq!(
        t.error_code(1, json!({"command":"broadcast","message":"x","room":"a b"})),
        "invalid"
    );
    assert_eq!(
        t.error_code(
            1,
            json!({"command":"broadcast","message":"x","room":"elsewhere"})
        ),
        "not_member"
    );
    assert_eq!(
        t.error_code(1, json!({"command":"join","room":""})),
        "invalid"
    );
    assert_eq!(t.chat.room_count(), 1);
    assert_eq!(t.chat.stats().broadcasts, 0, "nothing was stored");
}

#[test]
fn list_is_oldest_first_and_per_room() {
    let mut t = T::new();
    t.connect(5, Some("c"));
    t.connect(1, Some("a"));
    t.connect(3, Some("b"));
    assert_eq!(
        names(&t.ask(1, json!({"command":"list"}))),
        vec!["c", "a", "b"]
    );
    t.send(3, json!({"command":"join","room":"r"}));
    t.send(5, json!({"command":"join","room":"r"}));
    let l = t.ask(1, json!({"command":"list","room":"r"}));
    assert_eq!((names(&l), l["room"].as_str()), (vec!["b", "c"], Some("r")));
    assert_eq!(
        t.error_code(1, json!({"command":"list","room":"ghost"})),
        "not_found"
    );
}

#[test]
fn disconnect_tells_every_room_and_frees_the_name() {
    let mut t = T::new();
    t.connect(1, Some("a"));
    t.connect(2, Some("b"));
    t.send(1, json!({"command":"join","room":"r"}));
    t.send(2, json!({"command":"join","room":"r"}));
    t.out.sent.clear();
    t.chat.disconnect(1, &mut t.out);
    let left: Vec<_> = t
        .out
        .take(2)
        .into_iter()
        .filter(|e| e["left"] == "a")
        .collect();
    assert_eq!(left.len(), 2, "general and r");
    assert_eq!(left[0]["message"], "a has left!");
    assert_eq!(t.chat.member_names(), vec!["b"]);
    assert!(t.chat.check_name("A").is_ok());
    t.chat.rooms.assert_consistent();
    assert!(t.chat.rooms.rooms_of(1).is_empty(), "a is in no room");
    assert_eq!(t.chat.rooms.members("r"), &[2]);
    t.chat.disconnect(1, &mut t.out);
    assert!(t.out.sent.is_empty(), "a second disconnect is a no-op");
}

#[test]
fn join_creates_rooms_and_sends_history() {
    let mut t = T::new();
    t.connect(1, Some("a"));
    t.send(1, json!({"command":"join","room":"r"}));
    for i in 1..=5 {
        t.send(
            1,
            json!({"command":"broadcast","room":"r","message":format!("m{i}")}),
        );
    }
    t.connect(2, Some("b"));
    t.out.sent.clear();
    t.send(2, json!({"command":"join","room":"r","last_n":2}));
    let got = t.out.take(2);
    assert_eq!(
        got[0]["joined"], "b",
        "the joiner hears its own notice first"
    );
    assert_eq!(
        (ids(&got[1]), got[1]["more"].as_bool()),
        (vec![4, 5], Some(true))
    );
    assert_eq!(t.out.events(1, "broadcast")[0]["message"], "b has joined!");
    let h = t.ask(2, json!({"command":"join","room":"r","since":3}));
    assert_eq!(
        (ids(&h), h["more"].as_bool()),
        (vec![4, 5], Some(false)),
        "rejoin resumes, no notice"
    );
}

#[test]
fn resume_is_capped_and_says_more() {
    let mut t = T::with_ten_messages(Config {
        resume_cap: 3,
        ..Config::default()
    });
    let h = t.ask(1, json!({"command":"join","room":"general","since":2}));
    assert_eq!((ids(&h), h["more"].as_bool()), (vec![3, 4, 5], Some(true)));
}

#[test]
fn history_pages_backwards_with_honest_more_and_a_cap() {
    let mut t = T::with_ten_messages(Config {
        history_page_cap: 4,
        ..Config::default()
    });
    let p = t.ask(1, json!({"command":"history","room":"general","limit":3}));
    assert_eq!((ids(&p), p["more"].as_bool()), (vec![8, 9, 10], Some(true)));
    let p = t.ask(
        1,
        json!({"command":"history","room":"general","before":4,"limit":3}),
    );
    assert_eq!((ids(&p), p["more"].as_bool()), (vec![1, 2, 3], Some(false)));
    let p = t.ask(1, json!({"command":"history","room":"general","limit":100}));
    assert_eq!(ids(&p), vec![7, 8, 9, 10], "capped at the page cap");
    let p = t.ask(1, json!({"command":"history","room":"never-used"}));
    assert_eq!((ids(&p), p["more"].as_bool()), (vec![], Some(false)));
}

#[test]
fn leave_drops_empty_rooms_but_ids_go_on() {
    let mut t = T::new();
    t.connect(1, Some("a"));
    t.send(1, json!({"command":"join","room":"r"}));
    t.send(1, json!({"command":"broadcast","room":"r","message":"one"}));
    t.send(1, json!({"command":"leave","room":"r"}));
    assert_eq!(t.chat.room_count(), 1, "r is dropped from memory");
    assert_eq!(
        t.error_code(1, json!({"command":"leave","room":"r"})),
        "not_member"
    );
    t.send(1, json!({"command":"join","room":"r"}));
    t.out.sent.clear();
    t.send(1, json!({"command":"broadcast","room":"r","message":"two"}));
    assert_eq!(t.out.events(1, "broadcast")[0]["id"], 2, "never reused");
    t.send(1, json!({"command":"leave","room":"general"}));
    assert!(
        t.chat.rooms.contains(DEFAULT_ROOM),
        "general stays even when empty"
    );
}

#[test]
fn leave_notifies_the_room_and_acks() {
    let mut t = T::new();
    t.connect(1, Some("a"));
    t.connect(2, Some("b"));
    t.out.sent.clear();
    t.send(
        1,
        json!({"command":"leave","room":"general","request_id":"q"}),
    );
    let mine = t.out.take(1);
    assert_eq!(mine[0]["left"], "a");
    assert_eq!(
        mine[1],
        json!({"event":"ack","request_id":"q","room":"general"})
    );
    assert_eq!(t.out.take(2)[0]["message"], "a has left!");
    assert_eq!(
        names(&t.ask(2, json!({"command":"list","room":"general"}))),
        vec!["b"]
    );
}

#[test]
fn room_limits() {
    let cfg = Config {
        max_rooms_per_member: 2,
        max_rooms: 3,
        ..Config::default()
    };
    let mut t = T::with(cfg);
    t.connect(1, Some("a"));
    t.connect(2, Some("b"));
    t.send(1, json!({"command":"join","room":"x"}));
    assert_eq!(
        t.error_code(1, json!({"command":"join","room":"y"})),
        "limit_reached"
    );
    t.send(2, json!({"command":"join","room":"z"}));
    assert_eq!(t.chat.room_count(), 3);
    t.send(2, json!({"command":"leave","room":"general"}));
    assert_eq!(
        t.error_code(2, json!({"command":"join","room":"w"})),
        "limit_reached",
        "server full"
    );
    t.out.sent.clear();
    t.send(2, json!({"command":"join","room":"x"}));
    assert_eq!(
        t.out.events(2, "history").len(),
        1,
        "existing rooms can still be joined"
    );
}

#[test]
fn rooms_lists_names_and_counts() {
    let mut t = T::new();
    t.connect(1, Some("a"));
    t.connect(2, Some("b"));
    t.send(2, json!({"command":"join","room":"alpha"}));
    let r = t.ask(1, json!({"command":"rooms"}));
    assert_eq!(
        r["rooms"],
        json!([{"name":"alpha","members":1},{"name":"general","members":2}])
    );
}

#[test]
fn direct_reaches_both_ends_and_is_not_stored() {
    let mut t = T::new();
    t.connect(1, Some("a"));
    t.connect(2, Some("Bob"));
    t.connect(3, Some("c"));
    t.out.sent.clear();
    t.send(
        1,
        json!({"command":"direct","to":"bob","message":"psst","request_id":"d"}),
    );
    let to_b = t.out.take(2);
    let to_a = t.out.take(1);
    assert_eq!(to_b.len(), 1);
    assert_eq!(
        (to_b[0]["from"].as_str(), to_b[0]["to"].as_str()),
        (Some("a"), Some("Bob"))
    );
    assert!(to_b[0].get("request_id").is_none());
    assert_eq!(to_a[0]["request_id"], "d");
    assert!(t.out.take(3).is_empty());
    assert_eq!(t.chat.stats().broadcasts, 0);
    assert_eq!(
        t.error_code(1, json!({"command":"direct","to":"nobody","message":"x"})),
        "not_found"
    );
}

/// Names are ASCII and unique ignoring ASCII case. `K` (U+212A KELVIN SIGN) is no valid name,
/// but Unicode lower-cases it to an ASCII `k`, so a `direct` to it reached member `k`.
#[test]
fn direct_to_a_unicode_lookalike_of_a_name_finds_no_one() {
    let mut t = T::new();
    t.connect(1, Some("a"));
    t.connect(2, Some("k"));
    t.connect(3, Some("Skip"));
    t.out.sent.clear();
    for to in ["\u{212A}", "S\u{212A}ip", "\u{212A}\u{212A}"] {
        assert_eq!(
            t.error_code(1, json!({"command":"direct","to":to,"message":"x"})),
            "not_found",
            "{to}"
        );
        assert!(t.out.take(2).is_empty() && t.out.take(3).is_empty());
    }
    let e = t.ask(1, json!({"command":"direct","to":"SKIP","message":"x"}));
    assert_eq!(
        (e["event"].as_str(), e["to"].as_str()),
        (Some("direct"), Some("Skip"))
    );
}

#[test]
fn msg_id_makes_broadcasts_idempotent_within_the_window() {
    let mut t = T::new();
    t.connect(1, Some("a"));
    t.connect(2, Some("b"));
    t.out.sent.clear();
    let cmd = json!({"command":"broadcast","message":"once","msg_id":"k1","request_id":"r"});
    t.send(1, cmd.clone());
    t.send(1, cmd.clone());
    assert_eq!(t.out.events(2, "broadcast").len(), 1, "delivered once");
    let acks = t.out.events(1, "ack");
    assert_eq!(acks.len(), 2);
    assert_eq!(
        (acks[0]["id"].as_u64(), acks[1]["id"].as_u64()),
        (Some(1), Some(1))
    );
    assert_eq!(t.chat.stats().broadcasts, 1, "stored once");
    t.advance(t.chat.config().dedup_window + Duration::from_secs(1));
    t.out.sent.clear();
    t.send(1, cmd);
    assert_eq!(
        t.out.events(2, "broadcast")[0]["id"],
        2,
        "after the window it is new"
    );
}

#[test]
fn rate_limit_drops_then_closes_a_flooder() {
    let cfg = Config {
        rate_per_sec: 10,
        rate_burst: 5,
        flood_close_after: 3,
        ..Config::default()
    };
    let mut t = T::with(cfg);
    t.connect(1, Some("a"));
    t.connect(2, Some("b"));
    t.out.sent.clear();
    for _ in 0..6 {
        t.send(1, json!({"command":"ping","request_id":"f"}));
    }
    let got = t.out.take(1);
    assert_eq!(got.iter().filter(|e| e["event"] == "pong").count(), 5);
    assert_eq!(got.last().unwrap()["code"], "rate_limited");
    assert_eq!(
        got.last().unwrap()["request_id"],
        "f",
        "the dropped command's id is echoed"
    );
    t.advance(Duration::from_millis(100));
    assert_eq!(
        t.ask(1, json!({"command":"ping"}))["event"],
        "pong",
        "refilled at 10/s"
    );
    for _ in 0..4 {
        t.send(1, json!({"command":"ping"}));
    }
    assert_eq!(
        t.out.closed,
        vec![(1, 1008, "rate limit exceeded".to_string())]
    );
    assert_eq!(t.chat.member_names(), vec!["b"], "the flooder is gone");
    assert_eq!(
        t.chat.stats().rate_limited,
        5,
        "one in the first burst, four in the flood"
    );
}

#[test]
fn notices_stop_in_big_rooms() {
    let cfg = Config {
        notice_max_members: 2,
        ..Config::default()
    };
    let mut t = T::with(cfg);
    t.connect(1, Some("a"));
    t.connect(2, Some("b"));
    t.out.sent.clear();
    t.connect(3, Some("c"));
    assert!(t.out.take(1).is_empty(), "three members: no join notice");
    assert_eq!(t.out.events(3, "history").len(), 1);
}

/// A store whose durability the test controls, to prove acks wait for it.
struct SlowStore {
    inner: MemoryStore,
    durable: std::rc::Rc<std::cell::Cell<u64>>,
}

impl HistoryStore for SlowStore {
    fn last_id(&mut self, room: &str) -> Result<u64, crate::store::StoreError> {
        self.inner.last_id(room)
    }
    fn append(&mut self, room: &str, msg: StoredMessage) -> u64 {
        self.inner.append(room, msg)
    }
    fn durable(&mut self) -> u64 {
        self.durable.get()
    }
    fn page(&mut self, room: &str, q: crate::store::Query) -> crate::store::Page {
        self.inner.page(room, q)
    }
    fn flush(&mut self) {
        self.durable.set(self.inner.durable());
    }
}

#[test]
fn ack_waits_for_the_store_but_delivery_does_not() {
    let (mut t, durable) = T::with_slow_store();
    let (chat, out, now) = (&mut t.chat, &mut t.out, t.now);
    chat.connect(now, 1, Some("a"), None, out);
    chat.connect(now, 2, Some("b"), None, out);
    out.sent.clear();
    for r in ["r1", "r2"] {
        let cmd = json!({"command":"broadcast","message":"m","request_id":r}).to_string();
        chat.handle_text(now, 1, &cmd, out);
    }
    assert_eq!(out.events(2, "broadcast").len(), 2, "delivered at once");
    assert!(out.events(1, "ack").is_empty(), "not durable, not acked");
    durable.set(1);
    chat.handle_engine(out);
    let acks = out.events(1, "ack");
    assert_eq!(acks.len(), 1);
    assert_eq!(acks[0]["request_id"], "r1");
    chat.flush(out);
    assert_eq!(out.events(1, "ack")[0]["request_id"], "r2");
}

#[test]
fn acks_are_not_sent_to_a_later_member_on_the_same_connection() {
    let (mut t, _durable) = T::with_slow_store();
    let (chat, out, now) = (&mut t.chat, &mut t.out, t.now);
    chat.connect(now, 1, Some("a"), None, out);
    let cmd = json!({"command":"broadcast","message":"m","request_id":"r"}).to_string();
    chat.handle_text(now, 1, &cmd, out);
    chat.disconnect(1, out);
    chat.connect(now, 1, Some("z"), None, out);
    out.sent.clear();
    chat.flush(out);
    assert!(out.events(1, "ack").is_empty());
}

#[test]
fn me_lists_rooms_in_join_order() {
    let mut t = T::new();
    t.connect(1, Some("a"));
    t.send(1, json!({"command":"join","room":"zeta"}));
    let me = t.ask(1, json!({"command":"me","request_id":"m"}));
    assert_eq!(me["rooms"], json!(["general", "zeta"]));
    assert_eq!(me["member"], "a");
    assert_eq!(me["request_id"], "m");
}

// ----- the store under failure (issue 9) -----

/// A store that the test can make fail: durability stops, writes fail, reservations fail.
struct FaultyStore {
    inner: MemoryStore,
    durable: std::rc::Rc<std::cell::Cell<u64>>,
    failing: std::rc::Rc<std::cell::Cell<bool>>,
}

impl HistoryStore for FaultyStore {
    fn last_id(&mut self, room: &str) -> Result<u64, crate::store::StoreError> {
        if self.failing.get() {
            return Err(crate::store::StoreError("read failed".into()));
        }
        self.inner.last_id(room)
    }
    fn append(&mut self, room: &str, msg: StoredMessage) -> u64 {
        self.inner.append(room, msg)
    }
    fn durable(&mut self) -> u64 {
        self.durable.get()
    }
    fn page(&mut self, room: &str, q: crate::store::Query) -> crate::store::Page {
        self.inner.page(room, q)
    }
    fn flush(&mut self) {}
    fn reserve(&mut self, _room: &str, _id: u64) -> Result<(), crate::store::StoreError> {
        if self.failing.get() {
            return Err(crate::store::StoreError("cannot write".into()));
        }
        Ok(())
    }
    fn writable(&self) -> bool {
        !self.failing.get()
    }
}

type Cells = (
    std::rc::Rc<std::cell::Cell<u64>>,
    std::rc::Rc<std::cell::Cell<bool>>,
);

fn with_faulty_store(max_unstored: usize) -> (T, Cells) {
    let durable = std::rc::Rc::new(std::cell::Cell::new(0));
    let failing = std::rc::Rc::new(std::cell::Cell::new(false));
    let store = FaultyStore {
        inner: MemoryStore::new(100),
        durable: durable.clone(),
        failing: failing.clone(),
    };
    let cfg = Config {
        max_unstored,
        rate_burst: 1000,
        ..Config::default()
    };
    let mut t = T::new();
    t.chat = Chat::new(cfg, Box::new(Immediate::new(store)), counted_ids());
    (t, (durable, failing))
}

#[test]
fn a_full_backlog_refuses_broadcasts_until_the_store_catches_up() {
    let (mut t, (durable, _)) = with_faulty_store(3);
    t.connect(1, Some("a"));
    t.connect(2, Some("b"));
    t.out.sent.clear();
    for i in 0..3 {
        let ack =
            json!({"command":"broadcast","message":format!("m{i}"),"request_id":format!("r{i}")});
        t.send(1, ack);
    }
    assert_eq!(t.out.events(2, "broadcast").len(), 3);
    assert!(!t.chat.store_available(), "the backlog is full");
    t.send(
        1,
        json!({"command":"broadcast","message":"over","request_id":"over"}),
    );
    let errors = t.out.events(1, "error");
    assert_eq!(errors.len(), 1);
    assert_eq!(errors[0]["code"], "unavailable");
    assert_eq!(errors[0]["request_id"], "over");
    assert!(
        t.out.take(2).is_empty(),
        "a refused broadcast is not delivered"
    );

    durable.set(3);
    t.chat.handle_engine(&mut t.out);
    assert_eq!(t.out.events(1, "ack").len(), 3);
    assert!(t.chat.store_available());
    t.send(
        1,
        json!({"command":"broadcast","message":"again","request_id":"again"}),
    );
    let b = t.out.events(2, "broadcast");
    assert_eq!(b.len(), 1);
    assert_eq!(b[0]["id"], 4, "the refusal used no id");
}

#[test]
fn an_id_the_store_cannot_reserve_is_not_handed_out() {
    let (mut t, (durable, failing)) = with_faulty_store(100);
    t.connect(1, Some("a"));
    t.connect(2, Some("b"));
    t.send(1, json!({"command":"broadcast","message":"one"}));
    durable.set(1);
    failing.set(true);
    t.out.sent.clear();
    assert!(
        !t.chat.store_available(),
        "a store that cannot write is not available"
    );
    let e = t.ask(
        1,
        json!({"command":"broadcast","message":"two","request_id":"x"}),
    );
    assert_eq!(
        (e["event"].as_str(), e["code"].as_str()),
        (Some("error"), Some("unavailable"))
    );
    assert!(t.out.events(2, "broadcast").is_empty());
    // A room created while the store cannot be read gets its id later, not a guessed one.
    t.send(1, json!({"command":"join","room":"new"}));
    t.send(2, json!({"command":"join","room":"new"}));
    let e = t.ask(
        1,
        json!({"command":"broadcast","room":"new","message":"n","request_id":"n"}),
    );
    assert_eq!(e["code"], "unavailable");
    failing.set(false);
    t.out.sent.clear();
    t.send(1, json!({"command":"broadcast","message":"three"}));
    assert_eq!(t.out.events(2, "broadcast")[0]["id"], 2);
    t.send(1, json!({"command":"broadcast","room":"new","message":"n"}));
    assert_eq!(t.out.events(2, "broadcast")[0]["id"], 1);
}

/// With the ids injected and the time given, the core is a function of its inputs: the same
/// session twice sends the same frames, byte for byte, ids included (what fuzzing relies on).
#[test]
fn the_same_session_twice_sends_the_same_frames() {
    let run = || {
        let mut t = T::new();
        t.connect(1, None);
        t.connect(2, Some("bob"));
        t.connect(3, None);
        for cmd in [
            json!({"command":"join","room":"r"}),
            json!({"command":"broadcast","room":"r","message":"hi","request_id":"q"}),
            json!({"command":"broadcast","message":"all","msg_id":"m"}),
            json!({"command":"broadcast","message":"all","msg_id":"m","request_id":"again"}),
            json!({"command":"direct","to":"bob","message":"psst"}),
            json!({"command":"me"}),
            json!({"command":"list"}),
            json!({"command":"rooms"}),
            json!({"command":"history","room":"general"}),
            json!({"command":"leave","room":"r"}),
            json!({"command":"fly"}),
        ] {
            t.send(1, cmd);
            t.advance(Duration::from_millis(3));
        }
        t.chat.disconnect(2, &mut t.out);
        t.chat.flush(&mut t.out);
        t.out.sent
    };
    let (first, second) = (run(), run());
    assert!(first.len() > 30, "a real session: {} frames", first.len());
    assert_eq!(first, second);
}
