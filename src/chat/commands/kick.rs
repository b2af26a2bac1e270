//! `kick`: an admin disconnects a member, with the effects of
//! `POST /api/members/{member}/disconnect` (close `4000` with the reason).

use serde::Deserialize;

use crate::chat::protocol::{CommandError, ErrorCode, Event};
use crate::chat::{Chat, Cx, Outbox, Reason};

use crate::chat::KICK_REASON as DEFAULT_REASON;

/// `{"command":"kick","member","reason"?}` (admins only).
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct Kick {
    /// The member's name.
    pub member: String,
    /// The close frame's reason (at most 123 bytes, no control characters).
    pub reason: Option<String>,
}

impl Kick {
    pub(in crate::chat) fn apply<O: Outbox>(
        self,
        chat: &mut Chat,
        cx: &mut Cx<'_, O>,
    ) -> Result<(), CommandError> {
        chat.require_admin(cx.conn)?;
        let reason =
            Reason::new(self.reason.as_deref().unwrap_or(DEFAULT_REASON)).ok_or_else(|| {
                CommandError::new(
                    ErrorCode::Invalid,
                    "reason must be at most 123 bytes without control characters",
                )
            })?;
        let by = match chat.members.get(&cx.conn) {
            Some(m) => format!("admin {}", crate::log_safe(&m.name)),
            None => return Ok(()),
        };
        let room = String::new();
        let ack = cx.request_id.map(|request_id| {
            Event::Ack {
                request_id,
                room: &room,
                id: None,
            }
            .to_json()
        });
        chat.disconnect_member(&self.member, reason, &by, cx.out)?;
        if let Some(json) = ack {
            chat.send_json(cx.conn, &json, cx.out);
        }
        Ok(())
    }
}
