//! The traffic scenarios, `fanout` (one room of M members) and `rooms` (many small rooms):
//! connect and join, check the subscriptions with a probe, then for each offered rate run
//! an open-loop send schedule and measure every delivery against its intended send time.
//!
//! The schedule is deterministic: message `k` of a step is due at `t0 + k / rate`, is sent
//! by `senders[k % S]` to one of that sender's rooms, and carries its per-(sender, room)
//! sequence number. So every worker knows, without talking to the others, how many
//! deliveries each of its receivers must get, and can tell a late message from a lost one.

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
    pub target: SocketAddrV4,
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
                    b"history" => self.history(conn),
                    b"error" => *self.errors.entry(proto::error_code(t)).or_default() += 1,
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

pub fn run(cfg: &TrafficCfg, ctx: &mut Ctx) -> Result<TrafficShard, String> {
    let topo = topology(cfg);
    let members = topo.member_rooms.len() as u32;
    let local: Vec<u32> = (0..members).filter(|&m| ctx.owns(m)).collect();
    let mut net: Net<Member> = Net::new(cfg.target, cfg.srcs.clone()).map_err(|e| e.to_string())?;
    let mut slot_of = vec![usize::MAX; members as usize];
    let mut tally = Tally {
        cfg,
        topo: &topo,
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
    };
    let tag = ctx.tag();
    let quiet = ctx.quiet;
    let say = |s: String| {
        if !quiet {
            eprintln!("{tag}{s}");
        }
    };

    // ---- connect and join -------------------------------------------------------------
    ctx.barrier("setup")?;
    let t_setup = mono_ns();
    let mut started = 0usize;
    let mut next_print = t_setup + NS;
    loop {
        while started < local.len()
            && (started as u64) < tally.welcomed + tally.failed + cfg.concurrency as u64
        {
            let m = local[started];
            started += 1;
            let keys = stream_keys(&topo, m, cfg.self_delivery);
            let user = Member {
                next: vec![0; keys.len()],
                keys,
                ..Member::default()
            };
            let path = match cfg.proto {
                Proto::Chatterbox => format!("{}?name={}{}", cfg.path, cfg.name_prefix, m),
                Proto::Raw => cfg.path.clone(),
            };
            match net.connect(m, &path, user) {
                Ok(slot) => slot_of[m as usize] = slot,
                Err(e) => {
                    tally.failed += 1;
                    *tally.fail_kinds.entry(e).or_default() += 1;
                }
            }
        }
        let now = mono_ns();
        if tally.ready + tally.failed >= local.len() as u64 {
            break;
        }
        if now > t_setup + (cfg.setup_timeout * 1e9) as u64 || ctx.over_budget() {
            tally.failed += local.len() as u64 - tally.ready - tally.failed;
            *tally.fail_kinds.entry("setup timeout".into()).or_default() += 1;
            break;
        }
        if now >= next_print {
            next_print += NS;
            say(format!(
                "{} setup: {}/{} ready, {} failed",
                cfg.scenario,
                tally.ready,
                local.len(),
                tally.failed
            ));
        }
        net.poll(None, Duration::from_millis(50), &mut |c, ev, now| {
            tally.on_event(c, ev, now)
        })
        .map_err(|e| e.to_string())?;
    }
    let setup = SetupShard {
        conns: local.len() as u64,
        ready: tally.ready,
        failed: tally.failed,
        fail_kinds: tally.fail_kinds.clone(),
        setup_s: secs(mono_ns() - t_setup),
    };
    say(format!(
        "{} setup: {} connections ready in {:.2}s, {} failed",
        cfg.scenario, setup.ready, setup.setup_s, setup.failed
    ));
    if setup.failed > 0 {
        return Err(format!(
            "setup: {} of {} connections failed: {:?}",
            setup.failed, setup.conns, setup.fail_kinds
        ));
    }

    // ---- probe: one stamped message per room proves every subscription is live ----------
    ctx.barrier("joined")?;
    let mut buf = Vec::with_capacity(256);
    for (r, ms) in topo.room_members.iter().enumerate() {
        let first = ms[0];
        if ctx.owns(first)
            && let Some(c) = net.get_mut(slot_of[first as usize])
        {
            let stamp = Stamp {
                step: 0,
                sender: first,
                room: r as u32,
                seq: 0,
                t_ns: mono_ns(),
            };
            send_message(c, cfg, &mut buf, &stamp);
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
        net.for_each_mut(|_, c| {
            if c.user.probes < want_probes(c.idx) {
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
        net.poll(None, Duration::from_millis(20), &mut |c, ev, now| {
            tally.on_event(c, ev, now)
        })
        .map_err(|e| e.to_string())?;
    }
    if tally.errors.values().sum::<u64>() > 0 {
        return Err(format!(
            "errors from the server during setup: {:?}",
            tally.errors
        ));
    }

    // ---- the sweep ----------------------------------------------------------------------
    let mut steps = Vec::new();
    for (i, &rate) in cfg.rates.iter().enumerate() {
        let step = i as u32 + 1;
        let total = (rate * cfg.duration).round().max(1.0) as u64;
        // Deliveries due to each room, and to each sender from itself.
        let mut room_msgs = vec![0u64; cfg.rooms as usize];
        let mut own = vec![0u64; members as usize];
        for k in 0..total {
            let (s, r, _) = topo.message(k);
            room_msgs[r as usize] += 1;
            own[s as usize] += 1;
        }
        let mut expected = 0;
        let mut complete = 0;
        net.for_each_mut(|_, c| {
            let m = &mut c.user;
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
        tally.step = step;
        tally.lat.reset();
        (
            tally.received,
            tally.duplicates,
            tally.gaps,
            tally.stale,
            tally.unexpected,
        ) = (0, 0, 0, 0, 0);
        tally.errors.clear();
        tally.close_codes.clear();
        tally.closed = 0;
        tally.complete = complete;
        tally.last_recv = 0;
        let mut lag = report::new_hist();
        let local_n = net.live() as u64;

        let t0 = ctx.barrier(&format!("step{step}-start"))?;
        let cpu0 = cpu_ns();
        let wait0 = clock::self_runq_wait_ns();
        let cs0 = clock::ctx_switches();
        let c0 = net.counters;
        net.counters.max_batch_ns = 0;
        let period = 1e9 / rate;
        let due = |k: u64| t0 + (k as f64 * period) as u64;
        let mut k = 0u64;
        let mut sent = 0u64;
        let mut sends_done = 0u64;
        let mut cpu_send = 0u64;
        let mut max_pending = 0usize;
        let mut drained = false;
        let mut next_print = t0 + NS;
        let mut last_print = (t0, 0u64);
        loop {
            let mut now = mono_ns();
            while k < total {
                let (s, room, seq) = topo.message(k);
                if !ctx.owns(s) {
                    k += 1;
                    continue;
                }
                let t = due(k);
                if t > now {
                    break;
                }
                if let Some(c) = net.get_mut(slot_of[s as usize]) {
                    let stamp = Stamp {
                        step,
                        sender: s,
                        room,
                        seq,
                        t_ns: t,
                    };
                    send_message(c, cfg, &mut buf, &stamp);
                    max_pending = max_pending.max(c.pending());
                    sent += 1;
                }
                report::record(&mut lag, (now - t) / 1000);
                k += 1;
                if sent.is_multiple_of(64) {
                    now = mono_ns();
                }
            }
            if max_pending > cfg.max_pending {
                return Err(format!(
                    "step {step}: {max_pending} bytes queued on one sender: the server is not reading"
                ));
            }
            if k >= total && sends_done == 0 {
                sends_done = now.max(due(total.saturating_sub(1)));
                cpu_send = cpu_ns() - cpu0;
            }
            if sends_done > 0 {
                let mut flushed = true;
                if tally.complete >= local_n {
                    net.for_each_mut(|_, c| flushed &= c.pending() == 0);
                    if flushed {
                        drained = true;
                        break;
                    }
                }
                if now > sends_done + (cfg.drain * 1e9) as u64 {
                    break;
                }
            }
            if ctx.over_budget() {
                return Err("over the --max-seconds budget".into());
            }
            if now >= next_print && !quiet {
                let dt = secs(now - last_print.0).max(1e-9);
                let rx_rate = (tally.received - last_print.1) as f64 / dt;
                eprintln!(
                    "{tag}{} step {step}/{} rate={rate}/s t={:.1}s sent={sent} recv={} ({:.3}M/s) p99={:.2}ms lag_p99={:.2}ms",
                    cfg.scenario,
                    cfg.rates.len(),
                    secs(now - t0),
                    tally.received,
                    rx_rate / 1e6,
                    report::ms(&tally.lat, 0.99),
                    report::ms(&lag, 0.99),
                );
                last_print = (now, tally.received);
                next_print += NS;
            }
            let wake = (k < total).then(|| due(k));
            net.poll(wake, Duration::from_millis(20), &mut |c, ev, now| {
                tally.on_event(c, ev, now)
            })
            .map_err(|e| e.to_string())?;
        }
        // Not everything arrived within the drain: keep reading (up to 30 s, until nothing
        // has come for a second) so that late deliveries are told from lost ones and the
        // next step starts on a quiet server.
        let on_time = tally.received;
        if !drained {
            let t_settle = mono_ns();
            let mut last_frames = net.counters.frames_in;
            let mut last_change = t_settle;
            loop {
                let now = mono_ns();
                if tally.complete >= local_n || now > t_settle + 30 * NS || now > last_change + NS {
                    break;
                }
                if ctx.over_budget() {
                    return Err("over the --max-seconds budget".into());
                }
                net.poll(None, Duration::from_millis(50), &mut |c, ev, now| {
                    tally.on_event(c, ev, now)
                })
                .map_err(|e| e.to_string())?;
                if net.counters.frames_in != last_frames {
                    last_frames = net.counters.frames_in;
                    last_change = mono_ns();
                }
            }
            say(format!(
                "{} step {step}: {} deliveries arrived after the {}s drain (settled in {:.1}s)",
                cfg.scenario,
                tally.received - on_time,
                cfg.drain,
                secs(mono_ns() - t_settle)
            ));
        }
        let t_end = mono_ns();
        let c1 = net.counters;
        let shard = StepShard {
            step,
            rate,
            duration_s: cfg.duration,
            messages_total: total,
            sent,
            expected,
            received: tally.received,
            late: tally.received - on_time,
            duplicates: tally.duplicates,
            gaps: tally.gaps,
            stale: tally.stale,
            unexpected: tally.unexpected,
            errors: tally.errors.clone(),
            closed: tally.closed,
            close_codes: tally.close_codes.clone(),
            latency_us: Hist::of(&tally.lat),
            send_lag_us: Hist::of(&lag),
            gen_cpu_s: secs(cpu_ns() - cpu0),
            gen_cpu_send_s: secs(cpu_send),
            gen_runq_wait_s: secs(clock::self_runq_wait_ns() - wait0),
            gen_wakeups: clock::ctx_switches().0 - cs0.0,
            gen_preemptions: clock::ctx_switches().1 - cs0.1,
            send_window_s: secs(sends_done.max(t0) - t0),
            step_wall_s: secs(t_end - t0),
            last_delivery_s: if tally.last_recv > t0 {
                secs(tally.last_recv - t0)
            } else {
                0.0
            },
            max_batch_ms: c1.max_batch_ns as f64 / 1e6,
            max_pending_bytes: max_pending as u64,
            frames_in: c1.frames_in - c0.frames_in,
            reads: c1.reads - c0.reads,
            bytes_in: c1.bytes_in - c0.bytes_in,
            drained,
        };
        say(format!(
            "{} step {step} rate={rate}/s done: sent={} recv={}/{} p50={:.2}ms p99={:.2}ms max={:.2}ms gaps={} dups={} gen_cpu={:.0}%",
            cfg.scenario,
            shard.sent,
            shard.received,
            shard.expected,
            report::ms(&tally.lat, 0.5),
            report::ms(&tally.lat, 0.99),
            report::ms(&tally.lat, 1.0),
            shard.gaps,
            shard.duplicates,
            100.0 * shard.gen_cpu_send_s / shard.send_window_s.max(1e-9),
        ));
        let overloaded = shard.late > 0
            || shard.received < shard.expected
            || (cfg.stop_p99_ms > 0.0 && report::ms(&tally.lat, 0.99) > cfg.stop_p99_ms);
        steps.push(shard);
        ctx.barrier(&format!("step{step}-end"))?;
        // Only a lone process may stop early: workers would not agree on when.
        if overloaded && cfg.stop_p99_ms > 0.0 && ctx.shards == 1 && step < cfg.rates.len() as u32 {
            say(format!(
                "{}: step {step} overloaded the server; skipping the higher rates",
                cfg.scenario
            ));
            break;
        }
    }
    net.close_all();
    Ok(TrafficShard { setup, steps })
}
