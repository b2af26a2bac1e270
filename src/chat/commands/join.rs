//! `join`: enter a room (creating it on demand), tell the room, send the joiner its history.

use crate::chat::protocol::{CommandError, ErrorCode};
use crate::chat::{Chat, Cx, Outbox, validate};
use crate::store::Query;

use super::history::send_page;

pub(crate) fn apply<O: Outbox>(
    chat: &mut Chat,
    cx: &mut Cx<'_, O>,
    room: &str,
    last_n: Option<u64>,
    since: Option<u64>,
) -> Result<(), CommandError> {
    validate::room_name(room)?;
    let Some(member) = chat.members.get(&cx.conn) else {
        return Ok(());
    };
    let already = member.rooms.iter().any(|r| r == room);
    if !already {
        if member.rooms.len() >= chat.cfg.max_rooms_per_member {
            return Err(CommandError::new(
                ErrorCode::LimitReached,
                format!(
                    "a member may be in at most {} rooms",
                    chat.cfg.max_rooms_per_member
                ),
            ));
        }
        if !chat.rooms.contains_key(room) && chat.rooms.len() >= chat.cfg.max_rooms {
            return Err(CommandError::new(
                ErrorCode::LimitReached,
                format!("the server holds at most {} rooms", chat.cfg.max_rooms),
            ));
        }
        let name = member.name.clone();
        chat.ensure_room(room).members.push(cx.conn);
        if let Some(m) = chat.members.get_mut(&cx.conn) {
            m.rooms.push(room.to_string());
        }
        chat.notice(room, &name, true, cx.out);
    }
    let query = match since {
        Some(after) => Query::After {
            after,
            limit: chat.cfg.resume_cap,
        },
        None => {
            let n = last_n.unwrap_or(chat.cfg.max_history as u64);
            Query::Before {
                before: None,
                limit: n.min(chat.cfg.history_page_cap as u64) as usize,
            }
        }
    };
    let page = chat.read_page(room, query);
    send_page(chat, cx, room, &page);
    Ok(())
}
