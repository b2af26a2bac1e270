//! `list`: every connected member (oldest connection first), or one room's members (join order).

use crate::chat::protocol::{CommandError, ErrorCode, Event};
use crate::chat::{Chat, Cx, Outbox, validate};

pub(crate) fn apply<O: Outbox>(
    chat: &mut Chat,
    cx: &mut Cx<'_, O>,
    room: Option<&str>,
) -> Result<(), CommandError> {
    let members = match room {
        None => chat.member_names(),
        Some(room) => {
            validate::room_name(room)?;
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
