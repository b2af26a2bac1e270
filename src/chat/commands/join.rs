//! `join`: enter a room (creating it on demand), tell the room, send the joiner its history.

use serde::Deserialize;

use crate::chat::protocol::{CommandError, ErrorCode};
use crate::chat::rooms::Refused;
use crate::chat::{Chat, Cx, Outbox, validate};
use crate::store::Query;

use super::history::send_page;

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
        let Some(member) = chat.members.get(&cx.conn) else {
            return Ok(());
        };
        let name = member.name.clone();
        let store = &mut chat.store;
        // Store call 1 of 2: a room new to memory continues its ids from the store (or asks
        // again at its next broadcast when the store cannot be read now).
        let first_id = || store.last_id(room).map_or(0, |last| last + 1);
        let joined = chat
            .rooms
            .join(cx.conn, room, first_id)
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
        if joined {
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
        // Store call 2 of 2: the joiner's page.
        let page = chat.read_page(room, query);
        send_page(chat, cx, room, &page);
        Ok(())
    }
}
