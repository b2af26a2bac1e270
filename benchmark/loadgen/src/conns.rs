//! The connection scenarios: `idle` (open N connections in levels and hold them while the
//! server's memory is sampled) and `storm` (open N connections as fast as the server lets,
//! at most C handshakes in flight, and time each one).

use std::collections::{BTreeMap, VecDeque};
use std::net::{Ipv4Addr, SocketAddrV4};
use std::time::Duration;

use crate::clock::{NS, cpu_ns, mono_ns, secs};
use crate::coord::Ctx;
use crate::proto::{self, Proto};
use crate::report::{self, Hist, IdleLevelShard, IdleShard, StormShard};
use crate::ws::{Conn, Ev, Net};

pub struct ConnCfg {
    pub proto: Proto,
    /// The server addresses; connection i goes to `targets[i % len]`.
    pub targets: Vec<SocketAddrV4>,
    pub srcs: Vec<Ipv4Addr>,
    pub path: String,
    pub name_prefix: String,
    pub concurrency: u32,
    /// Seconds one connection may take to be welcomed before it counts as failed.
    pub timeout: f64,
}

#[derive(Default)]
pub struct Idle {
    welcomed: bool,
}

#[derive(Default)]
struct Count {
    welcomed: u64,
    failed: u64,
    closed: u64,
    fail_kinds: BTreeMap<String, u64>,
    handshake: Option<hdrhistogram::Histogram<u64>>,
    welcome: Option<hdrhistogram::Histogram<u64>>,
    t_last: u64,
}

impl Count {
    fn on_event(&mut self, proto: Proto, conn: &mut Conn<Idle>, ev: Ev<'_>, now: u64) {
        let welcome = match ev {
            Ev::Opened => {
                if let Some(h) = self.handshake.as_mut() {
                    report::record(h, (now - conn.t_start) / 1000);
                }
                proto == Proto::Raw
            }
            // chatterbox's welcome ends with the `history` of `general`.
            Ev::Text(t) => {
                proto == Proto::Chatterbox
                    && !conn.user.welcomed
                    && proto::event_name(t) == b"history"
            }
            Ev::Failed(why) => {
                self.failed += 1;
                *self.fail_kinds.entry(why).or_default() += 1;
                false
            }
            Ev::Closed { code } => {
                self.closed += 1;
                if !conn.user.welcomed {
                    self.failed += 1;
                    let code = code.map_or("none".to_string(), |c| c.to_string());
                    *self
                        .fail_kinds
                        .entry(format!("closed before welcome ({code})"))
                        .or_default() += 1;
                }
                false
            }
        };
        if welcome && !conn.user.welcomed {
            conn.user.welcomed = true;
            self.welcomed += 1;
            self.t_last = now;
            if let Some(h) = self.welcome.as_mut() {
                report::record(h, (now - conn.t_start) / 1000);
            }
        }
    }
}

fn path_for(cfg: &ConnCfg, idx: u32) -> String {
    match cfg.proto {
        Proto::Chatterbox => format!("{}?name={}{}", cfg.path, cfg.name_prefix, idx),
        Proto::Raw => cfg.path.clone(),
    }
}

/// Opens the local share of global indices `from..to`, at most `concurrency` handshakes in
/// flight, until each is welcomed or failed (or timed out).
fn open_range(
    cfg: &ConnCfg,
    ctx: &Ctx,
    net: &mut Net<Idle>,
    count: &mut Count,
    from: u32,
    to: u32,
    label: &str,
) -> Result<(), String> {
    let todo: Vec<u32> = (from..to).filter(|&i| ctx.owns(i)).collect();
    let base = count.welcomed + count.failed;
    let mut started = 0usize;
    let t_start = mono_ns();
    let mut next_print = t_start + NS;
    let mut oldest_pending = VecDeque::<(u64, usize, u32)>::new();
    loop {
        let settled = count.welcomed + count.failed - base;
        while started < todo.len() && (started as u64) < settled + cfg.concurrency as u64 {
            let idx = todo[started];
            started += 1;
            match net.connect(idx, &path_for(cfg, idx), Idle::default()) {
                Ok(slot) => oldest_pending.push_back((mono_ns(), slot, idx)),
                Err(e) => {
                    count.failed += 1;
                    *count.fail_kinds.entry(e).or_default() += 1;
                }
            }
        }
        if count.welcomed + count.failed - base >= todo.len() as u64 {
            return Ok(());
        }
        let now = mono_ns();
        // Connections that were not welcomed within the timeout count as failed.
        let timeout = (cfg.timeout * 1e9) as u64;
        while let Some(&(t, slot, idx)) = oldest_pending.front() {
            let welcomed = net
                .get_mut(slot)
                .is_none_or(|c| c.idx != idx || c.user.welcomed);
            if welcomed {
                oldest_pending.pop_front();
            } else if now > t + timeout {
                oldest_pending.pop_front();
                net.close(slot);
                count.failed += 1;
                *count.fail_kinds.entry("timeout".into()).or_default() += 1;
            } else {
                break;
            }
        }
        if ctx.over_budget() {
            return Err("over the --max-seconds budget".into());
        }
        if now >= next_print && !ctx.quiet {
            next_print += NS;
            eprintln!(
                "{}{label}: {} settled of {} (total welcomed {}, failed {})",
                ctx.tag(),
                count.welcomed + count.failed - base,
                todo.len(),
                count.welcomed,
                count.failed
            );
        }
        let proto = cfg.proto;
        net.poll(None, Duration::from_millis(20), &mut |c, ev, now| {
            count.on_event(proto, c, ev, now)
        })
        .map_err(|e| e.to_string())?;
    }
}

fn pump(cfg: &ConnCfg, net: &mut Net<Idle>, count: &mut Count, seconds: f64) -> Result<(), String> {
    let end = mono_ns() + (seconds * 1e9) as u64;
    let proto = cfg.proto;
    while mono_ns() < end {
        net.poll(None, Duration::from_millis(50), &mut |c, ev, now| {
            count.on_event(proto, c, ev, now)
        })
        .map_err(|e| e.to_string())?;
    }
    Ok(())
}

pub fn run_idle(
    cfg: &ConnCfg,
    levels: &[u32],
    hold: f64,
    ctx: &mut Ctx,
) -> Result<IdleShard, String> {
    let mut net: Net<Idle> =
        Net::new(cfg.targets.clone(), cfg.srcs.clone()).map_err(|e| e.to_string())?;
    let mut count = Count::default();
    let mut out = IdleShard::default();
    ctx.barrier("level-0")?;
    let mut from = 0;
    for &level in levels {
        let t_open = mono_ns();
        open_range(
            cfg,
            ctx,
            &mut net,
            &mut count,
            from,
            level,
            &format!("idle level {level}"),
        )?;
        let open_s = secs(mono_ns() - t_open);
        from = level;
        // Let the server finish what the joins set off (notices, history) before sampling.
        pump(cfg, &mut net, &mut count, 0.5)?;
        out.levels.push(IdleLevelShard {
            level: level as u64,
            open: net.live() as u64,
            failed: count.failed,
            open_s,
        });
        if !ctx.quiet {
            eprintln!(
                "{}idle: {} connections open ({} failed)",
                ctx.tag(),
                net.live(),
                count.failed
            );
        }
        ctx.barrier(&format!("level-{level}"))?;
    }
    let closed_before = count.closed;
    let t = mono_ns();
    pump(cfg, &mut net, &mut count, hold)?;
    out.hold_s = secs(mono_ns() - t);
    out.closed_during_hold = count.closed - closed_before;
    out.open_after_hold = net.live() as u64;
    out.fail_kinds = count.fail_kinds.clone();
    ctx.barrier("hold-end")?;
    net.close_all();
    Ok(out)
}

pub fn run_storm(cfg: &ConnCfg, conns: u32, ctx: &mut Ctx) -> Result<StormShard, String> {
    let mut net: Net<Idle> =
        Net::new(cfg.targets.clone(), cfg.srcs.clone()).map_err(|e| e.to_string())?;
    let mut count = Count {
        handshake: Some(report::new_hist()),
        welcome: Some(report::new_hist()),
        ..Count::default()
    };
    let t0 = ctx.barrier("storm-start")?;
    let cpu0 = cpu_ns();
    let now = mono_ns();
    if t0 > now {
        std::thread::sleep(Duration::from_nanos(t0 - now));
    }
    let t_first = mono_ns();
    open_range(cfg, ctx, &mut net, &mut count, 0, conns, "storm")?;
    let out = StormShard {
        attempted: (0..conns).filter(|&i| ctx.owns(i)).count() as u64,
        completed: count.welcomed,
        failed: count.failed,
        fail_kinds: count.fail_kinds.clone(),
        handshake_us: Hist::of(count.handshake.as_ref().expect("set")),
        welcome_us: Hist::of(count.welcome.as_ref().expect("set")),
        t_first_ns: t_first,
        t_last_ns: count.t_last.max(t_first),
        gen_cpu_s: secs(cpu_ns() - cpu0),
    };
    ctx.barrier("storm-end")?;
    net.close_all();
    Ok(out)
}
