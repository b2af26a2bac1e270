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
        let rooms = chat.room_list().into_iter();
        // A token's `rooms` hide the others, as on `GET /api/rooms`.
        #[cfg(feature = "server-api")]
        let rooms = rooms
            .filter(|(name, _, _)| chat.perms_of(cx.conn).is_none_or(|p| p.rooms.allows(name)));
        let rooms = rooms
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
