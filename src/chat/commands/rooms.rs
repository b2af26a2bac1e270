//! `rooms`: the rooms in memory with their member counts, by name.

use crate::chat::protocol::{CommandError, Event, RoomSummary};
use crate::chat::{Chat, Cx, Outbox};

pub(crate) fn apply<O: Outbox>(chat: &mut Chat, cx: &mut Cx<'_, O>) -> Result<(), CommandError> {
    let rooms = chat
        .room_list()
        .into_iter()
        .map(|(name, members, _)| RoomSummary {
            name: name.to_string(),
            members,
        })
        .collect();
    chat.send_event(
        cx.conn,
        &Event::Rooms {
            rooms,
            request_id: cx.request_id,
        },
        cx.out,
    );
    Ok(())
}
