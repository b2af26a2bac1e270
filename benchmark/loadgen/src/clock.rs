//! Clocks: the shared monotonic clock (one epoch for every process on the machine, so a
//! timestamp written by one worker is comparable in another) and this process's CPU time.

pub const NS: u64 = 1_000_000_000;

fn clock(id: libc::clockid_t) -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid out-pointer; both clock ids exist on every Linux.
    unsafe { libc::clock_gettime(id, &mut ts) };
    ts.tv_sec as u64 * NS + ts.tv_nsec as u64
}

/// CLOCK_MONOTONIC in nanoseconds: the epoch of every payload timestamp.
pub fn mono_ns() -> u64 {
    clock(libc::CLOCK_MONOTONIC)
}

/// CPU time (user + system) this process has used, in nanoseconds.
pub fn cpu_ns() -> u64 {
    clock(libc::CLOCK_PROCESS_CPUTIME_ID)
}

pub fn secs(ns: u64) -> f64 {
    ns as f64 / NS as f64
}

/// Server-side figures read from /proc: CPU ticks (utime + stime) and memory, summed over pids.
#[derive(Clone, Copy, Debug, Default, serde::Serialize, serde::Deserialize)]
pub struct ProcSample {
    pub cpu_s: f64,
    pub rss_kb: u64,
    pub hwm_kb: u64,
    /// Time the (main threads of the) pids spent runnable but waiting for a CPU.
    pub runq_wait_s: f64,
    /// CPU seconds used by everything on the machine (all cores), from /proc/stat.
    pub machine_busy_s: f64,
    /// Machine-wide count of connections dropped because a listen queue was full
    /// (TcpExt ListenOverflows in /proc/net/netstat).
    pub listen_overflows: u64,
}

/// One thread name of the server: CPU (utime + stime) and run-queue wait, summed over the
/// threads of that name (`/proc/PID/task/TID/{stat,schedstat}`).
#[derive(Clone, Copy, Debug, Default, serde::Serialize, serde::Deserialize)]
pub struct ThreadSample {
    pub cpu_s: f64,
    pub runq_wait_s: f64,
}

/// The pids' threads by name: where a multi-threaded server (the event loop and a store
/// writer, say) spends its CPU, and which thread waited for a core.
pub fn sample_threads(pids: &[u32]) -> std::collections::BTreeMap<String, ThreadSample> {
    let tck = clk_tck();
    let mut out = std::collections::BTreeMap::new();
    for pid in pids {
        let Ok(dir) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
            continue;
        };
        for task in dir.flatten() {
            let Ok(stat) = std::fs::read_to_string(task.path().join("stat")) else {
                continue;
            };
            let (Some(open), Some(close)) = (stat.find('('), stat.rfind(')')) else {
                continue;
            };
            let name = stat[open + 1..close].to_string();
            let f: Vec<&str> = stat[close + 2..].split_whitespace().collect();
            if f.len() <= 13 {
                continue;
            }
            let ut: f64 = f[11].parse().unwrap_or(0.0);
            let st: f64 = f[12].parse().unwrap_or(0.0);
            let wait = std::fs::read_to_string(task.path().join("schedstat"))
                .ok()
                .and_then(|s| s.split_whitespace().nth(1).and_then(|v| v.parse().ok()))
                .unwrap_or(0u64);
            let e: &mut ThreadSample = out.entry(name).or_default();
            e.cpu_s += (ut + st) / tck;
            e.runq_wait_s += wait as f64 / 1e9;
        }
    }
    out
}

pub fn listen_overflows() -> u64 {
    let Ok(text) = std::fs::read_to_string("/proc/net/netstat") else {
        return 0;
    };
    let mut lines = text.lines();
    while let (Some(names), Some(values)) = (lines.next(), lines.next()) {
        if !names.starts_with("TcpExt:") {
            continue;
        }
        let names = names.split_whitespace();
        let values = values.split_whitespace();
        for (n, v) in names.zip(values) {
            if n == "ListenOverflows" {
                return v.parse().unwrap_or(0);
            }
        }
    }
    0
}

/// (voluntary, involuntary) context switches of this process so far: sleeps that ended in a
/// wake-up, and times another task took the CPU away while this one could still run.
pub fn ctx_switches() -> (u64, u64) {
    // SAFETY: getrusage fills the struct we pass.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut ru) };
    (ru.ru_nvcsw as u64, ru.ru_nivcsw as u64)
}

/// Seconds this process (its main thread: the generator is single-threaded) has spent
/// runnable but waiting for a CPU: time stolen by other processes on its core.
pub fn self_runq_wait_ns() -> u64 {
    schedstat_wait_ns("self")
}

fn schedstat_wait_ns(pid: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/schedstat"))
        .ok()
        .and_then(|s| s.split_whitespace().nth(1).and_then(|v| v.parse().ok()))
        .unwrap_or(0)
}

/// CPU seconds (all cores) the whole machine has been busy: user+nice+system+irq+softirq+steal.
pub fn machine_busy_s() -> f64 {
    let Ok(stat) = std::fs::read_to_string("/proc/stat") else {
        return 0.0;
    };
    let Some(line) = stat.lines().next() else {
        return 0.0;
    };
    let f: Vec<f64> = line
        .split_whitespace()
        .skip(1)
        .filter_map(|v| v.parse().ok())
        .collect();
    if f.len() < 8 {
        return 0.0;
    }
    // user nice system idle iowait irq softirq steal
    (f[0] + f[1] + f[2] + f[5] + f[6] + f[7]) / clk_tck()
}

pub fn clk_tck() -> f64 {
    // SAFETY: sysconf has no memory-safety preconditions.
    let t = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if t > 0 { t as f64 } else { 100.0 }
}

/// Reads `/proc/PID/stat` (utime, stime) and `/proc/PID/status` (VmRSS, VmHWM) for each pid.
/// Pids that vanished count as zero.
pub fn sample_procs(pids: &[u32]) -> ProcSample {
    let tck = clk_tck();
    let mut s = ProcSample {
        machine_busy_s: machine_busy_s(),
        listen_overflows: listen_overflows(),
        ..ProcSample::default()
    };
    for pid in pids {
        s.runq_wait_s += schedstat_wait_ns(&pid.to_string()) as f64 / 1e9;
        if let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) {
            // The command name may hold spaces: fields are counted after the last ')'.
            if let Some(rest) = stat.rfind(')').map(|i| &stat[i + 2..]) {
                let f: Vec<&str> = rest.split_whitespace().collect();
                // rest starts at field 3 (state); utime is field 14, stime 15.
                if f.len() > 13 {
                    let ut: f64 = f[11].parse().unwrap_or(0.0);
                    let st: f64 = f[12].parse().unwrap_or(0.0);
                    s.cpu_s += (ut + st) / tck;
                }
            }
        }
        if let Ok(status) = std::fs::read_to_string(format!("/proc/{pid}/status")) {
            for line in status.lines() {
                let kb = |l: &str| {
                    l.split_whitespace()
                        .nth(1)
                        .and_then(|v| v.parse::<u64>().ok())
                };
                if line.starts_with("VmRSS:") {
                    s.rss_kb += kb(line).unwrap_or(0);
                } else if line.starts_with("VmHWM:") {
                    s.hwm_kb += kb(line).unwrap_or(0);
                }
            }
        }
    }
    s
}
