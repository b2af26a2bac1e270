//! The chat core, sans-IO: members, rooms, history, limits and every rule of the protocol.
//!
//! [`Chat`] never touches a socket, a clock or a file. The transport tells it what happened —
//! a member connected ([`Chat::connect`]), a text frame arrived ([`Chat::handle_text`]), a
//! connection ended ([`Chat::disconnect`]), the history engine answered
//! ([`Chat::handle_engine`]) — with the time as a [`Now`], and the core answers by calling an
//! [`Outbox`]: frames to send to connections, connections to close. History goes through the
//! asynchronous [`Engine`] boundary (requests in, replies out; see [`crate::store::engine`]);
//! what the core awaits from it is in `pending.rs`. Member ids come from the [`MemberIds`] it
//! is given.
//!
//! Where things are: every command, its fields and its `apply`, in its own file under
//! `commands/` (the list and the dispatch in `commands/mod.rs`); membership, both ways, in
//! `rooms.rs`; the `msg_id` window in `dedup.rs`; the rate limit in `ratelimit.rs`; decoding
//! and events in [`protocol`]. Chat's fields are private: the transport and the REST API read
//! through methods, and only code in this module tree changes state.

use std::collections::{BTreeSet, HashMap, HashSet, VecDeque};
use std::time::Instant;

use log::info;
use tungstenite::protocol::frame::Frame;
use tungstenite::protocol::frame::coding::{Data, OpCode};

use crate::auth::{Patterns, Permissions};
use crate::config::Config;
use crate::store::engine::{Engine, Request, RequestToken};
use crate::store::{Page, Query};

#[cfg(feature = "server-api")]
mod api;
mod close;
#[cfg(feature = "cluster")]
mod cluster;
mod commands;
mod dedup;
mod pending;
pub mod protocol;
mod ratelimit;
mod rooms;
pub mod validate;

use dedup::Dedup;
pub use pending::RestPage;
use pending::{Held, JoinWait, Read};
use protocol::{CommandError, ErrorCode, Event, decode};
use ratelimit::TokenBucket;
use rooms::Rooms;

#[cfg(feature = "server-api")]
pub use api::{ApiAnswer, ApiCalls, KICK_REASON, SERVER, ServerPost};
pub use close::{Close, Reason};

/// The name of the room every member joins on connect.
pub const DEFAULT_ROOM: &str = "general";
/// The name notices are sent under; no member may take it.
pub const SYSTEM: &str = "system";

/// A connection, as the transport numbers it.
pub type ConnId = usize;

/// The moment an input happens: a monotonic instant for limits, wall-clock ms for `ts`.
#[derive(Debug, Clone, Copy)]
pub struct Now {
    /// For rate limits and windows.
    pub mono: Instant,
    /// Unix milliseconds, for timestamps.
    pub unix_ms: u64,
}

/// Where member ids come from when authentication supplies none: called once per member.
///
/// The server passes UUID v4s; tests and fuzzing pass [`counted_ids`] so that a run repeats
/// exactly. The core itself has no randomness.
pub type MemberIds = Box<dyn FnMut() -> String>;

/// Member ids `00000000-0000-4000-8000-000000000001`, `…002`, and so on: counted, yet shaped
/// like a UUID v4 (version 4, RFC 4122 variant), as clients expect.
pub fn counted_ids() -> MemberIds {
    let mut n: u64 = 0;
    Box::new(move || {
        n += 1;
        format!("00000000-0000-4000-8000-{n:012x}")
    })
}

/// One event, serialized once and framed as a WebSocket text frame, ready to copy to any number
/// of connections.
#[derive(Debug, Clone)]
pub struct Payload {
    framed: Vec<u8>,
    header: usize,
}

impl Payload {
    /// Frames `json` as one unmasked, final text frame.
    pub fn new(json: &str) -> Self {
        let frame = Frame::message(json.as_bytes().to_vec(), OpCode::Data(Data::Text), true);
        let mut framed = Vec::with_capacity(frame.len());
        // Writing into a Vec cannot fail.
        let _ = frame.format(&mut framed);
        Payload {
            header: framed.len() - json.len(),
            framed,
        }
    }

    /// The frame's bytes, header included.
    pub fn bytes(&self) -> &[u8] {
        &self.framed
    }

    /// The JSON text carried.
    pub fn json(&self) -> &str {
        std::str::from_utf8(&self.framed[self.header..]).unwrap_or_default()
    }
}

/// Where the core's effects go. The transport implements it over sockets; tests record.
///
/// This and [`Engine`] are the seams a broker-backed engine would implement to share rooms
/// across processes: every room delivery passes through [`Outbox::send`] after
/// [`Outbox::room_published`], and every stored message through the store.
pub trait Outbox {
    /// Queue a frame to one connection: room traffic and anything else it did not ask for.
    fn send(&mut self, to: ConnId, payload: &Payload);
    /// Queue the answer to a connection's own command (or its welcome). The transport must not
    /// close a connection for a reply that meets an output buffer within its bound, however big
    /// the reply is: the server chose its size. Defaults to [`Outbox::send`].
    fn reply(&mut self, to: ConnId, payload: &Payload) {
        self.send(to, payload);
    }
    /// Close a connection for `why` ([`Close`] knows its code and reason). The core has already
    /// removed its member.
    fn close(&mut self, to: ConnId, why: Close);
    /// A member message was published to a room (after local delivery). Single-process servers
    /// ignore it; a scale-out engine forwards it.
    fn room_published(&mut self, _room: &str, _payload: &Payload) {}
}

/// An [`Outbox`] that keeps every event as JSON and every close, by connection: for driving the
/// core in memory (tests, fuzzing, or embedding the core without a transport).
#[derive(Debug, Default)]
pub struct Recorder {
    /// Events in the order they were sent, with their connection.
    pub sent: Vec<(ConnId, serde_json::Value)>,
    /// Closes asked for: connection, close code, reason.
    pub closed: Vec<(ConnId, u16, String)>,
}

impl Outbox for Recorder {
    fn send(&mut self, to: ConnId, payload: &Payload) {
        // The core only frames JSON it serialized itself, so this always parses.
        let event = serde_json::from_str(payload.json()).unwrap_or_default();
        self.sent.push((to, event));
    }
    fn close(&mut self, to: ConnId, why: Close) {
        self.closed.push((to, why.code(), why.reason().to_string()));
    }
}

impl Recorder {
    /// Takes every event `conn` received so far, in order.
    pub fn take(&mut self, conn: ConnId) -> Vec<serde_json::Value> {
        let (mine, rest) = std::mem::take(&mut self.sent)
            .into_iter()
            .partition(|(c, _)| *c == conn);
        self.sent = rest;
        mine.into_iter().map(|(_, v)| v).collect()
    }

    /// Takes what `conn` received so far and keeps the events named `event`.
    pub fn events(&mut self, conn: ConnId, event: &str) -> Vec<serde_json::Value> {
        self.take(conn)
            .into_iter()
            .filter(|v| v["event"] == event)
            .collect()
    }
}

/// Why a connection was refused before the upgrade: an HTTP status and a short text.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    /// HTTP status code.
    pub status: u16,
    /// Short explanation for the body.
    pub reason: String,
}

/// Counters shown by `/api/stats` and `/metrics`.
#[derive(Debug, Clone, Default)]
pub struct Stats {
    /// Frames received from members.
    pub messages_in: u64,
    /// Event frames queued to members.
    pub messages_out: u64,
    /// Member broadcasts stored.
    pub broadcasts: u64,
    /// Connections closed for not reading their output.
    pub slow_consumers_closed: u64,
    /// Commands dropped by the rate limit.
    pub rate_limited: u64,
    /// Connections closed for flooding.
    pub flood_closed: u64,
    /// Members that have connected since start.
    pub members_connected_total: u64,
    /// Server API calls carried out, by endpoint.
    #[cfg(feature = "server-api")]
    pub api_calls: ApiCalls,
}

struct Member {
    serial: u64,
    /// Where it sorts in "oldest connection first": the serial standalone; in cluster mode
    /// a key that orders members of every node (`MemberRecord::order`).
    order: u64,
    id: String,
    name: String,
    bucket: TokenBucket,
    strikes: u32,
    /// What its token allows (everything without auth).
    #[cfg(feature = "server-api")]
    perms: Permissions,
}

/// An answer waiting for the store to hold a message durably.
struct PendingAck {
    ticket: u64,
    to: AckTo,
}

/// Who a durable message's answer goes to.
enum AckTo {
    /// A member's `ack`, when it is still the member that sent it.
    Member {
        conn: ConnId,
        serial: u64,
        json: String,
    },
    /// A server API publish: `201` (or `200` for a repeat) with the id.
    #[cfg(feature = "server-api")]
    Rest {
        token: RequestToken,
        room: String,
        id: u64,
        repeat: bool,
    },
}

/// The chat: every member, room and rule. See the module docs.
pub struct Chat {
    cfg: Config,
    members: HashMap<ConnId, Member>,
    /// Name in ASCII lower case → connection. Names are ASCII, so ASCII case is the only
    /// case there is: Unicode folding would let `K` (U+212A) stand for `k`.
    names: HashMap<String, ConnId>,
    /// (order key, connection), for "oldest connection first".
    order: BTreeSet<(u64, ConnId)>,
    /// Who is in which room, both ways.
    rooms: Rooms,
    /// The history engine: requests in, replies out (see [`crate::store::engine`]).
    engine: Box<dyn Engine>,
    /// `msg_id`s seen per room, for the dedup window.
    dedup: Dedup,
    pending_acks: VecDeque<PendingAck>,
    /// The ticket of the newest append (the engine numbers appends 1, 2, 3, … too).
    last_ticket: u64,
    /// The highest ticket the engine reported durable (`DurableUpTo`).
    durable: u64,
    /// The last request token handed out.
    next_token: RequestToken,
    /// Requests awaiting their reply, by token.
    reads: HashMap<RequestToken, Read>,
    /// Joiners waiting for their page, by connection and room, with the live events held.
    waits: HashMap<(ConnId, String), JoinWait>,
    /// Broadcasts waiting for their room's id, in order, by room.
    held: HashMap<String, VecDeque<Held>>,
    /// How many broadcasts `held` holds (they count against `--max-unstored`).
    held_count: usize,
    /// Rooms with a `LastId` or `Reserve` in flight.
    asking: HashSet<String>,
    /// REST pages answered, for the transport to take.
    rest_pages: Vec<(RequestToken, RestPage)>,
    /// Server API calls answered later (publish, delete), for the transport to take.
    #[cfg(feature = "server-api")]
    api_answers: Vec<(RequestToken, ApiAnswer)>,
    /// `--read-only-rooms`.
    read_only: Patterns,
    next_serial: u64,
    next_auto_name: u64,
    member_ids: MemberIds,
    stats: Stats,
    /// Cluster mode (`--redis`): the other nodes' members and what is asked of Redis.
    #[cfg(feature = "cluster")]
    cluster: Option<cluster::ClusterState>,
}

/// What a command handler needs besides the chat: who asked, when, and where answers go.
struct Cx<'a, O: Outbox> {
    conn: ConnId,
    now: Now,
    request_id: Option<&'a str>,
    out: &'a mut O,
}

impl Chat {
    /// A chat with the default room, the given history engine, and member ids from
    /// `member_ids` (the server: UUID v4; tests: [`counted_ids`]). The default room's last id
    /// is asked for at once; its broadcasts wait for the answer.
    pub fn new(cfg: Config, engine: Box<dyn Engine>, member_ids: MemberIds) -> Self {
        Chat::build(cfg, engine, member_ids, |_| {})
    }

    /// [`Chat::new`] with `setup` run on the chat before it first polls the engine.
    fn build(
        cfg: Config,
        engine: Box<dyn Engine>,
        member_ids: MemberIds,
        setup: impl FnOnce(&mut Chat),
    ) -> Self {
        let dedup = Dedup::new(cfg.dedup_window, cfg.max_dedup_entries);
        let rooms = Rooms::new(cfg.max_rooms, cfg.max_rooms_per_member, 0);
        // Checked by `Config::validate`; a config built in code with bad patterns gets none.
        #[cfg(feature = "server-api")]
        let read_only =
            Patterns::parse_list(&cfg.read_only_rooms).unwrap_or_else(|_| Patterns::none());
        #[cfg(not(feature = "server-api"))]
        let read_only = Patterns::none();
        let mut chat = Chat {
            cfg,
            members: HashMap::new(),
            names: HashMap::new(),
            order: BTreeSet::new(),
            rooms,
            engine,
            dedup,
            pending_acks: VecDeque::new(),
            last_ticket: 0,
            durable: 0,
            next_token: 0,
            reads: HashMap::new(),
            waits: HashMap::new(),
            held: HashMap::new(),
            held_count: 0,
            asking: HashSet::new(),
            rest_pages: Vec::new(),
            #[cfg(feature = "server-api")]
            api_answers: Vec::new(),
            read_only,
            next_serial: 0,
            next_auto_name: 0,
            member_ids,
            stats: Stats::default(),
            #[cfg(feature = "cluster")]
            cluster: None,
        };
        setup(&mut chat);
        chat.ask_ids(DEFAULT_ROOM);
        // Nothing can be owed to anyone yet: the replies only set the default room's ids.
        chat.handle_engine(&mut Recorder::default());
        chat
    }

    /// The settings in force.
    pub fn config(&self) -> &Config {
        &self.cfg
    }

    /// Checks a wished-for name before the upgrade: `400` when invalid, `409` when taken.
    pub fn check_name(&self, name: &str) -> Result<(), Refusal> {
        validate::member_name(name).map_err(|e| Refusal {
            status: 400,
            reason: e.message,
        })?;
        if self.names.contains_key(&name.to_ascii_lowercase()) {
            return Err(Refusal {
                status: 409,
                reason: format!("the name '{name}' is taken"),
            });
        }
        Ok(())
    }

    /// A new member on connection `conn`: sends `me`, joins `general` (notice to the room) and
    /// sends its history. `name` must have passed [`Chat::check_name`]; `None` assigns one.
    /// `id` is the member id when authentication supplied one; otherwise the next one of the
    /// [`MemberIds`] given to [`Chat::new`].
    pub fn connect(
        &mut self,
        now: Now,
        conn: ConnId,
        name: Option<&str>,
        id: Option<String>,
        out: &mut impl Outbox,
    ) {
        self.connect_with(now, conn, name, id, Permissions::default(), out);
    }

    /// [`Chat::connect`] for a member whose token grants `perms`. One whose `rooms` do not
    /// allow `general` is not joined to it (it gets `me` only).
    pub fn connect_with(
        &mut self,
        now: Now,
        conn: ConnId,
        name: Option<&str>,
        id: Option<String>,
        perms: Permissions,
        out: &mut impl Outbox,
    ) {
        // Without the server API tokens carry no permissions: everyone is in general.
        let in_general = cfg!(not(feature = "server-api")) || perms.rooms.allows(DEFAULT_ROOM);
        let name = match name {
            Some(n) => n.to_string(),
            None => self.auto_name(),
        };
        self.next_serial += 1;
        let serial = self.next_serial;
        let order = self.order_key(serial, now);
        let member = Member {
            serial,
            order,
            id: id.unwrap_or_else(|| (self.member_ids)()),
            name: name.clone(),
            bucket: TokenBucket::new(self.cfg.rate_per_sec, self.cfg.rate_burst, now.mono),
            strikes: 0,
            #[cfg(feature = "server-api")]
            perms,
        };
        let me = Event::Me {
            member: &member.name,
            id: &member.id,
            rooms: None,
            request_id: None,
        };
        self.send_event(conn, &me, out);
        self.names.insert(name.to_ascii_lowercase(), conn);
        self.order.insert((order, conn));
        self.members.insert(conn, member);
        self.stats.members_connected_total += 1;
        #[cfg(feature = "cluster")]
        self.cluster_connected(conn);
        info!("🔌 Member {} connected", crate::log_safe(&name));
        if !in_general {
            return;
        }
        let mut cx = Cx {
            conn,
            now,
            request_id: None,
            out,
        };
        let join = commands::Join {
            room: DEFAULT_ROOM.to_string(),
            last_n: Some(self.cfg.max_history as u64),
            since: None,
        };
        // Joining `general` cannot fail: it always exists, a new member is in no room, and
        // both room caps are at least 1 (`Config::validate`).
        let _ = join.apply(self, &mut cx);
        self.handle_engine(out);
    }

    /// The connection ended (close, reset, timeout, kick): the member leaves every room, each
    /// room gets the `has left!` notice, and the name is free again. Unknown connections are
    /// ignored, so calling it twice is harmless.
    pub fn disconnect(&mut self, conn: ConnId, out: &mut impl Outbox) {
        let Some(member) = self.members.remove(&conn) else {
            return;
        };
        self.names.remove(&member.name.to_ascii_lowercase());
        self.order.remove(&(member.order, conn));
        if !self.waits.is_empty() {
            self.waits.retain(|(c, _), _| *c != conn);
        }
        for room in self.rooms.leave_all(conn) {
            self.notice(&room, &member.name, false, out);
        }
        if is_remote(conn) {
            return;
        }
        #[cfg(feature = "cluster")]
        self.cluster_disconnected(conn);
        info!("🔌 Member {} disconnected", crate::log_safe(&member.name));
    }

    /// One text frame from connection `conn`.
    pub fn handle_text(&mut self, now: Now, conn: ConnId, text: &str, out: &mut impl Outbox) {
        let request = decode(text);
        let request_id = request.request_id.as_deref();
        if !self.admit(now, conn, request_id, out) {
            return;
        }
        let mut cx = Cx {
            conn,
            now,
            request_id,
            out,
        };
        let result = match request.command {
            Ok(command) => commands::apply(self, &mut cx, command),
            Err(e) => Err(e),
        };
        if let Err(e) = result {
            self.send_error(&mut cx, &e);
        }
        self.handle_engine(out);
    }

    /// One binary frame from connection `conn`: commands are JSON text, so it is `bad_json`.
    pub fn handle_binary(&mut self, now: Now, conn: ConnId, out: &mut impl Outbox) {
        if !self.admit(now, conn, None, out) {
            return;
        }
        let mut cx = Cx {
            conn,
            now,
            request_id: None,
            out,
        };
        let e = CommandError::new(
            ErrorCode::BadJson,
            "binary frames are not accepted; send JSON text",
        );
        self.send_error(&mut cx, &e);
    }

    /// Counts the frame and applies the rate limit: `false` means the frame is dropped (the
    /// `rate_limited` error echoes `request_id`, or the flooder is closed).
    fn admit(
        &mut self,
        now: Now,
        conn: ConnId,
        request_id: Option<&str>,
        out: &mut impl Outbox,
    ) -> bool {
        self.stats.messages_in += 1;
        let flood_after = self.cfg.flood_close_after;
        let Some(member) = self.members.get_mut(&conn) else {
            return false;
        };
        if member.bucket.take(now.mono) {
            member.strikes = 0;
            return true;
        }
        member.strikes += 1;
        self.stats.rate_limited += 1;
        if member.strikes > flood_after {
            self.stats.flood_closed += 1;
            self.disconnect(conn, out);
            out.close(conn, Close::RateLimited);
        } else {
            let e = CommandError::new(ErrorCode::RateLimited, "too many commands; slow down");
            let mut cx = Cx {
                conn,
                now,
                request_id,
                out,
            };
            self.send_error(&mut cx, &e);
        }
        false
    }

    /// Sends the acks whose messages the engine reported durable.
    fn send_due_acks(&mut self, out: &mut impl Outbox) {
        let durable = self.durable;
        while let Some(ack) = self.pending_acks.front() {
            if ack.ticket > durable {
                break;
            }
            let ack = self.pending_acks.pop_front().expect("front exists");
            match ack.to {
                // The connection id may have been reused by a later member: the serial tells.
                AckTo::Member { conn, serial, json } => {
                    if self.is_same_member(conn, serial) {
                        self.stats.messages_out += 1;
                        out.send(conn, &Payload::new(&json));
                    }
                }
                #[cfg(feature = "server-api")]
                AckTo::Rest {
                    token,
                    room,
                    id,
                    repeat,
                } => self
                    .api_answers
                    .push((token, ApiAnswer::Published { room, id, repeat })),
            }
        }
    }

    /// Blocks until the engine holds every append durably, then applies its replies (every
    /// remaining ack goes out). For tests and tools, never on the loop.
    pub fn flush(&mut self, out: &mut impl Outbox) {
        self.engine.flush();
        self.handle_engine(out);
    }

    /// Shutdown: waits for the engine until `deadline` at most, stops it, and applies its last
    /// replies (the acks that became due). Returns how many broadcasts were not stored.
    pub fn close_store(&mut self, deadline: Instant, out: &mut impl Outbox) -> u64 {
        // Broadcasts still held were taken but are refused now: they count as not stored.
        let held = self.held_count as u64;
        let unstored = self.engine.close(deadline);
        self.handle_engine(out);
        unstored + held
    }

    /// Whether `conn` has a command whose answer waits for the engine: its join or `history`
    /// page, or a broadcast waiting for its id. The transport reads nothing more from such a
    /// connection until it is answered, so every connection's commands are answered in the
    /// order they came, whichever engine answers and however late. With the memory engine
    /// this is never true between inputs.
    pub fn is_waiting(&self, conn: ConnId) -> bool {
        self.waiting_conns().any(|c| c == conn)
    }

    /// Every connection [`Chat::is_waiting`] is true for (with repeats): one pass over what
    /// the core awaits, for a transport that checks many connections at once.
    pub fn waiting_conns(&self) -> impl Iterator<Item = ConnId> + '_ {
        use pending::Read;
        let reads = self.reads.values().filter_map(|r| match r {
            Read::Join { conn, .. } | Read::History { conn, .. } => Some(*conn),
            #[cfg(feature = "server-api")]
            Read::Delete {
                origin: api::Origin::Member { conn, .. },
                ..
            } => Some(*conn),
            _ => None,
        });
        let held = reads.chain(self.held.values().flat_map(|q| q.iter().map(|h| h.conn)));
        #[cfg(feature = "cluster")]
        let held = held.chain(self.cluster_waiting());
        held
    }

    /// `not_member` unless `conn` is in `room` (a `leave` or `broadcast` of a room it is not in).
    pub(crate) fn require_member(&self, conn: ConnId, room: &str) -> Result<(), CommandError> {
        if self.rooms.is_member(conn, room) {
            return Ok(());
        }
        Err(CommandError::new(
            ErrorCode::NotMember,
            format!("you are not in room '{room}'"),
        ))
    }

    /// Broadcasts taken and waiting for their room's id to be reserved (shutdown gives them
    /// until its deadline: they were taken, so they must be stored).
    pub fn held_broadcasts(&self) -> usize {
        self.held_count
    }

    /// Whether the engine stores appends now (the backlog aside).
    pub fn engine_writable(&self) -> bool {
        self.engine.writable()
    }

    /// Broadcasts taken and not yet durable: appended and not reported durable, or held
    /// waiting for their room's id.
    pub fn unstored(&mut self) -> u64 {
        let in_flight = {
            #[cfg(feature = "cluster")]
            {
                self.cluster_in_flight()
            }
            #[cfg(not(feature = "cluster"))]
            0
        };
        self.last_ticket.saturating_sub(self.durable) + (self.held_count + in_flight) as u64
    }

    /// Whether broadcasts are taken now: the engine can write and its backlog has room.
    /// `/health` answers 503 while this is false.
    pub fn store_available(&mut self) -> bool {
        #[cfg(feature = "cluster")]
        if self.cluster_down().is_some() {
            return false;
        }
        self.engine.writable() && self.unstored() < self.cfg.max_unstored as u64
    }

    // ----- helpers shared by the commands -----

    /// Sends an event to `to` as a reply: the answer to its own command, or its welcome.
    fn send_event(&mut self, to: ConnId, event: &Event<'_>, out: &mut impl Outbox) {
        self.send_json(to, &event.to_json(), out);
    }

    /// Sends a reply already serialized (when building it borrows the chat).
    fn send_json(&mut self, to: ConnId, json: &str, out: &mut impl Outbox) {
        self.stats.messages_out += 1;
        out.reply(to, &Payload::new(json));
    }

    /// Sends an event `to` did not ask for (a direct message from someone else).
    fn deliver_json(&mut self, to: ConnId, json: &str, out: &mut impl Outbox) {
        self.stats.messages_out += 1;
        out.send(to, &Payload::new(json));
    }

    fn send_error<O: Outbox>(&mut self, cx: &mut Cx<'_, O>, e: &CommandError) {
        let event = Event::Error {
            code: e.code,
            message: &e.message,
            request_id: cx.request_id,
        };
        self.send_event(cx.conn, &event, cx.out);
    }

    /// Queues an `ack` that is sent once the store's durable ticket reaches `ticket`.
    fn ack_when_durable(&mut self, conn: ConnId, ticket: u64, json: String) {
        let Some(serial) = self.members.get(&conn).map(|m| m.serial) else {
            return;
        };
        self.pending_acks.push_back(PendingAck {
            ticket,
            to: AckTo::Member { conn, serial, json },
        });
    }

    /// Delivers one payload to every member of `room`, except `skip`.
    fn fan_out(
        &mut self,
        room: &str,
        payload: &Payload,
        skip: Option<ConnId>,
        out: &mut impl Outbox,
    ) {
        self.fan_out_message(room, payload, None, skip, out);
    }

    /// [`Chat::fan_out`] for a payload that is message `id` of the room (`None`: a notice).
    /// A member still waiting for its join page of `room` gets it held, not sent (see
    /// `pending.rs`); one whose held events pass `--max-pending-output` is closed as a slow
    /// consumer, as it would be by the transport.
    fn fan_out_message(
        &mut self,
        room: &str,
        payload: &Payload,
        id: Option<u64>,
        skip: Option<ConnId>,
        out: &mut impl Outbox,
    ) {
        let mut sent = 0;
        if self.waits.is_empty() {
            for &m in self.rooms.members(room) {
                if Some(m) != skip && !is_remote(m) {
                    out.send(m, payload);
                    sent += 1;
                }
            }
            self.stats.messages_out += sent;
            return;
        }
        let members = self.rooms.members(room).to_vec();
        let mut over = Vec::new();
        for m in members {
            if Some(m) == skip || is_remote(m) {
                continue;
            }
            match self.buffer_for_waiter(m, room, id, payload) {
                Ok(false) => {
                    out.send(m, payload);
                    sent += 1;
                }
                Ok(true) => {}
                Err(()) => over.push(m),
            }
        }
        self.stats.messages_out += sent;
        for m in over {
            // Counted by the transport when it closes it, like every slow consumer.
            self.disconnect(m, out);
            out.close(m, Close::SlowConsumer);
        }
    }

    /// The `has joined!` / `has left!` notice, unless the room is too big for notices.
    fn notice(&mut self, room: &str, name: &str, joined: bool, out: &mut impl Outbox) {
        let members = self.rooms.members(room).len();
        if members == 0 || members > self.cfg.notice_max_members {
            return;
        }
        let text = format!("{name} has {}!", if joined { "joined" } else { "left" });
        let event = Event::Broadcast {
            room,
            member: SYSTEM,
            message: &text,
            id: None,
            ts: None,
            data: None,
            joined: joined.then_some(name),
            left: (!joined).then_some(name),
        };
        let payload = Payload::new(&event.to_json());
        self.fan_out(room, &payload, None, out);
    }

    fn auto_name(&mut self) -> String {
        loop {
            #[cfg(feature = "cluster")]
            if let Some(n) = self.cluster_auto_number() {
                let name = format!("member{n}");
                if !self.names.contains_key(&name) {
                    return name;
                }
                continue;
            }
            self.next_auto_name += 1;
            let name = format!("member{}", self.next_auto_name);
            if !self.names.contains_key(&name) {
                return name;
            }
        }
    }

    // ----- read-only views for the REST API -----

    /// Names of connected members, oldest connection first.
    pub fn member_names(&self) -> Vec<&str> {
        self.order
            .iter()
            .filter_map(|(_, c)| self.members.get(c))
            .map(|m| m.name.as_str())
            .collect()
    }

    /// What the member on `conn` may do; `None` when no member is there.
    pub(crate) fn perms_of(&self, conn: ConnId) -> Option<&Permissions> {
        #[cfg(feature = "server-api")]
        return self.members.get(&conn).map(|m| &m.perms);
        #[cfg(not(feature = "server-api"))]
        {
            let _ = conn;
            None
        }
    }

    /// `forbidden` unless the member on `conn` may read and be in `room`.
    pub(crate) fn require_room(&self, conn: ConnId, room: &str) -> Result<(), CommandError> {
        if cfg!(not(feature = "server-api")) {
            // Every member may do everything: tokens with permissions are refused.
            return Ok(());
        }
        match self.perms_of(conn) {
            Some(p) if !p.rooms.allows(room) => Err(CommandError::new(
                ErrorCode::Forbidden,
                format!("your token does not allow room '{room}'"),
            )),
            _ => Ok(()),
        }
    }

    /// `forbidden` unless the member on `conn` may broadcast to `room`: its `publish`, and
    /// read-only rooms (admins only).
    pub(crate) fn require_publish(&self, conn: ConnId, room: &str) -> Result<(), CommandError> {
        if cfg!(not(feature = "server-api")) {
            return Ok(());
        }
        let Some(p) = self.perms_of(conn) else {
            return Ok(());
        };
        if !p.publish.allows(room) {
            return Err(CommandError::new(
                ErrorCode::Forbidden,
                format!("your token does not allow posting to room '{room}'"),
            ));
        }
        if !p.admin && self.read_only.allows(room) {
            return Err(CommandError::new(
                ErrorCode::Forbidden,
                format!("room '{room}' is read-only: only the server and admins post there"),
            ));
        }
        Ok(())
    }

    /// `forbidden` unless the member on `conn` is an admin.
    #[cfg(feature = "server-api")]
    pub(crate) fn require_admin(&self, conn: ConnId) -> Result<(), CommandError> {
        if self.perms_of(conn).is_some_and(|p| p.admin) {
            return Ok(());
        }
        Err(CommandError::new(
            ErrorCode::Forbidden,
            "only admins may do that (the token's admin claim)",
        ))
    }

    /// Rooms in memory, by name: `(name, member count, messages stored)`.
    pub fn room_list(&self) -> Vec<(&str, usize, u64)> {
        let mut rooms: Vec<_> = self
            .rooms
            .iter()
            .map(|(name, r)| (name, r.members().len(), r.next_id().saturating_sub(1)))
            .collect();
        rooms.sort_unstable_by_key(|(name, _, _)| *name);
        rooms
    }

    /// A room's members (join order; in cluster mode oldest connection first, the one order
    /// every node can agree on) and message count, when the room is in memory.
    pub fn room_detail(&self, room: &str) -> Option<(Vec<&str>, u64)> {
        let r = self.rooms.get(room)?;
        #[allow(unused_mut)]
        let mut members: Vec<&Member> = r
            .members()
            .iter()
            .filter_map(|c| self.members.get(c))
            .collect();
        #[cfg(feature = "cluster")]
        if self.cluster.is_some() {
            members.sort_by_key(|m| m.order);
        }
        let names = members.into_iter().map(|m| m.name.as_str()).collect();
        Some((names, r.next_id().saturating_sub(1)))
    }

    /// Asks the engine for a REST page of `room`: `limit` (capped) messages older than
    /// `before`. The answer comes from [`Chat::take_rest_pages`] with the token returned, once
    /// the engine has replied (the memory engine: before this returns): `Ok(None)` when the
    /// room is neither in memory nor has stored history, `Err` when it cannot be read now.
    pub fn request_rest_page(
        &mut self,
        room: &str,
        before: Option<u64>,
        limit: Option<u64>,
        out: &mut impl Outbox,
    ) -> RequestToken {
        let limit = self.page_limit(limit);
        let query = Query::Before { before, limit };
        self.next_token += 1;
        let rest = self.next_token;
        let read = Read::Rest {
            query,
            room: room.to_string(),
            rest,
        };
        let name = room.to_string();
        if self.rooms.contains(room) {
            self.ask(read, |token| Request::Page {
                token,
                room: name,
                query,
            });
        } else {
            // Tells an empty room from one that never was; the page follows when it was.
            self.ask(read, |token| Request::LastId { token, room: name });
        }
        self.handle_engine(out);
        rest
    }

    /// Asks for the page a member gets in `room` (`history`, `join`, the welcome).
    fn request_page(&mut self, read: Read, room: &str, query: Query) -> RequestToken {
        let name = room.to_string();
        self.ask(read, |token| Request::Page {
            token,
            room: name,
            query,
        });
        self.next_token
    }

    /// The key a new member sorts by in "oldest connection first".
    fn order_key(&self, serial: u64, now: Now) -> u64 {
        #[cfg(feature = "cluster")]
        if self.cluster.is_some() {
            return now.unix_ms.saturating_mul(1000) + serial % 1000;
        }
        let _ = now;
        serial
    }

    fn page_limit(&self, limit: Option<u64>) -> usize {
        let cap = self.cfg.history_page_cap;
        limit.map_or(self.cfg.max_history.min(cap), |l| {
            (l.min(cap as u64)) as usize
        })
    }

    /// The counters.
    pub fn stats(&self) -> &Stats {
        &self.stats
    }

    /// Counts a connection closed as a slow consumer.
    pub fn count_slow_consumer(&mut self) {
        self.stats.slow_consumers_closed += 1;
    }

    /// Members connected now.
    pub fn member_count(&self) -> usize {
        self.members.len()
    }

    /// Rooms in memory now.
    pub fn room_count(&self) -> usize {
        self.rooms.len()
    }
}

/// Whether `conn` stands for a member of another node (cluster mode): such members are in
/// the tables for `list`, `rooms` and the notices, but their node delivers to them.
#[cfg(feature = "cluster")]
fn is_remote(conn: ConnId) -> bool {
    cluster::is_remote(conn)
}

/// Without cluster support every member is local.
#[cfg(not(feature = "cluster"))]
const fn is_remote(_conn: ConnId) -> bool {
    false
}

/// Cuts `page` so that its messages take at most `max_bytes` of JSON (a comma each included),
/// keeping at least one message. A backward page keeps its newest messages, a forward one its
/// oldest, so the next page (`before` the first id, `since` the last) continues at the cut.
/// `more` becomes true when anything was cut.
///
/// Without it a page is bounded only by count: 50 messages of 1000 four-byte characters and
/// 3.5 KB of `data` make a 380 KB join page, over the output bound, and every joiner is closed.
fn cut_page(page: &mut Page, max_bytes: usize, backwards: bool) {
    let n = page.messages.len();
    let mut total = 0usize;
    let mut keep = 0;
    while keep < n {
        let m = if backwards {
            &page.messages[n - 1 - keep]
        } else {
            &page.messages[keep]
        };
        let size = json_len(m) + 1;
        if keep > 0 && total + size > max_bytes {
            break;
        }
        total += size;
        keep += 1;
    }
    if keep < n {
        page.more = true;
        if backwards {
            page.messages.drain(..n - keep);
        } else {
            page.messages.truncate(keep);
        }
    }
}

/// The length of `value`'s JSON, measured without building it.
fn json_len(value: &impl serde::Serialize) -> usize {
    struct Count(usize);
    impl std::io::Write for Count {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0 += buf.len();
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
    let mut count = Count(0);
    // Serializing a stored message cannot fail: every key is a string.
    let _ = serde_json::to_writer(&mut count, value);
    count.0
}

#[cfg(all(test, feature = "server-api"))]
mod api_tests;
#[cfg(test)]
mod bounds_tests;
#[cfg(all(test, feature = "cluster"))]
mod cluster_tests;
#[cfg(test)]
mod engine_tests;
#[cfg(test)]
mod tests;
