//! One suite that every history store must pass: the in-memory ring and SQLite.

use chatterbox::store::memory::MemoryStore;
use chatterbox::store::{HistoryStore, Page, Query, StoredMessage};
use serde_json::json;

fn msg(id: u64) -> StoredMessage {
    StoredMessage {
        id,
        member: "m".into(),
        message: format!("text {id}"),
        ts: 1000 + id,
        data: (id % 2 == 0)
            .then(|| json!({"n": id, "nested": [1, {"a": null}], "s": "é\u{1F600}"}).into()),
    }
}

fn ids(page: &Page) -> Vec<u64> {
    page.messages.iter().map(|m| m.id).collect()
}

/// Appends, pages in both directions, keeps rooms apart, keeps fields verbatim, flushes.
fn contract(store: &mut dyn HistoryStore) {
    assert_eq!(store.last_id("a"), Ok(0));
    assert_eq!(
        store.page(
            "a",
            Query::Before {
                before: None,
                limit: 10
            }
        ),
        Page::default()
    );
    let mut last_ticket = 0;
    for id in 1..=10 {
        let t = store.append("a", msg(id));
        assert!(t > last_ticket, "tickets grow");
        last_ticket = t;
    }
    store.append("b", msg(1));
    assert_eq!(store.last_id("a"), Ok(10));
    assert_eq!(store.last_id("b"), Ok(1));

    let p = store.page(
        "a",
        Query::Before {
            before: None,
            limit: 3,
        },
    );
    assert_eq!((ids(&p), p.more), (vec![8, 9, 10], true));
    let p = store.page(
        "a",
        Query::Before {
            before: Some(4),
            limit: 3,
        },
    );
    assert_eq!((ids(&p), p.more), (vec![1, 2, 3], false));
    let p = store.page(
        "a",
        Query::Before {
            before: Some(4),
            limit: 5,
        },
    );
    assert_eq!((ids(&p), p.more), (vec![1, 2, 3], false));
    let p = store.page(
        "a",
        Query::Before {
            before: Some(1),
            limit: 5,
        },
    );
    assert_eq!((ids(&p), p.more), (vec![], false));
    let p = store.page(
        "a",
        Query::After {
            after: 7,
            limit: 10,
        },
    );
    assert_eq!((ids(&p), p.more), (vec![8, 9, 10], false));
    let p = store.page("a", Query::After { after: 2, limit: 3 });
    assert_eq!((ids(&p), p.more), (vec![3, 4, 5], true));
    assert_eq!(p.messages[1], msg(4), "fields and data survive verbatim");
    let p = store.page(
        "a",
        Query::After {
            after: 10,
            limit: 3,
        },
    );
    assert_eq!((ids(&p), p.more), (vec![], false));
    assert_eq!(
        ids(&store.page(
            "b",
            Query::Before {
                before: None,
                limit: 9
            }
        )),
        vec![1]
    );
    let huge = store.page(
        "a",
        Query::After {
            after: 0,
            limit: usize::MAX,
        },
    );
    assert_eq!(
        ids(&huge).len(),
        10,
        "a huge limit neither overflows nor loses messages"
    );

    assert!(store.writable(), "a healthy store takes messages");
    assert_eq!(
        store.reserve("a", 11),
        Ok(()),
        "the next id may be handed out"
    );
    assert_eq!(store.last_id("a"), Ok(10), "a reservation is not a message");

    store.flush();
    assert!(
        store.durable() >= last_ticket,
        "flush makes everything durable"
    );
    let p = store.page(
        "a",
        Query::Before {
            before: None,
            limit: 100,
        },
    );
    assert_eq!(
        ids(&p),
        (1..=10).collect::<Vec<_>>(),
        "no duplicates once durable"
    );
    assert_eq!(p.messages[9], msg(10));
}

#[test]
fn memory_store_passes_the_contract() {
    contract(&mut MemoryStore::new(100));
}

/// Any engine as a blocking store, for this suite only: each call is a request, and waits
/// for its reply. (The server never blocks on an engine; the suite checks what the answers
/// are, whichever way they are waited for.)
#[cfg(feature = "sqlite")]
struct Blocking<E> {
    engine: E,
    tickets: u64,
    durable: u64,
}

#[cfg(feature = "sqlite")]
impl<E: chatterbox::store::engine::Engine> Blocking<E> {
    fn new(engine: E) -> Self {
        Blocking {
            engine,
            tickets: 0,
            durable: 0,
        }
    }
    fn drain(&mut self) {
        use chatterbox::store::engine::Reply;
        while let Some(r) = self.engine.poll() {
            match r {
                Reply::DurableUpTo(t) => self.durable = self.durable.max(t),
                other => panic!("a reply nobody asked for: {other:?}"),
            }
        }
    }
    fn ask(&mut self, req: chatterbox::store::engine::Request) -> chatterbox::store::engine::Reply {
        use chatterbox::store::engine::Reply;
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
        self.engine.request(req);
        loop {
            match self.engine.poll() {
                Some(Reply::DurableUpTo(t)) => self.durable = self.durable.max(t),
                Some(reply) => return reply,
                None => {
                    assert!(std::time::Instant::now() < deadline, "no reply");
                    std::thread::sleep(std::time::Duration::from_millis(1));
                }
            }
        }
    }
}

#[cfg(feature = "sqlite")]
impl<E: chatterbox::store::engine::Engine> HistoryStore for Blocking<E> {
    fn last_id(&mut self, room: &str) -> Result<u64, chatterbox::store::StoreError> {
        use chatterbox::store::engine::{Reply, Request};
        let room = room.to_string();
        match self.ask(Request::LastId { token: 1, room }) {
            Reply::LastId { last_id, .. } => Ok(last_id),
            Reply::Unavailable { error, .. } => Err(error),
            other => panic!("{other:?}"),
        }
    }
    fn append(&mut self, room: &str, msg: StoredMessage) -> u64 {
        let room = room.to_string();
        self.engine
            .request(chatterbox::store::engine::Request::Append { room, msg });
        self.tickets += 1;
        self.tickets
    }
    fn durable(&mut self) -> u64 {
        self.drain();
        self.durable
    }
    fn page(&mut self, room: &str, query: Query) -> Page {
        use chatterbox::store::engine::{Reply, Request};
        let room = room.to_string();
        match self.ask(Request::Page {
            token: 2,
            room,
            query,
        }) {
            Reply::PageReady { page, .. } => page,
            other => panic!("{other:?}"),
        }
    }
    fn flush(&mut self) {
        self.engine.flush();
        self.drain();
    }
    fn reserve(&mut self, room: &str, id: u64) -> Result<(), chatterbox::store::StoreError> {
        use chatterbox::store::engine::{Reply, Request};
        let room = room.to_string();
        match self.ask(Request::Reserve { token: 3, room, id }) {
            Reply::IdsReserved { up_to, .. } if up_to >= id => Ok(()),
            Reply::Unavailable { error, .. } => Err(error),
            other => panic!("{other:?}"),
        }
    }
    fn writable(&self) -> bool {
        self.engine.writable()
    }
}

#[cfg(feature = "sqlite")]
#[test]
fn sqlite_store_passes_the_contract() {
    use chatterbox::store::sqlite::SqliteStore;
    let dir = std::env::temp_dir().join(format!("chatterbox-store-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("h.db").to_string_lossy().into_owned();
    contract(&mut Blocking::new(
        SqliteStore::open(&path, Box::new(|| {})).unwrap(),
    ));
    // The same messages, read back by a fresh process's store.
    let mut reopened = Blocking::new(SqliteStore::open(&path, Box::new(|| {})).unwrap());
    let p = reopened.page(
        "a",
        Query::After {
            after: 0,
            limit: 100,
        },
    );
    assert_eq!(p.messages, (1..=10).map(msg).collect::<Vec<_>>());
    let _ = std::fs::remove_dir_all(&dir);
}
