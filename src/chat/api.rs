//! The server API's inputs to the core (`/api/...` with the API key, and the admin commands
//! `delete` and `kick`): a server publish, a direct message from the server, creating and
//! deleting rooms, removing a message, disconnecting a member.
//!
//! Each goes through the same paths as a member's command: a publish is a broadcast held for
//! its id, numbered, delivered, appended and answered once durable (like an `ack`, through
//! `pending_acks`), deduplicated by the same [`super::Dedup`]; a removal first reads the
//! message from the engine (so that an unknown or already removed id is `404`), then sends
//! [`Request::Remove`] and tells the room. Answers that wait for the engine come out of
//! [`Chat::take_api_answers`] with the token the call returned.

use log::info;

use super::pending::{Held, Read};
use super::protocol::{CommandError, ErrorCode, Event, RawJson};
use super::rooms::Refused;
use super::{Chat, Close, ConnId, DEFAULT_ROOM, Now, Outbox, Payload, Reason, validate};
use crate::store::engine::{Request, RequestToken};
use crate::store::{Query, Removal, StoreError};

/// The name a server publish is sent under when it names no `member`, and the sender of the
/// server's direct messages.
pub const SERVER: &str = "server";

/// The close reason of a disconnect or `kick` that gives none.
pub const KICK_REASON: &str = "disconnected by the server";

/// The connection a server publish is held under: no member ever has it.
const NO_CONN: ConnId = usize::MAX;

/// A message posted by the server API: `POST /api/rooms/{room}/messages`.
#[derive(Debug, Clone, PartialEq)]
pub struct ServerPost {
    /// The room (created when needed).
    pub room: String,
    /// Sent as this member (default [`SERVER`]).
    pub member: Option<String>,
    /// The text.
    pub message: String,
    /// Attached JSON, kept as sent.
    pub data: Option<RawJson>,
    /// Idempotency key, as for members.
    pub msg_id: Option<String>,
}

/// What a server API call that waited for the engine comes to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ApiAnswer {
    /// The message is durable with this id; `repeat`: its `msg_id` was seen and `id` is the
    /// first copy's.
    Published {
        /// The room.
        room: String,
        /// The message id.
        id: u64,
        /// A repeat of a `msg_id`.
        repeat: bool,
    },
    /// Done (`204`).
    Done,
    /// No such message or room (`404`).
    NotFound(String),
    /// The store cannot do it now (`503`); nothing changed.
    Unavailable(String),
}

/// Server API calls carried out, by endpoint (`/metrics`, `/api/stats`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ApiCalls {
    /// Messages posted (repeats included).
    pub publish: u64,
    /// Messages removed (the admin command `delete` included).
    pub delete: u64,
    /// Members disconnected (the admin command `kick` included).
    pub disconnect: u64,
    /// Rooms created.
    pub room_create: u64,
    /// Rooms deleted.
    pub room_delete: u64,
    /// Direct messages from the server.
    pub direct: u64,
}

/// Who asked for a removal, and so where its answer goes.
#[cfg_attr(not(feature = "server-api"), allow(dead_code))]
pub(super) enum Origin {
    /// The server API: the answer goes out of [`Chat::take_api_answers`].
    Rest(RequestToken),
    /// An admin's `delete`: an `ack` or an `error`.
    Member {
        conn: ConnId,
        serial: u64,
        request_id: Option<String>,
    },
}

fn not_found(room: &str, id: u64) -> String {
    format!("room '{room}' has no message {id}")
}

impl Chat {
    fn next_rest_token(&mut self) -> RequestToken {
        self.next_token += 1;
        self.next_token
    }

    /// Posts `post` as the server: held for its id like a member's broadcast, delivered to
    /// the room's members, stored; the answer ([`ApiAnswer::Published`]) comes once it is
    /// durable, with the token returned. `Err` (nothing happened): a bad field (`invalid`),
    /// `limit_reached` (a new room past `--max-rooms`), `unavailable` (the store's backlog).
    pub fn server_publish(
        &mut self,
        now: Now,
        post: ServerPost,
        out: &mut impl Outbox,
    ) -> Result<RequestToken, CommandError> {
        let room = post.room.as_str();
        validate::room_name(room)?;
        validate::message_text(&post.message, self.cfg.max_message_chars)?;
        if let Some(msg_id) = &post.msg_id {
            validate::msg_id(msg_id)?;
        }
        let member = post.member.as_deref().unwrap_or(SERVER);
        validate::member_name(member)?;
        let token = self.next_rest_token();
        self.stats.api_calls.publish += 1;
        if let (Some(msg_id), false) = (&post.msg_id, self.held.contains_key(room)) {
            if let Some(first) = self.dedup.get(now.mono, room, msg_id) {
                info!(
                    "API publish to room {} as {}: a repeat of message {first}",
                    crate::log_safe(room),
                    crate::log_safe(member)
                );
                self.pending_acks.push_back(super::PendingAck {
                    ticket: self.last_ticket,
                    to: super::AckTo::Rest {
                        token,
                        room: room.to_string(),
                        id: first,
                        repeat: true,
                    },
                });
                self.handle_engine(out);
                return Ok(token);
            }
        }
        if self.unstored() >= self.cfg.max_unstored as u64 {
            return Err(CommandError::new(
                ErrorCode::Unavailable,
                "the history store is not keeping up; nothing was sent, retry later",
            ));
        }
        let new_room = self.rooms.create(room, false, || 0).map_err(
            |(Refused::ServerLimit(max) | Refused::MemberLimit(max))| {
                CommandError::new(
                    ErrorCode::LimitReached,
                    format!("the server holds at most {max} rooms"),
                )
            },
        )?;
        if new_room {
            self.ask_ids(room);
        }
        info!(
            "API publish to room {} as {}",
            crate::log_safe(room),
            crate::log_safe(member)
        );
        let held = Held {
            conn: NO_CONN,
            serial: 0,
            sender: member.to_string(),
            message: post.message,
            data: post.data,
            echo: None,
            msg_id: post.msg_id,
            request_id: None,
            rest: Some(token),
            mono: now.mono,
            ts: now.unix_ms,
        };
        let room = post.room;
        self.held.entry(room.clone()).or_default().push_back(held);
        self.held_count += 1;
        self.rooms.pin(&room);
        self.release_held(&room, out);
        self.handle_engine(out);
        Ok(token)
    }

    /// A `direct` event from [`SERVER`] to the member named `to`: `not_found` when no such
    /// member is connected.
    pub fn server_direct(
        &mut self,
        now: Now,
        to: &str,
        message: &str,
        data: Option<&RawJson>,
        out: &mut impl Outbox,
    ) -> Result<(), CommandError> {
        validate::message_text(message, self.cfg.max_message_chars)?;
        let target = self.member_conn(to)?;
        let dest = &self.members[&target].name;
        let json = Event::Direct {
            from: SERVER,
            to: dest,
            message,
            ts: now.unix_ms,
            data,
            request_id: None,
        }
        .to_json();
        info!("API direct to {}", crate::log_safe(dest));
        self.stats.api_calls.direct += 1;
        #[cfg(feature = "cluster")]
        if self.cluster_direct(target, &json)? {
            return Ok(());
        }
        self.deliver_json(target, &json, out);
        Ok(())
    }

    /// Creates `room` ahead of its members, kept while empty until deleted. `Ok(true)` when
    /// it is new, `Ok(false)` when it existed (it is kept from now on).
    pub fn create_room(&mut self, room: &str) -> Result<bool, CommandError> {
        validate::room_name(room)?;
        let new = self.rooms.create(room, true, || 0).map_err(|_| {
            CommandError::new(
                ErrorCode::LimitReached,
                format!("the server holds at most {} rooms", self.cfg.max_rooms),
            )
        })?;
        if new {
            self.ask_ids(room);
        }
        info!("API room create {} (new: {new})", crate::log_safe(room));
        self.stats.api_calls.room_create += 1;
        Ok(new)
    }

    /// Deletes `room`: its members get `room_closed` and leave it, its history is removed,
    /// its ids stay taken. The answer ([`ApiAnswer::Done`], or `NotFound` for a room neither
    /// in memory nor with stored history) comes with the token returned. [`DEFAULT_ROOM`]
    /// cannot be deleted (`invalid`).
    pub fn delete_room(
        &mut self,
        room: &str,
        out: &mut impl Outbox,
    ) -> Result<RequestToken, CommandError> {
        validate::room_name(room)?;
        if room == DEFAULT_ROOM {
            return Err(CommandError::new(
                ErrorCode::Invalid,
                "the room 'general' cannot be deleted",
            ));
        }
        let next = self.rooms.get(room).map(|r| r.next_id());
        if next == Some(0) {
            return Err(CommandError::new(
                ErrorCode::Unavailable,
                "the room's message ids are not known yet; retry later",
            ));
        }
        let rest = self.next_rest_token();
        info!("API room delete {}", crate::log_safe(room));
        self.stats.api_calls.room_delete += 1;
        match next {
            Some(next) => {
                self.close_room(room, next - 1, out);
                self.api_answers.push((rest, ApiAnswer::Done));
            }
            None => {
                let name = room.to_string();
                self.ask(
                    Read::DeleteRoom {
                        room: name.clone(),
                        rest,
                    },
                    |token| Request::LastId { token, room: name },
                );
            }
        }
        self.handle_engine(out);
        Ok(rest)
    }

    /// The room's members get `room_closed` and leave it; it leaves memory; its messages up
    /// to `last` leave the store (a tombstone keeps `last` taken).
    pub(super) fn close_room(&mut self, room: &str, last: u64, out: &mut impl Outbox) {
        let e = StoreError(format!("room '{room}' was deleted"));
        self.refuse_held(room, &e, out);
        let payload = Payload::new(&Event::RoomClosed { room }.to_json());
        for conn in self.rooms.remove_room(room) {
            self.stop_waiting(conn, room);
            self.stats.messages_out += 1;
            out.send(conn, &payload);
        }
        if last > 0 {
            self.engine.request(Request::Remove {
                room: room.to_string(),
                what: Removal::UpTo(last),
            });
        }
    }

    /// Removes message `id` of `room`; the answer comes with the token returned
    /// ([`ApiAnswer::Done`], `NotFound`, `Unavailable`).
    pub fn delete_message(
        &mut self,
        room: &str,
        id: u64,
        out: &mut impl Outbox,
    ) -> Result<RequestToken, CommandError> {
        let rest = self.next_rest_token();
        self.start_delete(room, id, Origin::Rest(rest))?;
        self.handle_engine(out);
        Ok(rest)
    }

    /// Reads message `id` of `room` to know that it exists; the removal follows the reply
    /// (`finish_delete`). `not_found` at once for an id never handed out.
    pub(super) fn start_delete(
        &mut self,
        room: &str,
        id: u64,
        origin: Origin,
    ) -> Result<(), CommandError> {
        validate::room_name(room)?;
        let never = self
            .rooms
            .get(room)
            .is_some_and(|r| r.next_id() != 0 && id >= r.next_id());
        if id == 0 || never {
            return Err(CommandError::new(ErrorCode::NotFound, not_found(room, id)));
        }
        let name = room.to_string();
        let query = Query::After {
            after: id - 1,
            limit: 1,
        };
        self.ask(
            Read::Delete {
                room: name.clone(),
                id,
                origin,
            },
            |token| Request::Page {
                token,
                room: name,
                query,
            },
        );
        Ok(())
    }

    /// The engine answered the read of a removal: `found` says whether the message is there.
    pub(super) fn finish_delete(
        &mut self,
        room: &str,
        id: u64,
        origin: Origin,
        found: Result<bool, StoreError>,
        out: &mut impl Outbox,
    ) {
        let answer = match found {
            Ok(true) => {
                let by = match &origin {
                    Origin::Rest(_) => "the API".to_string(),
                    Origin::Member { conn, .. } => self.members.get(conn).map_or_else(
                        || "an admin".to_string(),
                        |m| format!("admin {}", crate::log_safe(&m.name)),
                    ),
                };
                info!(
                    "{by} deletes message {id} of room {}",
                    crate::log_safe(room)
                );
                self.stats.api_calls.delete += 1;
                self.engine.request(Request::Remove {
                    room: room.to_string(),
                    what: Removal::One(id),
                });
                let payload = Payload::new(&Event::Deleted { room, id }.to_json());
                self.fan_out(room, &payload, None, out);
                Ok(())
            }
            Ok(false) => Err(CommandError::new(ErrorCode::NotFound, not_found(room, id))),
            Err(e) => Err(CommandError::new(
                ErrorCode::Unavailable,
                format!("the history store cannot be read now ({e}); retry later"),
            )),
        };
        match origin {
            Origin::Rest(token) => {
                let a = match answer {
                    Ok(()) => ApiAnswer::Done,
                    Err(e) if e.code == ErrorCode::NotFound => ApiAnswer::NotFound(e.message),
                    Err(e) => ApiAnswer::Unavailable(e.message),
                };
                self.api_answers.push((token, a));
            }
            Origin::Member {
                conn,
                serial,
                request_id,
            } => {
                if !self.is_same_member(conn, serial) {
                    return;
                }
                let request_id = request_id.as_deref();
                let event = match &answer {
                    Ok(()) => match request_id {
                        Some(request_id) => Event::Ack {
                            request_id,
                            room,
                            id: Some(id),
                        },
                        None => return,
                    },
                    Err(e) => Event::Error {
                        code: e.code,
                        message: &e.message,
                        request_id,
                    },
                };
                self.send_event(conn, &event, out);
            }
        }
    }

    /// Closes the connection of the member named `name` with `4000` and `reason`; its rooms
    /// get the `has left!` notice. `not_found` when no such member is connected. `by` says
    /// who asked, for the log.
    pub fn disconnect_member(
        &mut self,
        name: &str,
        reason: Reason,
        by: &str,
        out: &mut impl Outbox,
    ) -> Result<(), CommandError> {
        let conn = self.member_conn(name)?;
        if super::is_remote(conn) {
            return Err(CommandError::new(
                ErrorCode::NotFound,
                format!(
                    "member '{}' is connected to another node of the cluster; ask that node",
                    crate::log_safe(name)
                ),
            ));
        }
        info!(
            "{by} disconnects {}: {}",
            crate::log_safe(&self.members[&conn].name),
            crate::log_safe(reason.as_str())
        );
        self.stats.api_calls.disconnect += 1;
        self.disconnect(conn, out);
        out.close(conn, Close::Kicked(reason));
        Ok(())
    }

    /// The connection of the member named `name` (ignoring case), or `not_found`.
    fn member_conn(&self, name: &str) -> Result<ConnId, CommandError> {
        let missing = || {
            CommandError::new(
                ErrorCode::NotFound,
                format!("no member named '{}'", crate::log_safe(name)),
            )
        };
        if name.is_empty() || name.len() > validate::MAX_MEMBER_NAME {
            return Err(missing());
        }
        self.names
            .get(&name.to_ascii_lowercase())
            .copied()
            .filter(|c| self.members.contains_key(c))
            .ok_or_else(missing)
    }

    /// The server API answers that waited for the engine, each with its call's token.
    pub fn take_api_answers(&mut self) -> Vec<(RequestToken, ApiAnswer)> {
        std::mem::take(&mut self.api_answers)
    }
}
