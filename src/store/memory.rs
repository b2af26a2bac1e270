//! The in-memory history store: a bounded ring of messages per room, durable at once.

use std::collections::{HashMap, VecDeque};

use super::{HistoryStore, Page, Query, StoredMessage, page_from_asc, page_from_desc};

/// How many room logs are kept at most, as a multiple of nothing: a fixed cap so that a client
/// creating and leaving rooms forever cannot grow memory. The least recently written log goes.
const MAX_ROOM_LOGS: usize = 4096;

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
}

impl MemoryStore {
    /// A store keeping at most `per_room` messages of each room.
    pub fn new(per_room: usize) -> Self {
        MemoryStore {
            per_room,
            rooms: HashMap::new(),
            tickets: 0,
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
        {
            self.rooms.remove(&oldest);
        }
    }
}

impl HistoryStore for MemoryStore {
    fn last_id(&mut self, room: &str) -> u64 {
        self.rooms.get(room).map_or(0, |log| log.last_id)
    }

    fn append(&mut self, room: &str, msg: StoredMessage) -> u64 {
        self.tickets += 1;
        if !self.rooms.contains_key(room) {
            self.evict_if_full();
        }
        let log = self.rooms.entry(room.to_string()).or_default();
        log.last_id = log.last_id.max(msg.id);
        log.last_write = self.tickets;
        if self.per_room > 0 {
            if log.messages.len() == self.per_room {
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
                    .take(limit + 1)
                    .cloned();
                page_from_desc(desc.collect(), limit)
            }
            Query::After { after, limit } => {
                // Ids are ascending, so binary search finds the first one after `after`.
                let start = log.messages.partition_point(|m| m.id <= after);
                page_from_asc(
                    log.messages
                        .range(start..)
                        .take(limit + 1)
                        .cloned()
                        .collect(),
                    limit,
                )
            }
        }
    }

    fn flush(&mut self) {}
}

#[cfg(test)]
mod tests {
    use super::super::contract;
    use super::*;

    #[test]
    fn passes_the_store_contract() {
        contract::run(&mut MemoryStore::new(100));
    }

    #[test]
    fn ring_keeps_the_newest_and_ids_go_on() {
        let mut s = MemoryStore::new(3);
        for id in 1..=5 {
            s.append("r", contract::msg(id));
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
        assert_eq!(s.last_id("r"), 5);
    }

    #[test]
    fn room_logs_are_bounded() {
        let mut s = MemoryStore::new(1);
        for i in 0..MAX_ROOM_LOGS + 10 {
            s.append(&format!("room{i}"), contract::msg(1));
        }
        assert_eq!(s.rooms.len(), MAX_ROOM_LOGS);
        assert_eq!(
            s.last_id("room0"),
            0,
            "the least recently written log went first"
        );
        assert_eq!(s.last_id(&format!("room{}", MAX_ROOM_LOGS + 9)), 1);
    }
}
