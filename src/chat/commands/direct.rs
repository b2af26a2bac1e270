//! `direct`: a message to one member by name, delivered to both ends, never stored.

use serde::Deserialize;

use crate::chat::protocol::{CommandError, ErrorCode, Event, RawJson};
use crate::chat::{Chat, Cx, Outbox, validate};

/// `{"command":"direct","to","message","data"?}`.
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct Direct {
    /// The recipient's name.
    pub to: String,
    /// The text.
    pub message: String,
    /// Any JSON, relayed as the bytes sent (filled in by
    /// [`decode`](crate::chat::protocol::decode)).
    #[serde(skip_deserializing)]
    pub data: Option<RawJson>,
}

impl Direct {
    pub(in crate::chat) fn apply<O: Outbox>(
        self,
        chat: &mut Chat,
        cx: &mut Cx<'_, O>,
    ) -> Result<(), CommandError> {
        let (to, message) = (self.to.as_str(), self.message.as_str());
        validate::message_text(message, chat.cfg.max_message_chars)?;
        let not_found =
            || CommandError::new(ErrorCode::NotFound, format!("no member named '{to}'"));
        if to.is_empty() || to.len() > validate::MAX_MEMBER_NAME {
            return Err(not_found());
        }
        let Some(&target) = chat.names.get(&to.to_ascii_lowercase()) else {
            return Err(not_found());
        };
        let (Some(from), Some(dest)) = (chat.members.get(&cx.conn), chat.members.get(&target))
        else {
            return Err(not_found());
        };
        let event = |request_id| Event::Direct {
            from: &from.name,
            to: &dest.name,
            message,
            ts: cx.now.unix_ms,
            data: self.data.as_ref(),
            request_id,
        };
        let to_sender = event(cx.request_id).to_json();
        let to_target = (target != cx.conn).then(|| event(None).to_json());
        if let Some(json) = to_target {
            #[cfg(feature = "cluster")]
            if chat.cluster_direct(target, &json)? {
                chat.send_json(cx.conn, &to_sender, cx.out);
                return Ok(());
            }
            chat.deliver_json(target, &json, cx.out);
        }
        chat.send_json(cx.conn, &to_sender, cx.out);
        Ok(())
    }
}
