//! The SQLite history store: durable across `kill -9`, committed in batches off the event loop.
//!
//! Appends go through a channel to one writer thread, which takes everything queued, writes it in
//! one transaction (group commit), publishes the highest committed ticket and calls `notify` so
//! the event loop sends the acks that became due. Until then a message is held in `pending`, so
//! that pages read on the loop thread (through a second, read-only connection in WAL mode) see
//! every message appended so far, committed or not.
//!
//! Failure: a commit that fails (disk full, read-only file, I/O error) is retried in smaller
//! pieces (halving down to one message) with a backoff of up to [`MAX_BACKOFF`]; the store is
//! not [`writable`](HistoryStore::writable) until a commit lands again, and it logs once per
//! change of state. Nothing is acked before it is committed.
//!
//! Ids: the table `rooms(room, reserved)` holds a per-room high-water mark written by the writer
//! ahead of delivery, [`ID_BLOCK`] ids ahead and renewed every quarter block, so delivery does
//! not wait for the disk. An id above the durable mark is not handed out. A restart continues
//! above the mark, so ids may jump after a crash but never repeat; a clean shutdown gives the
//! unused part of the block back.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, mpsc};
use std::thread;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use log::{debug, error, info, warn};
use rusqlite::{Connection, OpenFlags, OptionalExtension, params};

use super::{HistoryStore, Page, Query, StoreError, StoredMessage, page_from_asc, page_from_desc};
use crate::chat::protocol::RawJson;

/// Most messages written in one transaction.
const MAX_BATCH: usize = 4096;
/// Ids reserved per room at a time; a crash skips at most this many ids of a room.
pub const ID_BLOCK: u64 = 1000;
/// Longest pause between two attempts of a failing commit.
pub const MAX_BACKOFF: Duration = Duration::from_secs(1);
/// First pause after a failed commit.
const FIRST_BACKOFF: Duration = Duration::from_millis(10);
/// How long a broadcast waits for its room's ids to become durable while the store is healthy
/// (a room's first message after start, or a burst faster than the renewal).
const RESERVE_WAIT: Duration = Duration::from_secs(1);
/// Rooms whose reservation the loop keeps in memory; beyond it the cache starts over from the
/// database (which is always right, only slower).
const MAX_CACHED_ROOMS: usize = 4096;
/// Rooms whose reservation a clean shutdown gives back; beyond it the gaps stay (harmless).
const MAX_GIVE_BACK: usize = 65_536;
/// How long closing waits for the writer to notice the stop once the flush deadline passed.
const STOP_WAIT: Duration = Duration::from_millis(500);

enum Job {
    Append {
        ticket: u64,
        room: String,
        msg: StoredMessage,
    },
    /// Make ids up to `upto` of `room` durable before they are handed out.
    Reserve {
        room: String,
        upto: u64,
    },
    Flush(mpsc::Sender<()>),
}

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
    writable: AtomicBool,
    /// Set at shutdown: a failing writer stops retrying.
    stop: AtomicBool,
    reserved: Mutex<HashMap<String, Reservation>>,
    /// Signalled when a reservation lands or the writer changes state.
    changed: Condvar,
}

impl Shared {
    fn reserved(&self) -> MutexGuard<'_, HashMap<String, Reservation>> {
        self.reserved.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// History in a SQLite file (WAL journal, `synchronous=FULL`).
pub struct SqliteStore {
    reader: Connection,
    jobs: Option<mpsc::Sender<Job>>,
    writer: Option<thread::JoinHandle<()>>,
    /// Disconnects when the writer thread ends.
    writer_done: mpsc::Receiver<()>,
    shared: Arc<Shared>,
    tickets: u64,
    /// Appended, not yet known to be committed: `(ticket, room, message)` in append order.
    pending: VecDeque<(u64, String, StoredMessage)>,
    /// The last read of a room's last id failed (a corrupt page): broadcasts cannot be
    /// numbered, so the store does not count as available until a read works again.
    read_failed: bool,
}

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
        let mut writer_conn = Connection::open(path)?;
        writer_conn.busy_timeout(Duration::from_secs(5))?;
        writer_conn.execute_batch(SCHEMA)?;
        let mode: String = writer_conn.query_row("PRAGMA journal_mode", [], |r| r.get(0))?;
        if !mode.eq_ignore_ascii_case("wal") {
            return Err(rusqlite::Error::InvalidParameterName(format!(
                "cannot switch the journal to WAL (it stays '{mode}'): is the file writable?"
            )));
        }
        // Reading works on a read-only file or a full disk: only a write tells.
        let tx = writer_conn.transaction()?;
        tx.execute(
            "INSERT OR REPLACE INTO meta (key, value) VALUES ('last_start', ?1)",
            [unix_secs()],
        )?;
        tx.commit()?;
        let reader = Connection::open_with_flags(
            path,
            OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX,
        )?;
        reader.busy_timeout(Duration::from_secs(1))?;
        // Pages are read by primary key and the OS caches the file: a small cache keeps an idle
        // server small (256 KiB at most per connection).
        reader.execute_batch("PRAGMA cache_size = -256;")?;
        let shared = Arc::new(Shared {
            durable: AtomicU64::new(0),
            writable: AtomicBool::new(true),
            stop: AtomicBool::new(false),
            reserved: Mutex::new(HashMap::new()),
            changed: Condvar::new(),
        });
        let (tx, rx) = mpsc::channel();
        let (done_tx, writer_done) = mpsc::channel::<()>();
        let theirs = shared.clone();
        let writer = thread::Builder::new()
            .name("history-writer".into())
            // The writer only loops over SQLite calls; it needs nothing like the default 2 MiB.
            .stack_size(256 * 1024)
            .spawn(move || {
                let _done = done_tx;
                Writer::new(writer_conn, theirs, notify).run(rx);
            })
            .map_err(|e| rusqlite::Error::ToSqlConversionFailure(Box::new(e)))?;
        Ok(SqliteStore {
            reader,
            jobs: Some(tx),
            writer: Some(writer),
            writer_done,
            shared,
            tickets: 0,
            pending: VecDeque::new(),
            read_failed: false,
        })
    }

    fn prune_pending(&mut self) {
        let done = self.shared.durable.load(Ordering::Acquire);
        while self.pending.front().is_some_and(|(t, _, _)| *t <= done) {
            self.pending.pop_front();
        }
    }

    fn send(&self, job: Job) -> bool {
        self.jobs.as_ref().is_some_and(|j| j.send(job).is_ok())
    }

    fn query(&self, sql: &str, room: &str, bound: u64, limit: usize) -> Vec<StoredMessage> {
        let run = || -> rusqlite::Result<Vec<StoredMessage>> {
            let mut stmt = self.reader.prepare_cached(sql)?;
            let limit = i64::try_from(limit).unwrap_or(i64::MAX);
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
        };
        run().unwrap_or_else(|e| {
            error!("history read failed for room '{room}': {e}");
            Vec::new()
        })
    }

    /// The highest id that may have been handed out in `room`: queued, stored or reserved.
    fn read_last_id(&mut self, room: &str) -> Result<u64, StoreError> {
        self.prune_pending();
        let queued = self
            .pending
            .iter()
            .rev()
            .find(|(_, r, _)| r == room)
            .map_or(0, |(_, _, m)| m.id);
        let stored = self
            .reader
            .query_row(
                "SELECT MAX(id) FROM messages WHERE room = ?1",
                [room],
                |row| row.get::<_, Option<i64>>(0),
            )
            .map(|v| v.unwrap_or(0).max(0) as u64)
            .map_err(|e| read_error(room, e))?;
        // A room this run reserved for continues right after its last message (no gap when it
        // comes back into memory); any other continues above its stored mark.
        let cached = self.shared.reserved().get(room).map(|r| r.floor);
        let reserved = match cached {
            Some(floor) => floor,
            None => self.stored_reservation(room)?,
        };
        Ok(queued.max(stored).max(reserved))
    }

    /// The committed high-water mark of `room`, 0 when it has none.
    fn stored_reservation(&self, room: &str) -> Result<u64, StoreError> {
        self.reader
            .query_row(
                "SELECT reserved FROM rooms WHERE room = ?1",
                [room],
                |row| row.get::<_, i64>(0),
            )
            .optional()
            .map(|v| v.unwrap_or(0).max(0) as u64)
            .map_err(|e| read_error(room, e))
    }
}

fn read_error(room: &str, e: rusqlite::Error) -> StoreError {
    error!("history read failed for room '{room}': {e}");
    StoreError(format!("history read failed: {e}"))
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
    notify: Box<dyn Fn() + Send>,
    /// Per room this run reserved for: its mark before this run raised it, so that a clean
    /// shutdown can give back what was reserved and not used, and no more.
    floors: HashMap<String, u64>,
    /// More rooms than [`MAX_GIVE_BACK`] were reserved for: nothing is given back.
    floors_full: bool,
}

impl Writer {
    fn new(conn: Connection, shared: Arc<Shared>, notify: Box<dyn Fn() + Send>) -> Self {
        Writer {
            conn,
            shared,
            notify,
            floors: HashMap::new(),
            floors_full: false,
        }
    }

    fn run(mut self, rx: mpsc::Receiver<Job>) {
        let mut batch = Vec::new();
        let mut reserve: HashMap<String, u64> = HashMap::new();
        let mut flushes = Vec::new();
        while let Ok(first) = rx.recv() {
            let mut next = Some(first);
            while let Some(job) = next.take() {
                match job {
                    Job::Append { ticket, room, msg } => batch.push((ticket, room, msg)),
                    Job::Reserve { room, upto } => {
                        let r = reserve.entry(room).or_insert(0);
                        *r = (*r).max(upto);
                    }
                    Job::Flush(reply) => flushes.push(reply),
                }
                if batch.len() < MAX_BATCH {
                    next = rx.try_recv().ok();
                }
            }
            if (!batch.is_empty() || !reserve.is_empty()) && !self.write(&mut batch, &mut reserve) {
                // Stopped while the store could not write: what is left is not stored.
                return;
            }
            for reply in flushes.drain(..) {
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
        batch: &mut Vec<(u64, String, StoredMessage)>,
        reserve: &mut HashMap<String, u64>,
    ) -> bool {
        let mut start = 0;
        let mut size = batch.len().max(1);
        let mut delay = FIRST_BACKOFF;
        loop {
            let end = (start + size).min(batch.len());
            match self.commit(&batch[start..end], reserve) {
                Ok(()) => {
                    self.publish(reserve);
                    if end > start {
                        self.shared
                            .durable
                            .store(batch[end - 1].0, Ordering::Release);
                    }
                    if !self.shared.writable.swap(true, Ordering::AcqRel) {
                        info!("history store writes again");
                        self.shared.changed.notify_all();
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
                        self.shared.changed.notify_all();
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

    fn commit(
        &mut self,
        batch: &[(u64, String, StoredMessage)],
        reserve: &HashMap<String, u64>,
    ) -> rusqlite::Result<()> {
        let tx = self.conn.transaction()?;
        for (room, &upto) in reserve {
            if !self.floors.contains_key(room) && !self.floors_full {
                let before: Option<i64> = tx
                    .query_row("SELECT reserved FROM rooms WHERE room = ?1", [room], |r| {
                        r.get(0)
                    })
                    .optional()?;
                if self.floors.len() >= MAX_GIVE_BACK {
                    self.floors_full = true;
                } else {
                    self.floors
                        .insert(room.clone(), before.unwrap_or(0).max(0) as u64);
                }
            }
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
            for (_, room, m) in batch {
                let data = m.data.as_ref().map(RawJson::get);
                stmt.execute(params![
                    room,
                    m.id as i64,
                    m.member,
                    m.message,
                    m.ts as i64,
                    data
                ])?;
            }
        }
        tx.commit()
    }

    /// Tells the loop which reservations are durable now.
    fn publish(&self, reserve: &mut HashMap<String, u64>) {
        if reserve.is_empty() {
            return;
        }
        let mut map = self.shared.reserved();
        for (room, upto) in reserve.drain() {
            // Only rooms the loop still caches: a forgotten one is read from the table again.
            if let Some(r) = map.get_mut(&room) {
                r.durable = r.durable.max(upto);
            }
        }
        drop(map);
        self.shared.changed.notify_all();
    }

    /// Lowers each mark this run raised to the highest stored id (never below where it was).
    fn give_back(&mut self) -> rusqlite::Result<()> {
        if self.floors.is_empty() {
            return Ok(());
        }
        let tx = self.conn.transaction()?;
        for (room, floor) in &self.floors {
            tx.prepare_cached(
                "UPDATE rooms SET reserved = MAX(?2,
                     COALESCE((SELECT MAX(id) FROM messages WHERE room = ?1), 0))
                 WHERE room = ?1",
            )?
            .execute(params![room, *floor as i64])?;
        }
        tx.commit()
    }
}

/// Merges committed rows and pending messages of one room into one map by id: a message both
/// committed and still pending (pruning is lazy) appears once.
fn merge(
    rows: Vec<StoredMessage>,
    pending: impl Iterator<Item = StoredMessage>,
) -> BTreeMap<u64, StoredMessage> {
    rows.into_iter().chain(pending).map(|m| (m.id, m)).collect()
}

impl HistoryStore for SqliteStore {
    fn last_id(&mut self, room: &str) -> Result<u64, StoreError> {
        let result = self.read_last_id(room);
        self.read_failed = result.is_err();
        result
    }

    fn append(&mut self, room: &str, msg: StoredMessage) -> u64 {
        // Pruned here too: a stream of broadcasts without request_id never asks `durable()`,
        // and `pending` must not keep what the disk already holds.
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
            warn!("history writer has stopped; message {ticket} stays in memory only");
        }
        ticket
    }

    fn durable(&mut self) -> u64 {
        self.prune_pending();
        self.shared.durable.load(Ordering::Acquire)
    }

    fn reserve(&mut self, room: &str, id: u64) -> Result<(), StoreError> {
        let mut map = self.shared.reserved();
        if !map.contains_key(room) {
            drop(map);
            let stored = self.stored_reservation(room)?;
            map = self.shared.reserved();
            if map.len() >= MAX_CACHED_ROOMS {
                map.clear();
            }
            map.entry(room.to_string()).or_insert(Reservation {
                durable: stored,
                asked: stored,
                floor: stored,
            });
        }
        let Some(r) = map.get_mut(room) else {
            return Err(StoreError("reservation lost".into()));
        };
        // Renewed once a quarter of the block is used (a small upsert in the next commit), so
        // that a busy room does not run out while the writer is in the middle of a commit.
        if id.saturating_add(ID_BLOCK * 3 / 4) > r.asked {
            let upto = id.saturating_add(ID_BLOCK - 1);
            r.asked = upto;
            let job = Job::Reserve {
                room: room.to_string(),
                upto,
            };
            if !self.send(job) {
                return Err(StoreError("the history writer has stopped".into()));
            }
        }
        let deadline = Instant::now() + RESERVE_WAIT;
        loop {
            if map.get(room).is_some_and(|r| r.durable >= id) {
                return Ok(());
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if !self.shared.writable.load(Ordering::Acquire) || left.is_zero() {
                return Err(StoreError(format!(
                    "message id {id} of room '{room}' cannot be made durable now"
                )));
            }
            map = self
                .shared
                .changed
                .wait_timeout(map, left)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
    }

    fn writable(&self) -> bool {
        self.shared.writable.load(Ordering::Acquire) && !self.read_failed
    }

    fn page(&mut self, room: &str, query: Query) -> Page {
        self.prune_pending();
        let in_room = |(_, r, _): &&(u64, String, StoredMessage)| r == room;
        match query {
            Query::Before { before, limit } => {
                let bound = before.unwrap_or(i64::MAX as u64).min(i64::MAX as u64);
                let rows = self.query(
                    "SELECT id, member, message, ts, data FROM messages
                     WHERE room = ?1 AND id < ?2 ORDER BY id DESC LIMIT ?3",
                    room,
                    bound,
                    limit.saturating_add(1),
                );
                let pending = self.pending.iter().filter(in_room).map(|(_, _, m)| m);
                let all = merge(rows, pending.filter(|m| m.id < bound).cloned());
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
                let rows = self.query(
                    "SELECT id, member, message, ts, data FROM messages
                     WHERE room = ?1 AND id > ?2 ORDER BY id ASC LIMIT ?3",
                    room,
                    after,
                    limit.saturating_add(1),
                );
                let pending = self.pending.iter().filter(in_room).map(|(_, _, m)| m);
                let all = merge(rows, pending.filter(|m| m.id > after).cloned());
                page_from_asc(
                    all.into_values().take(limit.saturating_add(1)).collect(),
                    limit,
                )
            }
        }
    }

    fn flush(&mut self) {
        let (tx, rx) = mpsc::channel();
        if self.send(Job::Flush(tx)) {
            let _ = rx.recv();
        }
        self.prune_pending();
    }

    fn close(&mut self, deadline: Instant) -> u64 {
        let (tx, rx) = mpsc::channel();
        if self.send(Job::Flush(tx)) {
            let _ = rx.recv_timeout(deadline.saturating_duration_since(Instant::now()));
        }
        self.stop_writer(Some(deadline.max(Instant::now()) + STOP_WAIT));
        self.prune_pending();
        self.tickets - self.shared.durable.load(Ordering::Acquire)
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
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicUsize;

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
}
