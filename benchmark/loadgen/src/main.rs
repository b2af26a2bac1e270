//! `loadgen`: an open-loop WebSocket load generator for chatterbox and for peer servers that
//! relay raw text frames. See `loadgen help`.
//!
//! # Layout
//! - `args`: the small command-line parser.
//! - `clock`: the shared monotonic clock, CPU time, /proc samples of the server.
//! - `ws`: the client transport (mio, shared read buffer, frame codec, timerfd).
//! - `proto`: payload stamps and the bits of chatterbox's event format we read.
//! - `traffic`: `fanout` and `rooms`; `conns`: `idle` and `storm`; `soak`: the long run.
//! - `coord`: worker processes and barriers; `report`: raw results and merging.

mod args;
mod clock;
mod conns;
mod coord;
mod proto;
mod report;
mod soak;
mod traffic;
mod ws;

use std::collections::BTreeMap;
use std::net::{Ipv4Addr, SocketAddrV4};

use serde_json::{Value, json};

use args::Args;
use clock::mono_ns;
use coord::{Coord, Ctx, Sampler};
use proto::Proto;
use report::{ShardResult, StepShard};

const HELP: &str = "\
loadgen SCENARIO --target 127.0.0.1:PORT [options]

Scenarios
  fanout   one room of --members M, --senders S of them send; sweep --rates (messages/s)
  rooms    --rooms R rooms of --room-size N members (each in --rooms-per-member rooms);
           --senders S (default: every member) send to their rooms; sweep --rates
  idle     open --levels L1,L2,.. connections (or --conns N), sample the server at each
           level, hold --hold seconds
  storm    open --conns N connections as fast as possible, at most --concurrency in flight
  soak     chatterbox only, one process: --seconds S of steady traffic to --rooms R rooms of
           --room-size N stable members with churn, checking every per-room id (see below)

Common
  --target ADDR          server address, loopback only (127.0.0.0/8)
  --proto P              chatterbox (default) | raw (peer: every text frame relayed to all)
  --path P               upgrade path (default /ws); chatterbox adds ?name=PREFIXidx
  --name-prefix S        member name prefix (default lg<pid>_)
  --src-ips N            bind sources 127.0.0.1..127.0.0.N round-robin (default 1)
  --procs N              N worker processes share the connections (fd limit ~19,900 each)
  --server-pid P[,P..]   sample CPU (utime+stime) and RSS of these pids at each barrier
  --label S              free text copied into the result (e.g. the target's name)
  --out FILE             write the JSON result there (default: stdout)
  --max-seconds S        hard budget for the whole run (default 600)
  --concurrency C        handshakes in flight at once (default 200)
  --quiet                no progress lines on stderr

Traffic (fanout, rooms)
  --rates R1,R2,..       offered messages/s, one step each      --duration S   per step (5)
  --drain S              wait for deliveries after a step (3)    --msg-size B   payload (64)
  --slo-ms X             p99 bound for the best-rate answer (50)
  --no-early-stop        run every rate even after a step overloaded the server (late or
                         lost deliveries, or p99 > 10 x SLO); a lone process stops by default
  --room NAME            fanout room (default bench)
  --self-delivery B      raw proto: does the sender get its own frame (default true)
  --setup-timeout S      connect + join (default 120)
Soak (defaults in brackets)
  --seconds S            length of the traffic [600]
  --rooms R              rooms [20]                    --room-size N  stable members each [25]
  --senders-per-room K   steady senders per room [2]   --rate X       total steady msg/s [500]
  --churners C           churning clients at once [50] --dwell S      mean connected time per
                         churn cycle [10]              --churn-msgs M acked messages per cycle, 1..M [4]
  --resume-every S       one reconnect-with-`since` check every S seconds [10]
  --ack-timeout S        an ack later than this is missing [10]
  --drain S              after the schedule, wait at most S for everything to arrive [30]
  --bucket S             counters per S seconds in the result [60]
  --seed N               RNG seed [1]                  --msg-size B   payload [64]
  --setup-timeout S      connect + join of the stable members [120]
Connections (idle, storm)
  --timeout S            one connection's welcome timeout (default 10)
  --hold S               idle: hold time at the top level (default 5)

Exit status: 0 ok, 2 the run finished with problems (gaps, duplicates, losses, errors,
failures, zero deliveries), 1 the run could not be done.
";

struct Common {
    proto: Proto,
    target: SocketAddrV4,
    srcs: Vec<Ipv4Addr>,
    path: String,
    name_prefix: String,
    concurrency: u32,
    label: String,
}

fn parse_common(a: &Args) -> Result<Common, String> {
    let target: SocketAddrV4 = a
        .opt_str("target")
        .ok_or("--target 127.0.0.1:PORT is required")?
        .parse()
        .map_err(|_| "--target must be IPv4 ADDR:PORT")?;
    if target.ip().octets()[0] != 127 {
        return Err("--target must be a loopback address (127.0.0.0/8)".into());
    }
    let n_src: u32 = a.get("src-ips", 1)?;
    if !(1..=250).contains(&n_src) {
        return Err("--src-ips must be 1..250".into());
    }
    Ok(Common {
        proto: Proto::parse(&a.str_or("proto", "chatterbox"))?,
        target,
        srcs: (1..=n_src)
            .map(|i| Ipv4Addr::new(127, 0, 0, i as u8))
            .collect(),
        path: a.str_or("path", "/ws"),
        name_prefix: a
            .opt_str("name-prefix")
            .unwrap_or_else(|| format!("lg{}_", std::process::id())),
        concurrency: a.get("concurrency", 200u32)?.max(1),
        label: a.str_or("label", ""),
    })
}

enum Plan {
    Traffic(traffic::TrafficCfg, f64),
    Idle(conns::ConnCfg, Vec<u32>, f64),
    Storm(conns::ConnCfg, u32),
}

fn parse_plan(scenario: &str, a: &Args, c: &Common) -> Result<(Plan, Value), String> {
    match scenario {
        "fanout" | "rooms" => {
            let fan = scenario == "fanout";
            let (rooms, room_size, rpm, senders) = if fan {
                let m: u32 = a.get("members", 1000)?;
                (1, m, 1, a.get("senders", 10u32)?)
            } else {
                let rooms: u32 = a.get("rooms", 1000)?;
                let size: u32 = a.get("room-size", 10)?;
                (
                    rooms,
                    size,
                    a.get("rooms-per-member", 1u32)?,
                    a.get("senders", rooms * size)?,
                )
            };
            if c.proto == Proto::Raw && rooms != 1 {
                return Err("the raw protocol has no rooms: use fanout".into());
            }
            if rooms == 0 || room_size == 0 || rooms as u64 * room_size as u64 > 200_000 {
                return Err("members must be 1..200000".into());
            }
            let rates: Vec<f64> = a.list("rates", &[500.0, 1000.0, 1500.0])?;
            if rates.is_empty() || rates.iter().any(|&r| !(r > 0.0 && r <= 2_000_000.0)) {
                return Err("--rates must be in (0, 2e6]".into());
            }
            let duration: f64 = a.get("duration", 5.0)?;
            let drain: f64 = a.get("drain", 3.0)?;
            if !(0.1..=120.0).contains(&duration) || !(0.0..=60.0).contains(&drain) {
                return Err("--duration must be 0.1..120 s and --drain 0..60 s".into());
            }
            let msg_size: usize = a.get("msg-size", 64)?;
            let room = a.str_or("room", "bench");
            let room_names = if fan {
                vec![room]
            } else {
                (0..rooms).map(|i| format!("r{i}")).collect()
            };
            let slo: f64 = a.get("slo-ms", 50.0)?;
            let self_delivery: bool = a.get("self-delivery", true)?;
            let cfg = traffic::TrafficCfg {
                scenario: if fan { "fanout" } else { "rooms" },
                proto: c.proto,
                target: c.target,
                srcs: c.srcs.clone(),
                path: c.path.clone(),
                name_prefix: c.name_prefix.clone(),
                rooms,
                room_size,
                rooms_per_member: rpm.max(1),
                senders,
                rates: rates.clone(),
                duration,
                drain,
                msg_size: msg_size.clamp(24, 900),
                concurrency: c.concurrency,
                self_delivery: c.proto == Proto::Chatterbox || self_delivery,
                setup_timeout: a.get("setup-timeout", 120.0)?,
                room_names,
                max_pending: 64 << 20,
                stop_p99_ms: if a.flag("no-early-stop") {
                    0.0
                } else {
                    10.0 * slo
                },
            };
            let params = json!({
                "rooms": rooms, "room_size": room_size, "members": rooms * room_size,
                "rooms_per_member": rpm, "senders": cfg.senders.min(rooms * room_size),
                "rates": rates, "duration_s": duration, "drain_s": drain, "msg_size": cfg.msg_size,
                "self_delivery": cfg.self_delivery, "slo_ms": slo,
            });
            Ok((Plan::Traffic(cfg, slo), params))
        }
        "idle" | "storm" => {
            let cfg = conns::ConnCfg {
                proto: c.proto,
                target: c.target,
                srcs: c.srcs.clone(),
                path: c.path.clone(),
                name_prefix: c.name_prefix.clone(),
                concurrency: c.concurrency,
                timeout: a.get("timeout", 10.0)?,
            };
            let n: u32 = a.get("conns", 1000)?;
            if n > 1_000_000 {
                return Err("--conns at most 1,000,000".into());
            }
            if scenario == "idle" {
                let mut levels: Vec<u32> = a.list("levels", &[n])?;
                levels.sort_unstable();
                levels.dedup();
                levels.retain(|&l| l > 0);
                let hold: f64 = a.get("hold", 5.0)?;
                if !(0.0..=3600.0).contains(&hold) {
                    return Err("--hold must be 0..3600 s".into());
                }
                let params =
                    json!({"levels": levels, "hold_s": hold, "concurrency": c.concurrency});
                Ok((Plan::Idle(cfg, levels, hold), params))
            } else {
                let params =
                    json!({"conns": n, "concurrency": c.concurrency, "timeout_s": cfg.timeout});
                Ok((Plan::Storm(cfg, n), params))
            }
        }
        other => Err(format!("unknown scenario '{other}' (see `loadgen help`)")),
    }
}

fn run_shard(plan: &Plan, ctx: &mut Ctx) -> ShardResult {
    let r = match plan {
        Plan::Traffic(cfg, _) => traffic::run(cfg, ctx).map(ShardResult::Traffic),
        Plan::Idle(cfg, levels, hold) => {
            conns::run_idle(cfg, levels, *hold, ctx).map(ShardResult::Idle)
        }
        Plan::Storm(cfg, n) => conns::run_storm(cfg, *n, ctx).map(ShardResult::Storm),
    };
    r.unwrap_or_else(ShardResult::Error)
}

fn lat_json(h: &hdrhistogram::Histogram<u64>) -> Value {
    json!({
        "p50": report::ms(h, 0.5), "p90": report::ms(h, 0.9), "p99": report::ms(h, 0.99),
        "p999": report::ms(h, 0.999), "max": report::ms(h, 1.0),
        "mean": (h.mean() / 1000.0 * 1000.0).round() / 1000.0, "count": h.len(),
    })
}

/// (server cpu s, server rss kb at `b`, server run-queue wait s, machine busy cpu-s, wall s)
/// between two barrier samples.
struct Delta {
    cpu_s: f64,
    rss_kb: u64,
    runq_wait_s: f64,
    busy_s: f64,
    wall_s: f64,
}

fn delta(s: &Sampler, a: &str, b: &str) -> Option<Delta> {
    let (x, y) = (s.get(a)?, s.get(b)?);
    Some(Delta {
        cpu_s: y.proc.cpu_s - x.proc.cpu_s,
        rss_kb: y.proc.rss_kb,
        runq_wait_s: y.proc.runq_wait_s - x.proc.runq_wait_s,
        busy_s: y.proc.machine_busy_s - x.proc.machine_busy_s,
        wall_s: (y.t_s - x.t_s).max(1e-9),
    })
}

fn r3(x: f64) -> f64 {
    (x * 1000.0).round() / 1000.0
}

fn summarize_traffic(
    shards: &[report::TrafficShard],
    sampler: &Sampler,
    slo: f64,
    problems: &mut Vec<String>,
) -> Value {
    let mut setup = report::SetupShard::default();
    for s in shards {
        setup.conns += s.setup.conns;
        setup.ready += s.setup.ready;
        setup.failed += s.setup.failed;
        setup.setup_s = setup.setup_s.max(s.setup.setup_s);
        report::add_map(&mut setup.fail_kinds, &s.setup.fail_kinds);
    }
    let mut steps = Vec::new();
    let mut best: Option<Value> = None;
    let n_steps = shards.first().map_or(0, |s| s.steps.len());
    for i in 0..n_steps {
        let parts: Vec<&StepShard> = shards.iter().map(|s| &s.steps[i]).collect();
        let first = parts[0];
        let mut lat = report::new_hist();
        let mut lag = report::new_hist();
        let mut errors = BTreeMap::new();
        let mut close_codes = BTreeMap::new();
        let sum = |f: &dyn Fn(&StepShard) -> u64| parts.iter().map(|p| f(p)).sum::<u64>();
        let maxf = |f: &dyn Fn(&StepShard) -> f64| parts.iter().map(|p| f(p)).fold(0.0, f64::max);
        for p in &parts {
            p.latency_us.add_to(&mut lat);
            p.send_lag_us.add_to(&mut lag);
            report::add_map(&mut errors, &p.errors);
            report::add_map(&mut close_codes, &p.close_codes);
        }
        let expected = sum(&|p| p.expected);
        let received = sum(&|p| p.received);
        let late = sum(&|p| p.late);
        let sent = sum(&|p| p.sent);
        let gaps = sum(&|p| p.gaps);
        let dups = sum(&|p| p.duplicates);
        let unexpected = sum(&|p| p.unexpected);
        let lost = expected.saturating_sub(received);
        let window = maxf(&|p| p.send_window_s).max(1e-9);
        let last = maxf(&|p| p.last_delivery_s).max(window);
        let cpu_send: f64 = parts.iter().map(|p| p.gen_cpu_send_s).sum();
        let cpu_frac = cpu_send / window;
        let lag_p99 = report::ms(&lag, 0.99);
        let max_loop = maxf(&|p| p.max_batch_ms);
        let reads = sum(&|p| p.reads);
        let frames = sum(&|p| p.frames_in);
        let mut warnings = Vec::new();
        if cpu_frac > 0.85 {
            warnings.push(format!(
                "loadgen used {:.0}% of a core while sending: one sweep over its sockets (longest {:.1} ms) adds that much to the latencies it measures",
                cpu_frac * 100.0,
                max_loop
            ));
        }
        if lag_p99 > 5.0 {
            warnings.push(format!(
                "send schedule fell behind (send lag p99 {lag_p99:.1} ms)"
            ));
        }
        if max_loop > 50.0 {
            warnings.push(format!(
                "loadgen loop stalled {max_loop:.0} ms on one batch"
            ));
        }
        let gen_cpu: f64 = parts.iter().map(|p| p.gen_cpu_s).sum();
        let gen_wait = maxf(&|p| p.gen_runq_wait_s);
        let step_wall = maxf(&|p| p.step_wall_s).max(1e-9);
        let wakeups = sum(&|p| p.gen_wakeups);
        let preempted = sum(&|p| p.gen_preemptions);
        let mut noise = Vec::new();
        if gen_wait > 0.05 * step_wall {
            if preempted as f64 / step_wall > 20.0 {
                warnings.push(format!(
                    "loadgen was preempted {preempted} times and waited {:.0} ms ({:.0}% of the step) for its core: another process ran on it",
                    gen_wait * 1e3,
                    100.0 * gen_wait / step_wall
                ));
            } else {
                // Runnable-but-not-running time spread over many wake-ups is the scheduler's
                // (and, in a VM, the hypervisor's) wake-up latency, not a competing process.
                noise.push(format!(
                    "loadgen spent {:.0} ms being woken ({:.1} µs per wake-up, {wakeups} wake-ups)",
                    gen_wait * 1e3,
                    gen_wait * 1e6 / (wakeups + preempted).max(1) as f64
                ));
            }
        }
        let label = format!("step{}", first.step);
        let d = delta(sampler, &format!("{label}-start"), &format!("{label}-end"));
        let server = d.as_ref().filter(|_| sampler.has_pids()).map(|d| {
            if d.runq_wait_s > 0.05 * d.wall_s {
                noise.push(format!("server waited {:.0} ms for its CPU", d.runq_wait_s * 1e3));
            }
            json!({
                "cpu_s": r3(d.cpu_s),
                "cpu_frac_of_core": r3(d.cpu_s / d.wall_s),
                "cpu_s_per_million_deliveries": if received > 0 { r3(d.cpu_s / (received as f64 / 1e6)) } else { 0.0 },
                "rss_kb": d.rss_kb,
                "runq_wait_s": r3(d.runq_wait_s),
            })
        });
        let machine = d.as_ref().map(|d| {
            let server_cpu = if sampler.has_pids() { d.cpu_s } else { 0.0 };
            let other = (d.busy_s - server_cpu - gen_cpu).max(0.0) / d.wall_s;
            if other > 0.25 {
                noise.push(format!(
                    "other processes used {other:.2} cores during the step"
                ));
            }
            json!({"busy_cores": r3(d.busy_s / d.wall_s), "other_cores": r3(other)})
        });
        let p99 = report::ms(&lat, 0.99);
        let clean = gaps == 0
            && dups == 0
            && lost == 0
            && late == 0
            && errors.is_empty()
            && unexpected == 0;
        let mut step_problems = Vec::new();
        if received == 0 {
            step_problems.push("zero deliveries".to_string());
        }
        if gaps > 0 || dups > 0 || unexpected > 0 {
            step_problems.push(format!(
                "{gaps} gaps, {dups} duplicates, {unexpected} unexpected"
            ));
        }
        if lost > 0 {
            step_problems.push(format!(
                "{lost} of {expected} deliveries missing after the drain"
            ));
        }
        if !errors.is_empty() {
            step_problems.push(format!("server errors {errors:?}"));
        }
        for p in &step_problems {
            problems.push(format!("step {} (rate {}): {p}", first.step, first.rate));
        }
        let deliveries_per_sec = received as f64 / last;
        let step = json!({
            "step": first.step,
            "offered_rate": first.rate,
            "duration_s": first.duration_s,
            "messages": first.messages_total,
            "sent": sent,
            "send_rate": (sent as f64 / window).round(),
            "offered_deliveries_per_sec": (expected as f64 / first.duration_s).round(),
            "expected_deliveries": expected,
            "deliveries": received,
            "deliveries_per_sec": deliveries_per_sec.round(),
            "latency_ms": lat_json(&lat),
            "late": late,
            "lost": lost,
            "gaps": gaps,
            "duplicates": dups,
            "stale": sum(&|p| p.stale),
            "unexpected": unexpected,
            "errors": errors,
            "closed": sum(&|p| p.closed),
            "close_codes": close_codes,
            "drained": parts.iter().all(|p| p.drained),
            "server": server,
            "machine": machine,
            "noise": noise,
            "generator": {
                "cpu_frac_of_core_while_sending": (cpu_frac * 1000.0).round() / 1000.0,
                "cpu_s": r3(gen_cpu),
                "runq_wait_s": r3(gen_wait),
                "wakeups": wakeups,
                "preemptions": preempted,
                "send_lag_ms": {"p50": report::ms(&lag, 0.5), "p99": lag_p99, "max": report::ms(&lag, 1.0)},
                "max_loop_ms": max_loop,
                "reads": reads,
                "frames_per_read": if reads > 0 { ((frames as f64 / reads as f64) * 10.0).round() / 10.0 } else { 0.0 },
                "bytes_in": sum(&|p| p.bytes_in),
                "max_pending_bytes": parts.iter().map(|p| p.max_pending_bytes).max().unwrap_or(0),
                "bottleneck": !warnings.is_empty(),
                "warnings": warnings,
            },
            "slo_met": clean && received > 0 && p99 < slo,
        });
        if clean && received > 0 && p99 < slo {
            let better = best
                .as_ref()
                .is_none_or(|b| b["offered_rate"].as_f64() < Some(first.rate));
            if better {
                best = Some(json!({
                    "offered_rate": first.rate,
                    "deliveries_per_sec": deliveries_per_sec.round(),
                    "p99_ms": p99,
                    "generator_bottleneck": step["generator"]["bottleneck"],
                }));
            }
        }
        steps.push(step);
    }
    json!({
        "setup": {"conns": setup.conns, "ready": setup.ready, "failed": setup.failed,
                  "fail_kinds": setup.fail_kinds, "setup_s": setup.setup_s},
        "steps": steps,
        "best_rate_under_slo": best,
    })
}

fn summarize_idle(
    shards: &[report::IdleShard],
    sampler: &Sampler,
    problems: &mut Vec<String>,
) -> Value {
    let base = sampler.get("level-0").map(|s| s.proc.rss_kb);
    let mut levels = Vec::new();
    let n = shards.first().map_or(0, |s| s.levels.len());
    for i in 0..n {
        let level = shards[0].levels[i].level;
        let open: u64 = shards.iter().map(|s| s.levels[i].open).sum();
        let failed: u64 = shards.iter().map(|s| s.levels[i].failed).sum();
        let rss = sampler
            .has_pids()
            .then(|| {
                sampler
                    .get(&format!("level-{level}"))
                    .map(|s| s.proc.rss_kb)
            })
            .flatten();
        let per_conn = match (rss, base) {
            (Some(r), Some(b)) if open > 0 => {
                Some(((r as f64 - b as f64) * 1024.0 / open as f64).round())
            }
            _ => None,
        };
        levels.push(json!({
            "conns": level, "open": open, "failed": failed,
            "server_rss_kb": rss, "bytes_per_conn": per_conn,
        }));
        if open < level {
            problems.push(format!(
                "idle level {level}: only {open} connections open ({failed} failed)"
            ));
        }
    }
    let closed: u64 = shards.iter().map(|s| s.closed_during_hold).sum();
    if closed > 0 {
        problems.push(format!(
            "{closed} idle connections were closed during the hold"
        ));
    }
    let mut kinds = BTreeMap::new();
    for s in shards {
        report::add_map(&mut kinds, &s.fail_kinds);
    }
    json!({
        "baseline_rss_kb": if sampler.has_pids() { base } else { None },
        "levels": levels,
        "hold": {
            "seconds": shards.iter().map(|s| s.hold_s).fold(0.0, f64::max),
            "closed_during_hold": closed,
            "open_after_hold": shards.iter().map(|s| s.open_after_hold).sum::<u64>(),
            "server_rss_kb_after": sampler.has_pids().then(|| sampler.get("hold-end").map(|s| s.proc.rss_kb)).flatten(),
            "server_hwm_kb": sampler.has_pids().then(|| sampler.get("hold-end").map(|s| s.proc.hwm_kb)).flatten(),
        },
        "fail_kinds": kinds,
    })
}

fn summarize_storm(
    shards: &[report::StormShard],
    sampler: &Sampler,
    problems: &mut Vec<String>,
) -> Value {
    let mut hs = report::new_hist();
    let mut wl = report::new_hist();
    let mut kinds = BTreeMap::new();
    for s in shards {
        s.handshake_us.add_to(&mut hs);
        s.welcome_us.add_to(&mut wl);
        report::add_map(&mut kinds, &s.fail_kinds);
    }
    let attempted: u64 = shards.iter().map(|s| s.attempted).sum();
    let completed: u64 = shards.iter().map(|s| s.completed).sum();
    let failed: u64 = shards.iter().map(|s| s.failed).sum();
    let t0 = shards.iter().map(|s| s.t_first_ns).min().unwrap_or(0);
    let t1 = shards.iter().map(|s| s.t_last_ns).max().unwrap_or(0);
    let dur = clock::secs(t1.saturating_sub(t0)).max(1e-9);
    if completed == 0 {
        problems.push("storm: no connection completed".into());
    }
    if failed > 0 {
        problems.push(format!(
            "storm: {failed} of {attempted} connections failed: {kinds:?}"
        ));
    }
    let overflows = match (sampler.get("storm-start"), sampler.get("storm-end")) {
        (Some(a), Some(b)) => b
            .proc
            .listen_overflows
            .saturating_sub(a.proc.listen_overflows),
        _ => 0,
    };
    let server = delta(sampler, "storm-start", "storm-end")
        .filter(|_| sampler.has_pids())
        .map(
            |d| json!({"cpu_s": r3(d.cpu_s), "rss_kb": d.rss_kb, "runq_wait_s": r3(d.runq_wait_s)}),
        );
    json!({
        "attempted": attempted, "completed": completed, "failed": failed, "fail_kinds": kinds,
        "seconds": (dur * 1000.0).round() / 1000.0,
        "handshakes_per_sec": (completed as f64 / dur).round(),
        "handshake_ms": lat_json(&hs),
        "listen_queue_overflows": overflows,
        "welcome_ms": lat_json(&wl),
        "server": server,
        "generator_cpu_s": shards.iter().map(|s| s.gen_cpu_s).sum::<f64>(),
    })
}

fn run_soak(a: &Args, c: &Common) -> Result<i32, String> {
    if c.proto != Proto::Chatterbox {
        return Err("soak needs --proto chatterbox (it checks rooms, ids and acks)".into());
    }
    if a.get("procs", 1u32)? != 1 {
        return Err("soak runs in one process (--procs 1)".into());
    }
    let seconds: f64 = a.get("seconds", 600.0)?;
    let rooms: u32 = a.get("rooms", 20)?;
    let room_size: u32 = a.get("room-size", 25)?;
    let rate: f64 = a.get("rate", 500.0)?;
    if !(1.0..=7200.0).contains(&seconds) {
        return Err("--seconds must be 1..7200".into());
    }
    if !(1..=1000).contains(&rooms)
        || !(1..=1000).contains(&room_size)
        || rooms * room_size > 15_000
    {
        return Err("--rooms and --room-size 1..1000, at most 15,000 stable members".into());
    }
    if !(rate > 0.0 && rate <= 100_000.0) {
        return Err("--rate must be in (0, 100000]".into());
    }
    let max_seconds: f64 = a.get("max-seconds", seconds + 300.0)?;
    let cfg = soak::SoakCfg {
        target: c.target,
        srcs: c.srcs.clone(),
        path: c.path.clone(),
        name_prefix: c.name_prefix.clone(),
        concurrency: c.concurrency,
        rooms,
        room_size,
        senders_per_room: a.get::<u32>("senders-per-room", 2)?.clamp(1, room_size),
        rate,
        seconds,
        churners: a.get::<u32>("churners", 50)?.min(2000),
        dwell: a.get::<f64>("dwell", 10.0)?.clamp(0.05, 600.0),
        churn_msgs: a.get::<u32>("churn-msgs", 4)?.clamp(1, 100),
        resume_every: a.get::<f64>("resume-every", 10.0)?.max(1.0),
        ack_timeout: a.get::<f64>("ack-timeout", 10.0)?.clamp(0.1, 120.0),
        drain: a.get::<f64>("drain", 30.0)?.clamp(1.0, 300.0),
        msg_size: a.get::<usize>("msg-size", 64)?.clamp(40, 900),
        bucket: a.get::<f64>("bucket", 60.0)?.clamp(1.0, 3600.0),
        seed: a.get("seed", 1u64)?,
        setup_timeout: a.get("setup-timeout", 120.0)?,
        deadline: mono_ns() + (max_seconds.clamp(1.0, 8000.0) * 1e9) as u64,
        quiet: a.flag("quiet"),
    };
    let out = a.opt_str("out");
    let _: Vec<u32> = a.list("server-pid", &[])?;
    a.finish()?;
    let t_start = mono_ns();
    let mut doc = json!({
        "scenario": "soak",
        "label": c.label,
        "proto": "chatterbox",
        "target": c.target.to_string(),
        "params": cfg.params(),
    });
    let (code, problems) = match soak::run(&cfg) {
        Ok((body, problems)) => {
            if let (Value::Object(d), Value::Object(b)) = (&mut doc, body) {
                d.extend(b);
            }
            let code = if problems.is_empty() { 0 } else { 2 };
            (code, problems)
        }
        Err(e) => {
            doc["error"] = json!(e);
            (1, vec![e])
        }
    };
    doc["wall_s"] = json!(clock::secs(mono_ns() - t_start));
    doc["ok"] = json!(problems.is_empty());
    doc["problems"] = json!(problems);
    let text = serde_json::to_string_pretty(&doc).map_err(|e| e.to_string())?;
    match out {
        Some(path) => std::fs::write(&path, text + "\n").map_err(|e| format!("{path}: {e}"))?,
        None => println!("{text}"),
    }
    if !cfg.quiet {
        for p in &problems {
            eprintln!("loadgen: PROBLEM: {p}");
        }
    }
    Ok(code)
}

fn main() {
    let argv: Vec<String> = std::env::args().skip(1).collect();
    std::process::exit(match real_main(&argv) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("loadgen: {e}");
            1
        }
    });
}

fn real_main(argv: &[String]) -> Result<i32, String> {
    let a = Args::parse(argv)?;
    let Some(scenario) = a.subcommand.clone() else {
        print!("{HELP}");
        return Ok(1);
    };
    if matches!(scenario.as_str(), "help" | "-h") || a.has("help") {
        print!("{HELP}");
        return Ok(0);
    }
    let common = parse_common(&a)?;
    if scenario == "soak" {
        return run_soak(&a, &common);
    }
    let (plan, params) = parse_plan(&scenario, &a, &common)?;
    let procs: u32 = a.get("procs", 1)?;
    let shard = a.opt_str("shard");
    let pids: Vec<u32> = a.list("server-pid", &[])?;
    let out = a.opt_str("out");
    let quiet = a.flag("quiet");
    let max_seconds: f64 = a.get("max-seconds", 600.0)?;
    a.finish()?;
    let deadline = mono_ns() + (max_seconds.clamp(1.0, 7200.0) * 1e9) as u64;

    if let Some(sh) = shard {
        // Worker: run our share and hand the raw result to the parent.
        let (i, n) = sh.split_once('/').ok_or("--shard i/N")?;
        let (i, n): (u32, u32) = (
            i.parse().map_err(|_| "--shard")?,
            n.parse().map_err(|_| "--shard")?,
        );
        let mut ctx = Ctx {
            shard: i,
            shards: n.max(1),
            coord: Coord::Worker(std::io::BufReader::new(std::io::stdin())),
            deadline,
            quiet,
        };
        let r = run_shard(&plan, &mut ctx);
        println!(
            "RESULT {}",
            serde_json::to_string(&r).map_err(|e| e.to_string())?
        );
        return Ok(0);
    }

    let t_start = mono_ns();
    let mut sampler = Sampler::new(pids.clone());
    let results = if procs > 1 {
        // Parent: the same arguments minus our own, plus --shard for each worker.
        let mut child_args = Vec::new();
        let mut skip = false;
        for (j, x) in argv.iter().enumerate() {
            if skip {
                skip = false;
                continue;
            }
            let name = x.split('=').next().unwrap_or("");
            if matches!(name, "--procs" | "--out" | "--server-pid") {
                skip = !x.contains('=') && argv.get(j + 1).is_some_and(|n| !n.starts_with("--"));
                continue;
            }
            child_args.push(x.clone());
        }
        coord::run_parent(&child_args, procs, &mut sampler)
    } else {
        let mut ctx = Ctx {
            shard: 0,
            shards: 1,
            coord: Coord::Local(sampler),
            deadline,
            quiet,
        };
        let r = run_shard(&plan, &mut ctx);
        let Coord::Local(s) = ctx.coord else {
            unreachable!()
        };
        sampler = s;
        match r {
            ShardResult::Error(e) => Err(e),
            r => Ok(vec![r]),
        }
    };

    let mut problems = Vec::new();
    let mut doc = json!({
        "scenario": scenario,
        "label": common.label,
        "proto": format!("{:?}", common.proto).to_lowercase(),
        "target": common.target.to_string(),
        "workers": procs.max(1),
        "params": params,
        "server_pids": pids,
    });
    match results {
        Err(e) => {
            problems.push(e.clone());
            doc["error"] = json!(e);
        }
        Ok(results) => {
            let body = match &plan {
                Plan::Traffic(cfg, slo) => {
                    let v: Vec<_> = results
                        .into_iter()
                        .filter_map(|r| match r {
                            ShardResult::Traffic(t) => Some(t),
                            _ => None,
                        })
                        .collect();
                    let mut body = summarize_traffic(&v, &sampler, *slo, &mut problems);
                    let done = v.first().map_or(0, |t| t.steps.len());
                    if done > 0 && done < cfg.rates.len() {
                        body["stopped_early"] = json!(format!(
                            "the step at {} msg/s overloaded the server; higher rates were not run",
                            cfg.rates[done - 1]
                        ));
                    }
                    body
                }
                Plan::Idle(..) => {
                    let v: Vec<_> = results
                        .into_iter()
                        .filter_map(|r| match r {
                            ShardResult::Idle(t) => Some(t),
                            _ => None,
                        })
                        .collect();
                    summarize_idle(&v, &sampler, &mut problems)
                }
                Plan::Storm(..) => {
                    let v: Vec<_> = results
                        .into_iter()
                        .filter_map(|r| match r {
                            ShardResult::Storm(t) => Some(t),
                            _ => None,
                        })
                        .collect();
                    summarize_storm(&v, &sampler, &mut problems)
                }
            };
            if let (Value::Object(d), Value::Object(b)) = (&mut doc, body) {
                d.extend(b);
            }
        }
    }
    if sampler.has_pids() {
        doc["server_samples"] = json!(sampler.samples);
    }
    doc["wall_s"] = json!(clock::secs(mono_ns() - t_start));
    doc["ok"] = json!(problems.is_empty());
    doc["problems"] = json!(problems);
    let text = serde_json::to_string_pretty(&doc).map_err(|e| e.to_string())?;
    match out {
        Some(path) => std::fs::write(&path, text + "\n").map_err(|e| format!("{path}: {e}"))?,
        None => println!("{text}"),
    }
    if !quiet {
        for st in doc["steps"].as_array().into_iter().flatten() {
            for w in st["generator"]["warnings"].as_array().into_iter().flatten() {
                eprintln!(
                    "loadgen: step {} (rate {}): GENERATOR: {}",
                    st["step"],
                    st["offered_rate"],
                    w.as_str().unwrap_or("")
                );
            }
            for w in st["noise"].as_array().into_iter().flatten() {
                eprintln!(
                    "loadgen: step {} (rate {}): NOISE: {}",
                    st["step"],
                    st["offered_rate"],
                    w.as_str().unwrap_or("")
                );
            }
        }
        for p in &problems {
            eprintln!("loadgen: PROBLEM: {p}");
        }
    }
    if doc.get("error").is_some() {
        Ok(1)
    } else if problems.is_empty() {
        Ok(0)
    } else {
        Ok(2)
    }
}
