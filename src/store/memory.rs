//! The in-memory history store: a bounded ring of messages per room, durable at once.

use std::collections::{HashMap, VecDeque};

use super::{
    HistoryStore, Page, Query, Removal, StoreError, StoredMessage, page_from_asc, page_from_desc,
};

/// How many room logs are kept at most: a fixed cap so that a client creating and leaving rooms
/// forever cannot grow memory. The least recently written log goes.
const MAX_ROOM_LOGS: usize = if cfg!(test) { 64 } else { 4096 };
/// How many evicted rooms' last ids are remembered (16 bytes each, plus the map's overhead).
const MAX_TOMBSTONES: usize = if cfg!(test) { 256 } else { 65_536 };

#[derive(Default)]
struct RoomLog {
    messages: VecDeque<StoredMessage>,
    last_id: u64,
    last_write: u64,
}

/// History kept in memory only; lost on restart.
pub struct MemoryStore {
    per_room: usize,
    rooms: HashMap<String, RoomLog>,
    tickets: u64,
    /// Last ids of evicted room logs, by a 64-bit hash of the room name (16 bytes each), so an
    /// evicted room that comes back continues where it was.
    tombstones: HashMap<u64, u64>,
    /// When the tombstones overflow they are dropped and their highest id becomes this floor:
    /// a room known nowhere then starts above it. Ids are never reused either way; only after
    /// `MAX_ROOM_LOGS + MAX_TOMBSTONES` rooms of churn do new rooms start above 1.
    evicted_floor: u64,
}

impl MemoryStore {
    /// A store keeping at most `per_room` messages of each room.
    pub fn new(per_room: usize) -> Self {
        MemoryStore {
            per_room,
            rooms: HashMap::new(),
            tickets: 0,
            tombstones: HashMap::new(),
            evicted_floor: 0,
        }
    }

    fn evict_if_full(&mut self) {
        if self.rooms.len() < MAX_ROOM_LOGS {
            return;
        }
        if let Some(oldest) = self
            .rooms
            .iter()
            .min_by_key(|(_, log)| log.last_write)
            .map(|(name, _)| name.clone())
            && let Some(log) = self.rooms.remove(&oldest)
        {
            if self.tombstones.len() >= MAX_TOMBSTONES {
                let highest = self.tombstones.drain().map(|(_, id)| id).max().unwrap_or(0);
                self.evicted_floor = self.evicted_floor.max(highest);
            }
            let previous = self.tombstones.entry(name_hash(&oldest)).or_insert(0);
            *previous = (*previous).max(log.last_id);
        }
    }

    /// The log of `room`, made when it has none (starting at its forgotten last id).
    fn log_of(&mut self, room: &str) -> &mut RoomLog {
        let floor = self.forgotten_last_id(room);
        self.rooms
            .entry(room.to_string())
            .or_insert_with(|| RoomLog {
                last_id: floor,
                ..RoomLog::default()
            })
    }

    /// The last id of a room that has no log: its tombstone, or the floor.
    fn forgotten_last_id(&self, room: &str) -> u64 {
        let tomb = self.tombstones.get(&name_hash(room)).copied().unwrap_or(0);
        tomb.max(self.evicted_floor)
    }
}

/// A fixed (unkeyed) hash: tombstones only need to tell room names apart. A collision only
/// makes a room continue from a higher id.
fn name_hash(room: &str) -> u64 {
    use std::hash::{Hash, Hasher};
    let mut h = std::hash::DefaultHasher::new();
    room.hash(&mut h);
    h.finish()
}

impl HistoryStore for MemoryStore {
    fn last_id(&mut self, room: &str) -> Result<u64, StoreError> {
        Ok(self
            .rooms
            .get(room)
            .map_or_else(|| self.forgotten_last_id(room), |log| log.last_id))
    }

    fn append(&mut self, room: &str, msg: StoredMessage) -> u64 {
        self.tickets += 1;
        if !self.rooms.contains_key(room) {
            self.evict_if_full();
        }
        let (tickets, per_room) = (self.tickets, self.per_room);
        let log = self.log_of(room);
        log.last_id = log.last_id.max(msg.id);
        log.last_write = tickets;
        if per_room > 0 {
            if log.messages.len() == per_room {
                log.messages.pop_front();
            }
            log.messages.push_back(msg);
        }
        self.tickets
    }

    fn durable(&mut self) -> u64 {
        self.tickets
    }

    fn page(&mut self, room: &str, query: Query) -> Page {
        let Some(log) = self.rooms.get(room) else {
            return Page::default();
        };
        match query {
            Query::Before { before, limit } => {
                let bound = before.unwrap_or(u64::MAX);
                let desc = log
                    .messages
                    .iter()
                    .rev()
                    .filter(|m| m.id < bound)
                    .take(limit.saturating_add(1))
                    .cloned();
                page_from_desc(desc.collect(), limit)
            }
            Query::After { after, limit } => {
                // Ids are ascending, so binary search finds the first one after `after`.
                let start = log.messages.partition_point(|m| m.id <= after);
                page_from_asc(
                    log.messages
                        .range(start..)
                        .take(limit.saturating_add(1))
                        .cloned()
                        .collect(),
                    limit,
                )
            }
        }
    }

    fn flush(&mut self) {}

    fn remove(&mut self, room: &str, what: Removal) {
        // The log's `last_id` stays: that is the tombstone.
        let log = self.log_of(room);
        if let Removal::UpTo(n) = what {
            log.last_id = log.last_id.max(n);
        }
        log.messages.retain(|m| !what.covers(m.id));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ring_keeps_the_newest_and_ids_go_on() {
        let mut s = MemoryStore::new(3);
        for id in 1..=5 {
            s.append("r", super::super::test_message(id));
        }
        let p = s.page(
            "r",
            Query::Before {
                before: None,
                limit: 10,
            },
        );
        assert_eq!(
            p.messages.iter().map(|m| m.id).collect::<Vec<_>>(),
            vec![3, 4, 5]
        );
        assert!(!p.more, "nothing older is held, so more is false");
        assert_eq!(s.last_id("r").unwrap(), 5);
    }

    #[test]
    fn removed_messages_leave_the_pages_and_their_ids_stay_taken() {
        let mut s = MemoryStore::new(10);
        for id in 1..=4 {
            s.append("r", super::super::test_message(id));
        }
        s.remove("r", Removal::One(4));
        s.remove("r", Removal::One(2));
        let all = Query::Before {
            before: None,
            limit: 10,
        };
        let ids = |s: &mut MemoryStore| -> Vec<u64> {
            s.page("r", all).messages.iter().map(|m| m.id).collect()
        };
        assert_eq!(ids(&mut s), vec![1, 3]);
        assert_eq!(
            s.last_id("r").unwrap(),
            4,
            "the deleted last id stays taken"
        );
        s.remove("r", Removal::UpTo(4));
        assert!(ids(&mut s).is_empty());
        assert_eq!(s.last_id("r").unwrap(), 4);
        s.append("r", super::super::test_message(5));
        assert_eq!(ids(&mut s), vec![5], "a message after the removal stays");
        s.remove("never", Removal::UpTo(7));
        assert_eq!(s.last_id("never").unwrap(), 7);
    }

    #[test]
    fn room_logs_are_bounded() {
        let mut s = MemoryStore::new(1);
        for i in 0..MAX_ROOM_LOGS + 10 {
            s.append(&format!("room{i}"), super::super::test_message(1));
        }
        assert_eq!(s.rooms.len(), MAX_ROOM_LOGS);
        assert_eq!(
            s.last_id("room0").unwrap(),
            1,
            "room0 went first; its ids are not reused"
        );
        assert_eq!(s.last_id(&format!("room{}", MAX_ROOM_LOGS + 9)).unwrap(), 1);
    }

    #[test]
    fn past_the_tombstones_new_rooms_start_above_every_forgotten_id() {
        let mut s = MemoryStore::new(1);
        s.append("busy", super::super::test_message(7));
        for i in 0..MAX_ROOM_LOGS + MAX_TOMBSTONES + 1 {
            s.append(&format!("room{i}"), super::super::test_message(1));
        }
        assert!(s.tombstones.len() <= MAX_TOMBSTONES);
        assert_eq!(
            s.last_id("busy").unwrap(),
            7,
            "its tombstone was dropped, the floor remembers"
        );
        assert_eq!(s.last_id("never-seen").unwrap(), 7);
    }
}
