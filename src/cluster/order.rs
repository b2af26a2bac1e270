//! Per-room delivery order of the cluster's messages (sans-IO): each room's last id delivered,
//! the messages held behind a gap while the missing range is fetched from Redis, and the page
//! replies parked until the subscription has caught up with the counter they were read at.
//!
//! Inputs are the live messages of the subscription, the pages and fetches the command thread
//! read, the counters read after a resubscribe, and the clock (`tick`); outputs
//! ([`Action`]) are replies for the core, fetches for the command thread, and wake-ups.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::time::{Duration, Instant};

use super::{CountedPage, Event};
use crate::store::StoreError;
use crate::store::engine::{Reply, RequestToken};

/// How long a page whose counter is ahead of the room waits for the subscription before the
/// missing range is fetched.
pub(crate) const PARK_WAIT: Duration = Duration::from_millis(100);
/// How long after a failed fetch it is tried again.
pub(crate) const RETRY_WAIT: Duration = Duration::from_millis(250);
/// The most messages one fetch asks for.
pub(crate) const FETCH_LIMIT: u64 = 500;

/// What [`Order`] wants done.
#[derive(Debug, PartialEq)]
pub(crate) enum Action {
    /// A reply for the core: a message (`Reply::Cluster(Event::Message)`) or a read's answer.
    Reply(Reply),
    /// Read the messages of `room` with ids above `after` (at most `limit`), with the counter;
    /// the answer goes to [`Order::fetched`].
    Fetch {
        /// The room.
        room: String,
        /// Exclusive lower bound.
        after: u64,
        /// How many at most.
        limit: u64,
    },
    /// Call [`Order::tick`] at (or after) this instant.
    WakeAt(Instant),
}

/// What a fetch read: the messages (as `Event::Message`), whether more follow, the counter.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Fetched {
    /// Ascending by id.
    pub messages: Vec<Event>,
    /// Messages beyond the last one exist.
    pub more: bool,
    /// The room's counter when it was read.
    pub counter: u64,
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum FetchState {
    Idle,
    InFlight,
    RetryAt(Instant),
}

/// A read's reply that waits for the room to reach `counter`.
#[derive(Debug)]
struct Waiting {
    counter: u64,
    since: Instant,
    reply: Reply,
}

#[derive(Debug)]
struct Room {
    /// The last id delivered (or known to be gone).
    last: u64,
    /// Live (or fetched) messages above `last + 1`, by id.
    held: BTreeMap<u64, Event>,
    /// The highest id known to exist that is owed to this node (a counter read).
    owed: u64,
    fetch: FetchState,
    /// Replies in request order, released as `last` reaches their counter.
    waiting: VecDeque<Waiting>,
}

impl Room {
    fn new(last: u64) -> Self {
        Room {
            last,
            held: BTreeMap::new(),
            owed: 0,
            fetch: FetchState::Idle,
            waiting: VecDeque::new(),
        }
    }
}

/// The order keeper (see the [module docs](self)).
#[derive(Debug, Default)]
pub(crate) struct Order {
    rooms: HashMap<String, Room>,
    out: VecDeque<Action>,
}

fn message_id(ev: &Event) -> Option<(&str, u64)> {
    match ev {
        Event::Message { room, id, .. } => Some((room, *id)),
        _ => None,
    }
}

impl Order {
    /// A keeper that tracks no room yet.
    pub(crate) fn new() -> Self {
        Order::default()
    }

    /// The next action, `None` when there is none.
    pub(crate) fn pop(&mut self) -> Option<Action> {
        self.out.pop_front()
    }

    /// Every tracked room with its last id delivered.
    pub(crate) fn last_ids(&self) -> impl Iterator<Item = (&str, u64)> {
        self.rooms.iter().map(|(r, s)| (r.as_str(), s.last))
    }

    /// A live message from the subscription (an `Event::Message`; anything else is ignored).
    pub(crate) fn message(&mut self, ev: Event) {
        let Some((room, id)) = message_id(&ev) else {
            return;
        };
        let room = room.to_owned();
        let state = self
            .rooms
            .entry(room.clone())
            .or_insert_with(|| Room::new(id.saturating_sub(1)));
        if id <= state.last {
            return;
        }
        state.held.insert(id, ev);
        self.advance(&room);
    }

    /// The answer to an [`Action::Fetch`] for `room` above `after`; `Err` when Redis could not
    /// be read (the fetch is tried again after [`RETRY_WAIT`]).
    pub(crate) fn fetched(&mut self, now: Instant, room: &str, result: Result<Fetched, ()>) {
        let Some(state) = self.rooms.get_mut(room) else {
            return;
        };
        match result {
            Err(()) => {
                state.fetch = FetchState::RetryAt(now + RETRY_WAIT);
                self.out.push_back(Action::WakeAt(now + RETRY_WAIT));
            }
            Ok(f) => {
                state.fetch = FetchState::Idle;
                let mut top = 0;
                for ev in f.messages {
                    if let Some((_, id)) = message_id(&ev) {
                        top = top.max(id);
                        if id > state.last {
                            state.held.entry(id).or_insert(ev);
                        }
                    }
                }
                // Every id up to `covered` was either read now or is gone (trimmed, removed):
                // the read and the counter are one atomic step.
                let covered = if f.more { top } else { f.counter.max(top) };
                state.owed = state.owed.max(f.counter);
                while let Some(entry) = state.held.first_entry() {
                    if *entry.key() > covered {
                        break;
                    }
                    let (id, ev) = entry.remove_entry();
                    state.last = state.last.max(id);
                    self.out.push_back(Action::Reply(Reply::Cluster(ev)));
                }
                state.last = state.last.max(covered);
                self.advance(room);
            }
        }
    }

    /// A page the core asked for, read with the room's counter.
    pub(crate) fn page(
        &mut self,
        now: Instant,
        token: RequestToken,
        room: String,
        result: Result<CountedPage, StoreError>,
    ) {
        match result {
            Ok(CountedPage { page, counter }) => {
                let reply = Reply::PageReady {
                    token,
                    room: room.clone(),
                    page,
                };
                self.rooms
                    .entry(room.clone())
                    .or_insert_with(|| Room::new(counter));
                self.wait(now, &room, counter, reply);
            }
            Err(error) => {
                let reply = Reply::Unavailable {
                    token,
                    room: room.clone(),
                    error,
                };
                self.wait(now, &room, 0, reply);
            }
        }
    }

    /// Any other read's reply (`LastId`, `Unavailable`): after the room's earlier replies.
    pub(crate) fn reply(&mut self, now: Instant, room: &str, reply: Reply) {
        self.wait(now, room, 0, reply);
    }

    fn wait(&mut self, now: Instant, room: &str, counter: u64, reply: Reply) {
        let Some(state) = self.rooms.get_mut(room) else {
            self.out.push_back(Action::Reply(reply));
            return;
        };
        if state.waiting.is_empty() && counter <= state.last {
            self.out.push_back(Action::Reply(reply));
            return;
        }
        state.waiting.push_back(Waiting {
            counter,
            since: now,
            reply,
        });
        self.out.push_back(Action::WakeAt(now + PARK_WAIT));
    }

    /// The counters of tracked rooms, read after a resubscribe: the difference is fetched.
    pub(crate) fn counters(&mut self, counters: Vec<(String, u64)>) {
        for (room, counter) in counters {
            if let Some(state) = self.rooms.get_mut(&room) {
                state.owed = state.owed.max(counter);
                self.advance(&room);
            }
        }
    }

    /// The clock: parked replies that waited [`PARK_WAIT`] get their range fetched, failed
    /// fetches are tried again.
    pub(crate) fn tick(&mut self, now: Instant) {
        let mut due = Vec::new();
        for (name, state) in &mut self.rooms {
            let mut touched = false;
            if let FetchState::RetryAt(at) = state.fetch {
                if at <= now {
                    state.fetch = FetchState::Idle;
                    touched = true;
                }
            }
            for w in &state.waiting {
                if w.since + PARK_WAIT <= now && w.counter > state.owed {
                    state.owed = w.counter;
                    touched = true;
                }
            }
            if touched || (!state.waiting.is_empty() && state.owed > state.last) {
                due.push(name.clone());
            }
        }
        for room in due {
            self.advance(&room);
        }
    }

    /// Answers every parked reply with `Unavailable` (the engine is closing) and forgets the
    /// held messages.
    pub(crate) fn fail_all(&mut self, error: StoreError) {
        for (name, state) in &mut self.rooms {
            state.held.clear();
            for w in state.waiting.drain(..) {
                let reply = match w.reply {
                    Reply::PageReady { token, .. } | Reply::LastId { token, .. } => {
                        Reply::Unavailable {
                            token,
                            room: name.clone(),
                            error: error.clone(),
                        }
                    }
                    other => other,
                };
                self.out.push_back(Action::Reply(reply));
            }
        }
    }

    /// Delivers what is contiguous, releases the replies it satisfies, and fetches what is
    /// owed past a gap.
    fn advance(&mut self, room: &str) {
        let Some(state) = self.rooms.get_mut(room) else {
            return;
        };
        while let Some(entry) = state.held.first_entry() {
            if *entry.key() != state.last + 1 {
                break;
            }
            let (id, ev) = entry.remove_entry();
            state.last = id;
            self.out.push_back(Action::Reply(Reply::Cluster(ev)));
        }
        while state
            .waiting
            .front()
            .is_some_and(|w| w.counter <= state.last)
        {
            let w = state.waiting.pop_front().expect("front checked");
            self.out.push_back(Action::Reply(w.reply));
        }
        let gap_to = state.held.keys().next().map_or(0, |first| first - 1);
        let owed = gap_to.max(state.owed);
        if owed > state.last && state.fetch == FetchState::Idle {
            state.fetch = FetchState::InFlight;
            self.out.push_back(Action::Fetch {
                room: room.to_owned(),
                after: state.last,
                limit: (owed - state.last).min(FETCH_LIMIT),
            });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::Page;

    fn msg(room: &str, id: u64) -> Event {
        Event::Message {
            room: room.into(),
            id,
            node: "n".into(),
            conn: 1,
            serial: 1,
            echo: true,
            body: format!(",\"message\":\"{id}\"}}"),
        }
    }

    /// Delivered message ids, replies' tokens (as 1000 + token) and fetches, in order.
    fn drain(o: &mut Order) -> Vec<String> {
        std::iter::from_fn(|| o.pop())
            .filter_map(|a| match a {
                Action::Reply(Reply::Cluster(Event::Message { room, id, .. })) => {
                    Some(format!("{room}:{id}"))
                }
                Action::Reply(Reply::PageReady { token, .. }) => Some(format!("page{token}")),
                Action::Reply(Reply::LastId { token, .. }) => Some(format!("last{token}")),
                Action::Reply(Reply::Unavailable { token, .. }) => Some(format!("unav{token}")),
                Action::Fetch { room, after, limit } => {
                    Some(format!("fetch {room} {after} {limit}"))
                }
                Action::WakeAt(_) => None,
                Action::Reply(other) => Some(format!("{other:?}")),
            })
            .collect()
    }

    fn fetched(room: &str, ids: &[u64], more: bool, counter: u64) -> Result<Fetched, ()> {
        Ok(Fetched {
            messages: ids.iter().map(|&i| msg(room, i)).collect(),
            more,
            counter,
        })
    }

    fn counted(counter: u64) -> Result<CountedPage, StoreError> {
        Ok(CountedPage {
            page: Page::default(),
            counter,
        })
    }

    #[test]
    fn a_new_room_starts_at_its_first_message_and_repeats_are_dropped() {
        let mut o = Order::new();
        o.message(msg("r", 5));
        o.message(msg("r", 6));
        o.message(msg("r", 6));
        o.message(msg("r", 4));
        o.message(msg("r", 7));
        assert_eq!(drain(&mut o), ["r:5", "r:6", "r:7"]);
    }

    #[test]
    fn a_gap_is_held_fetched_and_delivered_in_order() {
        let now = Instant::now();
        let mut o = Order::new();
        o.message(msg("r", 1));
        o.message(msg("r", 4));
        o.message(msg("r", 5));
        assert_eq!(drain(&mut o), ["r:1", "fetch r 1 2"]);
        // The fetch finds 2, 3 (and 4, already held): everything comes out once, in order.
        o.fetched(now, "r", fetched("r", &[2, 3, 4], false, 5));
        o.message(msg("r", 6));
        assert_eq!(drain(&mut o), ["r:2", "r:3", "r:4", "r:5", "r:6"]);
    }

    #[test]
    fn ids_gone_from_history_are_skipped_not_waited_for() {
        let now = Instant::now();
        let mut o = Order::new();
        o.message(msg("r", 1));
        o.message(msg("r", 5));
        assert_eq!(drain(&mut o), ["r:1", "fetch r 1 3"]);
        // 2 and 4 were removed by a moderator: the read says so by their absence.
        o.fetched(now, "r", fetched("r", &[3, 5], false, 5));
        assert_eq!(drain(&mut o), ["r:3", "r:5"]);
        o.message(msg("r", 5));
        o.message(msg("r", 6));
        assert_eq!(drain(&mut o), ["r:6"]);
    }

    #[test]
    fn a_long_gap_is_fetched_in_several_reads() {
        let now = Instant::now();
        let mut o = Order::new();
        o.message(msg("r", 1));
        o.message(msg("r", 1000));
        assert_eq!(drain(&mut o), ["r:1", "fetch r 1 500"]);
        let first: Vec<u64> = (2..=501).collect();
        o.fetched(now, "r", fetched("r", &first, true, 1000));
        let out = drain(&mut o);
        assert_eq!(out.len(), 501);
        assert_eq!(out.last().unwrap(), "fetch r 501 499");
        let rest: Vec<u64> = (502..=1000).collect();
        o.fetched(now, "r", fetched("r", &rest, false, 1000));
        let out = drain(&mut o);
        assert_eq!(out.first().unwrap(), "r:502");
        assert_eq!(out.last().unwrap(), "r:1000");
        assert_eq!(out.len(), 499);
    }

    #[test]
    fn a_failed_fetch_is_tried_again_after_a_while() {
        let now = Instant::now();
        let mut o = Order::new();
        o.message(msg("r", 1));
        o.message(msg("r", 3));
        assert_eq!(drain(&mut o), ["r:1", "fetch r 1 1"]);
        o.fetched(now, "r", Err(()));
        assert_eq!(drain(&mut o), Vec::<String>::new());
        o.tick(now + Duration::from_millis(10));
        assert_eq!(drain(&mut o), Vec::<String>::new(), "not yet");
        o.tick(now + RETRY_WAIT);
        assert_eq!(drain(&mut o), ["fetch r 1 1"]);
        o.fetched(now, "r", fetched("r", &[2], false, 3));
        assert_eq!(drain(&mut o), ["r:2", "r:3"]);
    }

    #[test]
    fn a_page_of_an_untracked_room_sets_its_start() {
        let now = Instant::now();
        let mut o = Order::new();
        o.page(now, 1, "r".into(), counted(10));
        assert_eq!(drain(&mut o), ["page1"]);
        // A live message the page already holds is not delivered again.
        o.message(msg("r", 10));
        o.message(msg("r", 11));
        assert_eq!(drain(&mut o), ["r:11"]);
    }

    #[test]
    fn a_page_ahead_of_the_subscription_waits_for_it() {
        let now = Instant::now();
        let mut o = Order::new();
        o.message(msg("r", 1));
        o.page(now, 1, "r".into(), counted(3));
        o.reply(
            now,
            "r",
            Reply::LastId {
                token: 2,
                room: "r".into(),
                last_id: 3,
            },
        );
        assert_eq!(
            drain(&mut o),
            ["r:1"],
            "parked: 2 and 3 are still on the way"
        );
        o.message(msg("r", 2));
        assert_eq!(drain(&mut o), ["r:2"]);
        o.message(msg("r", 3));
        assert_eq!(
            drain(&mut o),
            ["r:3", "page1", "last2"],
            "released in request order once the room caught up"
        );
    }

    #[test]
    fn a_parked_page_fetches_what_the_subscription_did_not_bring() {
        let now = Instant::now();
        let mut o = Order::new();
        o.message(msg("r", 1));
        o.page(now, 1, "r".into(), counted(3));
        assert_eq!(drain(&mut o), ["r:1"]);
        o.tick(now + Duration::from_millis(50));
        assert_eq!(drain(&mut o), Vec::<String>::new(), "still waiting");
        o.tick(now + PARK_WAIT);
        assert_eq!(drain(&mut o), ["fetch r 1 2"]);
        o.fetched(now, "r", fetched("r", &[2, 3], false, 3));
        assert_eq!(drain(&mut o), ["r:2", "r:3", "page1"]);
        o.message(msg("r", 2));
        o.message(msg("r", 3));
        assert_eq!(drain(&mut o), Vec::<String>::new(), "no doubles");
    }

    #[test]
    fn counters_after_a_resubscribe_fill_the_difference() {
        let now = Instant::now();
        let mut o = Order::new();
        o.message(msg("a", 1));
        o.message(msg("b", 7));
        drain(&mut o);
        o.counters(vec![("a".into(), 3), ("b".into(), 7), ("c".into(), 9)]);
        assert_eq!(drain(&mut o), ["fetch a 1 2"], "b is level, c untracked");
        // Live messages that arrive during the fetch wait behind it.
        o.message(msg("a", 4));
        o.fetched(now, "a", fetched("a", &[2, 3], false, 3));
        assert_eq!(drain(&mut o), ["a:2", "a:3", "a:4"]);
    }

    #[test]
    fn closing_answers_parked_pages_unavailable() {
        let now = Instant::now();
        let mut o = Order::new();
        o.message(msg("r", 1));
        o.page(now, 4, "r".into(), counted(2));
        drain(&mut o);
        o.fail_all(StoreError("closing".into()));
        assert_eq!(drain(&mut o), ["unav4"]);
    }
}
