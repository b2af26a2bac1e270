//! `delete`: an admin removes a message, with the effects of
//! `DELETE /api/rooms/{room}/messages/{id}` (the room gets `deleted`; the id stays taken).

use serde::Deserialize;

use crate::chat::api::Origin;
use crate::chat::protocol::CommandError;
use crate::chat::{Chat, Cx, Outbox};

/// `{"command":"delete","room","id"}` (admins only).
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct Delete {
    /// The room.
    pub room: String,
    /// The message's id.
    pub id: u64,
}

impl Delete {
    pub(in crate::chat) fn apply<O: Outbox>(
        self,
        chat: &mut Chat,
        cx: &mut Cx<'_, O>,
    ) -> Result<(), CommandError> {
        chat.require_admin(cx.conn)?;
        let Some(serial) = chat.members.get(&cx.conn).map(|m| m.serial) else {
            return Ok(());
        };
        // The message is read first (an unknown id is `not_found`); the `ack` follows.
        let origin = Origin::Member {
            conn: cx.conn,
            serial,
            request_id: cx.request_id.map(str::to_string),
        };
        chat.start_delete(&self.room, self.id, origin)
    }
}
