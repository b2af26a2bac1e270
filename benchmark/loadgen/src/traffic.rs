//! The traffic scenarios, `fanout` (one room of M members) and `rooms` (many small rooms):
//! connect and join, check the subscriptions with a probe, then for each offered rate run
//! an open-loop send schedule and measure every delivery against its intended send time.
//!
//! The schedule is deterministic: message `k` of a step is due at `t0 + k / rate`, is sent
//! by `senders[k % S]` to one of that sender's rooms, and carries its per-(sender, room)
//! sequence number. So every worker knows, without talking to the others, how many
//! deliveries each of its receivers must get, and can tell a late message from a lost one.
//!
//! With [`JoinCfg`] (the `joins` scenario) extra *joiner* members, in no room but `general`,
//! join rooms with stored history at a steady rate while the step's fan-out runs: each join
//! goes to a room not joined before in the run (so its history is not in memory), the time
//! from the `join` to its `history` is measured, and the joiner leaves the room again.

use std::collections::BTreeMap;
use std::net::{Ipv4Addr, SocketAddrV4};
use std::time::Duration;

use hdrhistogram::Histogram;

use crate::clock::{self, NS, cpu_ns, mono_ns, secs};
use crate::coord::Ctx;
use crate::proto::{self, Proto, Stamp};
use crate::report::{self, Hist, SetupShard, StepShard, TrafficShard};
use crate::ws::{Conn, Ev, Net};

pub struct TrafficCfg {
    pub scenario: &'static str,
    pub proto: Proto,
    /// The server addresses; connection i goes to `targets[i % len]`.
    pub targets: Vec<SocketAddrV4>,
    pub srcs: Vec<Ipv4Addr>,
    pub path: String,
    pub name_prefix: String,
    pub rooms: u32,
    pub room_size: u32,
    pub rooms_per_member: u32,
    pub senders: u32,
    pub rates: Vec<f64>,
    pub duration: f64,
    pub drain: f64,
    pub msg_size: usize,
    pub concurrency: u32,
    pub self_delivery: bool,
    pub setup_timeout: f64,
    pub room_names: Vec<String>,
    pub max_pending: usize,
    /// Stop the sweep after a step that overloaded the server (late or lost deliveries, or
    /// p99 above this many ms): higher rates would only pile up more backlog. 0 = never.
    pub stop_p99_ms: f64,
    /// Joiners during the steps (the `joins` scenario), none for `fanout` and `rooms`.
    pub joins: Option<JoinCfg>,
}

/// Joins of rooms with stored history while the fan-out runs.
pub struct JoinCfg {
    /// Joiner connections (each has at most one join waiting for its history).
    pub joiners: u32,
    /// Joins per second, in all.
    pub rate: f64,
    /// Rooms `PREFIX0 .. PREFIX{rooms-1}` that hold stored history (see `benchmark/prefill`).
    pub rooms: u32,
    pub prefix: String,
}

impl JoinCfg {
    /// The room of the run's `n`-th join: a fixed permutation of the rooms, so that joins
    /// that follow each other read pages far apart, and no room is joined twice until
    /// every room was.
    pub fn room_of(&self, n: u64) -> u32 {
        let rooms = self.rooms.max(1) as u64;
        let mut p = 7919u64;
        while gcd(rooms, p) != 1 {
            p += 2;
        }
        ((n % rooms) * p % rooms) as u32
    }
}

fn gcd(a: u64, b: u64) -> u64 {
    if b == 0 { a } else { gcd(b, a % b) }
}

/// Who is in which room, and who sends. The same in every worker.
pub struct Topo {
    pub member_rooms: Vec<Vec<u32>>,
    pub room_members: Vec<Vec<u32>>,
    pub senders: Vec<u32>,
    pub is_sender: Vec<bool>,
}

pub fn topology(cfg: &TrafficCfg) -> Topo {
    let members = cfg.rooms * cfg.room_size;
    let stride = (cfg.rooms / cfg.rooms_per_member.max(1)).max(1);
    let mut member_rooms = Vec::with_capacity(members as usize);
    let mut room_members = vec![Vec::new(); cfg.rooms as usize];
    for m in 0..members {
        let base = m / cfg.room_size;
        let mut rl = vec![base];
        for j in 1..cfg.rooms_per_member {
            let r = (base + j * stride + j) % cfg.rooms;
            if !rl.contains(&r) {
                rl.push(r);
            }
        }
        for &r in &rl {
            room_members[r as usize].push(m);
        }
        member_rooms.push(rl);
    }
    let s = cfg.senders.clamp(1, members.max(1));
    let senders: Vec<u32> = (0..s)
        .map(|i| (i as u64 * members as u64 / s as u64) as u32)
        .collect();
    let mut is_sender = vec![false; members as usize];
    for &x in &senders {
        is_sender[x as usize] = true;
    }
    Topo {
        member_rooms,
        room_members,
        senders,
        is_sender,
    }
}

impl Topo {
    /// (sender, room, seq) of message `k`.
    fn message(&self, k: u64) -> (u32, u32, u32) {
        let s = self.senders.len() as u64;
        let sender = self.senders[(k % s) as usize];
        let j = k / s;
        let rl = &self.member_rooms[sender as usize];
        let room = rl[(j % rl.len() as u64) as usize];
        (sender, room, (j / rl.len() as u64) as u32)
    }
}

#[derive(Default)]
pub struct Member {
    welcomed: bool,
    ready: bool,
    histories: u32,
    probes: u32,
    expected: u64,
    got: u64,
    /// Sorted stream keys `(sender << 32) | room` this member receives, and the next
    /// sequence number expected on each.
    keys: Vec<u64>,
    next: Vec<u32>,
    /// A joiner (the `joins` scenario): in no room of the topology.
    joiner: bool,
    /// The joiner's join waiting for its history: (room, when it was sent).
    join: Option<(u32, u64)>,
}

struct Tally<'a> {
    cfg: &'a TrafficCfg,
    topo: &'a Topo,
    step: u32,
    lat: Histogram<u64>,
    received: u64,
    duplicates: u64,
    gaps: u64,
    stale: u64,
    unexpected: u64,
    errors: BTreeMap<String, u64>,
    closed: u64,
    close_codes: BTreeMap<String, u64>,
    welcomed: u64,
    ready: u64,
    failed: u64,
    fail_kinds: BTreeMap<String, u64>,
    complete: u64,
    last_recv: u64,
    scratch: Vec<u8>,
    joins: JoinTally,
}

/// The joiners' counts during a step.
struct JoinTally {
    sent: u64,
    answered: u64,
    errors: u64,
    /// Joins that were due while every joiner still waited for a history.
    skipped: u64,
    /// Sent and neither answered nor refused yet.
    pending: u64,
    /// `join` to `history`, µs.
    lat: Histogram<u64>,
}

impl JoinTally {
    fn new() -> JoinTally {
        JoinTally {
            sent: 0,
            answered: 0,
            errors: 0,
            skipped: 0,
            pending: 0,
            lat: report::new_hist(),
        }
    }
}

impl Tally<'_> {
    fn on_event(&mut self, conn: &mut Conn<Member>, ev: Ev<'_>, now: u64) {
        match ev {
            Ev::Opened => {
                if self.cfg.proto == Proto::Raw {
                    conn.user.welcomed = true;
                    conn.user.ready = true;
                    self.welcomed += 1;
                    self.ready += 1;
                }
            }
            Ev::Failed(why) => {
                self.failed += 1;
                *self.fail_kinds.entry(why).or_default() += 1;
            }
            Ev::Closed { code } => {
                self.closed += 1;
                // A join that can no longer be answered: refused, as far as the step goes.
                if conn.user.joiner && conn.user.join.take().is_some() {
                    self.joins.errors += 1;
                    self.joins.pending -= 1;
                }
                let code = code.map_or("none".to_string(), |c| c.to_string());
                if !conn.user.ready {
                    self.failed += 1;
                    *self
                        .fail_kinds
                        .entry(format!("closed before ready ({code})"))
                        .or_default() += 1;
                }
                *self.close_codes.entry(code).or_default() += 1;
            }
            Ev::Text(t) => match self.cfg.proto {
                Proto::Raw => {
                    if t.first() == Some(&b'~')
                        && let Some(s) = proto::parse_stamp(t)
                    {
                        self.delivery(&mut conn.user, s, now);
                    }
                }
                Proto::Chatterbox => match proto::event_name(t) {
                    b"broadcast" => {
                        if let Some(s) = proto::find_stamp(t) {
                            self.delivery(&mut conn.user, s, now);
                        }
                    }
                    b"history" if conn.user.joiner => self.joiner_history(conn, t, now),
                    b"history" => self.history(conn),
                    b"error" => {
                        *self.errors.entry(proto::error_code(t)).or_default() += 1;
                        if conn.user.joiner && conn.user.join.take().is_some() {
                            self.joins.errors += 1;
                            self.joins.pending -= 1;
                        }
                    }
                    _ => {}
                },
            },
        }
    }

    /// chatterbox answers the implicit join of `general` and every `join` with `history`.
    fn history(&mut self, conn: &mut Conn<Member>) {
        let m = &mut conn.user;
        m.histories += 1;
        let rooms = &self.topo.member_rooms[conn.idx as usize];
        if m.histories == 1 {
            m.welcomed = true;
            self.welcomed += 1;
            for &r in rooms {
                self.scratch.clear();
                proto::join_command(&mut self.scratch, &self.cfg.room_names[r as usize]);
                conn.send_text(&self.scratch);
            }
        }
        let m = &mut conn.user;
        if !m.ready && m.histories as usize > rooms.len() {
            m.ready = true;
            self.ready += 1;
        }
    }

    /// A joiner's first history is its welcome; any later one answers its join: the
    /// latency is recorded and the joiner leaves the room again.
    fn joiner_history(&mut self, conn: &mut Conn<Member>, t: &[u8], now: u64) {
        let m = &mut conn.user;
        if !m.welcomed {
            m.welcomed = true;
            m.ready = true;
            self.welcomed += 1;
            self.ready += 1;
            return;
        }
        let Some(jc) = self.cfg.joins.as_ref() else {
            return;
        };
        let Some((room, t_sent)) = m.join else {
            return;
        };
        let name = format!("{}{room}", jc.prefix);
        if proto::history_room(t) != Some(name.as_bytes()) {
            return;
        }
        m.join = None;
        report::record(&mut self.joins.lat, now.saturating_sub(t_sent) / 1000);
        self.joins.answered += 1;
        self.joins.pending -= 1;
        self.scratch.clear();
        proto::leave_command(&mut self.scratch, &name);
        conn.send_text(&self.scratch);
    }

    fn delivery(&mut self, m: &mut Member, s: Stamp, now: u64) {
        if s.step == 0 {
            m.probes += 1;
            return;
        }
        if s.step != self.step {
            self.stale += 1;
            return;
        }
        let key = ((s.sender as u64) << 32) | s.room as u64;
        let Ok(i) = m.keys.binary_search(&key) else {
            self.unexpected += 1;
            return;
        };
        let next = &mut m.next[i];
        if s.seq < *next {
            self.duplicates += 1;
            return;
        }
        if s.seq > *next {
            self.gaps += (s.seq - *next) as u64;
        }
        *next = s.seq + 1;
        report::record(&mut self.lat, now.saturating_sub(s.t_ns) / 1000);
        m.got += 1;
        self.received += 1;
        self.last_recv = now;
        if m.got == m.expected {
            self.complete += 1;
        }
    }
}

fn stream_keys(topo: &Topo, m: u32, self_delivery: bool) -> Vec<u64> {
    let mut keys = Vec::new();
    for &r in &topo.member_rooms[m as usize] {
        for &s in &topo.room_members[r as usize] {
            if topo.is_sender[s as usize] && (s != m || self_delivery) {
                keys.push(((s as u64) << 32) | r as u64);
            }
        }
    }
    keys.sort_unstable();
    keys.dedup();
    keys
}

fn send_message(conn: &mut Conn<Member>, cfg: &TrafficCfg, buf: &mut Vec<u8>, stamp: &Stamp) {
    buf.clear();
    match cfg.proto {
        Proto::Chatterbox => proto::broadcast_command(
            buf,
            &cfg.room_names[stamp.room as usize],
            stamp,
            cfg.msg_size,
        ),
        Proto::Raw => proto::write_stamp(buf, stamp, cfg.msg_size),
    }
    conn.send_text(buf);
}

/// Runs the scenario: [`Runner::connect_and_join`], [`Runner::probe`], then one
/// [`Runner::step`] per offered rate.
pub fn run(cfg: &TrafficCfg, ctx: &mut Ctx) -> Result<TrafficShard, String> {
    let topo = topology(cfg);
    let mut r = Runner::new(cfg, &topo, ctx)?;
    let setup = r.connect_and_join(ctx)?;
    r.probe(ctx)?;
    let mut steps = Vec::new();
    for (i, &rate) in cfg.rates.iter().enumerate() {
        let step = i as u32 + 1;
        let (shard, overloaded) = r.step(ctx, step, rate)?;
        steps.push(shard);
        ctx.barrier(&format!("step{step}-end"))?;
        // Only a lone process may stop early: workers would not agree on when.
        if overloaded && cfg.stop_p99_ms > 0.0 && ctx.shards == 1 && step < cfg.rates.len() as u32 {
            r.say(format!(
                "{}: step {step} overloaded the server; skipping the higher rates",
                cfg.scenario
            ));
            break;
        }
    }
    r.net.close_all();
    Ok(TrafficShard { setup, steps })
}

/// One worker's connections and counters across the phases of a run.
struct Runner<'a> {
    cfg: &'a TrafficCfg,
    topo: &'a Topo,
    /// The members this worker owns.
    local: Vec<u32>,
    net: Net<Member>,
    /// Member index -> slot in `net` (`usize::MAX` when not connected here).
    slot_of: Vec<usize>,
    tally: Tally<'a>,
    /// Members of the topology; joiners are numbered from here.
    members: u32,
    /// Joins of the steps before this one (the next join's number in the run).
    joins_before: u64,
    buf: Vec<u8>,
    tag: String,
    quiet: bool,
}

/// Where the send loop of a step stands.
struct SendState {
    step: u32,
    rate: f64,
    total: u64,
    t0: u64,
    period: f64,
    /// Next message index of the schedule.
    k: u64,
    sent: u64,
    /// When the last send was due (0 while sending).
    sends_done: u64,
    cpu_send: u64,
    max_pending: usize,
    lag: Histogram<u64>,
    /// Joins of this step, and the next one due.
    join_total: u64,
    join_k: u64,
}

impl SendState {
    fn due(&self, k: u64) -> u64 {
        self.t0 + (k as f64 * self.period) as u64
    }

    /// Join `j` of the step is due half a period into its slot.
    fn join_due(&self, j: u64, rate: f64) -> u64 {
        self.t0 + ((j as f64 + 0.5) * 1e9 / rate) as u64
    }
}

/// CPU, scheduler and socket counters at the start of a step.
struct StepStart {
    cpu: u64,
    runq_wait: u64,
    ctx_switches: (u64, u64),
    net: crate::ws::NetCounters,
}

impl<'a> Runner<'a> {
    fn new(cfg: &'a TrafficCfg, topo: &'a Topo, ctx: &Ctx) -> Result<Runner<'a>, String> {
        let members = topo.member_rooms.len() as u32;
        let all = members + cfg.joins.as_ref().map_or(0, |j| j.joiners);
        Ok(Runner {
            cfg,
            topo,
            local: (0..all).filter(|&m| ctx.owns(m)).collect(),
            net: Net::new(cfg.targets.clone(), cfg.srcs.clone()).map_err(|e| e.to_string())?,
            slot_of: vec![usize::MAX; all as usize],
            members,
            joins_before: 0,
            tally: Tally {
                cfg,
                topo,
                step: 0,
                lat: report::new_hist(),
                received: 0,
                duplicates: 0,
                gaps: 0,
                stale: 0,
                unexpected: 0,
                errors: BTreeMap::new(),
                closed: 0,
                close_codes: BTreeMap::new(),
                welcomed: 0,
                ready: 0,
                failed: 0,
                fail_kinds: BTreeMap::new(),
                complete: 0,
                last_recv: 0,
                scratch: Vec::with_capacity(256),
                joins: JoinTally::new(),
            },
            buf: Vec::with_capacity(256),
            tag: ctx.tag(),
            quiet: ctx.quiet,
        })
    }

    fn say(&self, s: String) {
        if !self.quiet {
            eprintln!("{}{s}", self.tag);
        }
    }

    /// One turn of the event loop: every event goes to the tally.
    fn poll(&mut self, wake: Option<u64>, timeout: Duration) -> Result<(), String> {
        let tally = &mut self.tally;
        self.net
            .poll(wake, timeout, &mut |c, ev, now| tally.on_event(c, ev, now))
            .map_err(|e| e.to_string())
    }

    /// Opens this worker's connections, at most `concurrency` handshakes in flight, and
    /// waits until each has joined its rooms.
    fn connect_and_join(&mut self, ctx: &mut Ctx) -> Result<SetupShard, String> {
        let cfg = self.cfg;
        ctx.barrier("setup")?;
        let t_setup = mono_ns();
        let mut started = 0usize;
        let mut next_print = t_setup + NS;
        loop {
            while started < self.local.len()
                && (started as u64)
                    < self.tally.welcomed + self.tally.failed + cfg.concurrency as u64
            {
                let m = self.local[started];
                started += 1;
                self.connect_member(m);
            }
            let now = mono_ns();
            let (ready, failed) = (self.tally.ready, self.tally.failed);
            if ready + failed >= self.local.len() as u64 {
                break;
            }
            if now > t_setup + (cfg.setup_timeout * 1e9) as u64 || ctx.over_budget() {
                self.tally.failed += self.local.len() as u64 - ready - failed;
                *self
                    .tally
                    .fail_kinds
                    .entry("setup timeout".into())
                    .or_default() += 1;
                break;
            }
            if now >= next_print {
                next_print += NS;
                self.say(format!(
                    "{} setup: {ready}/{} ready, {failed} failed",
                    cfg.scenario,
                    self.local.len(),
                ));
            }
            self.poll(None, Duration::from_millis(50))?;
        }
        let setup = SetupShard {
            conns: self.local.len() as u64,
            ready: self.tally.ready,
            failed: self.tally.failed,
            fail_kinds: self.tally.fail_kinds.clone(),
            setup_s: secs(mono_ns() - t_setup),
        };
        self.say(format!(
            "{} setup: {} connections ready in {:.2}s, {} failed",
            cfg.scenario, setup.ready, setup.setup_s, setup.failed
        ));
        if setup.failed > 0 {
            return Err(format!(
                "setup: {} of {} connections failed: {:?}",
                setup.failed, setup.conns, setup.fail_kinds
            ));
        }
        Ok(setup)
    }

    fn connect_member(&mut self, m: u32) {
        let cfg = self.cfg;
        let user = if m >= self.members {
            Member {
                joiner: true,
                ..Member::default()
            }
        } else {
            let keys = stream_keys(self.topo, m, cfg.self_delivery);
            Member {
                next: vec![0; keys.len()],
                keys,
                ..Member::default()
            }
        };
        let path = match cfg.proto {
            Proto::Chatterbox => format!("{}?name={}{}", cfg.path, cfg.name_prefix, m),
            Proto::Raw => cfg.path.clone(),
        };
        match self.net.connect(m, &path, user) {
            Ok(slot) => self.slot_of[m as usize] = slot,
            Err(e) => {
                self.tally.failed += 1;
                *self.tally.fail_kinds.entry(e).or_default() += 1;
            }
        }
    }

    /// One stamped message per room proves every subscription is live.
    fn probe(&mut self, ctx: &mut Ctx) -> Result<(), String> {
        let (cfg, topo) = (self.cfg, self.topo);
        ctx.barrier("joined")?;
        for (r, ms) in topo.room_members.iter().enumerate() {
            let first = ms[0];
            if ctx.owns(first)
                && let Some(c) = self.net.get_mut(self.slot_of[first as usize])
            {
                let stamp = Stamp {
                    step: 0,
                    sender: first,
                    room: r as u32,
                    seq: 0,
                    t_ns: mono_ns(),
                };
                send_message(c, cfg, &mut self.buf, &stamp);
            }
        }
        let want_probes = |m: u32| -> u32 {
            topo.member_rooms[m as usize]
                .iter()
                .filter(|&&r| cfg.self_delivery || topo.room_members[r as usize][0] != m)
                .count() as u32
        };
        let t_probe = mono_ns();
        loop {
            let mut missing = 0;
            self.net.for_each_mut(|_, c| {
                if !c.user.joiner && c.user.probes < want_probes(c.idx) {
                    missing += 1;
                }
            });
            if missing == 0 {
                break;
            }
            if mono_ns() > t_probe + 30 * NS || ctx.over_budget() {
                return Err(format!(
                    "probe: {missing} members never got the probe message"
                ));
            }
            self.poll(None, Duration::from_millis(20))?;
        }
        if self.tally.errors.values().sum::<u64>() > 0 {
            return Err(format!(
                "errors from the server during setup: {:?}",
                self.tally.errors
            ));
        }
        Ok(())
    }

    /// One step of the sweep: the open-loop schedule at `rate`, the drain, and when
    /// deliveries are missing the settle. Returns the step and whether it overloaded
    /// the server.
    fn step(&mut self, ctx: &mut Ctx, step: u32, rate: f64) -> Result<(StepShard, bool), String> {
        let cfg = self.cfg;
        let total = (rate * cfg.duration).round().max(1.0) as u64;
        let expected = self.reset_for_step(step, total);
        let local_n = self.net.live() as u64;
        let t0 = ctx.barrier(&format!("step{step}-start"))?;
        let start = StepStart {
            cpu: cpu_ns(),
            runq_wait: clock::self_runq_wait_ns(),
            ctx_switches: clock::ctx_switches(),
            net: self.net.counters,
        };
        self.net.counters.max_batch_ns = 0;
        let mut st = SendState {
            step,
            rate,
            total,
            t0,
            period: 1e9 / rate,
            k: 0,
            sent: 0,
            sends_done: 0,
            cpu_send: 0,
            max_pending: 0,
            lag: report::new_hist(),
            join_total: cfg
                .joins
                .as_ref()
                .map_or(0, |j| (j.rate * cfg.duration).floor() as u64),
            join_k: 0,
        };
        let drained = self.send_and_drain(ctx, &mut st, &start, local_n)?;
        // Not everything arrived within the drain: keep reading so that late deliveries
        // are told from lost ones and the next step starts on a quiet server.
        let on_time = self.tally.received;
        if !drained {
            self.settle(ctx, local_n)?;
        }
        let shard = self.step_shard(&st, &start, expected, on_time, drained);
        self.joins_before += st.join_total;
        let lat = &self.tally.lat;
        self.say(format!(
            "{} step {step} rate={rate}/s done: sent={} recv={}/{} p50={:.2}ms p95={:.2}ms p99={:.2}ms max={:.2}ms gaps={} dups={} gen_cpu={:.0}%",
            cfg.scenario,
            shard.sent,
            shard.received,
            shard.expected,
            report::ms(lat, 0.5),
            report::ms(lat, 0.95),
            report::ms(lat, 0.99),
            report::ms(lat, 1.0),
            shard.gaps,
            shard.duplicates,
            100.0 * shard.gen_cpu_send_s / shard.send_window_s.max(1e-9),
        ));
        let overloaded = shard.late > 0
            || shard.received < shard.expected
            || (cfg.stop_p99_ms > 0.0 && report::ms(lat, 0.99) > cfg.stop_p99_ms);
        Ok((shard, overloaded))
    }

    /// Sets every member's expected count for a schedule of `total` messages and clears
    /// the tally. Returns the deliveries this worker expects.
    fn reset_for_step(&mut self, step: u32, total: u64) -> u64 {
        let (cfg, topo) = (self.cfg, self.topo);
        // Deliveries due to each room, and to each sender from itself.
        let mut room_msgs = vec![0u64; cfg.rooms as usize];
        let mut own = vec![0u64; topo.member_rooms.len()];
        for k in 0..total {
            let (s, r, _) = topo.message(k);
            room_msgs[r as usize] += 1;
            own[s as usize] += 1;
        }
        let mut expected = 0;
        let mut complete = 0;
        self.net.for_each_mut(|_, c| {
            let m = &mut c.user;
            if m.joiner {
                complete += 1;
                return;
            }
            m.expected = topo.member_rooms[c.idx as usize]
                .iter()
                .map(|&r| room_msgs[r as usize])
                .sum();
            if !cfg.self_delivery {
                m.expected -= own[c.idx as usize];
            }
            m.got = 0;
            m.next.iter_mut().for_each(|n| *n = 0);
            expected += m.expected;
            if m.expected == 0 {
                complete += 1;
            }
        });
        let t = &mut self.tally;
        t.step = step;
        t.lat.reset();
        (t.received, t.duplicates, t.gaps, t.stale, t.unexpected) = (0, 0, 0, 0, 0);
        t.errors.clear();
        t.close_codes.clear();
        t.closed = 0;
        t.complete = complete;
        t.last_recv = 0;
        t.joins = JoinTally {
            pending: t.joins.pending,
            ..JoinTally::new()
        };
        expected
    }

    /// Sends every message when it is due and reads deliveries until all have arrived
    /// and the send buffers are empty (true) or the drain time is up (false).
    fn send_and_drain(
        &mut self,
        ctx: &mut Ctx,
        st: &mut SendState,
        start: &StepStart,
        local_n: u64,
    ) -> Result<bool, String> {
        let cfg = self.cfg;
        let mut next_print = st.t0 + NS;
        let mut last_print = (st.t0, 0u64);
        loop {
            let now = self.send_due(ctx, st);
            if st.max_pending > cfg.max_pending {
                return Err(format!(
                    "step {}: {} bytes queued on one sender: the server is not reading",
                    st.step, st.max_pending
                ));
            }
            if st.k >= st.total && st.sends_done == 0 {
                st.sends_done = now.max(st.due(st.total.saturating_sub(1)));
                st.cpu_send = cpu_ns() - start.cpu;
            }
            if st.sends_done > 0 {
                if self.tally.complete >= local_n && self.tally.joins.pending == 0 {
                    let mut flushed = true;
                    self.net.for_each_mut(|_, c| flushed &= c.pending() == 0);
                    if flushed {
                        return Ok(true);
                    }
                }
                if now > st.sends_done + (cfg.drain * 1e9) as u64 {
                    return Ok(false);
                }
            }
            if ctx.over_budget() {
                return Err("over the --max-seconds budget".into());
            }
            if now >= next_print && !self.quiet {
                self.print_progress(st, now, last_print);
                last_print = (now, self.tally.received);
                next_print += NS;
            }
            let wake = (st.k < st.total).then(|| st.due(st.k));
            let join_wake =
                self.cfg.joins.as_ref().and_then(|j| {
                    (st.join_k < st.join_total).then(|| st.join_due(st.join_k, j.rate))
                });
            let wake = match (wake, join_wake) {
                (Some(a), Some(b)) => Some(a.min(b)),
                (a, b) => a.or(b),
            };
            self.poll(wake, Duration::from_millis(20))?;
        }
    }

    /// Sends the messages of the schedule that are due by now; returns the time.
    fn send_due(&mut self, ctx: &Ctx, st: &mut SendState) -> u64 {
        let mut now = mono_ns();
        while st.k < st.total {
            let (s, room, seq) = self.topo.message(st.k);
            if !ctx.owns(s) {
                st.k += 1;
                continue;
            }
            let t = st.due(st.k);
            if t > now {
                break;
            }
            if let Some(c) = self.net.get_mut(self.slot_of[s as usize]) {
                let stamp = Stamp {
                    step: st.step,
                    sender: s,
                    room,
                    seq,
                    t_ns: t,
                };
                send_message(c, self.cfg, &mut self.buf, &stamp);
                st.max_pending = st.max_pending.max(c.pending());
                st.sent += 1;
            }
            report::record(&mut st.lag, (now - t) / 1000);
            st.k += 1;
            if st.sent.is_multiple_of(64) {
                now = mono_ns();
            }
        }
        self.send_joins(ctx, st, now);
        now
    }

    /// Sends the joins that are due: each from the next joiner in turn, to the run's next
    /// room; a joiner still waiting for its last history skips its turn (counted).
    fn send_joins(&mut self, ctx: &Ctx, st: &mut SendState, now: u64) {
        let Some(jc) = self.cfg.joins.as_ref() else {
            return;
        };
        while st.join_k < st.join_total && st.join_due(st.join_k, jc.rate) <= now {
            let j = st.join_k;
            st.join_k += 1;
            let who = self.members + (j % jc.joiners.max(1) as u64) as u32;
            if !ctx.owns(who) {
                continue;
            }
            let Some(c) = self.net.get_mut(self.slot_of[who as usize]) else {
                continue;
            };
            if c.user.join.is_some() {
                self.tally.joins.skipped += 1;
                continue;
            }
            let room = jc.room_of(self.joins_before + j);
            self.buf.clear();
            proto::join_command(&mut self.buf, &format!("{}{room}", jc.prefix));
            c.send_text(&self.buf);
            c.user.join = Some((room, mono_ns()));
            self.tally.joins.sent += 1;
            self.tally.joins.pending += 1;
        }
    }

    fn print_progress(&self, st: &SendState, now: u64, last: (u64, u64)) {
        let dt = secs(now - last.0).max(1e-9);
        let rx_rate = (self.tally.received - last.1) as f64 / dt;
        eprintln!(
            "{}{} step {}/{} rate={}/s t={:.1}s sent={} recv={} ({:.3}M/s) p99={:.2}ms lag_p99={:.2}ms",
            self.tag,
            self.cfg.scenario,
            st.step,
            self.cfg.rates.len(),
            st.rate,
            secs(now - st.t0),
            st.sent,
            self.tally.received,
            rx_rate / 1e6,
            report::ms(&self.tally.lat, 0.99),
            report::ms(&st.lag, 0.99),
        );
    }

    /// After a drain that did not get everything: read on (up to 30 s, until nothing
    /// has come for a second).
    fn settle(&mut self, ctx: &Ctx, local_n: u64) -> Result<(), String> {
        let on_time = self.tally.received;
        let t_settle = mono_ns();
        let mut last_frames = self.net.counters.frames_in;
        let mut last_change = t_settle;
        loop {
            let now = mono_ns();
            let done = self.tally.complete >= local_n && self.tally.joins.pending == 0;
            if done || now > t_settle + 30 * NS || now > last_change + NS {
                break;
            }
            if ctx.over_budget() {
                return Err("over the --max-seconds budget".into());
            }
            self.poll(None, Duration::from_millis(50))?;
            if self.net.counters.frames_in != last_frames {
                last_frames = self.net.counters.frames_in;
                last_change = mono_ns();
            }
        }
        self.say(format!(
            "{} step {}: {} deliveries arrived after the {}s drain (settled in {:.1}s)",
            self.cfg.scenario,
            self.tally.step,
            self.tally.received - on_time,
            self.cfg.drain,
            secs(mono_ns() - t_settle)
        ));
        Ok(())
    }

    /// The step's raw result, from the tally and the counters since `start`.
    fn step_shard(
        &self,
        st: &SendState,
        start: &StepStart,
        expected: u64,
        on_time: u64,
        drained: bool,
    ) -> StepShard {
        let t = &self.tally;
        let (t0, t_end) = (st.t0, mono_ns());
        let c1 = self.net.counters;
        let c0 = start.net;
        let cs1 = clock::ctx_switches();
        StepShard {
            step: st.step,
            rate: st.rate,
            duration_s: self.cfg.duration,
            messages_total: st.total,
            sent: st.sent,
            expected,
            received: t.received,
            late: t.received - on_time,
            duplicates: t.duplicates,
            gaps: t.gaps,
            stale: t.stale,
            unexpected: t.unexpected,
            errors: t.errors.clone(),
            closed: t.closed,
            close_codes: t.close_codes.clone(),
            latency_us: Hist::of(&t.lat),
            send_lag_us: Hist::of(&st.lag),
            gen_cpu_s: secs(cpu_ns() - start.cpu),
            gen_cpu_send_s: secs(st.cpu_send),
            gen_runq_wait_s: secs(clock::self_runq_wait_ns() - start.runq_wait),
            gen_wakeups: cs1.0 - start.ctx_switches.0,
            gen_preemptions: cs1.1 - start.ctx_switches.1,
            send_window_s: secs(st.sends_done.max(t0) - t0),
            step_wall_s: secs(t_end - t0),
            last_delivery_s: if t.last_recv > t0 {
                secs(t.last_recv - t0)
            } else {
                0.0
            },
            max_batch_ms: c1.max_batch_ns as f64 / 1e6,
            max_pending_bytes: st.max_pending as u64,
            frames_in: c1.frames_in - c0.frames_in,
            reads: c1.reads - c0.reads,
            bytes_in: c1.bytes_in - c0.bytes_in,
            drained,
            joins_sent: t.joins.sent,
            joins_answered: t.joins.answered,
            join_errors: t.joins.errors,
            joins_skipped: t.joins.skipped,
            join_latency_us: Hist::of(&t.joins.lat),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn joins(rooms: u32) -> JoinCfg {
        JoinCfg {
            joiners: 1,
            rate: 1.0,
            rooms,
            prefix: "cold".into(),
        }
    }

    #[test]
    fn joins_visit_every_room_once_per_round() {
        for rooms in [1, 2, 7, 1000, 7919, 10_000, 15_838] {
            let j = joins(rooms);
            let mut seen: Vec<u32> = (0..rooms as u64).map(|n| j.room_of(n)).collect();
            seen.sort_unstable();
            seen.dedup();
            assert_eq!(seen.len(), rooms as usize, "rooms {rooms}");
            assert_eq!(j.room_of(rooms as u64), j.room_of(0));
        }
    }

    #[test]
    fn consecutive_joins_go_to_rooms_far_apart() {
        let j = joins(10_000);
        assert!(j.room_of(1).abs_diff(j.room_of(0)) > 100);
    }
}
