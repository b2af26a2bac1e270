//! The SQLite history engine: durable across `kill -9`, committed in batches off the event loop.
//!
//! Appends go through a channel to one writer thread, which takes everything queued, writes it in
//! one transaction (group commit), publishes the highest committed ticket and calls `notify` so
//! the event loop polls and sends the acks that became due. Until then a message is held in
//! `pending`, so that pages (read on a reader thread, with its own read-only connection in WAL
//! mode) see every message appended so far, committed or not.
//!
//! Failure: a commit that fails (disk full, read-only file, I/O error) is retried in smaller
//! pieces (halving down to one message) with a backoff of up to [`MAX_BACKOFF`]; the store is
//! not [`writable`](super::engine::Engine::writable) until a commit lands again, and it logs once per
//! change of state. Nothing is acked before it is committed.
//!
//! Ids: the table `rooms(room, reserved)` holds a per-room high-water mark written by the writer
//! ahead of delivery, [`ID_BLOCK`] ids ahead and renewed every quarter block, so delivery does
//! not wait for the disk. An id above the durable mark is not handed out. A restart continues
//! above the mark, so ids may jump after a crash but never repeat; a clean shutdown gives the
//! unused part of the block back.
//!
//! Retention (`--history-max-age`, `--history-max-per-room`, see [`Retention`]): the writer
//! deletes the oldest messages in transactions of at most [`PRUNE_BATCH`] rows, between group
//! commits and when idle, never on the loop thread. Deleted pages go to SQLite's free list and
//! are reused by later messages, so the file stops growing. The table `pruned(room, upto)`
//! keeps the highest id deleted per room, so a room whose messages are all gone still
//! continues above its last id: ids are never reused.
//!
//! As an [`Engine`](super::engine::Engine) (see [`super::engine`] for the boundary): appends go to the same writer;
//! pages and last ids are read on a reader thread with its own read-only connection, never on
//! the loop thread, and come back through `notify`; a reservation the loop already holds is
//! answered at once, any other when the writer's commit lands (or `Unavailable` when it cannot
//! write). It is only an engine: nothing here reads on the caller's thread.

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
#[cfg(test)]
use std::sync::Condvar;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, mpsc};
use std::thread;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use log::{debug, error, info, warn};
use rusqlite::{Connection, OpenFlags, OptionalExtension, TransactionBehavior, params};

use super::engine::{Reply, Request, RequestToken};
use super::{
    Page, Query, Removal, Retention, StoreError, StoredMessage, page_from_asc, page_from_desc,
};
use crate::chat::protocol::RawJson;

/// Most messages written in one transaction.
const MAX_BATCH: usize = 4096;
/// Ids reserved per room at a time; a crash skips at most this many ids of a room.
pub const ID_BLOCK: u64 = 1000;
/// Longest pause between two attempts of a failing commit.
pub const MAX_BACKOFF: Duration = Duration::from_secs(1);
/// First pause after a failed commit.
const FIRST_BACKOFF: Duration = Duration::from_millis(10);
/// Rooms whose reservation the loop keeps in memory; beyond it the cache starts over from the
/// database (which is always right, only slower).
const MAX_CACHED_ROOMS: usize = if cfg!(test) { 16 } else { 4096 };
/// Rooms whose reservation a clean shutdown gives back; beyond it the gaps stay (harmless).
const MAX_GIVE_BACK: usize = 65_536;
/// Most rows one pruning transaction deletes: small, so a commit never waits long behind it.
pub const PRUNE_BATCH: u64 = 1000;
/// Shortest and longest pause between two looks for messages past `--history-max-age`.
const AGE_CHECK_MIN: Duration = Duration::from_secs(1);
const AGE_CHECK_MAX: Duration = Duration::from_secs(60);
/// How long closing waits for the writer to notice the stop once the flush deadline passed.
const STOP_WAIT: Duration = Duration::from_millis(500);

enum Job {
    Append {
        ticket: u64,
        room: String,
        msg: StoredMessage,
    },
    /// Take messages out, in order with the appends; `seq` numbers removals (1, 2, 3, …) and
    /// `ticket` is the last append's, so the batch's tickets still only grow.
    Remove {
        ticket: u64,
        room: String,
        what: Removal,
        seq: u64,
    },
    /// Make ids up to `upto` of `room` durable before they are handed out.
    Reserve {
        room: String,
        upto: u64,
    },
    Flush(mpsc::Sender<()>),
    /// Tests: prune until nothing is due, then answer.
    #[cfg(test)]
    Settle(mpsc::Sender<()>),
}

/// A read for the reader thread, with what the loop knew when it was asked.
enum Read {
    Page {
        room: String,
        query: Query,
        /// The room's appended messages not yet known to be committed, as candidates of the
        /// page: the read sees every append asked before it.
        pending: Vec<StoredMessage>,
        /// The room's removals not yet known to be committed: the read leaves them out.
        removed: Vec<Removal>,
    },
    LastId {
        room: String,
        /// The highest id of the room queued and not yet known to be committed.
        queued: u64,
    },
}

/// What the reader thread answers, in the order it was asked.
enum Answer {
    Page(Page),
    LastId(u64),
}

/// A read sent to the reader thread and not yet answered.
struct InFlight {
    token: RequestToken,
    room: String,
    last_id: bool,
}

/// A callback every thread of the store may call.
type Notify = Arc<dyn Fn() + Send + Sync>;

/// A room's id reservation as the loop sees it.
#[derive(Debug, Clone, Copy)]
struct Reservation {
    /// Ids up to this one are durably reserved: they may be handed out.
    durable: u64,
    /// Ids up to this one were asked for.
    asked: u64,
    /// The mark before this run raised it: every id of earlier runs is at or below it, and
    /// every id this run handed out is queued or stored.
    floor: u64,
}

/// What the loop thread and the writer share.
struct Shared {
    durable: AtomicU64,
    /// The highest removal `seq` committed.
    removed: AtomicU64,
    writable: AtomicBool,
    /// Set at shutdown: a failing writer stops retrying.
    stop: AtomicBool,
    reserved: Mutex<HashMap<String, Reservation>>,
    /// Tests close it to hold the reader thread before its next read.
    #[cfg(test)]
    read_gate: (Mutex<bool>, Condvar),
}

impl Shared {
    fn reserved(&self) -> MutexGuard<'_, HashMap<String, Reservation>> {
        self.reserved.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Waits while a test holds the reader; nothing outside tests.
    fn wait_read_gate(&self) {
        #[cfg(test)]
        {
            let (open, cv) = &self.read_gate;
            let mut open = open.lock().unwrap_or_else(|e| e.into_inner());
            while !*open {
                open = cv.wait(open).unwrap_or_else(|e| e.into_inner());
            }
        }
    }
}

/// History in a SQLite file (WAL journal, `synchronous=FULL`).
pub struct SqliteStore {
    jobs: Option<mpsc::Sender<Job>>,
    writer: Option<thread::JoinHandle<()>>,
    /// Disconnects when the writer thread ends.
    writer_done: mpsc::Receiver<()>,
    shared: Arc<Shared>,
    tickets: u64,
    /// Appended, not yet known to be committed: `(ticket, room, message)` in append order.
    pending: VecDeque<(u64, String, StoredMessage)>,
    /// Removals sent, not yet known to be committed: `(seq, room, what)`; pages leave them out.
    removals: VecDeque<(u64, String, Removal)>,
    /// The last removal's `seq`.
    removal_seq: u64,
    /// The last read of a room's last id failed (a corrupt page): broadcasts cannot be
    /// numbered, so the store does not count as available until a read works again.
    read_failed: bool,
    /// The engine side: reads for the reader thread (`None` once closed).
    reads: Option<mpsc::Sender<Read>>,
    read_thread: Option<thread::JoinHandle<()>>,
    /// The reader's answers, in request order; disconnects when the reader thread ends.
    answers: mpsc::Receiver<Result<Answer, StoreError>>,
    in_flight: VecDeque<InFlight>,
    /// Reservations asked for and not yet covered, in request order: `(token, room, id)`.
    waiting: VecDeque<(RequestToken, String, u64)>,
    /// How many entries of `waiting` each room has.
    waiting_rooms: HashMap<String, usize>,
    /// Reservations sent to the writer for rooms not yet in the shared map: room, asked.
    asking: HashMap<String, u64>,
    /// Replies ready for `poll`.
    replies: VecDeque<Reply>,
    /// The last `DurableUpTo` handed out.
    reported: u64,
    /// The writer refused a job: it has stopped.
    writer_gone: bool,
    engine_closed: bool,
}

/// Tombstones: a removed message's row stays with an empty `member` (no member has an empty
/// name) and no text, so that `MAX(id)`, and with it every id, stays taken; pages skip them.
const SCHEMA: &str = "
    PRAGMA journal_mode = WAL;
    PRAGMA synchronous = FULL;
    PRAGMA cache_size = -256;
    CREATE TABLE IF NOT EXISTS messages (
        room    TEXT    NOT NULL,
        id      INTEGER NOT NULL,
        member  TEXT    NOT NULL,
        message TEXT    NOT NULL,
        ts      INTEGER NOT NULL,
        data    TEXT,
        PRIMARY KEY (room, id)
    ) WITHOUT ROWID;
    CREATE TABLE IF NOT EXISTS rooms (
        room     TEXT    PRIMARY KEY,
        reserved INTEGER NOT NULL
    ) WITHOUT ROWID;
    CREATE TABLE IF NOT EXISTS pruned (
        room TEXT    PRIMARY KEY,
        upto INTEGER NOT NULL
    ) WITHOUT ROWID;
    CREATE TABLE IF NOT EXISTS meta (
        key   TEXT PRIMARY KEY,
        value
    ) WITHOUT ROWID;
";

impl SqliteStore {
    /// Opens (creating when needed) the database at `path`, proves that it can write (one real
    /// commit), and starts the writer thread. A file that is read-only, corrupt or on a full
    /// disk fails here rather than at the first message.
    pub fn open(path: &str, notify: Box<dyn Fn() + Send>) -> rusqlite::Result<Self> {
        Self::open_with(path, Retention::default(), notify)
    }

    /// [`SqliteStore::open`], with the writer deleting what `retention` no longer keeps.
    pub fn open_with(
        path: &str,
        retention: Retention,
        notify: Box<dyn Fn() + Send>,
    ) -> rusqlite::Result<Self> {
        let notify: Notify = {
            let notify = Mutex::new(notify);
            Arc::new(move || (notify.lock().unwrap_or_else(|e| e.into_inner()))())
        };
        let mut writer_conn = Connection::open(path)?;
        writer_conn.busy_timeout(Duration::from_secs(5))?;
        writer_conn.execute_batch(SCHEMA)?;
        let mode: String = writer_conn.query_row("PRAGMA journal_mode", [], |r| r.get(0))?;
        if !mode.eq_ignore_ascii_case("wal") {
            return Err(rusqlite::Error::InvalidParameterName(format!(
                "cannot switch the journal to WAL (it stays '{mode}'): is the file writable?"
            )));
        }
        // Age pruning finds old messages by `ts`; without it the index would only cost writes.
        writer_conn.execute_batch(if retention.max_age_ms > 0 {
            "CREATE INDEX IF NOT EXISTS messages_ts ON messages (ts);"
        } else {
            "DROP INDEX IF EXISTS messages_ts;"
        })?;
        // Reading works on a read-only file or a full disk: only a write tells.
        let tx = writer_conn.transaction()?;
        tx.execute(
            "INSERT OR REPLACE INTO meta (key, value) VALUES ('last_start', ?1)",
            [unix_secs()],
        )?;
        tx.commit()?;
        let thread_reader = Connection::open_with_flags(
            path,
            OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX,
        )?;
        // Off the loop a read may wait for a busy file as long as the writer does. Pages are
        // read by primary key and the OS caches the file: a small cache keeps an idle server
        // small (256 KiB at most per connection).
        thread_reader.busy_timeout(Duration::from_secs(5))?;
        thread_reader.execute_batch("PRAGMA cache_size = -256;")?;
        let shared = Arc::new(Shared {
            durable: AtomicU64::new(0),
            removed: AtomicU64::new(0),
            writable: AtomicBool::new(true),
            stop: AtomicBool::new(false),
            reserved: Mutex::new(HashMap::new()),
            #[cfg(test)]
            read_gate: (Mutex::new(true), Condvar::new()),
        });
        let (tx, rx) = mpsc::channel();
        let (done_tx, writer_done) = mpsc::channel::<()>();
        let theirs = shared.clone();
        let writer_notify = notify.clone();
        let writer = thread::Builder::new()
            .name("history-writer".into())
            // The writer only loops over SQLite calls; it needs nothing like the default 2 MiB.
            .stack_size(256 * 1024)
            .spawn(move || {
                let _done = done_tx;
                Writer::new(writer_conn, theirs, writer_notify, retention).run(rx);
            })
            .map_err(|e| rusqlite::Error::ToSqlConversionFailure(Box::new(e)))?;
        let (reads, read_rx) = mpsc::channel();
        let (answer_tx, answers) = mpsc::channel();
        let theirs = shared.clone();
        let read_thread = thread::Builder::new()
            .name("history-reader".into())
            .stack_size(256 * 1024)
            .spawn(move || read_loop(thread_reader, theirs, read_rx, answer_tx, notify));
        let read_thread = match read_thread {
            Ok(t) => t,
            Err(e) => {
                // Do not leave the writer behind: closing its channel ends it.
                drop(tx);
                let _ = writer.join();
                return Err(rusqlite::Error::ToSqlConversionFailure(Box::new(e)));
            }
        };
        Ok(SqliteStore {
            jobs: Some(tx),
            writer: Some(writer),
            writer_done,
            shared,
            tickets: 0,
            pending: VecDeque::new(),
            removals: VecDeque::new(),
            removal_seq: 0,
            read_failed: false,
            reads: Some(reads),
            read_thread: Some(read_thread),
            answers,
            in_flight: VecDeque::new(),
            waiting: VecDeque::new(),
            waiting_rooms: HashMap::new(),
            asking: HashMap::new(),
            replies: VecDeque::new(),
            reported: 0,
            writer_gone: false,
            engine_closed: false,
        })
    }

    fn prune_pending(&mut self) {
        let done = self.shared.durable.load(Ordering::Acquire);
        while self.pending.front().is_some_and(|(t, _, _)| *t <= done) {
            self.pending.pop_front();
        }
        let removed = self.shared.removed.load(Ordering::Acquire);
        while self.removals.front().is_some_and(|(s, _, _)| *s <= removed) {
            self.removals.pop_front();
        }
    }

    /// Queues a removal for the writer, behind every append so far.
    fn remove(&mut self, room: String, what: Removal) {
        self.prune_pending();
        self.removal_seq += 1;
        let seq = self.removal_seq;
        self.removals.push_back((seq, room.clone(), what));
        let job = Job::Remove {
            ticket: self.tickets,
            room,
            what,
            seq,
        };
        if !self.send(job) {
            self.writer_gone = true;
            warn!("history writer has stopped; a removal stays in memory only");
        }
    }

    fn send(&self, job: Job) -> bool {
        self.jobs.as_ref().is_some_and(|j| j.send(job).is_ok())
    }
}

/// The committed rows a page of `room` is cut from: one more than the page holds, in the
/// query's direction.
/// `extra` more are fetched for messages the caller will leave out (removals not committed).
/// Tombstones (`member = ''`) are never rows of a page.
fn fetch_rows(
    conn: &Connection,
    room: &str,
    query: Query,
    extra: usize,
) -> rusqlite::Result<Vec<StoredMessage>> {
    let (sql, bound, limit) = match query {
        Query::Before { before, limit } => (
            "SELECT id, member, message, ts, data FROM messages
             WHERE room = ?1 AND id < ?2 AND member <> '' ORDER BY id DESC LIMIT ?3",
            before.unwrap_or(i64::MAX as u64).min(i64::MAX as u64),
            limit,
        ),
        Query::After { after, limit } => (
            "SELECT id, member, message, ts, data FROM messages
             WHERE room = ?1 AND id > ?2 AND member <> '' ORDER BY id ASC LIMIT ?3",
            after.min(i64::MAX as u64),
            limit,
        ),
    };
    let mut stmt = conn.prepare_cached(sql)?;
    let limit = i64::try_from(limit.saturating_add(1).saturating_add(extra)).unwrap_or(i64::MAX);
    let rows = stmt.query_map(params![room, bound as i64, limit], |row| {
        let data: Option<String> = row.get(4)?;
        Ok(StoredMessage {
            id: row.get::<_, i64>(0)? as u64,
            member: row.get(1)?,
            message: row.get(2)?,
            ts: row.get::<_, i64>(3)? as u64,
            data: data.and_then(RawJson::from_text),
        })
    })?;
    rows.collect()
}

/// A page from committed `rows` and the room's `pending` messages (either may hold a message
/// the other holds too).
fn page_of(
    rows: Vec<StoredMessage>,
    pending: impl Iterator<Item = StoredMessage>,
    query: Query,
) -> Page {
    match query {
        Query::Before { before, limit } => {
            let bound = before.unwrap_or(i64::MAX as u64).min(i64::MAX as u64);
            let all = merge(rows, pending.filter(|m| m.id < bound));
            page_from_desc(
                all.into_values()
                    .rev()
                    .take(limit.saturating_add(1))
                    .collect(),
                limit,
            )
        }
        Query::After { after, limit } => {
            let after = after.min(i64::MAX as u64);
            let all = merge(rows, pending.filter(|m| m.id > after));
            page_from_asc(
                all.into_values().take(limit.saturating_add(1)).collect(),
                limit,
            )
        }
    }
}

/// The highest id that may have been handed out in `room`, given the highest one `queued`.
fn last_id_from(
    conn: &Connection,
    shared: &Shared,
    room: &str,
    queued: u64,
) -> Result<u64, StoreError> {
    let stored = conn
        .query_row(
            "SELECT MAX(id) FROM messages WHERE room = ?1",
            [room],
            |row| row.get::<_, Option<i64>>(0),
        )
        .map(|v| v.unwrap_or(0).max(0) as u64)
        .map_err(|e| read_error(room, e))?;
    // A room this run reserved for continues right after its last message (no gap when it
    // comes back into memory); any other continues above its stored mark.
    let cached = shared.reserved().get(room).map(|r| r.floor);
    let reserved = match cached {
        Some(floor) => floor,
        None => stored_reservation(conn, room)?,
    };
    // Messages deleted by retention took their ids with them: the mark of the highest.
    let pruned = conn
        .query_row("SELECT upto FROM pruned WHERE room = ?1", [room], |row| {
            row.get::<_, i64>(0)
        })
        .optional()
        .map(|v| v.unwrap_or(0).max(0) as u64)
        .map_err(|e| read_error(room, e))?;
    Ok(queued.max(stored).max(reserved).max(pruned))
}

/// The committed high-water mark of `room`, 0 when it has none.
fn stored_reservation(conn: &Connection, room: &str) -> Result<u64, StoreError> {
    conn.query_row(
        "SELECT reserved FROM rooms WHERE room = ?1",
        [room],
        |row| row.get::<_, i64>(0),
    )
    .optional()
    .map(|v| v.unwrap_or(0).max(0) as u64)
    .map_err(|e| read_error(room, e))
}

/// The reader thread: answers reads in the order they come, until the loop drops its sender.
fn read_loop(
    conn: Connection,
    shared: Arc<Shared>,
    reads: mpsc::Receiver<Read>,
    answers: mpsc::Sender<Result<Answer, StoreError>>,
    notify: Notify,
) {
    while let Ok(read) = reads.recv() {
        shared.wait_read_gate();
        let answer = match read {
            Read::Page {
                room,
                query,
                pending,
                removed,
            } => {
                // A room deleted up to N continues after N; each single removal may take one
                // row out of the page, so one more is fetched for each.
                let query = match query {
                    Query::After { after, limit } => Query::After {
                        after: removed
                            .iter()
                            .filter_map(|r| match r {
                                Removal::UpTo(n) => Some(*n),
                                Removal::One(_) => None,
                            })
                            .fold(after, u64::max),
                        limit,
                    },
                    q => q,
                };
                let kept = |m: &StoredMessage| !removed.iter().any(|r| r.covers(m.id));
                fetch_rows(&conn, &room, query, removed.len())
                    .map(|rows| {
                        let rows = rows.into_iter().filter(kept).collect();
                        Answer::Page(page_of(rows, pending.into_iter(), query))
                    })
                    .map_err(|e| read_error(&room, e))
            }
            Read::LastId { room, queued } => {
                last_id_from(&conn, &shared, &room, queued).map(Answer::LastId)
            }
        };
        if answers.send(answer).is_err() {
            return;
        }
        notify();
    }
}

fn read_error(room: &str, e: rusqlite::Error) -> StoreError {
    error!("history read failed for room '{room}': {e}");
    StoreError(format!("history read failed: {e}"))
}

fn unix_millis() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

fn unix_secs() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64)
}

/// The writer thread's state.
struct Writer {
    conn: Connection,
    shared: Arc<Shared>,
    notify: Notify,
    /// Per room this run reserved for: its mark before this run raised it, so that a clean
    /// shutdown can give back what was reserved and not used, and no more.
    floors: HashMap<String, u64>,
    /// More rooms than [`MAX_GIVE_BACK`] were reserved for: nothing is given back.
    floors_full: bool,
    pruner: Pruner,
}

/// The writer's retention state.
struct Pruner {
    retention: Retention,
    /// Rows per room, for the rooms counted this run (commits and deletes keep it right);
    /// starts over past [`MAX_CACHED_ROOMS`] rooms (a room is counted again when next due).
    counts: HashMap<String, u64>,
    /// Rooms appended to since they were last held against `--history-max-per-room`.
    dirty: HashSet<String>,
    /// When to look for messages past `--history-max-age` next.
    next_age: Instant,
    /// The last pruning transaction failed (logged once until one works again).
    failing: bool,
}

impl Writer {
    fn new(conn: Connection, shared: Arc<Shared>, notify: Notify, retention: Retention) -> Self {
        Writer {
            conn,
            shared,
            notify,
            floors: HashMap::new(),
            floors_full: false,
            pruner: Pruner {
                retention,
                counts: HashMap::new(),
                dirty: HashSet::new(),
                next_age: Instant::now(),
                failing: false,
            },
        }
    }

    fn run(mut self, rx: mpsc::Receiver<Job>) {
        let mut batch: Vec<(u64, String, Write)> = Vec::new();
        let mut reserve: HashMap<String, u64> = HashMap::new();
        let mut flushes = Vec::new();
        #[cfg(test)]
        let mut settles: Vec<mpsc::Sender<()>> = Vec::new();
        loop {
            // Blocks for the next job, or until pruning is due.
            let first = match self.prune_wait() {
                None => match rx.recv() {
                    Ok(job) => Some(job),
                    Err(_) => break,
                },
                Some(wait) => match rx.recv_timeout(wait) {
                    Ok(job) => Some(job),
                    Err(mpsc::RecvTimeoutError::Timeout) => None,
                    Err(mpsc::RecvTimeoutError::Disconnected) => break,
                },
            };
            let mut next = first;
            let mut committed = 0;
            while let Some(job) = next.take() {
                match job {
                    Job::Append { ticket, room, msg } => {
                        batch.push((ticket, room, Write::Insert(msg)))
                    }
                    Job::Remove {
                        ticket,
                        room,
                        what,
                        seq,
                    } => batch.push((ticket, room, Write::Remove(what, seq))),
                    Job::Reserve { room, upto } => {
                        let r = reserve.entry(room).or_insert(0);
                        *r = (*r).max(upto);
                    }
                    Job::Flush(reply) => flushes.push(reply),
                    #[cfg(test)]
                    Job::Settle(reply) => settles.push(reply),
                }
                if batch.len() < MAX_BATCH {
                    next = rx.try_recv().ok();
                }
            }
            if !batch.is_empty() || !reserve.is_empty() {
                committed = batch.len() as u64;
                if !self.write(&mut batch, &mut reserve) {
                    // Stopped while the store could not write: what is left is not stored.
                    return;
                }
            }
            for reply in flushes.drain(..) {
                let _ = reply.send(());
            }
            // Pruning keeps pace with what came in: one batch per PRUNE_BATCH committed.
            for _ in 0..=committed / PRUNE_BATCH {
                if self.prune_wait() != Some(Duration::ZERO) || !self.prune_step() {
                    break;
                }
            }
            #[cfg(test)]
            for reply in settles.drain(..) {
                loop {
                    self.pruner.next_age = Instant::now();
                    if !self.prune_step() {
                        break;
                    }
                }
                let _ = reply.send(());
            }
        }
        // The channel closed and everything sent was committed: every id handed out is stored,
        // so the unused rest of each block can be given back (a clean restart has no gap).
        if !self.floors_full {
            if let Err(e) = self.give_back() {
                warn!("could not give back unused message ids: {e}");
            }
        }
    }

    /// Commits `batch` and the reservations, retrying failures in smaller pieces with a
    /// bounded backoff. Returns `false` when a stop was asked for before it got through.
    fn write(
        &mut self,
        batch: &mut Vec<(u64, String, Write)>,
        reserve: &mut HashMap<String, u64>,
    ) -> bool {
        let mut start = 0;
        let mut size = batch.len().max(1);
        let mut delay = FIRST_BACKOFF;
        loop {
            let end = (start + size).min(batch.len());
            let mut landed = Vec::new();
            let mut added = Vec::new();
            match self.commit(&batch[start..end], reserve, &mut landed, &mut added) {
                Ok(()) => {
                    reserve.clear();
                    self.publish(landed);
                    for i in added {
                        self.pruner.added(&batch[start + i].1);
                    }
                    // A deleted room's rows are gone: its cached count is counted again.
                    for (_, room, w) in &batch[start..end] {
                        if let Write::Remove(Removal::UpTo(_), _) = w {
                            self.pruner.counts.remove(room);
                        }
                    }
                    if end > start {
                        self.shared
                            .durable
                            .store(batch[end - 1].0, Ordering::Release);
                        let removed = batch[start..end].iter().filter_map(|(_, _, w)| match w {
                            Write::Remove(_, seq) => Some(*seq),
                            Write::Insert(_) => None,
                        });
                        if let Some(seq) = removed.max() {
                            self.shared.removed.store(seq, Ordering::Release);
                        }
                    }
                    if !self.shared.writable.swap(true, Ordering::AcqRel) {
                        info!("history store writes again");
                    }
                    (self.notify)();
                    start = end;
                    if start >= batch.len() {
                        batch.clear();
                        return true;
                    }
                    size = size.saturating_mul(2).min(MAX_BATCH);
                    delay = FIRST_BACKOFF;
                }
                Err(e) => {
                    if self.shared.writable.swap(false, Ordering::AcqRel) {
                        error!(
                            "history store cannot write ({e}); {} messages wait, retrying",
                            batch.len() - start
                        );
                        (self.notify)();
                    } else {
                        debug!(
                            "history commit of {} messages failed again: {e}",
                            end - start
                        );
                    }
                    size = (size / 2).max(1);
                    if !self.pause(delay) {
                        return false;
                    }
                    delay = (delay * 2).min(MAX_BACKOFF);
                }
            }
        }
    }

    /// Sleeps `delay`, waking early for a stop; `false` when stopped.
    fn pause(&self, delay: Duration) -> bool {
        let until = Instant::now() + delay;
        loop {
            if self.shared.stop.load(Ordering::Acquire) {
                return false;
            }
            let left = until.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return true;
            }
            thread::sleep(left.min(Duration::from_millis(20)));
        }
    }

    /// One transaction: the reservations, then `batch`. `landed` gets each reserved room's
    /// reservation as it stands once this commits; `added` the index in `batch` of each
    /// message stored (not a duplicate), when the per-room cap needs to count them.
    fn commit(
        &mut self,
        batch: &[(u64, String, Write)],
        reserve: &HashMap<String, u64>,
        landed: &mut Vec<(String, Reservation)>,
        added: &mut Vec<usize>,
    ) -> rusqlite::Result<()> {
        let count = self.pruner.retention.max_per_room > 0;
        // IMMEDIATE takes the write lock first, through the busy timeout: a deferred
        // transaction that read first and then finds the lock held elsewhere (a backup tool)
        // fails at once without waiting, and the store would turn unavailable for nothing.
        let tx = self
            .conn
            .transaction_with_behavior(TransactionBehavior::Immediate)?;
        for (room, &upto) in reserve {
            let before: Option<i64> = tx
                .query_row("SELECT reserved FROM rooms WHERE room = ?1", [room], |r| {
                    r.get(0)
                })
                .optional()?;
            let before = before.unwrap_or(0).max(0) as u64;
            if !self.floors.contains_key(room) && !self.floors_full {
                if self.floors.len() >= MAX_GIVE_BACK {
                    self.floors_full = true;
                } else {
                    self.floors.insert(room.clone(), before);
                }
            }
            // Past MAX_GIVE_BACK the mark as found stands in for the floor: a room back in
            // memory may then skip ids, never reuse one.
            let floor = self.floors.get(room).copied().unwrap_or(before);
            landed.push((
                room.clone(),
                Reservation {
                    durable: before.max(upto),
                    asked: upto,
                    floor,
                },
            ));
            tx.prepare_cached(
                "INSERT INTO rooms (room, reserved) VALUES (?1, ?2)
                 ON CONFLICT (room) DO UPDATE SET reserved = MAX(reserved, excluded.reserved)",
            )?
            .execute(params![room, upto as i64])?;
        }
        {
            let mut stmt = tx.prepare_cached(
                "INSERT OR IGNORE INTO messages (room, id, member, message, ts, data)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
            )?;
            for (i, (_, room, w)) in batch.iter().enumerate() {
                match w {
                    Write::Insert(m) => {
                        let data = m.data.as_ref().map(RawJson::get);
                        let stored = stmt.execute(params![
                            room,
                            m.id as i64,
                            m.member,
                            m.message,
                            m.ts as i64,
                            data
                        ])?;
                        if count && stored > 0 {
                            added.push(i);
                        }
                    }
                    Write::Remove(what, _) => remove_rows(&tx, room, *what)?,
                }
            }
        }
        tx.commit()
    }

    /// Tells the loop which reservations are durable now. A room the loop does not cache
    /// (the engine asks without reading the table on the loop thread, or the cache started
    /// over) is added as committed.
    fn publish(&self, landed: Vec<(String, Reservation)>) {
        if landed.is_empty() {
            return;
        }
        let mut map = self.shared.reserved();
        for (room, got) in landed {
            let r = map.entry(room).or_insert(got);
            r.durable = r.durable.max(got.durable);
            r.asked = r.asked.max(got.asked);
        }
        drop(map);
    }

    /// Lowers each mark this run raised to the highest stored id (never below where it was).
    fn give_back(&mut self) -> rusqlite::Result<()> {
        if self.floors.is_empty() {
            return Ok(());
        }
        let tx = self.conn.transaction()?;
        for (room, floor) in &self.floors {
            // Ids deleted by retention count as used.
            tx.prepare_cached(
                "UPDATE rooms SET reserved = MAX(?2,
                     COALESCE((SELECT MAX(id) FROM messages WHERE room = ?1), 0),
                     COALESCE((SELECT upto FROM pruned WHERE room = ?1), 0))
                 WHERE room = ?1",
            )?
            .execute(params![room, *floor as i64])?;
        }
        tx.commit()
    }
}

impl Pruner {
    /// A message of `room` was stored.
    fn added(&mut self, room: &str) {
        if let Some(n) = self.counts.get_mut(room) {
            *n += 1;
        }
        if !self.dirty.contains(room) {
            self.dirty.insert(room.to_string());
        }
    }

    /// `n` messages of `room` were deleted.
    fn removed(&mut self, room: &str, n: u64) {
        if let Some(c) = self.counts.get_mut(room) {
            *c = c.saturating_sub(n);
        }
    }
}

/// Records that ids of `room` up to `upto` were deleted (never lowering the mark).
fn record_pruned(tx: &rusqlite::Transaction<'_>, room: &str, upto: i64) -> rusqlite::Result<()> {
    tx.prepare_cached(
        "INSERT INTO pruned (room, upto) VALUES (?1, ?2)
         ON CONFLICT (room) DO UPDATE SET upto = MAX(upto, excluded.upto)",
    )?
    .execute(params![room, upto])?;
    Ok(())
}

impl Writer {
    /// How long until pruning is due: `None` when nothing is ever pruned, zero when it is now.
    fn prune_wait(&self) -> Option<Duration> {
        let p = &self.pruner;
        if !p.retention.prunes() || !self.shared.writable.load(Ordering::Acquire) {
            // A store that cannot commit cannot delete either: its retries come first.
            return None;
        }
        if !p.dirty.is_empty() {
            return Some(Duration::ZERO);
        }
        (p.retention.max_age_ms > 0).then(|| p.next_age.saturating_duration_since(Instant::now()))
    }

    /// One pruning transaction of at most [`PRUNE_BATCH`] rows, if one is due. Returns
    /// whether more may be due at once.
    // Off the hot path: built for size.
    #[cold]
    fn prune_step(&mut self) -> bool {
        let now = Instant::now();
        let result = if !self.pruner.dirty.is_empty() {
            self.prune_rooms()
        } else if self.pruner.retention.max_age_ms > 0 && now >= self.pruner.next_age {
            self.prune_aged(now)
        } else {
            return false;
        };
        match result {
            Ok(more) => {
                if std::mem::take(&mut self.pruner.failing) {
                    info!("history pruning works again");
                }
                more || !self.pruner.dirty.is_empty()
            }
            Err(e) => {
                if !std::mem::replace(&mut self.pruner.failing, true) {
                    warn!("history pruning failed ({e}); retrying later");
                }
                // The next append of a room or the next age check tries again.
                self.pruner.dirty.clear();
                self.pruner.next_age = now + AGE_CHECK_MIN;
                false
            }
        }
    }

    /// Deletes the oldest messages beyond `--history-max-per-room` of the rooms appended to,
    /// in one transaction of at most [`PRUNE_BATCH`] rows. Returns whether a room is left over.
    // Off the hot path: built for size.
    #[cold]
    fn prune_rooms(&mut self) -> rusqlite::Result<bool> {
        let cap = self.pruner.retention.max_per_room;
        let rooms: Vec<String> = self.pruner.dirty.iter().cloned().collect();
        let tx = self
            .conn
            .transaction_with_behavior(TransactionBehavior::Immediate)?;
        let mut budget = PRUNE_BATCH;
        // (room, rows before, rows deleted); applied once the transaction commits.
        let mut done: Vec<(String, u64, u64)> = Vec::new();
        for room in rooms {
            if budget == 0 {
                break;
            }
            let count = match self.pruner.counts.get(&room) {
                Some(&n) => n,
                // Once per room and run; commits and deletes keep the count from then on.
                None => tx
                    .prepare_cached("SELECT COUNT(*) FROM messages WHERE room = ?1")?
                    .query_row([&room], |r| r.get::<_, i64>(0))?
                    .max(0) as u64,
            };
            if count <= cap {
                done.push((room, count, 0));
                continue;
            }
            let over = (count - cap).min(budget);
            let upto: Option<i64> = tx
                .prepare_cached(
                    "SELECT id FROM messages WHERE room = ?1 ORDER BY id LIMIT 1 OFFSET ?2",
                )?
                .query_row(params![room, (over - 1) as i64], |r| r.get(0))
                .optional()?;
            let Some(upto) = upto else {
                // Fewer rows than counted: count again next time.
                self.pruner.counts.remove(&room);
                continue;
            };
            let deleted = tx
                .prepare_cached("DELETE FROM messages WHERE room = ?1 AND id <= ?2")?
                .execute(params![room, upto])? as u64;
            record_pruned(&tx, &room, upto)?;
            budget = budget.saturating_sub(deleted.max(1));
            done.push((room, count, deleted));
        }
        tx.commit()?;
        for (room, count, deleted) in done {
            if deleted > 0 {
                debug!("history pruning: {deleted} messages of room '{room}' over the cap");
            }
            let left = count.saturating_sub(deleted);
            if left <= cap {
                self.pruner.dirty.remove(&room);
            }
            if !self.pruner.counts.contains_key(&room)
                && self.pruner.counts.len() >= MAX_CACHED_ROOMS
            {
                self.pruner.counts.clear();
            }
            self.pruner.counts.insert(room, left);
        }
        Ok(!self.pruner.dirty.is_empty())
    }

    /// Deletes messages older than `--history-max-age`, oldest first, one batch. Returns
    /// whether a full batch went (more may be due).
    // Off the hot path: built for size.
    #[cold]
    fn prune_aged(&mut self, now: Instant) -> rusqlite::Result<bool> {
        let age = self.pruner.retention.max_age_ms;
        let cut = unix_millis().saturating_sub(age).min(i64::MAX as u64) as i64;
        let victims: Vec<(String, i64)> = {
            let mut stmt = self.conn.prepare_cached(
                "SELECT room, id FROM messages WHERE ts < ?1 ORDER BY ts LIMIT ?2",
            )?;
            let rows = stmt.query_map(params![cut, PRUNE_BATCH as i64], |r| {
                Ok((r.get(0)?, r.get(1)?))
            })?;
            rows.collect::<rusqlite::Result<_>>()?
        };
        if !victims.is_empty() {
            let tx = self
                .conn
                .transaction_with_behavior(TransactionBehavior::Immediate)?;
            let mut per_room: HashMap<&str, (i64, u64)> = HashMap::new();
            {
                let mut del =
                    tx.prepare_cached("DELETE FROM messages WHERE room = ?1 AND id = ?2")?;
                for (room, id) in &victims {
                    let n = del.execute(params![room, id])? as u64;
                    let e = per_room.entry(room.as_str()).or_insert((0, 0));
                    e.0 = e.0.max(*id);
                    e.1 += n;
                }
            }
            for (room, (upto, _)) in &per_room {
                record_pruned(&tx, room, *upto)?;
            }
            tx.commit()?;
            debug!("history pruning: {} messages past the age", victims.len());
            for (room, (_, n)) in per_room {
                self.pruner.removed(room, n);
            }
        }
        if victims.len() as u64 >= PRUNE_BATCH {
            return Ok(true);
        }
        // Nothing else can expire before the oldest message left does.
        let oldest: Option<i64> = self
            .conn
            .query_row("SELECT MIN(ts) FROM messages", [], |r| r.get(0))?;
        let wait = match oldest {
            Some(ts) => {
                let expires = (ts.max(0) as u64).saturating_add(age);
                Duration::from_millis(expires.saturating_sub(unix_millis()))
            }
            None => Duration::from_millis(age),
        };
        self.pruner.next_age = now + wait.clamp(AGE_CHECK_MIN, AGE_CHECK_MAX);
        Ok(false)
    }
}

/// One row of a batch: a message, or a removal with its `seq`.
enum Write {
    Insert(StoredMessage),
    Remove(Removal, u64),
}

/// Takes messages out of `room`, leaving a tombstone (see [`SCHEMA`]) at the highest id
/// removed so that it stays taken.
fn remove_rows(tx: &rusqlite::Transaction<'_>, room: &str, what: Removal) -> rusqlite::Result<()> {
    match what {
        Removal::One(id) => {
            tx.prepare_cached(
                "UPDATE messages SET member = '', message = '', data = NULL
                 WHERE room = ?1 AND id = ?2",
            )?
            .execute(params![room, id.min(i64::MAX as u64) as i64])?;
        }
        Removal::UpTo(0) => {}
        Removal::UpTo(n) => {
            let n = n.min(i64::MAX as u64) as i64;
            tx.prepare_cached("DELETE FROM messages WHERE room = ?1 AND id <= ?2")?
                .execute(params![room, n])?;
            tx.prepare_cached(
                "INSERT INTO messages (room, id, member, message, ts, data)
                 VALUES (?1, ?2, '', '', 0, NULL)",
            )?
            .execute(params![room, n])?;
        }
    }
    Ok(())
}

/// Merges committed rows and pending messages of one room into one map by id: a message both
/// committed and still pending (pruning is lazy) appears once.
fn merge(
    rows: Vec<StoredMessage>,
    pending: impl Iterator<Item = StoredMessage>,
) -> BTreeMap<u64, StoredMessage> {
    rows.into_iter().chain(pending).map(|m| (m.id, m)).collect()
}

impl SqliteStore {
    /// Queues `msg` for the writer and returns its ticket (tickets grow by one per append).
    fn append(&mut self, room: &str, msg: StoredMessage) -> u64 {
        // Pruned here too: a stream of broadcasts without request_id never asks for
        // durability, and `pending` must not keep what the disk already holds.
        self.prune_pending();
        self.tickets += 1;
        let ticket = self.tickets;
        self.pending
            .push_back((ticket, room.to_string(), msg.clone()));
        let job = Job::Append {
            ticket,
            room: room.to_string(),
            msg,
        };
        if !self.send(job) {
            // The store cannot write any more: say so (`/health`, `unavailable`) instead of
            // taking broadcasts it will never store.
            self.writer_gone = true;
            warn!("history writer has stopped; message {ticket} stays in memory only");
        }
        ticket
    }

    /// Whether the writer commits and the last read of a room's last id worked.
    fn store_writable(&self) -> bool {
        self.shared.writable.load(Ordering::Acquire) && !self.read_failed && !self.writer_gone
    }

    /// Blocks until the writer has committed everything queued (tests and tools only).
    fn flush_writer(&mut self) {
        let (tx, rx) = mpsc::channel();
        if self.send(Job::Flush(tx)) {
            let _ = rx.recv();
        }
        self.prune_pending();
    }

    /// Commits what is queued until `deadline`, stops both threads, and counts what was not
    /// stored.
    fn close_threads(&mut self, deadline: Instant) -> u64 {
        let (tx, rx) = mpsc::channel();
        if self.send(Job::Flush(tx)) {
            let _ = rx.recv_timeout(deadline.saturating_duration_since(Instant::now()));
        }
        self.stop_writer(Some(deadline.max(Instant::now()) + STOP_WAIT));
        self.stop_reader();
        self.prune_pending();
        self.tickets - self.shared.durable.load(Ordering::Acquire)
    }
}

impl SqliteStore {
    /// Sends a read to the reader thread; its answer (or `Unavailable` when the reader is gone)
    /// comes from `poll`, in request order.
    fn send_read(&mut self, token: RequestToken, room: String, last_id: bool, read: Read) {
        if self.reads.as_ref().is_some_and(|r| r.send(read).is_ok()) {
            self.in_flight.push_back(InFlight {
                token,
                room,
                last_id,
            });
        } else if self.in_flight.is_empty() {
            self.replies.push_back(Reply::Unavailable {
                token,
                room,
                error: StoreError("the history reader has stopped".into()),
            });
        } else {
            // Behind reads still in flight: answered after them, by `gather`.
            self.in_flight.push_back(InFlight {
                token,
                room,
                last_id,
            });
        }
    }

    /// Takes `Reserve { token, room, id }`: answered at once when the loop already holds the
    /// id durably and nothing of the room waits, otherwise queued for `gather`.
    fn request_reserve(&mut self, token: RequestToken, room: String, id: u64) {
        let mut map = self.shared.reserved();
        if !map.contains_key(&room) && map.len() >= MAX_CACHED_ROOMS {
            map.clear();
            self.asking.clear();
        }
        let (asked, durable) = match map.get_mut(&room) {
            Some(r) => {
                self.asking.remove(&room);
                (&mut r.asked, r.durable)
            }
            None => {
                if self.asking.len() >= MAX_CACHED_ROOMS {
                    // Only costs asking the writer again.
                    self.asking.clear();
                }
                (self.asking.entry(room.clone()).or_insert(0), 0)
            }
        };
        // Renewed once a quarter of the block is used.
        let mut job = None;
        if id.saturating_add(ID_BLOCK * 3 / 4) > *asked {
            let upto = id.saturating_add(ID_BLOCK - 1);
            *asked = upto;
            job = Some(Job::Reserve {
                room: room.clone(),
                upto,
            });
        }
        drop(map);
        if let Some(job) = job
            && !self.send(job)
        {
            self.writer_gone = true;
        }
        if durable >= id && !self.waiting_rooms.contains_key(&room) {
            self.replies.push_back(Reply::IdsReserved {
                token,
                room,
                up_to: durable,
            });
            return;
        }
        *self.waiting_rooms.entry(room.clone()).or_insert(0) += 1;
        self.waiting.push_back((token, room, id));
    }

    /// Collects every reply that became ready: reads answered, reservations landed or failed,
    /// and durable progress.
    fn gather(&mut self) {
        let mut reader_gone = self.reads.is_none();
        loop {
            match self.answers.try_recv() {
                Ok(answer) => self.take_answer(answer),
                Err(mpsc::TryRecvError::Empty) => break,
                Err(mpsc::TryRecvError::Disconnected) => {
                    reader_gone = true;
                    break;
                }
            }
        }
        if reader_gone {
            self.fail_reads("the history reader has stopped");
        }
        self.resolve_waiting(false);
        self.prune_pending();
        let durable = self.shared.durable.load(Ordering::Acquire);
        if durable > self.reported {
            self.reported = durable;
            self.replies.push_back(Reply::DurableUpTo(durable));
        }
    }

    fn take_answer(&mut self, answer: Result<Answer, StoreError>) {
        let Some(read) = self.in_flight.pop_front() else {
            return;
        };
        if read.last_id {
            self.read_failed = answer.is_err();
        }
        let InFlight { token, room, .. } = read;
        self.replies.push_back(match answer {
            Ok(Answer::Page(page)) => Reply::PageReady { token, room, page },
            Ok(Answer::LastId(last_id)) => Reply::LastId {
                token,
                room,
                last_id,
            },
            Err(error) => Reply::Unavailable { token, room, error },
        });
    }

    /// Every read in flight gets `Unavailable`, in order.
    fn fail_reads(&mut self, why: &str) {
        for InFlight { token, room, .. } in self.in_flight.drain(..) {
            self.replies.push_back(Reply::Unavailable {
                token,
                room,
                error: StoreError(why.into()),
            });
        }
    }

    /// Answers the waiting reservations that are covered now, and fails those that cannot be
    /// (the store cannot write, or `stopping`), keeping each room's replies in request order.
    fn resolve_waiting(&mut self, stopping: bool) {
        if self.waiting.is_empty() {
            return;
        }
        if matches!(
            self.writer_done.try_recv(),
            Err(mpsc::TryRecvError::Disconnected)
        ) {
            // The writer thread ended (a panic, or a stop): nothing it was sent will land.
            self.writer_gone = true;
        }
        let failing = stopping
            || self.writer_gone
            || self.jobs.is_none()
            || !self.shared.writable.load(Ordering::Acquire);
        let map = self.shared.reserved();
        let mut blocked: HashSet<String> = HashSet::new();
        let mut again = Vec::new();
        let mut kept = VecDeque::new();
        for (token, room, id) in self.waiting.drain(..) {
            let durable = map.get(&room).map(|r| r.durable);
            let reply = if blocked.contains(&room) {
                None
            } else if let Some(up_to) = durable.filter(|&d| d >= id) {
                Some(Reply::IdsReserved {
                    token,
                    room: room.clone(),
                    up_to,
                })
            } else if failing {
                Some(Reply::Unavailable {
                    token,
                    room: room.clone(),
                    error: StoreError(format!(
                        "message id {id} of room '{room}' cannot be made durable now"
                    )),
                })
            } else {
                // The cache started over since it was asked: ask the writer again.
                if durable.is_none() && !self.asking.contains_key(&room) {
                    again.push((room.clone(), id));
                }
                blocked.insert(room.clone());
                None
            };
            match reply {
                Some(reply) => {
                    if let Some(n) = self.waiting_rooms.get_mut(&room) {
                        *n -= 1;
                        if *n == 0 {
                            self.waiting_rooms.remove(&room);
                        }
                    }
                    self.replies.push_back(reply);
                }
                None => kept.push_back((token, room, id)),
            }
        }
        drop(map);
        self.waiting = kept;
        for (room, id) in again {
            let upto = id.saturating_add(ID_BLOCK - 1);
            self.asking.insert(room.clone(), upto);
            if !self.send(Job::Reserve { room, upto }) {
                self.writer_gone = true;
            }
        }
    }

    /// Ends the reader thread: it finishes the read in hand and the loop takes the answers.
    /// One stuck on a broken disk is left behind after [`STOP_WAIT`].
    fn stop_reader(&mut self) {
        self.reads = None;
        let Some(reader) = self.read_thread.take() else {
            return;
        };
        let until = Instant::now() + STOP_WAIT;
        loop {
            match self
                .answers
                .recv_timeout(until.saturating_duration_since(Instant::now()))
            {
                Ok(answer) => self.take_answer(answer),
                Err(mpsc::RecvTimeoutError::Disconnected) => {
                    let _ = reader.join();
                    return;
                }
                Err(mpsc::RecvTimeoutError::Timeout) => {
                    warn!("history reader did not stop; leaving it");
                    return;
                }
            }
        }
    }
}

impl super::engine::Engine for SqliteStore {
    fn request(&mut self, req: Request) {
        if self.engine_closed {
            if let Some((token, room)) = super::engine::token_of(req) {
                self.replies.push_back(Reply::Unavailable {
                    token,
                    room,
                    error: StoreError("the history engine is closed".into()),
                });
            }
            return;
        }
        match req {
            Request::Append { room, msg } => {
                self.append(&room, msg);
            }
            #[cfg(feature = "cluster")]
            Request::Cluster(_) => {}
            #[cfg(feature = "server-api")]
            Request::Remove { room, what } => self.remove(room, what),
            Request::Page { token, room, query } => {
                self.prune_pending();
                let removed: Vec<Removal> = self
                    .removals
                    .iter()
                    .filter(|(_, r, _)| *r == room)
                    .map(|(_, _, w)| *w)
                    .collect();
                // Only the candidates the page can hold: the newest (or oldest) limit + 1.
                let in_room = self
                    .pending
                    .iter()
                    .filter(|(_, r, m)| *r == room && !removed.iter().any(|w| w.covers(m.id)));
                let pending: Vec<StoredMessage> = match query {
                    Query::Before { before, limit } => {
                        let bound = before.unwrap_or(u64::MAX);
                        let mut newest: Vec<_> = in_room
                            .rev()
                            .filter(|(_, _, m)| m.id < bound)
                            .take(limit.saturating_add(1))
                            .map(|(_, _, m)| m.clone())
                            .collect();
                        newest.reverse();
                        newest
                    }
                    Query::After { after, limit } => in_room
                        .filter(|(_, _, m)| m.id > after)
                        .take(limit.saturating_add(1))
                        .map(|(_, _, m)| m.clone())
                        .collect(),
                };
                let read = Read::Page {
                    room: room.clone(),
                    query,
                    pending,
                    removed,
                };
                self.send_read(token, room, false, read);
            }
            Request::LastId { token, room } => {
                self.prune_pending();
                let queued = self
                    .pending
                    .iter()
                    .rev()
                    .find(|(_, r, _)| *r == room)
                    .map_or(0, |(_, _, m)| m.id);
                let read = Read::LastId {
                    room: room.clone(),
                    queued,
                };
                self.send_read(token, room, true, read);
            }
            Request::Reserve { token, room, id } => self.request_reserve(token, room, id),
        }
    }

    fn poll(&mut self) -> Option<Reply> {
        if self.replies.is_empty() {
            self.gather();
        }
        self.replies.pop_front()
    }

    fn writable(&self) -> bool {
        !self.engine_closed && self.store_writable()
    }

    fn flush(&mut self) {
        self.flush_writer();
    }

    fn close(&mut self, deadline: Instant) -> u64 {
        if self.engine_closed {
            return 0;
        }
        let unstored = self.close_threads(deadline);
        self.engine_closed = true;
        self.fail_reads("the history engine is closed");
        self.resolve_waiting(true);
        unstored
    }
}

impl SqliteStore {
    /// Ends the writer. A healthy one commits what is queued first (until `limit`, when given);
    /// a failing one is told to give up and waited for [`STOP_WAIT`] at most. One that does not
    /// end in time is left behind: a SQLite call can hang on a broken disk, and the process
    /// must still exit.
    fn stop_writer(&mut self, limit: Option<Instant>) {
        self.jobs = None;
        let Some(writer) = self.writer.take() else {
            return;
        };
        let mut failing_since: Option<Instant> = None;
        loop {
            match self.writer_done.recv_timeout(Duration::from_millis(20)) {
                Err(mpsc::RecvTimeoutError::Timeout) => {}
                _ => {
                    let _ = writer.join();
                    return;
                }
            }
            let now = Instant::now();
            if !self.shared.writable.load(Ordering::Acquire) {
                self.shared.stop.store(true, Ordering::Release);
                let since = *failing_since.get_or_insert(now);
                if now >= since + STOP_WAIT {
                    warn!("history writer did not stop; leaving it");
                    return;
                }
            } else if limit.is_some_and(|l| now >= l) {
                warn!("history writer did not finish in time; leaving it");
                return;
            }
        }
    }
}

impl Drop for SqliteStore {
    fn drop(&mut self) {
        // Closing the channel ends the writer after it has committed what was queued.
        self.stop_writer(None);
        self.stop_reader();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicUsize;

    /// Blocking calls for these tests, made through the engine (requests and replies), so
    /// that no synchronous read path exists outside them.
    impl SqliteStore {
        fn ask(&mut self, req: Request) -> Reply {
            use super::super::engine::Engine;
            let deadline = Instant::now() + Duration::from_secs(20);
            Engine::request(self, req);
            loop {
                match Engine::poll(self) {
                    Some(Reply::DurableUpTo(_)) => {}
                    Some(reply) => return reply,
                    None => {
                        assert!(Instant::now() < deadline, "the engine did not answer");
                        thread::sleep(Duration::from_millis(1));
                    }
                }
            }
        }
        fn flush(&mut self) {
            self.flush_writer();
        }
        fn durable(&mut self) -> u64 {
            self.prune_pending();
            self.shared.durable.load(Ordering::Acquire)
        }
        fn writable(&self) -> bool {
            self.store_writable()
        }
        fn last_id(&mut self, room: &str) -> Result<u64, StoreError> {
            let room = room.to_string();
            match self.ask(Request::LastId {
                token: u64::MAX,
                room,
            }) {
                Reply::LastId { last_id, .. } => Ok(last_id),
                Reply::Unavailable { error, .. } => Err(error),
                other => panic!("not an answer to LastId: {other:?}"),
            }
        }
        fn page(&mut self, room: &str, query: Query) -> Page {
            let room = room.to_string();
            match self.ask(Request::Page {
                token: u64::MAX,
                room,
                query,
            }) {
                Reply::PageReady { page, .. } => page,
                other => panic!("not a page: {other:?}"),
            }
        }
        fn reserve(&mut self, room: &str, id: u64) -> Result<(), StoreError> {
            let room = room.to_string();
            match self.ask(Request::Reserve {
                token: u64::MAX,
                room,
                id,
            }) {
                Reply::IdsReserved { up_to, .. } => {
                    assert!(up_to >= id);
                    Ok(())
                }
                Reply::Unavailable { error, .. } => Err(error),
                other => panic!("not an answer to Reserve: {other:?}"),
            }
        }
    }

    fn temp_db(name: &str) -> String {
        let dir =
            std::env::temp_dir().join(format!("chatterbox-test-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        dir.join("h.db").to_string_lossy().into_owned()
    }

    #[test]
    fn history_and_ids_survive_reopening() {
        let path = temp_db("reopen");
        let notified = Arc::new(AtomicUsize::new(0));
        {
            let n = notified.clone();
            let mut s = SqliteStore::open(
                &path,
                Box::new(move || {
                    n.fetch_add(1, Ordering::SeqCst);
                }),
            )
            .unwrap();
            for id in 1..=5 {
                s.append("r", super::super::test_message(id));
            }
            s.flush();
            assert_eq!(s.durable(), 5);
        }
        assert!(
            notified.load(Ordering::SeqCst) >= 1,
            "the loop is told about commits"
        );
        let mut s = SqliteStore::open(&path, Box::new(|| {})).unwrap();
        assert_eq!(s.last_id("r"), Ok(5));
        let p = s.page(
            "r",
            Query::After {
                after: 0,
                limit: 10,
            },
        );
        assert_eq!(
            p.messages,
            (1..=5).map(super::super::test_message).collect::<Vec<_>>()
        );
    }

    #[test]
    fn removed_messages_stay_out_across_a_restart_and_their_ids_stay_taken() {
        let path = temp_db("remove");
        let ids = |p: Page| p.messages.iter().map(|m| m.id).collect::<Vec<_>>();
        let newest = Query::Before {
            before: None,
            limit: 10,
        };
        let oldest = Query::After {
            after: 0,
            limit: 10,
        };
        {
            let mut s = SqliteStore::open(&path, Box::new(|| {})).unwrap();
            for id in 1..=5 {
                s.append("r", super::super::test_message(id));
            }
            s.append("q", super::super::test_message(1));
            s.append("q", super::super::test_message(2));
            // Before anything is committed, pages already leave them out.
            s.remove("r".into(), Removal::One(5));
            s.remove("r".into(), Removal::One(2));
            s.remove("q".into(), Removal::UpTo(2));
            assert_eq!(ids(s.page("r", newest)), vec![1, 3, 4]);
            assert_eq!(ids(s.page("r", oldest)), vec![1, 3, 4]);
            assert!(ids(s.page("q", newest)).is_empty());
            s.flush();
            assert_eq!(ids(s.page("r", newest)), vec![1, 3, 4]);
            let one = Query::Before {
                before: None,
                limit: 1,
            };
            let p = s.page("r", one);
            assert_eq!((ids(p.clone()), p.more), (vec![4], true));
            assert!(ids(s.page("q", oldest)).is_empty());
            // Dropped: a clean shutdown gives unused ids back, never the removed ones.
        }
        let mut s = SqliteStore::open(&path, Box::new(|| {})).unwrap();
        assert_eq!(ids(s.page("r", newest)), vec![1, 3, 4]);
        assert_eq!(s.last_id("r"), Ok(5), "the removed last id stays taken");
        assert!(ids(s.page("q", newest)).is_empty());
        assert_eq!(
            s.last_id("q"),
            Ok(2),
            "a deleted room continues above its ids"
        );
        s.append("q", super::super::test_message(3));
        s.flush();
        assert_eq!(ids(s.page("q", oldest)), vec![3]);
    }

    /// A writer that has gone (stopped, or died) makes the store unwritable at the next append,
    /// so the core refuses broadcasts with `unavailable` and `/health` says 503, instead of
    /// taking messages that would never be stored or acked.
    #[test]
    fn a_store_whose_writer_is_gone_is_not_writable() {
        let path = temp_db("writer-gone");
        let mut s = SqliteStore::open(&path, Box::new(|| {})).unwrap();
        s.append("r", super::super::test_message(1));
        s.flush();
        s.stop_writer(None);
        assert!(s.writable(), "nothing was lost yet");
        s.append("r", super::super::test_message(2));
        assert!(!s.writable(), "an append the writer cannot take");
    }

    #[test]
    fn dropping_the_store_commits_what_was_queued() {
        let path = temp_db("drop");
        {
            let mut s = SqliteStore::open(&path, Box::new(|| {})).unwrap();
            for id in 1..=100 {
                s.append("r", super::super::test_message(id));
            }
        }
        let mut s = SqliteStore::open(&path, Box::new(|| {})).unwrap();
        assert_eq!(s.last_id("r"), Ok(100));
    }

    #[test]
    fn pending_is_pruned_by_appends_alone() {
        let path = temp_db("prune");
        let mut s = SqliteStore::open(&path, Box::new(|| {})).unwrap();
        for id in 1..=1000 {
            s.append("r", super::super::test_message(id));
        }
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while s.shared.durable.load(Ordering::Acquire) < 1000 {
            assert!(
                std::time::Instant::now() < deadline,
                "the writer never caught up"
            );
            thread::sleep(Duration::from_millis(5));
        }
        s.append("r", super::super::test_message(1001));
        assert!(
            s.pending.len() <= 1,
            "{} messages held after they were durable",
            s.pending.len()
        );
    }

    #[test]
    fn a_read_error_in_last_id_is_an_error_not_an_empty_room() {
        let path = temp_db("readerr");
        let mut s = SqliteStore::open(&path, Box::new(|| {})).unwrap();
        for id in 1..=3 {
            s.append("r", super::super::test_message(id));
        }
        s.flush();
        assert_eq!(s.last_id("r"), Ok(3));
        Connection::open(&path)
            .unwrap()
            .execute_batch("ALTER TABLE messages RENAME TO gone;")
            .unwrap();
        assert!(
            s.last_id("r").is_err(),
            "a read error must not look like an empty room (ids would start again at 1)"
        );
        assert!(
            !s.writable(),
            "a store that cannot number messages is not available"
        );
    }

    #[test]
    fn a_room_back_in_memory_continues_without_a_gap() {
        let path = temp_db("nogap");
        let mut s = SqliteStore::open(&path, Box::new(|| {})).unwrap();
        for id in 1..=5 {
            s.reserve("r", id).unwrap();
            s.append("r", super::super::test_message(id));
        }
        assert_eq!(s.last_id("r"), Ok(5), "queued");
        s.flush();
        assert_eq!(
            s.last_id("r"),
            Ok(5),
            "stored, with ids reserved far beyond"
        );
    }

    #[test]
    fn ids_are_reserved_ahead_and_a_crash_continues_above_them() {
        let path = temp_db("reserve");
        let mut s = SqliteStore::open(&path, Box::new(|| {})).unwrap();
        for id in 1..=5 {
            s.reserve("r", id).unwrap();
            s.append("r", super::super::test_message(id));
        }
        s.flush();
        // A crash: the writer never gets to give the unused ids back.
        std::mem::forget(s);
        let mut s = SqliteStore::open(&path, Box::new(|| {})).unwrap();
        let last = s.last_id("r").unwrap();
        assert!(last >= ID_BLOCK, "ids up to {last} may have been delivered");
        // A clean shutdown gives the unused block back, but never below the crash's mark.
        drop(s);
        let mut s = SqliteStore::open(&path, Box::new(|| {})).unwrap();
        assert_eq!(s.last_id("r").unwrap(), last);
        s.reserve("r", last + 1).unwrap();
        s.append("r", super::super::test_message(last + 1));
        drop(s);
        let mut s = SqliteStore::open(&path, Box::new(|| {})).unwrap();
        assert_eq!(
            s.last_id("r").unwrap(),
            last + 1,
            "a clean stop leaves no gap"
        );
    }

    fn set_read_gate(s: &SqliteStore, open: bool) {
        let (gate, cv) = &s.shared.read_gate;
        *gate.lock().unwrap() = open;
        cv.notify_all();
    }

    fn engine_replies(s: &mut SqliteStore) -> Vec<Reply> {
        std::iter::from_fn(|| super::super::engine::Engine::poll(s))
            .filter(|r| !matches!(r, Reply::DurableUpTo(_)))
            .collect()
    }

    #[test]
    fn engine_pages_are_read_off_the_calling_thread() {
        use super::super::engine::Engine;
        let path = temp_db("offthread");
        let mut s = SqliteStore::open(&path, Box::new(|| {})).unwrap();
        set_read_gate(&s, false);
        s.request(Request::Append {
            room: "r".into(),
            msg: super::super::test_message(1),
        });
        s.request(Request::Page {
            token: 1,
            room: "r".into(),
            query: Query::Before {
                before: None,
                limit: 5,
            },
        });
        s.request(Request::LastId {
            token: 2,
            room: "r".into(),
        });
        // The reader thread is held: had `request` read on this thread, the answers would be
        // here already.
        assert_eq!(engine_replies(&mut s), vec![], "read on the calling thread");
        set_read_gate(&s, true);
        let deadline = Instant::now() + Duration::from_secs(20);
        let mut got = Vec::new();
        while got.len() < 2 {
            assert!(Instant::now() < deadline, "the reader never answered");
            got.extend(engine_replies(&mut s));
            thread::yield_now();
        }
        assert_eq!(
            got,
            vec![
                Reply::PageReady {
                    token: 1,
                    room: "r".into(),
                    page: Page {
                        messages: vec![super::super::test_message(1)],
                        more: false
                    }
                },
                Reply::LastId {
                    token: 2,
                    room: "r".into(),
                    last_id: 1
                }
            ]
        );
    }

    #[test]
    fn closing_answers_a_read_the_reader_is_stuck_on() {
        use super::super::engine::Engine;
        let path = temp_db("stuckread");
        let mut s = SqliteStore::open(&path, Box::new(|| {})).unwrap();
        set_read_gate(&s, false);
        s.request(Request::Page {
            token: 7,
            room: "r".into(),
            query: Query::After { after: 0, limit: 5 },
        });
        assert_eq!(Engine::close(&mut s, Instant::now()), 0);
        let got = engine_replies(&mut s);
        assert!(
            matches!(&got[..], [Reply::Unavailable { token: 7, .. }]),
            "{got:?}"
        );
        // Let the thread that was left behind end.
        set_read_gate(&s, true);
    }

    #[test]
    fn the_writer_waits_for_a_lock_held_elsewhere_instead_of_failing_at_once() {
        static WAITED: AtomicBool = AtomicBool::new(false);
        fn give_up(_attempt: i32) -> bool {
            WAITED.store(true, Ordering::SeqCst);
            false
        }
        let path = temp_db("lockwait");
        drop(SqliteStore::open(&path, Box::new(|| {})).unwrap());
        let mut conn = Connection::open(&path).unwrap();
        conn.busy_handler(Some(give_up)).unwrap();
        let shared = Arc::new(Shared {
            durable: AtomicU64::new(0),
            removed: AtomicU64::new(0),
            writable: AtomicBool::new(true),
            stop: AtomicBool::new(false),
            reserved: Mutex::new(HashMap::new()),
            read_gate: (Mutex::new(true), Condvar::new()),
        });
        let mut writer = Writer::new(conn, shared, Arc::new(|| {}), Retention::default());
        let other = Connection::open(&path).unwrap();
        other.execute_batch("BEGIN EXCLUSIVE;").unwrap();
        let reserve = HashMap::from([("r".to_string(), 999)]);
        let batch = vec![(
            1,
            "r".to_string(),
            Write::Insert(super::super::test_message(1)),
        )];
        assert!(
            writer
                .commit(&batch, &reserve, &mut Vec::new(), &mut Vec::new())
                .is_err(),
            "the lock is held"
        );
        assert!(
            WAITED.load(Ordering::SeqCst),
            "a lock held elsewhere failed the commit without waiting (busy_timeout unused)"
        );
        other.execute_batch("COMMIT;").unwrap();
        writer
            .commit(&batch, &reserve, &mut Vec::new(), &mut Vec::new())
            .expect("commits once the lock is free");
    }

    #[test]
    fn engine_reservations_survive_the_cache_starting_over() {
        use super::super::engine::Engine;
        let path = temp_db("churn");
        let mut s = SqliteStore::open(&path, Box::new(|| {})).unwrap();
        let rooms = MAX_CACHED_ROOMS as u64 * 5;
        let mut answered = HashMap::new();
        let deadline = Instant::now() + Duration::from_secs(20);
        // Waves of new rooms, each wave starting the cache over while the last one waits.
        for wave in 0..5 {
            for i in 0..MAX_CACHED_ROOMS as u64 {
                let token = wave * MAX_CACHED_ROOMS as u64 + i;
                s.request(Request::Reserve {
                    token,
                    room: format!("room{token}"),
                    id: 1,
                });
            }
            for r in engine_replies(&mut s) {
                answered.insert(format!("{r:?}"), r);
            }
        }
        while (answered.len() as u64) < rooms {
            assert!(Instant::now() < deadline, "{} answered", answered.len());
            for r in engine_replies(&mut s) {
                answered.insert(format!("{r:?}"), r);
            }
            thread::yield_now();
        }
        for r in answered.values() {
            assert!(
                matches!(r, Reply::IdsReserved { token, room, up_to }
                    if *room == format!("room{token}") && *up_to >= 1),
                "{r:?}"
            );
        }
        assert_eq!(answered.len() as u64, rooms, "one reply per request");
        let check = Connection::open(&path).unwrap();
        for token in 0..rooms {
            let room = format!("room{token}");
            assert!(stored_reservation(&check, &room).unwrap() >= 1, "{room}");
        }
    }

    /// The core's join procedure from the engine docs, against a page that comes late: the
    /// joiner sees history, then live messages, without a gap or a duplicate.
    #[test]
    fn a_late_page_and_the_joiners_buffer_give_no_gap_and_no_duplicate() {
        use super::super::engine::Engine;
        for query in [
            Query::Before {
                before: None,
                limit: 20,
            },
            Query::After {
                after: 30,
                limit: 1000,
            },
        ] {
            let path = temp_db("joiner");
            let mut s = SqliteStore::open(&path, Box::new(|| {})).unwrap();
            for id in 1..=50 {
                s.append("r", super::super::test_message(id));
            }
            s.flush_writer();
            for id in 51..=55 {
                s.append("r", super::super::test_message(id));
            }
            // The member joins: the page is asked for, and the reader is slow.
            set_read_gate(&s, false);
            s.request(Request::Page {
                token: 1,
                room: "r".into(),
                query,
            });
            // Several turns of live traffic: delivered to the joiner's buffer, and committed
            // before the page is read.
            let mut buffer = Vec::new();
            for id in 56..=70 {
                s.request(Request::Append {
                    room: "r".into(),
                    msg: super::super::test_message(id),
                });
                buffer.push(id);
                assert_eq!(engine_replies(&mut s), vec![], "the page is held");
            }
            s.flush_writer();
            set_read_gate(&s, true);
            let deadline = Instant::now() + Duration::from_secs(20);
            let page = loop {
                assert!(Instant::now() < deadline, "no page");
                if let Some(Reply::PageReady { token: 1, page, .. }) = engine_replies(&mut s).pop()
                {
                    break page;
                }
                thread::yield_now();
            };
            let last = page.messages.last().map_or(0, |m| m.id);
            let mut seen: Vec<u64> = page.messages.iter().map(|m| m.id).collect();
            seen.extend(buffer.into_iter().filter(|&id| id > last));
            let first = seen[0];
            assert_eq!(
                seen,
                (first..=70).collect::<Vec<_>>(),
                "{query:?}: a gap or a duplicate"
            );
            if let Query::After { after, .. } = query {
                assert_eq!(first, after + 1, "everything since");
            }
        }
    }

    /// Retention: `--history-max-age` and `--history-max-per-room`, pruned by the writer.
    mod retention {
        use super::*;

        impl SqliteStore {
            /// Waits until the writer has committed everything and pruned all that is due.
            fn settle(&mut self) {
                self.flush_writer();
                let (tx, rx) = mpsc::channel();
                assert!(self.send(Job::Settle(tx)));
                rx.recv_timeout(Duration::from_secs(60))
                    .expect("the writer settles");
            }
            fn ids(&mut self, room: &str) -> Vec<u64> {
                let p = self.page(
                    room,
                    Query::After {
                        after: 0,
                        limit: 1_000_000,
                    },
                );
                assert!(!p.more);
                p.messages.iter().map(|m| m.id).collect()
            }
        }

        fn per_room(n: u64) -> Retention {
            Retention {
                max_per_room: n,
                ..Retention::default()
            }
        }

        fn message(id: u64, ts: u64, text_len: usize) -> StoredMessage {
            StoredMessage {
                id,
                member: "m".into(),
                message: "x".repeat(text_len),
                ts,
                data: None,
            }
        }

        /// Appends messages `ids` of `room` with reserved ids, as the core would.
        fn append_reserved(s: &mut SqliteStore, room: &str, ids: std::ops::RangeInclusive<u64>) {
            for id in ids {
                s.reserve(room, id).unwrap();
                s.append(room, message(id, unix_millis(), 20));
            }
        }

        #[cfg(feature = "server-api")]
        #[test]
        fn after_a_room_is_deleted_the_cap_counts_its_new_messages_only() {
            let path = temp_db("ret-deleted-room");
            let mut s = SqliteStore::open_with(&path, per_room(10), Box::new(|| {})).unwrap();
            append_reserved(&mut s, "r", 1..=10);
            s.settle();
            assert_eq!(s.ids("r").len(), 10);
            // The room is deleted (its rows go, a tombstone keeps id 10 taken) and used again.
            s.remove("r".into(), Removal::UpTo(10));
            append_reserved(&mut s, "r", 11..=16);
            s.settle();
            // Six messages are under the cap of ten: all stay. A count kept from before the
            // delete would have made it sixteen and pruned six of them.
            assert_eq!(s.ids("r"), (11..=16).collect::<Vec<_>>());
            append_reserved(&mut s, "r", 17..=25);
            s.settle();
            assert_eq!(s.ids("r"), (16..=25).collect::<Vec<_>>());
        }

        #[test]
        fn the_per_room_cap_keeps_the_newest_and_ids_continue_after_a_restart() {
            let path = temp_db("ret-cap");
            {
                let mut s = SqliteStore::open_with(&path, per_room(10), Box::new(|| {})).unwrap();
                append_reserved(&mut s, "r", 1..=2500);
                append_reserved(&mut s, "small", 1..=5);
                s.settle();
                assert_eq!(s.ids("r"), (2491..=2500).collect::<Vec<_>>());
                assert_eq!(s.ids("small"), (1..=5).collect::<Vec<_>>(), "under the cap");
                assert_eq!(s.last_id("r"), Ok(2500));
                // More of the same room: still the newest ten, counted without a recount.
                append_reserved(&mut s, "r", 2501..=2503);
                s.settle();
                assert_eq!(s.ids("r"), (2494..=2503).collect::<Vec<_>>());
            }
            // A clean restart gives the unused ids back, never the used ones.
            let mut s = SqliteStore::open_with(&path, per_room(3), Box::new(|| {})).unwrap();
            assert_eq!(s.last_id("r"), Ok(2503));
            append_reserved(&mut s, "r", 2504..=2504);
            s.settle();
            assert_eq!(
                s.ids("r"),
                vec![2502, 2503, 2504],
                "a lower cap applies at once"
            );
            // Without retention nothing more is deleted.
            drop(s);
            let mut s = SqliteStore::open(&path, Box::new(|| {})).unwrap();
            append_reserved(&mut s, "r", 2505..=2506);
            s.settle();
            assert_eq!(s.ids("r"), (2502..=2506).collect::<Vec<_>>());
        }

        #[test]
        fn aged_messages_go_and_a_room_emptied_by_age_never_reuses_an_id() {
            let path = temp_db("ret-age");
            let hour = Retention {
                max_age_ms: 3_600_000,
                ..Retention::default()
            };
            let now = unix_millis();
            {
                let mut s = SqliteStore::open_with(&path, hour, Box::new(|| {})).unwrap();
                for id in 1..=1500 {
                    s.reserve("old", id).unwrap();
                    // Two hours old: past the age.
                    s.append("old", message(id, now - 7_200_000 + id, 20));
                }
                s.reserve("mixed", 2).unwrap();
                s.append("mixed", message(1, now - 7_200_000, 20));
                s.append("mixed", message(2, now, 20));
                s.settle();
                assert_eq!(
                    s.ids("old"),
                    Vec::<u64>::new(),
                    "every message past the age"
                );
                assert_eq!(s.ids("mixed"), vec![2], "the young one stays");
                // In this run (the room's reservation cached) and after a clean restart,
                // the emptied room continues above its last id.
                assert_eq!(s.last_id("old"), Ok(1500));
            }
            for _ in 0..2 {
                let mut s = SqliteStore::open_with(&path, hour, Box::new(|| {})).unwrap();
                assert_eq!(s.last_id("old"), Ok(1500));
                assert_eq!(s.last_id("mixed"), Ok(2));
            }
            // The mark also holds with retention off (the index is dropped, the mark stays).
            let mut s = SqliteStore::open(&path, Box::new(|| {})).unwrap();
            assert_eq!(s.last_id("old"), Ok(1500));
        }

        /// Size of the database file once the WAL is checkpointed into it.
        fn db_bytes(path: &str) -> u64 {
            let c = Connection::open(path).unwrap();
            let _: (i64, i64, i64) = c
                .query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |r| {
                    Ok((r.get(0)?, r.get(1)?, r.get(2)?))
                })
                .unwrap();
            let f: i64 = c
                .query_row("PRAGMA freelist_count", [], |r| r.get(0))
                .unwrap();
            let pc: i64 = c.query_row("PRAGMA page_count", [], |r| r.get(0)).unwrap();
            let rows: i64 = c
                .query_row("SELECT COUNT(*) FROM messages", [], |r| r.get(0))
                .unwrap();
            eprintln!("free {f} pages {pc} rows {rows}");
            std::fs::metadata(path).unwrap().len()
        }

        /// Writes `n` messages of 400 bytes into 4 rooms, then settles; returns the file size.
        /// A flush every 500 keeps the commits at most that big, so the peak between a commit
        /// and its pruning (what the file must hold at once) is the same in every run.
        fn write_rooms(s: &mut SqliteStore, next: &mut u64, n: u64, path: &str) -> u64 {
            for _ in 0..n {
                *next += 1;
                let room = format!("room{}", *next % 4);
                let id = *next / 4 + 1;
                s.reserve(&room, id).unwrap();
                s.append(&room, message(id, unix_millis(), 400));
                if *next % 500 == 0 {
                    s.flush();
                }
            }
            s.settle();
            db_bytes(path)
        }

        #[test]
        fn with_a_cap_the_file_stops_growing_without_vacuum() {
            const N: u64 = 12_000;
            let sizes = |retention: Retention, name: &str| {
                let path = temp_db(name);
                let mut s = SqliteStore::open_with(&path, retention, Box::new(|| {})).unwrap();
                let mut next = 0;
                let after_n = write_rooms(&mut s, &mut next, N, &path);
                let after_3n = write_rooms(&mut s, &mut next, 2 * N, &path);
                (after_n, after_3n)
            };
            // 250 per room, 4 rooms: the cap is reached within the first N messages.
            let (n, n3) = sizes(per_room(250), "ret-size");
            eprintln!(
                "with a cap of 250 per room: {n} bytes after {N}, {n3} after {}",
                3 * N
            );
            assert!(
                n3 <= n + n / 10,
                "the file grew from {n} to {n3} bytes: freed pages are not reused"
            );
            // The control: without retention the same writes triple it.
            let (n, n3) = sizes(Retention::default(), "ret-size-control");
            eprintln!(
                "without retention: {n} bytes after {N}, {n3} after {}",
                3 * N
            );
            assert!(n3 > 2 * n, "the control did not grow: {n} -> {n3}");
        }

        #[test]
        fn pruning_interleaves_with_commits_and_loses_nothing_kept() {
            // Many small commits with a cap: every message inside the cap is there, in
            // order, without gaps, whatever the interleaving of commits and prunes.
            let path = temp_db("ret-interleave");
            let mut s = SqliteStore::open_with(&path, per_room(50), Box::new(|| {})).unwrap();
            for round in 0..20u64 {
                let first = round * 137 + 1;
                append_reserved(&mut s, "r", first..=first + 136);
                s.flush();
            }
            s.settle();
            let last = 20 * 137;
            assert_eq!(s.ids("r"), (last - 49..=last).collect::<Vec<_>>());
        }
    }
}
