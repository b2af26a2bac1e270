//! `leave`: step out of a room; the room, the leaver included, gets the `has left!` notice.

use serde::Deserialize;

use crate::chat::protocol::{CommandError, Event};
use crate::chat::{Chat, Cx, Outbox, validate};

/// `{"command":"leave","room"}`.
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct Leave {
    /// The room.
    pub room: String,
}

impl Leave {
    pub(in crate::chat) fn apply<O: Outbox>(
        self,
        chat: &mut Chat,
        cx: &mut Cx<'_, O>,
    ) -> Result<(), CommandError> {
        let room = self.room.as_str();
        validate::room_name(room)?;
        let Some(member) = chat.members.get(&cx.conn) else {
            return Ok(());
        };
        chat.require_member(cx.conn, room)?;
        let name = member.name.clone();
        // Sent before the removal so that the leaver hears it too: a client that sent no
        // request_id still learns that its leave happened.
        // A join page still on its way is dropped when it comes, and the events held for it
        // go now: the leaver hears its own notice.
        chat.stop_waiting(cx.conn, room);
        chat.notice(room, &name, false, cx.out);
        chat.rooms.leave(cx.conn, room);
        #[cfg(feature = "cluster")]
        chat.cluster_left(cx.conn, room);
        if let Some(request_id) = cx.request_id {
            chat.send_event(
                cx.conn,
                &Event::Ack {
                    request_id,
                    room,
                    id: None,
                },
                cx.out,
            );
        }
        Ok(())
    }
}
