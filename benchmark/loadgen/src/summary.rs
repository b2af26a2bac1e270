//! Merging the workers' raw results into the JSON report: one function per scenario, and
//! for a traffic step the named parts (totals, generator health, server and machine
//! figures, problems).

use std::collections::BTreeMap;

use hdrhistogram::Histogram;
use serde_json::{Value, json};

use crate::clock;
use crate::coord::Sampler;
use crate::report::{self, IdleShard, SetupShard, StepShard, StormShard, TrafficShard};

/// The latency figures of every report: p50, p90, p95, p99, p99.9, max, mean (ms), count.
pub fn lat_json(h: &Histogram<u64>) -> Value {
    json!({
        "p50": report::ms(h, 0.5), "p90": report::ms(h, 0.9), "p95": report::ms(h, 0.95),
        "p99": report::ms(h, 0.99), "p999": report::ms(h, 0.999), "max": report::ms(h, 1.0),
        "mean": (h.mean() / 1000.0 * 1000.0).round() / 1000.0, "count": h.len(),
    })
}

/// Server and machine figures between two barrier samples.
struct Delta {
    /// Server CPU (utime + stime), seconds.
    cpu_s: f64,
    /// Server RSS at the second sample.
    rss_kb: u64,
    /// Server run-queue wait, seconds.
    runq_wait_s: f64,
    /// CPU-seconds the whole machine was busy.
    busy_s: f64,
    wall_s: f64,
}

/// Per thread name: CPU and run-queue wait between two samples.
fn thread_deltas(s: &Sampler, a: &str, b: &str) -> Value {
    let (Some(x), Some(y)) = (s.get(a), s.get(b)) else {
        return json!({});
    };
    let mut out = serde_json::Map::new();
    for (name, t1) in &y.threads {
        let t0 = x.threads.get(name).copied().unwrap_or_default();
        out.insert(
            name.clone(),
            json!({"cpu_s": r3(t1.cpu_s - t0.cpu_s), "runq_wait_s": r3(t1.runq_wait_s - t0.runq_wait_s)}),
        );
    }
    Value::Object(out)
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

/// Per second, or 0 when no time passed.
fn per_sec(n: u64, secs: f64) -> f64 {
    if secs > 0.0 {
        (n as f64 / secs).round()
    } else {
        0.0
    }
}

fn merge_setup(shards: &[TrafficShard]) -> SetupShard {
    let mut setup = SetupShard::default();
    for s in shards {
        setup.conns += s.setup.conns;
        setup.ready += s.setup.ready;
        setup.failed += s.setup.failed;
        setup.setup_s = setup.setup_s.max(s.setup.setup_s);
        report::add_map(&mut setup.fail_kinds, &s.setup.fail_kinds);
    }
    setup
}

pub fn traffic(
    shards: &[TrafficShard],
    sampler: &Sampler,
    slo: f64,
    problems: &mut Vec<String>,
) -> Value {
    let setup = merge_setup(shards);
    let mut steps = Vec::new();
    let mut best: Option<Value> = None;
    let n_steps = shards.first().map_or(0, |s| s.steps.len());
    for i in 0..n_steps {
        let parts: Vec<&StepShard> = shards.iter().map(|s| &s.steps[i]).collect();
        let step = traffic_step(&parts, sampler, slo, problems);
        if step["slo_met"] == json!(true) {
            let better = best
                .as_ref()
                .is_none_or(|b| b["offered_rate"].as_f64() < step["offered_rate"].as_f64());
            if better {
                best = Some(json!({
                    "offered_rate": step["offered_rate"],
                    "deliveries_per_sec": step["deliveries_per_sec"],
                    "p99_ms": step["latency_ms"]["p99"],
                    "generator_bottleneck": step["generator"]["bottleneck"],
                }));
            }
        }
        steps.push(step);
    }
    json!({
        "setup": {"conns": setup.conns, "ready": setup.ready, "failed": setup.failed,
                  "fail_kinds": setup.fail_kinds, "setup_s": setup.setup_s,
                  // Connect, upgrade and join, with --concurrency handshakes in flight.
                  "connects_per_sec": per_sec(setup.ready, setup.setup_s)},
        "steps": steps,
        "best_rate_under_slo": best,
    })
}

/// One step's parts summed over the workers.
struct StepTotals<'a> {
    parts: &'a [&'a StepShard],
    lat: Histogram<u64>,
    lag: Histogram<u64>,
    errors: BTreeMap<String, u64>,
    close_codes: BTreeMap<String, u64>,
    expected: u64,
    received: u64,
    late: u64,
    sent: u64,
    gaps: u64,
    dups: u64,
    unexpected: u64,
    lost: u64,
    /// The longest send window of a worker.
    window: f64,
    /// Seconds from the start to the last delivery (at least the send window).
    last: f64,
    gen_cpu: f64,
    /// Generator CPU while sending, as a share of a core.
    cpu_frac: f64,
    gen_wait: f64,
    step_wall: f64,
    wakeups: u64,
    preempted: u64,
    max_loop: f64,
    reads: u64,
    frames: u64,
}

impl<'a> StepTotals<'a> {
    fn of(parts: &'a [&'a StepShard]) -> StepTotals<'a> {
        let sum = |f: &dyn Fn(&StepShard) -> u64| parts.iter().map(|p| f(p)).sum::<u64>();
        let maxf = |f: &dyn Fn(&StepShard) -> f64| parts.iter().map(|p| f(p)).fold(0.0, f64::max);
        let mut lat = report::new_hist();
        let mut lag = report::new_hist();
        let mut errors = BTreeMap::new();
        let mut close_codes = BTreeMap::new();
        for p in parts {
            p.latency_us.add_to(&mut lat);
            p.send_lag_us.add_to(&mut lag);
            report::add_map(&mut errors, &p.errors);
            report::add_map(&mut close_codes, &p.close_codes);
        }
        let expected = sum(&|p| p.expected);
        let received = sum(&|p| p.received);
        let window = maxf(&|p| p.send_window_s).max(1e-9);
        let cpu_send: f64 = parts.iter().map(|p| p.gen_cpu_send_s).sum();
        StepTotals {
            parts,
            lat,
            lag,
            errors,
            close_codes,
            expected,
            received,
            late: sum(&|p| p.late),
            sent: sum(&|p| p.sent),
            gaps: sum(&|p| p.gaps),
            dups: sum(&|p| p.duplicates),
            unexpected: sum(&|p| p.unexpected),
            lost: expected.saturating_sub(received),
            window,
            last: maxf(&|p| p.last_delivery_s).max(window),
            gen_cpu: parts.iter().map(|p| p.gen_cpu_s).sum(),
            cpu_frac: cpu_send / window,
            gen_wait: maxf(&|p| p.gen_runq_wait_s),
            step_wall: maxf(&|p| p.step_wall_s).max(1e-9),
            wakeups: sum(&|p| p.gen_wakeups),
            preempted: sum(&|p| p.gen_preemptions),
            max_loop: maxf(&|p| p.max_batch_ms),
            reads: sum(&|p| p.reads),
            frames: sum(&|p| p.frames_in),
        }
    }

    fn sum(&self, f: impl Fn(&StepShard) -> u64) -> u64 {
        self.parts.iter().map(|p| f(p)).sum()
    }

    fn clean(&self) -> bool {
        self.gaps == 0
            && self.dups == 0
            && self.lost == 0
            && self.late == 0
            && self.errors.is_empty()
            && self.unexpected == 0
    }

    /// When the generator itself may have been the limit (it sets `bottleneck`).
    fn generator_warnings(&self) -> Vec<String> {
        let mut warnings = Vec::new();
        let lag_p99 = report::ms(&self.lag, 0.99);
        if self.cpu_frac > 0.85 {
            warnings.push(format!(
                "loadgen used {:.0}% of a core while sending: one sweep over its sockets (longest {:.1} ms) adds that much to the latencies it measures",
                self.cpu_frac * 100.0,
                self.max_loop
            ));
        }
        if lag_p99 > 5.0 {
            warnings.push(format!(
                "send schedule fell behind (send lag p99 {lag_p99:.1} ms)"
            ));
        }
        if self.max_loop > 50.0 {
            warnings.push(format!(
                "loadgen loop stalled {:.0} ms on one batch",
                self.max_loop
            ));
        }
        if self.gen_wait > 0.05 * self.step_wall && self.preempted as f64 / self.step_wall > 20.0 {
            warnings.push(format!(
                "loadgen was preempted {} times and waited {:.0} ms ({:.0}% of the step) for its core: another process ran on it",
                self.preempted,
                self.gen_wait * 1e3,
                100.0 * self.gen_wait / self.step_wall
            ));
        }
        warnings
    }

    /// Runnable-but-not-running time spread over many wake-ups is the scheduler's (and,
    /// in a VM, the hypervisor's) wake-up latency, not a competing process.
    fn wakeup_noise(&self) -> Option<String> {
        (self.gen_wait > 0.05 * self.step_wall && self.preempted as f64 / self.step_wall <= 20.0)
            .then(|| {
                format!(
                    "loadgen spent {:.0} ms being woken ({:.1} µs per wake-up, {} wake-ups)",
                    self.gen_wait * 1e3,
                    self.gen_wait * 1e6 / (self.wakeups + self.preempted).max(1) as f64,
                    self.wakeups
                )
            })
    }

    fn problems(&self) -> Vec<String> {
        let (gaps, dups, unexpected) = (self.gaps, self.dups, self.unexpected);
        let mut out = Vec::new();
        if self.received == 0 {
            out.push("zero deliveries".to_string());
        }
        if gaps > 0 || dups > 0 || unexpected > 0 {
            out.push(format!(
                "{gaps} gaps, {dups} duplicates, {unexpected} unexpected"
            ));
        }
        if self.lost > 0 {
            out.push(format!(
                "{} of {} deliveries missing after the drain",
                self.lost, self.expected
            ));
        }
        if !self.errors.is_empty() {
            out.push(format!("server errors {:?}", self.errors));
        }
        out
    }

    /// The joins of the `joins` scenario, `None` in the others.
    fn joins_json(&self) -> Option<Value> {
        let sent = self.sum(|p| p.joins_sent);
        let skipped = self.sum(|p| p.joins_skipped);
        if sent + skipped == 0 {
            return None;
        }
        let mut lat = report::new_hist();
        for p in self.parts {
            p.join_latency_us.add_to(&mut lat);
        }
        let window = self.window.max(1e-9);
        Some(json!({
            "sent": sent,
            "answered": self.sum(|p| p.joins_answered),
            "errors": self.sum(|p| p.join_errors),
            "skipped": skipped,
            "joins_per_sec": per_sec(sent, window),
            "latency_ms": lat_json(&lat),
        }))
    }

    fn join_problems(&self) -> Vec<String> {
        let sent = self.sum(|p| p.joins_sent);
        let answered = self.sum(|p| p.joins_answered);
        let errors = self.sum(|p| p.join_errors);
        let skipped = self.sum(|p| p.joins_skipped);
        let mut out = Vec::new();
        if sent > answered + errors {
            out.push(format!(
                "{} of {sent} joins got no history",
                sent - answered - errors
            ));
        }
        if skipped > 0 {
            out.push(format!(
                "{skipped} joins skipped: every joiner still waited for its last history (raise --joiners)"
            ));
        }
        out
    }

    fn generator_json(&self, warnings: Vec<String>) -> Value {
        let (reads, frames) = (self.reads, self.frames);
        json!({
            "cpu_frac_of_core_while_sending": r3(self.cpu_frac),
            "cpu_s": r3(self.gen_cpu),
            "runq_wait_s": r3(self.gen_wait),
            "wakeups": self.wakeups,
            "preemptions": self.preempted,
            "send_lag_ms": {"p50": report::ms(&self.lag, 0.5), "p95": report::ms(&self.lag, 0.95),
                            "p99": report::ms(&self.lag, 0.99), "max": report::ms(&self.lag, 1.0)},
            "max_loop_ms": self.max_loop,
            "reads": reads,
            "frames_per_read": if reads > 0 { ((frames as f64 / reads as f64) * 10.0).round() / 10.0 } else { 0.0 },
            "bytes_in": self.sum(|p| p.bytes_in),
            "max_pending_bytes": self.parts.iter().map(|p| p.max_pending_bytes).max().unwrap_or(0),
            "bottleneck": !warnings.is_empty(),
            "warnings": warnings,
        })
    }
}

/// The server's CPU and memory and the machine's load during a step; notes noise.
fn server_and_machine(
    sampler: &Sampler,
    step: u32,
    t: &StepTotals,
    noise: &mut Vec<String>,
) -> (Option<Value>, Option<Value>, Option<Value>) {
    let (a, b) = (format!("step{step}-start"), format!("step{step}-end"));
    let d = delta(sampler, &a, &b);
    let threads = thread_deltas(sampler, &a, &b);
    let received = t.received;
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
            "threads": threads,
        })
    });
    let redis = redis_delta(sampler, &a, &b).map(|(cpu_s, commands, wall_s)| {
        json!({
            "cpu_s": r3(cpu_s),
            "cpu_frac_of_core": r3(cpu_s / wall_s),
            "cpu_s_per_million_deliveries": if received > 0 { r3(cpu_s / (received as f64 / 1e6)) } else { 0.0 },
            "commands": commands,
            "commands_per_message": commands.filter(|_| t.sent > 0).map(|c| r3(c as f64 / t.sent as f64)),
        })
    });
    let redis_cpu = redis
        .as_ref()
        .and_then(|r| r["cpu_s"].as_f64())
        .unwrap_or(0.0);
    let machine = d.as_ref().map(|d| {
        let server_cpu = if sampler.has_pids() { d.cpu_s } else { 0.0 };
        let other = (d.busy_s - server_cpu - redis_cpu - t.gen_cpu).max(0.0) / d.wall_s;
        if other > 0.25 {
            noise.push(format!(
                "other processes used {other:.2} cores during the step"
            ));
        }
        json!({"busy_cores": r3(d.busy_s / d.wall_s), "other_cores": r3(other)})
    });
    (server, machine, redis)
}

/// Redis CPU seconds, commands and wall seconds between two barriers (with `--redis-pid` /
/// `--redis`).
fn redis_delta(s: &Sampler, a: &str, b: &str) -> Option<(f64, Option<u64>, f64)> {
    let (x, y) = (s.get(a)?, s.get(b)?);
    let (rx, ry) = (x.redis?, y.redis?);
    let commands = match (rx.commands, ry.commands) {
        // Less the sampler's own INFO at the start.
        (Some(p), Some(q)) => Some(q.saturating_sub(p).saturating_sub(1)),
        _ => None,
    };
    Some((ry.cpu_s - rx.cpu_s, commands, (y.t_s - x.t_s).max(1e-9)))
}

fn traffic_step(
    parts: &[&StepShard],
    sampler: &Sampler,
    slo: f64,
    problems: &mut Vec<String>,
) -> Value {
    let first = parts[0];
    let t = StepTotals::of(parts);
    let warnings = t.generator_warnings();
    let mut noise: Vec<String> = t.wakeup_noise().into_iter().collect();
    let (server, machine, redis) = server_and_machine(sampler, first.step, &t, &mut noise);
    let joins = t.joins_json();
    for p in t.problems().into_iter().chain(t.join_problems()) {
        problems.push(format!("step {} (rate {}): {p}", first.step, first.rate));
    }
    let p99 = report::ms(&t.lat, 0.99);
    let mut step = json!({
        "step": first.step,
        "offered_rate": first.rate,
        "duration_s": first.duration_s,
        "messages": first.messages_total,
        "sent": t.sent,
        "send_rate": (t.sent as f64 / t.window).round(),
        "offered_deliveries_per_sec": (t.expected as f64 / first.duration_s).round(),
        "expected_deliveries": t.expected,
        "deliveries": t.received,
        "deliveries_per_sec": (t.received as f64 / t.last).round(),
        "latency_ms": lat_json(&t.lat),
        "late": t.late,
        "lost": t.lost,
        "gaps": t.gaps,
        "duplicates": t.dups,
        "stale": t.sum(|p| p.stale),
        "unexpected": t.unexpected,
        "errors": t.errors,
        "closed": t.sum(|p| p.closed),
        "close_codes": t.close_codes,
        "drained": parts.iter().all(|p| p.drained),
        "server": server,
        "redis": redis,
        "machine": machine,
        "noise": noise,
        "generator": t.generator_json(warnings),
        "slo_met": t.clean() && t.received > 0 && p99 < slo,
    });
    if let Some(j) = joins {
        step["joins"] = j;
    }
    step
}

pub fn idle(shards: &[IdleShard], sampler: &Sampler, problems: &mut Vec<String>) -> Value {
    let base = sampler.get("level-0").map(|s| s.proc.rss_kb);
    let mut levels = Vec::new();
    let n = shards.first().map_or(0, |s| s.levels.len());
    let mut from = 0;
    for i in 0..n {
        let level = shards[0].levels[i].level;
        let open: u64 = shards.iter().map(|s| s.levels[i].open).sum();
        let failed: u64 = shards.iter().map(|s| s.levels[i].failed).sum();
        let open_s = shards
            .iter()
            .map(|s| s.levels[i].open_s)
            .fold(0.0, f64::max);
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
            "open_s": r3(open_s),
            "connects_per_sec": per_sec(level.saturating_sub(from), open_s),
        }));
        from = level;
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
    let at_hold_end = |f: fn(&clock::ProcSample) -> u64| {
        sampler
            .has_pids()
            .then(|| sampler.get("hold-end").map(|s| f(&s.proc)))
            .flatten()
    };
    json!({
        "baseline_rss_kb": if sampler.has_pids() { base } else { None },
        "levels": levels,
        "hold": {
            "seconds": shards.iter().map(|s| s.hold_s).fold(0.0, f64::max),
            "closed_during_hold": closed,
            "open_after_hold": shards.iter().map(|s| s.open_after_hold).sum::<u64>(),
            "server_rss_kb_after": at_hold_end(|p| p.rss_kb),
            "server_hwm_kb": at_hold_end(|p| p.hwm_kb),
        },
        "fail_kinds": kinds,
    })
}

pub fn storm(shards: &[StormShard], sampler: &Sampler, problems: &mut Vec<String>) -> Value {
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
