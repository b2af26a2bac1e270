//! A whole session against the sans-IO core: members connect and disconnect, send command
//! frames (structured and raw), binary frames, and time passes. The core runs on a MemoryStore
//! wrapped to record appends, and a recording Outbox. Besides "never panics" it checks:
//!
//! - the member count is connects minus disconnects (and closes), names are unique;
//! - per room, stored ids are 1, 2, 3, … without gaps, and each message reaches exactly the
//!   room's members (less the sender for `echo:false`), once, in increasing id order;
//! - room membership learned from the join/leave notices matches the core's own view;
//! - an `error` answer goes only to the sender and leaves the state as it was;
//! - every frame gets an answer, except the few silent cases the spec allows;
//! - history pages are ascending, bounded and only hold stored messages.
#![no_main]

use std::cell::RefCell;
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::rc::Rc;
use std::time::{Duration, Instant};

use arbitrary::Arbitrary;
use chatterbox::chat::protocol::{Broadcast, COMMAND_NAMES, Command, decode};
use chatterbox::chat::{Chat, ConnId, Now, Recorder, counted_ids};
use chatterbox::config::Config;
use chatterbox::store::memory::MemoryStore;
use chatterbox::store::{HistoryStore, Page, Query, StoredMessage};
use libfuzzer_sys::fuzz_target;
use serde_json::{Map, Value};

const MAX_LIVE: usize = 12;
const MAX_OPS: usize = 400;

// ----- recording store and outbox -----

/// Every append, in order: (room, id, sender).
type Appends = Rc<RefCell<Vec<(String, u64, String)>>>;

struct RecStore {
    inner: MemoryStore,
    appends: Appends,
    last: HashMap<String, u64>,
}

impl HistoryStore for RecStore {
    fn last_id(&mut self, room: &str) -> Result<u64, chatterbox::store::StoreError> {
        self.inner.last_id(room)
    }
    fn append(&mut self, room: &str, msg: StoredMessage) -> u64 {
        let last = self.last.entry(room.to_string()).or_insert(0);
        assert_eq!(
            msg.id,
            *last + 1,
            "ids of room {room:?} have a gap or repeat"
        );
        *last = msg.id;
        self.appends
            .borrow_mut()
            .push((room.to_string(), msg.id, msg.member.clone()));
        self.inner.append(room, msg)
    }
    fn durable(&mut self) -> u64 {
        self.inner.durable()
    }
    fn page(&mut self, room: &str, query: Query) -> Page {
        self.inner.page(room, query)
    }
    fn flush(&mut self) {
        self.inner.flush();
    }
}

// ----- the fuzzer's input -----

#[derive(Arbitrary, Debug)]
struct Setup {
    max_history: u8,
    page_cap: u8,
    resume_cap: u8,
    per_room: u8,
    max_rooms: u8,
    rooms_per_member: u8,
    message_chars: u8,
    rate: u8,
    burst: u8,
    flood: u8,
    dedup_secs: u8,
}

#[derive(Arbitrary, Debug)]
enum NameChoice {
    Pool(u8),
    Any(String),
}

#[derive(Arbitrary, Debug)]
enum Val {
    Room(u8),
    Name(u8),
    Text(u8),
    Str(String),
    U64(u64),
    I64(i64),
    F64(f64),
    Bool(bool),
    Null,
    Deep(u8),
    Array(Vec<Val>),
    Object(Vec<(String, Val)>),
}

#[derive(Arbitrary, Debug)]
struct Frame {
    command: u8,
    fields: Vec<(u8, Val)>,
    request_id: Option<Val>,
    /// Cut the text at this byte (to a char boundary): broken JSON.
    cut: Option<u16>,
}

/// A well-formed command with fields from small pools, so that the fuzzer reaches deep
/// behaviour (dedup, resume, full rooms) without having to discover the field names first.
#[derive(Arbitrary, Debug)]
enum Cmd {
    Broadcast {
        room: Option<u8>,
        text: u8,
        echo: Option<bool>,
        msg_id: Option<u8>,
        data: Option<u8>,
    },
    Join {
        room: u8,
        last_n: Option<u8>,
        since: Option<u8>,
    },
    Leave {
        room: u8,
    },
    History {
        room: u8,
        before: Option<u8>,
        limit: Option<u8>,
    },
    Direct {
        to: u8,
        text: u8,
    },
    List {
        room: Option<u8>,
    },
    Me,
    Rooms,
    Ping,
}

#[derive(Arbitrary, Debug)]
enum Op {
    Connect(Option<NameChoice>),
    Disconnect(u8),
    Cmd(u8, Cmd, Option<u8>),
    Send(u8, Frame),
    Raw(u8, String),
    Binary(u8),
    AdvanceMs(u16),
    AdvanceSecs(u16),
}

#[derive(Arbitrary, Debug)]
struct Input {
    setup: Setup,
    ops: Vec<Op>,
}

/// Names that are no command (unknown, empty, wrong case), besides the real ones.
const NOT_COMMANDS: &[&str] = &["fly", "", "BROADCAST"];
const KEYS: &[&str] = &[
    "room",
    "message",
    "data",
    "echo",
    "msg_id",
    "last_n",
    "since",
    "before",
    "limit",
    "to",
    "request_id",
    "command",
    "extra",
];
const ROOMS: &[&str] = &["general", "a", "b", "c", "d", "e", "", "bad room", "é", "A"];
const NAMES: &[&str] = &[
    "alice", "bob", "Alice", "carol", "system", "System", "bad name", "", "member1", "member2",
];

fn val(v: &Val, chars: usize, depth: u32) -> Value {
    match v {
        Val::Room(i) => {
            let i = *i as usize;
            match i % (ROOMS.len() + 2) {
                n if n < ROOMS.len() => ROOMS[n].into(),
                n if n == ROOMS.len() => "r".repeat(64).into(),
                _ => "r".repeat(65).into(),
            }
        }
        Val::Name(i) => NAMES[*i as usize % NAMES.len()].into(),
        Val::Text(i) => match i % 8 {
            0 => "hi".into(),
            1 => " \t\n".into(),
            2 => "".into(),
            3 => "x".repeat(chars).into(),
            4 => "x".repeat(chars + 1).into(),
            5 => "é".repeat(chars).into(),
            6 => "\u{0}".into(),
            _ => "hello world".into(),
        },
        Val::Str(s) => s.clone().into(),
        Val::U64(n) => (*n).into(),
        Val::I64(n) => (*n).into(),
        Val::F64(f) => serde_json::Number::from_f64(*f).map_or(Value::Null, Value::Number),
        Val::Bool(b) => (*b).into(),
        Val::Null => Value::Null,
        Val::Deep(n) => {
            let mut v = Value::Array(Vec::new());
            for _ in 0..*n {
                v = Value::Array(vec![v]);
            }
            v
        }
        Val::Array(items) if depth < 8 => items
            .iter()
            .take(16)
            .map(|x| val(x, chars, depth + 1))
            .collect(),
        Val::Object(items) if depth < 8 => Value::Object(
            items
                .iter()
                .take(16)
                .map(|(k, x)| (k.clone(), val(x, chars, depth + 1)))
                .collect(),
        ),
        Val::Array(_) | Val::Object(_) => Value::Null,
    }
}

fn frame_text(f: &Frame, chars: usize) -> String {
    let mut map = Map::new();
    let names = COMMAND_NAMES.len() + NOT_COMMANDS.len();
    match f.command as usize % (names + 2) {
        n if n < names => {
            let name = COMMAND_NAMES
                .get(n)
                .unwrap_or_else(|| &NOT_COMMANDS[n - COMMAND_NAMES.len()]);
            map.insert("command".into(), (*name).into());
        }
        n if n == names => {
            map.insert("command".into(), 7.into());
        }
        _ => {}
    }
    for (k, v) in f.fields.iter().take(8) {
        map.insert(KEYS[*k as usize % KEYS.len()].into(), val(v, chars, 0));
    }
    if let Some(r) = &f.request_id {
        let v = match r {
            Val::U64(n) => format!("r{}", n % 100).into(),
            other => val(other, chars, 0),
        };
        map.insert("request_id".into(), v);
    }
    let mut text = Value::Object(map).to_string();
    if let Some(cut) = f.cut {
        let mut at = (cut as usize) % (text.len() + 1);
        while !text.is_char_boundary(at) {
            at -= 1;
        }
        text.truncate(at);
    }
    text
}

fn cmd_text(c: &Cmd, request_id: Option<u8>, chars: usize) -> String {
    let room = |i: &u8| val(&Val::Room(*i % 6), chars, 0);
    let text = |i: &u8| val(&Val::Text(*i), chars, 0);
    let mut v = match c {
        Cmd::Broadcast {
            room: r,
            text: t,
            echo,
            msg_id,
            data,
        } => {
            let mut v = serde_json::json!({"command": "broadcast", "message": text(t)});
            if let Some(r) = r {
                v["room"] = room(r);
            }
            if let Some(e) = echo {
                v["echo"] = (*e).into();
            }
            if let Some(m) = msg_id {
                v["msg_id"] = format!("m{}", m % 4).into();
            }
            if let Some(d) = data {
                v["data"] = serde_json::json!({"n": d, "list": [d, null, "x"]});
            }
            v
        }
        Cmd::Join {
            room: r,
            last_n,
            since,
        } => {
            let mut v = serde_json::json!({"command": "join", "room": room(r)});
            if let Some(n) = last_n {
                v["last_n"] = (*n).into();
            }
            if let Some(s) = since {
                v["since"] = (*s % 32).into();
            }
            v
        }
        Cmd::Leave { room: r } => serde_json::json!({"command": "leave", "room": room(r)}),
        Cmd::History {
            room: r,
            before,
            limit,
        } => {
            let mut v = serde_json::json!({"command": "history", "room": room(r)});
            if let Some(b) = before {
                v["before"] = (*b % 32).into();
            }
            if let Some(l) = limit {
                v["limit"] = (*l).into();
            }
            v
        }
        Cmd::Direct { to, text: t } => {
            serde_json::json!({"command": "direct", "to": val(&Val::Name(*to), chars, 0), "message": text(t)})
        }
        Cmd::List { room: r } => match r {
            Some(r) => serde_json::json!({"command": "list", "room": room(r)}),
            None => serde_json::json!({"command": "list"}),
        },
        Cmd::Me => serde_json::json!({"command": "me"}),
        Cmd::Rooms => serde_json::json!({"command": "rooms"}),
        Cmd::Ping => serde_json::json!({"command": "ping"}),
    };
    if let Some(r) = request_id {
        v["request_id"] = format!("q{}", r % 8).into();
    }
    v.to_string()
}

// ----- the model -----

struct Member {
    name: String,
    /// Connection order.
    serial: u64,
    /// Rooms in join order, learned from the notices.
    rooms: Vec<String>,
    /// Last id received (or skipped as own echo:false) per room.
    last: HashMap<String, u64>,
}

struct World {
    chat: Chat,
    out: Recorder,
    now: Now,
    appends: Appends,
    /// Appends already checked.
    seen_appends: usize,
    /// Room → last stored id.
    stored: HashMap<String, u64>,
    live: BTreeMap<ConnId, Member>,
    /// Room → members in join order, from the notices.
    rooms: BTreeMap<String, Vec<ConnId>>,
    next_serial: u64,
    cfg: Config,
}

fn name_is_valid(n: &str) -> bool {
    !n.is_empty()
        && n.len() <= 32
        && n.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-'))
        && !n.eq_ignore_ascii_case("system")
}

/// What an error must leave as it was: member names, rooms, appends.
type Snapshot = (Vec<String>, Vec<(String, usize, u64)>, usize);

/// What one step did to its actor.
#[derive(Default)]
struct Outcome {
    to_actor: usize,
    errors: usize,
    total: usize,
    closed: bool,
}

impl World {
    fn new(s: &Setup) -> World {
        let cfg = Config {
            max_history: s.max_history as usize % 10,
            history_page_cap: s.page_cap as usize % 10,
            resume_cap: s.resume_cap as usize % 12,
            memory_history_per_room: s.per_room as usize % 16,
            max_rooms: 1 + s.max_rooms as usize % 6,
            max_rooms_per_member: 1 + s.rooms_per_member as usize % 5,
            max_message_chars: 1 + s.message_chars as usize % 40,
            rate_per_sec: u32::from(s.rate % 50),
            rate_burst: 1 + u32::from(s.burst % 60),
            flood_close_after: u32::from(s.flood % 8),
            dedup_window: Duration::from_secs(u64::from(s.dedup_secs % 30)),
            ..Config::default()
        };
        let appends = Appends::default();
        let store = RecStore {
            inner: MemoryStore::new(cfg.memory_history_per_room),
            appends: appends.clone(),
            last: HashMap::new(),
        };
        World {
            chat: Chat::new(
                cfg.clone(),
                Box::new(chatterbox::store::engine::Immediate::new(store)),
                counted_ids(),
            ),
            out: Recorder::default(),
            now: Now {
                mono: Instant::now(),
                unix_ms: 1_700_000_000_000,
            },
            appends,
            seen_appends: 0,
            stored: HashMap::new(),
            live: BTreeMap::new(),
            rooms: BTreeMap::new(),
            next_serial: 0,
            cfg,
        }
    }

    fn pick(&self, i: u8) -> Option<ConnId> {
        if self.live.is_empty() {
            return None;
        }
        self.live.keys().nth(i as usize % self.live.len()).copied()
    }

    fn stored_last(&self, room: &str) -> u64 {
        self.stored.get(room).copied().unwrap_or(0)
    }

    fn in_room(&self, conn: ConnId, room: &str) -> bool {
        self.rooms.get(room).is_some_and(|m| m.contains(&conn))
    }

    /// What an error must leave as it was.
    fn snapshot(&self) -> Snapshot {
        (
            self.chat
                .member_names()
                .into_iter()
                .map(String::from)
                .collect(),
            self.chat
                .room_list()
                .into_iter()
                .map(|(n, m, c)| (n.to_string(), m, c))
                .collect(),
            self.appends.borrow().len(),
        )
    }

    fn remove_member(&mut self, conn: ConnId) {
        self.live.remove(&conn);
        for members in self.rooms.values_mut() {
            members.retain(|&c| c != conn);
        }
        self.rooms.retain(|_, m| !m.is_empty());
    }

    /// Checks and applies what the core sent during one step by `actor`.
    fn drain(
        &mut self,
        actor: Option<ConnId>,
        skip_echo: bool,
        request_id: Option<&str>,
    ) -> Outcome {
        let mut outcome = Outcome::default();
        // Messages stored during this step and who must receive each.
        let new: Vec<(String, u64, String)> = self.appends.borrow()[self.seen_appends..].to_vec();
        self.seen_appends += new.len();
        let mut expected: HashMap<(String, u64), (BTreeSet<ConnId>, String)> = HashMap::new();
        for (room, id, sender) in new {
            let actor = actor.expect("only a member's frame stores a message");
            assert_eq!(sender, self.live[&actor].name, "stored under another name");
            assert!(
                self.in_room(actor, &room),
                "stored in a room the sender is not in"
            );
            let mut to: BTreeSet<ConnId> = self.rooms[&room].iter().copied().collect();
            if skip_echo {
                to.remove(&actor);
            }
            self.stored.insert(room.clone(), id);
            expected.insert((room, id), (to, sender));
        }

        let sent = std::mem::take(&mut self.out.sent);
        for (to, ev) in sent {
            outcome.total += 1;
            let member = self
                .live
                .get(&to)
                .unwrap_or_else(|| panic!("event to a connection with no member: {ev}"));
            let own_name = member.name.clone();
            if Some(to) == actor {
                outcome.to_actor += 1;
            }
            let name = ev["event"]
                .as_str()
                .unwrap_or_else(|| panic!("an event without a name: {ev}"));
            let for_actor_only = || {
                assert_eq!(Some(to), actor, "{ev} went to someone else");
            };
            match name {
                "broadcast" => {
                    let room = ev["room"].as_str().expect("room").to_string();
                    if ev["member"] == "system" {
                        assert!(ev.get("id").is_none(), "notices have no id");
                        if ev["joined"].as_str() == Some(own_name.as_str()) {
                            assert!(!self.in_room(to, &room), "joined twice: {ev}");
                            self.rooms.entry(room.clone()).or_default().push(to);
                            let last = self.stored_last(&room);
                            let m = self.live.get_mut(&to).expect("live");
                            m.rooms.push(room.clone());
                            m.last.insert(room, last);
                        } else if ev["left"].as_str() == Some(own_name.as_str()) {
                            assert!(self.in_room(to, &room), "left a room it was not in");
                            if let Some(members) = self.rooms.get_mut(&room) {
                                members.retain(|&c| c != to);
                            }
                            self.rooms.retain(|_, m| !m.is_empty());
                            let m = self.live.get_mut(&to).expect("live");
                            m.rooms.retain(|r| r != &room);
                        } else {
                            assert!(
                                ev.get("joined").is_some() || ev.get("left").is_some(),
                                "{ev}"
                            );
                            assert!(self.in_room(to, &room), "notice outside the room: {ev}");
                        }
                    } else {
                        let id = ev["id"].as_u64().expect("a member message has an id");
                        assert!(self.in_room(to, &room), "message to a non-member: {ev}");
                        let (recipients, sender) = expected
                            .get_mut(&(room.clone(), id))
                            .unwrap_or_else(|| panic!("delivered but not stored: {ev}"));
                        assert!(recipients.remove(&to), "unexpected or twice: {ev}");
                        assert_eq!(ev["member"].as_str(), Some(sender.as_str()));
                        let m = self.live.get_mut(&to).expect("live");
                        let last = m.last.entry(room).or_insert(0);
                        assert!(id > *last, "ids go backwards: {id} after {last}");
                        *last = id;
                    }
                }
                "history" => {
                    for_actor_only();
                    let room = ev["room"].as_str().expect("room");
                    let msgs = ev["messages"].as_array().expect("messages");
                    let cap = self.cfg.history_page_cap.max(self.cfg.resume_cap);
                    assert!(msgs.len() <= cap, "page of {} over the caps", msgs.len());
                    let mut prev = 0;
                    for m in msgs {
                        let id = m["id"].as_u64().expect("id");
                        assert!(id > prev, "history not ascending");
                        assert!(id <= self.stored_last(room), "history holds an unstored id");
                        prev = id;
                    }
                    assert!(ev["more"].is_boolean());
                }
                "ack" => {
                    for_actor_only();
                    assert_eq!(ev["request_id"].as_str(), request_id);
                    if let Some(id) = ev.get("id") {
                        let id = id.as_u64().expect("id");
                        let room = ev["room"].as_str().expect("room");
                        assert!(
                            id >= 1 && id <= self.stored_last(room),
                            "ack of unstored id"
                        );
                    }
                }
                "error" => {
                    for_actor_only();
                    outcome.errors += 1;
                    let code = ev["code"].as_str().expect("code");
                    assert!(
                        [
                            "bad_json",
                            "unknown_command",
                            "invalid",
                            "not_member",
                            "not_found",
                            "rate_limited",
                            "limit_reached"
                        ]
                        .contains(&code),
                        "{code}"
                    );
                    if let Some(r) = ev.get("request_id") {
                        assert_eq!(r.as_str(), request_id);
                    }
                }
                "me" => {
                    for_actor_only();
                    assert_eq!(ev["member"].as_str(), Some(own_name.as_str()));
                }
                "direct" => {
                    let from = ev["from"].as_str().expect("from");
                    let dest = ev["to"].as_str().expect("to");
                    let a = actor.expect("a direct comes from a frame");
                    assert_eq!(from, self.live[&a].name);
                    assert!(to == a || dest == own_name, "direct to a third member");
                }
                "list" | "rooms" | "pong" | "system" => for_actor_only(),
                other => panic!("unknown event {other}: {ev}"),
            }
        }
        for ((room, id), (left, _)) in expected {
            assert!(left.is_empty(), "{room}#{id} never reached {left:?}");
        }

        for (to, code, _) in std::mem::take(&mut self.out.closed) {
            assert_eq!(Some(to), actor, "closed a bystander");
            assert_eq!(code, 1008, "only flooding closes from the core");
            outcome.closed = true;
            self.remove_member(to);
            // The transport reports the end of the connection afterwards: nothing happens.
            self.chat.disconnect(to, &mut self.out);
            assert!(
                self.out.sent.is_empty(),
                "a second disconnect sent something"
            );
        }
        outcome
    }

    /// The core's view against the model.
    fn check(&self) {
        assert_eq!(self.chat.member_count(), self.live.len());
        let mut by_age: Vec<(&u64, &str)> = self
            .live
            .values()
            .map(|m| (&m.serial, m.name.as_str()))
            .collect();
        by_age.sort();
        let names: Vec<&str> = by_age.into_iter().map(|(_, n)| n).collect();
        assert_eq!(self.chat.member_names(), names, "oldest connection first");
        for (room, members) in &self.rooms {
            let (names, count) = self
                .chat
                .room_detail(room)
                .unwrap_or_else(|| panic!("room {room} has members but is gone"));
            let want: Vec<&str> = members.iter().map(|c| self.live[c].name.as_str()).collect();
            assert_eq!(names, want, "members of {room}");
            assert_eq!(count, self.stored_last(room));
        }
        assert!(self.chat.room_count() <= self.cfg.max_rooms);
        for (room, members, _) in self.chat.room_list() {
            if members > 0 {
                assert_eq!(self.rooms.get(room).map(Vec::len), Some(members), "{room}");
            } else {
                assert_eq!(room, "general", "an empty room other than general stays");
            }
        }
        for m in self.live.values() {
            assert!(m.rooms.len() <= self.cfg.max_rooms_per_member);
        }
    }

    fn connect(&mut self, choice: Option<&NameChoice>) {
        if self.live.len() >= MAX_LIVE {
            return;
        }
        let wished: Option<String> = choice.map(|c| match c {
            NameChoice::Pool(i) => NAMES[*i as usize % NAMES.len()].to_string(),
            NameChoice::Any(s) => s.clone(),
        });
        if let Some(n) = &wished {
            let taken = self
                .live
                .values()
                .any(|m| m.name.to_lowercase() == n.to_lowercase());
            match self.chat.check_name(n) {
                Ok(()) => assert!(name_is_valid(n) && !taken, "accepted {n:?}"),
                Err(r) => {
                    if !name_is_valid(n) {
                        assert_eq!(r.status, 400, "{n:?}");
                    } else {
                        assert!(taken && r.status == 409, "refused {n:?} with {}", r.status);
                    }
                    return;
                }
            }
        }
        let conn = (0..)
            .find(|c| !self.live.contains_key(c))
            .expect("a free id");
        self.chat
            .connect(self.now, conn, wished.as_deref(), None, &mut self.out);
        let (first_to, me) = self.out.sent.first().expect("a welcome").clone();
        assert_eq!(first_to, conn);
        assert_eq!(me["event"], "me", "the welcome starts with me");
        let name = me["member"].as_str().expect("a name").to_string();
        if let Some(w) = &wished {
            assert_eq!(&name, w);
        }
        assert!(name_is_valid(&name), "assigned an invalid name {name:?}");
        assert!(
            !self
                .live
                .values()
                .any(|m| m.name.eq_ignore_ascii_case(&name)),
            "assigned a taken name {name}"
        );
        self.next_serial += 1;
        self.live.insert(
            conn,
            Member {
                name,
                serial: self.next_serial,
                rooms: Vec::new(),
                last: HashMap::new(),
            },
        );
        let o = self.drain(Some(conn), false, None);
        assert!(!o.closed && o.errors == 0);
        assert_eq!(self.live[&conn].rooms, vec!["general".to_string()]);
    }

    fn disconnect(&mut self, conn: ConnId) {
        self.remove_member(conn);
        self.chat.disconnect(conn, &mut self.out);
        self.drain(None, false, None);
        self.chat.disconnect(conn, &mut self.out);
        assert!(
            self.out.sent.is_empty(),
            "a second disconnect sent something"
        );
    }

    fn text(&mut self, conn: ConnId, text: &str) {
        let request = decode(text);
        let request_id = request.request_id.clone();
        let (skip_echo, may_be_silent) = match &request.command {
            Ok(Command::Broadcast(Broadcast { echo, msg_id, .. })) => (
                *echo == Some(false),
                request_id.is_none() && (*echo == Some(false) || msg_id.is_some()),
            ),
            _ => (false, false),
        };
        let before = self.snapshot();
        self.chat.handle_text(self.now, conn, text, &mut self.out);
        let o = self.drain(Some(conn), skip_echo, request_id.as_deref());
        self.answered(&o, may_be_silent, &before);
    }

    fn binary(&mut self, conn: ConnId) {
        let before = self.snapshot();
        self.chat.handle_binary(self.now, conn, &mut self.out);
        let o = self.drain(Some(conn), false, None);
        assert!(o.closed || o.errors == 1, "a binary frame gets an error");
        self.answered(&o, false, &before);
    }

    fn answered(&self, o: &Outcome, may_be_silent: bool, before: &Snapshot) {
        if o.closed {
            return;
        }
        assert!(o.to_actor > 0 || may_be_silent, "a frame got no answer");
        if o.errors > 0 {
            assert_eq!((o.errors, o.total), (1, 1), "an error is the only event");
            assert_eq!(&self.snapshot(), before, "an error changed the state");
        }
    }

    fn advance(&mut self, d: Duration) {
        self.now.mono += d;
        self.now.unix_ms += d.as_millis() as u64;
    }
}

fuzz_target!(|input: Input| {
    let mut w = World::new(&input.setup);
    let chars = w.cfg.max_message_chars;
    for op in input.ops.iter().take(MAX_OPS) {
        match op {
            Op::Connect(choice) => w.connect(choice.as_ref()),
            Op::Disconnect(i) => {
                if let Some(c) = w.pick(*i) {
                    w.disconnect(c);
                }
            }
            Op::Cmd(i, cmd, rid) => {
                if let Some(c) = w.pick(*i) {
                    w.text(c, &cmd_text(cmd, *rid, chars));
                }
            }
            Op::Send(i, frame) => {
                if let Some(c) = w.pick(*i) {
                    w.text(c, &frame_text(frame, chars));
                }
            }
            Op::Raw(i, text) => {
                if let Some(c) = w.pick(*i) {
                    let mut end = text.len().min(8192);
                    while !text.is_char_boundary(end) {
                        end -= 1;
                    }
                    w.text(c, &text[..end]);
                }
            }
            Op::Binary(i) => {
                if let Some(c) = w.pick(*i) {
                    w.binary(c);
                }
            }
            Op::AdvanceMs(ms) => w.advance(Duration::from_millis(u64::from(*ms))),
            Op::AdvanceSecs(s) => w.advance(Duration::from_secs(u64::from(*s))),
        }
        w.check();
    }
});
