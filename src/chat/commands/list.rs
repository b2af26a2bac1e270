//! `list`: every connected member (oldest connection first), or one room's members (join order).

use serde::Deserialize;

use crate::chat::protocol::{CommandError, ErrorCode, Event};
use crate::chat::{Chat, Cx, Outbox, validate};

/// `{"command":"list","room"?}`.
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct List {
    /// Restrict to this room.
    pub room: Option<String>,
}

impl List {
    pub(in crate::chat) fn apply<O: Outbox>(
        self,
        chat: &mut Chat,
        cx: &mut Cx<'_, O>,
    ) -> Result<(), CommandError> {
        let room = self.room.as_deref();
        let members = match room {
            None => chat.member_names(),
            Some(room) => {
                validate::room_name(room)?;
                chat.require_room(cx.conn, room)?;
                match chat.room_detail(room) {
                    Some((names, _)) => names,
                    None => {
                        return Err(CommandError::new(
                            ErrorCode::NotFound,
                            format!("room '{room}' does not exist"),
                        ));
                    }
                }
            }
        };
        let json = Event::List {
            members,
            room,
            request_id: cx.request_id,
        }
        .to_json();
        chat.send_json(cx.conn, &json, cx.out);
        Ok(())
    }
}
