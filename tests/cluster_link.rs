//! The Redis side of cluster mode against a real `redis-server`: two (or three) cluster
//! engines in this process, driven from the test thread as the loop would drive them.
#![cfg(feature = "cluster")]

use std::net::TcpListener;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use chatterbox::cluster::{Call, ClusterEngine, Event, MemberRecord, Presence};
use chatterbox::config::Config;
use chatterbox::store::Query;
use chatterbox::store::engine::{Engine, Reply, Request};

/// A `redis-server` of this test, killed on drop.
struct Redis {
    child: Option<Child>,
    port: u16,
    dir: PathBuf,
}

impl Redis {
    fn start() -> Redis {
        let port = TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let dir = std::env::temp_dir().join(format!("cb-redis-{}-{port}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let mut r = Redis {
            child: None,
            port,
            dir,
        };
        r.restart();
        r
    }

    /// Starts it (again) on the same port; `--save ''`: a restart loses the data.
    fn restart(&mut self) {
        self.kill();
        let child = Command::new("redis-server")
            .args(["--port", &self.port.to_string(), "--bind", "127.0.0.1"])
            .args(["--save", "", "--appendonly", "no"])
            .arg("--unixsocket")
            .arg(self.dir.join("redis.sock"))
            .arg("--dir")
            .arg(&self.dir)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("redis-server is installed");
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(10);
        while redis::Client::open(self.url())
            .unwrap()
            .get_connection_with_timeout(Duration::from_millis(200))
            .is_err()
        {
            assert!(Instant::now() < deadline, "redis-server did not start");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    fn unix_url(&self) -> String {
        format!("unix://{}", self.dir.join("redis.sock").display())
    }

    fn con(&self) -> redis::Connection {
        redis::Client::open(self.url())
            .unwrap()
            .get_connection_with_timeout(Duration::from_secs(2))
            .unwrap()
    }
}

impl Drop for Redis {
    fn drop(&mut self) {
        self.kill();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn config(url: &str) -> Config {
    Config {
        redis: url.to_owned(),
        node_timeout: Duration::from_secs(1),
        redis_timeout: Duration::from_millis(500),
        ..Config::default()
    }
}

/// One node: its engine and every reply it gave, in order.
struct Node {
    e: ClusterEngine,
    seen: Vec<Reply>,
}

impl Node {
    fn open(url: &str) -> Node {
        let cfg = config(url);
        let e = ClusterEngine::open(&cfg, ClusterEngine::new_node_id(), Box::new(|| {}))
            .expect("opens");
        let mut n = Node {
            e,
            seen: Vec::new(),
        };
        n.register(vec![]);
        n
    }

    fn id(&self) -> String {
        self.e.node().to_owned()
    }

    /// Waits for `Reconnected`, registers `members`, waits for `Registered`.
    fn register(&mut self, members: Vec<MemberRecord>) {
        self.wait(Duration::from_secs(10), |r| {
            matches!(r, Reply::Cluster(Event::Reconnected))
        });
        self.e.request(Request::Cluster(Call::Register { members }));
        self.wait(Duration::from_secs(5), |r| {
            matches!(r, Reply::Cluster(Event::Registered { .. }))
        });
        assert!(self.e.writable());
    }

    /// Polls until `pred` holds for a new reply (returned), or panics after `limit`.
    fn wait(&mut self, limit: Duration, pred: impl Fn(&Reply) -> bool) -> Reply {
        let deadline = Instant::now() + limit;
        loop {
            while let Some(r) = self.e.poll() {
                self.seen.push(r.clone());
                if pred(&r) {
                    return r;
                }
            }
            assert!(
                Instant::now() < deadline,
                "timed out; seen: {:?}",
                self.seen.iter().rev().take(10).collect::<Vec<_>>()
            );
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// The first reply so far for which `pred` holds, or the next one that comes.
    fn find(&mut self, limit: Duration, pred: impl Fn(&Reply) -> bool) -> Reply {
        match self.seen.iter().find(|r| pred(r)) {
            Some(r) => r.clone(),
            None => self.wait(limit, pred),
        }
    }

    /// Polls for `d`, keeping every reply.
    fn pump(&mut self, d: Duration) {
        let deadline = Instant::now() + d;
        while Instant::now() < deadline {
            while let Some(r) = self.e.poll() {
                self.seen.push(r);
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    fn publish(&mut self, token: u64, room: &str, msg_id: Option<&str>) {
        self.e.request(Request::Cluster(Call::Publish {
            token,
            room: room.into(),
            msg_id: msg_id.map(str::to_owned),
            body: format!(",\"member\":\"m\",\"message\":\"{token}\",\"ts\":1}}"),
            conn: 1,
            serial: 1,
            echo: true,
            dedup_ms: 60_000,
        }));
    }

    fn published(&mut self, token: u64) -> (u64, bool) {
        match self.find(Duration::from_secs(5), |r| {
            matches!(r, Reply::Cluster(Event::Published { token: t, .. }
                | Event::Failed { token: t, .. }) if *t == token)
        }) {
            Reply::Cluster(Event::Published { id, repeat, .. }) => (id, repeat),
            other => panic!("publish {token} failed: {other:?}"),
        }
    }

    /// The ids of `room`'s messages delivered so far, in order.
    fn ids(&self, room: &str) -> Vec<u64> {
        message_ids(&self.seen, room)
    }

    fn wait_ids(&mut self, room: &str, n: usize, limit: Duration) -> Vec<u64> {
        let deadline = Instant::now() + limit;
        while self.ids(room).len() < n {
            assert!(
                Instant::now() < deadline,
                "{room}: only {:?}",
                self.ids(room)
            );
            self.pump(Duration::from_millis(10));
        }
        self.ids(room)
    }
}

fn message_ids(replies: &[Reply], room: &str) -> Vec<u64> {
    replies
        .iter()
        .filter_map(|r| match r {
            Reply::Cluster(Event::Message { room: rm, id, .. }) if rm == room => Some(*id),
            _ => None,
        })
        .collect()
}

fn member(node: &str, conn: u64, name: &str) -> MemberRecord {
    MemberRecord {
        node: node.into(),
        conn,
        order: 1_764_000_000_000_000 + conn,
        name: name.into(),
        id: format!("id-{name}"),
        rooms: vec![],
    }
}

fn connect(n: &mut Node, token: u64, m: MemberRecord) -> bool {
    n.e.request(Request::Cluster(Call::Connect { token, member: m }));
    match n.wait(Duration::from_secs(5), |r| {
        matches!(r, Reply::Cluster(Event::Connected { token: t, .. }
            | Event::Failed { token: t, .. }) if *t == token)
    }) {
        Reply::Cluster(Event::Connected { ok, .. }) => ok,
        other => panic!("connect failed: {other:?}"),
    }
}

fn upto(n: u64) -> Vec<u64> {
    (1..=n).collect()
}

#[test]
fn a_broadcast_reaches_both_nodes_in_id_order_and_repeats_are_not_published() {
    let redis = Redis::start();
    // One node over TCP, one over the unix socket.
    let mut a = Node::open(&redis.url());
    let mut b = Node::open(&redis.unix_url());
    for t in 1..=3 {
        a.publish(t, "general", None);
    }
    for t in 1..=3 {
        assert_eq!(a.published(t), (t, false));
    }
    assert_eq!(a.wait_ids("general", 3, Duration::from_secs(5)), upto(3));
    assert_eq!(b.wait_ids("general", 3, Duration::from_secs(5)), upto(3));
    let echo = b.seen.iter().find_map(|r| match r {
        Reply::Cluster(Event::Message {
            id: 2, node, body, ..
        }) => Some((node.clone(), body.clone())),
        _ => None,
    });
    assert_eq!(
        echo,
        Some((
            a.id(),
            ",\"member\":\"m\",\"message\":\"2\",\"ts\":1}".into()
        ))
    );

    // A msg_id: the resend (through the other node) gets the first id, nothing new goes out.
    a.publish(10, "general", Some("k1"));
    assert_eq!(a.published(10), (4, false));
    b.publish(11, "general", Some("k1"));
    assert_eq!(b.published(11), (4, true));
    b.publish(12, "general", None);
    assert_eq!(b.published(12), (5, false));
    assert_eq!(a.wait_ids("general", 5, Duration::from_secs(5)), upto(5));
    assert_eq!(b.wait_ids("general", 5, Duration::from_secs(5)), upto(5));
    b.pump(Duration::from_millis(100));
    assert_eq!(b.ids("general"), upto(5), "no repeat delivered");

    // History is in Redis: a page from either node, with the newest last.
    b.e.request(Request::Page {
        token: 77,
        room: "general".into(),
        query: Query::Before {
            before: None,
            limit: 2,
        },
    });
    let page = b.wait(Duration::from_secs(5), |r| {
        matches!(r, Reply::PageReady { token: 77, .. })
    });
    let Reply::PageReady { page, .. } = page else {
        unreachable!()
    };
    assert_eq!(
        page.messages.iter().map(|m| m.id).collect::<Vec<_>>(),
        [4, 5]
    );
    assert!(page.more);
    assert_eq!(page.messages[0].message, "10");
    b.e.request(Request::Page {
        token: 79,
        room: "general".into(),
        query: Query::Before {
            before: Some(0),
            limit: 2,
        },
    });
    let empty = b.wait(Duration::from_secs(5), |r| {
        matches!(r, Reply::PageReady { token: 79, .. })
    });
    assert!(matches!(empty, Reply::PageReady { page, .. } if page.messages.is_empty()));
    b.e.request(Request::LastId {
        token: 78,
        room: "general".into(),
    });
    let last = b.wait(Duration::from_secs(5), |r| {
        matches!(r, Reply::LastId { token: 78, .. })
    });
    assert!(matches!(last, Reply::LastId { last_id: 5, .. }));
}

#[test]
fn names_are_claimed_cluster_wide_ignoring_case_and_presence_reaches_the_other_node() {
    let redis = Redis::start();
    let mut a = Node::open(&redis.url());
    let mut b = Node::open(&redis.url());
    let (ai, bi) = (a.id(), b.id());
    assert!(connect(&mut a, 1, member(&ai, 7, "Alice")));
    assert!(!connect(&mut b, 2, member(&bi, 3, "aLiCe")), "taken on A");
    assert!(connect(&mut b, 3, member(&bi, 3, "Bob")));
    a.e.request(Request::Cluster(Call::Join {
        conn: 7,
        room: "general".into(),
    }));
    b.wait(Duration::from_secs(5), |r| {
        matches!(r, Reply::Cluster(Event::Presence(Presence::Joined { conn: 7, room, .. })) if room == "general")
    });
    assert!(b.seen.iter().any(|r| matches!(r,
        Reply::Cluster(Event::Presence(Presence::Connected(m))) if m.name == "Alice" && m.node == ai)));
    a.pump(Duration::from_millis(100));
    assert!(
        !a.seen.iter().any(|r| matches!(r,
            Reply::Cluster(Event::Presence(Presence::Connected(m))) if m.node == ai)),
        "a node's own presence is not repeated to it"
    );
    assert!(a.seen.iter().any(|r| matches!(r,
        Reply::Cluster(Event::Presence(Presence::Connected(m))) if m.name == "Bob")));

    // A direct reaches only the member's node.
    b.e.request(Request::Cluster(Call::Direct {
        node: ai.clone(),
        conn: 7,
        json: "{\"event\":\"direct\"}".into(),
    }));
    a.wait(Duration::from_secs(5), |r| {
        matches!(r, Reply::Cluster(Event::DirectIn { conn: 7, json }) if json == "{\"event\":\"direct\"}")
    });

    // A new node's snapshot holds the others' members with their rooms.
    let mut c = Node::open(&redis.url());
    let snap = c.wait(
        Duration::from_secs(5),
        |r| matches!(r, Reply::Cluster(Event::Snapshot { members }) if members.len() == 2),
    );
    let Reply::Cluster(Event::Snapshot { members }) = snap else {
        unreachable!()
    };
    let alice = members.iter().find(|m| m.name == "Alice").unwrap();
    assert_eq!(alice.rooms, ["general"]);
    assert_eq!(
        alice.order, 1_764_000_000_000_007,
        "the order keeps every digit"
    );

    // Leaving and disconnecting free the name.
    a.e.request(Request::Cluster(Call::Disconnect { conn: 7 }));
    b.wait(Duration::from_secs(5), |r| {
        matches!(
            r,
            Reply::Cluster(Event::Presence(Presence::Disconnected { conn: 7, .. }))
        )
    });
    assert!(connect(&mut b, 4, member(&bi, 4, "ALICE")));

    // Name blocks do not overlap.
    a.e.request(Request::Cluster(Call::NameBlock { count: 100 }));
    b.e.request(Request::Cluster(Call::NameBlock { count: 100 }));
    let fa = a.wait(Duration::from_secs(5), |r| {
        matches!(r, Reply::Cluster(Event::Names { .. }))
    });
    let fb = b.wait(Duration::from_secs(5), |r| {
        matches!(r, Reply::Cluster(Event::Names { .. }))
    });
    let (
        Reply::Cluster(Event::Names { first: x, .. }),
        Reply::Cluster(Event::Names { first: y, .. }),
    ) = (fa, fb)
    else {
        unreachable!()
    };
    assert_eq!(x.abs_diff(y), 100);
}

#[test]
fn a_dead_node_is_reaped_once_even_with_two_reapers() {
    let redis = Redis::start();
    let mut b = Node::open(&redis.url());
    let mut c = Node::open(&redis.url());
    let mut a = Node::open(&redis.url());
    let (ai, bi) = (a.id(), b.id());
    assert!(connect(&mut a, 1, member(&ai, 5, "Carol")));
    a.e.request(Request::Cluster(Call::Join {
        conn: 5,
        room: "general".into(),
    }));
    b.wait(Duration::from_secs(5), |r| {
        matches!(
            r,
            Reply::Cluster(Event::Presence(Presence::Joined { conn: 5, .. }))
        )
    });
    // A raw listener counts the `d` lines on the channel.
    let mut raw = redis.con();
    raw.set_read_timeout(Some(Duration::from_millis(100)))
        .unwrap();
    let mut ps = raw.as_pubsub();
    ps.subscribe("cb:ev").unwrap();

    a.e.crash(); // no unregister, no more heartbeats
    let deadline = Instant::now() + Duration::from_secs(1 + 3);
    let mut d_lines = 0;
    while Instant::now() < deadline {
        if let Ok(msg) = ps.get_message() {
            let line: String = msg.get_payload().unwrap();
            if line == format!("d\n{ai}\n5") {
                d_lines += 1;
            }
        }
        b.pump(Duration::from_millis(1));
        c.pump(Duration::from_millis(1));
    }
    assert_eq!(d_lines, 1, "announced exactly once");
    for n in [&b, &c] {
        let gone = n
            .seen
            .iter()
            .filter(|r| {
                matches!(r, Reply::Cluster(Event::Presence(Presence::Disconnected { node, conn: 5 })) if *node == ai)
            })
            .count();
        assert_eq!(gone, 1);
    }
    assert!(connect(&mut b, 9, member(&bi, 9, "carol")), "name freed");
}

#[test]
fn a_page_read_while_messages_flow_neither_misses_nor_doubles() {
    let redis = Redis::start();
    let mut a = Node::open(&redis.url());
    let mut b = Node::open(&redis.url());
    let total = 300;
    let mut page_token = None;
    let mut start = 0; // b.seen index where the "join" began
    for t in 1..=total {
        a.publish(t, "busy", None);
        if t % 20 == 0 {
            a.pump(Duration::from_millis(1));
            b.pump(Duration::from_millis(1));
        }
        if t == 150 {
            start = b.seen.len();
            b.e.request(Request::Page {
                token: 5,
                room: "busy".into(),
                query: Query::Before {
                    before: None,
                    limit: 1000,
                },
            });
            page_token = Some(5);
        }
    }
    assert!(page_token.is_some());
    b.find(Duration::from_secs(5), |r| {
        matches!(r, Reply::PageReady { token: 5, .. })
    });
    b.wait_ids("busy", total as usize, Duration::from_secs(10));
    // As the core does: the page, then the live messages buffered since the join above the
    // page's last id.
    let at = b.seen[start..]
        .iter()
        .position(|r| matches!(r, Reply::PageReady { token: 5, .. }))
        .unwrap()
        + start;
    let Reply::PageReady { page, .. } = &b.seen[at] else {
        unreachable!()
    };
    let mut got: Vec<u64> = page.messages.iter().map(|m| m.id).collect();
    let last = got.last().copied().unwrap_or(0);
    got.extend(
        message_ids(&b.seen[start..], "busy")
            .into_iter()
            .filter(|&id| id > last),
    );
    assert_eq!(got, upto(total));
    assert_eq!(
        b.ids("busy"),
        upto(total),
        "the live stream has every id once"
    );
}

#[test]
fn a_killed_subscription_is_healed_without_gaps() {
    let redis = Redis::start();
    let mut a = Node::open(&redis.url());
    let mut b = Node::open(&redis.url());
    let mut admin = redis.con();
    let total = 400;
    let mut killed = 0;
    // Both nodes track the room (as one with members in it does) before the kills begin.
    a.publish(1, "r", None);
    b.wait_ids("r", 1, Duration::from_secs(5));
    a.wait_ids("r", 1, Duration::from_secs(5));
    for t in 2..=total {
        a.publish(t, "r", None);
        if t % 50 == 0 {
            killed += redis::cmd("CLIENT")
                .arg("KILL")
                .arg("TYPE")
                .arg("pubsub")
                .query::<i64>(&mut admin)
                .unwrap();
            // Sometimes long enough to resubscribe, sometimes not.
            let pause = if t % 100 == 0 { 200 } else { 20 };
            a.pump(Duration::from_millis(pause));
            b.pump(Duration::from_millis(pause));
        }
    }
    assert!(killed >= 4, "{killed} subscriptions killed");
    for t in 1..=total {
        assert_eq!(a.published(t).0, t);
    }
    assert_eq!(
        b.wait_ids("r", total as usize, Duration::from_secs(10)),
        upto(total)
    );
    assert_eq!(
        a.wait_ids("r", total as usize, Duration::from_secs(10)),
        upto(total)
    );
    b.pump(Duration::from_millis(300));
    assert_eq!(b.ids("r"), upto(total), "no doubles after the resubscribes");
    // Healed messages come out as the live ones would have: sender and body intact.
    let ai = a.id();
    for r in &b.seen {
        if let Reply::Cluster(Event::Message {
            id,
            node,
            conn,
            serial,
            echo,
            body,
            ..
        }) = r
        {
            assert_eq!((node, *conn, *serial, *echo), (&ai, 1, 1, true));
            assert_eq!(
                *body,
                format!(",\"member\":\"m\",\"message\":\"{id}\",\"ts\":1}}")
            );
        }
    }
}

/// utime + stime of this process, in clock ticks (100 per second on Linux).
fn cpu_ticks() -> u64 {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap();
    let after = &stat[stat.rfind(')').unwrap() + 2..];
    let f: Vec<&str> = after.split(' ').collect();
    f[11].parse::<u64>().unwrap() + f[12].parse::<u64>().unwrap()
}

/// Runs the test `name` of this binary in a process of its own (so `/proc/self/stat` counts
/// only its threads, not the other tests'); true in that process.
fn alone(name: &str) -> bool {
    if std::env::var_os("CB_TEST_ALONE").is_some() {
        return true;
    }
    let out = Command::new(std::env::current_exe().unwrap())
        .args([name, "--exact", "--test-threads=1", "--nocapture"])
        .env("CB_TEST_ALONE", "1")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("1 passed"), "{stdout}");
    false
}

#[test]
fn redis_gone_fails_fast_stays_quiet_and_a_restart_with_lost_data_keeps_ids_growing() {
    if !alone("redis_gone_fails_fast_stays_quiet_and_a_restart_with_lost_data_keeps_ids_growing") {
        return;
    }
    let mut redis = Redis::start();
    let mut a = Node::open(&redis.url());
    let mut b = Node::open(&redis.url());
    for t in 1..=3 {
        a.publish(t, "general", None);
        a.published(t);
    }
    b.wait_ids("general", 3, Duration::from_secs(5));

    redis.kill();
    let killed = Instant::now();
    a.wait(Duration::from_secs(2), |r| {
        matches!(r, Reply::Cluster(Event::Down { .. }))
    });
    b.wait(Duration::from_secs(2), |r| {
        matches!(r, Reply::Cluster(Event::Down { .. }))
    });
    assert!(killed.elapsed() < Duration::from_secs(2));
    assert!(!a.e.writable());
    assert!(a.e.down_reason().is_some());

    // Calls are answered at once while it is down.
    let asked = Instant::now();
    a.publish(50, "general", None);
    a.wait(Duration::from_secs(1), |r| {
        matches!(r, Reply::Cluster(Event::Failed { token: 50, .. }))
    });
    a.e.request(Request::Page {
        token: 51,
        room: "general".into(),
        query: Query::After { after: 0, limit: 5 },
    });
    a.wait(Duration::from_secs(1), |r| {
        matches!(r, Reply::Unavailable { token: 51, .. })
    });
    assert!(asked.elapsed() < Duration::from_secs(1));

    // Nothing spins while Redis is gone (the polling here sleeps 50 ms a round).
    let t0 = cpu_ticks();
    let quiet = Instant::now() + Duration::from_secs(2);
    while Instant::now() < quiet {
        while a.e.poll().is_some() {}
        while b.e.poll().is_some() {}
        std::thread::sleep(Duration::from_millis(50));
    }
    let used = cpu_ticks() - t0;
    assert!(used < 30, "{used} ticks of CPU in 2 s while Redis was down");

    // Back, empty (`--save ''`): both nodes come back; ids go on above what they saw.
    redis.restart();
    a.register(vec![]);
    b.register(vec![]);
    assert!(a.e.down_reason().is_none());
    a.publish(60, "general", None);
    assert_eq!(a.published(60), (4, false), "not 1: the counter was raised");
    assert_eq!(b.wait_ids("general", 4, Duration::from_secs(5)), upto(4));
}

#[test]
fn a_close_unregisters_at_once_and_answers_later_requests() {
    let redis = Redis::start();
    let mut a = Node::open(&redis.url());
    let mut b = Node::open(&redis.url());
    let ai = a.id();
    assert!(connect(&mut a, 1, member(&ai, 2, "Dave")));
    assert_eq!(a.e.close(Instant::now() + Duration::from_secs(3)), 0);
    b.wait(Duration::from_secs(2), |r| {
        matches!(r, Reply::Cluster(Event::Presence(Presence::Disconnected { conn: 2, node })) if *node == ai)
    });
    assert!(!a.e.writable());
    a.publish(9, "general", None);
    a.e.request(Request::LastId {
        token: 10,
        room: "general".into(),
    });
    let rest: Vec<Reply> = std::iter::from_fn(|| a.e.poll()).collect();
    assert!(
        rest.iter()
            .any(|r| matches!(r, Reply::Cluster(Event::Failed { token: 9, .. })))
    );
    assert!(
        rest.iter()
            .any(|r| matches!(r, Reply::Unavailable { token: 10, .. }))
    );
}

#[test]
fn an_unreachable_redis_at_start_is_an_error_naming_the_url() {
    let port = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let url = format!("redis://127.0.0.1:{port}");
    let err = ClusterEngine::open(&config(&url), ClusterEngine::new_node_id(), Box::new(|| {}))
        .err()
        .expect("nothing listens there");
    assert!(err.contains(&url), "{err}");
}

#[test]
fn a_node_taken_for_dead_registers_again_and_its_members_come_back() {
    let redis = Redis::start();
    let mut a = Node::open(&redis.url());
    let mut b = Node::open(&redis.url());
    let (ai, bi) = (a.id(), b.id());
    let mut eve = member(&ai, 3, "Eve");
    assert!(connect(&mut a, 1, eve.clone()));
    a.e.request(Request::Cluster(Call::Join {
        conn: 3,
        room: "general".into(),
    }));
    b.wait(Duration::from_secs(5), |r| {
        matches!(
            r,
            Reply::Cluster(Event::Presence(Presence::Joined { conn: 3, .. }))
        )
    });
    // Another node reaped A (as after a long stall): its heartbeat finds itself gone.
    let _: i64 = redis::cmd("FCALL")
        .arg("cb_unregister")
        .arg(0)
        .arg(&ai)
        .query(&mut redis.con())
        .unwrap();
    b.wait(Duration::from_secs(5), |r| {
        matches!(
            r,
            Reply::Cluster(Event::Presence(Presence::Disconnected { conn: 3, .. }))
        )
    });
    eve.rooms = vec!["general".into()];
    a.register(vec![eve]);
    b.wait(Duration::from_secs(5), |r| {
        matches!(r, Reply::Cluster(Event::Presence(Presence::Connected(m))) if m.name == "Eve" && m.rooms.is_empty())
    });
    b.wait(Duration::from_secs(5), |r| {
        matches!(r, Reply::Cluster(Event::Presence(Presence::Joined { conn: 3, room, .. })) if room == "general")
    });
    assert!(
        !connect(&mut b, 2, member(&bi, 2, "eve")),
        "the name is claimed again"
    );
}

#[test]
fn redis_emptied_under_live_connections_is_noticed_and_ids_go_on() {
    let redis = Redis::start();
    let mut a = Node::open(&redis.url());
    let mut b = Node::open(&redis.url());
    for t in 1..=5 {
        a.publish(t, "general", None);
    }
    a.published(5);
    b.wait_ids("general", 5, Duration::from_secs(5));
    let _: () = redis::cmd("FLUSHALL").query(&mut redis.con()).unwrap();
    // The heartbeat sees the epoch gone: the counters are raised, the node registers again.
    a.register(vec![]);
    b.register(vec![]);
    b.publish(9, "general", None);
    assert_eq!(b.published(9), (6, false));
    assert_eq!(a.wait_ids("general", 6, Duration::from_secs(5)), upto(6));
}

#[test]
fn history_is_trimmed_and_a_gap_over_trimmed_ids_is_skipped() {
    let redis = Redis::start();
    let cfg = Config {
        cluster_history_per_room: 3,
        ..config(&redis.url())
    };
    let mut a = Node {
        e: ClusterEngine::open(&cfg, ClusterEngine::new_node_id(), Box::new(|| {})).unwrap(),
        seen: Vec::new(),
    };
    a.register(vec![]);
    let mut b = Node::open(&redis.url());
    a.publish(1, "t", None);
    b.wait_ids("t", 1, Duration::from_secs(5));
    // B does not hear 2..=9 (its subscription is gone: it comes back after a 100 ms
    // back-off, and the eight publishes take a few), then hears 10.
    let mut admin = redis.con();
    let _: i64 = redis::cmd("CLIENT")
        .arg("KILL")
        .arg("TYPE")
        .arg("pubsub")
        .query(&mut admin)
        .unwrap();
    for t in 2..=9 {
        a.publish(t, "t", None);
    }
    a.published(9);
    a.publish(10, "t", None);
    a.published(10);
    // 2..=7 are gone from history: B delivers what Redis still has, in order, once.
    b.wait_ids("t", 4, Duration::from_secs(5));
    b.pump(Duration::from_millis(200));
    assert_eq!(b.ids("t"), [1, 8, 9, 10]);
    a.e.request(Request::Page {
        token: 1,
        room: "t".into(),
        query: Query::After {
            after: 0,
            limit: 10,
        },
    });
    let Reply::PageReady { page, .. } = a.find(Duration::from_secs(5), |r| {
        matches!(r, Reply::PageReady { token: 1, .. })
    }) else {
        unreachable!()
    };
    assert_eq!(
        page.messages.iter().map(|m| m.id).collect::<Vec<_>>(),
        [8, 9, 10]
    );
}

#[cfg(feature = "server-api")]
#[test]
fn removed_messages_leave_history_but_their_ids_stay_taken() {
    use chatterbox::store::Removal;
    let redis = Redis::start();
    let mut a = Node::open(&redis.url());
    for t in 1..=3 {
        a.publish(t, "mod", None);
    }
    a.published(3);
    let page = |a: &mut Node, token: u64| {
        a.e.request(Request::Page {
            token,
            room: "mod".into(),
            query: Query::After {
                after: 0,
                limit: 10,
            },
        });
        match a.find(
            Duration::from_secs(5),
            |r| matches!(r, Reply::PageReady { token: t, .. } if *t == token),
        ) {
            Reply::PageReady { page, .. } => page.messages.iter().map(|m| m.id).collect::<Vec<_>>(),
            _ => unreachable!(),
        }
    };
    a.e.request(Request::Remove {
        room: "mod".into(),
        what: Removal::One(2),
    });
    assert_eq!(page(&mut a, 100), [1, 3]);
    a.e.request(Request::Remove {
        room: "mod".into(),
        what: Removal::UpTo(3),
    });
    assert_eq!(page(&mut a, 101), Vec::<u64>::new());
    a.publish(4, "mod", None);
    assert_eq!(a.published(4), (4, false));
}
