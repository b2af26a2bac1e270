//! The core against an engine that answers late: a scripted engine holds page requests (or
//! their replies, or reservations) until the test lets them go, while live traffic goes on.

use std::cell::RefCell;
use std::collections::VecDeque;
use std::rc::Rc;
use std::time::Instant;

use serde_json::{Value, json};

use super::*;
use crate::store::StoreError;
use crate::store::engine::{Immediate, Reply};
use crate::store::memory::MemoryStore;

/// What the test controls.
#[derive(Default)]
struct Ctl {
    /// Hold `Page` requests; the page is read only when released (so it may hold messages that
    /// came after the join: the overlap case).
    hold_page_requests: bool,
    /// Read pages at once but hold their replies (the page holds only what came before).
    hold_page_replies: bool,
    /// Hold `IdsReserved` replies.
    hold_reservations: bool,
    /// Answer every page `Unavailable`.
    fail_pages: bool,
    /// Reserve this many ids beyond each one asked for (as the SQLite engine reserves blocks).
    reserve_ahead: u64,
    /// The ids `Reserve` was sent for, in order.
    reserve_log: Vec<u64>,
    /// Let everything held go at the next poll (the test's "the reader thread answered").
    release: bool,
    requests: VecDeque<Request>,
    replies: VecDeque<Reply>,
}

struct Scripted {
    inner: Immediate<MemoryStore>,
    ctl: Rc<RefCell<Ctl>>,
    own: VecDeque<Reply>,
}

impl Engine for Scripted {
    fn request(&mut self, req: Request) {
        let mut ctl = self.ctl.borrow_mut();
        if let Request::Reserve { id, .. } = &req {
            ctl.reserve_log.push(*id);
        }
        match req {
            Request::Page { token, room, .. } if ctl.fail_pages => {
                self.own.push_back(Reply::Unavailable {
                    token,
                    room,
                    error: StoreError("read failed".into()),
                });
            }
            req @ Request::Page { .. } if ctl.hold_page_requests => ctl.requests.push_back(req),
            req => self.inner.request(req),
        }
    }
    fn poll(&mut self) -> Option<Reply> {
        if self.ctl.borrow().release {
            self.release();
        }
        if let Some(r) = self.own.pop_front() {
            return Some(r);
        }
        loop {
            let mut reply = self.inner.poll()?;
            let mut ctl = self.ctl.borrow_mut();
            if let Reply::IdsReserved { up_to, .. } = &mut reply {
                *up_to += ctl.reserve_ahead;
            }
            let hold = match reply {
                Reply::PageReady { .. } => ctl.hold_page_replies,
                Reply::IdsReserved { .. } => ctl.hold_reservations,
                _ => false,
            };
            if !hold {
                return Some(reply);
            }
            ctl.replies.push_back(reply);
        }
    }
    fn writable(&self) -> bool {
        self.inner.writable()
    }
    fn flush(&mut self) {
        self.inner.flush();
    }
    fn close(&mut self, deadline: Instant) -> u64 {
        self.inner.close(deadline)
    }
}

impl Scripted {
    /// Lets everything held go: requests to the store now, replies to the next poll.
    fn release(&mut self) {
        let (reqs, replies) = {
            let mut ctl = self.ctl.borrow_mut();
            let held = (
                std::mem::take(&mut ctl.requests),
                std::mem::take(&mut ctl.replies),
            );
            *ctl = Ctl::default();
            held
        };
        self.own.extend(replies);
        for r in reqs {
            self.inner.request(r);
        }
    }
}

/// The scripted engine's handle, kept by the test after the engine went into the chat.
struct Handle {
    ctl: Rc<RefCell<Ctl>>,
}

struct T {
    chat: Chat,
    out: Recorder,
    now: Now,
}

fn setup(cfg: Config) -> (T, Handle) {
    let ctl = Rc::new(RefCell::new(Ctl::default()));
    let engine = Scripted {
        inner: Immediate::new(MemoryStore::new(100)),
        ctl: ctl.clone(),
        own: VecDeque::new(),
    };
    let cfg = Config {
        rate_burst: 10_000,
        ..cfg
    };
    let t = T {
        chat: Chat::new(cfg, Box::new(engine), counted_ids()),
        out: Recorder::default(),
        now: Now {
            mono: Instant::now(),
            unix_ms: 1_700_000_000_000,
        },
    };
    (t, Handle { ctl })
}

impl T {
    fn connect(&mut self, conn: ConnId, name: &str) {
        self.chat
            .connect(self.now, conn, Some(name), None, &mut self.out);
        self.check();
    }
    fn send(&mut self, conn: ConnId, cmd: Value) {
        self.chat
            .handle_text(self.now, conn, &cmd.to_string(), &mut self.out);
        self.check();
    }
    fn say(&mut self, conn: ConnId, room: &str, text: &str) {
        self.send(
            conn,
            json!({"command":"broadcast","room":room,"message":text}),
        );
    }
    /// A turn with no input but the engine's waker.
    fn wake(&mut self) {
        self.chat.handle_engine(&mut self.out);
        self.check();
    }
    /// Lets go what the scripted engine holds, and the waker fires.
    fn release(&mut self, h: &Handle) {
        h.ctl.borrow_mut().release = true;
        self.wake();
    }
    fn check(&self) {
        self.chat.rooms.assert_consistent();
    }
    /// What `conn` got, as (event, id or message) for a compact comparison.
    fn got(&mut self, conn: ConnId) -> Vec<Value> {
        self.out.take(conn)
    }
}

fn history_ids(v: &Value) -> Vec<u64> {
    v["messages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["id"].as_u64().unwrap())
        .collect()
}

/// The ids of the room broadcasts among `events`, in order.
fn live_ids(events: &[Value]) -> Vec<u64> {
    events
        .iter()
        .filter(|e| e["event"] == "broadcast" && e["id"].is_u64())
        .map(|e| e["id"].as_u64().unwrap())
        .collect()
}

/// A joiner whose page comes turns later gets `history` first, then exactly the newer
/// messages: none missing, none twice. Both shapes: the page read late (it overlaps what was
/// held) and the page read at once but answered late (no overlap).
#[test]
fn a_late_join_page_comes_first_then_exactly_the_newer_messages() {
    for lazy in [true, false] {
        let (mut t, h) = setup(Config::default());
        t.connect(1, "a");
        for i in 1..=3 {
            t.say(1, "general", &format!("m{i}"));
        }
        {
            let mut ctl = h.ctl.borrow_mut();
            ctl.hold_page_requests = lazy;
            ctl.hold_page_replies = !lazy;
        }
        t.connect(2, "b");
        let first = t.got(2);
        assert_eq!(
            first.iter().map(|e| e["event"].clone()).collect::<Vec<_>>(),
            vec![json!("me"), json!("broadcast")],
            "me and the joined notice at once, the history not yet: {first:?}"
        );
        assert_eq!(first[1]["joined"], "b");
        t.out.sent.clear();
        // Several turns of live traffic while the page is on its way.
        t.say(1, "general", "m4");
        t.wake();
        t.say(1, "general", "m5");
        t.wake();
        assert!(
            t.got(2).is_empty(),
            "live messages wait for the page (lazy: {lazy})"
        );
        assert_eq!(live_ids(&t.got(1)), vec![4, 5], "the sender is not held");
        t.release(&h);
        t.say(1, "general", "m6");
        let got = t.got(2);
        assert_eq!(got[0]["event"], "history", "history first: {got:?}");
        let page = history_ids(&got[0]);
        let mut seen = page.clone();
        seen.extend(live_ids(&got[1..]));
        assert_eq!(
            seen,
            vec![1, 2, 3, 4, 5, 6],
            "no gap, no duplicate (lazy: {lazy}, page {page:?})"
        );
        assert_eq!(
            page,
            if lazy {
                vec![1, 2, 3, 4, 5]
            } else {
                vec![1, 2, 3]
            }
        );
        assert!(t.chat.waits.is_empty() && t.chat.reads.is_empty());
    }
}

/// A member who leaves, or disconnects, before its page comes: the late reply is dropped, the
/// held messages with it, and nothing is left behind.
#[test]
fn a_join_page_for_a_member_who_left_is_dropped() {
    let (mut t, h) = setup(Config::default());
    t.connect(1, "a");
    t.connect(2, "b");
    t.send(1, json!({"command":"join","room":"dev"}));
    t.say(1, "dev", "d1");
    t.out.sent.clear();
    h.ctl.borrow_mut().hold_page_requests = true;
    t.send(2, json!({"command":"join","room":"dev"}));
    assert_eq!(
        t.out.events(2, "broadcast")[0]["joined"],
        "b",
        "its notice, at once"
    );
    t.say(1, "dev", "d2");
    t.send(2, json!({"command":"leave","room":"dev","request_id":"l"}));
    let got = t.got(2);
    assert_eq!(
        got,
        vec![
            json!({"event":"broadcast","room":"dev","member":"system","message":"b has left!","left":"b"}),
            json!({"event":"ack","room":"dev","request_id":"l"}),
        ],
        "the leaver hears its own notice; nothing held is sent"
    );
    assert!(
        t.chat.waits.is_empty(),
        "the held messages went with the leave"
    );
    t.release(&h);
    assert!(t.got(2).is_empty(), "the late page is dropped");
    assert!(t.chat.reads.is_empty());

    // Joining again gets the whole history, at once (nothing held any more).
    t.send(2, json!({"command":"join","room":"dev"}));
    let h2 = t.out.events(2, "history");
    assert_eq!(history_ids(&h2[0]), vec![1, 2]);

    // The same with a disconnect, and the connection id reused by a new member.
    h.ctl.borrow_mut().hold_page_requests = true;
    t.connect(3, "c");
    t.say(1, "general", "g1");
    t.chat.disconnect(3, &mut t.out);
    t.connect(3, "c2");
    t.say(1, "general", "g2");
    assert!(t.chat.waits.contains_key(&(3, "general".to_string())));
    t.out.sent.clear();
    t.release(&h);
    let got = t.got(3);
    assert_eq!(
        got.iter().filter(|e| e["event"] == "history").count(),
        1,
        "only the new member's page reaches connection 3: {got:?}"
    );
    assert_eq!(history_ids(&got[0]), vec![1, 2], "general: g1 and g2");
    assert!(t.chat.waits.is_empty() && t.chat.reads.is_empty());
}

/// The events held for a joiner are bounded by the output bound: past it the member is closed
/// as a slow consumer, as the transport would close it.
#[test]
fn held_events_are_bounded_by_the_output_bound() {
    let (mut t, h) = setup(Config {
        max_pending_output: 4096,
        ..Config::default()
    });
    t.connect(1, "a");
    h.ctl.borrow_mut().hold_page_requests = true;
    t.connect(2, "b");
    let text = "x".repeat(900);
    for _ in 0..5 {
        t.say(1, "general", &text);
    }
    assert_eq!(t.out.closed, vec![(2, 1008, "slow consumer".to_string())]);
    assert!(t.chat.waits.is_empty());
    assert_eq!(t.chat.member_count(), 1);
    t.release(&h);
    assert!(t.out.take(2).iter().all(|e| e["event"] != "history"));
}

/// Broadcasts whose id is not reserved yet wait, in order, and go out (numbered, delivered,
/// acked) when the reservation comes; `history` waits for its page; a page that cannot be read
/// is `unavailable` for `history` and an empty history for `join`.
#[test]
fn broadcasts_wait_for_their_reservation_in_order() {
    let (mut t, h) = setup(Config::default());
    t.connect(1, "a");
    t.connect(2, "b");
    t.out.sent.clear();
    h.ctl.borrow_mut().hold_reservations = true;
    for r in ["r1", "r2", "r3"] {
        t.send(
            1,
            json!({"command":"broadcast","message":r,"request_id":r,"msg_id":"same"}),
        );
    }
    assert!(
        t.out.sent.is_empty(),
        "nothing goes out before the id is reserved"
    );
    assert_eq!(
        t.chat.unstored(),
        3,
        "held broadcasts count against the backlog"
    );
    t.release(&h);
    let b = t.got(2);
    assert_eq!(live_ids(&b), vec![1], "the repeats are not delivered again");
    let acks = t.out.events(1, "ack");
    assert_eq!(
        acks.iter()
            .map(|a| (a["request_id"].clone(), a["id"].clone()))
            .collect::<Vec<_>>(),
        vec![
            (json!("r1"), json!(1)),
            (json!("r2"), json!(1)),
            (json!("r3"), json!(1))
        ],
        "in order, the repeats acked with the first id"
    );
    assert_eq!(t.chat.unstored(), 0);

    h.ctl.borrow_mut().hold_page_replies = true;
    t.send(
        2,
        json!({"command":"history","room":"general","request_id":"h"}),
    );
    assert!(t.out.events(2, "history").is_empty());
    t.release(&h);
    let page = t.out.events(2, "history");
    assert_eq!(page[0]["request_id"], "h");
    assert_eq!(history_ids(&page[0]), vec![1]);

    h.ctl.borrow_mut().fail_pages = true;
    t.send(
        2,
        json!({"command":"history","room":"general","request_id":"h2"}),
    );
    let e = t.out.take(2);
    assert_eq!(e.len(), 1);
    assert_eq!(
        (&e[0]["event"], &e[0]["code"], &e[0]["request_id"]),
        (&json!("error"), &json!("unavailable"), &json!("h2"))
    );
    h.ctl.borrow_mut().fail_pages = true;
    t.send(2, json!({"command":"join","room":"dev","request_id":"j"}));
    assert_eq!(
        t.out.events(2, "history"),
        vec![json!({"event":"history","room":"dev","messages":[],"more":false,"request_id":"j"})],
        "a join is not refused for an unreadable page"
    );
}

/// The REST page is answered when the engine replies, with the token it was asked with; a
/// room that never was is `None`, an unreadable page an error.
#[test]
fn a_rest_page_is_answered_late() {
    let (mut t, h) = setup(Config::default());
    t.connect(1, "a");
    t.say(1, "general", "m1");
    h.ctl.borrow_mut().hold_page_replies = true;
    let token = t.chat.request_rest_page("general", None, None, &mut t.out);
    assert!(t.chat.take_rest_pages().is_empty(), "not answered yet");
    t.wake();
    assert!(t.chat.take_rest_pages().is_empty(), "still not");
    t.release(&h);
    let pages = t.chat.take_rest_pages();
    assert_eq!(pages.len(), 1);
    assert_eq!(pages[0].0, token);
    let page = pages[0].1.clone().unwrap().unwrap();
    assert_eq!(
        page.messages.iter().map(|m| m.id).collect::<Vec<_>>(),
        vec![1]
    );

    let token = t.chat.request_rest_page("nowhere", None, None, &mut t.out);
    assert_eq!(t.chat.take_rest_pages(), vec![(token, Ok(None))]);
    h.ctl.borrow_mut().fail_pages = true;
    let token = t.chat.request_rest_page("general", None, None, &mut t.out);
    let pages = t.chat.take_rest_pages();
    assert!(
        matches!(&pages[..], [(tk, Err(_))] if *tk == token),
        "{pages:?}"
    );
}

/// Every id handed out is announced with `Reserve` once, covered or not, so an engine that
/// reserves ahead renews its block in time; covered ids go out at once.
#[test]
fn every_id_is_announced_once_and_covered_ids_do_not_wait() {
    let (mut t, h) = setup(Config::default());
    t.connect(1, "a");
    t.connect(2, "b");
    h.ctl.borrow_mut().reserve_ahead = 9;
    t.out.sent.clear();
    for i in 1..=25 {
        t.say(1, "general", &format!("m{i}"));
        assert_eq!(
            live_ids(&t.out.take(2)),
            vec![i],
            "delivered in the same turn"
        );
    }
    assert_eq!(h.ctl.borrow().reserve_log, (1..=25).collect::<Vec<_>>());
}

/// A room whose only member leaves while its broadcast waits for an id stays in memory until
/// the broadcast is numbered and stored, then goes: the message is kept, acked, and a later
/// joiner finds it. The sender is reported as waiting until then (the transport reads nothing
/// more from it, so its answers keep the order of its commands).
#[test]
fn a_room_whose_broadcasts_wait_for_their_ids_outlives_its_last_member() {
    let (mut t, h) = setup(Config::default());
    t.connect(1, "a");
    t.send(1, json!({"command":"join","room":"side"}));
    t.out.sent.clear();
    assert!(
        !t.chat.is_waiting(1),
        "the memory engine answered the join at once"
    );
    h.ctl.borrow_mut().hold_reservations = true;
    t.send(
        1,
        json!({"command":"broadcast","room":"side","message":"kept","request_id":"k"}),
    );
    assert!(t.chat.is_waiting(1), "its broadcast waits for an id");
    assert!(!t.chat.is_waiting(2), "nobody else waits");
    t.send(1, json!({"command":"leave","room":"side"}));
    assert_eq!(
        t.chat.room_count(),
        2,
        "the empty room stays while it holds a broadcast"
    );
    t.release(&h);
    assert!(!t.chat.is_waiting(1));
    assert_eq!(
        t.chat.room_count(),
        1,
        "and goes once the broadcast is numbered"
    );
    let acks = t.out.events(1, "ack");
    assert_eq!(
        acks.iter()
            .map(|a| (a["request_id"].clone(), a["id"].clone()))
            .collect::<Vec<_>>(),
        vec![(json!("k"), json!(1))],
        "stored and acked"
    );
    t.connect(2, "b");
    t.send(2, json!({"command":"join","room":"side"}));
    let page = t.out.events(2, "history");
    let side = page
        .iter()
        .find(|p| p["room"] == "side")
        .expect("side's page");
    assert_eq!(history_ids(side), vec![1], "a later joiner finds it");
    assert_eq!(side["messages"][0]["message"], "kept");
}

/// A `history` whose page is late keeps its asker waiting; the answer ends the wait.
#[test]
fn a_member_waits_while_its_history_page_is_on_its_way() {
    let (mut t, h) = setup(Config::default());
    t.connect(1, "a");
    t.out.sent.clear();
    h.ctl.borrow_mut().hold_page_replies = true;
    t.send(
        1,
        json!({"command":"history","room":"general","request_id":"h"}),
    );
    assert!(t.chat.is_waiting(1));
    t.release(&h);
    assert!(!t.chat.is_waiting(1));
    assert_eq!(t.out.events(1, "history")[0]["request_id"], "h");
}
