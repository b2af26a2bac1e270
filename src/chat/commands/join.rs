//! `join`: enter a room (creating it on demand), tell the room, send the joiner its history.
//!
//! The history comes from the engine, maybe turns later: until it does, the joiner's live
//! events of the room are held (`pending.rs`), then sent after it without the overlap.

use serde::Deserialize;

use crate::chat::pending::Read;
use crate::chat::protocol::{CommandError, ErrorCode};
use crate::chat::rooms::Refused;
use crate::chat::{Chat, Cx, Outbox, validate};
use crate::store::Query;

/// `{"command":"join","room","last_n"?,"since"?}`.
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct Join {
    /// The room.
    pub room: String,
    /// How many recent messages to send.
    pub last_n: Option<u64>,
    /// Send every message after this id instead.
    pub since: Option<u64>,
}

impl Join {
    pub(in crate::chat) fn apply<O: Outbox>(
        self,
        chat: &mut Chat,
        cx: &mut Cx<'_, O>,
    ) -> Result<(), CommandError> {
        let room = self.room.as_str();
        validate::room_name(room)?;
        chat.require_room(cx.conn, room)?;
        let Some(member) = chat.members.get(&cx.conn) else {
            return Ok(());
        };
        let name = member.name.clone();
        let serial = member.serial;
        let new_room = !chat.rooms.contains(room);
        // A room new to memory learns its next id from the engine (`LastId`, below).
        let joined = chat
            .rooms
            .join(cx.conn, room, || 0)
            .map_err(|refused| match refused {
                Refused::MemberLimit(max) => CommandError::new(
                    ErrorCode::LimitReached,
                    format!("a member may be in at most {max} rooms"),
                ),
                Refused::ServerLimit(max) => CommandError::new(
                    ErrorCode::LimitReached,
                    format!("the server holds at most {max} rooms"),
                ),
            })?;
        if new_room {
            chat.ask_ids(room);
        }
        if joined {
            #[cfg(feature = "cluster")]
            chat.cluster_joined(cx.conn, room);
            chat.notice(room, &name, true, cx.out);
        }
        let query = match self.since {
            Some(after) => Query::After {
                after,
                limit: chat.cfg.resume_cap,
            },
            None => {
                let n = self.last_n.unwrap_or(chat.cfg.max_history as u64);
                Query::Before {
                    before: None,
                    limit: n.min(chat.cfg.history_page_cap as u64) as usize,
                }
            }
        };
        // The joiner's page; from here on its live events of the room wait for it.
        let read = Read::Join {
            conn: cx.conn,
            serial,
            room: room.to_string(),
            backwards: matches!(query, Query::Before { .. }),
            request_id: cx.request_id.map(str::to_string),
        };
        let token = chat.request_page(read, room, query);
        chat.wait_for_page(cx.conn, room, token);
        Ok(())
    }
}
