//! `rooms`: the rooms in memory with their member counts, by name.

use serde::Deserialize;

use crate::chat::protocol::{CommandError, Event, RoomSummary};
use crate::chat::{Chat, Cx, Outbox};

/// `{"command":"rooms"}`: no fields. (Named for what it does, so as not to be confused with
/// the core's membership type, `chat::rooms::Rooms`.)
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct ListRooms {}

impl ListRooms {
    pub(in crate::chat) fn apply<O: Outbox>(
        self,
        chat: &mut Chat,
        cx: &mut Cx<'_, O>,
    ) -> Result<(), CommandError> {
        // A token's `rooms` hide the others, as on `GET /api/rooms`.
        let may = |room: &str| {
            cfg!(not(feature = "server-api"))
                || chat.perms_of(cx.conn).is_none_or(|p| p.rooms.allows(room))
        };
        let rooms = chat
            .room_list()
            .into_iter()
            .filter(|(name, _, _)| may(name))
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
}
