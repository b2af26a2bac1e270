//! [`TimerTable`]: a connection's deadlines, one slot per [`Timer`], and which one is due.
//!
//! The loop keeps one heap entry per connection, at [`TimerTable::next_timeout`]; when it
//! fires, [`TimerTable::expired`] says which timer it was. Moving a deadline later (a frame
//! arrived, so the pong timeout moves) only writes its slot: the heap entry fires early, finds
//! nothing expired and is put back at the new earliest deadline.

use std::cmp::Reverse;
use std::time::{Duration, Instant};

use log::debug;

use super::admission::Refusal;
use super::conn::Phase;
use super::{BUFFER_RELEASE_DELAY, Server};
use crate::chat::Close;

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

impl Server {
    /// How long the poll may sleep: until the earliest connection deadline, buffer release,
    /// heap trim, accept retry or shutdown deadline; `None` (forever) when there is none.
    pub(super) fn next_timeout(&mut self) -> Option<Duration> {
        let mut timer = self.timers.peek().map(|Reverse((at, _))| *at);
        if !self.kept.is_empty() {
            // One more turn soon, so that buffers kept for busy connections are given back
            // once the traffic stops (an idle server then sleeps with none).
            let release = Instant::now() + BUFFER_RELEASE_DELAY;
            timer = Some(timer.map_or(release, |t| t.min(release)));
        }
        if let Some(at) = self.trim_at {
            timer = Some(timer.map_or(at, |t| t.min(at)));
        }
        if let Some(at) = self.accept_retry_at {
            timer = Some(timer.map_or(at, |t| t.min(at)));
        }
        if let Some(at) = self.report.next_flush() {
            timer = Some(timer.map_or(at, |t| t.min(at)));
        }
        #[cfg(feature = "cluster")]
        if let Some(at) = self.chat.cluster_deadline() {
            timer = Some(timer.map_or(at, |t| t.min(at)));
        }
        let next = match (timer, self.shutdown_at) {
            (Some(t), Some(s)) => t.min(s),
            (t, s) => t.or(s)?,
        };
        Some(next.saturating_duration_since(Instant::now()))
    }

    /// Puts the connection's earliest deadline in the heap, unless an entry at or before it
    /// is there already (that one fires, finds nothing due, and comes back here).
    pub(super) fn schedule(&mut self, id: usize) {
        let Some(c) = self.conns.get_mut(id) else {
            return;
        };
        let Some(at) = c.timers.next_timeout() else {
            return;
        };
        if c.timer_at.is_some_and(|t| t <= at) {
            return;
        }
        c.timer_at = Some(at);
        self.timers.push(Reverse((at, id)));
    }

    /// Acts on every heap entry due by `now`, skipping entries a newer one replaced.
    pub(super) fn fire_timers(&mut self, now: Instant) {
        while let Some(&Reverse((at, id))) = self.timers.peek() {
            if at > now {
                break;
            }
            self.timers.pop();
            let Some(c) = self.conns.get_mut(id) else {
                continue;
            };
            if c.timer_at != Some(at) {
                continue; // stale entry; a newer one exists
            }
            c.timer_at = None;
            self.timer_due(id, now);
        }
    }

    /// What a connection's due timer means: the one place each timer is acted on.
    pub(super) fn timer_due(&mut self, id: usize, now: Instant) {
        let ping = self.chat.config().ping_interval;
        let Some(c) = self.conns.get_mut(id) else {
            return;
        };
        match c.timers.expired(now) {
            None => self.schedule(id),
            Some(Timer::CloseGrace) => {
                if c.pending() > 0 && matches!(c.phase, Phase::Ws(_)) {
                    // A client that does not read (a slow consumer, typically) never gets its
                    // close frame. Nothing more can be done for it; count it.
                    self.close_frames_lost += 1;
                    debug!("connection {id}: close frame not taken within the grace time");
                }
                self.drop_conn(id);
            }
            Some(Timer::Head) => {
                let why = || "the request head did not arrive in time".to_string();
                self.report
                    .refused(now, c.ip, Refusal::HeadTimeout, None, why);
                self.drop_conn(id);
            }
            Some(Timer::TokenExpiry) => self.close_later(id, Close::TokenExpired),
            Some(Timer::Pong) => self.close_later(id, Close::PongTimeout),
            Some(Timer::Idle) => self.close_later(id, Close::Idle),
            Some(Timer::Ping) => {
                c.ping();
                c.timers.set(Timer::Ping, now + ping);
                self.mark_dirty(id);
                self.schedule(id);
            }
        }
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
