//! History storage: the engines the chat core talks to, and the stores they are built from.
//!
//! The core talks to history only through the asynchronous boundary in [`engine`] (requests in,
//! replies out, no I/O on the loop thread); its module docs are the one description of that
//! boundary. [`open_engine`] opens the one the settings name: the memory engine
//! ([`engine::Immediate`] over [`memory::MemoryStore`]) or SQLite (`sqlite::SqliteStore`:
//! group commit on a writer thread, reads on a reader thread).
//!
//! [`HistoryStore`] is the synchronous store an [`engine::Immediate`] wraps: calls that never
//! wait for I/O (the memory ring, test doubles). Appends return a *ticket*; a message is
//! durable once [`HistoryStore::durable`] has reached its ticket. Ids are never handed out
//! twice, even across a crash: before the core delivers id N it asks for a reservation, and the
//! SQLite engine keeps a durable per-room high-water mark ahead of delivery (see
//! `docs/PROTOCOL.md`).

use std::fmt;
use std::time::Instant;

use serde::Serialize;

use crate::chat::protocol::RawJson;

pub mod engine;
pub mod memory;
#[cfg(feature = "sqlite")]
pub mod sqlite;

/// One stored room message, in the shape of the `history` event.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct StoredMessage {
    /// Per-room sequence number: 1, 2, 3, … without gaps.
    pub id: u64,
    /// Sender's name.
    pub member: String,
    /// The text.
    pub message: String,
    /// Unix milliseconds.
    pub ts: u64,
    /// The JSON the sender attached, verbatim.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub data: Option<RawJson>,
}

/// Which part of a room's history a page covers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Query {
    /// The newest `limit` messages with an id below `before` (all ids when `None`).
    /// `more` says whether older ones exist.
    Before {
        /// Exclusive upper bound on ids.
        before: Option<u64>,
        /// Page size.
        limit: usize,
    },
    /// The oldest `limit` messages with an id above `after`. `more` says whether newer ones exist.
    After {
        /// Exclusive lower bound on ids.
        after: u64,
        /// Page size.
        limit: usize,
    },
}

/// What a moderator takes out of a room's history. The ids stay taken either way: a
/// tombstone keeps the highest one, so a restart (or the room created again) continues above.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Removal {
    /// The message with this id (`DELETE /api/rooms/{room}/messages/{id}`, `delete`).
    One(u64),
    /// Every message with an id up to this one: the room was deleted.
    UpTo(u64),
}

impl Removal {
    /// Whether a message with `id` is taken out.
    pub fn covers(self, id: u64) -> bool {
        match self {
            Removal::One(n) => id == n,
            Removal::UpTo(n) => id <= n,
        }
    }
}

/// A page of history, ascending by id.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Page {
    /// The messages, ascending by id.
    pub messages: Vec<StoredMessage>,
    /// Whether messages beyond this page exist in the direction of the query.
    pub more: bool,
}

/// The store could not answer (a read failed, or it cannot write now): the caller must not guess.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoreError(pub String);

impl fmt::Display for StoreError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for StoreError {}

/// Where room history lives. One implementation per backend; the core holds a `Box<dyn _>`.
pub trait HistoryStore {
    /// The highest id that may already have been handed out in `room` (stored, queued, or
    /// reserved), 0 when none. The next message gets one more. A read error is an error.
    fn last_id(&mut self, room: &str) -> Result<u64, StoreError>;
    /// Queues `msg` for storage in `room` and returns its ticket (tickets grow by one per append).
    fn append(&mut self, room: &str, msg: StoredMessage) -> u64;
    /// The highest ticket known to be durable; every smaller ticket is durable too.
    fn durable(&mut self) -> u64;
    /// A page of `room`'s history, including messages appended but not yet durable.
    fn page(&mut self, room: &str, query: Query) -> Page;
    /// Blocks until every appended message is durable.
    fn flush(&mut self);
    /// Takes messages out of `room`'s history, in order with the appends (a message appended
    /// before is removed). Ids stay taken. Stores that keep nothing may ignore it.
    fn remove(&mut self, _room: &str, _what: Removal) {}
    /// Makes sure `id` may be handed out in `room`: it must be above every id a restart could
    /// start from. `Err` when that cannot be made durable now (the store cannot write); then
    /// the id must not be used. Stores whose ids cannot outlive the process accept every id.
    fn reserve(&mut self, _room: &str, _id: u64) -> Result<(), StoreError> {
        Ok(())
    }
    /// Whether the store can take messages now; `false` while writes fail (full disk, I/O
    /// error) or the last read of a room's last id failed.
    fn writable(&self) -> bool {
        true
    }
    /// Shutdown: waits until every appended message is durable or `deadline` passes, then stops
    /// the store's writer. Returns how many appended messages were not stored.
    fn close(&mut self, _deadline: Instant) -> u64 {
        self.flush();
        0
    }
}

/// A boxed store is a store: the core's `Box<dyn HistoryStore>` (and its test doubles) can be
/// wrapped in [`engine::Immediate`] as they are. Every method forwards, the defaults included.
impl<S: HistoryStore + ?Sized> HistoryStore for Box<S> {
    fn last_id(&mut self, room: &str) -> Result<u64, StoreError> {
        (**self).last_id(room)
    }
    fn append(&mut self, room: &str, msg: StoredMessage) -> u64 {
        (**self).append(room, msg)
    }
    fn durable(&mut self) -> u64 {
        (**self).durable()
    }
    fn page(&mut self, room: &str, query: Query) -> Page {
        (**self).page(room, query)
    }
    fn flush(&mut self) {
        (**self).flush();
    }
    fn remove(&mut self, room: &str, what: Removal) {
        (**self).remove(room, what);
    }
    fn reserve(&mut self, room: &str, id: u64) -> Result<(), StoreError> {
        (**self).reserve(room, id)
    }
    fn writable(&self) -> bool {
        (**self).writable()
    }
    fn close(&mut self, deadline: Instant) -> u64 {
        (**self).close(deadline)
    }
}

/// Cuts a descending-by-id candidate list down to a page: keeps `limit`, notes whether more
/// existed, and returns it ascending.
pub(crate) fn page_from_desc(mut desc: Vec<StoredMessage>, limit: usize) -> Page {
    let more = desc.len() > limit;
    desc.truncate(limit);
    desc.reverse();
    Page {
        messages: desc,
        more,
    }
}

/// Cuts an ascending candidate list down to a page of `limit`, noting whether more existed.
pub(crate) fn page_from_asc(mut asc: Vec<StoredMessage>, limit: usize) -> Page {
    let more = asc.len() > limit;
    asc.truncate(limit);
    Page {
        messages: asc,
        more,
    }
}

/// How long the SQLite store keeps history (`--history-max-age`, `--history-max-per-room`);
/// the default keeps everything. The memory store has its own per-room trim.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Retention {
    /// Milliseconds after which a message is deleted; 0: never.
    pub max_age_ms: u64,
    /// Messages kept per room, the oldest deleted first; 0: all.
    pub max_per_room: u64,
}

impl Retention {
    /// The retention the settings ask for.
    pub fn from_config(cfg: &crate::config::Config) -> Self {
        Retention {
            max_age_ms: cfg.history_max_age.saturating_mul(1000),
            max_per_room: cfg.history_max_per_room,
        }
    }

    /// Whether anything is ever deleted.
    pub fn prunes(&self) -> bool {
        self.max_age_ms > 0 || self.max_per_room > 0
    }
}

/// Opens the engine the settings ask for: the memory engine for `:memory:`, SQLite otherwise.
///
/// `notify` is called from the SQLite engine's threads (the writer after each commit or change
/// of state, the reader after each read) so that the event loop wakes up and polls.
pub fn open_engine(
    db_path: &str,
    memory_per_room: usize,
    retention: Retention,
    notify: Box<dyn Fn() + Send>,
) -> Result<Box<dyn engine::Engine>, String> {
    if db_path == ":memory:" {
        drop(notify);
        return Ok(Box::new(engine::Immediate::memory(memory_per_room)));
    }
    #[cfg(feature = "sqlite")]
    {
        let store = sqlite::SqliteStore::open_with(db_path, retention, notify)
            .map_err(|e| format!("cannot open history database '{db_path}': {e}"))?;
        Ok(Box::new(store))
    }
    #[cfg(not(feature = "sqlite"))]
    {
        drop((notify, retention));
        Err(format!(
            "this build has no SQLite support: start it with --db-path :memory: (asked for '{db_path}')"
        ))
    }
}

/// A message for the stores' unit tests.
#[cfg(test)]
pub(crate) fn test_message(id: u64) -> StoredMessage {
    StoredMessage {
        id,
        member: "m".into(),
        message: format!("text {id}"),
        ts: 1000 + id,
        data: (id % 2 == 0).then(|| serde_json::json!({"n": id}).into()),
    }
}
