//! The cluster engine: the loop thread's side of the Redis link. It hands requests to the
//! command thread, and turns what the helper threads queued into replies: messages through
//! `order.rs` (id order per room, gaps healed), snapshots where their mark falls among the
//! presence events, and an answer for every token, even when Redis is gone or the engine
//! closes.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::sync::mpsc::{self, Sender};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use super::link::{self, Commander, Job, LinkConfig, Out, Shared};
use super::order::{Action, Order};
use super::{Call, CallToken, Event, NodeId};
use crate::config::Config;
use crate::store::StoreError;
use crate::store::engine::{Engine, Reply, Request, RequestToken};

/// The cluster engine (see the [module docs](super)).
pub struct ClusterEngine {
    node: NodeId,
    shared: Arc<Shared>,
    jobs: Sender<Job>,
    order: Order,
    replies: VecDeque<Reply>,
    threads: Vec<JoinHandle<()>>,
    closed: bool,
    /// Calls with a token not answered yet (a token may repeat: counted).
    open_calls: HashMap<CallToken, u32>,
    /// Reads not answered yet, by token and room.
    open_reads: HashMap<(RequestToken, String), u32>,
    /// Snapshots read whose mark has not come yet, by nonce.
    snap_data: Vec<(u64, Vec<super::MemberRecord>)>,
    /// The mark came before the data: presence events wait here until it does.
    snap_waiting: Option<(u64, Vec<Event>)>,
}

/// A fresh node id: 16 hex digits of a random UUID.
pub fn new_node_id() -> NodeId {
    uuid::Uuid::new_v4().simple().to_string()[..16].to_owned()
}

fn closed_error() -> StoreError {
    StoreError("the cluster engine is closed".into())
}

impl ClusterEngine {
    /// Connects to `cfg.redis` once (bounded by `--redis-timeout`), loads the functions and
    /// starts the two helper threads. An unreachable Redis or a bad URL is an error naming
    /// the URL and the reason. `notify` is called from the helper threads when replies wait.
    pub fn open(cfg: &Config, node: NodeId, notify: Box<dyn Fn() + Send>) -> Result<Self, String> {
        let url = cfg.redis.clone();
        let client = link::client(&url)?;
        let mut con = link::connect(&client, cfg.redis_timeout)
            .map_err(|e| format!("--redis '{url}': cannot connect: {e}"))?;
        link::load_library(&mut con).map_err(|e| format!("--redis '{url}': {e}"))?;
        let lcfg = LinkConfig {
            timeout: cfg.redis_timeout,
            node_timeout: cfg.node_timeout,
            history_per_room: cfg.cluster_history_per_room,
        };
        let shared = Arc::new(Shared::new(notify));
        shared.up.store(true, Ordering::SeqCst);
        let (tx, rx) = mpsc::channel();
        let commander = Commander::new(
            client.clone(),
            con,
            lcfg.clone(),
            node.clone(),
            shared.clone(),
            rx,
        );
        let cmd = std::thread::Builder::new()
            .name("cluster-cmd".into())
            .spawn(move || commander.run())
            .map_err(|e| format!("starting the cluster thread: {e}"))?;
        let sub_shared = shared.clone();
        let sub_node = node.clone();
        let sub = std::thread::Builder::new()
            .name("cluster-sub".into())
            .spawn(move || link::subscriber(client, lcfg, sub_node, sub_shared))
            .map_err(|e| format!("starting the cluster thread: {e}"))?;
        Ok(ClusterEngine {
            node,
            shared,
            jobs: tx,
            order: Order::new(),
            replies: VecDeque::new(),
            threads: vec![cmd, sub],
            closed: false,
            open_calls: HashMap::new(),
            open_reads: HashMap::new(),
            snap_data: Vec::new(),
            snap_waiting: None,
        })
    }

    /// A fresh node id (the same as [`new_node_id`]).
    pub fn new_node_id() -> NodeId {
        new_node_id()
    }

    /// This node's id.
    pub fn node(&self) -> &str {
        &self.node
    }

    /// Why Redis cannot be reached, while it cannot (for `/health`).
    pub fn down_reason(&self) -> Option<String> {
        self.shared
            .down_reason
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// For tests: stops both threads as if the process had been killed (no unregister, no
    /// more heartbeats), without waiting. Outstanding requests are answered as by `close`.
    #[doc(hidden)]
    pub fn crash(&mut self) {
        self.shutdown(Instant::now() + Duration::from_secs(5), false);
    }

    fn send(&mut self, job: Job) {
        self.shared.pending.fetch_add(1, Ordering::SeqCst);
        if let Err(mpsc::SendError(job)) = self.jobs.send(job) {
            self.shared.pending.fetch_sub(1, Ordering::SeqCst);
            self.refuse(job);
        }
    }

    /// Answers a job that cannot run (closed) at once.
    fn refuse(&mut self, job: Job) {
        match job {
            Job::Call(Call::Connect { token, .. }) | Job::Call(Call::Publish { token, .. }) => {
                self.forget_call(token);
                self.replies.push_back(Reply::Cluster(Event::Failed {
                    token,
                    error: closed_error(),
                }));
            }
            Job::Page { token, room, .. } | Job::LastId { token, room } => {
                self.forget_read(token, &room);
                self.replies.push_back(Reply::Unavailable {
                    token,
                    room,
                    error: closed_error(),
                });
            }
            _ => {}
        }
    }

    fn forget_call(&mut self, token: CallToken) {
        if let Some(n) = self.open_calls.get_mut(&token) {
            *n -= 1;
            if *n == 0 {
                self.open_calls.remove(&token);
            }
        }
    }

    fn forget_read(&mut self, token: RequestToken, room: &str) {
        let key = (token, room.to_owned());
        if let Some(n) = self.open_reads.get_mut(&key) {
            *n -= 1;
            if *n == 0 {
                self.open_reads.remove(&key);
            }
        }
    }

    /// Turns what the threads queued into replies.
    fn absorb(&mut self) {
        let outs = self.shared.take();
        if outs.is_empty() {
            return;
        }
        let now = Instant::now();
        for out in outs {
            match out {
                Out::Event(ev) => {
                    match &ev {
                        Event::Failed { token, .. }
                        | Event::Connected { token, .. }
                        | Event::Published { token, .. } => self.forget_call(*token),
                        Event::Down { .. } => self.end_snapshot_wait(),
                        _ => {}
                    }
                    // The subscription may have come back while calls could not run: its
                    // resync failed. Heal again now that they can.
                    let resync = matches!(ev, Event::Reconnected);
                    self.replies.push_back(Reply::Cluster(ev));
                    if resync {
                        self.resync();
                    }
                }
                Out::Live(ev @ Event::Message { .. }) => self.order.message(ev),
                Out::Live(ev @ Event::Presence(_)) => match &mut self.snap_waiting {
                    Some((_, held)) => held.push(ev),
                    None => self.replies.push_back(Reply::Cluster(ev)),
                },
                Out::Live(ev) => self.replies.push_back(Reply::Cluster(ev)),
                Out::Page {
                    token,
                    room,
                    result,
                } => {
                    self.forget_read(token, &room);
                    self.order.page(now, token, room, result);
                }
                Out::LastId {
                    token,
                    room,
                    result,
                } => {
                    self.forget_read(token, &room);
                    let reply = match result {
                        Ok(last_id) => Reply::LastId {
                            token,
                            room: room.clone(),
                            last_id,
                        },
                        Err(error) => Reply::Unavailable {
                            token,
                            room: room.clone(),
                            error,
                        },
                    };
                    self.order.reply(now, &room, reply);
                }
                Out::Fetched { room, result } => self.order.fetched(now, &room, result),
                Out::Counters(counters) => self.order.counters(counters),
                Out::SnapData { nonce, members } => match self.snap_waiting.take() {
                    Some((waited, held)) if waited == nonce => {
                        self.replies
                            .push_back(Reply::Cluster(Event::Snapshot { members }));
                        self.replies.extend(held.into_iter().map(Reply::Cluster));
                    }
                    other => {
                        let stale = other.as_ref().is_some_and(|(w, _)| *w > nonce);
                        self.snap_waiting = other;
                        if !stale {
                            self.snap_data.push((nonce, members));
                        }
                    }
                },
                Out::SnapFailed { nonce } => {
                    if self.snap_waiting.as_ref().is_some_and(|(n, _)| *n == nonce) {
                        self.end_snapshot_wait();
                    }
                }
                Out::SnapMark { nonce } => {
                    // Events held for an earlier mark came before this one: out they go.
                    self.end_snapshot_wait();
                    self.snap_data.retain(|(n, _)| *n >= nonce);
                    match self.snap_data.iter().position(|(n, _)| *n == nonce) {
                        Some(i) => {
                            let (_, members) = self.snap_data.remove(i);
                            self.replies
                                .push_back(Reply::Cluster(Event::Snapshot { members }));
                        }
                        // Not read yet: what follows the mark waits for it.
                        None => self.snap_waiting = Some((nonce, Vec::new())),
                    }
                }
                Out::Subscribed => self.resync(),
                Out::Tick => self.order.tick(now),
            }
        }
        self.run_order();
    }

    /// A fresh snapshot, and the counters of every tracked room to fill what was missed.
    fn resync(&mut self) {
        if !self.closed {
            let rooms = self.order.last_ids().map(|(r, _)| r.to_owned()).collect();
            self.send(Job::Resync { rooms });
        }
    }

    fn end_snapshot_wait(&mut self) {
        if let Some((_, held)) = self.snap_waiting.take() {
            self.replies.extend(held.into_iter().map(Reply::Cluster));
        }
    }

    fn run_order(&mut self) {
        while let Some(action) = self.order.pop() {
            match action {
                Action::Reply(r) => self.replies.push_back(r),
                Action::Fetch { room, after, limit } => {
                    if !self.closed {
                        self.send(Job::Fetch { room, after, limit });
                    }
                }
                Action::WakeAt(at) => {
                    if !self.closed {
                        self.send(Job::WakeAt(at));
                    }
                }
            }
        }
    }

    fn shutdown(&mut self, deadline: Instant, unregister: bool) {
        if self.closed {
            return;
        }
        self.closed = true;
        self.shared.pending.fetch_add(1, Ordering::SeqCst);
        let _ = self.jobs.send(Job::Close { unregister });
        self.shared.stop.store(true, Ordering::SeqCst);
        while self.threads.iter().any(|t| !t.is_finished()) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(5));
        }
        for t in std::mem::take(&mut self.threads) {
            if t.is_finished() {
                let _ = t.join();
            }
        }
        self.shared.up.store(false, Ordering::SeqCst);
        self.shared.registered.store(false, Ordering::SeqCst);
        self.absorb();
        self.order.fail_all(closed_error());
        self.run_order();
        self.end_snapshot_wait();
        for (token, n) in std::mem::take(&mut self.open_calls) {
            for _ in 0..n {
                self.replies.push_back(Reply::Cluster(Event::Failed {
                    token,
                    error: closed_error(),
                }));
            }
        }
        for ((token, room), n) in std::mem::take(&mut self.open_reads) {
            for _ in 0..n {
                self.replies.push_back(Reply::Unavailable {
                    token,
                    room: room.clone(),
                    error: closed_error(),
                });
            }
        }
    }
}

impl Engine for ClusterEngine {
    fn request(&mut self, req: Request) {
        let job = match req {
            Request::Append { .. } => return,
            Request::Reserve { token, room, .. } => {
                self.replies.push_back(Reply::IdsReserved {
                    token,
                    room,
                    up_to: u64::MAX,
                });
                return;
            }
            #[cfg(feature = "server-api")]
            Request::Remove { room, what } => Job::Remove { room, what },
            Request::Page { token, room, query } => Job::Page { token, room, query },
            Request::LastId { token, room } => Job::LastId { token, room },
            Request::Cluster(call) => Job::Call(call),
        };
        if self.closed {
            return self.refuse(job);
        }
        match &job {
            Job::Call(Call::Connect { token, .. }) | Job::Call(Call::Publish { token, .. }) => {
                *self.open_calls.entry(*token).or_default() += 1;
            }
            Job::Page { token, room, .. } | Job::LastId { token, room } => {
                *self.open_reads.entry((*token, room.clone())).or_default() += 1;
            }
            _ => {}
        }
        self.send(job);
    }

    fn poll(&mut self) -> Option<Reply> {
        if self.replies.is_empty() {
            self.absorb();
        }
        self.replies.pop_front()
    }

    fn writable(&self) -> bool {
        !self.closed
            && self.shared.up.load(Ordering::SeqCst)
            && self.shared.registered.load(Ordering::SeqCst)
    }

    fn flush(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(30);
        while self.shared.pending.load(Ordering::SeqCst) > 0 && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(2));
        }
    }

    fn close(&mut self, deadline: Instant) -> u64 {
        self.shutdown(deadline, true);
        0
    }
}

impl Drop for ClusterEngine {
    fn drop(&mut self) {
        // Without close (a test, a panic): stop the threads, do not wait for them.
        if !self.closed {
            self.closed = true;
            let _ = self.jobs.send(Job::Close { unregister: false });
            self.shared.stop.store(true, Ordering::SeqCst);
        }
    }
}
