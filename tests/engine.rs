//! One contract that every history engine must pass (see `chatterbox::store::engine`): the
//! memory engine and the SQLite one, driven only through `request` and `poll`.

use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use chatterbox::store::engine::{Engine, Immediate, Reply, Request};
use chatterbox::store::{Page, Query, StoredMessage};
use serde_json::json;

/// Far more than any reply takes; only turns a hang into a failure.
const PATIENCE: Duration = Duration::from_secs(20);

fn msg(id: u64) -> StoredMessage {
    StoredMessage {
        id,
        member: "m".into(),
        message: format!("text {id}"),
        ts: 1000 + id,
        data: (id % 2 == 0).then(|| json!({"n": id, "s": "é\u{1F600}"}).into()),
    }
}

fn ids(page: &Page) -> Vec<u64> {
    page.messages.iter().map(|m| m.id).collect()
}

/// Counts `notify` calls so a test can sleep until the engine has something, as the loop does.
#[derive(Clone, Default)]
struct Wakeups(Arc<(Mutex<u64>, Condvar)>);

impl Wakeups {
    fn notify(&self) -> Box<dyn Fn() + Send> {
        let me = self.clone();
        Box::new(move || {
            let (n, cv) = &*me.0;
            *n.lock().unwrap() += 1;
            cv.notify_all();
        })
    }

    fn count(&self) -> u64 {
        *self.0.0.lock().unwrap()
    }

    /// Waits until the count moves past `seen`; false at the deadline.
    fn wait_past(&self, seen: u64, deadline: Instant) -> bool {
        let (n, cv) = &*self.0;
        let mut n = n.lock().unwrap();
        while *n == seen {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return false;
            }
            n = cv.wait_timeout(n, left).unwrap().0;
        }
        true
    }
}

/// An engine under test and the wake-ups it gives.
struct Driver {
    engine: Box<dyn Engine>,
    wakeups: Wakeups,
    /// The highest `DurableUpTo` seen.
    durable: u64,
}

impl Driver {
    /// Polls (sleeping on `notify` between rounds, as the loop does) until `n` replies other
    /// than `DurableUpTo` came; those are returned in order.
    fn replies(&mut self, n: usize) -> Vec<Reply> {
        let deadline = Instant::now() + PATIENCE;
        let mut got = Vec::new();
        loop {
            let seen = self.wakeups.count();
            while let Some(reply) = self.engine.poll() {
                match reply {
                    Reply::DurableUpTo(t) => {
                        assert!(t > self.durable, "DurableUpTo only grows");
                        self.durable = t;
                    }
                    other => got.push(other),
                }
            }
            if got.len() >= n {
                assert_eq!(got.len(), n, "more replies than requests: {got:?}");
                return got;
            }
            assert!(
                self.wakeups.wait_past(seen, deadline),
                "no reply within {PATIENCE:?}: got {got:?}"
            );
        }
    }

    /// Polls until every append up to `ticket` is reported durable.
    fn durable_up_to(&mut self, ticket: u64) {
        let deadline = Instant::now() + PATIENCE;
        while self.durable < ticket {
            let seen = self.wakeups.count();
            while let Some(reply) = self.engine.poll() {
                match reply {
                    Reply::DurableUpTo(t) => self.durable = t,
                    other => panic!("unexpected {other:?}"),
                }
            }
            if self.durable < ticket {
                assert!(self.wakeups.wait_past(seen, deadline), "never durable");
            }
        }
    }

    fn append(&mut self, room: &str, id: u64) {
        self.engine.request(Request::Append {
            room: room.into(),
            msg: msg(id),
        });
    }

    fn page(&mut self, token: u64, room: &str, query: Query) {
        self.engine.request(Request::Page {
            token,
            room: room.into(),
            query,
        });
    }
}

fn page_of(reply: &Reply) -> (u64, &str, &Page) {
    match reply {
        Reply::PageReady { token, room, page } => (*token, room.as_str(), page),
        other => panic!("expected a page, got {other:?}"),
    }
}

const NEWEST_3: Query = Query::Before {
    before: None,
    limit: 3,
};

fn contract(mut d: Driver) {
    // Nothing yet: an empty page, last id 0.
    d.page(1, "a", NEWEST_3);
    d.engine.request(Request::LastId {
        token: 2,
        room: "a".into(),
    });
    let r = d.replies(2);
    assert_eq!(page_of(&r[0]), (1, "a", &Page::default()));
    assert_eq!(
        r[1],
        Reply::LastId {
            token: 2,
            room: "a".into(),
            last_id: 0
        }
    );

    // Appends, then pages asked at once: they include the appends (nothing need be durable).
    for id in 1..=10 {
        d.append("a", id);
    }
    for id in 1..=3 {
        d.append("b", id);
    }
    d.page(10, "a", NEWEST_3);
    d.page(11, "b", Query::After { after: 0, limit: 9 });
    d.page(
        12,
        "a",
        Query::Before {
            before: Some(4),
            limit: 3,
        },
    );
    d.page(13, "a", Query::After { after: 2, limit: 3 });
    d.page(
        14,
        "b",
        Query::Before {
            before: Some(1),
            limit: 5,
        },
    );
    d.engine.request(Request::LastId {
        token: 15,
        room: "a".into(),
    });
    let r = d.replies(6);
    let tokens_of = |room: &str| {
        r.iter()
            .filter_map(|reply| match reply {
                Reply::PageReady { token, room: r, .. } | Reply::LastId { token, room: r, .. }
                    if r == room =>
                {
                    Some(*token)
                }
                _ => None,
            })
            .collect::<Vec<_>>()
    };
    assert_eq!(
        tokens_of("a"),
        vec![10, 12, 13, 15],
        "room a in request order"
    );
    assert_eq!(tokens_of("b"), vec![11, 14], "room b in request order");
    let by_token = |t: u64| {
        r.iter()
            .find(|reply| match reply {
                Reply::PageReady { token, .. } | Reply::LastId { token, .. } => *token == t,
                _ => false,
            })
            .expect("every token answered")
    };
    let p = page_of(by_token(10)).2;
    assert_eq!((ids(p), p.more), (vec![8, 9, 10], true));
    assert_eq!(p.messages[2], msg(10), "fields and data verbatim");
    let p = page_of(by_token(11)).2;
    assert_eq!((ids(p), p.more), (vec![1, 2, 3], false), "rooms kept apart");
    let p = page_of(by_token(12)).2;
    assert_eq!((ids(p), p.more), (vec![1, 2, 3], false));
    let p = page_of(by_token(13)).2;
    assert_eq!((ids(p), p.more), (vec![3, 4, 5], true));
    let p = page_of(by_token(14)).2;
    assert_eq!((ids(p), p.more), (vec![], false));
    assert_eq!(
        by_token(15),
        &Reply::LastId {
            token: 15,
            room: "a".into(),
            last_id: 10
        },
        "a last id asked right after appends sees them"
    );

    // Each page asked right after an append holds it, however the writer's commits fall.
    for id in 11..=200 {
        d.append("a", id);
        d.page(
            id,
            "a",
            Query::After {
                after: id - 1,
                limit: 1,
            },
        );
    }
    for (reply, id) in d.replies(190).iter().zip(11..) {
        let (token, room, page) = page_of(reply);
        assert_eq!((token, room), (id, "a"), "in request order");
        assert_eq!(ids(page), vec![id], "page {token} lacks its append");
    }

    // Reservations: each answered once, in order per room, covering the id asked for.
    for (token, id) in [(300, 201), (301, 202), (302, 203)] {
        d.engine.request(Request::Reserve {
            token,
            room: "a".into(),
            id,
        });
    }
    d.engine.request(Request::Reserve {
        token: 303,
        room: "fresh".into(),
        id: 1,
    });
    let r = d.replies(4);
    let reserved: Vec<(u64, String, u64)> = r
        .into_iter()
        .map(|reply| match reply {
            Reply::IdsReserved { token, room, up_to } => (token, room, up_to),
            other => panic!("a healthy engine reserves: {other:?}"),
        })
        .collect();
    let for_a: Vec<u64> = reserved
        .iter()
        .filter(|(_, room, _)| room == "a")
        .map(|(t, _, _)| *t)
        .collect();
    assert_eq!(for_a, vec![300, 301, 302]);
    for (token, _, up_to) in &reserved {
        let asked = match token {
            300 => 201,
            301 => 202,
            302 => 203,
            _ => 1,
        };
        assert!(*up_to >= asked, "reply {token} covers {up_to} < {asked}");
    }
    d.engine.request(Request::LastId {
        token: 304,
        room: "fresh".into(),
    });
    assert_eq!(
        d.replies(1),
        vec![Reply::LastId {
            token: 304,
            room: "fresh".into(),
            last_id: 0
        }],
        "a reservation is not a message: a room back in memory starts right after its last"
    );

    // Durable: every append reported, and the history reads the same, without duplicates.
    assert!(d.engine.writable(), "a healthy engine stores");
    d.durable_up_to(203);
    d.engine.flush();
    d.page(
        400,
        "a",
        Query::Before {
            before: None,
            limit: 1000,
        },
    );
    let r = d.replies(1);
    let p = page_of(&r[0]).2;
    assert_eq!(ids(p), (1..=200).collect::<Vec<_>>(), "no duplicates");
    assert_eq!(p.messages, (1..=200).map(msg).collect::<Vec<_>>());

    // Closed: nothing left unstored, and every later request is answered, not left hanging.
    assert_eq!(d.engine.close(Instant::now() + PATIENCE), 0);
    assert!(!d.engine.writable());
    d.page(500, "a", NEWEST_3);
    d.engine.request(Request::Reserve {
        token: 501,
        room: "a".into(),
        id: 201,
    });
    let r = d.replies(2);
    assert!(
        matches!(&r[0], Reply::Unavailable { token: 500, room, .. } if room == "a"),
        "{r:?}"
    );
    assert!(
        matches!(&r[1], Reply::Unavailable { token: 501, .. }),
        "{r:?}"
    );
}

#[test]
fn memory_engine_passes_the_contract() {
    contract(Driver {
        engine: Box::new(Immediate::memory(1000)),
        wakeups: Wakeups::default(),
        durable: 0,
    });
}

#[test]
fn the_memory_engine_needs_no_wake_up() {
    let wakeups = Wakeups::default();
    let mut e =
        chatterbox::store::open_engine(":memory:", 10, Default::default(), wakeups.notify())
            .unwrap();
    e.request(Request::Append {
        room: "r".into(),
        msg: msg(1),
    });
    e.request(Request::Page {
        token: 1,
        room: "r".into(),
        query: NEWEST_3,
    });
    let replies: Vec<Reply> = std::iter::from_fn(|| e.poll()).collect();
    assert!(
        replies
            .iter()
            .any(|r| matches!(r, Reply::PageReady { token: 1, page, .. } if ids(page) == vec![1])),
        "answered in the same turn: {replies:?}"
    );
    assert_eq!(wakeups.count(), 0);
}

#[cfg(feature = "sqlite")]
mod sqlite {
    use super::*;
    use chatterbox::store::sqlite::SqliteStore;

    fn temp_db(name: &str) -> (std::path::PathBuf, String) {
        let dir =
            std::env::temp_dir().join(format!("chatterbox-engine-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("h.db").to_string_lossy().into_owned();
        (dir, path)
    }

    fn open(path: &str) -> Driver {
        let wakeups = Wakeups::default();
        let engine =
            chatterbox::store::open_engine(path, 10, Default::default(), wakeups.notify()).unwrap();
        Driver {
            engine,
            wakeups,
            durable: 0,
        }
    }

    fn sql(path: &str, batch: &str) {
        rusqlite::Connection::open(path)
            .unwrap()
            .execute_batch(batch)
            .unwrap();
    }

    #[test]
    fn sqlite_engine_passes_the_contract() {
        let (dir, path) = temp_db("contract");
        contract(open(&path));
        // What it stored, a fresh process reads back.
        let mut d = open(&path);
        d.page(
            1,
            "a",
            Query::After {
                after: 0,
                limit: 1000,
            },
        );
        let r = d.replies(1);
        assert_eq!(
            page_of(&r[0]).2.messages,
            (1..=200).map(msg).collect::<Vec<_>>()
        );
        drop(d);
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn a_store_that_cannot_read_answers_unavailable() {
        let (dir, path) = temp_db("readfail");
        let mut d = open(&path);
        d.append("r", 1);
        d.engine.flush();
        sql(&path, "ALTER TABLE messages RENAME TO gone;");
        d.page(1, "r", NEWEST_3);
        d.engine.request(Request::LastId {
            token: 2,
            room: "r".into(),
        });
        let r = d.replies(2);
        assert!(
            matches!(&r[0], Reply::Unavailable { token: 1, room, .. } if room == "r"),
            "a failed read is not an empty page: {r:?}"
        );
        assert!(
            matches!(&r[1], Reply::Unavailable { token: 2, .. }),
            "a failed read is not an empty room: {r:?}"
        );
        assert!(
            !d.engine.writable(),
            "a store that cannot number messages is not available"
        );
        sql(&path, "ALTER TABLE gone RENAME TO messages;");
        d.engine.request(Request::LastId {
            token: 3,
            room: "r".into(),
        });
        assert_eq!(
            d.replies(1),
            vec![Reply::LastId {
                token: 3,
                room: "r".into(),
                last_id: 1
            }]
        );
        assert!(d.engine.writable(), "a read that works again clears it");
        drop(d);
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn a_reservation_that_cannot_be_written_answers_unavailable_then_recovers() {
        let (dir, path) = temp_db("reservefail");
        let mut d = open(&path);
        sql(&path, "ALTER TABLE rooms RENAME TO gone;");
        d.engine.request(Request::Reserve {
            token: 1,
            room: "r".into(),
            id: 1,
        });
        let r = d.replies(1);
        assert!(
            matches!(&r[0], Reply::Unavailable { token: 1, room, .. } if room == "r"),
            "{r:?}"
        );
        assert!(!d.engine.writable());
        sql(&path, "ALTER TABLE gone RENAME TO rooms;");
        // The writer retries on its own (its commit wakes the loop) and writes again.
        let deadline = Instant::now() + PATIENCE;
        while !d.engine.writable() {
            let seen = d.wakeups.count();
            while d.engine.poll().is_some() {}
            if !d.engine.writable() {
                assert!(d.wakeups.wait_past(seen, deadline), "never writes again");
            }
        }
        d.engine.request(Request::Reserve {
            token: 2,
            room: "r".into(),
            id: 1,
        });
        let r = d.replies(1);
        assert!(
            matches!(&r[0], Reply::IdsReserved { token: 2, up_to, .. } if *up_to >= 1),
            "{r:?}"
        );
        assert!(d.engine.writable());
        drop(d);
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn a_restart_after_a_crash_continues_above_the_reservation() {
        let (dir, path) = temp_db("crash");
        let mut d = open(&path);
        d.engine.request(Request::Reserve {
            token: 1,
            room: "r".into(),
            id: 1,
        });
        let r = d.replies(1);
        let Reply::IdsReserved { up_to, .. } = r[0] else {
            panic!("{r:?}");
        };
        d.append("r", 1);
        d.engine.flush();
        // A crash: the writer never gives the unused ids back.
        std::mem::forget(d);
        let mut d = open(&path);
        d.engine.request(Request::LastId {
            token: 2,
            room: "r".into(),
        });
        let r = d.replies(1);
        assert!(
            matches!(r[0], Reply::LastId { last_id, .. } if last_id >= up_to),
            "ids up to {up_to} may have been delivered: {r:?}"
        );
        drop(d);
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn closing_joins_the_engine_threads() {
        let (dir, path) = temp_db("close");
        let alive = Arc::new(());
        let theirs = alive.clone();
        let mut e = SqliteStore::open(&path, Box::new(move || drop(theirs.clone()))).unwrap();
        let e: &mut dyn Engine = &mut e;
        e.request(Request::Append {
            room: "r".into(),
            msg: msg(1),
        });
        e.request(Request::Page {
            token: 1,
            room: "r".into(),
            query: NEWEST_3,
        });
        assert!(Arc::strong_count(&alive) > 1, "the threads hold notify");
        assert_eq!(e.close(Instant::now() + PATIENCE), 0);
        assert_eq!(
            Arc::strong_count(&alive),
            1,
            "close returned before the reader and writer threads ended"
        );
        let replies: Vec<Reply> = std::iter::from_fn(|| e.poll()).collect();
        assert!(
            replies.iter().any(
                |r| matches!(r, Reply::PageReady { token: 1, page, .. } if ids(page) == vec![1])
            ),
            "a read in hand at close is answered: {replies:?}"
        );
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn a_locked_writer_blocks_neither_the_caller_nor_reads() {
        let (dir, path) = temp_db("nowait");
        let mut d = open(&path);
        // Another process holds the write lock: the writer cannot commit until it lets go.
        let other = rusqlite::Connection::open(&path).unwrap();
        other.execute_batch("BEGIN EXCLUSIVE;").unwrap();
        for id in 1..=3 {
            d.engine.request(Request::Reserve {
                token: id,
                room: "r".into(),
                id,
            });
        }
        let now: Vec<Reply> = std::iter::from_fn(|| d.engine.poll()).collect();
        assert_eq!(
            now,
            vec![],
            "answered before the reservation could be committed"
        );
        // Reads go on while the writer waits, and see what waits with it.
        d.append("r", 1);
        d.page(10, "r", NEWEST_3);
        let r = d.replies(1);
        assert_eq!(
            ids(page_of(&r[0]).2),
            vec![1],
            "a page includes an append not yet stored"
        );
        assert_eq!(d.durable, 0, "nothing could be committed");
        other.execute_batch("COMMIT;").unwrap();
        let r = d.replies(3);
        let tokens: Vec<u64> = r
            .iter()
            .map(|reply| match reply {
                Reply::IdsReserved { token, up_to, .. } if *up_to >= *token => *token,
                other => panic!("{other:?}"),
            })
            .collect();
        assert_eq!(tokens, vec![1, 2, 3], "in request order");
        let Reply::IdsReserved { up_to, .. } = r[0] else {
            unreachable!()
        };
        assert!(up_to > 3, "reserved ahead: {up_to}");
        d.durable_up_to(1);
        // Held now: the next ids are answered in the same turn.
        for id in 4..=up_to.min(50) {
            d.engine.request(Request::Reserve {
                token: id,
                room: "r".into(),
                id,
            });
            let now: Vec<Reply> = std::iter::from_fn(|| d.engine.poll())
                .filter(|r| !matches!(r, Reply::DurableUpTo(_)))
                .collect();
            assert!(
                matches!(&now[..], [Reply::IdsReserved { token, up_to: u, .. }] if *token == id && *u >= id),
                "id {id}: {now:?}"
            );
        }
        drop(d);
        let _ = std::fs::remove_dir_all(&dir);
    }
}
