//! `me`: the member's name, id and rooms.

use serde::Deserialize;

use crate::chat::protocol::{CommandError, Event};
use crate::chat::{Chat, Cx, Outbox};

/// `{"command":"me"}`: no fields.
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct Me {}

impl Me {
    pub(in crate::chat) fn apply<O: Outbox>(
        self,
        chat: &mut Chat,
        cx: &mut Cx<'_, O>,
    ) -> Result<(), CommandError> {
        let Some(m) = chat.members.get(&cx.conn) else {
            return Ok(());
        };
        let event = Event::Me {
            member: &m.name,
            id: &m.id,
            rooms: Some(
                chat.rooms
                    .rooms_of(cx.conn)
                    .iter()
                    .map(String::as_str)
                    .collect(),
            ),
            request_id: cx.request_id,
        };
        let json = event.to_json();
        chat.send_json(cx.conn, &json, cx.out);
        Ok(())
    }
}
