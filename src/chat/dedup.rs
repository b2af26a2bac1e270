//! [`Dedup`]: the `msg_id`s seen per room within the dedup window, capped, each step O(1).
//!
//! A broadcast with a `msg_id` already seen in the same room within `--dedup-window` is not
//! delivered or stored again; its `ack` names the first id. The map holds at most
//! `--max-dedup-entries` keys, whoever sent them (one client at the rate limit could otherwise
//! hold ~1 GB of them): at the cap the oldest are forgotten first, and a retry of a forgotten
//! `msg_id` is delivered again, as after the window.

use std::collections::{HashMap, VecDeque};
use std::time::{Duration, Instant};

/// `(room, msg_id)`.
type Key = (String, String);

/// The dedup window: `(room, msg_id)` → first id, with expiry in insertion order.
pub(crate) struct Dedup {
    window: Duration,
    cap: usize,
    /// `(room, msg_id)` → the id of the first broadcast that carried it.
    first: HashMap<Key, u64>,
    /// Every key of `first` once, oldest first, with the instant it expires. Since the window
    /// is the same for every key, insertion order is expiry order.
    expiry: VecDeque<(Instant, Key)>,
}

impl Dedup {
    /// An empty window of `window`, holding at most `cap` keys (at least one).
    pub(crate) fn new(window: Duration, cap: usize) -> Self {
        Dedup {
            window,
            cap,
            first: HashMap::new(),
            expiry: VecDeque::new(),
        }
    }

    /// The first id of `msg_id` in `room`, if it is still within the window at `now`.
    pub(crate) fn get(&mut self, now: Instant, room: &str, msg_id: &str) -> Option<u64> {
        self.expire(now);
        self.first
            .get(&(room.to_string(), msg_id.to_string()))
            .copied()
    }

    /// Remembers that `msg_id` in `room` was first broadcast as `id`, for the window from
    /// `now`; forgets expired keys and, at the cap, the oldest ones. A key already remembered
    /// keeps its first id and its place.
    pub(crate) fn remember(&mut self, now: Instant, room: &str, msg_id: &str, id: u64) {
        self.expire(now);
        let key = (room.to_string(), msg_id.to_string());
        if self.first.contains_key(&key) {
            return;
        }
        while self.first.len() >= self.cap {
            let Some((_, oldest)) = self.expiry.pop_front() else {
                break;
            };
            self.first.remove(&oldest);
        }
        self.first.insert(key.clone(), id);
        self.expiry.push_back((now + self.window, key));
    }

    /// Keys remembered now.
    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        self.first.len()
    }

    fn expire(&mut self, now: Instant) {
        while self.expiry.front().is_some_and(|(at, _)| *at <= now) {
            if let Some((_, key)) = self.expiry.pop_front() {
                self.first.remove(&key);
            }
        }
    }

    /// Both sides hold the same keys, once each.
    #[cfg(test)]
    pub(crate) fn assert_consistent(&self) {
        assert_eq!(self.first.len(), self.expiry.len(), "one expiry per key");
        let queued: std::collections::HashSet<&Key> = self.expiry.iter().map(|(_, k)| k).collect();
        assert_eq!(queued.len(), self.expiry.len(), "no key queued twice");
        assert!(queued.iter().all(|k| self.first.contains_key(*k)));
        assert!(self.first.len() <= self.cap.max(1));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIN: Duration = Duration::from_secs(60);

    #[test]
    fn a_key_is_remembered_for_the_window_and_per_room() {
        let t0 = Instant::now();
        let mut d = Dedup::new(10 * MIN, 100);
        assert_eq!(d.get(t0, "a", "k"), None);
        d.remember(t0, "a", "k", 7);
        assert_eq!(d.get(t0, "a", "k"), Some(7));
        assert_eq!(d.get(t0, "b", "k"), None, "another room");
        assert_eq!(d.get(t0, "a", "K"), None, "case matters");
        assert_eq!(d.get(t0 + 10 * MIN - MIN / 60, "a", "k"), Some(7));
        assert_eq!(d.get(t0 + 10 * MIN, "a", "k"), None, "the window is over");
        assert_eq!(d.len(), 0, "and the key is gone");
        d.assert_consistent();
    }

    #[test]
    fn the_first_id_wins() {
        let t0 = Instant::now();
        let mut d = Dedup::new(MIN, 100);
        d.remember(t0, "a", "k", 1);
        d.remember(t0 + MIN / 2, "a", "k", 2);
        assert_eq!(d.get(t0 + MIN / 2, "a", "k"), Some(1));
        assert_eq!(d.len(), 1);
        d.assert_consistent();
        assert_eq!(
            d.get(t0 + MIN, "a", "k"),
            None,
            "the window counts from the first"
        );
    }

    #[test]
    fn at_the_cap_the_oldest_go_first() {
        let t0 = Instant::now();
        let mut d = Dedup::new(MIN, 3);
        for (i, k) in ["k1", "k2", "k3", "k4", "k5"].iter().enumerate() {
            d.remember(t0, "a", k, i as u64 + 1);
            assert!(d.len() <= 3);
            d.assert_consistent();
        }
        assert_eq!(d.get(t0, "a", "k1"), None);
        assert_eq!(d.get(t0, "a", "k2"), None);
        assert_eq!(d.get(t0, "a", "k3"), Some(3));
        assert_eq!(d.get(t0, "a", "k5"), Some(5));
    }

    #[test]
    fn a_zero_window_remembers_nothing_past_the_instant() {
        let t0 = Instant::now();
        let mut d = Dedup::new(Duration::ZERO, 10);
        d.remember(t0, "a", "k", 1);
        assert_eq!(d.get(t0, "a", "k"), None);
        d.assert_consistent();
    }

    #[test]
    fn expiry_is_in_insertion_order_over_many_keys() {
        let t0 = Instant::now();
        let mut d = Dedup::new(Duration::from_secs(1000), 1000);
        for i in 0..500u64 {
            d.remember(t0 + Duration::from_secs(i), "r", &format!("k{i}"), i);
        }
        assert_eq!(d.len(), 500);
        d.assert_consistent();
        // At t0 + 1040 s keys 0..=40 have expired (inserted at 0..=40 s, window 1000 s).
        let at = t0 + Duration::from_secs(1040);
        assert_eq!(d.get(at, "r", "k40"), None);
        assert_eq!(d.get(at, "r", "k41"), Some(41));
        assert_eq!(d.len(), 500 - 41);
        d.assert_consistent();
    }
}
