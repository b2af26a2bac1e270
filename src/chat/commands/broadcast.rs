//! `broadcast`: a message to a room, numbered, stored, delivered to every member.
//!
//! The message gets the room's next id, is serialized and framed once, copied to each member's
//! output, and appended to the history store. Delivery does not wait for the store; the `ack`
//! does (see [`Chat::ack_when_durable`]). When the store's backlog is full, or the id cannot be
//! reserved durably, the broadcast is refused with `unavailable` before anything happens.

use serde::Deserialize;

use crate::chat::protocol::{CommandError, ErrorCode, Event, RawJson};
use crate::chat::{Chat, Cx, DEFAULT_ROOM, Outbox, Payload, validate};
use crate::store::StoredMessage;

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

const ALONE: &str = "No other members are currently connected.";

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
        if !chat.rooms.is_member(cx.conn, room) {
            return Err(CommandError::new(
                ErrorCode::NotMember,
                format!("you are not in room '{room}'"),
            ));
        }
        let sender = member.name.clone();

        if let Some(msg_id) = &self.msg_id {
            if let Some(first) = chat.dedup.get(cx.now.mono, room, msg_id) {
                // A repeat: not delivered or stored again; the ack names the first id. The first
                // copy's ack may still be waiting for the disk, so this one waits behind it.
                let ticket = chat.last_ticket;
                ack_when_durable(chat, cx, room, first, ticket);
                return Ok(());
            }
        }

        // Store call 1 of 3: is its backlog full?
        if chat.unstored() >= chat.cfg.max_unstored as u64 {
            return Err(CommandError::new(
                ErrorCode::Unavailable,
                "the history store is not keeping up; nothing was sent, retry later",
            ));
        }
        // Store call 2 of 3: the id, reserved.
        let id = next_id(chat, room)?;
        let Some(r) = chat.rooms.get_mut(room) else {
            return Ok(());
        };
        r.set_next_id(id + 1);
        let alone = r.members().len() == 1;
        let ts = cx.now.unix_ms;
        let event = Event::Broadcast {
            room,
            member: &sender,
            message: &self.message,
            id: Some(id),
            ts: Some(ts),
            data: self.data.as_ref(),
            joined: None,
            left: None,
        };
        let payload = Payload::new(&event.to_json());
        let skip = (self.echo == Some(false)).then_some(cx.conn);
        chat.fan_out(room, &payload, skip, cx.out);
        cx.out.room_published(room, &payload);
        if alone {
            chat.send_event(cx.conn, &Event::System { message: ALONE }, cx.out);
        }
        log::info!(
            "📤 Broadcast from {}: {}",
            crate::log_safe(&sender),
            crate::log_safe(&self.message)
        );

        let stored = StoredMessage {
            id,
            member: sender,
            message: self.message,
            ts,
            data: self.data,
        };
        // Store call 3 of 3: the message, after delivery; the ack waits for it.
        let ticket = chat.store.append(room, stored);
        chat.last_ticket = ticket;
        chat.stats.broadcasts += 1;
        if let Some(msg_id) = self.msg_id {
            chat.dedup.remember(cx.now.mono, room, &msg_id, id);
        }
        ack_when_durable(chat, cx, room, id, ticket);
        Ok(())
    }
}

/// The id the room's next message gets, reserved in the store: an id a restart could hand out
/// again is never used.
fn next_id(chat: &mut Chat, room: &str) -> Result<u64, CommandError> {
    let unavailable = |e: crate::store::StoreError| {
        CommandError::new(
            ErrorCode::Unavailable,
            format!("the history store cannot take messages now ({e}); retry later"),
        )
    };
    let known = chat.rooms.get(room).map_or(0, |r| r.next_id());
    let id = if known == 0 {
        chat.store.last_id(room).map_err(unavailable)? + 1
    } else {
        known
    };
    chat.store.reserve(room, id).map_err(unavailable)?;
    Ok(id)
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
