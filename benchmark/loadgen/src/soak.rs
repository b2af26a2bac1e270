//! `soak`: a long, bounded run of steady chat traffic with churn, against chatterbox only.
//!
//! - **Stable members** (`--rooms` R × `--room-size` N) connect once and stay. Each is in
//!   `general` and in its own room, and checks every room message it gets: the per-room `id`
//!   must be exactly the last one + 1 (gaps, duplicates and out-of-order arrivals are
//!   counted), and the steady messages of each sender of its room must arrive in sequence.
//!   The first member of each room is its *witness*: it remembers which churner message got
//!   which id, so every `ack` a churner got can be checked against what the room delivered.
//! - **Steady senders** (`--senders-per-room` of each room's stable members) send an open-loop
//!   schedule at `--rate` messages/s in total; message `k` is due at `t0 + k / rate` and
//!   carries that intended time, so latency includes any stall of the server.
//! - **Churners** (`--churners` C at once) loop: connect (half with `?name=`), join 1–3
//!   random rooms, send 1–`--churn-msgs` messages with `request_id` (each must get its `ack`),
//!   sometimes `leave` (must be acked; nothing of that room may follow the ack), then close
//!   with a close frame, or drop the socket (FIN), or reset it (RST); pause; again.
//!   While in a room a churner checks its ids like a stable member.
//! - **Resume**: every `--resume-every` seconds one churner cycle is a resume check: join a
//!   room, note the last id seen, disconnect, stay away 1–3 s, reconnect and `join` with
//!   `since`: the `history` must hold exactly the missed ids (last+1 ..), `more:false`, and
//!   live messages must go on from there without a gap.
//!
//! - **Failover** (`--failover`, for a cluster whose node is killed during the run): a
//!   connection lost without a close frame, or a connect refused, counts as a *loss* (with its
//!   time and server address, for the runner to hold against the kill) instead of a problem.
//!   That address is avoided for a second. A stable member comes back on another address
//!   (under a new name: its old one may stay claimed until the dead node times out) and joins
//!   its room with `since` = the last id it saw: the `history` must hold exactly the missed
//!   ids, which count as deliveries (steady sequence, witness) like live ones. A churner's
//!   cut cycle counts its unanswered acks as *cut*, not missing. A steady message that was
//!   sent on a lost connection without coming back to its sender, or not sent while its
//!   sender was away, is *unsure*: it may be missing from every member's sequence (the ids
//!   still may not have a gap), and it is not expected at the end.
//!
//! At the end the schedule stops, in-flight cycles finish, and the drain waits until every
//! stable member has every steady message and the members of each room agree on its last id.
//! Counters go into one bucket per `--bucket` seconds (the runner joins them with its samples
//! of the server's RSS and file descriptors).

use std::collections::{BTreeMap, HashMap};
use std::net::{Ipv4Addr, SocketAddrV4};
use std::time::Duration;

use hdrhistogram::Histogram;
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

use crate::clock::{NS, cpu_ns, mono_ns, secs};
use crate::proto::{self, Stamp};
use crate::report;
use crate::ws::{Conn, Ev, Net};

pub struct SoakCfg {
    /// The server addresses; connection i goes to `targets[i % len]`.
    pub targets: Vec<SocketAddrV4>,
    pub srcs: Vec<Ipv4Addr>,
    pub path: String,
    pub name_prefix: String,
    pub concurrency: u32,
    pub rooms: u32,
    pub room_size: u32,
    pub senders_per_room: u32,
    pub rate: f64,
    pub seconds: f64,
    pub churners: u32,
    /// Mean seconds a churner stays connected per cycle (uniform 0.2x .. 1.8x).
    pub dwell: f64,
    pub churn_msgs: u32,
    pub resume_every: f64,
    pub ack_timeout: f64,
    pub drain: f64,
    pub msg_size: usize,
    pub bucket: f64,
    pub seed: u64,
    pub setup_timeout: f64,
    pub deadline: u64,
    pub quiet: bool,
    /// Connections may be lost with their node (see the module doc).
    pub failover: bool,
}

impl SoakCfg {
    pub fn params(&self) -> Value {
        json!({
            "rooms": self.rooms, "room_size": self.room_size,
            "stable_members": self.rooms * self.room_size,
            "senders_per_room": self.senders_per_room,
            "senders": self.rooms * self.senders_per_room,
            "rate": self.rate, "seconds": self.seconds, "churners": self.churners,
            "dwell_s": self.dwell, "churn_msgs": self.churn_msgs,
            "resume_every_s": self.resume_every, "ack_timeout_s": self.ack_timeout,
            "drain_s": self.drain, "msg_size": self.msg_size, "bucket_s": self.bucket,
            "seed": self.seed, "failover": self.failover,
            "targets": self.targets.iter().map(|t| t.to_string()).collect::<Vec<_>>(),
        })
    }
}

/// splitmix64: small, seedable, good enough to pick rooms and times.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
    /// Uniform in [0, 1).
    fn unit(&mut self) -> f64 {
        (self.next() >> 11) as f64 / (1u64 << 53) as f64
    }
    fn below(&mut self, n: u32) -> u32 {
        (self.next() % n.max(1) as u64) as u32
    }
    fn ns(&mut self, lo_s: f64, hi_s: f64) -> u64 {
        ((lo_s + (hi_s - lo_s) * self.unit()) * 1e9) as u64
    }
}

macro_rules! counters {
    ($($f:ident),* $(,)?) => {
        /// Everything counted, cumulative; a bucket holds the difference of two snapshots.
        #[derive(Default, Clone, Copy, Serialize, Deserialize, Debug)]
        pub struct Counters { $(pub $f: u64),* }
        impl Counters {
            fn minus(&self, o: &Counters) -> Counters {
                Counters { $($f: self.$f - o.$f),* }
            }
        }
    };
}

counters!(
    steady_sent,
    steady_delivered,
    room_msgs_checked,
    gaps,
    duplicates,
    out_of_order,
    seq_gaps,
    seq_duplicates,
    untracked,
    after_leave,
    notices,
    churn_cycles,
    connects,
    named_connects,
    connect_failures,
    welcome_timeouts,
    join_timeouts,
    joins,
    closes_clean,
    closes_fin,
    closes_rst,
    close_timeouts,
    leaves,
    churn_msgs_sent,
    acks,
    acks_missing,
    acks_unknown,
    resume_checks,
    resume_ok,
    resume_failures,
    resume_replayed,
    pings,
    pongs,
    server_errors,
    unexpected_closes,
    bad_events,
    losses,
    refused_connects,
    stable_lost,
    stable_rejoins,
    rejoin_failures,
    rejoin_replayed,
    acks_cut,
    resume_cut,
    steady_unsure,
    seq_unsure_skipped,
);

/// Ids of one room as seen by one connection.
struct Track {
    room: u32,
    /// Last id seen, and bit i set when id `last - i` was seen.
    last: u64,
    mask: u64,
    /// Gaps, duplicates, reorders on this track.
    bad: u32,
    /// Room messages after the baseline.
    live: u32,
    /// `leave` sent (messages until its ack are fine), and its ack came (nothing may follow).
    leaving: bool,
    left: bool,
}

impl Track {
    fn new(room: u32, last: u64) -> Track {
        Track {
            room,
            last,
            mask: u64::MAX,
            bad: 0,
            live: 0,
            leaving: false,
            left: false,
        }
    }

    fn check(&mut self, id: u64, c: &mut Counters) {
        self.live += 1;
        if id == self.last + 1 {
            self.last = id;
            self.mask = (self.mask << 1) | 1;
        } else if id > self.last {
            let skip = id - self.last;
            c.gaps += skip - 1;
            self.bad += 1;
            self.mask = if skip >= 64 {
                1
            } else {
                (self.mask << skip) | 1
            };
            self.last = id;
        } else {
            let back = self.last - id;
            self.bad += 1;
            if back < 64 && self.mask & (1 << back) == 0 {
                c.out_of_order += 1;
                self.mask |= 1 << back;
            } else {
                c.duplicates += 1;
            }
        }
    }
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Who {
    Stable(u32),
    Churn(u32),
}

pub struct Peer {
    who: Who,
    epoch: u32,
    welcomed: bool,
    ready: bool,
    tracks: Vec<Track>,
    /// Stable members: the next sequence number of each steady sender of its room.
    seq_next: Vec<u32>,
    got_steady: u64,
    /// A stable member back after a loss: join its room with this `since`.
    rejoin_since: Option<u64>,
}

impl Peer {
    fn new(who: Who, epoch: u32) -> Peer {
        Peer {
            who,
            epoch,
            welcomed: false,
            ready: false,
            tracks: Vec::new(),
            seq_next: Vec::new(),
            got_steady: 0,
            rejoin_since: None,
        }
    }
    fn track(&mut self, room: u32) -> Option<&mut Track> {
        self.tracks.iter_mut().find(|t| t.room == room)
    }
}

const GENERAL: u32 = u32::MAX;

#[derive(Clone, Copy)]
enum Phase {
    Pause { until: u64 },
    Connecting { deadline: u64 },
    Joining { deadline: u64 },
    Dwell { until: u64 },
    AwaitAcks,
    WantClose,
    Closing { deadline: u64 },
    Done,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Resume {
    No,
    /// First visit: join `room`, then leave and remember the last id.
    First {
        room: u32,
    },
    /// Back with `since`; `ok` after the history checked out.
    Second {
        room: u32,
        since: u64,
        ok: bool,
    },
}

enum PendKind {
    Msg { room: u32, seq: u32, t_ns: u64 },
    Leave,
}

struct Pending {
    rid: u64,
    kind: PendKind,
    deadline: u64,
}

struct Churner {
    phase: Phase,
    slot: Option<usize>,
    epoch: u32,
    /// Global cycle number of the current cycle (stamps carry it as the sender).
    cycle: u32,
    rooms: Vec<u32>,
    joins_left: u32,
    sends: Vec<u64>,
    seq: u32,
    next_rid: u64,
    pending: Vec<Pending>,
    resume: Resume,
    /// This cycle sent its `leave` already.
    did_leave: bool,
}

struct World<'a> {
    cfg: &'a SoakCfg,
    rng: Rng,
    c: Counters,
    errors: BTreeMap<String, u64>,
    close_codes: BTreeMap<String, u64>,
    fail_kinds: BTreeMap<String, u64>,
    notes: Vec<String>,
    lat: Histogram<u64>,
    bucket_lat: Histogram<u64>,
    churn_lat: Histogram<u64>,
    ack_lat: Histogram<u64>,
    churners: Vec<Churner>,
    cycles: u32,
    /// Per room: churner message id -> (cycle, seq), as the room's witness saw it.
    witness: Vec<HashMap<u64, (u32, u32)>>,
    /// (room, id, cycle, seq) of every acked churner message.
    acked: Vec<(u32, u64, u32, u32)>,
    stable_welcomed: u64,
    stable_ready: u64,
    stable_failed: u64,
    stopping: bool,
    scratch: Vec<u8>,
    /// Stable member -> its connection's slot (usize::MAX while it has none).
    slot_of: Vec<usize>,
    /// Per server address: avoid it until then (mono ns), after a loss there.
    down_until: Vec<u64>,
    /// Every loss: (mono ns, server address index, what).
    loss_events: Vec<(u64, usize, &'static str)>,
    /// Stable members lost with their node, waiting to come back: (when, state).
    rejoins: Vec<(u64, Peer)>,
    /// Per steady sender (room * spr + j): the next sequence number to send, and the inclusive
    /// ranges of unsure ones (sent on a lost connection, or not sent while away).
    sent_next: Vec<u32>,
    unsure: Vec<Vec<(u32, u32)>>,
    /// Per room: unsure steady messages (not expected at the end).
    unsure_per_room: Vec<u64>,
    /// Names of stable members back after a loss: `s{m}r{n}`.
    rejoin_serial: u32,
}

#[derive(Deserialize)]
struct BcastEv<'a> {
    #[serde(borrow)]
    room: &'a str,
    id: Option<u64>,
}

#[derive(Deserialize)]
struct HistMsg {
    id: u64,
    #[serde(default)]
    message: String,
}

#[derive(Deserialize)]
struct HistoryEv<'a> {
    #[serde(borrow)]
    room: &'a str,
    messages: Vec<HistMsg>,
    more: bool,
}

#[derive(Deserialize)]
struct AckEv<'a> {
    #[serde(borrow)]
    request_id: &'a str,
    id: Option<u64>,
}

#[derive(Deserialize)]
struct ErrorEv<'a> {
    #[serde(borrow)]
    code: &'a str,
    #[serde(borrow, default)]
    request_id: Option<&'a str>,
}

/// Keeps the first few problem descriptions for the report.
fn note(notes: &mut Vec<String>, s: String) {
    if notes.len() < 50 {
        notes.push(s);
    }
}

fn room_name(r: u32) -> String {
    if r == GENERAL {
        "general".into()
    } else {
        format!("soak{r}")
    }
}

fn room_index(name: &str) -> Option<u32> {
    if name == "general" {
        return Some(GENERAL);
    }
    name.strip_prefix("soak")?.parse().ok()
}

fn json_str(out: &mut Vec<u8>, s: &str) {
    out.push(b'"');
    out.extend_from_slice(s.as_bytes());
    out.push(b'"');
}

impl World<'_> {
    fn stable_room(&self, m: u32) -> u32 {
        m / self.cfg.room_size
    }

    fn is_witness(&self, m: u32) -> bool {
        m.is_multiple_of(self.cfg.room_size)
    }

    fn on_event(&mut self, conn: &mut Conn<Peer>, ev: Ev<'_>, now: u64) {
        match ev {
            Ev::Opened => {}
            Ev::Failed(why) if self.cfg.failover && self.fails_over(conn) => {
                self.c.refused_connects += 1;
                if self.c.refused_connects <= 3 {
                    note(&mut self.notes, format!("failover: connect failed: {why}"));
                }
                self.lost(conn, now, "refused");
            }
            Ev::Closed { code: None } if self.cfg.failover && self.fails_over(conn) => {
                self.lost(conn, now, "lost");
            }
            Ev::Failed(why) => {
                self.c.connect_failures += 1;
                *self.fail_kinds.entry(why.clone()).or_default() += 1;
                match conn.user.who {
                    Who::Stable(_) => self.stable_failed += 1,
                    Who::Churn(i) => self.churner_gone(i, conn.user.epoch, now, true, false),
                }
            }
            Ev::Closed { code } => {
                let code_s = code.map_or("none".to_string(), |c| c.to_string());
                match conn.user.who {
                    Who::Stable(m) => {
                        self.c.unexpected_closes += 1;
                        *self
                            .close_codes
                            .entry(format!("stable {code_s}"))
                            .or_default() += 1;
                        note(
                            &mut self.notes,
                            format!("stable member {m} closed by the server ({code_s})"),
                        );
                        if !conn.user.ready {
                            self.stable_failed += 1;
                        }
                    }
                    Who::Churn(i) => {
                        let ch = &self.churners[i as usize];
                        if ch.epoch == conn.user.epoch && matches!(ch.phase, Phase::Closing { .. })
                        {
                            self.c.closes_clean += 1;
                            self.churner_gone(i, conn.user.epoch, now, false, false);
                        } else {
                            self.c.unexpected_closes += 1;
                            *self
                                .close_codes
                                .entry(format!("churner {code_s}"))
                                .or_default() += 1;
                            self.churner_gone(i, conn.user.epoch, now, true, false);
                        }
                    }
                }
            }
            Ev::Text(t) => self.on_text(conn, t, now),
        }
    }

    /// Whether a lost connection is a failover case: a churner, or a stable member that had
    /// joined its room (one that never got there failed its setup).
    fn fails_over(&self, conn: &Conn<Peer>) -> bool {
        match conn.user.who {
            Who::Stable(_) => conn.user.ready,
            Who::Churn(i) => {
                let ch = &self.churners[i as usize];
                ch.epoch == conn.user.epoch && !matches!(ch.phase, Phase::Closing { .. })
            }
        }
    }

    /// A connection lost with its node (`--failover`): note it, avoid that address for a
    /// second, and bring the member back (a stable one on another address; a churner's
    /// cycle ends, its unanswered acks cut).
    fn lost(&mut self, conn: &mut Conn<Peer>, now: u64, what: &'static str) {
        let t = conn.target;
        self.c.losses += 1;
        if self.loss_events.len() < 20_000 {
            self.loss_events.push((now, t, what));
        }
        if let Some(d) = self.down_until.get_mut(t) {
            *d = (*d).max(now + NS);
        }
        match conn.user.who {
            Who::Churn(i) => self.churner_gone(i, conn.user.epoch, now, true, true),
            Who::Stable(m) => {
                self.slot_of[m as usize] = usize::MAX;
                if what == "lost" {
                    self.c.stable_lost += 1;
                }
                let spr = self.cfg.senders_per_room.clamp(1, self.cfg.room_size);
                let j = m % self.cfg.room_size;
                let p = &mut conn.user;
                if j < spr {
                    // Its own messages it has not seen come back may or may not be stored.
                    let g = (self.stable_room(m) * spr + j) as usize;
                    let lo = p.seq_next[j as usize];
                    let hi = self.sent_next[g];
                    if hi > lo {
                        self.mark_unsure(g, lo, hi - 1);
                    }
                }
                let since = p
                    .rejoin_since
                    .or_else(|| p.track(self.stable_room(m)).map(|t| t.last))
                    .unwrap_or(0);
                let back = Peer {
                    who: p.who,
                    epoch: p.epoch + 1,
                    welcomed: false,
                    ready: true,
                    tracks: std::mem::take(&mut p.tracks),
                    seq_next: std::mem::take(&mut p.seq_next),
                    got_steady: p.got_steady,
                    rejoin_since: Some(since),
                };
                // Spread the reconnects a little, as real clients' back-off would.
                let at = now + self.rng.ns(0.05, 0.5);
                self.rejoins.push((at, back));
            }
        }
    }

    /// Steady messages `lo..=hi` of sender `g` are unsure (see the module doc).
    fn mark_unsure(&mut self, g: usize, lo: u32, hi: u32) {
        // Sequence numbers only grow: only the last range can overlap.
        let lo = match self.unsure[g].last() {
            Some(&(_, b)) if b >= lo => b + 1,
            _ => lo,
        };
        if lo > hi {
            return;
        }
        let n = (hi - lo + 1) as u64;
        self.c.steady_unsure += n;
        let spr = self.cfg.senders_per_room.clamp(1, self.cfg.room_size) as usize;
        self.unsure_per_room[g / spr] += n;
        let r = &mut self.unsure[g];
        match r.last_mut() {
            Some(last) if last.1 + 1 >= lo => last.1 = last.1.max(hi),
            _ => r.push((lo, hi)),
        }
    }

    /// Whether every steady message `lo..=hi` of sender `g` is unsure.
    fn all_unsure(&self, g: usize, lo: u32, hi: u32) -> bool {
        let mut at = lo;
        for &(a, b) in &self.unsure[g] {
            if a <= at && at <= b {
                at = b + 1;
                if at > hi {
                    return true;
                }
            }
        }
        at > hi
    }

    /// The server address to connect to: `preferred`, or the next one not avoided.
    fn pick_target(&self, preferred: usize, now: u64) -> usize {
        let n = self.down_until.len().max(1);
        (0..n)
            .map(|k| (preferred + k) % n)
            .find(|&t| self.down_until[t] <= now)
            .unwrap_or(preferred % n)
    }

    /// A churner's connection ended (closed, failed): pause, then the next cycle. `cut`: it
    /// was lost with its node, so its unanswered acks are cut, not missing.
    fn churner_gone(&mut self, i: u32, epoch: u32, now: u64, early: bool, cut: bool) {
        let ch = &mut self.churners[i as usize];
        if ch.epoch != epoch {
            return;
        }
        ch.slot = None;
        if early {
            // A cycle cut short: its pending acks will never come.
            if cut {
                self.c.acks_cut += ch.pending.len() as u64;
            } else {
                self.c.acks_missing += ch.pending.len() as u64;
            }
            ch.pending.clear();
            if !matches!(ch.resume, Resume::No) {
                ch.resume = Resume::No;
                if cut {
                    self.c.resume_cut += 1;
                } else {
                    self.c.resume_failures += 1;
                }
            }
        }
        let wait = if matches!(ch.resume, Resume::Second { ok: false, .. }) {
            // Away for a while so that the room moves on: there is something to resume.
            self.rng.ns(1.0, 3.0)
        } else {
            self.rng.ns(0.0, 0.5)
        };
        ch.phase = if self.stopping {
            Phase::Done
        } else {
            Phase::Pause { until: now + wait }
        };
    }

    fn on_text(&mut self, conn: &mut Conn<Peer>, t: &[u8], now: u64) {
        match proto::event_name(t) {
            b"broadcast" => {
                let Ok(ev) = serde_json::from_slice::<BcastEv>(t) else {
                    self.c.bad_events += 1;
                    return;
                };
                let Some(id) = ev.id else {
                    self.c.notices += 1;
                    return;
                };
                let Some(room) = room_index(ev.room) else {
                    self.c.untracked += 1;
                    return;
                };
                self.c.room_msgs_checked += 1;
                let stamp = proto::find_stamp(t);
                let p = &mut conn.user;
                match p.track(room) {
                    Some(tr) if tr.left => {
                        self.c.after_leave += 1;
                        return;
                    }
                    Some(tr) if tr.leaving => return,
                    Some(tr) => tr.check(id, &mut self.c),
                    None => {
                        self.c.untracked += 1;
                        return;
                    }
                }
                let Some(s) = stamp else { return };
                self.seen(p, room, id, s, now, true);
            }
            b"history" => {
                let Ok(ev) = serde_json::from_slice::<HistoryEv>(t) else {
                    self.c.bad_events += 1;
                    return;
                };
                let Some(room) = room_index(ev.room) else {
                    self.c.untracked += 1;
                    return;
                };
                self.on_history(conn, room, &ev, now);
            }
            b"ack" => {
                let Ok(ev) = serde_json::from_slice::<AckEv>(t) else {
                    self.c.bad_events += 1;
                    return;
                };
                self.on_ack(conn, ev.request_id, ev.id, now);
            }
            b"pong" => self.c.pongs += 1,
            b"error" => {
                self.c.server_errors += 1;
                let (code, rid) = match serde_json::from_slice::<ErrorEv>(t) {
                    Ok(e) => (e.code.to_string(), e.request_id.map(str::to_string)),
                    Err(_) => ("unparsed".into(), None),
                };
                *self.errors.entry(code.clone()).or_default() += 1;
                note(
                    &mut self.notes,
                    format!(
                        "error event: {}",
                        String::from_utf8_lossy(&t[..t.len().min(300)])
                    ),
                );
                // An error instead of an ack: the ack will not come; count it missing now.
                if let (Who::Churn(i), Some(rid)) = (conn.user.who, rid)
                    && let Ok(rid) = rid.parse::<u64>()
                {
                    let ch = &mut self.churners[i as usize];
                    if let Some(k) = ch.pending.iter().position(|p| p.rid == rid) {
                        ch.pending.remove(k);
                        self.c.acks_missing += 1;
                    }
                }
            }
            _ => {}
        }
    }

    /// A stamped room message a stable member got (`live`), or found in the `history` of its
    /// rejoin: the steady sequence of its room's senders, and the witness's record of churner
    /// messages. Only live ones count for latency.
    fn seen(&mut self, p: &mut Peer, room: u32, id: u64, s: Stamp, now: u64, live: bool) {
        let Who::Stable(m) = p.who else { return };
        if s.step == 1 && s.room == room {
            let spr = self.cfg.senders_per_room;
            if s.sender / spr == self.stable_room(m) {
                let next = p.seq_next[(s.sender % spr) as usize];
                if s.seq < next {
                    self.c.seq_duplicates += 1;
                } else {
                    if s.seq > next {
                        let n = (s.seq - next) as u64;
                        if self.all_unsure(s.sender as usize, next, s.seq - 1) {
                            self.c.seq_unsure_skipped += n;
                        } else {
                            self.c.seq_gaps += n;
                        }
                    }
                    p.seq_next[(s.sender % spr) as usize] = s.seq + 1;
                }
                p.got_steady += 1;
                self.c.steady_delivered += 1;
                if live {
                    let us = now.saturating_sub(s.t_ns) / 1000;
                    report::record(&mut self.lat, us);
                    report::record(&mut self.bucket_lat, us);
                }
            }
        } else if s.step == 2 && self.is_witness(m) && room == self.stable_room(m) {
            // (A repeated id was counted as a duplicate by the track.)
            self.witness[room as usize].insert(id, (s.sender, s.seq));
            if live {
                report::record(&mut self.churn_lat, now.saturating_sub(s.t_ns) / 1000);
            }
        }
    }

    fn send_join(&mut self, conn: &mut Conn<Peer>, room: u32, since: Option<u64>) {
        self.scratch.clear();
        self.scratch
            .extend_from_slice(b"{\"command\":\"join\",\"room\":");
        json_str(&mut self.scratch, &room_name(room));
        if let Some(since) = since {
            self.scratch
                .extend_from_slice(format!(",\"since\":{since}").as_bytes());
        }
        self.scratch.push(b'}');
        conn.send_text(&self.scratch);
    }

    /// The `history` of a stable member's rejoin: exactly the ids after `since`, each
    /// counted as a delivery; then the track goes on from the last of them.
    fn rejoin_history(
        &mut self,
        conn: &mut Conn<Peer>,
        room: u32,
        since: u64,
        ev: &HistoryEv,
        now: u64,
    ) {
        let ids: Vec<u64> = ev.messages.iter().map(|m| m.id).collect();
        let exact = ids
            .iter()
            .enumerate()
            .all(|(k, &id)| id == since + 1 + k as u64);
        if !exact || ev.more {
            self.c.rejoin_failures += 1;
            let head: Vec<u64> = ids.iter().take(5).copied().collect();
            note(
                &mut self.notes,
                format!(
                    "rejoin failed: room {} since {since}: got {} ids starting {head:?}, more={}",
                    room_name(room),
                    ids.len(),
                    ev.more
                ),
            );
        }
        self.c.stable_rejoins += 1;
        self.c.rejoin_replayed += ids.len() as u64;
        let p = &mut conn.user;
        let mut last = since;
        for msg in &ev.messages {
            if let Some(tr) = p.track(room) {
                tr.check(msg.id, &mut self.c);
                self.c.room_msgs_checked += 1;
            }
            last = last.max(msg.id);
            if let Some(s) = proto::find_stamp(msg.message.as_bytes()) {
                self.seen(p, room, msg.id, s, now, false);
            }
        }
        p.tracks.retain(|t| t.room != room);
        p.tracks.push(Track::new(room, last));
        p.rejoin_since = None;
    }

    fn on_history(&mut self, conn: &mut Conn<Peer>, room: u32, ev: &HistoryEv, now: u64) {
        let last = ev.messages.last().map_or(0, |m| m.id);
        let welcome = !conn.user.welcomed && room == GENERAL;
        if welcome {
            conn.user.welcomed = true;
        }
        if let Who::Stable(m) = conn.user.who
            && let Some(since) = conn.user.rejoin_since
        {
            if welcome {
                conn.user.tracks.retain(|t| t.room != GENERAL);
                conn.user.tracks.push(Track::new(GENERAL, last));
                self.send_join(conn, self.stable_room(m), Some(since));
            } else if room == self.stable_room(m) {
                self.rejoin_history(conn, room, since, ev, now);
            } else {
                self.c.untracked += 1;
            }
            return;
        }
        let p = &mut conn.user;
        match p.who {
            Who::Stable(m) => {
                p.tracks.retain(|t| t.room != room);
                p.tracks.push(Track::new(room, last));
                if welcome {
                    self.stable_welcomed += 1;
                    let r = self.stable_room(m);
                    self.send_join(conn, r, None);
                } else if room == self.stable_room(m) && !p.ready {
                    p.ready = true;
                    self.stable_ready += 1;
                }
            }
            Who::Churn(i) => {
                let ch = &mut self.churners[i as usize];
                if ch.epoch != p.epoch {
                    return;
                }
                if welcome {
                    p.tracks.push(Track::new(GENERAL, last));
                    if !matches!(ch.phase, Phase::Connecting { .. }) {
                        return;
                    }
                    for &r in &ch.rooms {
                        self.scratch.clear();
                        self.scratch
                            .extend_from_slice(b"{\"command\":\"join\",\"room\":");
                        json_str(&mut self.scratch, &room_name(r));
                        if let Resume::Second { room, since, .. } = ch.resume
                            && room == r
                        {
                            self.scratch
                                .extend_from_slice(format!(",\"since\":{since}").as_bytes());
                        }
                        self.scratch.push(b'}');
                        conn.send_text(&self.scratch);
                    }
                    self.c.joins += ch.rooms.len() as u64;
                    ch.joins_left = ch.rooms.len() as u32;
                    ch.phase = Phase::Joining {
                        deadline: now + 10 * NS,
                    };
                    return;
                }
                if !matches!(ch.phase, Phase::Joining { .. }) || !ch.rooms.contains(&room) {
                    self.c.untracked += 1;
                    return;
                }
                let mut base = last;
                if let Resume::Second {
                    room: rr, since, ..
                } = ch.resume
                    && rr == room
                {
                    // Exactly since+1, since+2, ..: every missed id, in order, nothing more.
                    self.c.resume_checks += 1;
                    let ids: Vec<u64> = ev.messages.iter().map(|m| m.id).collect();
                    let exact = ids
                        .iter()
                        .enumerate()
                        .all(|(k, &id)| id == since + 1 + k as u64);
                    let ok = exact && !ev.more && !ids.is_empty();
                    self.c.resume_replayed += ids.len() as u64;
                    if !ok {
                        self.c.resume_failures += 1;
                        ch.resume = Resume::No;
                        let head: Vec<u64> = ids.iter().take(5).copied().collect();
                        let n = ids.len();
                        let more = ev.more;
                        note(
                            &mut self.notes,
                            format!(
                                "resume failed: room {} since {since}: got {n} ids starting {head:?}, more={more}",
                                room_name(room)
                            ),
                        );
                    } else {
                        ch.resume = Resume::Second {
                            room,
                            since,
                            ok: true,
                        };
                    }
                    base = if ids.is_empty() { since } else { last };
                }
                p.tracks.retain(|t| t.room != room);
                p.tracks.push(Track::new(room, base));
                ch.joins_left = ch.joins_left.saturating_sub(1);
                if ch.joins_left == 0 {
                    self.start_dwell(i, now);
                }
            }
        }
    }

    fn start_dwell(&mut self, i: u32, now: u64) {
        let cfg = self.cfg;
        let ch = &mut self.churners[i as usize];
        let (len, n) = match ch.resume {
            // Back with `since`: watch the live messages go on from the replayed ones.
            Resume::Second { .. } => (2 * NS, 0),
            Resume::First { .. } => (self.rng.ns(0.5, 2.0), 1),
            Resume::No => (
                self.rng.ns(0.2 * cfg.dwell, 1.8 * cfg.dwell),
                1 + self.rng.below(cfg.churn_msgs.max(1)),
            ),
        };
        ch.sends.clear();
        for _ in 0..n {
            ch.sends.push(now + (len as f64 * self.rng.unit()) as u64);
        }
        ch.sends.sort_unstable_by(|a, b| b.cmp(a)); // pop() gives the earliest
        ch.phase = Phase::Dwell { until: now + len };
    }

    fn on_ack(&mut self, conn: &mut Conn<Peer>, rid: &str, id: Option<u64>, now: u64) {
        let Who::Churn(i) = conn.user.who else {
            self.c.acks_unknown += 1;
            return;
        };
        let ch = &mut self.churners[i as usize];
        let Some(k) = rid
            .parse::<u64>()
            .ok()
            .and_then(|rid| ch.pending.iter().position(|p| p.rid == rid))
        else {
            // Late (after its timeout) or never asked for.
            self.c.acks_unknown += 1;
            return;
        };
        let p = ch.pending.remove(k);
        self.c.acks += 1;
        match p.kind {
            PendKind::Msg { room, seq, t_ns } => {
                report::record(&mut self.ack_lat, now.saturating_sub(t_ns) / 1000);
                match id {
                    Some(id) => self.acked.push((room, id, ch.cycle, seq)),
                    None => {
                        self.c.bad_events += 1;
                        note(&mut self.notes, "ack of a broadcast without an id".into());
                    }
                }
            }
            PendKind::Leave => {
                for t in conn.user.tracks.iter_mut().filter(|t| t.leaving) {
                    t.left = true;
                }
            }
        }
    }

    /// Stable members lost with their node whose time to come back has come: connect to
    /// another address under a new name (the `since` join follows the welcome).
    fn rejoin_due(&mut self, net: &mut Net<Peer>, now: u64) {
        let mut k = 0;
        while k < self.rejoins.len() {
            if self.rejoins[k].0 > now {
                k += 1;
                continue;
            }
            let (_, p) = self.rejoins.swap_remove(k);
            let Who::Stable(m) = p.who else { continue };
            self.rejoin_serial += 1;
            let path = format!(
                "{}?name={}s{m}r{}",
                self.cfg.path, self.cfg.name_prefix, self.rejoin_serial
            );
            let target = self.pick_target(net.target_of(m) + 1, now);
            match net.connect_to(target, m, &path, p) {
                Ok(slot) => self.slot_of[m as usize] = slot,
                Err(e) => {
                    self.c.connect_failures += 1;
                    *self.fail_kinds.entry(e).or_default() += 1;
                }
            }
        }
    }

    /// Timers of every churner: connect, send, time out, close.
    fn tick(&mut self, net: &mut Net<Peer>, now: u64) {
        self.rejoin_due(net, now);
        for i in 0..self.churners.len() {
            // Acks that did not come in time.
            let ch = &mut self.churners[i];
            let before = ch.pending.len();
            ch.pending.retain(|p| p.deadline > now);
            let expired = (before - ch.pending.len()) as u64;
            if expired > 0 {
                self.c.acks_missing += expired;
                let cycle = ch.cycle;
                note(
                    &mut self.notes,
                    format!(
                        "churner {i} cycle {cycle}: {expired} acks did not come within {} s",
                        self.cfg.ack_timeout
                    ),
                );
            }
            let phase = self.churners[i].phase;
            match phase {
                Phase::Pause { until } if now >= until => {
                    if self.stopping {
                        self.churners[i].phase = Phase::Done;
                    } else {
                        self.connect(net, i as u32, now);
                    }
                }
                Phase::Connecting { deadline } | Phase::Joining { deadline } if now > deadline => {
                    if matches!(phase, Phase::Connecting { .. }) {
                        self.c.welcome_timeouts += 1;
                    } else {
                        self.c.join_timeouts += 1;
                    }
                    let ch = &mut self.churners[i];
                    let epoch = ch.epoch;
                    if let Some(slot) = ch.slot.take() {
                        net.drop_conn(slot, false);
                    }
                    self.churner_gone(i as u32, epoch, now, true, false);
                }
                Phase::Dwell { until } => {
                    while !self.stopping && self.churners[i].sends.last().is_some_and(|&t| t <= now)
                    {
                        self.churners[i].sends.pop();
                        self.send_churn_msg(net, i, now);
                    }
                    if now >= until || self.stopping {
                        let ch = &mut self.churners[i];
                        ch.sends.clear();
                        ch.phase = Phase::AwaitAcks;
                    }
                }
                Phase::AwaitAcks if self.churners[i].pending.is_empty() => {
                    self.after_acks(net, i, now)
                }
                Phase::WantClose => self.close(net, i, now),
                Phase::Closing { deadline } if now > deadline => {
                    self.c.close_timeouts += 1;
                    note(
                        &mut self.notes,
                        format!("churner {i}: no close frame back within 5 s of ours"),
                    );
                    let ch = &mut self.churners[i];
                    let epoch = ch.epoch;
                    if let Some(slot) = ch.slot.take() {
                        net.drop_conn(slot, false);
                    }
                    self.churner_gone(i as u32, epoch, now, false, false);
                }
                _ => {}
            }
        }
    }

    fn connect(&mut self, net: &mut Net<Peer>, i: u32, now: u64) {
        let cfg = self.cfg;
        let stable = cfg.rooms * cfg.room_size;
        self.cycles += 1;
        self.c.churn_cycles += 1;
        let cycle = self.cycles;
        let named = self.rng.below(2) == 0;
        let ch = &mut self.churners[i as usize];
        ch.epoch += 1;
        ch.cycle = cycle;
        ch.seq = 0;
        ch.did_leave = false;
        ch.pending.clear();
        ch.sends.clear();
        ch.rooms.clear();
        match ch.resume {
            Resume::Second { room, .. } | Resume::First { room } => ch.rooms.push(room),
            Resume::No => {
                let n = 1 + self.rng.below(3.min(cfg.rooms));
                while (ch.rooms.len() as u32) < n {
                    let r = self.rng.below(cfg.rooms);
                    if !ch.rooms.contains(&r) {
                        ch.rooms.push(r);
                    }
                }
            }
        }
        let path = if named {
            self.c.named_connects += 1;
            format!("{}?name={}c{cycle}", cfg.path, cfg.name_prefix)
        } else {
            cfg.path.clone()
        };
        self.c.connects += 1;
        // Each cycle on the next address: churn on every node, and a resume check's two
        // visits on two different nodes.
        let preferred = (stable + i + ch.epoch) as usize % net.targets();
        let epoch = ch.epoch;
        let target = self.pick_target(preferred, now);
        let ch = &mut self.churners[i as usize];
        match net.connect_to(target, stable + i, &path, Peer::new(Who::Churn(i), epoch)) {
            Ok(slot) => {
                ch.slot = Some(slot);
                ch.phase = Phase::Connecting {
                    deadline: now + 10 * NS,
                };
            }
            Err(e) => {
                self.c.connect_failures += 1;
                *self.fail_kinds.entry(e).or_default() += 1;
                ch.phase = Phase::Pause { until: now + NS };
            }
        }
    }

    fn send_churn_msg(&mut self, net: &mut Net<Peer>, i: usize, now: u64) {
        let cfg = self.cfg;
        let ch = &mut self.churners[i];
        let Some(conn) = ch.slot.and_then(|s| net.get_mut(s)) else {
            return;
        };
        let room = ch.rooms[self.rng.below(ch.rooms.len() as u32) as usize];
        let stamp = Stamp {
            step: 2,
            sender: ch.cycle,
            room,
            seq: ch.seq,
            t_ns: now,
        };
        ch.next_rid += 1;
        let rid = ch.next_rid;
        self.scratch.clear();
        proto::broadcast_command(&mut self.scratch, &room_name(room), &stamp, cfg.msg_size);
        self.scratch.pop(); // the closing brace
        self.scratch
            .extend_from_slice(format!(",\"request_id\":\"{rid}\"}}").as_bytes());
        conn.send_text(&self.scratch);
        ch.pending.push(Pending {
            rid,
            kind: PendKind::Msg {
                room,
                seq: ch.seq,
                t_ns: now,
            },
            deadline: now + (cfg.ack_timeout * 1e9) as u64,
        });
        ch.seq += 1;
        self.c.churn_msgs_sent += 1;
    }

    /// The cycle's messages are acked: maybe leave a room (and wait for that ack), then close.
    fn after_acks(&mut self, net: &mut Net<Peer>, i: usize, now: u64) {
        let cfg = self.cfg;
        let leave = !self.stopping && self.rng.unit() < 0.3;
        let ch = &mut self.churners[i];
        let resume = !matches!(ch.resume, Resume::No);
        if leave && !resume && !ch.did_leave {
            ch.did_leave = true;
            let room = ch.rooms[self.rng.below(ch.rooms.len() as u32) as usize];
            if let Some(conn) = ch.slot.and_then(|s| net.get_mut(s)) {
                if let Some(t) = conn.user.track(room) {
                    t.leaving = true;
                }
                ch.next_rid += 1;
                let rid = ch.next_rid;
                self.scratch.clear();
                self.scratch
                    .extend_from_slice(b"{\"command\":\"leave\",\"room\":");
                json_str(&mut self.scratch, &room_name(room));
                self.scratch
                    .extend_from_slice(format!(",\"request_id\":\"{rid}\"}}").as_bytes());
                conn.send_text(&self.scratch);
                ch.pending.push(Pending {
                    rid,
                    kind: PendKind::Leave,
                    deadline: now + (cfg.ack_timeout * 1e9) as u64,
                });
                self.c.leaves += 1;
                // Back to AwaitAcks; the next time round it closes (a leave already happened).
                return;
            }
        }
        ch.phase = Phase::WantClose;
        self.close(net, i, now);
    }

    fn close(&mut self, net: &mut Net<Peer>, i: usize, now: u64) {
        let style = self.rng.below(4); // 0,1: close frame; 2: FIN; 3: RST
        let ch = &mut self.churners[i];
        let epoch = ch.epoch;
        // Resume bookkeeping: the first visit hands its last id to the second.
        let mut fail_resume = false;
        if let Some(conn) = ch.slot.and_then(|s| net.get_mut(s)) {
            match ch.resume {
                Resume::First { room } => match conn.user.track(room) {
                    Some(t) => {
                        ch.resume = Resume::Second {
                            room,
                            since: t.last,
                            ok: false,
                        }
                    }
                    None => fail_resume = true,
                },
                Resume::Second { ok, room, .. } => {
                    let (bad, live) = conn.user.track(room).map_or((1, 0), |t| (t.bad, t.live));
                    let live_ok = bad == 0 && live > 0;
                    if ok && live_ok {
                        self.c.resume_ok += 1;
                    } else {
                        fail_resume = true;
                        note(
                            &mut self.notes,
                            format!(
                                "resume failed after the replay: room {} bad={bad} live={live}",
                                room_name(room)
                            ),
                        );
                    }
                    ch.resume = Resume::No;
                }
                Resume::No => {}
            }
        }
        if fail_resume {
            self.c.resume_failures += 1;
            ch.resume = Resume::No;
        }
        if self.stopping && matches!(ch.resume, Resume::Second { .. }) {
            ch.resume = Resume::No;
        }
        let Some(slot) = ch.slot else {
            self.churner_gone(i as u32, epoch, now, false, false);
            return;
        };
        if style < 2 && net.start_close(slot) {
            ch.phase = Phase::Closing {
                deadline: now + 5 * NS,
            };
            return;
        }
        ch.slot = None;
        net.drop_conn(slot, style == 3);
        if style == 3 {
            self.c.closes_rst += 1;
        } else {
            self.c.closes_fin += 1;
        }
        self.churner_gone(i as u32, epoch, now, false, false);
    }
}

struct Bucket {
    index: u32,
    t_start_s: f64,
    t_end_s: f64,
    c: Counters,
    lat: Value,
    live_conns: usize,
    gen_cpu_s: f64,
}

/// Runs the soak: [`connect_stable`], [`Soak::traffic`] (the steady schedule, churn,
/// resume checks and the drain), then [`Soak::problems`] and [`Soak::report`].
pub fn run(cfg: &SoakCfg) -> Result<(Value, Vec<String>), String> {
    let mut net: Net<Peer> =
        Net::new(cfg.targets.clone(), cfg.srcs.clone()).map_err(|e| e.to_string())?;
    let mut w = World::new(cfg);
    let setup_s = connect_stable(cfg, &mut net, &mut w)?;
    let mut soak = Soak::new(cfg, net, w);
    soak.traffic()?;
    let problems = soak.problems();
    let doc = soak.report(setup_s);
    soak.net.close_all();
    Ok((doc, problems))
}

fn say(cfg: &SoakCfg, s: String) {
    if !cfg.quiet {
        eprintln!("soak: {s}");
    }
}

impl<'a> World<'a> {
    fn new(cfg: &'a SoakCfg) -> World<'a> {
        World {
            cfg,
            rng: Rng(cfg.seed),
            c: Counters::default(),
            errors: BTreeMap::new(),
            close_codes: BTreeMap::new(),
            fail_kinds: BTreeMap::new(),
            notes: Vec::new(),
            lat: report::new_hist(),
            bucket_lat: report::new_hist(),
            churn_lat: report::new_hist(),
            ack_lat: report::new_hist(),
            churners: (0..cfg.churners)
                .map(|_| Churner {
                    phase: Phase::Pause { until: 0 },
                    slot: None,
                    epoch: 0,
                    cycle: 0,
                    rooms: Vec::new(),
                    joins_left: 0,
                    sends: Vec::new(),
                    seq: 0,
                    next_rid: 0,
                    pending: Vec::new(),
                    resume: Resume::No,
                    did_leave: false,
                })
                .collect(),
            cycles: 0,
            witness: vec![HashMap::new(); cfg.rooms as usize],
            acked: Vec::new(),
            stable_welcomed: 0,
            stable_ready: 0,
            stable_failed: 0,
            stopping: false,
            scratch: Vec::with_capacity(512),
            slot_of: vec![usize::MAX; (cfg.rooms * cfg.room_size) as usize],
            down_until: vec![0; cfg.targets.len().max(1)],
            loss_events: Vec::new(),
            rejoins: Vec::new(),
            sent_next: vec![0; (cfg.rooms * cfg.senders_per_room.clamp(1, cfg.room_size)) as usize],
            unsure: vec![
                Vec::new();
                (cfg.rooms * cfg.senders_per_room.clamp(1, cfg.room_size)) as usize
            ],
            unsure_per_room: vec![0; cfg.rooms as usize],
            rejoin_serial: 0,
        }
    }
}

/// Connects the stable members (at most `concurrency` handshakes in flight) and waits
/// until each has joined its room. Returns member -> slot and the setup time.
fn connect_stable(cfg: &SoakCfg, net: &mut Net<Peer>, w: &mut World) -> Result<f64, String> {
    let stable = cfg.rooms * cfg.room_size;
    let spr = cfg.senders_per_room.clamp(1, cfg.room_size);
    let t_setup = mono_ns();
    let mut started = 0u32;
    let mut next_print = t_setup + NS;
    loop {
        while started < stable
            && (started as u64) < w.stable_ready + w.stable_failed + cfg.concurrency as u64
        {
            let m = started;
            started += 1;
            let mut p = Peer::new(Who::Stable(m), 0);
            p.seq_next = vec![0; spr as usize];
            let path = format!("{}?name={}s{m}", cfg.path, cfg.name_prefix);
            match net.connect(m, &path, p) {
                Ok(slot) => w.slot_of[m as usize] = slot,
                Err(e) => {
                    w.stable_failed += 1;
                    *w.fail_kinds.entry(e).or_default() += 1;
                }
            }
        }
        let now = mono_ns();
        if w.stable_ready + w.stable_failed >= stable as u64 {
            break;
        }
        if now > t_setup + (cfg.setup_timeout * 1e9) as u64 || now > cfg.deadline {
            return Err(format!(
                "setup: only {} of {stable} stable members ready in {} s",
                w.stable_ready, cfg.setup_timeout
            ));
        }
        if now >= next_print {
            next_print += NS;
            say(cfg, format!("setup: {}/{stable} ready", w.stable_ready));
        }
        net.poll(None, Duration::from_millis(50), &mut |c, ev, now| {
            w.on_event(c, ev, now)
        })
        .map_err(|e| e.to_string())?;
    }
    if w.stable_failed > 0 {
        return Err(format!(
            "setup: {} of {stable} stable members failed: {:?}",
            w.stable_failed, w.fail_kinds
        ));
    }
    let setup_s = secs(mono_ns() - t_setup);
    say(
        cfg,
        format!("setup: {stable} stable members ready in {setup_s:.2} s"),
    );
    Ok(setup_s)
}

/// The traffic phase: the connections, the world, the steady schedule and the buckets.
struct Soak<'a> {
    cfg: &'a SoakCfg,
    net: Net<Peer>,
    w: World<'a>,
    stable: u32,
    spr: u32,
    /// Stable members that send steady messages.
    senders: Vec<u32>,
    /// Steady messages of the whole schedule, and per room.
    total: u64,
    per_room_sent: Vec<u64>,
    t0: u64,
    t_end: u64,
    period: f64,
    /// Next message index of the steady schedule.
    k: u64,
    buf: Vec<u8>,
    lag: Histogram<u64>,
    bucket_ns: u64,
    buckets: Vec<Bucket>,
    next_bucket: u64,
    last_snap: Counters,
    cpu_snap: u64,
    cpu0: u64,
    next_resume: u64,
    next_ping: u64,
    ping_every: u64,
    ping_idx: u32,
    next_print: u64,
    drain_deadline: u64,
    t_drained: Option<u64>,
    t_stop: u64,
    stable_missing_count: u64,
}

impl<'a> Soak<'a> {
    fn new(cfg: &'a SoakCfg, net: Net<Peer>, mut w: World<'a>) -> Soak<'a> {
        let stable = cfg.rooms * cfg.room_size;
        let spr = cfg.senders_per_room.clamp(1, cfg.room_size);
        let senders: Vec<u32> = (0..cfg.rooms)
            .flat_map(|r| (0..spr).map(move |j| r * cfg.room_size + j))
            .collect();
        let n_senders = senders.len() as u64;
        let total = (cfg.rate * cfg.seconds).round() as u64;
        let mut per_room_sent = vec![0u64; cfg.rooms as usize];
        for kk in 0..total {
            let m = senders[(kk % n_senders) as usize];
            per_room_sent[(m / cfg.room_size) as usize] += 1;
        }
        let t0 = mono_ns() + 50_000_000;
        let bucket_ns = (cfg.bucket * 1e9) as u64;
        for (i, ch) in w.churners.iter_mut().enumerate() {
            // Spread the first connects over the first second.
            ch.phase = Phase::Pause {
                until: t0 + (i as u64 * NS) / cfg.churners.max(1) as u64,
            };
        }
        let last_snap = w.c;
        // Always printed: the runner times a node's kill from it.
        eprintln!("soak: traffic t0_mono_ns={t0}");
        Soak {
            cfg,
            net,
            w,
            stable,
            spr,
            senders,
            total,
            per_room_sent,
            t0,
            t_end: t0 + (cfg.seconds * 1e9) as u64,
            period: 1e9 / cfg.rate,
            k: 0,
            buf: Vec::with_capacity(256),
            lag: report::new_hist(),
            bucket_ns,
            buckets: Vec::new(),
            next_bucket: t0 + bucket_ns,
            last_snap,
            cpu_snap: cpu_ns(),
            cpu0: cpu_ns(),
            next_resume: t0 + (cfg.resume_every * 1e9) as u64,
            // Stable members send a `ping` command once a minute (staggered), as a client
            // with a keep-alive would: no idle timeout applies to them, however long the run.
            next_ping: t0 + NS,
            ping_every: 60 * NS / stable.max(1) as u64,
            ping_idx: 0,
            next_print: t0 + 10 * NS,
            drain_deadline: u64::MAX,
            t_drained: None,
            t_stop: 0,
            stable_missing_count: 0,
        }
    }

    fn due(&self, k: u64) -> u64 {
        self.t0 + (k as f64 * self.period) as u64
    }

    /// The main loop: steady sends, resume checks, churn, pings, buckets and progress,
    /// until the schedule is over and everything has arrived (or the drain ran out).
    fn traffic(&mut self) -> Result<(), String> {
        loop {
            let now = self.send_steady();
            self.maybe_start_resume(now);
            self.w.tick(&mut self.net, now);
            self.send_pings(now);
            if now >= self.next_bucket && self.next_bucket <= self.t_end {
                self.close_bucket(self.next_bucket);
                self.next_bucket += self.bucket_ns;
            }
            if now >= self.next_print && !self.cfg.quiet {
                self.next_print += 10 * NS;
                self.print_progress(now);
            }
            if !self.w.stopping && now >= self.t_end && self.k >= self.total {
                self.stop_schedule(now);
            }
            if self.w.stopping && self.drained(now) {
                break;
            }
            if mono_ns() > self.cfg.deadline {
                return Err("over the --max-seconds budget".into());
            }
            let wake = (self.k < self.total).then(|| self.due(self.k));
            let w = &mut self.w;
            self.net
                .poll(wake, Duration::from_millis(10), &mut |c, ev, now| {
                    w.on_event(c, ev, now)
                })
                .map_err(|e| e.to_string())?;
        }
        self.t_stop = mono_ns();
        Ok(())
    }

    /// Sends the steady messages that are due; returns the time.
    fn send_steady(&mut self) -> u64 {
        let cfg = self.cfg;
        let n_senders = self.senders.len() as u64;
        let mut now = mono_ns();
        while self.k < self.total {
            let t = self.due(self.k);
            if t > now {
                break;
            }
            let k = self.k;
            let m = self.senders[(k % n_senders) as usize];
            let room = m / cfg.room_size;
            let g = room * self.spr + (m % cfg.room_size);
            let seq = (k / n_senders) as u32;
            self.w.sent_next[g as usize] = seq + 1;
            let conn = self
                .net
                .get_mut(self.w.slot_of[m as usize])
                .filter(|c| c.user.ready && c.user.rejoin_since.is_none());
            if conn.is_none() && cfg.failover {
                // Away (lost with its node, not back yet): this one is not sent.
                self.w.mark_unsure(g as usize, seq, seq);
            }
            if let Some(c) = conn {
                let stamp = Stamp {
                    step: 1,
                    sender: g,
                    room,
                    seq,
                    t_ns: t,
                };
                self.buf.clear();
                proto::broadcast_command(&mut self.buf, &room_name(room), &stamp, cfg.msg_size);
                c.send_text(&self.buf);
                self.w.c.steady_sent += 1;
            }
            report::record(&mut self.lag, (now - t) / 1000);
            self.k += 1;
            if self.k.is_multiple_of(64) {
                now = mono_ns();
            }
        }
        now
    }

    /// One resume check every --resume-every seconds: the next churner to start a cycle.
    fn maybe_start_resume(&mut self, now: u64) {
        let w = &mut self.w;
        if w.stopping || now < self.next_resume {
            return;
        }
        let busy = w.churners.iter().any(|c| !matches!(c.resume, Resume::No));
        let room = w.rng.below(self.cfg.rooms);
        if !busy
            && let Some(ch) = w
                .churners
                .iter_mut()
                .find(|c| matches!(c.phase, Phase::Pause { .. }))
        {
            ch.resume = Resume::First { room };
            self.next_resume += (self.cfg.resume_every * 1e9) as u64;
        }
    }

    fn send_pings(&mut self, now: u64) {
        while !self.w.stopping && now >= self.next_ping {
            if let Some(c) = self.net.get_mut(self.w.slot_of[self.ping_idx as usize]) {
                c.send_text(b"{\"command\":\"ping\"}");
                self.w.c.pings += 1;
            }
            self.ping_idx = (self.ping_idx + 1) % self.stable;
            self.next_ping += self.ping_every;
        }
    }

    /// Closes the current bucket at `b_end`: the counters since the last one.
    fn close_bucket(&mut self, b_end: u64) {
        let w = &mut self.w;
        let index = self.buckets.len() as u32;
        let start = self.t0 + index as u64 * self.bucket_ns;
        let c = w.c.minus(&self.last_snap);
        self.last_snap = w.c;
        let cpu_now = cpu_ns();
        self.buckets.push(Bucket {
            index,
            t_start_s: secs(start - self.t0),
            t_end_s: secs(b_end.max(start) - self.t0),
            c,
            lat: lat_json(&w.bucket_lat),
            live_conns: self.net.live(),
            gen_cpu_s: secs(cpu_now - self.cpu_snap),
        });
        self.cpu_snap = cpu_now;
        w.bucket_lat.reset();
    }

    fn print_progress(&self, now: u64) {
        let c = &self.w.c;
        eprintln!(
            "soak: t={:.0}s conns={} sent={} delivered={} cycles={} acks={}/{} missing={} resume ok/fail={}/{} gaps={} dups={} ooo={} errors={} p95(all)={:.2}ms p99(all)={:.2}ms",
            secs(now.saturating_sub(self.t0)),
            self.net.live(),
            c.steady_sent,
            c.steady_delivered,
            c.churn_cycles,
            c.acks,
            c.churn_msgs_sent + c.leaves,
            c.acks_missing,
            c.resume_ok,
            c.resume_failures,
            c.gaps,
            c.duplicates,
            c.out_of_order,
            c.server_errors,
            report::ms(&self.w.lat, 0.95),
            report::ms(&self.w.lat, 0.99),
        );
    }

    /// The schedule is over: churners finish their cycles, the drain starts.
    fn stop_schedule(&mut self, now: u64) {
        self.w.stopping = true;
        self.drain_deadline = now + (self.cfg.drain * 1e9) as u64;
        if self.next_bucket - self.bucket_ns < self.t_end {
            self.close_bucket(self.t_end);
        }
        say(
            self.cfg,
            format!(
                "schedule done at t={:.1}s; draining (up to {} s)",
                secs(now - self.t0),
                self.cfg.drain
            ),
        );
    }

    /// While draining: true once everything arrived (noting when) or the drain is over.
    fn drained(&mut self, now: u64) -> bool {
        let churn_done = self
            .w
            .churners
            .iter()
            .all(|c| matches!(c.phase, Phase::Done));
        if churn_done && stable_complete(&self.w, &mut self.net, &self.per_room_sent) {
            self.t_drained = Some(now);
            return true;
        }
        now > self.drain_deadline
    }

    /// Steady deliveries the stable members should have got (less the unsure ones).
    fn steady_expected(&self) -> u64 {
        (0..self.stable)
            .map(|m| {
                let r = (m / self.cfg.room_size) as usize;
                self.per_room_sent[r].saturating_sub(self.w.unsure_per_room[r])
            })
            .sum()
    }

    /// Stable members without a joined connection at the end (lost and not back).
    fn stable_missing(&mut self) -> u64 {
        let mut n = 0;
        for m in 0..self.stable as usize {
            match self.net.get_mut(self.w.slot_of[m]) {
                Some(c) if c.user.ready && c.user.rejoin_since.is_none() => {}
                _ => n += 1,
            }
        }
        n
    }

    /// Rooms whose stable members end at different last ids, each with a problem line.
    fn rooms_disagreeing(&mut self, problems: &mut Vec<String>) -> u64 {
        let cfg = self.cfg;
        let mut room_last = vec![(u64::MAX, 0u64); cfg.rooms as usize];
        for m in 0..self.stable {
            let r = m / cfg.room_size;
            if let Some(c) = self.net.get_mut(self.w.slot_of[m as usize]) {
                let last = c
                    .user
                    .tracks
                    .iter()
                    .find(|t| t.room == r)
                    .map_or(0, |t| t.last);
                let e = &mut room_last[r as usize];
                e.0 = e.0.min(last);
                e.1 = e.1.max(last);
            }
        }
        let mut behind = 0;
        for (r, &(lo, hi)) in room_last.iter().enumerate() {
            if lo != hi {
                behind += 1;
                problems.push(format!(
                    "room {}: stable members end at different last ids ({lo}..{hi})",
                    room_name(r as u32)
                ));
            }
        }
        behind
    }

    /// Acked churner messages the room's witness did not see with that id (the first
    /// five each get a problem line).
    fn acked_not_delivered(&self, problems: &mut Vec<String>) -> u64 {
        let w = &self.w;
        let mut n = 0u64;
        for &(room, id, cycle, seq) in &w.acked {
            if w.witness[room as usize].get(&id) != Some(&(cycle, seq)) {
                n += 1;
                if n <= 5 {
                    problems.push(format!(
                        "acked message {room}/{id} (cycle {cycle} seq {seq}) not seen with that id by the room's witness: {:?}",
                        w.witness[room as usize].get(&id)
                    ));
                }
            }
        }
        n
    }

    /// Everything that went wrong, one line each.
    fn problems(&mut self) -> Vec<String> {
        let mut problems = Vec::new();
        let missing = self.stable_missing();
        if missing > 0 {
            problems.push(format!(
                "{missing} stable members had no joined connection at the end (lost, not back)"
            ));
        }
        self.rooms_disagreeing(&mut problems);
        let ack_not_delivered = self.acked_not_delivered(&mut problems);
        let (cfg, w) = (self.cfg, &self.w);
        let c = w.c;
        let lost = self.steady_expected().saturating_sub(c.steady_delivered);
        let mut check = |n: u64, what: &str| {
            if n > 0 {
                problems.push(format!("{n} {what}"));
            }
        };
        check(c.gaps, "ids missing (gaps)");
        check(c.duplicates, "duplicate ids");
        check(c.out_of_order, "ids out of order");
        check(c.seq_gaps, "steady messages skipped in a sender's sequence");
        check(
            c.seq_duplicates,
            "steady messages repeated in a sender's sequence",
        );
        check(lost, "steady deliveries never arrived");
        check(c.acks_missing, "acks missing");
        check(
            ack_not_delivered,
            "acked messages not delivered with their id",
        );
        check(c.resume_failures, "resume failures");
        check(c.server_errors, "error events from the server");
        check(c.unexpected_closes, "connections closed by the server");
        check(c.connect_failures, "connect failures");
        check(c.welcome_timeouts, "welcome timeouts");
        check(c.join_timeouts, "join timeouts");
        check(
            c.close_timeouts,
            "clean closes without the server's close frame",
        );
        check(
            c.untracked,
            "room messages in a room the receiver had no history of",
        );
        check(c.after_leave, "room messages after the leave's ack");
        check(c.acks_unknown, "acks nobody waited for (late or unknown)");
        check(c.bad_events, "unparsable events");
        check(
            c.rejoin_failures,
            "rejoins whose history was not exactly the missed ids",
        );
        if !cfg.failover {
            check(c.losses, "connections lost (no close frame)");
        }
        if cfg.seconds >= 2.0 * cfg.resume_every + 5.0 && c.resume_checks == 0 {
            problems.push("no resume check ran".into());
        }
        if c.steady_delivered == 0 {
            problems.push("zero deliveries".into());
        }
        if self.t_drained.is_none() {
            problems.push(format!(
                "the drain did not finish within {} s (churners still busy: {})",
                cfg.drain,
                w.churners
                    .iter()
                    .filter(|c| !matches!(c.phase, Phase::Done))
                    .count()
            ));
        }
        if !w.errors.is_empty() {
            problems.push(format!("server errors by code: {:?}", w.errors));
        }
        if !w.close_codes.is_empty() {
            problems.push(format!("server closes by code: {:?}", w.close_codes));
        }
        if !w.fail_kinds.is_empty() {
            problems.push(format!("connect failures by kind: {:?}", w.fail_kinds));
        }
        problems
    }

    /// The result document: buckets, totals, notes.
    fn report(&mut self, setup_s: f64) -> Value {
        self.stable_missing_count = self.stable_missing();
        let mut scratch = Vec::new();
        let behind = self.rooms_disagreeing(&mut scratch);
        let ack_not_delivered = self.acked_not_delivered(&mut scratch);
        let steady_expected = self.steady_expected();
        let w = &self.w;
        let c = w.c;
        json!({
            "setup": {"stable_members": self.stable, "setup_s": setup_s},
            "t0_mono_ns": self.t0,
            "t_end_mono_ns": self.t_end,
            "t_stop_mono_ns": self.t_stop,
            "drained_s": self.t_drained.map(|t| secs(t.saturating_sub(self.t_end))),
            "buckets": self.buckets.iter().map(|b| json!({
                "index": b.index, "t_start_s": b.t_start_s, "t_end_s": b.t_end_s,
                "counters": b.c, "latency_ms": b.lat, "loadgen_conns": b.live_conns,
                "loadgen_cpu_s": b.gen_cpu_s,
            })).collect::<Vec<_>>(),
            "totals": {
                "counters": c,
                "steady_expected": steady_expected,
                "steady_lost": steady_expected.saturating_sub(c.steady_delivered),
                "acked_messages": w.acked.len(),
                "acked_not_delivered": ack_not_delivered,
                "rooms_disagreeing": behind,
                "errors": w.errors,
                "close_codes": w.close_codes,
                "fail_kinds": w.fail_kinds,
                "latency_ms": lat_json(&w.lat),
                "churn_latency_ms": lat_json(&w.churn_lat),
                "ack_latency_ms": lat_json(&w.ack_lat),
                "stable_missing": self.stable_missing_count,
                "send_lag_ms": lat_json(&self.lag),
                "loadgen_cpu_s": secs(cpu_ns() - self.cpu0),
            },
            "notes": w.notes,
            "failover": self.cfg.failover.then(|| json!({
                "losses": w.loss_events.iter().map(|&(t, target, what)| json!({
                    "t_mono_ns": t, "target": target, "what": what,
                })).collect::<Vec<_>>(),
                "unsure_per_room": w.unsure_per_room,
                // Every acked churner message: (room name, id, cycle, seq), for the runner to
                // find in the store.
                "acked": w.acked.iter().map(|&(r, id, cycle, seq)| json!([room_name(r), id, cycle, seq]))
                    .collect::<Vec<_>>(),
            })),
        })
    }
}

/// Every stable member has every steady message, the members of each room agree on its last
/// id, and every acked churner message reached its room's witness.
fn stable_complete(w: &World, net: &mut Net<Peer>, per_room_sent: &[u64]) -> bool {
    let rooms = w.cfg.rooms as usize;
    let (mut lo, mut hi) = (vec![u64::MAX; rooms], vec![0u64; rooms]);
    let mut ok = w.rejoins.is_empty() && w.slot_of.iter().all(|&s| s != usize::MAX);
    net.for_each_mut(|_, c| {
        if let Who::Stable(m) = c.user.who {
            let r = (m / w.cfg.room_size) as usize;
            if c.user.rejoin_since.is_some()
                || c.user.got_steady < per_room_sent[r].saturating_sub(w.unsure_per_room[r])
            {
                ok = false;
            }
            let last = c
                .user
                .tracks
                .iter()
                .find(|t| t.room == r as u32)
                .map_or(0, |t| t.last);
            lo[r] = lo[r].min(last);
            hi[r] = hi[r].max(last);
        }
    });
    ok && lo == hi
        && w.acked
            .iter()
            .all(|&(room, id, ..)| w.witness[room as usize].contains_key(&id))
}

fn lat_json(h: &Histogram<u64>) -> Value {
    json!({
        "p50": report::ms(h, 0.5), "p95": report::ms(h, 0.95), "p99": report::ms(h, 0.99),
        "p999": report::ms(h, 0.999), "max": report::ms(h, 1.0), "count": h.len(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(base: u64, ids: &[u64]) -> (Counters, Track) {
        let mut c = Counters::default();
        let mut t = Track::new(0, base);
        for &id in ids {
            t.check(id, &mut c);
        }
        (c, t)
    }

    #[test]
    fn gapless_ids_are_clean() {
        let (c, t) = run(7, &[8, 9, 10, 11]);
        assert_eq!((c.gaps, c.duplicates, c.out_of_order, t.bad), (0, 0, 0, 0));
        assert_eq!((t.last, t.live), (11, 4));
    }

    #[test]
    fn a_gap_counts_every_missing_id() {
        let (c, t) = run(0, &[1, 2, 5, 6]);
        assert_eq!((c.gaps, c.duplicates, c.out_of_order), (2, 0, 0));
        assert_eq!((t.last, t.bad), (6, 1));
    }

    #[test]
    fn a_repeat_is_a_duplicate_and_a_late_one_is_out_of_order() {
        let (c, _) = run(0, &[1, 2, 2, 1]);
        assert_eq!((c.gaps, c.duplicates, c.out_of_order), (0, 2, 0));
        let (c, t) = run(0, &[1, 3, 2, 4]);
        assert_eq!((c.gaps, c.duplicates, c.out_of_order), (1, 0, 1));
        assert_eq!(t.last, 4);
        // The baseline (history) counts as seen: an id at or below it is a duplicate.
        let (c, _) = run(10, &[9, 11]);
        assert_eq!((c.duplicates, c.gaps), (1, 0));
        // Far jumps do not overflow the window.
        let (c, _) = run(0, &[1, 200, 2]);
        assert_eq!((c.gaps, c.duplicates, c.out_of_order), (198, 1, 0));
    }

    fn cfg() -> SoakCfg {
        SoakCfg {
            targets: vec![
                "127.0.0.1:1".parse().unwrap(),
                "127.0.0.1:2".parse().unwrap(),
            ],
            srcs: vec![Ipv4Addr::LOCALHOST],
            path: "/ws".into(),
            name_prefix: "t".into(),
            concurrency: 1,
            rooms: 2,
            room_size: 5,
            senders_per_room: 2,
            rate: 10.0,
            seconds: 1.0,
            churners: 1,
            dwell: 1.0,
            churn_msgs: 1,
            resume_every: 10.0,
            ack_timeout: 1.0,
            drain: 1.0,
            msg_size: 64,
            bucket: 1.0,
            seed: 1,
            setup_timeout: 1.0,
            deadline: u64::MAX,
            quiet: true,
            failover: true,
        }
    }

    #[test]
    fn unsure_ranges_merge_and_cover() {
        let cfg = cfg();
        let mut w = World::new(&cfg);
        w.mark_unsure(3, 5, 7);
        w.mark_unsure(3, 8, 8); // joins the last range
        w.mark_unsure(3, 6, 9); // overlaps it: only 9 is new
        w.mark_unsure(3, 20, 21);
        assert_eq!(w.unsure[3], vec![(5, 9), (20, 21)]);
        assert_eq!(w.c.steady_unsure, 7);
        // Sender 3 is the second sender of room 1.
        assert_eq!(w.unsure_per_room, vec![0, 7]);
        assert!(w.all_unsure(3, 5, 9));
        assert!(w.all_unsure(3, 20, 20));
        assert!(!w.all_unsure(3, 4, 6));
        assert!(!w.all_unsure(3, 9, 20));
        assert!(!w.all_unsure(2, 5, 5));
    }

    #[test]
    fn a_down_address_is_avoided_until_it_is_up() {
        let cfg = cfg();
        let mut w = World::new(&cfg);
        assert_eq!(w.pick_target(1, 100), 1);
        w.down_until[1] = 200;
        assert_eq!(w.pick_target(1, 100), 0);
        assert_eq!(w.pick_target(1, 200), 1);
        w.down_until[0] = 300;
        // Both down: the preferred one all the same.
        assert_eq!(w.pick_target(1, 150), 1);
    }

    #[test]
    fn room_names_round_trip() {
        assert_eq!(room_index(&room_name(7)), Some(7));
        assert_eq!(room_index("general"), Some(GENERAL));
        assert_eq!(room_index("other"), None);
    }

    #[test]
    fn rng_is_seeded_and_in_range() {
        let (mut a, mut b) = (Rng(5), Rng(5));
        for _ in 0..1000 {
            let x = a.below(3);
            assert_eq!(x, b.below(3));
            assert!(x < 3);
            let u = a.unit();
            assert_eq!(u, b.unit());
            assert!((0.0..1.0).contains(&u));
        }
    }
}
