//! The engine boundary: how the chat core talks to history, asynchronously by construction.
//!
//! This is the one place the boundary is described. Every engine (memory, SQLite, and the
//! Redis cluster engine still to come) implements [`Engine`] exactly as written here.
//!
//! # Shape
//!
//! The core never waits for an engine. It hands requests in with [`Engine::request`], which
//! returns at once and does no I/O on the calling thread, and it takes replies out with
//! [`Engine::poll`] until that returns `None` — the way `quinn-proto` takes input and hands out
//! effects. Replies are inputs to the core like bytes from a socket.
//!
//! - Replies that an engine can give without I/O (everything the memory engine says, a
//!   reservation the SQLite engine already holds) are queued during `request` itself: **the core
//!   polls until `None` after every batch of requests**, before it goes back to waiting for
//!   events.
//! - Replies produced on another thread (a page read by the SQLite reader thread, a commit of
//!   the writer thread, the writer failing) are announced by calling the `notify` callback given
//!   when the engine was opened, from that thread. The server's `notify` wakes the `mio` loop
//!   through its `Waker`; the loop then polls. `notify` may be called more often than there are
//!   replies (spurious wake-ups are fine), never less.
//!
//! # Requests
//!
//! Requests that get a reply of their own carry a [`RequestToken`] that the core chooses and
//! the reply echoes; the engine does not interpret it (it need not be unique, but the core's
//! life is easier when it is).
//!
//! | request | reply | meaning |
//! |---|---|---|
//! | [`Request::Append`] | [`Reply::DurableUpTo`], later | store this message. Appends are numbered by the engine in the order it takes them: the n-th `Append` has **ticket** n (1, 2, 3, …); the core counts them the same way and gets no reply per append |
//! | [`Request::Page`] | [`Reply::PageReady`] or [`Reply::Unavailable`] | a page of a room's history ([`Query`]), ascending by id |
//! | [`Request::LastId`] | [`Reply::LastId`] or [`Reply::Unavailable`] | the highest id that may already have been handed out in the room (stored, queued or reserved by an earlier run); the room's next message gets one more. Asked when a room comes into memory |
//! | [`Request::Reserve`] | [`Reply::IdsReserved`] or [`Reply::Unavailable`] | may id `id` be handed out in the room? |
//! | `Request::Remove` (feature `server-api`) | none | take messages out of the room's history (`Removal`), in order with the appends: every `Page` asked after it leaves them out, and a restart does not bring them back once the next commit landed. Their ids stay taken (a tombstone keeps the highest): `LastId` never goes down. It gets no ticket |
//!
//! # Replies
//!
//! - [`Reply::PageReady`]`{ token, room, page }`: the page asked for with `token`.
//! - [`Reply::LastId`]`{ token, room, last_id }`: the answer to `LastId`.
//! - [`Reply::DurableUpTo`]`(t)`: every append with a ticket up to `t` is **durable**. It only
//!   grows; engines coalesce (one reply may cover many appends, and none is sent while nothing
//!   new became durable). It may come between any two other replies.
//! - [`Reply::IdsReserved`]`{ token, room, up_to }`: every id of `room` up to `up_to` (at least
//!   the `id` asked for) may be handed out: a restart, even after a crash, starts above it.
//! - [`Reply::Unavailable`]`{ token, room, error }`: the request with `token` cannot be answered
//!   now (a read failed, the store cannot write, the engine is stopping or stopped). Nothing was
//!   changed, nothing is guessed (an unreadable room is never reported empty), and no other reply
//!   will come for that token. The core tells the client `unavailable` ("retry later"), except
//!   for a join page, which gives an empty `history` (the join is not refused for it; see
//!   docs/PROTOCOL.md); retrying is the client's business.
//!
//! Every request with a token gets **exactly one** reply, even when the store fails (then
//! `Unavailable`) or the engine is closed (then `Unavailable` at once). An engine never leaves
//! a request hanging.
//!
//! # Durable
//!
//! Durable means "a restart finds it": for SQLite, committed with `synchronous=FULL`, so it
//! survives `kill -9` and power loss; for the memory engine, appended (its history does not
//! outlive the process, so that is all durability can mean there); for a cluster engine,
//! acknowledged by the shared store. The core sends a broadcast's `ack` only after
//! `DurableUpTo` covers its ticket. [`Engine::writable`] says whether appends are being stored
//! now; the core refuses broadcasts with `unavailable` while it is false or while
//! (appends − durable) reaches `--max-unstored`.
//!
//! # Ordering promises
//!
//! 1. **Reads are answered in request order per room**: `Page` and `LastId` replies of one
//!    room come in the order they were asked for (the SQLite engine has one reader thread, so
//!    its reads are in request order across rooms too; the core must not rely on that).
//! 2. **A read sees every append requested before it**: a `Page` or `LastId` asked right after
//!    an `Append` (same turn, nothing durable yet) includes that message. It may also include
//!    appends requested after it but before the read ran; it never includes a message with a
//!    gap before it.
//! 3. **Reservations are answered in request order per room.** No order is promised between
//!    reservation replies and read replies.
//! 4. `DurableUpTo` only grows and covers tickets in append order.
//!
//! # How the core must use it
//!
//! **Joining (no gap, no duplicate).** A member who joins a room must get its history before
//! any live message newer than that history, even when the page comes several loop turns later:
//!
//! 1. At `join`, the core adds the member to the room, sends the `has joined!` notice as today,
//!    and sends `Page { token, room, query }`. From then on, every live room message for that
//!    member in that room (broadcasts with an id) goes into a per-member, per-room buffer
//!    instead of its socket. Events without an id (notices) may be buffered too, to keep their
//!    relative order.
//! 2. On `PageReady { token, .. }` the core sends the `history` event, then the buffered events,
//!    dropping every buffered message whose id is ≤ the page's last id (it is in the page).
//!    By promise 2 the page holds every message appended before the join, and the buffer holds
//!    every message after it, so nothing is missing; the drop removes the overlap. A forward
//!    page (`since`) cut at the resume cap (`more: true`) leaves a gap the client fills with
//!    `history`, as today.
//! 3. On `Unavailable { token, .. }` for a join page the core sends an empty history (what a
//!    failed read gave before the engine: joining is not refused for it), then the buffer.
//! 4. The buffer is bounded by `--max-pending-output` (the member's output bound): a member who
//!    overflows it is closed as a slow consumer; one who leaves the room or disconnects before
//!    the page comes loses the buffer. A reply whose token the core no longer knows, or whose
//!    member is gone (a connection id reused: the member's serial tells), is dropped.
//!
//! `history` (the command) and the REST page need no buffer: they send the page when it comes
//! (`Unavailable`: the command gets the error `unavailable`, the REST page `503`).
//! The REST endpoint answers from the reply too (the HTTP response waits, the loop does not).
//!
//! **Numbering (ids never block the loop).** When a room comes into memory the core sends
//! `LastId`; until the reply it holds the room's broadcasts (queued in order, bounded) and
//! numbers them from `last_id + 1` once it comes. For every id it is about to hand out it sends
//! `Reserve { room, id }`. If its last `IdsReserved` for the room already covers the id, the
//! broadcast goes out at once (the common case: engines reserve ahead, the SQLite one a block
//! of 1000 ids, `sqlite::ID_BLOCK`, renewed every quarter block, so a busy room never waits).
//! Otherwise the core **holds that room's broadcasts** — delivery, storage and ack, in order —
//! until an `IdsReserved` covers them, and refuses them with `unavailable` on `Unavailable`
//! Held broadcasts count against `--max-unstored`, so the hold is bounded; they are delivered
//! to the room's members as they are when released. Only that room's broadcasts wait (and the
//! sender's later commands: the transport reads no more from it until they are answered); the
//! loop never waits for the commit.
//!
//! **Appends.** After delivering a numbered broadcast the core sends `Append`, counts the
//! ticket, and queues the `ack` until `DurableUpTo` reaches it.
//!
//! **Shutdown.** [`Engine::close`] waits (bounded by the deadline) for every append to become
//! durable, stops and joins the engine's threads, and answers every outstanding request with
//! `Unavailable`; the core polls once more after it to release the last acks.
//!
//! **REST.** `GET /api/rooms/{name}/messages` sends `Page` (and `LastId` for a room not in
//! memory, to tell an empty room from an unknown one: `404` when the page is empty and the last
//! id is 0) and writes the HTTP response when the replies come; the connection waits, the loop
//! does not.
//!
//! # Where each side lives
//!
//! The core holds a `Box<dyn Engine>` (from [`open_engine`](super::open_engine)); its side of
//! the boundary — what it awaits by token, the joiners' buffers, the held broadcasts — is
//! `src/chat/pending.rs`, and [`Chat::handle_engine`](crate::chat::Chat::handle_engine) applies
//! the replies. Every input of the core ends by calling it, so an engine that answers during
//! `request` (the memory one) is never left waiting for a wake-up; the server calls it when the
//! engine's waker fires. At shutdown the server gives held broadcasts until the store's deadline
//! (through [`Engine::flush`]) before [`Engine::close`].
//!
//! [`HistoryStore`] is a synchronous store, not an engine: the building block of [`Immediate`]
//! (the memory store and the core's test doubles). The SQLite engine does not implement it:
//! no history read, and no wait for a commit, happens on the loop thread.

use std::collections::VecDeque;
use std::time::Instant;

#[cfg(feature = "server-api")]
use super::Removal;
use super::{HistoryStore, Page, Query, StoreError, StoredMessage};

/// A number the core picks for a request; its reply carries it back.
pub type RequestToken = u64;

/// What the core asks of an engine. See the [module docs](self) for each one's reply.
#[derive(Debug, Clone, PartialEq)]
pub enum Request {
    /// Store `msg` in `room`. Its ticket is the number of appends the engine has taken so far.
    Append {
        /// The room.
        room: String,
        /// The message, already numbered.
        msg: StoredMessage,
    },
    /// A page of `room`'s history.
    Page {
        /// Echoed by the reply.
        token: RequestToken,
        /// The room.
        room: String,
        /// Which part.
        query: Query,
    },
    /// The highest id that may already have been handed out in `room`.
    LastId {
        /// Echoed by the reply.
        token: RequestToken,
        /// The room.
        room: String,
    },
    /// Take messages out of `room`'s history (a moderator's delete); no reply.
    #[cfg(feature = "server-api")]
    Remove {
        /// The room.
        room: String,
        /// Which messages.
        what: Removal,
    },
    /// May `id` be handed out in `room`?
    Reserve {
        /// Echoed by the reply.
        token: RequestToken,
        /// The room.
        room: String,
        /// The id about to be handed out.
        id: u64,
    },
    /// A cluster call (`--redis`): only the cluster engine takes them; others ignore them.
    #[cfg(feature = "cluster")]
    Cluster(crate::cluster::Call),
}

/// What an engine answers. See the [module docs](self).
#[derive(Debug, Clone, PartialEq)]
pub enum Reply {
    /// The page asked for with `token`.
    PageReady {
        /// The request's token.
        token: RequestToken,
        /// The room.
        room: String,
        /// The page, ascending by id.
        page: Page,
    },
    /// The answer to [`Request::LastId`]: 0 for a room that never had a message.
    LastId {
        /// The request's token.
        token: RequestToken,
        /// The room.
        room: String,
        /// The highest id that may have been handed out.
        last_id: u64,
    },
    /// Every append with a ticket up to this one is durable.
    DurableUpTo(u64),
    /// Ids of `room` up to `up_to` (at least the one asked for) may be handed out.
    IdsReserved {
        /// The request's token.
        token: RequestToken,
        /// The room.
        room: String,
        /// The highest id that may be handed out.
        up_to: u64,
    },
    /// The request with `token` cannot be answered now; nothing changed.
    Unavailable {
        /// The request's token.
        token: RequestToken,
        /// The room.
        room: String,
        /// Why, for logs and the client's error message.
        error: StoreError,
    },
    /// What the cluster tells the core (`--redis`): only the cluster engine says it.
    #[cfg(feature = "cluster")]
    Cluster(crate::cluster::Event),
}

/// A history engine: requests in, replies out, never blocking the caller on I/O.
/// The contract is in the [module docs](self).
pub trait Engine {
    /// Hands a request in. Returns at once; replies come from [`Engine::poll`].
    fn request(&mut self, req: Request);
    /// The next reply, `None` when there is none now.
    fn poll(&mut self) -> Option<Reply>;
    /// Whether appends are being stored now; `false` while writes fail or the last `LastId`
    /// read failed.
    fn writable(&self) -> bool;
    /// Blocks until every append is durable. Only for tests and tools, never on the loop's
    /// hot path; the `DurableUpTo` it causes comes from the next `poll`.
    fn flush(&mut self);
    /// Shutdown: waits until every append is durable or `deadline` passes, stops (and joins)
    /// the engine's threads, and answers every outstanding request. Returns how many appends
    /// were not stored. Requests after it are answered `Unavailable`.
    fn close(&mut self, deadline: Instant) -> u64;
}

/// An engine over a synchronous [`HistoryStore`] whose calls never wait for I/O (the memory
/// store, test doubles): every request is answered in the same turn, no thread involved.
///
/// The memory engine is `Immediate<MemoryStore>` ([`Immediate::memory`]).
pub struct Immediate<S> {
    store: S,
    replies: VecDeque<Reply>,
    /// The last `DurableUpTo` handed out.
    reported: u64,
    closed: bool,
}

impl<S: HistoryStore> Immediate<S> {
    /// Wraps `store`.
    pub fn new(store: S) -> Self {
        Immediate {
            store,
            replies: VecDeque::new(),
            reported: 0,
            closed: false,
        }
    }

    fn report_durable(&mut self) {
        let durable = self.store.durable();
        if durable > self.reported {
            self.reported = durable;
            self.replies.push_back(Reply::DurableUpTo(durable));
        }
    }
}

impl Immediate<super::memory::MemoryStore> {
    /// The memory engine, keeping at most `per_room` messages of each room.
    pub fn memory(per_room: usize) -> Self {
        Immediate::new(super::memory::MemoryStore::new(per_room))
    }
}

fn closed_error() -> StoreError {
    StoreError("the history engine is closed".into())
}

impl<S: HistoryStore> Engine for Immediate<S> {
    fn request(&mut self, req: Request) {
        if self.closed {
            if let Some((token, room)) = token_of(req) {
                self.replies.push_back(Reply::Unavailable {
                    token,
                    room,
                    error: closed_error(),
                });
            }
            return;
        }
        let reply = match req {
            Request::Append { room, msg } => {
                // Reported by `poll`, once per round however many appends came.
                self.store.append(&room, msg);
                return;
            }
            #[cfg(feature = "server-api")]
            Request::Remove { room, what } => {
                self.store.remove(&room, what);
                return;
            }
            Request::Page { token, room, query } => {
                let page = self.store.page(&room, query);
                Reply::PageReady { token, room, page }
            }
            Request::LastId { token, room } => match self.store.last_id(&room) {
                Ok(last_id) => Reply::LastId {
                    token,
                    room,
                    last_id,
                },
                Err(error) => Reply::Unavailable { token, room, error },
            },
            #[cfg(feature = "cluster")]
            Request::Cluster(_) => return,
            Request::Reserve { token, room, id } => match self.store.reserve(&room, id) {
                Ok(()) => Reply::IdsReserved {
                    token,
                    room,
                    up_to: id,
                },
                Err(error) => Reply::Unavailable { token, room, error },
            },
        };
        self.replies.push_back(reply);
    }

    fn poll(&mut self) -> Option<Reply> {
        if self.replies.is_empty() {
            self.report_durable();
        }
        self.replies.pop_front()
    }

    fn writable(&self) -> bool {
        !self.closed && self.store.writable()
    }

    fn flush(&mut self) {
        self.store.flush();
    }

    fn close(&mut self, deadline: Instant) -> u64 {
        if self.closed {
            return 0;
        }
        self.closed = true;
        self.store.close(deadline)
    }
}

/// The token and room of a request that gets a reply of its own.
pub(crate) fn token_of(req: Request) -> Option<(RequestToken, String)> {
    match req {
        Request::Append { .. } => None,
        #[cfg(feature = "cluster")]
        Request::Cluster(_) => None,
        #[cfg(feature = "server-api")]
        Request::Remove { .. } => None,
        Request::Page { token, room, .. }
        | Request::LastId { token, room }
        | Request::Reserve { token, room, .. } => Some((token, room)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::test_message;

    fn drain(e: &mut impl Engine) -> Vec<Reply> {
        std::iter::from_fn(|| e.poll()).collect()
    }

    #[test]
    fn the_memory_engine_answers_in_the_same_turn() {
        let mut e = Immediate::memory(10);
        e.request(Request::Append {
            room: "r".into(),
            msg: test_message(1),
        });
        e.request(Request::Page {
            token: 7,
            room: "r".into(),
            query: Query::After { after: 0, limit: 5 },
        });
        e.request(Request::Reserve {
            token: 8,
            room: "r".into(),
            id: 2,
        });
        e.request(Request::LastId {
            token: 9,
            room: "r".into(),
        });
        let replies = drain(&mut e);
        assert_eq!(
            replies,
            vec![
                Reply::PageReady {
                    token: 7,
                    room: "r".into(),
                    page: Page {
                        messages: vec![test_message(1)],
                        more: false
                    }
                },
                Reply::IdsReserved {
                    token: 8,
                    room: "r".into(),
                    up_to: 2
                },
                Reply::LastId {
                    token: 9,
                    room: "r".into(),
                    last_id: 1
                },
                Reply::DurableUpTo(1),
            ]
        );
        assert_eq!(e.poll(), None, "nothing new: no second DurableUpTo");
    }

    #[test]
    fn durable_up_to_is_coalesced_and_only_grows() {
        let mut e = Immediate::memory(10);
        for id in 1..=3 {
            e.request(Request::Append {
                room: "r".into(),
                msg: test_message(id),
            });
        }
        assert_eq!(
            drain(&mut e),
            vec![Reply::DurableUpTo(3)],
            "one for all three"
        );
        e.request(Request::Append {
            room: "r".into(),
            msg: test_message(4),
        });
        assert_eq!(drain(&mut e), vec![Reply::DurableUpTo(4)]);
    }

    #[test]
    fn a_closed_engine_answers_unavailable() {
        let mut e = Immediate::memory(10);
        assert_eq!(e.close(Instant::now()), 0);
        assert!(!e.writable());
        e.request(Request::Page {
            token: 1,
            room: "r".into(),
            query: Query::Before {
                before: None,
                limit: 1,
            },
        });
        assert!(matches!(
            e.poll(),
            Some(Reply::Unavailable { token: 1, .. })
        ));
        assert_eq!(e.poll(), None);
    }

    /// Fails every read and reservation: the shape of the core's test doubles.
    struct Broken;

    impl HistoryStore for Broken {
        fn last_id(&mut self, _room: &str) -> Result<u64, StoreError> {
            Err(StoreError("read failed".into()))
        }
        fn append(&mut self, _room: &str, _msg: StoredMessage) -> u64 {
            1
        }
        fn durable(&mut self) -> u64 {
            0
        }
        fn page(&mut self, _room: &str, _query: Query) -> Page {
            Page::default()
        }
        fn flush(&mut self) {}
        fn reserve(&mut self, _room: &str, _id: u64) -> Result<(), StoreError> {
            Err(StoreError("cannot write".into()))
        }
        fn writable(&self) -> bool {
            false
        }
    }

    #[test]
    fn a_boxed_store_keeps_its_own_answers_behind_the_engine() {
        let boxed: Box<dyn HistoryStore> = Box::new(Broken);
        let mut e = Immediate::new(boxed);
        assert!(!e.writable(), "not the trait's default");
        e.request(Request::Reserve {
            token: 1,
            room: "r".into(),
            id: 1,
        });
        e.request(Request::LastId {
            token: 2,
            room: "r".into(),
        });
        e.request(Request::Append {
            room: "r".into(),
            msg: test_message(1),
        });
        let replies = drain(&mut e);
        assert!(
            matches!(&replies[..], [
                Reply::Unavailable { token: 1, error, .. },
                Reply::Unavailable { token: 2, .. },
            ] if error.0 == "cannot write"),
            "a failing store answers Unavailable, and nothing is durable: {replies:?}"
        );
    }
}
