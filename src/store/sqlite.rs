//! The SQLite history store: durable across `kill -9`, committed in batches off the event loop.
//!
//! Appends go through a channel to one writer thread, which takes everything queued, writes it in
//! one transaction (group commit), publishes the highest committed ticket and calls `notify` so
//! the event loop sends the acks that became due. Until then a message is held in `pending`, so
//! that pages read on the loop thread (through a second, read-only connection in WAL mode) see
//! every message appended so far, committed or not.

use std::collections::{BTreeMap, VecDeque};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc;
use std::thread;
use std::time::Duration;

use log::{error, warn};
use rusqlite::{Connection, OpenFlags, params};

use super::{HistoryStore, Page, Query, StoredMessage, page_from_asc, page_from_desc};
use crate::chat::protocol::RawJson;

/// Most messages written in one transaction.
const MAX_BATCH: usize = 4096;

enum Job {
    Append {
        ticket: u64,
        room: String,
        msg: StoredMessage,
    },
    Flush(mpsc::Sender<()>),
}

/// History in a SQLite file (WAL journal, `synchronous=FULL`).
pub struct SqliteStore {
    reader: Connection,
    jobs: Option<mpsc::Sender<Job>>,
    writer: Option<thread::JoinHandle<()>>,
    durable: Arc<AtomicU64>,
    tickets: u64,
    /// Appended, not yet known to be committed: `(ticket, room, message)` in append order.
    pending: VecDeque<(u64, String, StoredMessage)>,
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
";

impl SqliteStore {
    /// Opens (creating when needed) the database at `path` and starts the writer thread.
    pub fn open(path: &str, notify: Box<dyn Fn() + Send>) -> rusqlite::Result<Self> {
        let writer_conn = Connection::open(path)?;
        writer_conn.execute_batch(SCHEMA)?;
        writer_conn.busy_timeout(Duration::from_secs(5))?;
        let reader = Connection::open_with_flags(
            path,
            OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX,
        )?;
        reader.busy_timeout(Duration::from_secs(1))?;
        // Pages are read by primary key and the OS caches the file: a small cache keeps an idle
        // server small (256 KiB at most per connection).
        reader.execute_batch("PRAGMA cache_size = -256;")?;
        let durable = Arc::new(AtomicU64::new(0));
        let (tx, rx) = mpsc::channel();
        let shared = durable.clone();
        let writer = thread::Builder::new()
            .name("history-writer".into())
            // The writer only loops over SQLite calls; it needs nothing like the default 2 MiB.
            .stack_size(256 * 1024)
            .spawn(move || write_loop(writer_conn, rx, shared, notify))
            .map_err(|e| rusqlite::Error::ToSqlConversionFailure(Box::new(e)))?;
        Ok(SqliteStore {
            reader,
            jobs: Some(tx),
            writer: Some(writer),
            durable,
            tickets: 0,
            pending: VecDeque::new(),
        })
    }

    fn prune_pending(&mut self) {
        let done = self.durable.load(Ordering::Acquire);
        while self.pending.front().is_some_and(|(t, _, _)| *t <= done) {
            self.pending.pop_front();
        }
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
}

fn write_loop(
    mut conn: Connection,
    rx: mpsc::Receiver<Job>,
    durable: Arc<AtomicU64>,
    notify: Box<dyn Fn() + Send>,
) {
    let mut batch = Vec::new();
    let mut flushes = Vec::new();
    while let Ok(first) = rx.recv() {
        let mut next = Some(first);
        while let Some(job) = next.take() {
            match job {
                Job::Append { ticket, room, msg } => batch.push((ticket, room, msg)),
                Job::Flush(reply) => flushes.push(reply),
            }
            if batch.len() < MAX_BATCH {
                next = rx.try_recv().ok();
            }
        }
        if let Some(&(last, _, _)) = batch.last() {
            // A failed commit (disk full, I/O error) is retried: nothing is acked until it lands.
            let mut delay = Duration::from_millis(50);
            while let Err(e) = commit(&mut conn, &batch) {
                error!(
                    "history commit of {} messages failed, retrying: {e}",
                    batch.len()
                );
                thread::sleep(delay);
                delay = (delay * 2).min(Duration::from_secs(2));
            }
            durable.store(last, Ordering::Release);
            batch.clear();
            notify();
        }
        for reply in flushes.drain(..) {
            let _ = reply.send(());
        }
    }
}

fn commit(conn: &mut Connection, batch: &[(u64, String, StoredMessage)]) -> rusqlite::Result<()> {
    let tx = conn.transaction()?;
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

/// Merges committed rows and pending messages of one room into one map by id: a message both
/// committed and still pending (pruning is lazy) appears once.
fn merge(
    rows: Vec<StoredMessage>,
    pending: impl Iterator<Item = StoredMessage>,
) -> BTreeMap<u64, StoredMessage> {
    rows.into_iter().chain(pending).map(|m| (m.id, m)).collect()
}

impl HistoryStore for SqliteStore {
    fn last_id(&mut self, room: &str) -> u64 {
        self.prune_pending();
        if let Some((_, _, m)) = self.pending.iter().rev().find(|(_, r, _)| r == room) {
            return m.id;
        }
        self.reader
            .query_row(
                "SELECT MAX(id) FROM messages WHERE room = ?1",
                [room],
                |row| row.get::<_, Option<i64>>(0),
            )
            .map(|v| v.unwrap_or(0) as u64)
            .unwrap_or_else(|e| {
                error!("history read failed for room '{room}': {e}");
                0
            })
    }

    fn append(&mut self, room: &str, msg: StoredMessage) -> u64 {
        // Pruned here too: a stream of broadcasts without request_id never asks `durable()`,
        // and `pending` must not keep what the disk already holds.
        self.prune_pending();
        self.tickets += 1;
        let ticket = self.tickets;
        self.pending
            .push_back((ticket, room.to_string(), msg.clone()));
        if let Some(jobs) = &self.jobs {
            if jobs
                .send(Job::Append {
                    ticket,
                    room: room.to_string(),
                    msg,
                })
                .is_err()
            {
                warn!("history writer has stopped; message {ticket} stays in memory only");
            }
        }
        ticket
    }

    fn durable(&mut self) -> u64 {
        self.prune_pending();
        self.durable.load(Ordering::Acquire)
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
        if let Some(jobs) = &self.jobs {
            let (tx, rx) = mpsc::channel();
            if jobs.send(Job::Flush(tx)).is_ok() {
                let _ = rx.recv();
            }
        }
        self.prune_pending();
    }
}

impl Drop for SqliteStore {
    fn drop(&mut self) {
        // Closing the channel ends the writer after it has committed what was queued.
        self.jobs = None;
        if let Some(writer) = self.writer.take() {
            let _ = writer.join();
        }
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
        assert_eq!(s.last_id("r"), 5);
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
        assert_eq!(s.last_id("r"), 100);
    }

    #[test]
    fn pending_is_pruned_by_appends_alone() {
        let path = temp_db("prune");
        let mut s = SqliteStore::open(&path, Box::new(|| {})).unwrap();
        for id in 1..=1000 {
            s.append("r", super::super::test_message(id));
        }
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while s.durable.load(Ordering::Acquire) < 1000 {
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
}
