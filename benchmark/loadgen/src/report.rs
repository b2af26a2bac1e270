//! Per-worker raw results (what a worker process sends its parent) and the helpers that merge
//! them: histograms travel as (value, count) pairs and are summed exactly.

use std::collections::BTreeMap;

use hdrhistogram::Histogram;
use serde::{Deserialize, Serialize};

/// Microsecond histogram, 1 µs .. 1 h, 3 significant digits.
pub fn new_hist() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 3_600_000_000, 3).expect("valid bounds")
}

pub fn record(h: &mut Histogram<u64>, us: u64) {
    let _ = h.record(us.clamp(1, 3_600_000_000));
}

#[derive(Serialize, Deserialize, Default, Clone, Debug)]
pub struct Hist(pub Vec<(u64, u64)>);

impl Hist {
    pub fn of(h: &Histogram<u64>) -> Hist {
        Hist(
            h.iter_recorded()
                .map(|v| (v.value_iterated_to(), v.count_at_value()))
                .collect(),
        )
    }

    pub fn add_to(&self, h: &mut Histogram<u64>) {
        for &(v, c) in &self.0 {
            let _ = h.record_n(v.clamp(1, 3_600_000_000), c);
        }
    }
}

pub fn ms(h: &Histogram<u64>, q: f64) -> f64 {
    if h.is_empty() {
        return 0.0;
    }
    let v = if q >= 1.0 {
        h.max()
    } else {
        h.value_at_quantile(q)
    };
    (v as f64 / 1000.0 * 1000.0).round() / 1000.0
}

pub fn add_map(into: &mut BTreeMap<String, u64>, from: &BTreeMap<String, u64>) {
    for (k, v) in from {
        *into.entry(k.clone()).or_default() += v;
    }
}

#[derive(Serialize, Deserialize, Default, Clone, Debug)]
pub struct SetupShard {
    pub conns: u64,
    pub ready: u64,
    pub failed: u64,
    pub fail_kinds: BTreeMap<String, u64>,
    pub setup_s: f64,
}

#[derive(Serialize, Deserialize, Default, Clone, Debug)]
pub struct StepShard {
    pub step: u32,
    pub rate: f64,
    pub duration_s: f64,
    /// Messages in the whole schedule (all workers).
    pub messages_total: u64,
    /// Messages this worker sent.
    pub sent: u64,
    /// Deliveries this worker's receivers should get (deterministic from the schedule).
    pub expected: u64,
    pub received: u64,
    /// Deliveries that arrived after the drain deadline (counted in `received` too).
    pub late: u64,
    pub duplicates: u64,
    pub gaps: u64,
    pub stale: u64,
    pub unexpected: u64,
    pub errors: BTreeMap<String, u64>,
    pub closed: u64,
    pub close_codes: BTreeMap<String, u64>,
    pub latency_us: Hist,
    pub send_lag_us: Hist,
    pub gen_cpu_s: f64,
    pub gen_cpu_send_s: f64,
    /// Time the generator was runnable but off its CPU during the step.
    pub gen_runq_wait_s: f64,
    /// Context switches during the step: voluntary (waits for input) and involuntary
    /// (preempted by another task on the generator's core).
    pub gen_wakeups: u64,
    pub gen_preemptions: u64,
    pub send_window_s: f64,
    pub step_wall_s: f64,
    pub last_delivery_s: f64,
    pub max_batch_ms: f64,
    pub max_pending_bytes: u64,
    pub frames_in: u64,
    pub reads: u64,
    pub bytes_in: u64,
    pub drained: bool,
    /// The `joins` scenario: joins sent, answered with their history, refused with an
    /// error, skipped (every joiner still waiting), and `join` to `history` latency.
    pub joins_sent: u64,
    pub joins_answered: u64,
    pub join_errors: u64,
    pub joins_skipped: u64,
    pub join_latency_us: Hist,
}

#[derive(Serialize, Deserialize, Default, Clone, Debug)]
pub struct TrafficShard {
    pub setup: SetupShard,
    pub steps: Vec<StepShard>,
}

#[derive(Serialize, Deserialize, Default, Clone, Debug)]
pub struct IdleLevelShard {
    pub level: u64,
    pub open: u64,
    pub failed: u64,
    /// Seconds to open this level's new connections (upgrade and welcome included).
    pub open_s: f64,
}

#[derive(Serialize, Deserialize, Default, Clone, Debug)]
pub struct IdleShard {
    pub levels: Vec<IdleLevelShard>,
    pub fail_kinds: BTreeMap<String, u64>,
    pub closed_during_hold: u64,
    pub open_after_hold: u64,
    pub hold_s: f64,
}

#[derive(Serialize, Deserialize, Default, Clone, Debug)]
pub struct StormShard {
    pub attempted: u64,
    pub completed: u64,
    pub failed: u64,
    pub fail_kinds: BTreeMap<String, u64>,
    pub handshake_us: Hist,
    pub welcome_us: Hist,
    pub t_first_ns: u64,
    pub t_last_ns: u64,
    pub gen_cpu_s: f64,
}

#[derive(Serialize, Deserialize, Clone, Debug)]
pub enum ShardResult {
    Traffic(TrafficShard),
    Idle(IdleShard),
    Storm(StormShard),
    Error(String),
}
