//! `history`: a page of a room's messages older than `before`, ascending, with `more`.

use crate::chat::protocol::{CommandError, Event};
use crate::chat::{Chat, Cx, Outbox, validate};
use crate::store::Page;

pub(crate) fn apply<O: Outbox>(
    chat: &mut Chat,
    cx: &mut Cx<'_, O>,
    room: &str,
    before: Option<u64>,
    limit: Option<u64>,
) -> Result<(), CommandError> {
    validate::room_name(room)?;
    // A room that never had a message answers with an empty page rather than an error: history
    // is public, and "nothing yet" is the truth.
    let page = chat.history_page(room, before, limit).unwrap_or_default();
    send_page(chat, cx, room, &page);
    Ok(())
}

pub(crate) fn send_page<O: Outbox>(chat: &mut Chat, cx: &mut Cx<'_, O>, room: &str, page: &Page) {
    let event = Event::History {
        room,
        messages: &page.messages,
        more: page.more,
        request_id: cx.request_id,
    };
    chat.send_event(cx.conn, &event, cx.out);
}
