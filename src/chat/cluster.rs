//! The core's side of cluster mode (`--redis`; see [`crate::cluster`] for the whole design).
//!
//! The other nodes' members live in the same tables as local ones (`members`, `names`,
//! `order`, `rooms`), each under a connection id of its own at or above [`REMOTE_BASE`] that
//! no socket ever has. So `list`, `rooms`, `me`, the notices, the `No other members…` count
//! and the REST views see the whole cluster without asking Redis, and the fan-out skips them
//! (their node delivers to them). What changes them is the cluster's presence events
//! ([`Presence`]), applied here; what this node's members do is told to Redis as [`Call`]s.
//!
//! Broadcasts are not numbered here: a held broadcast becomes a [`Call::Publish`] (dedup,
//! id, storage and publish in one Redis function), its `ack` waits for [`Event::Published`],
//! and every member, the sender included, gets the message from [`Event::Message`], in id
//! order per room.

use std::collections::{HashMap, VecDeque};
use std::time::Instant;

use log::{debug, info, warn};

use crate::chat::pending::Held;
use crate::chat::protocol::{CommandError, ErrorCode, Event as ChatEvent};
use crate::chat::ratelimit::TokenBucket;
use crate::chat::{Chat, Close, ConnId, Member, Outbox, Payload, Refusal};
use crate::cluster::{Call, CallToken, Event, MemberRecord, NodeId, Presence};
use crate::store::StoredMessage;
use crate::store::engine::Request;

/// The first connection id that stands for a member of another node.
pub(super) const REMOTE_BASE: ConnId = 1 << (usize::BITS - 1);

/// `member<N>` numbers asked of Redis at a time.
const NAME_BLOCK: u64 = 256;

/// Whether `conn` stands for a member of another node.
pub(super) fn is_remote(conn: ConnId) -> bool {
    conn >= REMOTE_BASE
}

/// What the core keeps in cluster mode.
pub(super) struct ClusterState {
    node: NodeId,
    /// (node, connection there) → the local stand-in.
    remote: HashMap<(NodeId, u64), ConnId>,
    /// The stand-in → (node, connection there).
    whereabouts: HashMap<ConnId, (NodeId, u64)>,
    next_remote: ConnId,
    /// Redis answered the last call and this node is registered.
    up: bool,
    down_reason: Option<String>,
    /// Connects waiting for their name claim: token → (connection, serial).
    connects: HashMap<CallToken, (ConnId, u64)>,
    /// Broadcasts sent to Redis, waiting for their id: token → (room, what was held).
    publishes: HashMap<CallToken, (String, Held)>,
    /// Broadcasts Redis numbered whose message the subscription has not brought yet: their
    /// answer waits for it, so the sender gets its echo before the answers to its later
    /// commands, as on one server.
    numbered: HashMap<(String, u64), Held>,
    /// This node's `member<N>` numbers: the next one and the end of the block.
    names: VecDeque<(u64, u64)>,
    names_asked: bool,
    /// For the remote members' (unused) rate buckets.
    mono: Instant,
    /// Remote members whose name a local member holds until its claim is answered (the
    /// claim race: one of the two loses and is closed).
    shadowed: Vec<MemberRecord>,
    /// Remote members a snapshot did not list although their node may only not have
    /// registered again yet (Redis lost its data): kept until the deadline (`None`: set at
    /// the next tick), then they leave with notices unless their node listed them again.
    orphans: HashMap<ConnId, Option<Instant>>,
}

impl Chat {
    /// A chat that is node `node` of a cluster: [`Chat::new`] with the cluster engine
    /// (`crate::cluster::ClusterEngine`, or a test double). `mono` is now.
    pub fn new_cluster_node(
        cfg: crate::config::Config,
        engine: Box<dyn crate::store::engine::Engine>,
        member_ids: super::MemberIds,
        node: NodeId,
        mono: Instant,
    ) -> Self {
        Chat::build(cfg, engine, member_ids, |chat| {
            chat.enable_cluster(node, mono)
        })
    }

    fn enable_cluster(&mut self, node: NodeId, mono: Instant) {
        self.cluster = Some(ClusterState {
            node,
            remote: HashMap::new(),
            whereabouts: HashMap::new(),
            next_remote: REMOTE_BASE,
            up: false,
            down_reason: Some("not connected to Redis yet".into()),
            connects: HashMap::new(),
            publishes: HashMap::new(),
            numbered: HashMap::new(),
            names: VecDeque::new(),
            names_asked: false,
            mono,
            shadowed: Vec::new(),
            orphans: HashMap::new(),
        });
    }

    /// Cluster mode: why a new member cannot be taken now (`503`), `None` when it can (and
    /// always standalone). `auto_name`: it would get a `member<N>` name.
    pub fn cluster_refusal(&self, auto_name: bool) -> Option<Refusal> {
        let c = self.cluster.as_ref()?;
        if !c.up {
            let why = c.down_reason.as_deref().unwrap_or("Redis is unavailable");
            return Some(Refusal {
                status: 503,
                reason: format!("the cluster is unavailable: {why}"),
            });
        }
        if auto_name && c.names.is_empty() {
            return Some(Refusal {
                status: 503,
                reason: "no member names are free on this node yet; retry".into(),
            });
        }
        None
    }

    /// Cluster mode: why Redis cannot be used now (for `/health`), `None` when it can.
    pub fn cluster_down(&self) -> Option<String> {
        let c = self.cluster.as_ref()?;
        (!c.up).then(|| {
            c.down_reason
                .clone()
                .unwrap_or_else(|| "Redis is unavailable".into())
        })
    }

    /// Cluster mode: this node's id, how many nodes have members now (this one counted),
    /// and how many members the other nodes have. `None` standalone.
    pub fn cluster_view(&self) -> Option<(&str, usize, usize)> {
        let c = self.cluster.as_ref()?;
        let mut nodes: Vec<&str> = c.remote.keys().map(|(n, _)| n.as_str()).collect();
        nodes.sort_unstable();
        nodes.dedup();
        Some((&c.node, nodes.len() + 1, c.remote.len()))
    }

    /// Whether this core is a cluster node.
    pub fn is_cluster(&self) -> bool {
        self.cluster.is_some()
    }

    /// Broadcasts sent to Redis and not yet answered (they count as unstored).
    pub(super) fn cluster_in_flight(&self) -> usize {
        self.cluster.as_ref().map_or(0, |c| c.publishes.len())
    }

    /// The connections whose broadcast waits for Redis (the transport reads no more from
    /// them until it is answered, so commands stay in order).
    pub(super) fn cluster_waiting(&self) -> impl Iterator<Item = ConnId> + '_ {
        self.cluster.iter().flat_map(|c| {
            let numbered = c.numbered.values().map(|h| h.conn);
            c.publishes.values().map(|(_, h)| h.conn).chain(numbered)
        })
    }

    /// The next `member<N>` number of this node's block, asking for the next block in time.
    /// `None` standalone.
    pub(super) fn cluster_auto_number(&mut self) -> Option<u64> {
        let c = self.cluster.as_mut()?;
        let n = match c.names.front_mut() {
            Some((next, end)) => {
                let n = *next;
                *next += 1;
                if *next >= *end {
                    c.names.pop_front();
                }
                n
            }
            // Refused before the upgrade (`cluster_refusal`); a number no block gives.
            None => u64::MAX - (self.next_serial % 1_000_000),
        };
        self.ask_names();
        Some(n)
    }

    fn ask_names(&mut self) {
        let Some(c) = self.cluster.as_mut() else {
            return;
        };
        let left: u64 = c.names.iter().map(|(n, e)| e - n).sum();
        if left < NAME_BLOCK / 2 && !c.names_asked && c.up {
            c.names_asked = true;
            self.engine
                .request(Request::Cluster(Call::NameBlock { count: NAME_BLOCK }));
        }
    }

    fn record_of(&self, conn: ConnId) -> Option<MemberRecord> {
        let c = self.cluster.as_ref()?;
        let m = self.members.get(&conn)?;
        Some(MemberRecord {
            node: c.node.clone(),
            conn: conn as u64,
            order: m.order,
            name: m.name.clone(),
            id: m.id.clone(),
            rooms: self.rooms.rooms_of(conn).to_vec(),
        })
    }

    fn call(&mut self, call: Call) {
        if self.cluster.as_ref().is_some_and(|c| c.up) {
            self.engine.request(Request::Cluster(call));
        }
    }

    /// A local member connected: claim its name cluster-wide.
    pub(super) fn cluster_connected(&mut self, conn: ConnId) {
        let Some(member) = self.record_of(conn) else {
            return;
        };
        self.next_token += 1;
        let token = self.next_token;
        let serial = self.members.get(&conn).map_or(0, |m| m.serial);
        if let Some(c) = self.cluster.as_mut() {
            c.connects.insert(token, (conn, serial));
        }
        self.call(Call::Connect { token, member });
    }

    /// A local member disconnected.
    pub(super) fn cluster_disconnected(&mut self, conn: ConnId) {
        if self.cluster.is_some() {
            self.call(Call::Disconnect { conn: conn as u64 });
        }
    }

    /// A local member joined `room`.
    pub(super) fn cluster_joined(&mut self, conn: ConnId, room: &str) {
        if self.cluster.is_some() && !is_remote(conn) {
            self.call(Call::Join {
                conn: conn as u64,
                room: room.to_string(),
            });
        }
    }

    /// A local member left `room`.
    pub(super) fn cluster_left(&mut self, conn: ConnId, room: &str) {
        if self.cluster.is_some() && !is_remote(conn) {
            self.call(Call::Leave {
                conn: conn as u64,
                room: room.to_string(),
            });
        }
    }

    /// A direct message to `target`: `Ok(true)` when it is a member of another node and was
    /// sent there through Redis; `unavailable` when Redis cannot be reached.
    pub(super) fn cluster_direct(
        &mut self,
        target: ConnId,
        json: &str,
    ) -> Result<bool, CommandError> {
        let Some(c) = self.cluster.as_ref() else {
            return Ok(false);
        };
        let Some((node, conn)) = c.whereabouts.get(&target).cloned() else {
            return Ok(false);
        };
        if !c.up {
            return Err(CommandError::new(
                ErrorCode::Unavailable,
                "the cluster cannot reach that member now (Redis is unavailable); retry later",
            ));
        }
        self.call(Call::Direct {
            node,
            conn,
            json: json.to_string(),
        });
        Ok(true)
    }

    /// Cluster mode: sends every broadcast held for `room` to Redis (numbering happens
    /// there). `false` standalone: the caller numbers them.
    pub(super) fn cluster_release(&mut self, room: &str, out: &mut impl Outbox) -> bool {
        if self.cluster.is_none() {
            return false;
        }
        let queue = self.held.remove(room).unwrap_or_default();
        self.held_count -= queue.len();
        self.rooms.unpin(room);
        let up = self.cluster.as_ref().is_some_and(|c| c.up);
        let dedup_ms = self.cfg.dedup_window.as_millis() as u64;
        for held in queue {
            if !up {
                self.refuse_publish(&held, out);
                continue;
            }
            let stored = StoredMessage {
                id: 0,
                member: held.sender.clone(),
                message: held.message.clone(),
                ts: held.ts,
                data: held.data.clone(),
            };
            let json = serde_json::to_string(&stored).unwrap_or_default();
            // `{"id":0` is the part Redis writes: the body is what follows it.
            let body = json.get(7..).unwrap_or("}").to_string();
            self.next_token += 1;
            let token = self.next_token;
            let call = Call::Publish {
                token,
                room: room.to_string(),
                msg_id: held.msg_id.clone(),
                body,
                conn: held.conn as u64,
                serial: held.serial,
                echo: held.echo != Some(false),
                dedup_ms,
                floor: 0,
            };
            if let Some(c) = self.cluster.as_mut() {
                c.publishes.insert(token, (room.to_string(), held));
            }
            self.engine.request(Request::Cluster(call));
        }
        true
    }

    fn refuse_publish(&mut self, held: &Held, out: &mut impl Outbox) {
        let message = "the cluster cannot take messages now (Redis is unavailable); retry later";
        #[cfg(feature = "server-api")]
        if let Some(token) = held.rest {
            self.api_answers
                .push((token, super::ApiAnswer::Unavailable(message.into())));
            return;
        }
        if !self.is_same_member(held.conn, held.serial) {
            return;
        }
        let event = ChatEvent::Error {
            code: ErrorCode::Unavailable,
            message,
            request_id: held.request_id.as_deref(),
        };
        self.send_event(held.conn, &event, out);
    }

    /// Applies one input from the cluster engine.
    pub(super) fn apply_cluster(&mut self, event: Event, out: &mut impl Outbox) {
        if self.cluster.is_none() {
            return;
        }
        match event {
            Event::Message {
                room,
                id,
                node,
                conn,
                serial,
                echo,
                body,
            } => self.deliver_cluster_message(&room, id, &node, conn, serial, echo, &body, out),
            Event::Presence(p) => self.apply_presence(p, true, out),
            Event::DirectIn { conn, json } => {
                let conn = conn as ConnId;
                // The connection may have been taken by another member since the sender's
                // node looked it up: the event names whom it is for.
                let to: Option<String> = serde_json::from_str::<serde_json::Value>(&json)
                    .ok()
                    .and_then(|v| v["to"].as_str().map(str::to_ascii_lowercase));
                let here = self.members.get(&conn).map(|m| m.name.to_ascii_lowercase());
                if !is_remote(conn) && here.is_some() && here == to {
                    self.deliver_json(conn, &json, out);
                }
            }
            Event::Connected { token, ok } => {
                let Some((conn, serial)) = self.cluster_mut().connects.remove(&token) else {
                    return;
                };
                if !ok && self.is_same_member(conn, serial) {
                    warn!("cluster: another node claimed the name of connection {conn} first");
                    self.lose_claim(conn, out);
                }
            }
            Event::Published {
                token,
                room,
                id,
                repeat,
            } => {
                let Some((_, held)) = self.cluster_mut().publishes.remove(&token) else {
                    return;
                };
                let delivered = self.rooms.get(&room).is_none_or(|r| r.next_id() > id);
                if repeat || delivered {
                    self.published(&room, id, repeat, held, out);
                } else {
                    self.cluster_mut().numbered.insert((room, id), held);
                }
            }
            Event::Failed { token, error } => {
                let c = self.cluster_mut();
                c.connects.remove(&token);
                if let Some((_, held)) = c.publishes.remove(&token) {
                    // The link has logged why (once while it lasts); the sender is told.
                    debug!("cluster: a broadcast could not be published: {error}");
                    self.refuse_publish(&held, out);
                }
            }
            Event::Names { first, count } => {
                let c = self.cluster_mut();
                c.names_asked = false;
                c.names.push_back((first, first.saturating_add(count)));
            }
            Event::Reconnected => {
                let members: Vec<MemberRecord> = self
                    .members
                    .keys()
                    .filter(|c| !is_remote(**c))
                    .filter_map(|c| self.record_of(*c))
                    .collect();
                info!(
                    "cluster: connected to Redis; registering {} members",
                    members.len()
                );
                self.engine
                    .request(Request::Cluster(Call::Register { members }));
            }
            Event::Registered { taken } => {
                let c = self.cluster_mut();
                c.up = true;
                c.down_reason = None;
                c.names_asked = false;
                for conn in taken {
                    let conn = conn as ConnId;
                    if self.members.contains_key(&conn) && !is_remote(conn) {
                        self.lose_claim(conn, out);
                    }
                }
                self.ask_names();
            }
            Event::Snapshot { members } => self.replace_remote(members, out),
            Event::Down { reason } => {
                // Sent once per outage by the link, which leaves the logging to this line.
                warn!("cluster: Redis is unavailable: {reason}");
                let c = self.cluster_mut();
                c.up = false;
                c.down_reason = Some(reason);
                c.connects.clear();
                let publishes: Vec<_> = c.publishes.drain().map(|(_, v)| v).collect();
                let numbered: Vec<_> = c.numbered.drain().collect();
                for (_, held) in publishes {
                    self.refuse_publish(&held, out);
                }
                // Stored: their answer need not wait for the delivery any more.
                for ((room, id), held) in numbered {
                    self.published(&room, id, false, held, out);
                }
            }
        }
    }

    /// A local member whose name another node holds: closed (4009), and the other node's
    /// member takes its place in the tables.
    fn lose_claim(&mut self, conn: ConnId, out: &mut impl Outbox) {
        let name = self.members.get(&conn).map(|m| m.name.to_ascii_lowercase());
        self.disconnect(conn, out);
        out.close(conn, Close::NameTaken);
        let shadowed = std::mem::take(&mut self.cluster_mut().shadowed);
        let (now, later): (Vec<_>, Vec<_>) = shadowed
            .into_iter()
            .partition(|r| Some(r.name.to_ascii_lowercase()) == name);
        self.cluster_mut().shadowed = later;
        for record in now {
            self.add_remote(record, true, out);
        }
    }

    fn cluster_mut(&mut self) -> &mut ClusterState {
        self.cluster.as_mut().expect("cluster mode")
    }

    /// A broadcast is in Redis with `id`: its ack (or REST answer) goes out.
    fn published(&mut self, room: &str, id: u64, repeat: bool, held: Held, out: &mut impl Outbox) {
        #[cfg(feature = "server-api")]
        if let Some(token) = held.rest {
            if !repeat {
                self.stats.broadcasts += 1;
            }
            self.api_answers.push((
                token,
                super::ApiAnswer::Published {
                    room: room.to_string(),
                    id,
                    repeat,
                },
            ));
            return;
        }
        if !repeat {
            self.stats.broadcasts += 1;
            if self.config().log_messages {
                info!(
                    "📤 Broadcast from {}: {}",
                    crate::log_safe(&held.sender),
                    crate::log_safe(&held.message)
                );
            } else {
                info!("📤 Broadcast from {}", crate::log_safe(&held.sender));
            }
        }
        if !self.is_same_member(held.conn, held.serial) {
            return;
        }
        if !repeat && self.rooms.members(room).len() == 1 {
            let alone = ChatEvent::System {
                message: super::commands::broadcast::ALONE,
            };
            self.send_event(held.conn, &alone, out);
        }
        if let Some(request_id) = held.request_id.as_deref() {
            let ack = ChatEvent::Ack {
                request_id,
                room,
                id: Some(id),
            };
            self.send_event(held.conn, &ack, out);
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn deliver_cluster_message(
        &mut self,
        room: &str,
        id: u64,
        node: &str,
        conn: u64,
        serial: u64,
        echo: bool,
        body: &str,
        out: &mut impl Outbox,
    ) {
        let mine = self.cluster.as_ref().is_some_and(|c| c.node == node);
        let answer = match mine {
            true => self.cluster_mut().numbered.remove(&(room.to_string(), id)),
            false => None,
        };
        self.deliver_numbered(room, id, mine, conn, serial, echo, body, out);
        // The sender's answer after its echo (see `numbered`).
        if let Some(held) = answer {
            self.published(room, id, false, held, out);
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn deliver_numbered(
        &mut self,
        room: &str,
        id: u64,
        mine: bool,
        conn: u64,
        serial: u64,
        echo: bool,
        body: &str,
        out: &mut impl Outbox,
    ) {
        let Some(r) = self.rooms.get_mut(room) else {
            return;
        };
        if id + 1 > r.next_id() {
            r.set_next_id(id + 1);
        }
        let json = format!(
            r#"{{"event":"broadcast","room":{},"id":{id}{body}"#,
            serde_json::Value::from(room)
        );
        let payload = Payload::new(&json);
        let sender = conn as ConnId;
        let skip = (mine && !echo && self.is_same_member(sender, serial)).then_some(sender);
        self.fan_out_message(room, &payload, Some(id), skip, out);
    }

    /// Applies a change of another node's members; `notices`: tell this node's members of
    /// the room (`has joined!` / `has left!`).
    fn apply_presence(&mut self, p: Presence, notices: bool, out: &mut impl Outbox) {
        match p {
            Presence::Connected(record) => self.add_remote(record, notices, out),
            Presence::Disconnected { node, conn } => {
                self.cluster_mut()
                    .shadowed
                    .retain(|r| (&r.node, r.conn) != (&node, conn));
                let Some(local) = self.cluster_mut().remote.remove(&(node, conn)) else {
                    return;
                };
                self.cluster_mut().whereabouts.remove(&local);
                self.cluster_mut().orphans.remove(&local);
                if notices {
                    self.disconnect(local, out);
                } else {
                    self.drop_silently(local);
                }
            }
            Presence::Joined { node, conn, room } => {
                let Some(&local) = self.cluster_mut().remote.get(&(node, conn)) else {
                    return;
                };
                self.remote_join(local, &room, notices, out);
            }
            Presence::Left { node, conn, room } => {
                let Some(&local) = self.cluster_mut().remote.get(&(node, conn)) else {
                    return;
                };
                if self.rooms.leave(local, &room) && notices {
                    if let Some(name) = self.members.get(&local).map(|m| m.name.clone()) {
                        self.notice(&room, &name, false, out);
                    }
                }
            }
        }
    }

    fn remote_join(&mut self, local: ConnId, room: &str, notices: bool, out: &mut impl Outbox) {
        let new_room = !self.rooms.contains(room);
        match self.rooms.join(local, room, || 0) {
            Ok(true) => {
                if new_room {
                    self.ask_ids(room);
                }
                if notices {
                    if let Some(name) = self.members.get(&local).map(|m| m.name.clone()) {
                        self.notice(room, &name, true, out);
                    }
                }
            }
            Ok(false) => {}
            Err(_) => warn!(
                "cluster: a member of another node joined '{}', past this node's room caps",
                crate::log_safe(room)
            ),
        }
    }

    fn add_remote(&mut self, record: MemberRecord, notices: bool, out: &mut impl Outbox) {
        let mono = {
            let c = self.cluster_mut();
            if record.node == c.node {
                return;
            }
            if let Some(&local) = c.remote.get(&(record.node.clone(), record.conn)) {
                // Its node listed it again: no longer an orphan.
                c.orphans.remove(&local);
                return;
            }
            c.mono
        };
        let lower = record.name.to_ascii_lowercase();
        if self.names.contains_key(&lower) {
            self.cluster_mut().shadowed.push(record);
            return;
        }
        let c = self.cluster_mut();
        let local = c.next_remote;
        c.next_remote += 1;
        c.remote.insert((record.node.clone(), record.conn), local);
        c.whereabouts
            .insert(local, (record.node.clone(), record.conn));
        self.next_serial += 1;
        let member = Member {
            serial: self.next_serial,
            order: record.order,
            id: record.id,
            name: record.name,
            bucket: TokenBucket::new(self.cfg.rate_per_sec, self.cfg.rate_burst, mono),
            strikes: 0,
            #[cfg(feature = "server-api")]
            perms: crate::auth::Permissions::default(),
        };
        self.names.insert(lower, local);
        self.order.insert((record.order, local));
        self.members.insert(local, member);
        for room in record.rooms {
            self.remote_join(local, &room, notices, out);
        }
    }

    /// Takes a remote member out of every table without notices (a snapshot replaced it).
    fn drop_silently(&mut self, local: ConnId) {
        let Some(member) = self.members.remove(&local) else {
            return;
        };
        self.names.remove(&member.name.to_ascii_lowercase());
        self.order.remove(&(member.order, local));
        self.rooms.leave_all(local);
    }

    /// A fresh view of the other nodes: members that are gone leave (with notices: they
    /// left while this node could not hear it), new ones are added without notices, and
    /// those in both stay as they are, their rooms brought up to date.
    fn replace_remote(&mut self, members: Vec<MemberRecord>, out: &mut impl Outbox) {
        let fresh: HashMap<(NodeId, u64), MemberRecord> = members
            .into_iter()
            .map(|m| ((m.node.clone(), m.conn), m))
            .collect();
        let known: Vec<((NodeId, u64), ConnId)> = self
            .cluster_mut()
            .remote
            .iter()
            .map(|(k, v)| (k.clone(), *v))
            .collect();
        let listed: std::collections::HashSet<&str> =
            fresh.keys().map(|(node, _)| node.as_str()).collect();
        let mut orphans = Vec::new();
        for (key, local) in known {
            match fresh.get(&key) {
                // Its node is there and did not list it: it left while we could not hear.
                None if listed.contains(key.0.as_str()) => {
                    self.remove_remote(&key, local, out);
                }
                // Its node is not there at all: after a data loss it may not have registered
                // again yet. It gets a node timeout to do so.
                None => orphans.push(local),
                Some(record) => {
                    let now_in: Vec<String> = self.rooms.rooms_of(local).to_vec();
                    for room in now_in.iter().filter(|r| !record.rooms.contains(r)) {
                        self.apply_presence(
                            Presence::Left {
                                node: key.0.clone(),
                                conn: key.1,
                                room: room.clone(),
                            },
                            true,
                            out,
                        );
                    }
                    for room in record.rooms.iter().filter(|r| !now_in.contains(r)) {
                        self.remote_join(local, room, true, out);
                    }
                }
            }
        }
        for (key, record) in fresh {
            if !self.cluster_mut().remote.contains_key(&key) {
                self.add_remote(record, false, out);
            }
        }
        let c = self.cluster_mut();
        for local in orphans {
            c.orphans.entry(local).or_insert(None);
        }
    }

    fn remove_remote(&mut self, key: &(NodeId, u64), local: ConnId, out: &mut impl Outbox) {
        let c = self.cluster_mut();
        c.remote.remove(key);
        c.whereabouts.remove(&local);
        c.orphans.remove(&local);
        self.disconnect(local, out);
    }

    /// When [`Chat::cluster_tick`] is due next (an instant in the past when it is due now);
    /// `None` when it has nothing to do.
    pub fn cluster_deadline(&self) -> Option<Instant> {
        let c = self.cluster.as_ref()?;
        c.orphans.values().map(|d| d.unwrap_or(c.mono)).min()
    }

    /// Time passes (the transport calls it when [`Chat::cluster_deadline`] is due): orphans
    /// whose node did not list them again within a node timeout leave, with notices.
    pub fn cluster_tick(&mut self, now: Instant, out: &mut impl Outbox) {
        let timeout = self.cfg.node_timeout;
        let Some(c) = self.cluster.as_mut() else {
            return;
        };
        let mut due = Vec::new();
        for (local, deadline) in c.orphans.iter_mut() {
            match deadline {
                None => *deadline = Some(now + timeout),
                Some(d) if *d <= now => due.push(*local),
                Some(_) => {}
            }
        }
        for local in due {
            let Some(key) = self.cluster_mut().whereabouts.get(&local).cloned() else {
                self.cluster_mut().orphans.remove(&local);
                continue;
            };
            self.remove_remote(&key, local, out);
        }
    }
}
