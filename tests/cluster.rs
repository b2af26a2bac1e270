//! Cluster mode (issue 12, feature `cluster`): two real chatterbox processes (three for node
//! death) on one `redis-server` of the test's own behave as one server. Each test starts its
//! own Redis and nodes (`common::cluster`) and bounds every wait; a node killed with `-9`,
//! Redis stopped, restarted, emptied (`FLUSHALL`) or its subscriptions killed (`CLIENT KILL
//! TYPE pubsub`). Only the `--db-path` refusal and the harness's own tests pass without the
//! server's use of `--redis`.
#![cfg(feature = "cluster")]

mod common;

use std::collections::{BTreeMap, HashSet};
use std::process::{Command, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use common::Client;
use common::cluster::{
    Node, Redis, eventually, free_port, ids_in, is_joined, is_left, names, temp_dir,
};
use serde_json::{Value, json};

/// The bound of an ordinary wait (a notice, a reply crossing Redis).
const T: Duration = Duration::from_secs(5);

/// Generous rate limits, for tests that poll or send fast.
const FAST: [&str; 4] = ["--rate-per-sec", "100000", "--rate-burst", "100000"];

const ALONE: &str = "No other members are currently connected.";

/// Redis and two nodes with the same extra arguments.
fn two(extra: &[&str]) -> (Redis, Node, Node) {
    let redis = Redis::start();
    let a = Node::spawn(&redis, extra);
    let b = Node::spawn(&redis, extra);
    (redis, a, b)
}

/// Waits until `c` got the `has joined!` notice of `name` in `room`.
fn saw_join(c: &mut Client, room: &str, name: &str) {
    c.wait_for(&format!("{name} has joined! in {room}"), T, |e| {
        is_joined(e, room, name)
    });
}

/// Joins `room` and waits for its history.
fn join(c: &mut Client, room: &str) -> Value {
    c.send(json!({"command": "join", "room": room}));
    c.wait_for(&format!("the history of {room}"), T, |e| {
        e["event"] == "history" && e["room"] == room
    })
}

/// The member broadcasts `c` receives in `room` until the one with id `last` (included).
fn broadcasts_until(c: &mut Client, room: &str, last: u64) -> Vec<Value> {
    let mut out = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let e = c.next_within(left).unwrap_or_else(|| {
            panic!(
                "no broadcast {last} in {room}; got ids {:?}",
                ids_in(&out, room)
            )
        });
        if e["event"] == "broadcast" && e["room"] == room && e["member"] != "system" {
            let id = e["id"].as_u64().unwrap();
            out.push(e);
            if id == last {
                return out;
            }
        }
    }
}

/// A broadcast with a `request_id`: every event the sender gets until it has both the ack and
/// its own echo, and then until a ping's answer (whatever the broadcast made the node send it).
fn said(c: &mut Client, room: &str, message: &str) -> Vec<Value> {
    let (ack, mut seen) =
        c.request_keeping(json!({"command": "broadcast", "room": room, "message": message}));
    assert_eq!(ack["event"], "ack", "{ack}");
    let id = ack["id"].as_u64().unwrap();
    while !ids_in(&seen, room).contains(&id) {
        seen.push(c.wait_for("any event", T, |_| true));
    }
    seen.extend(c.sync());
    seen
}

/// The member's name (`me`).
fn me(c: &mut Client) -> String {
    c.request(json!({"command": "me"}))["member"]
        .as_str()
        .unwrap()
        .to_string()
}

/// `rooms` as name → member count.
fn rooms(c: &mut Client) -> BTreeMap<String, u64> {
    let ev = c.request(json!({"command": "rooms"}));
    ev["rooms"]
        .as_array()
        .unwrap_or_else(|| panic!("{ev}"))
        .iter()
        .map(|r| {
            (
                r["name"].as_str().unwrap().to_string(),
                r["members"].as_u64().unwrap(),
            )
        })
        .collect()
}

/// How many `has left!` notices of `name` in `room` are among `events`.
fn leaves(events: &[Value], room: &str, name: &str) -> usize {
    events.iter().filter(|e| is_left(e, room, name)).count()
}

/// Sends a broadcast with a `request_id` every 200 ms until one is acked (at most `limit`);
/// returns the ack. `unavailable` answers on the way are expected; others fail the test.
fn publish_until_acked(c: &mut Client, room: &str, message: &str, limit: Duration) -> Value {
    let deadline = Instant::now() + limit;
    loop {
        let ev = c.publish(room, message);
        if ev["event"] == "ack" {
            return ev;
        }
        assert_eq!(ev["code"], "unavailable", "{ev}");
        assert!(
            Instant::now() < deadline,
            "still {ev} after {limit:?} with Redis back"
        );
        thread::sleep(Duration::from_millis(200));
    }
}

// ------------------------------------------------------------------------------------------
// 1. One server, seen from any node
// ------------------------------------------------------------------------------------------

#[test]
fn a_broadcast_reaches_members_on_both_nodes_identically_in_one_order() {
    let (_redis, a, b) = two(&[]);
    let mut x = a.client(Some("x"));
    let mut y = b.client(Some("y"));
    saw_join(&mut x, "general", "y");
    let mut z = a.client(Some("z"));
    saw_join(&mut x, "general", "z");
    saw_join(&mut y, "general", "z");

    for i in 1..=3 {
        x.send(json!({"command": "broadcast", "message": format!("m{i}"), "data": {"n": i}}));
    }
    // Ids are handed out in the order Redis gets the broadcasts: y sends once it has x's three.
    let on_y = broadcasts_until(&mut y, "general", 3);
    // From the other node, without its own echo.
    let ack = y.request(json!({"command": "broadcast", "message": "quiet", "echo": false}));
    assert_eq!(
        (ack["event"].as_str(), ack["id"].as_u64()),
        (Some("ack"), Some(4)),
        "{ack}"
    );

    let on_x = broadcasts_until(&mut x, "general", 4);
    let on_z = broadcasts_until(&mut z, "general", 4);
    assert_eq!(ids_in(&on_x, "general"), [1, 2, 3, 4]);
    assert_eq!(on_x, on_z, "the same events on the same node");
    assert_eq!(on_y[..], on_x[..3], "the same events on the other node");
    for (i, e) in on_x.iter().take(3).enumerate() {
        assert_eq!(e["member"], "x");
        assert_eq!(e["message"], format!("m{}", i + 1));
        assert_eq!(e["data"], json!({"n": i + 1}));
        assert!(e["ts"].as_u64().is_some(), "{e}");
    }
    assert_eq!(
        (&on_x[3]["member"], &on_x[3]["message"]),
        (&json!("y"), &json!("quiet"))
    );
    // echo:false: y never gets its own message, though both members of the other node did.
    let later = y.collect_for(Duration::from_millis(500));
    assert_eq!(ids_in(&later, "general"), Vec::<u64>::new(), "{later:?}");
    assert!(
        on_x.iter().chain(&on_y).all(|e| e["event"] != "system"),
        "no alone notice with members on both nodes"
    );
}

#[test]
fn the_alone_notice_counts_the_members_of_both_nodes() {
    let (_redis, a, b) = two(&[]);
    let mut x = a.client(Some("x"));
    let mut y = b.client(Some("y"));
    saw_join(&mut x, "general", "y");

    let alone = |events: &[Value]| {
        events
            .iter()
            .any(|e| e["event"] == "system" && e["message"] == ALONE)
    };
    // general: y is in it, on the other node.
    let seen = said(&mut x, "general", "hi");
    assert!(!alone(&seen), "{seen:?}");

    // solo: only x.
    join(&mut x, "solo");
    let seen = said(&mut x, "solo", "anyone?");
    assert!(alone(&seen), "{seen:?}");

    // y joins solo from the other node: x is no longer alone there.
    join(&mut y, "solo");
    saw_join(&mut x, "solo", "y");
    let seen = said(&mut x, "solo", "hello");
    assert!(!alone(&seen), "{seen:?}");
}

#[test]
fn list_list_room_rooms_and_me_see_the_whole_cluster() {
    let (_redis, a, b) = two(&[]);
    let mut x = a.client(Some("x"));
    let mut y = b.client(Some("y"));
    saw_join(&mut x, "general", "y");
    join(&mut y, "side");
    let mut z = a.client(Some("z"));
    saw_join(&mut y, "general", "z");
    join(&mut z, "side");
    saw_join(&mut y, "side", "z");

    let all = ["x", "y", "z"];
    eventually("y and z in side, seen from node A", T, || {
        (a.get_json("/api/rooms/side")["members"] == json!(["y", "z"])).then_some(())
    });
    for c in [&mut x, &mut y, &mut z] {
        assert_eq!(c.list(None), all, "oldest connection first");
        assert_eq!(c.list(Some("general")), all);
        assert_eq!(c.list(Some("side")), ["y", "z"]);
        assert_eq!(
            rooms(c),
            BTreeMap::from([("general".to_string(), 3), ("side".to_string(), 2)])
        );
    }
    let me_y = y.request(json!({"command": "me"}));
    assert_eq!(me_y["member"], "y");
    assert_eq!(me_y["rooms"], json!(["general", "side"]), "{me_y}");
    assert_eq!(
        x.request(json!({"command": "me"}))["rooms"],
        json!(["general"])
    );
}

#[test]
fn join_and_leave_notices_cross_nodes() {
    let (_redis, a, b) = two(&[]);
    let mut x = a.client(Some("x"));
    let mut y = b.client(Some("y"));
    saw_join(&mut x, "general", "y");
    join(&mut x, "r");
    join(&mut y, "r");
    saw_join(&mut x, "r", "y");
    let ack = y.request(json!({"command": "leave", "room": "r"}));
    assert_eq!(ack["event"], "ack", "{ack}");
    x.wait_for("y has left! in r", T, |e| is_left(e, "r", "y"));
    // x's own moves reach y too.
    join(&mut y, "r");
    saw_join(&mut x, "r", "y");
    let ack = x.request(json!({"command": "leave", "room": "r"}));
    assert_eq!(ack["event"], "ack", "{ack}");
    y.wait_for("x has left! in r", T, |e| is_left(e, "r", "x"));

    y.ws.close(None).unwrap();
    let _ = y.ws.flush();
    x.wait_for("y has left! in general", T, |e| is_left(e, "general", "y"));
    let rest = x.collect_for(Duration::from_millis(700));
    assert_eq!(leaves(&rest, "general", "y"), 0, "once: {rest:?}");
    assert_eq!(x.list(None), ["x"]);
}

#[test]
fn direct_reaches_a_member_on_the_other_node() {
    let (_redis, a, b) = two(&[]);
    let mut x = a.client(Some("x"));
    let mut y = b.client(Some("y"));
    saw_join(&mut x, "general", "y");

    x.send(json!({"command": "direct", "to": "y", "message": "psst", "data": [1]}));
    let on_y = y.wait_for("the direct", T, |e| e["event"] == "direct");
    let on_x = x.wait_for("the sender's copy", T, |e| e["event"] == "direct");
    for e in [&on_x, &on_y] {
        assert_eq!(
            (&e["from"], &e["to"], &e["message"]),
            (&json!("x"), &json!("y"), &json!("psst"))
        );
    }
    assert_eq!(on_y["data"], json!([1]));
    // And back.
    y.send(json!({"command": "direct", "to": "x", "message": "yes?"}));
    let back = x.wait_for("the answer", T, |e| e["event"] == "direct");
    assert_eq!(
        (&back["from"], &back["message"]),
        (&json!("y"), &json!("yes?"))
    );
    let err = x.request(json!({"command": "direct", "to": "nobody", "message": "hello"}));
    assert_eq!(
        (&err["event"], &err["code"]),
        (&json!("error"), &json!("not_found"))
    );
    // Directs are not stored.
    assert!(_redis.history("general").is_empty());
}

#[test]
fn history_and_join_since_from_either_node() {
    let (redis, a, b) = two(&[]);
    let mut x = a.client(Some("x"));
    for i in 1..=5 {
        let ack = x.publish("general", &format!("m{i}"));
        assert_eq!(ack["id"], i, "{ack}");
    }
    let mut y = b.client(Some("y"));
    for c in [&mut x, &mut y] {
        let h = c.request(json!({"command": "history", "room": "general"}));
        let ids: Vec<u64> = h["messages"]
            .as_array()
            .unwrap()
            .iter()
            .map(|m| m["id"].as_u64().unwrap())
            .collect();
        assert_eq!(ids, [1, 2, 3, 4, 5], "{h}");
        assert_eq!(h["messages"][4]["message"], "m5");
        let page =
            c.request(json!({"command": "history", "room": "general", "before": 4, "limit": 2}));
        assert_eq!(
            page["messages"]
                .as_array()
                .unwrap()
                .iter()
                .map(|m| m["id"].as_u64().unwrap())
                .collect::<Vec<_>>(),
            [2, 3],
            "{page}"
        );
        assert_eq!(page["more"], true, "{page}");
    }
    // A room written on node A, resumed on node B.
    join(&mut x, "r");
    for i in 1..=4 {
        assert_eq!(x.publish("r", &format!("r{i}"))["id"], i);
    }
    y.send(json!({"command": "join", "room": "r", "since": 2}));
    let h = y.wait_for("the resumed history", T, |e| {
        e["event"] == "history" && e["room"] == "r"
    });
    let got: Vec<(u64, String)> = h["messages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| {
            (
                m["id"].as_u64().unwrap(),
                m["message"].as_str().unwrap().into(),
            )
        })
        .collect();
    assert_eq!(got, [(3, "r3".to_string()), (4, "r4".to_string())], "{h}");
    // The REST page, from node B.
    let page = b.get_json("/api/rooms/general/messages?limit=2");
    assert_eq!(page["messages"][0]["id"], 4, "{page}");
    assert_eq!(page["messages"][1]["id"], 5, "{page}");
    assert_eq!(page["more"], true);
    assert_eq!(redis.history("r").len(), 4);
}

#[test]
fn the_rest_api_shows_the_whole_cluster_from_either_node() {
    let (_redis, a, b) = two(&[]);
    let mut x = a.client(Some("x"));
    let mut y = b.client(Some("y"));
    saw_join(&mut x, "general", "y");
    join(&mut y, "side");
    x.publish("general", "one");
    x.publish("general", "two");
    for n in [&a, &b] {
        eventually(&format!("side on {}", n.addr), T, || {
            let r = n.get_json("/api/rooms/side");
            (r["members"] == json!(["y"])).then_some(())
        });
        assert_eq!(n.get_json("/api/members"), json!(["x", "y"]));
        let rooms: BTreeMap<String, (u64, u64)> = n
            .get_json("/api/rooms")
            .as_array()
            .unwrap()
            .iter()
            .map(|r| {
                (
                    r["name"].as_str().unwrap().to_string(),
                    (
                        r["members"].as_u64().unwrap(),
                        r["messages"].as_u64().unwrap(),
                    ),
                )
            })
            .collect();
        assert_eq!(
            rooms,
            BTreeMap::from([("general".into(), (2, 2)), ("side".into(), (1, 0))]),
            "on {}",
            n.addr
        );
        let g = n.get_json("/api/rooms/general");
        assert_eq!(
            (&g["members"], &g["messages"]),
            (&json!(["x", "y"]), &json!(2)),
            "{g}"
        );
        let stats = n.get_json("/api/stats");
        assert_eq!(
            (&stats["members"], &stats["rooms"]),
            (&json!(2), &json!(2)),
            "{stats}"
        );
        // Each node has one member's socket (and this request's): the other node's member
        // counts in the cluster's connections.
        assert_eq!(stats["cluster"]["nodes"], 2, "{stats}");
        assert_eq!(
            stats["cluster"]["connections"].as_u64(),
            stats["connections"].as_u64().map(|c| c + 1),
            "{stats}"
        );
        let m = n.get_json("/api/rooms/general/messages");
        assert_eq!(m["messages"][1]["message"], "two", "{m}");
        assert_eq!(n.get("/api/rooms/nowhere").0, 404);
    }
}

// ------------------------------------------------------------------------------------------
// 2. Ids; 3. names; 4. acks
// ------------------------------------------------------------------------------------------

#[test]
fn a_msg_id_resent_through_the_other_node_is_acked_with_its_first_id_and_not_delivered_again() {
    let (redis, a, b) = two(&[]);
    let mut w = a.client(Some("w"));
    let mut v = b.client(Some("v"));
    saw_join(&mut w, "general", "v");
    let mut x = a.client(Some("x"));
    saw_join(&mut v, "general", "x");
    let send = json!({"command": "broadcast", "message": "once", "msg_id": "m-1"});
    let first = x.request(send.clone());
    assert_eq!(
        (&first["event"], &first["id"]),
        (&json!("ack"), &json!(1)),
        "{first}"
    );
    for c in [&mut w, &mut v] {
        let got = broadcasts_until(c, "general", 1);
        assert_eq!(ids_in(&got, "general"), [1], "{got:?}");
    }
    // The sender reconnects through the other node and sends again.
    x.ws.close(None).unwrap();
    let _ = x.ws.flush();
    v.wait_for("x has left!", T, |e| is_left(e, "general", "x"));
    let mut x = eventually("x's name free on node B", T, || {
        common::cluster::connect(b.addr, Some("x")).ok()
    });
    let again = x.request(send);
    assert_eq!(
        (&again["event"], &again["id"]),
        (&json!("ack"), &json!(1)),
        "{again}"
    );
    let next = x.request(json!({"command": "broadcast", "message": "new", "msg_id": "m-2"}));
    assert_eq!(next["id"], 2, "{next}");

    for c in [&mut w, &mut v] {
        let got = broadcasts_until(c, "general", 2);
        assert_eq!(
            ids_in(&got, "general"),
            [2],
            "the resend was not delivered: {got:?}"
        );
    }
    let stored: Vec<u64> = redis
        .history("general")
        .iter()
        .map(|m| m["id"].as_u64().unwrap())
        .collect();
    assert_eq!(stored, [1, 2]);
}

#[test]
fn a_name_taken_on_one_node_is_refused_409_on_the_other_ignoring_case() {
    let (_redis, a, b) = two(&[]);
    let alice = a.client(Some("Alice"));
    // B refuses the name before the upgrade once it has heard of Alice (milliseconds); a
    // claim in that moment loses in Redis and is closed 4009 (chat::cluster_tests).
    eventually("B has heard of Alice", T, || {
        (b.get_json("/api/members") == json!(["Alice"])).then_some(())
    });
    for name in ["Alice", "alice", "ALICE"] {
        assert_eq!(b.upgrade_status(name), 409, "{name} on the other node");
        assert_eq!(a.upgrade_status(name), 409, "{name} on the same node");
    }
    let mut w = b.client(Some("w"));
    drop(alice);
    w.wait_for("Alice has left!", T, |e| is_left(e, "general", "Alice"));
    let mut again = eventually("the name free again", T, || {
        common::cluster::connect(b.addr, Some("aLiCe")).ok()
    });
    assert_eq!(me(&mut again), "aLiCe");
}

#[test]
fn default_names_are_distinct_across_nodes() {
    let (_redis, a, b) = two(&[]);
    let mut clients: Vec<Client> = (0..8)
        .map(|i| {
            if i % 2 == 0 {
                a.client(None)
            } else {
                b.client(None)
            }
        })
        .collect();
    let got: Vec<String> = clients.iter_mut().map(me).collect();
    let distinct: HashSet<String> = got.iter().map(|n| n.to_lowercase()).collect();
    assert_eq!(distinct.len(), 8, "{got:?}");
    for n in &got {
        let num = n.strip_prefix("member").unwrap_or_else(|| panic!("{n}"));
        assert!(
            !num.is_empty() && !num.starts_with('0') && num.bytes().all(|c| c.is_ascii_digit()),
            "{n}"
        );
    }
    let last = clients.len() - 1;
    let mut listed = eventually("all eight listed", T, || {
        let l = clients[last].list(None);
        (l.len() == 8).then_some(l)
    });
    listed.sort();
    let mut want = got.clone();
    want.sort();
    assert_eq!(listed, want);
}

#[test]
fn an_ack_means_the_message_is_in_redis() {
    let (redis, a, b) = two(&[]);
    let mut members = [a.client(Some("x")), b.client(Some("y"))];
    for i in 0..6 {
        let c = &mut members[i % 2];
        let text = format!("stored {i}");
        let ack = c.publish("general", &text);
        assert_eq!(ack["event"], "ack", "{ack}");
        let id = ack["id"].as_u64().unwrap();
        // Read from Redis itself right after the ack, not through a node.
        let stored = redis.history("general");
        let m = stored
            .iter()
            .find(|m| m["id"] == id)
            .unwrap_or_else(|| panic!("id {id} not in cb:h:general: {stored:?}"));
        assert_eq!(m["message"], text, "{m}");
        assert_eq!(stored.len() as u64, id);
    }
}

#[test]
fn with_appendfsync_always_every_acked_message_survives_redis_kill_9() {
    let mut redis = Redis::start_with(&["--appendonly", "yes", "--appendfsync", "always"]);
    let a = Node::spawn(&redis, &[]);
    let b = Node::spawn(&redis, &[]);
    let mut members = [a.client(Some("x")), b.client(Some("y"))];
    let mut acked = Vec::new();
    for i in 0..20 {
        let ack = members[i % 2].publish("general", &format!("kept {i}"));
        assert_eq!(ack["event"], "ack", "{ack}");
        acked.push(ack["id"].as_u64().unwrap());
    }
    // SIGKILL: nothing is flushed on the way out; what Redis acknowledged was fsynced.
    redis.kill();
    redis.start_again();
    let stored: Vec<u64> = redis
        .history("general")
        .iter()
        .map(|m| m["id"].as_u64().unwrap())
        .collect();
    assert_eq!(stored, acked, "every acked id, in order");
    // The nodes serve again on their own, and number above what was kept.
    let ack = publish_until_acked(&mut members[0], "general", "after", T);
    assert_eq!(ack["id"].as_u64(), Some(21), "{ack}");
}

// ------------------------------------------------------------------------------------------
// 6. Node death
// ------------------------------------------------------------------------------------------

/// Node arguments of the node-death tests: a 1 s node timeout, polling allowed.
const DEATH: [&str; 6] = [
    "--node-timeout",
    "1",
    "--rate-per-sec",
    "100000",
    "--rate-burst",
    "100000",
];

/// Calls `list` on `c` every 50 ms until it answers `want`, at most `limit`; keeps every
/// other event in `kept`.
fn list_becomes(c: &mut Client, want: &[&str], limit: Duration, kept: &mut Vec<Value>) {
    let deadline = Instant::now() + limit;
    loop {
        let (ev, before) = c.request_keeping(json!({"command": "list"}));
        kept.extend(before);
        let got = names(&ev["members"]);
        if got == want {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "list is {got:?}, not {want:?}, after {limit:?}"
        );
        thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn kill_9_of_a_node_removes_its_members_everywhere_with_one_leave_notice_each() {
    // Three nodes: two survivors, so "once" means once, not once per surviving node.
    let (redis, mut a, b) = two(&DEATH);
    let c = Node::spawn(&redis, &DEATH);
    let mut s = b.client(Some("s"));
    join(&mut s, "r");
    let mut t = b.client(Some("t"));
    saw_join(&mut s, "general", "t");
    let mut u = c.client(Some("u"));
    join(&mut u, "r");
    saw_join(&mut s, "r", "u");
    let _p = a.client(Some("p"));
    let mut q = a.client(Some("q"));
    join(&mut q, "r");
    saw_join(&mut s, "r", "q");
    saw_join(&mut t, "general", "q");
    saw_join(&mut u, "r", "q");
    assert_eq!(s.list(None), ["s", "t", "u", "p", "q"]);

    a.kill9();
    let deadline = Duration::from_secs(1 + 2);
    let mut seen: [Vec<Value>; 3] = Default::default();
    let survivors = ["s", "t", "u"];
    for (i, m) in [&mut s, &mut t, &mut u].into_iter().enumerate() {
        list_becomes(m, &survivors, deadline, &mut seen[i]);
    }
    for n in [&b, &c] {
        assert_eq!(
            n.get_json("/api/members"),
            json!(survivors),
            "on {}",
            n.addr
        );
        assert_eq!(n.get_json("/api/rooms/r")["members"], json!(["s", "u"]));
    }
    // Longer than another node timeout: no second round of notices.
    seen[0].extend(s.collect_for(Duration::from_secs(2)));
    seen[1].extend(t.collect_for(Duration::from_millis(200)));
    seen[2].extend(u.collect_for(Duration::from_millis(200)));
    for (who, seen, in_r) in [("s", &seen[0], 1), ("t", &seen[1], 0), ("u", &seen[2], 1)] {
        assert_eq!(leaves(seen, "general", "p"), 1, "{who}: {seen:?}");
        assert_eq!(leaves(seen, "general", "q"), 1, "{who}: {seen:?}");
        assert_eq!(leaves(seen, "r", "q"), in_r, "{who}: {seen:?}");
        assert_eq!(leaves(seen, "r", "p"), 0, "{who}: {seen:?}");
    }
    // Their names are free again.
    let mut p = b.client(Some("p"));
    assert_eq!(me(&mut p), "p");
}

#[test]
fn a_node_restarted_after_kill_9_leaves_no_ghosts() {
    let (redis, mut a, b) = two(&DEATH);
    let mut s = b.client(Some("s"));
    let _p = a.client(Some("p"));
    saw_join(&mut s, "general", "p");
    a.kill9();
    // The same node again at once, before the old one counts as dead.
    let a2 = Node::spawn(&redis, &DEATH);
    let mut q = a2.client(Some("q"));
    saw_join(&mut s, "general", "q");
    let mut seen = Vec::new();
    list_becomes(&mut s, &["s", "q"], Duration::from_secs(1 + 2), &mut seen);
    list_becomes(
        &mut q,
        &["s", "q"],
        Duration::from_secs(1 + 2),
        &mut Vec::new(),
    );
    seen.extend(s.collect_for(Duration::from_secs(2)));
    assert_eq!(leaves(&seen, "general", "p"), 1, "{seen:?}");
    for n in [&a2, &b] {
        assert_eq!(
            n.get_json("/api/members"),
            json!(["s", "q"]),
            "on {}",
            n.addr
        );
        assert_eq!(n.get_json("/api/stats")["members"], 2);
    }
    assert_eq!(
        s.list(None),
        ["s", "q"],
        "still no ghost after another node timeout"
    );
    let mut p = a2.client(Some("p"));
    assert_eq!(me(&mut p), "p");
}

#[test]
fn sigterm_of_a_node_removes_its_members_at_once() {
    // A node timeout far longer than the wait: only the node's own goodbye can pass.
    let (_redis, mut a, b) = two(&["--node-timeout", "60"]);
    let mut s = b.client(Some("s"));
    join(&mut s, "r");
    let mut p = a.client(Some("p"));
    join(&mut p, "r");
    saw_join(&mut s, "r", "p");
    assert_eq!(a.sigterm(), Some(0));
    let limit = Duration::from_secs(3);
    let mut seen = Vec::new();
    let deadline = Instant::now() + limit;
    while leaves(&seen, "general", "p") + leaves(&seen, "r", "p") < 2 {
        let left = deadline.saturating_duration_since(Instant::now());
        match s.next_within(left) {
            Some(e) => seen.push(e),
            None => panic!("p's leave notices not within {limit:?}: {seen:?}"),
        }
    }
    assert_eq!(s.list(None), ["s"]);
    assert_eq!(b.get_json("/api/members"), json!(["s"]));
    seen.extend(s.collect_for(Duration::from_millis(500)));
    assert_eq!(leaves(&seen, "general", "p"), 1, "{seen:?}");
    assert_eq!(leaves(&seen, "r", "p"), 1, "{seen:?}");
}

// ------------------------------------------------------------------------------------------
// 7. Redis faults; 5. gaps healed
// ------------------------------------------------------------------------------------------

/// A broadcast to `general` that must be answered `error` `unavailable` within 2 s.
fn refused_in_time(c: &mut Client, message: &str) {
    let sent = Instant::now();
    let ev = c.publish("general", message);
    assert!(
        sent.elapsed() <= Duration::from_secs(2),
        "answered after {:?}",
        sent.elapsed()
    );
    assert_eq!(
        (&ev["event"], &ev["code"]),
        (&json!("error"), &json!("unavailable")),
        "{ev}"
    );
}

#[test]
fn redis_stopped_answers_unavailable_and_503_and_keeps_the_connections() {
    let (mut redis, a, b) = two(&[]);
    let mut x = a.client(Some("x"));
    let mut y = b.client(Some("y"));
    saw_join(&mut x, "general", "y");
    assert_eq!(x.publish("general", "before")["id"], 1);
    redis.stop();

    refused_in_time(&mut x, "lost?");
    refused_in_time(&mut y, "lost too?");

    for n in [&a, &b] {
        let (code, body) = eventually("/health 503", Duration::from_secs(2), || {
            let h = n.health();
            (h.0 == 503).then_some(h)
        });
        assert_eq!(code, 503);
        assert!(!body.trim().is_empty(), "/health says why");
        assert_eq!(
            n.upgrade_status("newcomer"),
            503,
            "a new upgrade on {}",
            n.addr
        );
    }
    // Nothing spins while Redis is away.
    let before = (a.cpu_time(), b.cpu_time());
    thread::sleep(Duration::from_secs(2));
    let used = (a.cpu_time() - before.0, b.cpu_time() - before.1);
    assert!(
        used.0 < Duration::from_millis(500) && used.1 < Duration::from_millis(500),
        "CPU while Redis is down over 2 s: {used:?}"
    );
    // The members are still connected and served locally.
    for c in [&mut x, &mut y] {
        assert_eq!(c.request(json!({"command": "ping"}))["event"], "pong");
        assert_eq!(me(c).len(), 1);
    }
}

#[test]
fn redis_back_serves_again_within_5_s_without_any_client_action() {
    let mut redis = Redis::start_with(&["--appendonly", "yes", "--appendfsync", "always"]);
    let a = Node::spawn(&redis, &[]);
    let b = Node::spawn(&redis, &[]);
    let mut x = a.client(Some("x"));
    let mut y = b.client(Some("y"));
    saw_join(&mut x, "general", "y");
    assert_eq!(x.publish("general", "one")["id"], 1);
    assert_eq!(broadcasts_until(&mut y, "general", 1).len(), 1);
    redis.stop();
    assert_eq!(x.publish("general", "lost")["code"], "unavailable");
    redis.start_again();

    let ack = publish_until_acked(&mut x, "general", "two", T);
    assert_eq!(ack["id"], 2, "the refused ones took no id: {ack}");
    // x's own echo of 2 came before its ack (and was read with it): from here x sees 3.
    let got = broadcasts_until(&mut y, "general", 2);
    assert_eq!(ids_in(&got, "general"), [2], "{got:?}");
    let ack = publish_until_acked(&mut y, "general", "three", T);
    assert_eq!(ack["id"], 3);
    assert_eq!(
        ids_in(&broadcasts_until(&mut x, "general", 3), "general"),
        [3]
    );
    for n in [&a, &b] {
        eventually("/health 200 again", T, || {
            (n.health().0 == 200).then_some(())
        });
        assert_eq!(
            n.get_json("/api/members"),
            json!(["x", "y"]),
            "re-registered"
        );
    }
    // Names were claimed again; new members are welcome again.
    assert_eq!(b.upgrade_status("X"), 409);
    let mut z = b.client(Some("z"));
    saw_join(&mut x, "general", "z");
    assert_eq!(z.list(None), ["x", "y", "z"]);
}

/// After Redis lost everything: the next ids of rooms live nodes have seen continue above the
/// last one, members and names are registered again.
fn ids_survive_a_data_loss(lose: impl FnOnce(&mut Redis)) {
    // A short node timeout: the lost heartbeats must not make a node look dead either.
    let (mut redis, a, b) = two(&["--node-timeout", "1"]);
    let mut x = a.client(Some("x"));
    let mut y = b.client(Some("y"));
    saw_join(&mut x, "general", "y");
    join(&mut y, "b");
    for i in 1..=3 {
        assert_eq!(x.publish("general", &format!("m{i}"))["id"], i);
    }
    assert_eq!(
        ids_in(&broadcasts_until(&mut y, "general", 3), "general"),
        [1, 2, 3]
    );
    assert_eq!(y.publish("b", "b1")["id"], 1);

    lose(&mut redis);

    let ack = publish_until_acked(&mut x, "general", "after", T);
    let id = ack["id"].as_u64().unwrap();
    assert!(id > 3, "id {id} reused after the data loss");
    let got = broadcasts_until(&mut y, "general", id);
    assert_eq!(ids_in(&got, "general"), [id], "{got:?}");
    let ack = publish_until_acked(&mut y, "b", "b-after", T);
    assert!(ack["id"].as_u64().unwrap() > 1, "{ack}");
    // The nodes registered their members again.
    for n in [&a, &b] {
        eventually("members registered again", T, || {
            (n.get_json("/api/members") == json!(["x", "y"])).then_some(())
        });
    }
    eventually("x's name claimed again", T, || {
        (b.upgrade_status("x") == 409).then_some(())
    });
    // Longer than two node timeouts: nobody was taken for dead.
    let (mut seen_x, mut seen_y) = (x.collect_for(Duration::from_millis(2500)), y.sync());
    seen_x.extend(x.sync());
    seen_y.extend(y.collect_for(Duration::from_millis(200)));
    for (who, seen) in [("x", &seen_x), ("y", &seen_y)] {
        let left: Vec<&Value> = seen.iter().filter(|e| !e["left"].is_null()).collect();
        assert!(left.is_empty(), "{who} saw {left:?}");
    }
    for n in [&a, &b] {
        assert_eq!(n.get_json("/api/members"), json!(["x", "y"]));
    }
}

/// A Redis that answers but refuses writes (a full disk under its AOF answers `MISCONF`, a
/// full `maxmemory` answers `OOM`; the second is the one a test can cause): a broadcast is
/// refused as `unavailable` at once, not acked, not delivered and given no id; the nodes keep
/// their members, and once Redis takes writes again the room goes on at the next id.
#[test]
fn redis_refusing_writes_answers_unavailable_and_takes_no_id() {
    let (redis, mut a, b) = two(&FAST);
    let mut x = a.client(Some("x"));
    let mut y = b.client(Some("y"));
    saw_join(&mut x, "general", "y");
    assert_eq!(x.publish("general", "one")["id"], 1);
    assert_eq!(
        ids_in(&broadcasts_until(&mut y, "general", 1), "general"),
        [1]
    );
    assert_eq!(
        redis.cmd(&["CONFIG", "SET", "maxmemory-policy", "noeviction"]),
        "OK"
    );
    assert_eq!(redis.cmd(&["CONFIG", "SET", "maxmemory", "1"]), "OK");

    refused_in_time(&mut x, "refused");
    refused_in_time(&mut y, "refused too");
    // A flood of refused broadcasts is refused one by one, and logged once.
    for i in 0..50 {
        let ev = x.publish("general", &format!("flood {i}"));
        assert_eq!(ev["code"], "unavailable", "{ev}");
    }
    // Nothing refused reached anyone; both stay connected and listed.
    for c in [&mut x, &mut y] {
        let seen = c.sync();
        assert!(
            !seen
                .iter()
                .any(|e| e["event"] == "broadcast" && e["member"] != "system"),
            "{seen:?}"
        );
    }
    assert_eq!(x.list(None), ["x", "y"]);
    // A refusal that outlasts a heartbeat: the nodes take Redis as unavailable, as when it is
    // gone (503 on /health and upgrades), and keep their members.
    for n in [&a, &b] {
        eventually(
            "/health 503 while Redis refuses writes",
            Duration::from_secs(3),
            || (n.health().0 == 503).then_some(()),
        );
        assert_eq!(n.upgrade_status("newcomer"), 503);
    }
    let log = a.log_text();
    for (line, times) in [
        ("cluster: Redis refuses calls (", 1),
        (
            "cluster: Redis is unavailable: Redis refused a call: \"OOM\"",
            1,
        ),
        ("could not be published", 0),
    ] {
        assert_eq!(log.matches(line).count(), times, "{line}: {log}");
    }

    assert_eq!(redis.cmd(&["CONFIG", "SET", "maxmemory", "0"]), "OK");
    let ack = publish_until_acked(&mut x, "general", "two", T);
    assert_eq!(ack["id"], 2, "the refused ones took no id: {ack}");
    let got = broadcasts_until(&mut y, "general", 2);
    assert_eq!(ids_in(&got, "general"), [2], "{got:?}");
    let stored: Vec<_> = redis
        .history("general")
        .iter()
        .map(|m| m["id"].clone())
        .collect();
    assert_eq!(stored, [json!(1), json!(2)]);
    for n in [&a, &b] {
        assert_eq!(n.get_json("/api/members"), json!(["x", "y"]));
    }
    // Down at a heartbeat, back like after any outage; the end of the refusal logged once.
    a.wait_log("cluster: connected to Redis; registering 1 members");
    let log = a.log_text();
    assert_eq!(
        log.matches("cluster: Redis takes calls again (").count(),
        1,
        "{log}"
    );
}

#[test]
fn redis_flushall_never_lets_an_id_be_reused() {
    ids_survive_a_data_loss(|r| r.flushall());
}

#[test]
fn redis_restarted_without_its_data_never_lets_an_id_be_reused() {
    // Redis::start keeps no files: a restart comes back empty.
    ids_survive_a_data_loss(|r| {
        r.stop();
        r.start_again();
    });
}

#[test]
fn a_killed_pubsub_connection_during_traffic_leaves_no_gap_or_duplicate() {
    let (redis, a, b) = two(&FAST);
    let mut x = a.client(Some("x"));
    let mut y = b.client(Some("y"));
    saw_join(&mut x, "general", "y");
    let mut z = a.client(Some("z"));
    saw_join(&mut y, "general", "z");
    let total = 300u64;
    let mut killed = 0;
    for i in 1..total {
        x.send(json!({"command": "broadcast", "message": format!("t{i}")}));
        if i % 60 == 0 {
            killed += redis.client_kill_pubsub();
        }
        thread::sleep(Duration::from_millis(2));
    }
    assert!(killed >= 2, "subscriptions killed: {killed}");
    let (ack, before) = x.request_keeping(json!({"command": "broadcast", "message": "last"}));
    assert_eq!(ack["event"], "ack", "{ack}");
    // A broadcast refused while the subscription is made again takes no id; none may be lost.
    let refused = before.iter().filter(|e| e["event"] == "error").count() as u64;
    assert!(refused < total / 2, "{refused} of {total} refused");
    let total = ack["id"].as_u64().unwrap();
    assert_eq!(total + refused, 300, "every broadcast acked or refused");
    let want: Vec<u64> = (1..=total).collect();
    for (who, c) in [("y", &mut y), ("z", &mut z)] {
        let got = broadcasts_until(c, "general", total);
        assert_eq!(ids_in(&got, "general"), want, "{who}");
        let later = c.collect_for(Duration::from_millis(300));
        assert_eq!(
            ids_in(&later, "general"),
            Vec::<u64>::new(),
            "{who}: repeats"
        );
    }
}

// ------------------------------------------------------------------------------------------
// Settings and process shapes
// ------------------------------------------------------------------------------------------

#[test]
fn redis_with_an_explicit_db_path_is_refused_with_exit_2() {
    let dir = temp_dir("refused");
    for db in ["x.db", ":memory:"] {
        let child = Command::new(env!("CARGO_BIN_EXE_chatterbox"))
            .args([
                "--redis",
                "redis://127.0.0.1:1",
                "--port",
                "0",
                "--db-path",
                db,
            ])
            .current_dir(&dir)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let pid = child.id();
        let waiter = thread::spawn(move || child.wait_with_output().unwrap());
        let deadline = Instant::now() + Duration::from_secs(10);
        while !waiter.is_finished() {
            if Instant::now() > deadline {
                // SAFETY: the child we spawned; still unreaped (wait_with_output runs).
                unsafe { libc::kill(pid as libc::pid_t, libc::SIGKILL) };
                panic!("--redis with --db-path {db} started");
            }
            thread::sleep(Duration::from_millis(20));
        }
        let out = waiter.join().unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{db}: {err}");
        assert!(
            err.contains("--redis") && err.contains("--db-path"),
            "{err}"
        );
    }
    assert!(!dir.join("x.db").exists(), "no database file made");
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn two_nodes_share_one_port_with_reuse_port() {
    let redis = Redis::start();
    let port = free_port();
    let args = ["--reuse-port", "true"];
    let a = Node::spawn_on(&redis.url(), port, &args);
    let b = Node::spawn_on(&redis.url(), port, &args);
    assert_eq!((a.addr.port(), b.addr.port()), (port, port));
    // The second node may not be registered yet when the first answers on the port.
    let clients: Vec<Client> = (0..16)
        .map(|i| {
            eventually(&format!("c{i} let in"), T, || {
                common::cluster::connect(a.addr, Some(&format!("c{i}"))).ok()
            })
        })
        .collect();
    let on = |n: &Node| {
        (0..16)
            .filter(|i| n.log_text().contains(&format!("Member c{i} connected")))
            .count()
    };
    let (on_a, on_b) = (on(&a), on(&b));
    assert_eq!(on_a + on_b, 16, "each member on one node");
    assert!(
        on_a > 0 && on_b > 0,
        "the kernel spread them: {on_a} + {on_b}"
    );
    let mut want: Vec<String> = (0..16).map(|i| format!("c{i}")).collect();
    want.sort();
    for n in [&a, &b] {
        eventually("every member on every node", T, || {
            let mut got = names(&n.get_json("/api/members"));
            got.sort();
            (got == want).then_some(())
        });
    }
    drop(clients);
}

// ------------------------------------------------------------------------------------------
// The harness itself
// ------------------------------------------------------------------------------------------

#[test]
fn the_harness_redis_keeps_data_with_appendonly_and_loses_it_with_flushall() {
    use std::io::{Read, Write};
    let mut redis = Redis::start_with(&["--appendonly", "yes", "--appendfsync", "always"]);
    assert_eq!(redis.cmd(&["SET", "k", "v"]), "OK");
    let stored = r#"{"id":1,"member":"x","message":"hi","ts":1}"#;
    assert_eq!(redis.cmd(&["ZADD", "cb:h:general", "1", stored]), "1");
    redis.stop();
    assert!(!redis.ping(), "stopped");
    redis.start_again();
    assert_eq!(redis.cmd(&["GET", "k"]), "v", "kept across the restart");
    assert_eq!(redis.history("general")[0]["message"], "hi");
    // One subscriber, killed.
    let mut sub = std::net::TcpStream::connect(("127.0.0.1", redis.port())).unwrap();
    sub.set_read_timeout(Some(T)).unwrap();
    sub.write_all(b"*2\r\n$9\r\nSUBSCRIBE\r\n$5\r\ncb:ev\r\n")
        .unwrap();
    let mut buf = [0u8; 64];
    assert!(sub.read(&mut buf).unwrap() > 0, "subscribed");
    assert_eq!(redis.client_kill_pubsub(), 1);
    assert_eq!(
        sub.read(&mut buf).unwrap_or(0),
        0,
        "the subscription is closed"
    );
    redis.flushall();
    assert_eq!(redis.cmd(&["GET", "k"]), "", "gone");
    assert!(redis.history("general").is_empty());
    redis.kill();
    assert!(!redis.ping(), "killed");
}

#[test]
fn the_harness_node_serves_logs_and_exits_0_on_sigterm() {
    let redis = Redis::start();
    let mut n = Node::spawn(&redis, &[]);
    assert_eq!(n.health().0, 200);
    let mut x = n.client(Some("x"));
    assert_eq!(me(&mut x), "x");
    n.wait_log("Member x connected");
    assert!(n.running());
    assert_eq!(n.sigterm(), Some(0));
    assert!(!n.running());
    let mut m = Node::spawn(&redis, &[]);
    m.kill9();
    assert!(!m.running());
}
