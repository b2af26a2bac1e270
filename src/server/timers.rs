//! [`TimerTable`]: a connection's deadlines, one slot per [`Timer`], and which one is due.
//!
//! The loop keeps one heap entry per connection, at [`TimerTable::next_timeout`]; when it
//! fires, [`TimerTable::expired`] says which timer it was. Moving a deadline later (a frame
//! arrived, so the pong timeout moves) only writes its slot: the heap entry fires early, finds
//! nothing expired and is put back at the new earliest deadline.

use std::time::Instant;

/// A connection's timers, in the order they win when several are due at once.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Timer {
    /// A close is under way: the connection goes at this deadline whatever its output holds.
    CloseGrace,
    /// The request head must be complete by then.
    Head,
    /// The member's token expires.
    TokenExpiry,
    /// No frame at all since the pong timeout.
    Pong,
    /// No command since the idle timeout.
    Idle,
    /// Time to send the next ping.
    Ping,
}

impl Timer {
    /// Every timer, in the order [`TimerTable::expired`] tries them.
    const ALL: [Timer; 6] = [
        Timer::CloseGrace,
        Timer::Head,
        Timer::TokenExpiry,
        Timer::Pong,
        Timer::Idle,
        Timer::Ping,
    ];
}

/// One optional deadline per [`Timer`].
#[derive(Debug, Default, Clone)]
pub(crate) struct TimerTable {
    data: [Option<Instant>; Timer::ALL.len()],
}

impl TimerTable {
    /// Arms `timer` for `at`, replacing what it had.
    pub(crate) fn set(&mut self, timer: Timer, at: Instant) {
        self.data[timer as usize] = Some(at);
    }

    /// Disarms `timer`.
    pub(crate) fn stop(&mut self, timer: Timer) {
        self.data[timer as usize] = None;
    }

    /// Disarms every timer.
    pub(crate) fn stop_all(&mut self) {
        self.data = Default::default();
    }

    /// The deadline of `timer`, if armed.
    pub(crate) fn get(&self, timer: Timer) -> Option<Instant> {
        self.data[timer as usize]
    }

    /// The earliest armed deadline.
    pub(crate) fn next_timeout(&self) -> Option<Instant> {
        self.data.iter().flatten().min().copied()
    }

    /// The first timer (in [`Timer`]'s order) whose deadline is at or before `now`. It stays
    /// armed: what it means decides whether it is stopped or set again.
    pub(crate) fn expired(&self, now: Instant) -> Option<Timer> {
        Timer::ALL
            .into_iter()
            .find(|&t| self.get(t).is_some_and(|at| at <= now))
    }
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, Instant};

    use super::{Timer, TimerTable};

    #[test]
    fn an_empty_table_has_no_timeout_and_nothing_expires() {
        let t = TimerTable::default();
        assert_eq!(t.next_timeout(), None);
        assert_eq!(t.expired(Instant::now() + Duration::from_secs(3600)), None);
    }

    #[test]
    fn next_timeout_is_the_earliest_armed_deadline() {
        let now = Instant::now();
        let mut t = TimerTable::default();
        t.set(Timer::Ping, now + Duration::from_secs(30));
        t.set(Timer::Idle, now + Duration::from_secs(10));
        t.set(Timer::Pong, now + Duration::from_secs(20));
        assert_eq!(t.next_timeout(), Some(now + Duration::from_secs(10)));
        t.stop(Timer::Idle);
        assert_eq!(t.next_timeout(), Some(now + Duration::from_secs(20)));
        assert_eq!(t.get(Timer::Idle), None);
        // Setting again replaces, later or earlier.
        t.set(Timer::Pong, now + Duration::from_secs(40));
        assert_eq!(t.next_timeout(), Some(now + Duration::from_secs(30)));
        t.stop_all();
        assert_eq!(t.next_timeout(), None);
    }

    #[test]
    fn expired_is_due_at_its_deadline_not_before() {
        let now = Instant::now();
        let mut t = TimerTable::default();
        t.set(Timer::Head, now + Duration::from_secs(5));
        assert_eq!(t.expired(now), None);
        assert_eq!(t.expired(now + Duration::from_secs(5)), Some(Timer::Head));
        // Expired timers stay armed until the caller acts on them.
        assert_eq!(t.get(Timer::Head), Some(now + Duration::from_secs(5)));
    }

    #[test]
    fn when_several_are_due_the_order_of_timer_decides() {
        let now = Instant::now();
        let mut t = TimerTable::default();
        for timer in [Timer::Ping, Timer::Idle, Timer::Pong, Timer::TokenExpiry] {
            t.set(timer, now);
        }
        // A token expiry wins over timeouts, a timeout over a ping.
        assert_eq!(t.expired(now), Some(Timer::TokenExpiry));
        t.stop(Timer::TokenExpiry);
        assert_eq!(t.expired(now), Some(Timer::Pong));
        t.stop(Timer::Pong);
        assert_eq!(t.expired(now), Some(Timer::Idle));
        t.stop(Timer::Idle);
        assert_eq!(t.expired(now), Some(Timer::Ping));
        // A running close grace wins over everything, even one due later than the others.
        t.set(Timer::CloseGrace, now);
        assert_eq!(t.expired(now), Some(Timer::CloseGrace));
    }
}
