//! Cluster mode (`--redis`, cargo feature `cluster`): several chatterbox processes, on one
//! machine or many, behave as one server by sharing rooms, members, ids and history through
//! Redis. No protocol of our own runs between nodes: every node talks to Redis only.
//!
//! # Shape
//!
//! The cluster is a history [`Engine`](crate::store::engine::Engine) with more to say:
//! [`ClusterEngine`] implements the engine boundary for pages and last ids (history lives in
//! Redis), and carries the cluster's own requests ([`Call`], as
//! `Request::Cluster`) and inputs ([`Event`], as `Reply::Cluster`) through the same
//! `request`/`poll`/`notify` seam. The chat core stays sans-IO: `chat/cluster.rs` keeps the
//! other nodes' members as *remote members* in the same tables as local ones, so `list`,
//! `rooms`, the notices and the REST views see the whole cluster without asking Redis.
//!
//! Redis is reached from two helper threads with blocking connections of the `redis` crate
//! (`link.rs`), which talk to the loop through channels and the loop's `Waker`, like the
//! SQLite writer: one thread runs the calls (all calls waiting are sent as one pipeline), one
//! holds the subscription. Every call is bounded by `--redis-timeout`; a call that fails or
//! times out is answered `Unavailable` and the connection is made again with a back-off.
//!
//! # One broadcast
//!
//! ```text
//!  member ──broadcast──▶ node A ──FCALL cb_publish──▶ Redis: dedup check, INCR cb:c:{room},
//!                                                      ZADD cb:h:{room}, trim, PUBLISH cb:ev
//!  member ◀────ack────── node A ◀──── id ──────────────┘            │
//!  members on A ◀─ deliver ─ node A ◀── cb:ev message (room, id) ───┤
//!  members on B ◀─ deliver ─ node B ◀── cb:ev message (room, id) ───┘
//! ```
//!
//! Every node, the sender's included, delivers from the subscription, in id order per room:
//! `order.rs` keeps the last id delivered per room and fetches a missing range from Redis
//! before delivering past a gap (a lost pub/sub message, a resubscribe), and drops repeats.
//!
//! # Keys (prefix `cb:`)
//!
//! | key | type | what |
//! |---|---|---|
//! | `cb:c:{room}` | string | the room's counter: the last id handed out |
//! | `cb:h:{room}` | sorted set | the room's messages, score = id, member = stored JSON, then `\n` and the sender's node, conn, serial, echo (`\n`-separated; for healing a gap) |
//! | `cb:d:{room}:{msg_id}` | string | first id of a `msg_id`, expiring after the dedup window |
//! | `cb:nodes` | sorted set | node → last heartbeat, in Redis `TIME` milliseconds |
//! | `cb:m:{node}` | hash | conn → member record (JSON) of the node's members |
//! | `cb:names` | hash | lower-case name → `{node}:{conn}`, the cluster-wide name claims |
//! | `cb:autoname` | string | the `member<N>` counter, taken by nodes in blocks |
//! | `cb:epoch` | string | set once; its loss tells that Redis lost its data |
//!
//! The functions (a Redis 7 library loaded at start) are in `chatterbox.lua`.

mod engine;
mod link;
mod order;

pub use engine::{ClusterEngine, new_node_id};

use crate::store::{Page, StoreError};

/// A node's name in the cluster: 16 hex digits, random per start.
pub type NodeId = String;

/// A number the core picks for a call; its answer carries it back.
pub type CallToken = u64;

/// One member as the cluster knows it (`cb:m:{node}`).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct MemberRecord {
    /// The node it is connected to.
    pub node: NodeId,
    /// Its connection on that node.
    pub conn: u64,
    /// Cluster-wide connection order: Unix ms of the connect × 1000 + the node's serial
    /// modulo 1000 ("oldest connection first" across nodes).
    pub order: u64,
    /// Its name (case kept).
    pub name: String,
    /// Its member id.
    pub id: String,
    /// The rooms it is in.
    pub rooms: Vec<String>,
}

/// What the core asks of the cluster (carried as `Request::Cluster`).
#[derive(Debug, Clone, PartialEq)]
pub enum Call {
    /// (Re-)register this node and all its members (after [`Event::Reconnected`]): heartbeat,
    /// replace `cb:m:{node}`, claim every name. Answer: [`Event::Registered`], then a fresh
    /// [`Event::Snapshot`].
    Register {
        /// Every member connected to this node now.
        members: Vec<MemberRecord>,
    },
    /// A member connected: claim its name, store its record, publish it. Answer:
    /// [`Event::Connected`].
    Connect {
        /// Echoed.
        token: CallToken,
        /// The member (rooms empty: the joins follow).
        member: MemberRecord,
    },
    /// A member of this node disconnected: drop its record and name, publish it. No answer.
    Disconnect {
        /// Its connection.
        conn: u64,
    },
    /// A member of this node joined a room. No answer.
    Join {
        /// Its connection.
        conn: u64,
        /// The room.
        room: String,
    },
    /// A member of this node left a room. No answer.
    Leave {
        /// Its connection.
        conn: u64,
        /// The room.
        room: String,
    },
    /// A broadcast: dedup, number, store, publish, atomically. Answer: [`Event::Published`]
    /// or [`Event::Failed`].
    Publish {
        /// Echoed.
        token: CallToken,
        /// The room.
        room: String,
        /// The sender's idempotency key.
        msg_id: Option<String>,
        /// The stored JSON after its `"id":N`: `,"member":…,"message":…,"ts":…[,"data":…]}`.
        body: String,
        /// The sender's connection (for `echo:false`).
        conn: u64,
        /// The sender's serial on its node (a reused connection id is another member).
        serial: u64,
        /// Whether the sender gets its own message.
        echo: bool,
        /// Milliseconds a `msg_id` is remembered.
        dedup_ms: u64,
    },
    /// A direct message to a member of another node. No answer.
    Direct {
        /// The node the member is on.
        node: NodeId,
        /// Its connection there.
        conn: u64,
        /// The `direct` event's JSON.
        json: String,
    },
    /// A block of `member<N>` numbers. Answer: [`Event::Names`].
    NameBlock {
        /// How many.
        count: u64,
    },
}

/// A change of another node's members, from the subscription.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Presence {
    /// A member connected (its rooms follow as joins).
    Connected(MemberRecord),
    /// A member disconnected, or its node died: it leaves every room.
    Disconnected {
        /// Its node.
        node: NodeId,
        /// Its connection.
        conn: u64,
    },
    /// A member joined a room.
    Joined {
        /// Its node.
        node: NodeId,
        /// Its connection.
        conn: u64,
        /// The room.
        room: String,
    },
    /// A member left a room.
    Left {
        /// Its node.
        node: NodeId,
        /// Its connection.
        conn: u64,
        /// The room.
        room: String,
    },
}

/// What the cluster tells the core (carried as `Reply::Cluster`).
#[derive(Debug, Clone, PartialEq)]
pub enum Event {
    /// A room message, from any node, this one included: in id order per room, no gap, no
    /// repeat.
    Message {
        /// The room.
        room: String,
        /// Its id.
        id: u64,
        /// The sender's node.
        node: NodeId,
        /// The sender's connection there.
        conn: u64,
        /// The sender's serial there.
        serial: u64,
        /// Whether the sender gets it.
        echo: bool,
        /// The stored JSON after `"id":N` (see [`Call::Publish`]).
        body: String,
    },
    /// Another node's members changed (this node's own changes are not repeated to it).
    Presence(Presence),
    /// A direct message for a member of this node.
    DirectIn {
        /// The member's connection.
        conn: u64,
        /// The event's JSON.
        json: String,
    },
    /// The answer to [`Call::Connect`]: `ok` false when the name is taken on another node.
    Connected {
        /// The call's token.
        token: CallToken,
        /// Whether the name was claimed.
        ok: bool,
    },
    /// The answer to [`Call::Publish`]: `repeat` when the `msg_id` was seen (`id` is the
    /// first one's).
    Published {
        /// The call's token.
        token: CallToken,
        /// The room.
        room: String,
        /// The message's id.
        id: u64,
        /// A resend of a message already stored.
        repeat: bool,
    },
    /// A call with a token could not be carried out (Redis unreachable, timed out): nothing
    /// changed.
    Failed {
        /// The call's token.
        token: CallToken,
        /// Why.
        error: StoreError,
    },
    /// The answer to [`Call::NameBlock`]: numbers `first..first + count` are this node's.
    Names {
        /// The first number.
        first: u64,
        /// How many.
        count: u64,
    },
    /// Redis is reachable again (or for the first time): the core answers with
    /// [`Call::Register`] listing its members.
    Reconnected,
    /// The answer to [`Call::Register`]: the members whose names another node took meanwhile
    /// (the core closes them).
    Registered {
        /// Their connections.
        taken: Vec<u64>,
    },
    /// Every member of the other nodes, after a (re)subscribe: the core replaces its remote
    /// members with these.
    Snapshot {
        /// The members.
        members: Vec<MemberRecord>,
    },
    /// Redis cannot be reached: commands that need it get `unavailable` until
    /// [`Event::Reconnected`].
    Down {
        /// Why, for the log and `/health`.
        reason: String,
    },
}

/// A page the cluster read, with the room's counter at the same instant.
#[derive(Debug, Clone, PartialEq)]
pub struct CountedPage {
    /// The page.
    pub page: Page,
    /// The room's last id when the page was read.
    pub counter: u64,
}
