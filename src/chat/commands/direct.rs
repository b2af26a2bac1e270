//! `direct`: a message to one member by name, delivered to both ends, never stored.

use crate::chat::protocol::{CommandError, ErrorCode, Event, RawJson};
use crate::chat::{Chat, Cx, Outbox, validate};

pub(crate) fn apply<O: Outbox>(
    chat: &mut Chat,
    cx: &mut Cx<'_, O>,
    to: &str,
    message: &str,
    data: Option<&RawJson>,
) -> Result<(), CommandError> {
    validate::message_text(message, chat.cfg.max_message_chars)?;
    let not_found = || CommandError::new(ErrorCode::NotFound, format!("no member named '{to}'"));
    if to.is_empty() || to.len() > validate::MAX_MEMBER_NAME {
        return Err(not_found());
    }
    let Some(&target) = chat.names.get(&to.to_lowercase()) else {
        return Err(not_found());
    };
    let (Some(from), Some(dest)) = (chat.members.get(&cx.conn), chat.members.get(&target)) else {
        return Err(not_found());
    };
    let event = |request_id| Event::Direct {
        from: &from.name,
        to: &dest.name,
        message,
        ts: cx.now.unix_ms,
        data,
        request_id,
    };
    let to_sender = event(cx.request_id).to_json();
    let to_target = (target != cx.conn).then(|| event(None).to_json());
    if let Some(json) = to_target {
        chat.deliver_json(target, &json, cx.out);
    }
    chat.send_json(cx.conn, &to_sender, cx.out);
    Ok(())
}
