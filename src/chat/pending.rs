//! What the core waits for from the history engine, and what it does when a reply comes.
//!
//! The boundary itself is described once, in [`crate::store::engine`]; this file is the core's
//! side of it:
//!
//! - [`Read`]: every request with a token the core has sent and not yet had answered, by token:
//!   a joiner's page, a `history` page, a REST page, a room's last id, a reservation.
//! - [`JoinWait`]: a joiner's live messages of one room, held until its page comes, so that it
//!   gets its history first and then exactly the newer messages (no gap, no duplicate).
//! - [`Held`]: a room's broadcasts waiting, in order, for the room's next id to be known and
//!   reserved.
//!
//! A reply whose token is no longer known, or whose member has gone (the serial tells), is
//! dropped.

use std::collections::VecDeque;
use std::time::Instant;

use super::protocol::{ErrorCode, Event, RawJson};
use super::{Chat, ConnId, Outbox, Payload, cut_page};
use crate::store::engine::{Reply, Request, RequestToken};
use crate::store::{Page, StoreError, StoredMessage};

/// A request the core awaits the reply of.
pub(super) enum Read {
    /// The page a member gets on joining `room` (the welcome's too).
    Join {
        conn: ConnId,
        serial: u64,
        room: String,
        backwards: bool,
        request_id: Option<String>,
    },
    /// The page a `history` command asked for.
    History {
        conn: ConnId,
        serial: u64,
        room: String,
        request_id: Option<String>,
    },
    /// A REST page: first (for a room not in memory) whether the room ever had a message,
    /// then the page.
    Rest {
        query: crate::store::Query,
        room: String,
        /// The token the transport was given, which the answer carries.
        rest: RequestToken,
    },
    /// A room's last id, asked when it came into memory or before its first broadcast.
    LastId { room: String },
    /// The read that tells whether message `id` exists before it is removed.
    #[cfg(feature = "server-api")]
    Delete {
        room: String,
        id: u64,
        origin: super::api::Origin,
    },
    /// The last id of a room deleted while not in memory (0: it never was).
    #[cfg(feature = "server-api")]
    DeleteRoom { room: String, rest: RequestToken },
    /// A reservation of the room's next id.
    Reserve { room: String },
    /// A reservation of an id already covered, sent so that the engine may renew ahead; no
    /// broadcast waits for it.
    Renew { room: String },
}

/// The live messages of one room held for a member whose join page has not come yet.
pub(super) struct JoinWait {
    /// The page's token.
    pub(super) token: RequestToken,
    /// The room's events for the member since the join, in order, with their message id.
    pub(super) buffered: Vec<(Option<u64>, Payload)>,
    /// Their bytes, bounded by `--max-pending-output`.
    pub(super) bytes: usize,
}

/// A broadcast waiting for its room's id: everything `deliver` needs, captured when it came.
pub(super) struct Held {
    pub(super) conn: ConnId,
    pub(super) serial: u64,
    pub(super) sender: String,
    pub(super) message: String,
    pub(super) data: Option<RawJson>,
    pub(super) echo: Option<bool>,
    pub(super) msg_id: Option<String>,
    pub(super) request_id: Option<String>,
    /// A server API publish: its answer goes to this REST token, not to a member.
    #[cfg_attr(not(feature = "server-api"), allow(dead_code))]
    pub(super) rest: Option<RequestToken>,
    pub(super) mono: Instant,
    pub(super) ts: u64,
}

/// A REST page the engine has answered: `Ok(None)` is a room that does not exist.
pub type RestPage = Result<Option<Page>, StoreError>;

impl Chat {
    /// Hands a request with a token to the engine, remembering what it was for.
    pub(super) fn ask(&mut self, read: Read, req: impl FnOnce(RequestToken) -> Request) {
        self.next_token += 1;
        let token = self.next_token;
        self.reads.insert(token, read);
        self.engine.request(req(token));
    }

    /// Polls the engine until it has nothing more and applies every reply: pages to joiners and
    /// askers, ids to held broadcasts, acks whose messages became durable. The server calls it
    /// when the engine's waker fires; every input of the core calls it before returning, so an
    /// engine that answers at once (the memory one) never waits for a wake-up.
    pub fn handle_engine(&mut self, out: &mut impl Outbox) {
        while let Some(reply) = self.engine.poll() {
            self.apply_reply(reply, out);
        }
        self.send_due_acks(out);
    }

    fn apply_reply(&mut self, reply: Reply, out: &mut impl Outbox) {
        let (token, result) = match reply {
            Reply::DurableUpTo(t) => {
                self.durable = self.durable.max(t);
                return;
            }
            Reply::PageReady { token, page, .. } => (token, Ok(Answer::Page(page))),
            Reply::LastId { token, last_id, .. } => (token, Ok(Answer::LastId(last_id))),
            Reply::IdsReserved { token, up_to, .. } => (token, Ok(Answer::Reserved(up_to))),
            Reply::Unavailable { token, error, .. } => (token, Err(error)),
            #[cfg(feature = "cluster")]
            Reply::Cluster(event) => {
                self.apply_cluster(event, out);
                return;
            }
        };
        let Some(read) = self.reads.remove(&token) else {
            return;
        };
        match (read, result) {
            (
                Read::Join {
                    conn,
                    serial,
                    room,
                    backwards,
                    request_id,
                },
                result,
            ) => {
                // A page that cannot be read gives an empty history, as before the engine:
                // joining is not refused for it (see docs/PROTOCOL.md).
                let mut page = match result {
                    Ok(Answer::Page(p)) => p,
                    _ => Page::default(),
                };
                cut_page(&mut page, self.cfg.page_bytes(), backwards);
                self.join_page_ready(conn, serial, &room, token, &page, request_id, out);
            }
            (
                Read::History {
                    conn,
                    serial,
                    room,
                    request_id,
                },
                result,
            ) => {
                if !self.is_same_member(conn, serial) {
                    return;
                }
                match result {
                    Ok(Answer::Page(mut page)) => {
                        cut_page(&mut page, self.cfg.page_bytes(), true);
                        let event = Event::History {
                            room: &room,
                            messages: &page.messages,
                            more: page.more,
                            request_id: request_id.as_deref(),
                        };
                        self.send_event(conn, &event, out);
                    }
                    Ok(_) | Err(_) => {
                        let message = "the history store cannot be read now; retry later";
                        let event = Event::Error {
                            code: ErrorCode::Unavailable,
                            message,
                            request_id: request_id.as_deref(),
                        };
                        self.send_event(conn, &event, out);
                    }
                }
            }
            (Read::Rest { query, room, rest }, result) => match result {
                Ok(Answer::LastId(0)) => self.rest_pages.push((rest, Ok(None))),
                Ok(Answer::LastId(_)) => {
                    let room2 = room.clone();
                    self.ask(Read::Rest { query, room, rest }, |token| Request::Page {
                        token,
                        room: room2,
                        query,
                    });
                }
                Ok(Answer::Page(mut page)) => {
                    cut_page(&mut page, self.cfg.page_bytes(), true);
                    self.rest_pages.push((rest, Ok(Some(page))));
                }
                Ok(Answer::Reserved(_)) => {}
                Err(e) => self.rest_pages.push((rest, Err(e))),
            },
            #[cfg(feature = "server-api")]
            (Read::Delete { room, id, origin }, result) => {
                let found = match result {
                    Ok(Answer::Page(p)) => Ok(p.messages.first().is_some_and(|m| m.id == id)),
                    Ok(_) => Ok(false),
                    Err(e) => Err(e),
                };
                self.finish_delete(&room, id, origin, found, out);
            }
            #[cfg(feature = "server-api")]
            (Read::DeleteRoom { room, rest }, result) => {
                let answer = match result {
                    Ok(Answer::LastId(last)) => {
                        let in_memory = self.rooms.get(&room).map(|r| r.next_id());
                        match in_memory {
                            None if last == 0 => {
                                super::ApiAnswer::NotFound(format!("room '{room}' does not exist"))
                            }
                            _ => {
                                let last = last.max(in_memory.unwrap_or(0).saturating_sub(1));
                                self.close_room(&room, last, out);
                                super::ApiAnswer::Done
                            }
                        }
                    }
                    Ok(_) => super::ApiAnswer::Done,
                    Err(e) => super::ApiAnswer::Unavailable(format!(
                        "the history store cannot be read now ({e}); retry later"
                    )),
                };
                self.api_answers.push((rest, answer));
            }
            (Read::LastId { room }, result) => {
                self.asking.remove(&room);
                match result {
                    Ok(Answer::LastId(last)) => {
                        if let Some(r) = self.rooms.get_mut(&room) {
                            if r.next_id() == 0 {
                                r.set_next_id(last + 1);
                            }
                        }
                        self.release_held(&room, out);
                    }
                    Ok(_) => {}
                    Err(e) => self.refuse_held(&room, &e, out),
                }
            }
            (Read::Renew { room }, result) => {
                if let (Some(r), Ok(Answer::Reserved(up_to))) = (self.rooms.get_mut(&room), result)
                {
                    r.reserve_up_to(up_to);
                }
            }
            (Read::Reserve { room }, result) => {
                self.asking.remove(&room);
                match result {
                    Ok(Answer::Reserved(up_to)) => {
                        if let Some(r) = self.rooms.get_mut(&room) {
                            r.reserve_up_to(up_to);
                        }
                        self.release_held(&room, out);
                    }
                    Ok(_) => {}
                    Err(e) => self.refuse_held(&room, &e, out),
                }
            }
        }
    }

    /// Whether `conn` is still the member that had `serial` (connection ids are reused).
    pub(super) fn is_same_member(&self, conn: ConnId, serial: u64) -> bool {
        self.members.get(&conn).is_some_and(|m| m.serial == serial)
    }

    #[allow(clippy::too_many_arguments)]
    fn join_page_ready(
        &mut self,
        conn: ConnId,
        serial: u64,
        room: &str,
        token: RequestToken,
        page: &Page,
        request_id: Option<String>,
        out: &mut impl Outbox,
    ) {
        if !self.is_same_member(conn, serial) || !self.rooms.is_member(conn, room) {
            return;
        }
        let event = Event::History {
            room,
            messages: &page.messages,
            more: page.more,
            request_id: request_id.as_deref(),
        };
        self.send_event(conn, &event, out);
        let key = (conn, room.to_string());
        if self.waits.get(&key).is_some_and(|w| w.token == token) {
            let wait = self.waits.remove(&key).expect("checked");
            let last = page.messages.last().map_or(0, |m| m.id);
            let mut sent = 0;
            for (id, payload) in wait.buffered {
                // A message in the page is not sent again; notices (no id) keep their place.
                if id.is_none_or(|id| id > last) {
                    out.send(conn, &payload);
                    sent += 1;
                }
            }
            self.stats.messages_out += sent;
        }
    }

    /// Starts holding `room`'s live events for `conn` until the join page with `token` comes.
    pub(super) fn wait_for_page(&mut self, conn: ConnId, room: &str, token: RequestToken) {
        self.waits
            .entry((conn, room.to_string()))
            .or_insert(JoinWait {
                token,
                buffered: Vec::new(),
                bytes: 0,
            });
    }

    /// Forgets what `conn` was waiting for in `room` (it left).
    pub(super) fn stop_waiting(&mut self, conn: ConnId, room: &str) {
        if !self.waits.is_empty() {
            self.waits.remove(&(conn, room.to_string()));
        }
    }

    /// Holds `payload` for `conn` when it waits for its page in `room`; `Err` when that
    /// overflows the output bound (the member is then a slow consumer). `Ok(false)`: not
    /// waiting, send it.
    pub(super) fn buffer_for_waiter(
        &mut self,
        conn: ConnId,
        room: &str,
        id: Option<u64>,
        payload: &Payload,
    ) -> Result<bool, ()> {
        if self.waits.is_empty() {
            return Ok(false);
        }
        let max = self.cfg.max_pending_output;
        let Some(wait) = self.waits.get_mut(&(conn, room.to_string())) else {
            return Ok(false);
        };
        wait.bytes += payload.bytes().len();
        if wait.bytes > max {
            return Err(());
        }
        wait.buffered.push((id, payload.clone()));
        Ok(true)
    }

    /// Asks for what `room`'s next broadcast needs: its last id when unknown, otherwise a
    /// reservation of its next id. One question per room at a time.
    pub(super) fn ask_ids(&mut self, room: &str) {
        if self.asking.contains(room) {
            return;
        }
        let next = self.rooms.get_mut(room).map_or(0, |r| {
            if r.next_id() != 0 {
                r.ask_reserve(r.next_id());
            }
            r.next_id()
        });
        self.asking.insert(room.to_string());
        let name = room.to_string();
        if next == 0 {
            self.ask(Read::LastId { room: name.clone() }, |token| {
                Request::LastId { token, room: name }
            });
        } else {
            self.ask(Read::Reserve { room: name.clone() }, |token| {
                Request::Reserve {
                    token,
                    room: name,
                    id: next,
                }
            });
        }
    }

    /// Delivers `room`'s held broadcasts, in order, while their ids are known and reserved;
    /// asks for more when they are not.
    pub(super) fn release_held(&mut self, room: &str, out: &mut impl Outbox) {
        // In cluster mode Redis numbers them.
        #[cfg(feature = "cluster")]
        if self.cluster_release(room, out) {
            return;
        }
        loop {
            let Some(queue) = self.held.get_mut(room) else {
                return;
            };
            if queue.is_empty() {
                self.held.remove(room);
                // Numbered and stored: an empty room may go now.
                self.rooms.unpin(room);
                return;
            }
            let Some(r) = self.rooms.get(room) else {
                // Cannot happen: a room with held broadcasts is pinned in memory until they
                // are numbered (see `Rooms::pin`). Kept as a guard that says what it lost.
                let n = self.held.remove(room).map_or(0, |q| q.len());
                self.held_count -= n;
                log::warn!(
                    "{n} broadcasts to room {} dropped: every member left before their id was reserved",
                    crate::log_safe(room)
                );
                return;
            };
            let next = r.next_id();
            let repeat = {
                let front = &queue[0];
                front
                    .msg_id
                    .as_deref()
                    .and_then(|m| self.dedup.get(front.mono, room, m))
            };
            if repeat.is_none() && (next == 0 || r.reserved() < next) {
                self.ask_ids(room);
                return;
            }
            let held = queue.pop_front().expect("not empty");
            self.held_count -= 1;
            if repeat.is_none() {
                self.renew(room, next);
            }
            match repeat {
                Some(first) => {
                    let ticket = self.last_ticket;
                    self.queue_ack(held.conn, held.serial, room, first, ticket, &held, true);
                }
                None => self.deliver(room, next, held, out),
            }
        }
    }

    /// Sends `Reserve` for `id`, already covered, unless it was sent: the engine is told of
    /// every id handed out (the contract), so one that reserves ahead renews in time.
    fn renew(&mut self, room: &str, id: u64) {
        let Some(r) = self.rooms.get_mut(room) else {
            return;
        };
        if !r.ask_reserve(id) {
            return;
        }
        let name = room.to_string();
        self.ask(Read::Renew { room: name.clone() }, |token| {
            Request::Reserve {
                token,
                room: name,
                id,
            }
        });
    }

    /// Refuses every broadcast held for `room`: its id could not be read or reserved.
    pub(super) fn refuse_held(&mut self, room: &str, e: &StoreError, out: &mut impl Outbox) {
        let queue: VecDeque<Held> = self.held.remove(room).unwrap_or_default();
        self.held_count -= queue.len();
        self.rooms.unpin(room);
        let message = format!("the history store cannot take messages now ({e}); retry later");
        for held in queue {
            #[cfg(feature = "server-api")]
            if let Some(token) = held.rest {
                self.api_answers
                    .push((token, super::ApiAnswer::Unavailable(message.clone())));
                continue;
            }
            if !self.is_same_member(held.conn, held.serial) {
                continue;
            }
            let event = Event::Error {
                code: ErrorCode::Unavailable,
                message: &message,
                request_id: held.request_id.as_deref(),
            };
            self.send_event(held.conn, &event, out);
        }
    }

    /// Numbers, delivers and stores one broadcast whose id `id` is reserved.
    fn deliver(&mut self, room: &str, id: u64, held: Held, out: &mut impl Outbox) {
        // The sender may have left or disconnected since: the message was taken, so it is
        // still delivered to the room and stored (only its ack has nobody to go to).
        let Some(r) = self.rooms.get_mut(room) else {
            return;
        };
        r.set_next_id(id + 1);
        let alone = r.members().len() == 1;
        let event = Event::Broadcast {
            room,
            member: &held.sender,
            message: &held.message,
            id: Some(id),
            ts: Some(held.ts),
            data: held.data.as_ref(),
            joined: None,
            left: None,
        };
        let payload = Payload::new(&event.to_json());
        // A sender gone since (its connection id maybe reused) has nothing to skip.
        let sender_here = self.is_same_member(held.conn, held.serial);
        let skip = (held.echo == Some(false) && sender_here).then_some(held.conn);
        self.fan_out_message(room, &payload, Some(id), skip, out);
        out.room_published(room, &payload);
        if alone && sender_here {
            let alone = Event::System {
                message: super::commands::broadcast::ALONE,
            };
            self.send_event(held.conn, &alone, out);
        }
        if self.config().log_messages {
            log::info!(
                "📤 Broadcast from {}: {}",
                crate::log_safe(&held.sender),
                crate::log_safe(&held.message)
            );
        } else {
            log::info!("📤 Broadcast from {}", crate::log_safe(&held.sender));
        }
        if let Some(msg_id) = &held.msg_id {
            self.dedup.remember(held.mono, room, msg_id, id);
        }
        // The message's ticket is the next append's; its ack waits until that is durable.
        self.last_ticket += 1;
        let ticket = self.last_ticket;
        self.stats.broadcasts += 1;
        self.queue_ack(held.conn, held.serial, room, id, ticket, &held, false);
        // The message itself, after delivery, moved out of what was held.
        let stored = StoredMessage {
            id,
            member: held.sender,
            message: held.message,
            ts: held.ts,
            data: held.data,
        };
        self.engine.request(Request::Append {
            room: room.to_string(),
            msg: stored,
        });
    }

    /// With a `request_id`, queues the `ack` naming `id`, sent once `ticket` is durable; for a
    /// server API publish, its answer (`repeat`: the `msg_id` was seen, `id` is the first's).
    #[allow(clippy::too_many_arguments)]
    #[cfg_attr(not(feature = "server-api"), allow(unused_variables))]
    pub(super) fn queue_ack(
        &mut self,
        conn: ConnId,
        serial: u64,
        room: &str,
        id: u64,
        ticket: u64,
        held: &Held,
        repeat: bool,
    ) {
        #[cfg(feature = "server-api")]
        if let Some(token) = held.rest {
            self.pending_acks.push_back(super::PendingAck {
                ticket,
                to: super::AckTo::Rest {
                    token,
                    room: room.to_string(),
                    id,
                    repeat,
                },
            });
            return;
        }
        if !self.is_same_member(conn, serial) {
            return;
        }
        if let Some(request_id) = &held.request_id {
            let json = Event::Ack {
                request_id,
                room,
                id: Some(id),
            }
            .to_json();
            self.ack_when_durable(conn, ticket, json);
        }
    }

    /// The REST pages answered since the last call, each with the token
    /// [`Chat::request_rest_page`] gave.
    pub fn take_rest_pages(&mut self) -> Vec<(RequestToken, RestPage)> {
        std::mem::take(&mut self.rest_pages)
    }
}

/// A reply's content, once its token is matched.
enum Answer {
    Page(Page),
    LastId(u64),
    Reserved(u64),
}
