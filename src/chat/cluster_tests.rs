//! The core in cluster mode, without Redis: two or three cores share a `FakeRedis` that keeps
//! the same state as the Redis functions (names, members, counters, history, dedup) and
//! hands every node the events the subscription would. What these tests pin is the core's
//! side: remote members in the tables, notices once per member, acks after the publish,
//! cross-node direct, refusals while Redis is away.

use std::cell::RefCell;
use std::collections::{HashMap, VecDeque};
use std::rc::Rc;
use std::time::Instant;

use serde_json::{Value, json};

use super::*;
use crate::cluster::{Call, Event as CEvent, MemberRecord, Presence};
use crate::store::engine::{Engine, Reply, Request};
use crate::store::{Page, Query, StoredMessage};

#[derive(Default)]
struct FakeRedis {
    /// Per node, what it will poll next.
    queues: HashMap<String, VecDeque<Reply>>,
    names: HashMap<String, (String, u64)>,
    members: HashMap<(String, u64), MemberRecord>,
    counters: HashMap<String, u64>,
    history: HashMap<String, Vec<String>>,
    dedup: HashMap<(String, String), u64>,
    autoname: u64,
    /// Nodes cut off from Redis: their calls fail.
    down: Vec<String>,
    /// The publisher hears its answer before the subscription brings the message (two
    /// connections: either may come first).
    answer_first: bool,
}

impl FakeRedis {
    fn tell(&mut self, node: &str, r: Reply) {
        self.queues
            .entry(node.to_string())
            .or_default()
            .push_back(r);
    }
    fn tell_others(&mut self, from: &str, p: Presence) {
        let nodes: Vec<String> = self.queues.keys().filter(|n| *n != from).cloned().collect();
        for n in nodes {
            self.tell(&n, Reply::Cluster(CEvent::Presence(p.clone())));
        }
    }
    fn tell_all(&mut self, e: CEvent) {
        let nodes: Vec<String> = self.queues.keys().cloned().collect();
        for n in nodes {
            self.tell(&n, Reply::Cluster(e.clone()));
        }
    }
    /// What the reap function does for a dead node.
    fn reap(&mut self, dead: &str) {
        let gone: Vec<(String, u64)> = self
            .members
            .keys()
            .filter(|(n, _)| n == dead)
            .cloned()
            .collect();
        for key in gone {
            let m = self.members.remove(&key).unwrap();
            self.names.remove(&m.name.to_ascii_lowercase());
            self.tell_others(
                dead,
                Presence::Disconnected {
                    node: key.0,
                    conn: key.1,
                },
            );
        }
        self.queues.remove(dead);
    }
}

struct FakeEngine {
    node: String,
    redis: Rc<RefCell<FakeRedis>>,
}

impl Engine for FakeEngine {
    fn request(&mut self, req: Request) {
        let mut r = self.redis.borrow_mut();
        let node = self.node.clone();
        let down = r.down.contains(&node);
        match req {
            Request::Page { token, room, query } => {
                if down {
                    r.tell(
                        &node,
                        Reply::Unavailable {
                            token,
                            room,
                            error: crate::store::StoreError("down".into()),
                        },
                    );
                    return;
                }
                let all: Vec<StoredMessage> = r
                    .history
                    .get(&room)
                    .into_iter()
                    .flatten()
                    .map(|j| {
                        let v: Value = serde_json::from_str(j).unwrap();
                        StoredMessage {
                            id: v["id"].as_u64().unwrap(),
                            member: v["member"].as_str().unwrap().into(),
                            message: v["message"].as_str().unwrap().into(),
                            ts: v["ts"].as_u64().unwrap(),
                            data: None,
                        }
                    })
                    .collect();
                let messages = match query {
                    Query::Before { limit, .. } => all[all.len().saturating_sub(limit)..].to_vec(),
                    Query::After { after, limit } => all
                        .into_iter()
                        .filter(|m| m.id > after)
                        .take(limit)
                        .collect(),
                };
                let page = Page {
                    messages,
                    more: false,
                };
                r.tell(&node, Reply::PageReady { token, room, page });
            }
            Request::LastId { token, room } => {
                let last_id = r.counters.get(&room).copied().unwrap_or(0);
                r.tell(
                    &node,
                    Reply::LastId {
                        token,
                        room,
                        last_id,
                    },
                );
            }
            Request::Reserve { token, room, .. } => r.tell(
                &node,
                Reply::IdsReserved {
                    token,
                    room,
                    up_to: u64::MAX,
                },
            ),
            Request::Append { .. } => panic!("cluster mode never appends"),
            #[cfg(feature = "server-api")]
            Request::Remove { .. } => {}
            Request::Cluster(call) => {
                if down {
                    if let Call::Publish { token, .. } | Call::Connect { token, .. } = call {
                        let error = crate::store::StoreError("down".into());
                        r.tell(&node, Reply::Cluster(CEvent::Failed { token, error }));
                    }
                    return;
                }
                fake_call(&mut r, &node, call);
            }
        }
    }
    fn poll(&mut self) -> Option<Reply> {
        let mut r = self.redis.borrow_mut();
        r.queues.get_mut(&self.node)?.pop_front()
    }
    fn writable(&self) -> bool {
        true
    }
    fn flush(&mut self) {}
    fn close(&mut self, _deadline: Instant) -> u64 {
        0
    }
}

fn fake_call(r: &mut FakeRedis, node: &str, call: Call) {
    match call {
        Call::Register { members } => {
            for m in members {
                r.names
                    .insert(m.name.to_ascii_lowercase(), (m.node.clone(), m.conn));
                let known = r.members.insert((m.node.clone(), m.conn), m.clone());
                // Like cb_register: what others did not know of is published.
                if known.is_none() {
                    let (node, conn) = (m.node.clone(), m.conn);
                    let rooms = m.rooms.clone();
                    r.tell_others(
                        &node,
                        Presence::Connected(MemberRecord { rooms: vec![], ..m }),
                    );
                    for room in rooms {
                        let (node, conn) = (node.clone(), conn);
                        r.tell_others(&node.clone(), Presence::Joined { node, conn, room });
                    }
                }
            }
            r.tell(node, Reply::Cluster(CEvent::Registered { taken: vec![] }));
            let others = r
                .members
                .values()
                .filter(|m| m.node != node)
                .cloned()
                .collect();
            r.tell(node, Reply::Cluster(CEvent::Snapshot { members: others }));
        }
        Call::Connect { token, member } => {
            let lower = member.name.to_ascii_lowercase();
            let ok = r
                .names
                .get(&lower)
                .is_none_or(|h| *h == (member.node.clone(), member.conn));
            if ok {
                r.names.insert(lower, (member.node.clone(), member.conn));
                r.members
                    .insert((member.node.clone(), member.conn), member.clone());
                r.tell_others(node, Presence::Connected(member));
            }
            r.tell(node, Reply::Cluster(CEvent::Connected { token, ok }));
        }
        Call::Disconnect { conn } => {
            if let Some(m) = r.members.remove(&(node.to_string(), conn)) {
                r.names.remove(&m.name.to_ascii_lowercase());
                r.tell_others(
                    node,
                    Presence::Disconnected {
                        node: node.into(),
                        conn,
                    },
                );
            }
        }
        Call::Join { conn, room } => {
            if let Some(m) = r.members.get_mut(&(node.to_string(), conn)) {
                m.rooms.push(room.clone());
                r.tell_others(
                    node,
                    Presence::Joined {
                        node: node.into(),
                        conn,
                        room,
                    },
                );
            }
        }
        Call::Leave { conn, room } => {
            if let Some(m) = r.members.get_mut(&(node.to_string(), conn)) {
                m.rooms.retain(|x| *x != room);
                r.tell_others(
                    node,
                    Presence::Left {
                        node: node.into(),
                        conn,
                        room,
                    },
                );
            }
        }
        Call::Publish {
            token,
            room,
            msg_id,
            body,
            conn,
            serial,
            echo,
            ..
        } => {
            if let Some(first) = msg_id
                .as_ref()
                .and_then(|k| r.dedup.get(&(room.clone(), k.clone())))
            {
                let id = *first;
                r.tell(
                    node,
                    Reply::Cluster(CEvent::Published {
                        token,
                        room,
                        id,
                        repeat: true,
                    }),
                );
                return;
            }
            let id = {
                let c = r.counters.entry(room.clone()).or_default();
                *c += 1;
                *c
            };
            if let Some(k) = msg_id {
                r.dedup.insert((room.clone(), k), id);
            }
            r.history
                .entry(room.clone())
                .or_default()
                .push(format!(r#"{{"id":{id}{body}"#));
            let answer = Reply::Cluster(CEvent::Published {
                token,
                room: room.clone(),
                id,
                repeat: false,
            });
            if r.answer_first {
                r.tell(node, answer.clone());
            }
            r.tell_all(CEvent::Message {
                room: room.clone(),
                id,
                node: node.into(),
                conn,
                serial,
                echo,
                body,
            });
            if !r.answer_first {
                r.tell(node, answer);
            }
        }
        Call::Direct {
            node: to,
            conn,
            json,
        } => r.tell(&to, Reply::Cluster(CEvent::DirectIn { conn, json })),
        Call::NameBlock { count } => {
            let first = r.autoname + 1;
            r.autoname += count;
            r.tell(node, Reply::Cluster(CEvent::Names { first, count }));
        }
    }
}

struct Node {
    chat: Chat,
    out: Recorder,
}

struct Cluster {
    redis: Rc<RefCell<FakeRedis>>,
    nodes: Vec<Node>,
    now: Now,
}

impl Cluster {
    fn new(n: usize) -> Cluster {
        let redis = Rc::new(RefCell::new(FakeRedis::default()));
        let mut nodes = Vec::new();
        for i in 0..n {
            let name = format!("node{i}");
            redis
                .borrow_mut()
                .tell(&name, Reply::Cluster(CEvent::Reconnected));
            let engine = FakeEngine {
                node: name.clone(),
                redis: redis.clone(),
            };
            let chat = Chat::new_cluster_node(
                Config::default(),
                Box::new(engine),
                counted_ids(),
                name,
                Instant::now(),
            );
            nodes.push(Node {
                chat,
                out: Recorder::default(),
            });
        }
        let mut c = Cluster {
            redis,
            nodes,
            now: Now {
                mono: Instant::now(),
                unix_ms: 1_700_000_000_000,
            },
        };
        c.pump();
        c
    }
    /// Lets every node apply what Redis told it, until nothing moves.
    fn pump(&mut self) {
        for _ in 0..10 {
            for n in &mut self.nodes {
                n.chat.handle_engine(&mut n.out);
            }
        }
    }
    fn connect(&mut self, node: usize, conn: ConnId, name: Option<&str>) {
        self.now.unix_ms += 1;
        let n = &mut self.nodes[node];
        n.chat.connect(self.now, conn, name, None, &mut n.out);
        self.pump();
    }
    fn send(&mut self, node: usize, conn: ConnId, cmd: Value) {
        let n = &mut self.nodes[node];
        n.chat
            .handle_text(self.now, conn, &cmd.to_string(), &mut n.out);
        self.pump();
    }
    fn tick(&mut self, node: usize, at: Instant) {
        let n = &mut self.nodes[node];
        n.chat.cluster_tick(at, &mut n.out);
        self.pump();
    }
    fn events(&mut self, node: usize, conn: ConnId) -> Vec<Value> {
        self.nodes[node].out.take(conn)
    }
    fn named(&mut self, node: usize, conn: ConnId, event: &str) -> Vec<Value> {
        self.nodes[node].out.events(conn, event)
    }
}

#[test]
fn members_of_both_nodes_are_in_one_list_and_hear_each_other_join() {
    let mut c = Cluster::new(2);
    c.connect(0, 1, Some("alice"));
    c.events(0, 1);
    c.connect(1, 1, Some("bob"));
    let heard = c.named(0, 1, "broadcast");
    assert_eq!(
        heard,
        vec![
            json!({"event":"broadcast","room":"general","member":"system",
                    "message":"bob has joined!","joined":"bob"})
        ],
        "alice, on the other node, hears bob join exactly once"
    );
    for node in 0..2 {
        c.send(node, 1, json!({"command":"list"}));
        let list = c.named(node, 1, "list");
        assert_eq!(list[0]["members"], json!(["alice", "bob"]), "node {node}");
        c.send(node, 1, json!({"command":"rooms"}));
        let rooms = c.named(node, 1, "rooms");
        assert_eq!(
            rooms[0]["rooms"],
            json!([{"name":"general","members":2}]),
            "node {node}"
        );
    }
    assert_eq!(c.nodes[0].chat.member_names(), vec!["alice", "bob"]);
}

#[test]
fn a_broadcast_is_numbered_once_and_reaches_both_nodes_acked_after_redis() {
    let mut c = Cluster::new(2);
    c.connect(0, 1, Some("alice"));
    c.connect(1, 7, Some("bob"));
    c.events(0, 1);
    c.events(1, 7);
    c.send(
        0,
        1,
        json!({"command":"broadcast","message":"hi","request_id":"r1"}),
    );
    c.send(1, 7, json!({"command":"broadcast","message":"yo"}));
    let a = c.events(0, 1);
    let b = c.events(1, 7);
    let ids = |v: &[Value]| -> Vec<(u64, String)> {
        v.iter()
            .filter(|e| e["event"] == "broadcast" && e["id"].is_u64())
            .map(|e| {
                (
                    e["id"].as_u64().unwrap(),
                    e["message"].as_str().unwrap().to_string(),
                )
            })
            .collect()
    };
    assert_eq!(ids(&a), vec![(1, "hi".into()), (2, "yo".into())]);
    assert_eq!(ids(&a), ids(&b), "one order on both nodes");
    assert!(
        a.contains(&json!({"event":"ack","request_id":"r1","room":"general","id":1})),
        "{a:?}"
    );
    assert!(
        !a.iter().any(|e| e["event"] == "system"),
        "bob is on the other node: alice is not alone"
    );
    assert_eq!(c.redis.borrow().history["general"].len(), 2);
}

#[test]
fn echo_false_a_resend_and_the_alone_notice_count_the_whole_cluster() {
    let mut c = Cluster::new(2);
    c.connect(0, 1, Some("alice"));
    c.connect(1, 1, Some("bob"));
    c.send(0, 1, json!({"command":"join","room":"lonely"}));
    c.events(0, 1);
    c.events(1, 1);
    let msg =
        json!({"command":"broadcast","message":"x","echo":false,"msg_id":"m1","request_id":"a"});
    c.send(0, 1, msg.clone());
    // The same msg_id through the other node's member is a resend only for the same room;
    // from this node again it is answered with the first id and not delivered.
    c.send(0, 1, msg);
    let a = c.events(0, 1);
    assert!(
        !a.iter().any(|e| e["event"] == "broadcast"),
        "echo:false: {a:?}"
    );
    let acks: Vec<_> = a.iter().filter(|e| e["event"] == "ack").collect();
    assert_eq!(acks.len(), 2);
    assert!(acks.iter().all(|e| e["id"] == 1), "{acks:?}");
    let b = c.named(1, 1, "broadcast");
    assert_eq!(b.len(), 1, "delivered once: {b:?}");
    c.send(
        0,
        1,
        json!({"command":"broadcast","message":"echo?","room":"lonely"}),
    );
    let a = c.named(0, 1, "system");
    assert_eq!(a.len(), 1, "alone in 'lonely' on every node");
}

#[test]
fn a_direct_message_reaches_a_member_of_another_node() {
    let mut c = Cluster::new(2);
    c.connect(0, 1, Some("alice"));
    c.connect(1, 4, Some("bob"));
    c.send(
        0,
        1,
        json!({"command":"direct","to":"BOB","message":"psst"}),
    );
    let b = c.named(1, 4, "direct");
    assert_eq!(b.len(), 1);
    assert_eq!(
        (b[0]["from"].as_str(), b[0]["message"].as_str()),
        (Some("alice"), Some("psst"))
    );
    assert_eq!(c.named(0, 1, "direct").len(), 1, "the sender's copy");
}

#[test]
fn names_are_unique_across_nodes_and_auto_names_do_not_collide() {
    let mut c = Cluster::new(2);
    c.connect(0, 1, Some("Alice"));
    assert_eq!(
        c.nodes[1].chat.check_name("alice").unwrap_err().status,
        409,
        "taken on the other node, ignoring case"
    );
    c.connect(0, 2, None);
    c.connect(1, 2, None);
    c.connect(1, 3, None);
    let names = c.nodes[0].chat.member_names();
    let mut unique = names.clone();
    unique.sort_unstable();
    unique.dedup();
    assert_eq!(names.len(), 4);
    assert_eq!(unique.len(), 4, "{names:?}");
}

#[test]
fn a_claim_lost_to_another_node_closes_with_4009() {
    let mut c = Cluster::new(2);
    // Both nodes take "eve" before either hears of the other.
    let now = c.now;
    let (n0, n1) = c.nodes.split_at_mut(1);
    n0[0]
        .chat
        .connect(now, 1, Some("eve"), None, &mut n0[0].out);
    n1[0]
        .chat
        .connect(now, 1, Some("eve"), None, &mut n1[0].out);
    c.pump();
    assert_eq!(
        c.nodes[1].out.closed,
        vec![(1, 4009, "name taken".to_string())]
    );
    assert!(c.nodes[0].out.closed.is_empty());
    assert_eq!(c.nodes[0].chat.member_names(), vec!["eve"]);
    assert_eq!(
        c.nodes[1].chat.member_names(),
        vec!["eve"],
        "the winner, seen remotely"
    );
}

#[test]
fn a_dead_node_s_members_leave_once_per_surviving_member() {
    let mut c = Cluster::new(3);
    c.connect(0, 1, Some("a"));
    c.connect(1, 1, Some("b"));
    c.connect(2, 1, Some("doomed"));
    c.send(2, 1, json!({"command":"join","room":"side"}));
    c.send(0, 1, json!({"command":"join","room":"side"}));
    c.events(0, 1);
    c.events(1, 1);
    c.redis.borrow_mut().reap("node2");
    c.nodes.pop();
    c.pump();
    let a: Vec<Value> = c
        .named(0, 1, "broadcast")
        .into_iter()
        .filter(|e| e["left"] == "doomed")
        .collect();
    assert_eq!(a.len(), 2, "one notice per room a shared with it: {a:?}");
    let b: Vec<Value> = c
        .named(1, 1, "broadcast")
        .into_iter()
        .filter(|e| e["left"] == "doomed")
        .collect();
    assert_eq!(b.len(), 1, "b was only in general with it");
    assert_eq!(c.nodes[0].chat.member_names(), vec!["a", "b"]);
    assert!(
        c.nodes[1].chat.check_name("doomed").is_ok(),
        "its name is free"
    );
}

#[test]
fn while_redis_is_away_broadcasts_get_unavailable_and_upgrades_503() {
    let mut c = Cluster::new(2);
    c.connect(0, 1, Some("a"));
    c.events(0, 1);
    c.redis.borrow_mut().down.push("node0".into());
    c.send(
        0,
        1,
        json!({"command":"broadcast","message":"lost?","request_id":"q"}),
    );
    let e = c.named(0, 1, "error");
    assert_eq!(e[0]["code"], "unavailable");
    assert_eq!(e[0]["request_id"], "q");
    // The engine tells the core it lost Redis.
    c.redis.borrow_mut().tell(
        "node0",
        Reply::Cluster(CEvent::Down {
            reason: "refused".into(),
        }),
    );
    c.pump();
    assert_eq!(c.nodes[0].chat.cluster_refusal(false).unwrap().status, 503);
    assert!(!c.nodes[0].chat.store_available(), "/health is 503");
    c.send(0, 1, json!({"command":"broadcast","message":"again"}));
    assert_eq!(c.named(0, 1, "error")[0]["code"], "unavailable");
    c.send(0, 1, json!({"command":"list"}));
    assert_eq!(
        c.named(0, 1, "list").len(),
        1,
        "what is local still answers"
    );
    // Back: the node registers its members again and serves.
    c.redis.borrow_mut().down.clear();
    c.redis
        .borrow_mut()
        .tell("node0", Reply::Cluster(CEvent::Reconnected));
    c.pump();
    assert!(c.nodes[0].chat.cluster_refusal(false).is_none());
    c.send(
        0,
        1,
        json!({"command":"broadcast","message":"back","request_id":"z"}),
    );
    let a = c.named(0, 1, "ack");
    assert_eq!(a[0]["id"], 1);
}

#[test]
fn history_comes_from_the_shared_store_on_either_node() {
    let mut c = Cluster::new(2);
    c.connect(0, 1, Some("a"));
    for i in 0..3 {
        c.send(
            0,
            1,
            json!({"command":"broadcast","message":format!("m{i}")}),
        );
    }
    c.connect(1, 1, Some("late"));
    let h = c.named(1, 1, "history");
    let ids: Vec<u64> = h[0]["messages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["id"].as_u64().unwrap())
        .collect();
    assert_eq!(ids, vec![1, 2, 3]);
    c.send(0, 1, json!({"command":"join","room":"later"}));
    c.send(
        0,
        1,
        json!({"command":"broadcast","room":"later","message":"4"}),
    );
    c.send(1, 1, json!({"command":"join","room":"later","since":0}));
    let h = c.named(1, 1, "history");
    assert_eq!(h[0]["room"], "later");
    assert_eq!(h[0]["messages"][0]["message"], "4");
    assert_eq!(h[0]["messages"][0]["id"], 1, "ids are per room");
}

/// Redis lost everything: each node hears `Reconnected` and registers again, one after the
/// other.
fn lose_redis_data(c: &mut Cluster) {
    let mut r = c.redis.borrow_mut();
    let queues = std::mem::take(&mut r.queues);
    *r = FakeRedis::default();
    r.queues = queues.into_keys().map(|k| (k, VecDeque::new())).collect();
}

#[test]
fn after_a_data_loss_members_of_a_node_not_yet_registered_do_not_flap() {
    let mut c = Cluster::new(2);
    c.connect(0, 1, Some("alice"));
    c.connect(1, 1, Some("bob"));
    c.events(0, 1);
    lose_redis_data(&mut c);
    c.redis
        .borrow_mut()
        .tell("node0", Reply::Cluster(CEvent::Reconnected));
    c.pump();
    let t0 = Instant::now();
    c.tick(0, t0);
    assert_eq!(
        c.nodes[0].chat.member_names(),
        vec!["alice", "bob"],
        "kept for now"
    );
    c.redis
        .borrow_mut()
        .tell("node1", Reply::Cluster(CEvent::Reconnected));
    c.pump();
    let later = t0 + Config::default().node_timeout * 2;
    c.tick(0, later);
    assert_eq!(c.nodes[0].chat.member_names(), vec!["alice", "bob"]);
    assert_eq!(c.nodes[0].chat.cluster_deadline(), None);
    assert!(
        c.named(0, 1, "broadcast").is_empty(),
        "no has-left / has-joined flapping for bob"
    );
}

#[test]
fn after_a_data_loss_a_node_that_never_comes_back_leaves_after_a_node_timeout() {
    let mut c = Cluster::new(2);
    c.connect(0, 1, Some("alice"));
    c.connect(1, 1, Some("bob"));
    c.events(0, 1);
    lose_redis_data(&mut c);
    c.nodes.pop();
    c.redis.borrow_mut().queues.remove("node1");
    c.redis
        .borrow_mut()
        .tell("node0", Reply::Cluster(CEvent::Reconnected));
    c.pump();
    let t0 = Instant::now();
    c.tick(0, t0);
    let deadline = c.nodes[0].chat.cluster_deadline().expect("bob's deadline");
    assert_eq!(deadline, t0 + Config::default().node_timeout);
    c.tick(0, deadline);
    assert_eq!(c.nodes[0].chat.member_names(), vec!["alice"]);
    let left: Vec<Value> = c
        .named(0, 1, "broadcast")
        .into_iter()
        .filter(|e| e["left"] == "bob")
        .collect();
    assert_eq!(left.len(), 1);
    assert!(c.nodes[0].chat.check_name("bob").is_ok());
}

#[test]
fn the_sender_gets_its_echo_before_its_ack_whichever_redis_answers_first() {
    let mut c = Cluster::new(2);
    c.redis.borrow_mut().answer_first = true;
    c.connect(0, 1, Some("alice"));
    c.events(0, 1);
    let n = &mut c.nodes[0];
    let cmd = json!({"command":"broadcast","message":"hi","request_id":"r"}).to_string();
    n.chat.handle_text(c.now, 1, &cmd, &mut n.out);
    // Answered by Redis, the message not yet delivered: the connection still waits.
    n.chat.handle_engine(&mut n.out);
    let got: Vec<String> = c
        .events(0, 1)
        .iter()
        .map(|e| e["event"].as_str().unwrap_or_default().to_string())
        .collect();
    assert_eq!(
        got,
        ["broadcast", "system", "ack"],
        "echo first, then the answers"
    );
    assert!(!c.nodes[0].chat.is_waiting(1));
}

#[test]
fn a_direct_for_a_member_gone_is_not_given_to_whoever_took_its_connection() {
    let mut c = Cluster::new(2);
    c.connect(0, 1, Some("alice"));
    c.connect(1, 4, Some("bob"));
    // Node 0 still thinks bob is on node 1's connection 4; carol has it now.
    let json =
        json!({"event":"direct","from":"alice","to":"bob","message":"for bob","ts":1}).to_string();
    let n = &mut c.nodes[1];
    n.chat.disconnect(4, &mut n.out);
    n.chat.connect(c.now, 4, Some("carol"), None, &mut n.out);
    c.nodes[1].out.take(4);
    c.redis
        .borrow_mut()
        .tell("node1", Reply::Cluster(CEvent::DirectIn { conn: 4, json }));
    c.pump();
    assert!(
        c.named(1, 4, "direct").is_empty(),
        "carol must not read bob's direct"
    );
}

#[test]
fn a_room_lists_its_members_in_one_order_on_every_node() {
    let mut c = Cluster::new(2);
    // Both connect before either node hears of the other: each node saw its own join first.
    let early = c.now;
    let later = Now {
        unix_ms: early.unix_ms + 5,
        ..early
    };
    let (n0, n1) = c.nodes.split_at_mut(1);
    n0[0]
        .chat
        .connect(early, 1, Some("alice"), None, &mut n0[0].out);
    n1[0]
        .chat
        .connect(later, 1, Some("bob"), None, &mut n1[0].out);
    c.pump();
    for node in 0..2 {
        c.send(node, 1, json!({"command":"list","room":"general"}));
        let list = c.named(node, 1, "list");
        assert_eq!(list[0]["members"], json!(["alice", "bob"]), "node {node}");
        let (names, _) = c.nodes[node].chat.room_detail("general").unwrap();
        assert_eq!(names, ["alice", "bob"], "node {node}");
    }
}
