//! Coordination between worker processes, and the server samples taken at each barrier.
//!
//! A scenario calls `ctx.barrier("label")` at every phase boundary. Alone, the process
//! samples the server's /proc figures itself and goes on. As a worker (`--shard i/N`) it
//! prints `BARRIER label` on stdout and waits for the parent's `GO <t0_ns>` on stdin; the
//! parent waits for every worker, samples the server once, and releases them all with the
//! same start time, so schedules in different processes line up on the shared clock.

use std::io::{BufRead, BufReader, Write};
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};

use std::collections::BTreeMap;

use crate::clock::{ProcSample, ThreadSample, mono_ns, sample_procs, sample_threads};

use crate::redisinfo::{RedisProbe, RedisSample};
use crate::report::ShardResult;

#[derive(Clone, Debug, serde::Serialize)]
pub struct Sample {
    pub label: String,
    pub t_s: f64,
    #[serde(flatten)]
    pub proc: ProcSample,
    /// The server's threads by name (empty without --server-pid).
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub threads: BTreeMap<String, ThreadSample>,
    /// The cluster's Redis (with `--redis-pid` / `--redis`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub redis: Option<RedisSample>,
}

pub struct Sampler {
    pids: Vec<u32>,
    pub redis: RedisProbe,
    t0: u64,
    pub samples: Vec<Sample>,
}

impl Sampler {
    pub fn new(pids: Vec<u32>) -> Sampler {
        Sampler {
            pids,
            redis: RedisProbe::default(),
            t0: mono_ns(),
            samples: Vec::new(),
        }
    }

    pub fn take(&mut self, label: &str) {
        let proc = sample_procs(&self.pids);
        let threads = sample_threads(&self.pids);
        let redis = self.redis.sample();
        let t_s = (mono_ns() - self.t0) as f64 / 1e9;
        self.samples.push(Sample {
            label: label.to_string(),
            t_s,
            proc,
            threads,
            redis,
        });
    }

    pub fn get(&self, label: &str) -> Option<&Sample> {
        self.samples.iter().rev().find(|s| s.label == label)
    }

    pub fn has_pids(&self) -> bool {
        !self.pids.is_empty()
    }
}

pub enum Coord {
    Local(Sampler),
    Worker(BufReader<std::io::Stdin>),
}

/// What every scenario gets: which share of the connections it owns, the barrier, the budget.
pub struct Ctx {
    pub shard: u32,
    pub shards: u32,
    pub coord: Coord,
    /// Absolute mono-ns deadline of the whole run (`--max-seconds`).
    pub deadline: u64,
    pub quiet: bool,
}

impl Ctx {
    pub fn owns(&self, idx: u32) -> bool {
        idx % self.shards == self.shard
    }

    /// Synchronises with the other workers; returns the common start time (mono ns).
    pub fn barrier(&mut self, label: &str) -> Result<u64, String> {
        match &mut self.coord {
            Coord::Local(s) => {
                s.take(label);
                Ok(mono_ns())
            }
            Coord::Worker(input) => {
                let mut out = std::io::stdout().lock();
                writeln!(out, "BARRIER {label}").map_err(|e| e.to_string())?;
                out.flush().map_err(|e| e.to_string())?;
                let mut line = String::new();
                input.read_line(&mut line).map_err(|e| e.to_string())?;
                match line.trim().strip_prefix("GO ") {
                    Some(t) => t.parse().map_err(|_| format!("bad GO line '{line}'")),
                    None => Err(format!("aborted by parent at barrier {label}")),
                }
            }
        }
    }

    pub fn over_budget(&self) -> bool {
        mono_ns() > self.deadline
    }

    pub fn tag(&self) -> String {
        if self.shards > 1 {
            format!("[w{}] ", self.shard)
        } else {
            String::new()
        }
    }
}

struct Worker {
    child: Child,
    stdin: ChildStdin,
    stdout: BufReader<ChildStdout>,
}

/// Runs `shards` copies of this program with `--shard i/N` and drives their barriers.
pub fn run_parent(
    argv: &[String],
    shards: u32,
    sampler: &mut Sampler,
) -> Result<Vec<ShardResult>, String> {
    let exe = std::env::current_exe().map_err(|e| e.to_string())?;
    let mut workers = Vec::new();
    for i in 0..shards {
        let mut child = Command::new(&exe)
            .args(argv)
            .arg("--shard")
            .arg(format!("{i}/{shards}"))
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .map_err(|e| format!("spawn worker: {e}"))?;
        let stdin = child.stdin.take().expect("piped");
        let stdout = BufReader::new(child.stdout.take().expect("piped"));
        workers.push(Worker {
            child,
            stdin,
            stdout,
        });
    }
    let result = drive(&mut workers, sampler);
    for w in &mut workers {
        if result.is_err() {
            let _ = writeln!(w.stdin, "ABORT");
        }
    }
    for w in &mut workers {
        if result.is_err() {
            let _ = w.child.kill();
        }
        let _ = w.child.wait();
    }
    result
}

fn drive(workers: &mut [Worker], sampler: &mut Sampler) -> Result<Vec<ShardResult>, String> {
    loop {
        let mut lines = Vec::new();
        for (i, w) in workers.iter_mut().enumerate() {
            let mut line = String::new();
            let n = w.stdout.read_line(&mut line).map_err(|e| e.to_string())?;
            if n == 0 {
                return Err(format!("worker {i} exited early"));
            }
            lines.push(line.trim_end().to_string());
        }
        if let Some(label) = lines[0].strip_prefix("BARRIER ")
            && lines
                .iter()
                .all(|l| l.strip_prefix("BARRIER ") == Some(label))
        {
            sampler.take(label);
            let t0 = mono_ns() + 20_000_000;
            for w in workers.iter_mut() {
                writeln!(w.stdin, "GO {t0}").map_err(|e| e.to_string())?;
                w.stdin.flush().map_err(|e| e.to_string())?;
            }
            continue;
        }
        let mut results = Vec::new();
        for (i, l) in lines.iter().enumerate() {
            match l.strip_prefix("RESULT ") {
                Some(json) => {
                    let r: ShardResult = serde_json::from_str(json).map_err(|e| e.to_string())?;
                    if let ShardResult::Error(e) = &r {
                        return Err(format!("worker {i}: {e}"));
                    }
                    results.push(r);
                }
                None => return Err(format!("workers out of step: {lines:?}")),
            }
        }
        return Ok(results);
    }
}
