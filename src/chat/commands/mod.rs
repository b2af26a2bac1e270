//! One file per command; [`apply`] dispatches a decoded [`Command`] to its handler.
//!
//! Each handler validates, changes state, and answers through the outbox. An `Err` becomes an
//! `error` event and leaves the state as it was: handlers check everything before changing
//! anything.

use super::protocol::{Command, CommandError};
use super::{Chat, Cx, Outbox};

pub(crate) mod broadcast;
pub(crate) mod direct;
pub(crate) mod history;
pub(crate) mod join;
pub(crate) mod leave;
pub(crate) mod list;
pub(crate) mod me;
pub(crate) mod ping;
pub(crate) mod rooms;

pub(crate) fn apply<O: Outbox>(
    chat: &mut Chat,
    cx: &mut Cx<'_, O>,
    command: Command,
) -> Result<(), CommandError> {
    match command {
        Command::Me => me::apply(chat, cx),
        Command::List { room } => list::apply(chat, cx, room.as_deref()),
        Command::Broadcast {
            message,
            room,
            data,
            echo,
            msg_id,
        } => {
            let args = broadcast::Args {
                message,
                room,
                data,
                echo: echo.unwrap_or(true),
                msg_id,
            };
            broadcast::apply(chat, cx, args)
        }
        Command::Join {
            room,
            last_n,
            since,
        } => join::apply(chat, cx, &room, last_n, since),
        Command::Leave { room } => leave::apply(chat, cx, &room),
        Command::Rooms => rooms::apply(chat, cx),
        Command::History {
            room,
            before,
            limit,
        } => history::apply(chat, cx, &room, before, limit),
        Command::Direct { to, message, data } => {
            direct::apply(chat, cx, &to, &message, data.as_ref())
        }
        Command::Ping => ping::apply(chat, cx),
    }
}
