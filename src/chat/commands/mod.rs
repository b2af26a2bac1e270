//! Every command a client can send: [`Command`] lists them, each one's file under `commands/`
//! holds its fields (a `Deserialize` struct) next to its `apply`, and [`apply`] dispatches with
//! one `match`.
//!
//! Each `apply` validates, changes state, and answers through the outbox. An `Err` becomes an
//! `error` event and leaves the state as it was: handlers check everything before changing
//! anything.
//!
//! Adding a command: a file with its struct and `apply`, one line in the `commands!` list
//! below (its wire name is written once, there), and the compiler then points at the `match`
//! in [`apply`]; [`Command::NAMES`] (what `decode` knows), [`Command::name`] and the check of
//! `docs/PROTOCOL.md`'s table follow from the list.

use serde::Deserialize;

use super::protocol::CommandError;
use super::{Chat, Cx, Outbox};

pub(crate) mod broadcast;
#[cfg(feature = "server-api")]
pub(crate) mod delete;
pub(crate) mod direct;
pub(crate) mod history;
pub(crate) mod join;
#[cfg(feature = "server-api")]
pub(crate) mod kick;
pub(crate) mod leave;
pub(crate) mod list;
pub(crate) mod me;
pub(crate) mod ping;
pub(crate) mod rooms;

pub use broadcast::Broadcast;
#[cfg(feature = "server-api")]
pub use delete::Delete;
pub use direct::Direct;
pub use history::History;
pub use join::Join;
#[cfg(feature = "server-api")]
pub use kick::Kick;
pub use leave::Leave;
pub use list::List;
pub use me::Me;
pub use ping::Ping;
pub use rooms::ListRooms;

/// Defines [`Command`] from one list of `Variant(Struct) = "wire name"`, so that the serde tag,
/// [`Command::NAMES`] and [`Command::name`] come from the same literal and cannot drift.
macro_rules! commands {
    ($($(#[$doc:meta])* $variant:ident($ty:ident) = $name:literal $(if $cfg:meta)?,)*) => {
        /// A command from a client, tagged by `command`, fields as in SPEC §3.
        #[derive(Debug, Clone, PartialEq, Deserialize)]
        #[serde(tag = "command")]
        pub enum Command {
            $($(#[$doc])* $(#[cfg($cfg)])? #[serde(rename = $name)] $variant($ty),)*
        }

        impl Command {
            /// Every command's wire name, in the order of the enum.
            pub const NAMES: &'static [&'static str] = &[$($(#[cfg($cfg)])? $name),*];

            /// This command's wire name.
            pub fn name(&self) -> &'static str {
                match self {
                    $($(#[cfg($cfg)])? Command::$variant(_) => $name,)*
                }
            }
        }
    };
}

commands! {
    /// Who am I.
    Me(Me) = "me",
    /// Members connected, or members of one room.
    List(List) = "list",
    /// A message to a room.
    Broadcast(Broadcast) = "broadcast",
    /// Enter a room (created on demand).
    Join(Join) = "join",
    /// Leave a room.
    Leave(Leave) = "leave",
    /// Rooms that exist.
    Rooms(ListRooms) = "rooms",
    /// A page of a room's history.
    History(History) = "history",
    /// A message to one member.
    Direct(Direct) = "direct",
    /// Liveness check.
    Ping(Ping) = "ping",
    /// Remove a message (admins).
    Delete(Delete) = "delete" if feature = "server-api",
    /// Disconnect a member (admins).
    Kick(Kick) = "kick" if feature = "server-api",
}

/// Carries out one decoded command from `cx.conn`.
pub(in crate::chat) fn apply<O: Outbox>(
    chat: &mut Chat,
    cx: &mut Cx<'_, O>,
    command: Command,
) -> Result<(), CommandError> {
    match command {
        Command::Me(c) => c.apply(chat, cx),
        Command::List(c) => c.apply(chat, cx),
        Command::Broadcast(c) => c.apply(chat, cx),
        Command::Join(c) => c.apply(chat, cx),
        Command::Leave(c) => c.apply(chat, cx),
        Command::Rooms(c) => c.apply(chat, cx),
        Command::History(c) => c.apply(chat, cx),
        Command::Direct(c) => c.apply(chat, cx),
        Command::Ping(c) => c.apply(chat, cx),
        #[cfg(feature = "server-api")]
        Command::Delete(c) => c.apply(chat, cx),
        #[cfg(feature = "server-api")]
        Command::Kick(c) => c.apply(chat, cx),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::chat::protocol::decode;

    /// One valid frame per command: every name of the list decodes to the command of that name.
    #[test]
    fn every_name_decodes_to_its_command() {
        let frames = [
            r#"{"command":"me"}"#,
            r#"{"command":"list"}"#,
            r#"{"command":"broadcast","message":"m"}"#,
            r#"{"command":"join","room":"r"}"#,
            r#"{"command":"leave","room":"r"}"#,
            r#"{"command":"rooms"}"#,
            r#"{"command":"history","room":"r"}"#,
            r#"{"command":"direct","to":"b","message":"m"}"#,
            r#"{"command":"ping"}"#,
            r#"{"command":"delete","room":"r","id":1}"#,
            r#"{"command":"kick","member":"b"}"#,
        ];
        let known = if cfg!(feature = "server-api") { 11 } else { 9 };
        let names: Vec<&str> = frames[..known]
            .iter()
            .map(|f| decode(f).command.expect(f).name())
            .collect();
        assert_eq!(names, Command::NAMES, "one frame per command, in order");
    }

    /// `docs/PROTOCOL.md`'s table of commands has one row per command, no more.
    #[test]
    fn the_protocol_doc_lists_every_command() {
        let doc = include_str!("../../../docs/PROTOCOL.md");
        let table = doc
            .split("## Commands")
            .nth(1)
            .expect("a Commands section")
            .split("\n\n")
            .nth(1)
            .expect("a table after the heading");
        let rows: Vec<&str> = table
            .lines()
            .filter_map(|l| l.strip_prefix("| `"))
            .filter_map(|l| l.split_once('`'))
            .map(|(name, _)| name)
            // The admin commands are in the table; builds without the server API lack them.
            .filter(|n| cfg!(feature = "server-api") || !["delete", "kick"].contains(n))
            .collect();
        assert_eq!(rows, Command::NAMES);
    }
}
