//! `history`: a page of a room's messages older than `before`, ascending, with `more`.

use serde::Deserialize;

use crate::chat::pending::Read;
use crate::chat::protocol::CommandError;
use crate::chat::{Chat, Cx, Outbox, validate};
use crate::store::Query;

/// `{"command":"history","room","before"?,"limit"?}`.
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct History {
    /// The room.
    pub room: String,
    /// Only messages with a smaller id.
    pub before: Option<u64>,
    /// Page size (capped).
    pub limit: Option<u64>,
}

impl History {
    pub(in crate::chat) fn apply<O: Outbox>(
        self,
        chat: &mut Chat,
        cx: &mut Cx<'_, O>,
    ) -> Result<(), CommandError> {
        validate::room_name(&self.room)?;
        chat.require_room(cx.conn, &self.room)?;
        let Some(serial) = chat.members.get(&cx.conn).map(|m| m.serial) else {
            return Ok(());
        };
        // The page is sent when the engine answers. A room that never had a message answers
        // with an empty page rather than an error: history is public, and "nothing yet" is
        // the truth. A page that cannot be read is `unavailable`.
        let limit = chat.page_limit(self.limit);
        let query = Query::Before {
            before: self.before,
            limit,
        };
        let read = Read::History {
            conn: cx.conn,
            serial,
            room: self.room.clone(),
            request_id: cx.request_id.map(str::to_string),
        };
        chat.request_page(read, &self.room, query);
        Ok(())
    }
}
