//! The Redis link: two helper threads with blocking connections of the `redis` crate. The
//! command thread runs the calls (every call waiting goes out as one pipeline), the heartbeat
//! and the reaping of dead nodes; the subscriber thread holds the subscription to `cb:ev`.
//! Both hand what they read to the loop through one shared queue and the loop's `notify`.
//!
//! Every call is bounded by `--redis-timeout`; on any error the connection is dropped, the
//! calls of the failed pipeline are answered as failed, and it is made again with a back-off
//! (100 ms doubling to 2 s) during which new calls are answered at once.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::mpsc::{Receiver, RecvTimeoutError};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use redis::{Client, Connection, Value};
use serde::Deserialize;
use serde_json::value::RawValue;

use super::order::Fetched;
use super::{Call, CountedPage, Event, MemberRecord, NodeId, Presence};
use crate::chat::protocol::RawJson;
#[cfg(feature = "server-api")]
use crate::store::Removal;
use crate::store::engine::RequestToken;
use crate::store::{Page, Query, StoreError, StoredMessage};

/// The library every node loads at start (`FUNCTION LOAD REPLACE`).
pub(crate) const LIBRARY: &str = include_str!("chatterbox.lua");
/// The channel every event goes out on.
pub(crate) const CHANNEL: &str = "cb:ev";
const BACKOFF_FIRST: Duration = Duration::from_millis(100);
const BACKOFF_MAX: Duration = Duration::from_secs(2);
/// How long the subscriber's reads wait before it looks at the stop flag.
const SUB_READ: Duration = Duration::from_millis(250);
/// How long a silent subscription waits before it pings Redis.
const SUB_PING: Duration = Duration::from_secs(1);

/// What the loop asks of the command thread.
#[derive(Debug)]
pub(crate) enum Job {
    /// A call of the core.
    Call(Call),
    /// A page for the core (`cb_page`).
    Page {
        token: RequestToken,
        room: String,
        query: Query,
    },
    /// A room's counter for the core.
    LastId { token: RequestToken, room: String },
    /// A moderator's delete.
    #[cfg(feature = "server-api")]
    Remove { room: String, what: Removal },
    /// A missing range for `order.rs`.
    Fetch {
        room: String,
        after: u64,
        limit: u64,
    },
    /// After a resubscribe: a snapshot of the other nodes, and the counters of these rooms.
    Resync { rooms: Vec<String> },
    /// Push [`Out::Tick`] at this instant.
    WakeAt(Instant),
    /// Run what came before, unregister (unless `unregister` is false: a test's crash), stop.
    Close { unregister: bool },
}

/// What the helper threads hand to the loop.
#[derive(Debug)]
pub(crate) enum Out {
    /// An event for the core as it is (answers, `Reconnected`, `Down`, …).
    Event(Event),
    /// A live event of the subscription (a message goes through `order.rs`, presence may wait
    /// for a snapshot).
    Live(Event),
    /// A page for the core.
    Page {
        token: RequestToken,
        room: String,
        result: Result<CountedPage, StoreError>,
    },
    /// A counter for the core.
    LastId {
        token: RequestToken,
        room: String,
        result: Result<u64, StoreError>,
    },
    /// A missing range.
    Fetched {
        room: String,
        result: Result<Fetched, ()>,
    },
    /// Counters of tracked rooms after a resubscribe.
    Counters(Vec<(String, u64)>),
    /// A snapshot read; it applies where its mark falls in the subscription.
    SnapData {
        nonce: u64,
        members: Vec<MemberRecord>,
    },
    /// The snapshot with this nonce could not be read.
    SnapFailed { nonce: u64 },
    /// The mark of a snapshot, in the subscription.
    SnapMark { nonce: u64 },
    /// The subscription is (again) in place.
    Subscribed,
    /// A wake-up asked for with [`Job::WakeAt`].
    Tick,
}

/// State both threads and the engine share.
pub(crate) struct Shared {
    queue: Mutex<VecDeque<Out>>,
    notify: Mutex<Box<dyn Fn() + Send>>,
    /// The command connection is up.
    pub up: AtomicBool,
    /// The node is registered (writes may go).
    pub registered: AtomicBool,
    /// Why Redis is unreachable, while it is.
    pub down_reason: Mutex<Option<String>>,
    /// The highest id seen per room (for `cb_raise` after a data loss).
    seen: Mutex<HashMap<String, u64>>,
    /// Jobs sent and not yet answered.
    pub pending: AtomicUsize,
    /// The subscriber stops.
    pub stop: AtomicBool,
}

impl Shared {
    pub(crate) fn new(notify: Box<dyn Fn() + Send>) -> Self {
        Shared {
            queue: Mutex::new(VecDeque::new()),
            notify: Mutex::new(notify),
            up: AtomicBool::new(false),
            registered: AtomicBool::new(false),
            down_reason: Mutex::new(None),
            seen: Mutex::new(HashMap::new()),
            pending: AtomicUsize::new(0),
            stop: AtomicBool::new(false),
        }
    }

    /// Queues `out`; wakes the loop when the queue was empty (the loop drains it all).
    pub(crate) fn push(&self, out: Out) {
        self.push_all(std::iter::once(out));
    }

    fn push_all(&self, outs: impl IntoIterator<Item = Out>) {
        let was_empty = {
            let mut q = lock(&self.queue);
            let was_empty = q.is_empty();
            q.extend(outs);
            was_empty && !q.is_empty()
        };
        if was_empty {
            (lock(&self.notify))();
        }
    }

    /// Takes everything queued.
    pub(crate) fn take(&self) -> VecDeque<Out> {
        std::mem::take(&mut *lock(&self.queue))
    }

    fn saw(&self, room: &str, id: u64) {
        let mut seen = lock(&self.seen);
        match seen.get_mut(room) {
            Some(last) => *last = (*last).max(id),
            None => {
                seen.insert(room.to_owned(), id);
            }
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// The settings the link needs.
#[derive(Debug, Clone)]
pub(crate) struct LinkConfig {
    pub timeout: Duration,
    pub node_timeout: Duration,
    pub history_per_room: usize,
}

impl LinkConfig {
    fn heartbeat(&self) -> Duration {
        (self.node_timeout / 5).max(Duration::from_millis(100))
    }
}

/// Opens a client for `url` (`redis://…` or `unix:///…`).
pub(crate) fn client(url: &str) -> Result<Client, String> {
    Client::open(url).map_err(|e| {
        let shown = crate::config::without_password(url);
        format!("--redis '{}': {e}", crate::logging::log_safe(&shown))
    })
}

/// Connects with the timeouts set.
pub(crate) fn connect(client: &Client, timeout: Duration) -> Result<Connection, String> {
    let con = client
        .get_connection_with_timeout(timeout)
        .map_err(|e| e.to_string())?;
    con.set_read_timeout(Some(timeout))
        .and_then(|()| con.set_write_timeout(Some(timeout)))
        .map_err(|e| e.to_string())?;
    Ok(con)
}

/// Loads the library.
pub(crate) fn load_library(con: &mut Connection) -> Result<(), String> {
    redis::cmd("FUNCTION")
        .arg("LOAD")
        .arg("REPLACE")
        .arg(LIBRARY)
        .query::<Value>(con)
        .map(|_| ())
        .map_err(|e| format!("loading the chatterbox functions: {}", failure(&e)))
}

fn fcall(name: &str) -> redis::Cmd {
    let mut c = redis::cmd("FCALL");
    c.arg(name).arg(0);
    c
}

/// Why a call failed, in words for the log and `/health`: Redis out of reach (the connection
/// broke, timed out, was refused) or Redis answering with an error (`OOM` at `maxmemory`,
/// `MISCONF` when it cannot write its files).
fn failure(e: &redis::RedisError) -> String {
    if e.is_io_error() || e.is_timeout() || e.is_connection_dropped() || e.is_connection_refusal() {
        format!("Redis unreachable: {e}")
    } else {
        format!("Redis refused a call: {e}")
    }
}

// --- reading values ---

fn int(v: &Value) -> Option<i64> {
    match v {
        Value::Int(i) => Some(*i),
        Value::BulkString(b) => std::str::from_utf8(b).ok()?.parse().ok(),
        Value::SimpleString(s) => s.parse().ok(),
        Value::Nil => Some(0),
        _ => None,
    }
}

fn text(v: &Value) -> Option<&str> {
    match v {
        Value::BulkString(b) => std::str::from_utf8(b).ok(),
        Value::SimpleString(s) => Some(s),
        _ => None,
    }
}

fn array(v: &Value) -> &[Value] {
    match v {
        Value::Array(a) | Value::Set(a) => a,
        _ => &[],
    }
}

fn server_error(v: &Value) -> Option<String> {
    match v {
        Value::ServerError(e) => Some(e.to_string()),
        _ => None,
    }
}

/// A stored history entry as `cb_page` returns it: the JSON, then the sender's meta.
#[derive(Deserialize)]
struct Stored<'a> {
    id: u64,
    member: String,
    message: String,
    ts: u64,
    #[serde(borrow, default)]
    data: Option<&'a RawValue>,
}

/// A history entry's stored JSON and its four meta lines (node, connection, serial, echo).
/// The meta lines are the last four: the JSON may hold newlines of its own (whitespace inside
/// the `data` a client sent is kept as sent).
fn split_entry(entry: &str) -> (&str, Option<&str>) {
    let mut cut = entry.len();
    for _ in 0..4 {
        match entry[..cut].rfind('\n') {
            Some(at) => cut = at,
            None => return (entry, None),
        }
    }
    (&entry[..cut], Some(&entry[cut + 1..]))
}

fn stored_message(entry: &str) -> Option<StoredMessage> {
    let (json, _) = split_entry(entry);
    let s: Stored = serde_json::from_str(json).ok()?;
    Some(StoredMessage {
        id: s.id,
        member: s.member,
        message: s.message,
        ts: s.ts,
        data: s.data.and_then(|d| RawJson::from_text(d.get().to_owned())),
    })
}

/// A history entry as the live event it was published as.
fn entry_event(room: &str, entry: &str) -> Option<Event> {
    let (json, meta) = split_entry(entry);
    let rest = json.strip_prefix("{\"id\":")?;
    let digits = rest.bytes().take_while(u8::is_ascii_digit).count();
    let id: u64 = rest[..digits].parse().ok()?;
    let body = rest[digits..].to_owned();
    let mut meta = meta.unwrap_or("").split('\n');
    let node = meta.next().unwrap_or("").to_owned();
    let conn = meta.next().and_then(|c| c.parse().ok()).unwrap_or(0);
    let serial = meta.next().and_then(|c| c.parse().ok()).unwrap_or(0);
    let echo = meta.next() != Some("0");
    Some(Event::Message {
        room: room.to_owned(),
        id,
        node,
        conn,
        serial,
        echo,
        body,
    })
}

/// The `[counter, more, entry…]` answer of `cb_page`.
fn page_parts(v: &Value) -> Option<(u64, bool, &[Value])> {
    let a = array(v);
    if a.len() < 2 {
        return None;
    }
    Some((int(&a[0])? as u64, int(&a[1])? != 0, &a[2..]))
}

fn members(v: &Value) -> Vec<MemberRecord> {
    array(v)
        .iter()
        .filter_map(|r| serde_json::from_str(text(r)?).ok())
        .collect()
}

fn node_of(rest: &str) -> Option<(String, &str)> {
    rest.split_once('\n').map(|(n, r)| (n.to_owned(), r))
}

/// Parses one line of `cb:ev` for node `me`; `None` for what this node does not take.
pub(crate) fn parse_event(me: &str, line: &str) -> Option<Out> {
    let (tag, rest) = line.split_once('\n')?;
    match tag {
        "m" => {
            let mut f = rest.splitn(7, '\n');
            let room = f.next()?.to_owned();
            let id = f.next()?.parse().ok()?;
            let node = f.next()?.to_owned();
            let conn = f.next()?.parse().ok()?;
            let serial = f.next()?.parse().ok()?;
            let echo = f.next()? != "0";
            let body = f.next()?.to_owned();
            Some(Out::Live(Event::Message {
                room,
                id,
                node,
                conn,
                serial,
                echo,
                body,
            }))
        }
        "c" => {
            let (node, record) = node_of(rest)?;
            if node == me {
                return None;
            }
            let record = serde_json::from_str(record).ok()?;
            Some(Out::Live(Event::Presence(Presence::Connected(record))))
        }
        "d" => {
            let (node, conn) = node_of(rest)?;
            if node == me {
                return None;
            }
            let conn = conn.parse().ok()?;
            Some(Out::Live(Event::Presence(Presence::Disconnected {
                node,
                conn,
            })))
        }
        "j" | "l" => {
            let (node, rest) = node_of(rest)?;
            if node == me {
                return None;
            }
            let (conn, room) = rest.split_once('\n')?;
            let conn = conn.parse().ok()?;
            let room = room.to_owned();
            Some(Out::Live(Event::Presence(if tag == "j" {
                Presence::Joined { node, conn, room }
            } else {
                Presence::Left { node, conn, room }
            })))
        }
        "x" => {
            let (node, rest) = node_of(rest)?;
            if node != me {
                return None;
            }
            let (conn, json) = rest.split_once('\n')?;
            Some(Out::Live(Event::DirectIn {
                conn: conn.parse().ok()?,
                json: json.to_owned(),
            }))
        }
        "s" => {
            let (node, nonce) = node_of(rest)?;
            if node != me {
                return None;
            }
            Some(Out::SnapMark {
                nonce: nonce.parse().ok()?,
            })
        }
        _ => None,
    }
}

/// How to read the answers of one job's commands.
enum Pending {
    Register {
        nonce: u64,
    },
    Connect {
        token: u64,
    },
    Publish {
        token: u64,
        room: String,
    },
    NameBlock {
        count: u64,
    },
    Page {
        token: RequestToken,
        room: String,
    },
    LastId {
        token: RequestToken,
        room: String,
    },
    Fetch {
        room: String,
    },
    Resync {
        nonce: u64,
        rooms: Vec<String>,
    },
    /// Nothing to answer (disconnect, join, leave, direct, remove).
    Quiet,
}

impl Pending {
    /// The answer when the job could not be run.
    fn failed(self, why: &str) -> Option<Out> {
        let error = StoreError(why.to_owned());
        match self {
            Pending::Connect { token } | Pending::Publish { token, .. } => {
                Some(Out::Event(Event::Failed { token, error }))
            }
            Pending::Page { token, room } => Some(Out::Page {
                token,
                room,
                result: Err(error),
            }),
            Pending::LastId { token, room } => Some(Out::LastId {
                token,
                room,
                result: Err(error),
            }),
            Pending::Fetch { room } => Some(Out::Fetched {
                room,
                result: Err(()),
            }),
            Pending::Register { nonce } | Pending::Resync { nonce, .. } => {
                Some(Out::SnapFailed { nonce })
            }
            Pending::NameBlock { .. } | Pending::Quiet => None,
        }
    }

    /// How many commands the job sent.
    fn commands(&self) -> usize {
        match self {
            Pending::Register { .. } => 2,
            Pending::Resync { rooms, .. } => 1 + rooms.len(),
            _ => 1,
        }
    }
}

/// The command thread.
pub(crate) struct Commander {
    client: Client,
    cfg: LinkConfig,
    node: NodeId,
    shared: Arc<Shared>,
    jobs: Receiver<Job>,
    con: Option<Connection>,
    up_since: Instant,
    registered: bool,
    epoch: Option<String>,
    backoff: Duration,
    next_try: Instant,
    next_beat: Instant,
    down_reported: bool,
    /// Calls Redis has answered with an error since the last one it carried out: the first is
    /// logged, the rest only counted, so a Redis that refuses writes does not flood the log.
    refusals: u64,
    wakes: BinaryHeap<Reverse<Instant>>,
    nonce: u64,
}

impl Commander {
    /// A command thread over `con`, the connection opened at start (library loaded).
    pub(crate) fn new(
        client: Client,
        con: Connection,
        cfg: LinkConfig,
        node: NodeId,
        shared: Arc<Shared>,
        jobs: Receiver<Job>,
    ) -> Self {
        let now = Instant::now();
        Commander {
            client,
            cfg,
            node,
            shared,
            jobs,
            con: Some(con),
            up_since: now,
            registered: false,
            epoch: None,
            backoff: BACKOFF_FIRST,
            next_try: now,
            next_beat: now,
            down_reported: false,
            refusals: 0,
            wakes: BinaryHeap::new(),
            nonce: 0,
        }
    }

    /// Runs until [`Job::Close`] (or the engine is dropped).
    pub(crate) fn run(mut self) {
        if let Some(con) = self.con.take() {
            self.set_up(con);
        }
        loop {
            let now = Instant::now();
            let mut ticked = false;
            while self.wakes.peek().is_some_and(|w| w.0 <= now) {
                self.wakes.pop();
                ticked = true;
            }
            if ticked {
                self.shared.push(Out::Tick);
            }
            if self.con.is_none() && now >= self.next_try {
                self.try_connect();
            }
            if self.con.is_some() && self.registered && Instant::now() >= self.next_beat {
                self.beat();
            }
            let mut until = self.wakes.peek().map(|w| w.0);
            let other = if self.con.is_none() {
                Some(self.next_try)
            } else if self.registered {
                Some(self.next_beat)
            } else {
                None
            };
            until = match (until, other) {
                (Some(a), Some(b)) => Some(a.min(b)),
                (a, b) => a.or(b),
            };
            let wait = until.map_or(Duration::from_secs(3600), |u| {
                u.saturating_duration_since(Instant::now())
            });
            let first = match self.jobs.recv_timeout(wait) {
                Ok(job) => job,
                Err(RecvTimeoutError::Timeout) => continue,
                Err(RecvTimeoutError::Disconnected) => return,
            };
            let mut batch = vec![first];
            while let Ok(job) = self.jobs.try_recv() {
                batch.push(job);
            }
            let n = batch.len();
            let close = batch.iter().position(|j| matches!(j, Job::Close { .. }));
            let after_close = close.map(|i| batch.split_off(i));
            self.run_batch(batch);
            if let Some(rest) = after_close {
                let unregister = matches!(rest[0], Job::Close { unregister: true });
                if unregister {
                    self.unregister();
                }
                self.shared.pending.fetch_sub(n, Ordering::SeqCst);
                return;
            }
            self.shared.pending.fetch_sub(n, Ordering::SeqCst);
        }
    }

    fn unregister(&mut self) {
        if let Some(con) = self.con.as_mut() {
            let r = fcall("cb_unregister").arg(&self.node).query::<Value>(con);
            if let Err(e) = r {
                log::warn!("cluster: unregistering from Redis failed: {e}");
            }
        }
    }

    fn try_connect(&mut self) {
        match connect(&self.client, self.cfg.timeout) {
            Ok(con) => self.set_up(con),
            Err(e) => self.go_down(format!("Redis unreachable: {e}")),
        }
    }

    /// [`Commander::setup`] on `con`, then up or down.
    fn set_up(&mut self, mut con: Connection) {
        match self.setup(&mut con) {
            Ok(()) => self.came_up(con),
            Err(e) => self.go_down(e),
        }
    }

    /// Loads the library and checks the epoch; raises the counters after a data loss.
    fn setup(&mut self, con: &mut Connection) -> Result<(), String> {
        load_library(con)?;
        let candidate = uuid::Uuid::new_v4().simple().to_string();
        let epoch: String = fcall("cb_epoch")
            .arg(&candidate)
            .query(con)
            .map_err(|e| failure(&e))?;
        if self.epoch.as_ref().is_some_and(|known| *known != epoch) {
            log::warn!("cluster: Redis lost its data (new epoch); raising the room counters");
            self.raise(con)?;
        }
        self.epoch = Some(epoch);
        Ok(())
    }

    fn raise(&mut self, con: &mut Connection) -> Result<(), String> {
        let seen: Vec<(String, u64)> = lock(&self.shared.seen)
            .iter()
            .map(|(r, i)| (r.clone(), *i))
            .collect();
        for chunk in seen.chunks(500) {
            let mut c = fcall("cb_raise");
            for (room, id) in chunk {
                c.arg(room).arg(*id);
            }
            c.query::<Value>(con).map_err(|e| failure(&e))?;
        }
        Ok(())
    }

    fn came_up(&mut self, con: Connection) {
        self.con = Some(con);
        self.up_since = Instant::now();
        self.backoff = BACKOFF_FIRST;
        self.down_reported = false;
        self.set_registered(false);
        self.shared.up.store(true, Ordering::SeqCst);
        *lock(&self.shared.down_reason) = None;
        self.shared.push(Out::Event(Event::Reconnected));
    }

    fn set_registered(&mut self, yes: bool) {
        self.registered = yes;
        self.shared.registered.store(yes, Ordering::SeqCst);
    }

    fn go_down(&mut self, reason: String) {
        self.con = None;
        self.set_registered(false);
        self.shared.up.store(false, Ordering::SeqCst);
        self.next_try = Instant::now() + self.backoff;
        self.backoff = (self.backoff * 2).min(BACKOFF_MAX);
        if !self.down_reported {
            // The core logs it, once per outage, as it hears of it.
            self.down_reported = true;
            *lock(&self.shared.down_reason) = Some(reason.clone());
            self.shared.push(Out::Event(Event::Down { reason }));
        }
    }

    /// The heartbeat; the reaping once connected a full node timeout.
    fn beat(&mut self) {
        self.next_beat = Instant::now() + self.cfg.heartbeat();
        let Some(con) = self.con.as_mut() else {
            return;
        };
        let v = match fcall("cb_beat").arg(&self.node).query::<Value>(con) {
            Ok(v) => v,
            Err(e) => return self.go_down(failure(&e)),
        };
        let a = array(&v);
        let epoch = a.first().and_then(text).unwrap_or("");
        let present = a.get(1).and_then(int).unwrap_or(0) == 1;
        if self.epoch.as_deref() != Some(epoch) {
            // Redis lost its data under a live connection (FLUSHALL, a replica promoted).
            let con = self.con.take().expect("checked above");
            self.set_up(con);
            return;
        }
        if !present {
            log::warn!("cluster: this node was taken for dead; registering again");
            self.set_registered(false);
            self.shared.push(Out::Event(Event::Reconnected));
            return;
        }
        if self.up_since.elapsed() >= self.cfg.node_timeout {
            let timeout = self.cfg.node_timeout.as_millis() as u64;
            match fcall("cb_reap")
                .arg(&self.node)
                .arg(timeout)
                .query::<Value>(con)
            {
                Ok(v) => {
                    for node in array(&v).iter().filter_map(text) {
                        log::info!("cluster: node {node} timed out; its members left");
                    }
                }
                Err(e) => self.go_down(failure(&e)),
            }
        }
    }

    /// Runs one batch of jobs as one pipeline.
    fn run_batch(&mut self, batch: Vec<Job>) {
        let mut pipe = redis::pipe();
        pipe.ignore_errors();
        let mut pendings = Vec::new();
        let mut answers = Vec::new();
        let down = if self.con.is_none() {
            Some(
                lock(&self.shared.down_reason)
                    .clone()
                    .unwrap_or_else(|| "Redis unreachable".into()),
            )
        } else {
            None
        };
        for job in batch {
            if let Job::WakeAt(at) = job {
                self.wakes.push(Reverse(at));
                continue;
            }
            let mut cmds = Vec::new();
            let Some(pending) = self.encode(job, &mut cmds) else {
                continue;
            };
            let refused = match &down {
                Some(why) => Some(why.clone()),
                None if !self.registered && is_write(&pending) => {
                    Some("not registered with Redis yet".to_owned())
                }
                None => None,
            };
            match refused {
                Some(why) => answers.extend(pending.failed(&why)),
                None => {
                    for c in cmds {
                        pipe.add_command(c);
                    }
                    pendings.push(pending);
                }
            }
        }
        if pendings.is_empty() {
            self.shared.push_all(answers);
            return;
        }
        let con = self.con.as_mut().expect("not down");
        let values = match pipe.query::<Value>(con) {
            Ok(Value::Array(v)) => v,
            Ok(other) => vec![other],
            Err(e) => {
                let why = failure(&e);
                answers.extend(pendings.into_iter().filter_map(|p| p.failed(&why)));
                self.shared.push_all(answers);
                self.go_down(why);
                return;
            }
        };
        let mut lost_functions = false;
        let mut values = values.into_iter();
        for pending in pendings {
            let n = pending.commands();
            let vals: Vec<Value> = values.by_ref().take(n).collect();
            if let Some(err) = vals.iter().find_map(server_error) {
                if err.contains("Function not found") || err.contains("NOSCRIPT") {
                    lost_functions = true;
                }
                if self.refusals == 0 {
                    log::warn!(
                        "cluster: Redis refuses calls ({err}); they answer unavailable until it takes them again"
                    );
                } else {
                    log::debug!("cluster: Redis refused a call again: {err}");
                }
                self.refusals += 1;
                answers.extend(pending.failed(&format!("Redis: {err}")));
                continue;
            }
            if vals.len() < n {
                answers.extend(pending.failed("Redis gave too few answers"));
                continue;
            }
            if self.refusals > 0 {
                log::info!(
                    "cluster: Redis takes calls again ({} refused)",
                    self.refusals
                );
                self.refusals = 0;
            }
            answers.extend(self.answer(pending, &vals));
        }
        self.shared.push_all(answers);
        if lost_functions {
            // Redis was emptied under the connection: set up again (epoch, raise, library).
            self.go_down("Redis lost the chatterbox functions".into());
            self.next_try = Instant::now();
        }
    }

    /// Puts a job's commands in `cmds`; `None` for jobs that send nothing.
    fn encode(&mut self, job: Job, cmds: &mut Vec<redis::Cmd>) -> Option<Pending> {
        let node = self.node.clone();
        let pending = match job {
            Job::Call(call) => match call {
                Call::Register { members } => {
                    let mut c = fcall("cb_register");
                    c.arg(&node);
                    for m in &members {
                        c.arg(m.conn)
                            .arg(m.name.to_lowercase())
                            .arg(serde_json::to_string(m).unwrap_or_default());
                    }
                    cmds.push(c);
                    self.nonce += 1;
                    cmds.push(snapshot(&node, self.nonce));
                    Pending::Register { nonce: self.nonce }
                }
                Call::Connect { token, member } => {
                    cmds.push(
                        fcall("cb_connect")
                            .arg(&node)
                            .arg(member.conn)
                            .arg(member.name.to_lowercase())
                            .arg(serde_json::to_string(&member).unwrap_or_default())
                            .clone(),
                    );
                    Pending::Connect { token }
                }
                Call::Disconnect { conn } => {
                    cmds.push(fcall("cb_disconnect").arg(&node).arg(conn).clone());
                    Pending::Quiet
                }
                Call::Join { conn, room } => {
                    cmds.push(fcall("cb_join").arg(&node).arg(conn).arg(room).clone());
                    Pending::Quiet
                }
                Call::Leave { conn, room } => {
                    cmds.push(fcall("cb_leave").arg(&node).arg(conn).arg(room).clone());
                    Pending::Quiet
                }
                Call::Publish {
                    token,
                    room,
                    msg_id,
                    body,
                    conn,
                    serial,
                    echo,
                    dedup_ms,
                    floor,
                } => {
                    cmds.push(
                        fcall("cb_publish")
                            .arg(&room)
                            .arg(msg_id.unwrap_or_default())
                            .arg(dedup_ms)
                            .arg(&node)
                            .arg(conn)
                            .arg(serial)
                            .arg(if echo { 1 } else { 0 })
                            .arg(body)
                            .arg(self.cfg.history_per_room)
                            .arg(floor)
                            .clone(),
                    );
                    Pending::Publish { token, room }
                }
                Call::Direct {
                    node: to,
                    conn,
                    json,
                } => {
                    cmds.push(
                        redis::cmd("PUBLISH")
                            .arg(CHANNEL)
                            .arg(format!("x\n{to}\n{conn}\n{json}"))
                            .clone(),
                    );
                    Pending::Quiet
                }
                Call::NameBlock { count } => {
                    cmds.push(fcall("cb_names").arg(count).clone());
                    Pending::NameBlock { count }
                }
            },
            Job::Page { token, room, query } => {
                cmds.push(page_cmd(&room, query));
                Pending::Page { token, room }
            }
            Job::LastId { token, room } => {
                cmds.push(redis::cmd("GET").arg(format!("cb:c:{room}")).clone());
                Pending::LastId { token, room }
            }
            #[cfg(feature = "server-api")]
            Job::Remove { room, what } => {
                let (kind, id) = match what {
                    Removal::One(id) => ("one", id),
                    Removal::UpTo(id) => ("upto", id),
                };
                cmds.push(fcall("cb_remove").arg(room).arg(kind).arg(id).clone());
                Pending::Quiet
            }
            Job::Fetch { room, after, limit } => {
                cmds.push(
                    fcall("cb_page")
                        .arg(&room)
                        .arg("after")
                        .arg(after)
                        .arg(limit)
                        .clone(),
                );
                Pending::Fetch { room }
            }
            Job::Resync { rooms } => {
                self.nonce += 1;
                cmds.push(snapshot(&node, self.nonce));
                for room in &rooms {
                    cmds.push(redis::cmd("GET").arg(format!("cb:c:{room}")).clone());
                }
                Pending::Resync {
                    nonce: self.nonce,
                    rooms,
                }
            }
            Job::WakeAt(_) | Job::Close { .. } => return None,
        };
        Some(pending)
    }

    /// The answer of a job whose commands all succeeded.
    fn answer(&mut self, pending: Pending, vals: &[Value]) -> Vec<Out> {
        let v = &vals[0];
        match pending {
            Pending::Register { nonce } => {
                let taken = array(v).iter().filter_map(int).map(|c| c as u64).collect();
                self.set_registered(true);
                self.next_beat = Instant::now() + self.cfg.heartbeat();
                vec![
                    Out::Event(Event::Registered { taken }),
                    Out::SnapData {
                        nonce,
                        members: members(&vals[1]),
                    },
                ]
            }
            Pending::Connect { token } => vec![Out::Event(Event::Connected {
                token,
                ok: int(v) == Some(1),
            })],
            Pending::Publish { token, room } => {
                let a = array(v);
                match (a.first().and_then(int), a.get(1).and_then(int)) {
                    (Some(id), Some(repeat)) => {
                        self.shared.saw(&room, id as u64);
                        vec![Out::Event(Event::Published {
                            token,
                            room,
                            id: id as u64,
                            repeat: repeat == 1,
                        })]
                    }
                    _ => Pending::Publish { token, room }
                        .failed("Redis gave an unexpected answer")
                        .into_iter()
                        .collect(),
                }
            }
            Pending::NameBlock { count } => match int(v) {
                Some(first) => vec![Out::Event(Event::Names {
                    first: first as u64,
                    count,
                })],
                None => vec![],
            },
            Pending::Page { token, room } => {
                let result = page_parts(v)
                    .map(|(counter, more, entries)| {
                        self.shared.saw(&room, counter);
                        CountedPage {
                            page: Page {
                                messages: entries
                                    .iter()
                                    .filter_map(|e| stored_message(text(e)?))
                                    .collect(),
                                more,
                            },
                            counter,
                        }
                    })
                    .ok_or_else(|| StoreError("Redis gave an unexpected page".into()));
                vec![Out::Page {
                    token,
                    room,
                    result,
                }]
            }
            Pending::LastId { token, room } => {
                let result = int(v)
                    .map(|n| n as u64)
                    .ok_or_else(|| StoreError("Redis gave an unexpected counter".into()));
                if let Ok(n) = result {
                    self.shared.saw(&room, n);
                }
                vec![Out::LastId {
                    token,
                    room,
                    result,
                }]
            }
            Pending::Fetch { room } => {
                let result = page_parts(v)
                    .map(|(counter, more, entries)| Fetched {
                        messages: entries
                            .iter()
                            .filter_map(|e| entry_event(&room, text(e)?))
                            .collect(),
                        more,
                        counter,
                    })
                    .ok_or(());
                vec![Out::Fetched { room, result }]
            }
            Pending::Resync { nonce, rooms } => {
                let counters = rooms
                    .into_iter()
                    .zip(&vals[1..])
                    .map(|(room, v)| (room, int(v).unwrap_or(0) as u64))
                    .collect();
                vec![
                    Out::SnapData {
                        nonce,
                        members: members(v),
                    },
                    Out::Counters(counters),
                ]
            }
            Pending::Quiet => vec![],
        }
    }
}

/// Calls that change the cluster: refused until the node is registered.
fn is_write(p: &Pending) -> bool {
    matches!(
        p,
        Pending::Connect { .. }
            | Pending::Publish { .. }
            | Pending::NameBlock { .. }
            | Pending::Quiet
    )
}

fn snapshot(node: &str, nonce: u64) -> redis::Cmd {
    fcall("cb_snapshot").arg(node).arg(nonce).clone()
}

fn page_cmd(room: &str, query: Query) -> redis::Cmd {
    let (kind, bound, limit) = match query {
        // Nothing is below id 1; 0 means "no bound" to the function, so ask above everything.
        Query::Before {
            before: Some(0),
            limit,
        } => ("after", u64::MAX, limit),
        Query::Before { before, limit } => ("before", before.unwrap_or(0), limit),
        Query::After { after, limit } => ("after", after, limit),
    };
    fcall("cb_page")
        .arg(room)
        .arg(kind)
        .arg(bound)
        .arg(limit)
        .clone()
}

/// The subscriber thread: holds `SUBSCRIBE cb:ev` until `shared.stop`.
pub(crate) fn subscriber(client: Client, cfg: LinkConfig, node: NodeId, shared: Arc<Shared>) {
    let mut backoff = BACKOFF_FIRST;
    while !shared.stop.load(Ordering::SeqCst) {
        if let Err(e) = subscribe_once(&client, &cfg, &node, &shared, &mut backoff) {
            log::debug!("cluster: the subscription ended: {e}");
        }
        let until = Instant::now() + backoff;
        backoff = (backoff * 2).min(BACKOFF_MAX);
        while !shared.stop.load(Ordering::SeqCst) && Instant::now() < until {
            std::thread::sleep(SUB_READ.min(until.saturating_duration_since(Instant::now())));
        }
    }
}

fn subscribe_once(
    client: &Client,
    cfg: &LinkConfig,
    node: &str,
    shared: &Shared,
    backoff: &mut Duration,
) -> Result<(), String> {
    let mut con = connect(client, cfg.timeout)?;
    let mut ps = con.as_pubsub();
    ps.subscribe(CHANNEL).map_err(|e| e.to_string())?;
    ps.set_read_timeout(Some(SUB_READ.min(cfg.timeout)))
        .map_err(|e| e.to_string())?;
    *backoff = BACKOFF_FIRST;
    shared.push(Out::Subscribed);
    let mut heard = Instant::now();
    loop {
        if shared.stop.load(Ordering::SeqCst) {
            return Ok(());
        }
        match ps.get_message() {
            Ok(msg) => {
                heard = Instant::now();
                let Ok(line) = std::str::from_utf8(msg.get_payload_bytes()) else {
                    continue;
                };
                if let Some(out) = parse_event(node, line) {
                    if let Out::Live(Event::Message { room, id, .. }) = &out {
                        shared.saw(room, *id);
                    }
                    shared.push(out);
                }
            }
            Err(e) if e.is_timeout() => {
                if heard.elapsed() >= SUB_PING {
                    ps.set_read_timeout(Some(cfg.timeout))
                        .map_err(|e| e.to_string())?;
                    ps.ping::<Value>().map_err(|e| e.to_string())?;
                    ps.set_read_timeout(Some(SUB_READ.min(cfg.timeout)))
                        .map_err(|e| e.to_string())?;
                    heard = Instant::now();
                }
            }
            Err(e) => return Err(e.to_string()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn event_lines_are_parsed_and_other_nodes_presence_kept() {
        let m = parse_event("me", "m\nr\n7\nn2\n3\n9\n0\n,\"a\":\"x\ny\"}").unwrap();
        assert!(
            matches!(m, Out::Live(Event::Message { ref room, id: 7, ref node, conn: 3,
            serial: 9, echo: false, ref body }) if room == "r" && node == "n2" && body == ",\"a\":\"x\ny\"}")
        );
        assert!(parse_event("me", "d\nme\n3").is_none(), "own presence");
        assert!(matches!(
            parse_event("me", "d\nn2\n3"),
            Some(Out::Live(Event::Presence(Presence::Disconnected {
                conn: 3,
                ..
            })))
        ));
        assert!(matches!(
            parse_event("me", "l\nn2\n3\nroom"),
            Some(Out::Live(Event::Presence(Presence::Left { conn: 3, ref room, .. }))) if room == "room"
        ));
        assert!(
            parse_event("me", "x\nn2\n3\n{}").is_none(),
            "another node's direct"
        );
        assert!(matches!(
            parse_event("me", "x\nme\n3\n{\"a\":1}"),
            Some(Out::Live(Event::DirectIn { conn: 3, .. }))
        ));
        assert!(matches!(
            parse_event("me", "s\nme\n12"),
            Some(Out::SnapMark { nonce: 12 })
        ));
        assert!(parse_event("me", "q\nwhat").is_none());
    }

    #[test]
    fn history_entries_read_back_as_pages_and_as_live_events() {
        let entry = "{\"id\":12,\"member\":\"a\",\"message\":\"hi\",\"ts\":5,\"data\":{\"k\":[1]}}\nn1\n4\n8\n0";
        let m = stored_message(entry).unwrap();
        assert_eq!((m.id, m.member.as_str(), m.ts), (12, "a", 5));
        assert_eq!(m.data.unwrap().get(), "{\"k\":[1]}");
        let ev = entry_event("r", entry).unwrap();
        assert_eq!(
            ev,
            Event::Message {
                room: "r".into(),
                id: 12,
                node: "n1".into(),
                conn: 4,
                serial: 8,
                echo: false,
                body: ",\"member\":\"a\",\"message\":\"hi\",\"ts\":5,\"data\":{\"k\":[1]}}".into()
            }
        );
    }

    #[test]
    fn newlines_inside_data_stay_in_the_stored_json() {
        let json = "{\"id\":3,\"member\":\"a\",\"message\":\"x\",\"ts\":1,\"data\":{\"k\":\n\n1}}";
        let entry = format!("{json}\nn1\n4\n8\n1");
        let m = stored_message(&entry).expect("the message, not dropped");
        assert_eq!(m.data.unwrap().get(), "{\"k\":\n\n1}");
        let Some(Event::Message {
            body, node, echo, ..
        }) = entry_event("r", &entry)
        else {
            panic!("not read back");
        };
        assert_eq!((node.as_str(), echo), ("n1", true));
        assert!(body.ends_with("{\"k\":\n\n1}}"), "{body}");
    }
}
