//! What the operator sees of refusals and closes: `Report` logs each one the server decides
//! once, with the client's address and the reason, counts it by reason for `/metrics`
//! (`chatterbox_refused_total{reason=..}`, `chatterbox_closed_total{reason=..}`), and keeps a
//! flood from flooding the log: after the first line for an (address, reason) pair, the
//! repeats within `--log-summary-window` are counted, and one line sums them up when the
//! window ends ("… and 4,312 more from 10.0.0.7 in 10 s: refused 429 too_many_from_address").
//! At most [`SUMMARY_KEYS`] pairs are tracked at once; beyond them, new pairs share one
//! summary ("… from other addresses"), so its memory stays bounded whatever the flood.
//!
//! The refusals come from `Server::respond` (every answer whose status is a
//! `admission::Refusal`) and the two silent ones (`Dropped`, `HeadTimeout`); the closes from
//! `closing.rs`, the one place a [`Close`] becomes a close frame.

use std::fmt::Write as _;
use std::net::IpAddr;
use std::time::{Duration, Instant};

use log::Level;

use super::admission::Refusal;
use crate::chat::Close;
use crate::logging::{Field, log_fields, log_safe, thousands};

/// (address, reason) pairs tracked at once; past it, new pairs are summed up together.
/// Each takes 48 bytes, so the summariser holds at most 12 KiB.
pub const SUMMARY_KEYS: usize = 256;

/// The longest detail (a refusal's answer text) copied into a log line, in characters.
const MAX_DETAIL: usize = 200;

/// A refusal or a close, as the summariser tells them apart.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) enum Event {
    /// A request or upgrade refused, with the status sent (none for the silent ones).
    Refused(Refusal, Option<u16>),
    /// A connection closed by the server.
    Closed(Close),
}

impl Event {
    fn level(self) -> Level {
        match self {
            Event::Refused(r, _) if r.is_load() => Level::Warn,
            Event::Refused(..) => Level::Info,
            Event::Closed(c) if c.is_misbehaviour() => Level::Warn,
            Event::Closed(_) => Level::Info,
        }
    }

    fn label(self) -> &'static str {
        match self {
            Event::Refused(r, _) => r.label(),
            Event::Closed(c) => c.label(),
        }
    }

    /// `refused 429 too_many_from_address`, `closed 1008 slow_consumer`.
    fn what(self) -> String {
        match self {
            Event::Refused(r, Some(status)) => format!("refused {status} {}", r.label()),
            Event::Refused(r, None) => format!("refused {}", r.label()),
            Event::Closed(c) => format!("closed {} {}", c.code(), c.label()),
        }
    }
}

/// The counters by reason, as `/metrics` and `/api/stats` show them.
#[derive(Debug, Clone, Copy, Default)]
pub struct Counts {
    refused: [u64; Refusal::ALL.len()],
    closed: [u64; Close::COUNTED],
}

impl Counts {
    fn add(&mut self, event: Event) {
        match event {
            Event::Refused(r, _) => self.refused[r as usize] += 1,
            Event::Closed(c) => self.closed[c.index()] += 1,
        }
    }

    /// The two labelled counters in Prometheus text, every reason listed (zeros included).
    pub fn prometheus(&self, out: &mut String) {
        out.push_str(
            "# HELP chatterbox_refused_total Requests and upgrades refused, by reason.\n\
             # TYPE chatterbox_refused_total counter\n",
        );
        for r in Refusal::ALL {
            let n = self.refused[r as usize];
            let _ = writeln!(
                out,
                "chatterbox_refused_total{{reason=\"{}\"}} {n}",
                r.label()
            );
        }
        out.push_str(
            "# HELP chatterbox_closed_total Connections the server closed, by reason.\n\
             # TYPE chatterbox_closed_total counter\n",
        );
        let kicked = cfg!(feature = "server-api").then_some(("kicked", Close::ALL.len()));
        let labels = Close::ALL.iter().map(|c| (c.label(), c.index()));
        for (label, i) in labels.chain(kicked) {
            let n = self.closed[i];
            let _ = writeln!(out, "chatterbox_closed_total{{reason=\"{label}\"}} {n}");
        }
    }
}

/// Since when a pair is being summed up, and how many lines it held back so far.
#[derive(Debug, Clone, Copy)]
struct Seen {
    since: Instant,
    more: u64,
}

/// A summary line due: the pair (`None`: the pairs past [`SUMMARY_KEYS`]) and how many of its
/// lines were held back.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Summary {
    pub(crate) key: Option<(IpAddr, Event)>,
    pub(crate) more: u64,
}

/// Which lines are written, sans-IO: [`Summariser::note`] says whether an event gets its line,
/// [`Summariser::flush`] which summaries are due. The pairs are a short list searched in order
/// (at most [`SUMMARY_KEYS`], each compared in a few nanoseconds): cheaper in bytes than a
/// map, and fast enough next to the system calls each refusal or close costs anyway.
#[derive(Debug)]
pub(crate) struct Summariser {
    window: Duration,
    cap: usize,
    seen: Vec<(IpAddr, Event, Seen)>,
    /// The pairs that came while `seen` was full, summed up together.
    others: Option<Seen>,
    flush_at: Option<Instant>,
}

impl Summariser {
    pub(crate) fn new(window: Duration, cap: usize) -> Summariser {
        Summariser {
            window,
            cap,
            seen: Vec::new(),
            others: None,
            flush_at: None,
        }
    }

    /// Whether this event gets its own line: the first of its pair in a window does, the
    /// rest are held back and counted. A pair whose window ended puts its summary in `due`.
    pub(crate) fn note(
        &mut self,
        now: Instant,
        ip: IpAddr,
        event: Event,
        due: &mut Vec<Summary>,
    ) -> bool {
        let window = self.window;
        let fresh = Seen {
            since: now,
            more: 0,
        };
        let found = self
            .seen
            .iter()
            .position(|(i, e, _)| *i == ip && *e == event);
        let (slot, key) = match (found, &mut self.others) {
            (Some(at), _) => (&mut self.seen[at].2, Some((ip, event))),
            (None, _) if self.seen.len() < self.cap => {
                self.seen.push((ip, event, fresh));
                self.flush_at.get_or_insert(now + window);
                return true;
            }
            (None, Some(others)) => (others, None),
            (None, None) => {
                self.others = Some(fresh);
                self.flush_at.get_or_insert(now + window);
                return true;
            }
        };
        if now < slot.since + window {
            slot.more += 1;
            return false;
        }
        if slot.more > 0 {
            due.push(Summary {
                key,
                more: slot.more,
            });
        }
        *slot = fresh;
        self.flush_at.get_or_insert(now + window);
        true
    }

    /// When [`Summariser::flush`] next has something to do.
    pub(crate) fn next_flush(&self) -> Option<Instant> {
        self.flush_at
    }

    /// Ends the windows that are over by `now`: their pairs are forgotten, and those that held
    /// lines back put their summary in `due`.
    pub(crate) fn flush(&mut self, now: Instant, due: &mut Vec<Summary>) {
        if self.flush_at.is_none_or(|at| now < at) {
            return;
        }
        let window = self.window;
        let over = |s: &Seen| now >= s.since + window;
        self.seen.retain(|(ip, event, s)| {
            if !over(s) {
                return true;
            }
            if s.more > 0 {
                due.push(Summary {
                    key: Some((*ip, *event)),
                    more: s.more,
                });
            }
            false
        });
        if let Some(o) = self.others.filter(over) {
            if o.more > 0 {
                due.push(Summary {
                    key: None,
                    more: o.more,
                });
            }
            self.others = None;
        }
        let sinces = self.seen.iter().map(|(_, _, s)| s).chain(&self.others);
        self.flush_at = sinces.map(|s| s.since + window).min();
        if self.seen.capacity() > 4 * self.seen.len().max(16) {
            self.seen.shrink_to_fit();
        }
    }

    /// Pairs tracked now (for tests).
    #[cfg(test)]
    fn tracked(&self) -> usize {
        self.seen.len()
    }
}

/// The counters and the summariser together: what the server calls.
#[derive(Debug)]
pub(crate) struct Report {
    counts: Counts,
    summariser: Summariser,
    due: Vec<Summary>,
}

impl Report {
    pub(crate) fn new(window: Duration) -> Report {
        Report {
            counts: Counts::default(),
            summariser: Summariser::new(window, SUMMARY_KEYS),
            due: Vec::new(),
        }
    }

    /// The counters now.
    pub(crate) fn counts(&self) -> Counts {
        self.counts
    }

    /// A request or upgrade from `ip` refused (`status`: the answer sent, if any); `detail`
    /// says what was wrong (the answer's text, escaped and cut here), asked for only when
    /// the line is written.
    pub(crate) fn refused(
        &mut self,
        now: Instant,
        ip: IpAddr,
        why: Refusal,
        status: Option<u16>,
        detail: impl FnOnce() -> String,
    ) {
        let event = Event::Refused(why, status);
        if !self.count(now, ip, event) {
            return;
        }
        let detail = short(&detail());
        let (addr, reason) = (ip.to_string(), why.label());
        let mut fields = vec![("addr", Field::Str(&addr)), ("reason", Field::Str(reason))];
        let status = match status {
            Some(s) => {
                fields.push(("status", Field::Num(s.into())));
                format!("{s} ")
            }
            None => String::new(),
        };
        log_fields(
            event.level(),
            format_args!("refused {addr}: {status}{reason}: {}", log_safe(&detail)),
            &fields,
        );
    }

    /// A connection from `ip` closed by the server for `why` (the shutdown's closes are
    /// counted, not logged: one line says the server shuts down).
    pub(crate) fn closed(&mut self, now: Instant, ip: IpAddr, why: Close) {
        let event = Event::Closed(why);
        if why == Close::Shutdown {
            self.counts.add(event);
            return;
        }
        if !self.count(now, ip, event) {
            return;
        }
        let (addr, code, reason) = (ip.to_string(), why.code(), why.label());
        log_fields(
            event.level(),
            format_args!("closed {addr}: {code} {reason} ({})", why.reason()),
            &[
                ("addr", Field::Str(&addr)),
                ("reason", Field::Str(reason)),
                ("code", Field::Num(code.into())),
            ],
        );
    }

    /// When [`Report::tick`] next has a summary to write.
    pub(crate) fn next_flush(&self) -> Option<Instant> {
        self.summariser.next_flush()
    }

    /// Writes the summaries of windows over by `now`.
    pub(crate) fn tick(&mut self, now: Instant) {
        self.summariser.flush(now, &mut self.due);
        self.write_due();
    }

    /// Writes every summary still open, as the server stops.
    pub(crate) fn finish(&mut self) {
        let end = Instant::now() + self.summariser.window;
        self.tick(end);
    }

    /// Counts the event; whether it gets its own line. Summaries it made due are written.
    fn count(&mut self, now: Instant, ip: IpAddr, event: Event) -> bool {
        self.counts.add(event);
        let first = self.summariser.note(now, ip, event, &mut self.due);
        self.write_due();
        first
    }

    fn write_due(&mut self) {
        let window = secs(self.summariser.window);
        for Summary { key, more } in self.due.drain(..) {
            let n = thousands(more);
            let (level, addr, what) = match key {
                Some((ip, event)) => (event.level(), ip.to_string(), event.what()),
                None => (
                    Level::Warn,
                    "other addresses".to_string(),
                    format!("refusals and closes past {SUMMARY_KEYS} addresses and reasons"),
                ),
            };
            let reason = key.map_or("many", |(_, e)| e.label());
            log_fields(
                level,
                format_args!("… and {n} more from {addr} in {window}: {what}"),
                &[
                    ("addr", Field::Str(&addr)),
                    ("reason", Field::Str(reason)),
                    ("more", Field::Num(more)),
                ],
            );
        }
    }
}

/// `10 s`, `0.5 s`.
fn secs(d: Duration) -> String {
    format!("{} s", d.as_secs_f64())
}

/// The first line of `text`, trimmed, at most [`MAX_DETAIL`] characters.
fn short(text: &str) -> String {
    let line = text.lines().next().unwrap_or("").trim();
    match line.char_indices().nth(MAX_DETAIL) {
        Some((i, _)) => format!("{}…", &line[..i]),
        None => line.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const W: Duration = Duration::from_secs(10);

    fn ip(n: u8) -> IpAddr {
        IpAddr::from([10, 0, 0, n])
    }

    const FLOOD: Event = Event::Refused(Refusal::TooManyFromAddress, Some(429));

    #[test]
    fn the_first_of_a_pair_is_written_the_repeats_summed_up_when_the_window_ends() {
        let t0 = Instant::now();
        let mut s = Summariser::new(W, 16);
        let mut due = Vec::new();
        assert!(s.note(t0, ip(7), FLOOD, &mut due));
        for i in 1..=4312u64 {
            assert!(!s.note(t0 + Duration::from_millis(i), ip(7), FLOOD, &mut due));
        }
        // Another reason, or another address, is a pair of its own.
        let idle = Event::Closed(Close::Idle);
        assert!(s.note(t0, ip(7), idle, &mut due));
        assert!(s.note(t0, ip(8), FLOOD, &mut due));
        assert_eq!(s.next_flush(), Some(t0 + W));
        s.flush(t0 + W - Duration::from_millis(1), &mut due);
        assert!(due.is_empty(), "nothing before the window ends");
        s.flush(t0 + W, &mut due);
        assert_eq!(
            due,
            [Summary {
                key: Some((ip(7), FLOOD)),
                more: 4312
            }],
            "pairs that held nothing back say nothing"
        );
        assert_eq!(s.tracked(), 0);
        assert_eq!(s.next_flush(), None, "nothing left to flush");
        // After the window the next one is written again.
        due.clear();
        assert!(s.note(t0 + W, ip(7), FLOOD, &mut due));
        assert!(due.is_empty());
    }

    #[test]
    fn a_pair_seen_again_after_its_window_is_summed_up_at_once() {
        let t0 = Instant::now();
        let mut s = Summariser::new(W, 16);
        let mut due = Vec::new();
        assert!(s.note(t0, ip(1), FLOOD, &mut due));
        assert!(!s.note(t0, ip(1), FLOOD, &mut due));
        // No flush ran (the loop was busy): the late event ends the window itself.
        assert!(s.note(t0 + W * 2, ip(1), FLOOD, &mut due));
        assert_eq!(
            due,
            [Summary {
                key: Some((ip(1), FLOOD)),
                more: 1
            }]
        );
    }

    #[test]
    fn memory_is_bounded_pairs_past_the_cap_share_one_summary() {
        let t0 = Instant::now();
        let mut s = Summariser::new(W, 4);
        let mut due = Vec::new();
        let mut written = 0;
        for n in 0..200u8 {
            for _ in 0..10 {
                written += usize::from(s.note(t0, ip(n), FLOOD, &mut due));
            }
        }
        assert_eq!(s.tracked(), 4);
        // Four pairs and one line for the rest.
        assert_eq!(written, 5);
        s.flush(t0 + W, &mut due);
        let total: u64 = due.iter().map(|d| d.more).sum();
        assert_eq!(total, 2000 - 5, "every held-back line is in a summary");
        assert!(due.iter().any(|d| d.key.is_none()));
        assert_eq!((s.tracked(), s.next_flush()), (0, None));
    }

    #[test]
    fn flush_waits_for_the_earliest_window_still_open() {
        let t0 = Instant::now();
        let mut s = Summariser::new(W, 16);
        let mut due = Vec::new();
        s.note(t0, ip(1), FLOOD, &mut due);
        s.note(t0 + Duration::from_secs(4), ip(2), FLOOD, &mut due);
        s.note(t0 + Duration::from_secs(5), ip(2), FLOOD, &mut due);
        s.flush(t0 + W, &mut due);
        assert!(due.is_empty());
        assert_eq!(s.next_flush(), Some(t0 + Duration::from_secs(14)));
        s.flush(t0 + Duration::from_secs(14), &mut due);
        assert_eq!(due.len(), 1);
    }

    #[test]
    fn counts_render_every_reason_for_prometheus() {
        let t0 = Instant::now();
        let mut r = Report::new(W);
        r.refused(t0, ip(1), Refusal::Forbidden, Some(403), || {
            "origin not allowed\n".into()
        });
        r.refused(t0, ip(1), Refusal::Forbidden, Some(403), || {
            "origin not allowed\n".into()
        });
        r.closed(t0, ip(2), Close::SlowConsumer);
        r.closed(t0, ip(2), Close::Shutdown);
        let mut out = String::new();
        r.counts().prometheus(&mut out);
        assert!(
            out.contains("chatterbox_refused_total{reason=\"forbidden\"} 2\n"),
            "{out}"
        );
        assert!(out.contains("chatterbox_refused_total{reason=\"bad_request\"} 0\n"));
        assert!(out.contains("chatterbox_closed_total{reason=\"slow_consumer\"} 1\n"));
        assert!(out.contains("chatterbox_closed_total{reason=\"shutdown\"} 1\n"));
        let lines = out.lines().filter(|l| !l.starts_with('#')).count();
        assert_eq!(lines, Refusal::ALL.len() + Close::COUNTED);
    }

    #[test]
    fn details_are_one_short_line() {
        assert_eq!(short("origin not allowed\n"), "origin not allowed");
        assert_eq!(short("a\nb"), "a");
        let long = "é".repeat(500);
        assert_eq!(short(&long).chars().count(), MAX_DETAIL + 1);
        assert_eq!(short(""), "");
    }
}
