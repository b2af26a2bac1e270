//! `broadcast`: a message to a room, numbered, stored, delivered to every member.
//!
//! The message gets the room's next id, is serialized and framed once, copied to each member's
//! output, and appended to the history engine. Delivery does not wait for the disk; the `ack`
//! does (see [`Chat::ack_when_durable`]). The id must be reserved first: the room's broadcasts
//! wait, in order, until the engine says `IdsReserved` (at once, mostly: engines reserve ahead)
//! and are refused with `unavailable` when it cannot (see `pending.rs`). When the engine's
//! backlog is full the broadcast is refused with `unavailable` before anything happens.

use serde::Deserialize;

use crate::chat::pending::Held;
use crate::chat::protocol::{CommandError, ErrorCode, Event, RawJson};
use crate::chat::{Chat, Cx, DEFAULT_ROOM, Outbox, validate};

/// `{"command":"broadcast","message","room"?,"data"?,"echo"?,"msg_id"?}`.
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct Broadcast {
    /// The text.
    pub message: String,
    /// Target room (default `general`).
    pub room: Option<String>,
    /// Any JSON, relayed and stored as the bytes sent (filled in by
    /// [`decode`](crate::chat::protocol::decode)).
    #[serde(skip_deserializing)]
    pub data: Option<RawJson>,
    /// Whether the sender gets its own message (default true).
    pub echo: Option<bool>,
    /// Idempotency key.
    pub msg_id: Option<String>,
}

pub(in crate::chat) const ALONE: &str = "No other members are currently connected.";

impl Broadcast {
    pub(in crate::chat) fn apply<O: Outbox>(
        self,
        chat: &mut Chat,
        cx: &mut Cx<'_, O>,
    ) -> Result<(), CommandError> {
        let room = self.room.as_deref().unwrap_or(DEFAULT_ROOM);
        validate::room_name(room)?;
        validate::message_text(&self.message, chat.cfg.max_message_chars)?;
        if let Some(msg_id) = &self.msg_id {
            validate::msg_id(msg_id)?;
        }
        let Some(member) = chat.members.get(&cx.conn) else {
            return Ok(());
        };
        chat.require_publish(cx.conn, room)?;
        chat.require_member(cx.conn, room)?;
        let sender = member.name.clone();
        let serial = member.serial;

        // Behind held broadcasts of the room, a repeat is recognised when its turn comes.
        let waiting = chat.held.contains_key(room);
        if let (Some(msg_id), false) = (&self.msg_id, waiting) {
            if let Some(first) = chat.dedup.get(cx.now.mono, room, msg_id) {
                // A repeat: not delivered or stored again; the ack names the first id. The first
                // copy's ack may still be waiting for the disk, so this one waits behind it.
                let ticket = chat.last_ticket;
                ack_when_durable(chat, cx, room, first, ticket);
                return Ok(());
            }
        }

        // Is the engine's backlog (held broadcasts included) full?
        if chat.unstored() >= chat.cfg.max_unstored as u64 {
            return Err(CommandError::new(
                ErrorCode::Unavailable,
                "the history store is not keeping up; nothing was sent, retry later",
            ));
        }
        // Numbered, delivered and stored in turn, once the room's next id is reserved.
        let held = Held {
            conn: cx.conn,
            serial,
            sender,
            message: self.message,
            data: self.data,
            echo: self.echo,
            msg_id: self.msg_id,
            request_id: cx.request_id.map(str::to_string),
            rest: None,
            mono: cx.now.mono,
            ts: cx.now.unix_ms,
        };
        chat.held
            .entry(room.to_string())
            .or_default()
            .push_back(held);
        chat.held_count += 1;
        // Until it is numbered, the room stays in memory even if every member leaves it.
        chat.rooms.pin(room);
        chat.release_held(room, cx.out);
        Ok(())
    }
}

/// With a `request_id`, queues the `ack` naming `id`, sent once the store holds `ticket`.
fn ack_when_durable<O: Outbox>(chat: &mut Chat, cx: &Cx<'_, O>, room: &str, id: u64, ticket: u64) {
    if let Some(request_id) = cx.request_id {
        let json = Event::Ack {
            request_id,
            room,
            id: Some(id),
        }
        .to_json();
        chat.ack_when_durable(cx.conn, ticket, json);
    }
}
