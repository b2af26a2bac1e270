//! `history`: a page of a room's messages older than `before`, ascending, with `more`.

use serde::Deserialize;

use crate::chat::protocol::{CommandError, Event};
use crate::chat::{Chat, Cx, Outbox, validate};
use crate::store::Page;

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
        // The store is read here, through the view the REST page uses too. A room that never had a
        // message answers with an empty page rather than an error: history is public, and
        // "nothing yet" is the truth.
        let page = chat
            .history_page(&self.room, self.before, self.limit)
            .unwrap_or_default();
        send_page(chat, cx, &self.room, &page);
        Ok(())
    }
}

/// Sends `page` of `room` to the member who asked (`history`, `join`, the welcome).
pub(in crate::chat) fn send_page<O: Outbox>(
    chat: &mut Chat,
    cx: &mut Cx<'_, O>,
    room: &str,
    page: &Page,
) {
    let event = Event::History {
        room,
        messages: &page.messages,
        more: page.more,
        request_id: cx.request_id,
    };
    chat.send_event(cx.conn, &event, cx.out);
}
