//! `ping`: answered with `pong` and the server's time.

use serde::Deserialize;

use crate::chat::protocol::{CommandError, Event};
use crate::chat::{Chat, Cx, Outbox};

/// `{"command":"ping"}`: no fields.
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct Ping {}

impl Ping {
    pub(in crate::chat) fn apply<O: Outbox>(
        self,
        chat: &mut Chat,
        cx: &mut Cx<'_, O>,
    ) -> Result<(), CommandError> {
        let event = Event::Pong {
            ts: cx.now.unix_ms,
            request_id: cx.request_id,
        };
        chat.send_event(cx.conn, &event, cx.out);
        Ok(())
    }
}
