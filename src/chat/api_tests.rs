//! Unit tests of the server API's inputs, the admin commands and the token's permissions:
//! no sockets, no clock, no disk.

use std::time::Instant;

use serde_json::{Value, json};

use super::*;
use crate::auth::{Patterns, Permissions};
use crate::store::engine::Immediate;
use crate::store::memory::MemoryStore;

struct T {
    chat: Chat,
    out: Recorder,
    now: Now,
}

fn perms(rooms: &[&str], publish: &[&str], admin: bool) -> Permissions {
    let p = |l: &[&str]| Patterns::new(l.iter().map(|s| s.to_string()).collect()).unwrap();
    Permissions {
        rooms: p(rooms),
        publish: p(publish),
        admin,
    }
}

impl T {
    fn with(cfg: Config) -> T {
        T {
            chat: Chat::new(
                Config {
                    rate_burst: 1000,
                    ..cfg
                },
                Box::new(Immediate::new(MemoryStore::new(100))),
                counted_ids(),
            ),
            out: Recorder::default(),
            now: Now {
                mono: Instant::now(),
                unix_ms: 1_700_000_000_000,
            },
        }
    }
    fn new() -> T {
        T::with(Config::default())
    }
    fn connect(&mut self, conn: ConnId, name: &str, p: Permissions) {
        self.chat
            .connect_with(self.now, conn, Some(name), None, p, &mut self.out);
        self.chat.rooms.assert_consistent();
        self.out.take(conn);
    }
    fn send(&mut self, conn: ConnId, cmd: Value) -> Vec<Value> {
        self.chat
            .handle_text(self.now, conn, &cmd.to_string(), &mut self.out);
        self.chat.rooms.assert_consistent();
        self.out.take(conn)
    }
    fn code(&mut self, conn: ConnId, cmd: Value) -> String {
        let got = self.send(conn, cmd);
        let e = got
            .iter()
            .find(|e| e["event"] == "error")
            .unwrap_or_else(|| panic!("no error in {got:?}"));
        e["code"].as_str().unwrap().to_string()
    }
    fn post(&mut self, room: &str, message: &str, msg_id: Option<&str>) -> ApiAnswer {
        let post = ServerPost {
            room: room.into(),
            member: None,
            message: message.into(),
            data: None,
            msg_id: msg_id.map(str::to_string),
        };
        let token = self
            .chat
            .server_publish(self.now, post, &mut self.out)
            .unwrap();
        self.answer(token)
    }
    fn answer(&mut self, token: u64) -> ApiAnswer {
        let mut answers = self.chat.take_api_answers();
        assert_eq!(answers.len(), 1, "{answers:?}");
        let (t, a) = answers.remove(0);
        assert_eq!(t, token);
        a
    }
    fn delete(&mut self, room: &str, id: u64) -> ApiAnswer {
        match self.chat.delete_message(room, id, &mut self.out) {
            Ok(token) => self.answer(token),
            Err(e) => ApiAnswer::NotFound(e.message),
        }
    }
    fn history_ids(&mut self, conn: ConnId, room: &str) -> Vec<u64> {
        let got = self.send(conn, json!({"command":"history","room":room}));
        got.iter()
            .find(|e| e["event"] == "history")
            .expect("a history page")["messages"]
            .as_array()
            .unwrap()
            .iter()
            .map(|m| m["id"].as_u64().unwrap())
            .collect()
    }
}

fn published(id: u64, repeat: bool) -> ApiAnswer {
    ApiAnswer::Published {
        room: "general".into(),
        id,
        repeat,
    }
}

#[test]
fn a_server_publish_is_a_broadcast_numbered_with_the_members_and_answered_once_stored() {
    let mut t = T::new();
    t.connect(1, "a", Permissions::default());
    t.send(1, json!({"command":"broadcast","message":"one"}));
    assert_eq!(t.post("general", "two", None), published(2, false));
    let got = t.out.take(1);
    assert_eq!(
        got,
        vec![
            json!({"event":"broadcast","room":"general","member":"server","message":"two","id":2,"ts":1_700_000_000_000u64})
        ]
    );
    let got = t.send(
        1,
        json!({"command":"broadcast","message":"three","request_id":"r"}),
    );
    assert!(
        got.iter().any(|e| e["event"] == "ack" && e["id"] == 3),
        "{got:?}"
    );
    // As another member, with data.
    let post = ServerPost {
        room: "general".into(),
        member: Some("ci-bot".into()),
        message: "deployed".into(),
        data: Some(json!({"v":1}).into()),
        msg_id: None,
    };
    let token = t.chat.server_publish(t.now, post, &mut t.out).unwrap();
    assert_eq!(t.answer(token), published(4, false));
    let got = t.out.take(1);
    assert_eq!(got[0]["member"], "ci-bot");
    assert_eq!(got[0]["data"], json!({"v":1}));
    assert_eq!(t.chat.stats().api_calls.publish, 2);
    assert_eq!(t.chat.stats().broadcasts, 4);
}

#[test]
fn a_repeated_msg_id_answers_the_first_id_and_is_not_delivered_again() {
    let mut t = T::new();
    t.connect(1, "a", Permissions::default());
    assert_eq!(t.post("general", "x", Some("k1")), published(1, false));
    t.out.take(1);
    assert_eq!(t.post("general", "x", Some("k1")), published(1, true));
    assert!(t.out.take(1).is_empty(), "not delivered again");
    assert_eq!(t.post("general", "y", Some("k2")), published(2, false));
    t.out.take(1);
    // A member's repeat of the API's msg_id is a repeat too: one dedup.
    let got = t.send(
        1,
        json!({"command":"broadcast","message":"x","msg_id":"k1","request_id":"r"}),
    );
    assert_eq!(
        got,
        vec![json!({"event":"ack","request_id":"r","room":"general","id":1})]
    );
}

#[test]
fn a_server_publish_checks_its_fields_and_the_room_cap() {
    let mut t = T::with(Config {
        max_rooms: 2,
        ..Config::default()
    });
    for (room, member, message) in [
        ("bad room", None, "m"),
        ("general", Some("system"), "m"),
        ("general", Some("a\u{1}b"), "m"),
        ("general", None, "   "),
        ("general", None, &*"x".repeat(1001)),
    ] {
        let post = ServerPost {
            room: room.into(),
            member: member.map(str::to_string),
            message: message.into(),
            data: None,
            msg_id: None,
        };
        let e = t.chat.server_publish(t.now, post, &mut t.out).unwrap_err();
        assert_eq!(e.code, ErrorCode::Invalid, "{room} {member:?}");
    }
    assert!(matches!(
        t.post("news", "m", None),
        ApiAnswer::Published { id: 1, .. }
    ));
    let post = ServerPost {
        room: "other".into(),
        member: None,
        message: "m".into(),
        data: None,
        msg_id: None,
    };
    // `news` was dropped once empty; fill the cap with a kept room.
    t.chat.create_room("kept").unwrap();
    let e = t.chat.server_publish(t.now, post, &mut t.out).unwrap_err();
    assert_eq!(e.code, ErrorCode::LimitReached);
    assert!(t.chat.take_api_answers().is_empty(), "nothing to answer");
}

#[test]
fn a_deleted_message_leaves_history_its_room_hears_it_and_its_id_stays_taken() {
    let mut t = T::new();
    t.connect(1, "a", Permissions::default());
    for i in 1..=3 {
        t.post("general", &format!("m{i}"), None);
    }
    t.out.take(1);
    assert_eq!(t.delete("general", 3), ApiAnswer::Done);
    assert_eq!(
        t.out.take(1),
        vec![json!({"event":"deleted","room":"general","id":3})]
    );
    assert_eq!(t.history_ids(1, "general"), vec![1, 2]);
    for (room, id) in [
        ("general", 3),
        ("general", 4),
        ("general", 0),
        ("nowhere", 1),
    ] {
        assert!(
            matches!(t.delete(room, id), ApiAnswer::NotFound(_)),
            "{room} {id}: already deleted or never there"
        );
    }
    assert!(
        t.out.take(1).is_empty(),
        "no event for what was not deleted"
    );
    assert_eq!(
        t.post("general", "m4", None),
        published(4, false),
        "3 is not reused"
    );
    assert_eq!(
        t.chat.stats().api_calls.delete,
        1,
        "only what was deleted counts"
    );
}

#[test]
fn only_admins_delete_and_kick() {
    let mut t = T::new();
    t.connect(1, "boss", perms(&["*"], &["*"], true));
    t.connect(2, "bob", Permissions::default());
    t.connect(3, "eve", Permissions::default());
    t.send(2, json!({"command":"broadcast","message":"spam"}));
    t.out.sent.clear();
    for cmd in [
        json!({"command":"delete","room":"general","id":1}),
        json!({"command":"kick","member":"bob"}),
    ] {
        assert_eq!(t.code(3, cmd), "forbidden");
    }
    assert!(t.out.closed.is_empty());
    assert_eq!(t.history_ids(3, "general"), vec![1], "nothing changed");
    let got = t.send(
        1,
        json!({"command":"delete","room":"general","id":1,"request_id":"d"}),
    );
    assert!(
        got.contains(&json!({"event":"deleted","room":"general","id":1})),
        "{got:?}"
    );
    assert!(got.contains(&json!({"event":"ack","request_id":"d","room":"general","id":1})));
    assert_eq!(
        t.code(1, json!({"command":"delete","room":"general","id":1})),
        "not_found"
    );
    assert_eq!(
        t.code(1, json!({"command":"kick","member":"nobody"})),
        "not_found"
    );
    assert_eq!(
        t.code(
            1,
            json!({"command":"kick","member":"bob","reason":"x".repeat(124)})
        ),
        "invalid"
    );
    t.send(
        1,
        json!({"command":"kick","member":"BOB","reason":"spam","request_id":"k"}),
    );
    assert_eq!(t.out.closed, vec![(2, 4000, "spam".to_string())]);
    let left = t.out.take(3);
    assert!(left.iter().any(|e| e["left"] == "bob"), "{left:?}");
    assert!(!t.chat.member_names().contains(&"bob"));
}

#[test]
fn the_api_disconnects_with_4000_and_the_reason() {
    let mut t = T::new();
    t.connect(1, "a", Permissions::default());
    let r = Reason::new("bye now").unwrap();
    t.chat
        .disconnect_member("A", r, "the API", &mut t.out)
        .unwrap();
    assert_eq!(t.out.closed, vec![(1, 4000, "bye now".to_string())]);
    assert_eq!(t.chat.member_count(), 0);
    let e = t
        .chat
        .disconnect_member("a", r, "the API", &mut t.out)
        .unwrap_err();
    assert_eq!(e.code, ErrorCode::NotFound, "not connected any more");
    assert_eq!(t.chat.stats().api_calls.disconnect, 1);
}

#[test]
fn the_server_sends_direct_messages() {
    let mut t = T::new();
    t.connect(1, "a", Permissions::default());
    t.chat
        .server_direct(t.now, "a", "hi", None, &mut t.out)
        .unwrap();
    assert_eq!(
        t.out.take(1),
        vec![
            json!({"event":"direct","from":"server","to":"a","message":"hi","ts":1_700_000_000_000u64})
        ]
    );
    let e = t
        .chat
        .server_direct(t.now, "b", "hi", None, &mut t.out)
        .unwrap_err();
    assert_eq!(e.code, ErrorCode::NotFound);
    let e = t
        .chat
        .server_direct(t.now, "a", "", None, &mut t.out)
        .unwrap_err();
    assert_eq!(e.code, ErrorCode::Invalid);
}

#[test]
fn a_created_room_stays_while_empty_and_a_deleted_one_closes_for_its_members() {
    let mut t = T::new();
    assert!(t.chat.create_room("lobby").unwrap());
    assert!(!t.chat.create_room("lobby").unwrap(), "exists already");
    assert!(t.chat.room_detail("lobby").is_some(), "kept while empty");
    t.connect(1, "a", Permissions::default());
    t.send(1, json!({"command":"join","room":"lobby"}));
    t.send(1, json!({"command":"leave","room":"lobby"}));
    assert!(
        t.chat.room_detail("lobby").is_some(),
        "kept after its last member left"
    );
    t.send(1, json!({"command":"join","room":"lobby"}));
    t.post("lobby", "one", None);
    t.post("lobby", "two", None);
    t.out.take(1);
    let token = t.chat.delete_room("lobby", &mut t.out).unwrap();
    assert_eq!(t.answer(token), ApiAnswer::Done);
    assert_eq!(
        t.out.take(1),
        vec![json!({"event":"room_closed","room":"lobby"})]
    );
    assert!(t.chat.room_detail("lobby").is_none());
    let me = t.send(1, json!({"command":"me"}));
    assert_eq!(me[0]["rooms"], json!(["general"]));
    assert!(t.history_ids(1, "lobby").is_empty(), "its history is gone");
    // Created again, its ids continue above the old ones.
    assert!(matches!(
        t.post("lobby", "three", None),
        ApiAnswer::Published { id: 3, .. }
    ));
    // A room only in the store (nobody in it) is deleted too; one that never was is 404.
    let token = t.chat.delete_room("lobby", &mut t.out).unwrap();
    assert_eq!(t.answer(token), ApiAnswer::Done);
    let token = t.chat.delete_room("never-was", &mut t.out).unwrap();
    assert!(matches!(t.answer(token), ApiAnswer::NotFound(_)));
    let e = t.chat.delete_room("general", &mut t.out).unwrap_err();
    assert_eq!(e.code, ErrorCode::Invalid);
    assert!(matches!(
        t.post("lobby", "four", None),
        ApiAnswer::Published { id: 4, .. }
    ));
}

#[test]
fn rooms_and_publish_claims_allow_and_refuse() {
    let mut t = T::new();
    t.connect(1, "a", perms(&["general", "team-*"], &["team-*"], false));
    t.connect(2, "b", perms(&["lobby"], &["lobby"], false));
    assert_eq!(
        t.code(1, json!({"command":"join","room":"secret"})),
        "forbidden"
    );
    assert_eq!(
        t.code(1, json!({"command":"history","room":"secret"})),
        "forbidden"
    );
    assert_eq!(
        t.code(1, json!({"command":"list","room":"lobby"})),
        "forbidden"
    );
    let got = t.send(1, json!({"command":"join","room":"team-red"}));
    assert!(got.iter().any(|e| e["event"] == "history"), "{got:?}");
    assert_eq!(
        t.code(1, json!({"command":"broadcast","message":"hi"})),
        "forbidden",
        "may read general, not post there"
    );
    let got = t.send(
        1,
        json!({"command":"broadcast","room":"team-red","message":"hi"}),
    );
    assert!(
        got.iter()
            .any(|e| e["event"] == "broadcast" && e["id"] == 1)
    );
    // `b` may not be in general: it is not joined to it.
    let me = t.send(2, json!({"command":"me"}));
    assert_eq!(me[0]["rooms"], json!([]));
    assert_eq!(t.chat.room_detail("general").unwrap().0, vec!["a"]);
    assert_eq!(
        t.code(2, json!({"command":"join","room":"general"})),
        "forbidden"
    );
    assert!(
        t.send(2, json!({"command":"join","room":"lobby"}))
            .iter()
            .any(|e| e["event"] == "history")
    );
}

#[test]
fn read_only_rooms_take_posts_from_the_api_and_admins_only() {
    let mut t = T::with(Config {
        read_only_rooms: "news, announce-*".into(),
        ..Config::default()
    });
    t.connect(1, "a", Permissions::default());
    t.connect(2, "boss", perms(&["*"], &["*"], true));
    for conn in [1, 2] {
        t.send(conn, json!({"command":"join","room":"news"}));
    }
    t.out.sent.clear();
    assert_eq!(
        t.code(
            1,
            json!({"command":"broadcast","room":"news","message":"x"})
        ),
        "forbidden"
    );
    assert!(t.out.take(2).is_empty(), "nothing was delivered");
    let got = t.send(
        2,
        json!({"command":"broadcast","room":"news","message":"x"}),
    );
    assert!(
        got.iter()
            .any(|e| e["event"] == "broadcast" && e["id"] == 1)
    );
    assert!(matches!(
        t.post("news", "from the server", None),
        ApiAnswer::Published { id: 2, .. }
    ));
    let got = t.send(
        1,
        json!({"command":"broadcast","room":"general","message":"ok"}),
    );
    assert!(
        got.iter().any(|e| e["event"] == "broadcast"),
        "other rooms are not read-only"
    );
}
