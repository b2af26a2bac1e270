//! `--workers N`: the supervisor that runs N copies of the binary as workers on one port.
//!
//! With `--workers` above 1 the process does not serve. It starts N copies of its own
//! executable with the same arguments and environment, plus `--workers 1 --reuse-port true`
//! (later flags win, so these override whatever the command line, the environment or the
//! settings file said), and then:
//!
//! - restarts a worker that exits while it should run, after a back-off of 100 ms doubling up
//!   to 5 s, back to 100 ms once a worker has lived 30 s; a worker that exits with code 2 (its
//!   settings were refused, which a restart cannot change) stops the whole supervisor, exit 2;
//! - forwards SIGTERM and SIGINT to every worker, waits for them and exits 0 when all ended
//!   well (exit code 0, or killed by that very signal), 1 otherwise; workers still running
//!   `--shutdown-grace` + 10 s after the signal get SIGKILL;
//! - forwards SIGHUP (the workers reload their TLS certificate and JWT key);
//! - on Linux, asks the kernel to send each worker SIGTERM if the supervisor itself dies
//!   (`PR_SET_PDEATHSIG`), so a `kill -9` of the supervisor leaves no orphans serving.
//!
//! Every decision is in [`Plan`], which has no processes, signals or clock of its own
//! (sans-IO, as the chat core); [`run`] is the thin part that spawns, waits and signals.

use std::ffi::OsString;
use std::fmt;
use std::io::{self, Read};
use std::os::unix::net::UnixStream;
use std::os::unix::process::ExitStatusExt;
use std::process::{Child, Command, ExitCode, ExitStatus};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use log::{error, info, warn};

use crate::config::Config;

/// The first restart delay of a worker that died.
pub const FIRST_BACKOFF: Duration = Duration::from_millis(100);
/// The longest restart delay: the back-off doubles up to this.
pub const MAX_BACKOFF: Duration = Duration::from_secs(5);
/// A worker that lived this long before it died starts again from [`FIRST_BACKOFF`].
pub const STABLE_AFTER: Duration = Duration::from_secs(30);
/// How long after `--shutdown-grace` the workers may take to exit before they get SIGKILL
/// (a worker's own shutdown ends within grace + 5 s).
pub const KILL_SLACK: Duration = Duration::from_secs(10);
/// The flags appended to every worker's command line: one process, sharing the port.
pub const WORKER_FLAGS: [&str; 4] = ["--workers", "1", "--reuse-port", "true"];
/// The exit code of a process whose settings were refused (as `main` returns it).
pub const SETTINGS_REFUSED: i32 = 2;

/// How a worker ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Exit {
    /// It exited with this code.
    Code(i32),
    /// A signal (its number) ended it.
    Signal(i32),
}

impl Exit {
    /// The exit of a reaped child.
    pub fn of(status: ExitStatus) -> Exit {
        match (status.code(), status.signal()) {
            (Some(code), _) => Exit::Code(code),
            (None, Some(sig)) => Exit::Signal(sig),
            // Neither: only a stopped or continued child, which `wait` does not report here.
            (None, None) => Exit::Code(-1),
        }
    }
}

impl fmt::Display for Exit {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            Exit::Code(code) => write!(f, "exit code {code}"),
            Exit::Signal(sig) => match signal_name(sig) {
                Some(name) => write!(f, "signal {sig} ({name})"),
                None => write!(f, "signal {sig}"),
            },
        }
    }
}

/// The name of the signals a worker meets most.
fn signal_name(sig: i32) -> Option<&'static str> {
    Some(match sig {
        libc::SIGHUP => "SIGHUP",
        libc::SIGINT => "SIGINT",
        libc::SIGKILL => "SIGKILL",
        libc::SIGTERM => "SIGTERM",
        libc::SIGABRT => "SIGABRT",
        libc::SIGSEGV => "SIGSEGV",
        libc::SIGBUS => "SIGBUS",
        _ => return None,
    })
}

/// What the supervisor does after a worker exited.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum After {
    /// It starts the worker again after this delay.
    Restart(Duration),
    /// Nothing: the supervisor is stopping and this worker is done.
    Stopped,
    /// It gives up: the worker refused its settings (exit code 2), which a restart cannot
    /// change. The supervisor stops the other workers and exits 2.
    GiveUp,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// To be started at this time.
    Waiting(Instant),
    Running {
        pid: u32,
        since: Instant,
    },
    /// Exited and not to be started again.
    Done,
}

#[derive(Debug)]
struct Slot {
    state: State,
    /// The delay of the next restart.
    backoff: Duration,
}

/// The supervisor's decisions, without processes or a clock: which worker to start when,
/// whether one that exited starts again, when to kill, and the exit code.
#[derive(Debug)]
pub struct Plan {
    slots: Vec<Slot>,
    /// How long the workers have to exit after the stop before they are killed.
    stop_bound: Duration,
    /// Set once stopping: the signal forwarded and the time the workers get SIGKILL.
    stopping: Option<(i32, Instant)>,
    killed: bool,
    /// Whether every worker that exited since the stop ended well.
    clean: bool,
    gave_up: bool,
}

impl Plan {
    /// `workers` workers, all to be started at `now`; `stop_bound` is how long they have to
    /// exit after a stop before [`Plan::kill_due`].
    pub fn new(workers: usize, stop_bound: Duration, now: Instant) -> Plan {
        Plan {
            slots: (0..workers)
                .map(|_| Slot {
                    state: State::Waiting(now),
                    backoff: FIRST_BACKOFF,
                })
                .collect(),
            stop_bound,
            stopping: None,
            killed: false,
            clean: true,
            gave_up: false,
        }
    }

    /// The workers (their index from 0) to start now.
    pub fn due(&self, now: Instant) -> Vec<usize> {
        if self.stopping.is_some() {
            return Vec::new();
        }
        (self.slots.iter().enumerate())
            .filter(|(_, s)| matches!(s.state, State::Waiting(at) if at <= now))
            .map(|(i, _)| i)
            .collect()
    }

    /// Worker `slot` was started as process `pid`.
    pub fn started(&mut self, slot: usize, pid: u32, now: Instant) {
        self.slots[slot].state = State::Running { pid, since: now };
    }

    /// Worker `slot` could not be started; returns the delay before the next try.
    pub fn start_failed(&mut self, slot: usize, now: Instant) -> Duration {
        let delay = self.back_off(slot, false);
        self.slots[slot].state = State::Waiting(now + delay);
        delay
    }

    /// Worker `slot` exited with `exit`: what now.
    pub fn exited(&mut self, slot: usize, exit: Exit, now: Instant) -> After {
        let State::Running { since, .. } = self.slots[slot].state else {
            return After::Stopped;
        };
        if let Some((signal, _)) = self.stopping {
            self.slots[slot].state = State::Done;
            self.clean &= exit == Exit::Code(0) || exit == Exit::Signal(signal);
            return After::Stopped;
        }
        if exit == Exit::Code(SETTINGS_REFUSED) {
            self.slots[slot].state = State::Done;
            self.gave_up = true;
            return After::GiveUp;
        }
        let stable = now.saturating_duration_since(since) >= STABLE_AFTER;
        let delay = self.back_off(slot, stable);
        self.slots[slot].state = State::Waiting(now + delay);
        After::Restart(delay)
    }

    /// The delay of `slot`'s next start, doubling the one after (from the first again when
    /// the worker was `stable`).
    fn back_off(&mut self, slot: usize, stable: bool) -> Duration {
        let s = &mut self.slots[slot];
        if stable {
            s.backoff = FIRST_BACKOFF;
        }
        let delay = s.backoff;
        s.backoff = (delay * 2).min(MAX_BACKOFF);
        delay
    }

    /// Starts the stop (`signal` is what the workers are sent): no worker starts again, and
    /// those still running at `now` + the stop bound are to be killed. A second stop keeps the
    /// first deadline.
    pub fn stop(&mut self, now: Instant, signal: i32) {
        if self.stopping.is_none() {
            self.stopping = Some((signal, now + self.stop_bound));
        }
        for s in &mut self.slots {
            if matches!(s.state, State::Waiting(_)) {
                s.state = State::Done;
            }
        }
    }

    /// Whether the stop has begun.
    pub fn is_stopping(&self) -> bool {
        self.stopping.is_some()
    }

    /// The running workers: index and pid.
    pub fn running(&self) -> Vec<(usize, u32)> {
        (self.slots.iter().enumerate())
            .filter_map(|(i, s)| match s.state {
                State::Running { pid, .. } => Some((i, pid)),
                _ => None,
            })
            .collect()
    }

    /// True once, when the workers still running are to get SIGKILL.
    pub fn kill_due(&mut self, now: Instant) -> bool {
        match self.stopping {
            Some((_, at)) if !self.killed && now >= at && !self.running().is_empty() => {
                self.killed = true;
                true
            }
            _ => false,
        }
    }

    /// When something is next due: a worker's start or the kill (`None`: only a signal or an
    /// exit can change anything).
    pub fn next_deadline(&self) -> Option<Instant> {
        match self.stopping {
            Some((_, at)) if !self.killed => Some(at),
            Some(_) => None,
            None => (self.slots.iter())
                .filter_map(|s| match s.state {
                    State::Waiting(at) => Some(at),
                    _ => None,
                })
                .min(),
        }
    }

    /// The supervisor's exit code once it is done (stopping, and no worker runs): 0 when every
    /// worker ended well, 2 when one refused its settings, 1 otherwise.
    pub fn outcome(&self) -> Option<u8> {
        if self.stopping.is_none() || !self.running().is_empty() {
            return None;
        }
        Some(match (self.gave_up, self.clean) {
            (true, _) => SETTINGS_REFUSED as u8,
            (false, true) => 0,
            (false, false) => 1,
        })
    }
}

/// What the supervisor refuses before it starts anything: port 0 (each worker would pick a
/// port of its own instead of sharing one).
pub fn check(cfg: &Config) -> Result<(), String> {
    if cfg.workers > 1 && cfg.port == 0 {
        return Err(format!(
            "--workers (WORKERS) {} needs a fixed --port (PORT): with port 0 each worker \
             would listen on a port of its own",
            cfg.workers
        ));
    }
    Ok(())
}

/// A worker's command line: the supervisor's arguments, then [`WORKER_FLAGS`] (a flag given
/// later wins in [`Config::from_args`], over the environment and the settings file too).
pub fn worker_args(args: impl IntoIterator<Item = OsString>) -> Vec<OsString> {
    let mut args: Vec<OsString> = args.into_iter().collect();
    args.extend(WORKER_FLAGS.map(OsString::from));
    args
}

/// Runs the supervisor for `cfg.workers` workers until they have all exited after a stop; the
/// exit code is [`Plan::outcome`] (1 when the supervisor itself fails).
pub fn run(cfg: &Config) -> ExitCode {
    match supervise(cfg) {
        Ok(code) => ExitCode::from(code),
        Err(e) => {
            error!("supervisor: {e}");
            ExitCode::FAILURE
        }
    }
}

fn supervise(cfg: &Config) -> io::Result<u8> {
    let exe = std::env::current_exe()
        .map_err(|e| io::Error::new(e.kind(), format!("cannot find its own executable: {e}")))?;
    let args = worker_args(std::env::args_os().skip(1));
    // Before the first worker: no exit or signal may go unseen.
    let signals = Signals::register()?;
    let stop_bound = cfg.shutdown_grace + KILL_SLACK;
    let mut plan = Plan::new(cfg.workers, stop_bound, Instant::now());
    let mut children: Vec<Option<Child>> = (0..cfg.workers).map(|_| None).collect();
    loop {
        let now = Instant::now();
        if let Some(signal) = signals.take_stop() {
            if !plan.is_stopping() {
                info!(
                    "supervisor: {}, stopping {} workers",
                    signal_name(signal).unwrap_or("signal"),
                    plan.running().len()
                );
            }
            plan.stop(now, signal);
            send(&plan, signal);
        }
        if signals.take_reload() {
            send(&plan, libc::SIGHUP);
        }
        for (slot, child) in children.iter_mut().enumerate() {
            let Some(c) = child else { continue };
            let status = match c.try_wait() {
                Ok(Some(status)) => status,
                Ok(None) => continue,
                Err(e) => {
                    error!("supervisor: cannot wait for worker {}: {e}", slot + 1);
                    continue;
                }
            };
            let (n, pid, exit) = (slot + 1, c.id(), Exit::of(status));
            *child = None;
            match plan.exited(slot, exit, now) {
                After::Restart(delay) => warn!(
                    "supervisor: worker {n} (pid {pid}) exited with {exit}; restarting in {}s",
                    delay.as_secs_f64()
                ),
                After::Stopped => info!("supervisor: worker {n} (pid {pid}) exited with {exit}"),
                After::GiveUp => {
                    error!(
                        "supervisor: worker {n} (pid {pid}) exited with {exit}: its settings \
                         were refused; stopping the other workers"
                    );
                    plan.stop(now, libc::SIGTERM);
                    send(&plan, libc::SIGTERM);
                }
            }
        }
        if plan.kill_due(now) {
            warn!(
                "supervisor: {} workers still running {}s after the stop: SIGKILL",
                plan.running().len(),
                stop_bound.as_secs_f64()
            );
            send(&plan, libc::SIGKILL);
        }
        if let Some(code) = plan.outcome() {
            info!("supervisor: all workers exited");
            return Ok(code);
        }
        for slot in plan.due(now) {
            match spawn(&exe, &args) {
                Ok(child) => {
                    info!(
                        "supervisor: started worker {} (pid {})",
                        slot + 1,
                        child.id()
                    );
                    plan.started(slot, child.id(), now);
                    children[slot] = Some(child);
                }
                Err(e) => {
                    let delay = plan.start_failed(slot, now);
                    error!(
                        "supervisor: cannot start worker {} ({}): {e}; retrying in {}s",
                        slot + 1,
                        exe.display(),
                        delay.as_secs_f64()
                    );
                }
            }
        }
        let timeout = plan
            .next_deadline()
            .map(|at| at.saturating_duration_since(Instant::now()));
        signals.wait(timeout)?;
    }
}

/// Sends `signal` to every running worker. Their pids are those of children not yet reaped,
/// so none can have been reused by another process.
fn send(plan: &Plan, signal: i32) {
    for (slot, pid) in plan.running() {
        let Ok(pid) = libc::pid_t::try_from(pid) else {
            continue;
        };
        // SAFETY: `kill` only reads its arguments.
        if unsafe { libc::kill(pid, signal) } == -1 {
            let e = io::Error::last_os_error();
            warn!(
                "supervisor: cannot signal worker {} (pid {pid}): {e}",
                slot + 1
            );
        }
    }
}

/// Starts one worker: `exe` with `args`, the supervisor's environment plus `WORKERS=1` and
/// `REUSE_PORT=true`, its stdin, stdout and stderr.
fn spawn(exe: &std::path::Path, args: &[OsString]) -> io::Result<Child> {
    let mut cmd = Command::new(exe);
    cmd.args(args).env("WORKERS", "1").env("REUSE_PORT", "true");
    #[cfg(target_os = "linux")]
    {
        use std::os::unix::process::CommandExt as _;
        let parent = libc::pid_t::try_from(std::process::id()).unwrap_or(0);
        // SAFETY: the closure runs in the child between fork and exec and makes only
        // async-signal-safe calls (prctl, getppid) without allocating.
        unsafe {
            cmd.pre_exec(move || {
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM) == -1 {
                    return Err(io::Error::last_os_error());
                }
                // The supervisor died before the line above: nobody would stop this worker.
                if libc::getppid() != parent {
                    return Err(io::Error::from_raw_os_error(libc::ESRCH));
                }
                Ok(())
            });
        }
    }
    cmd.spawn()
}

/// The supervisor's signals: SIGTERM and SIGINT (the stop), SIGHUP (forwarded), and SIGCHLD,
/// each of which also wakes [`Signals::wait`] through a socket pair.
struct Signals {
    stop: Arc<AtomicUsize>,
    reload: Arc<AtomicBool>,
    wake: UnixStream,
}

impl Signals {
    fn register() -> io::Result<Signals> {
        use signal_hook::consts::{SIGCHLD, SIGHUP, SIGINT, SIGTERM};
        let stop = Arc::new(AtomicUsize::new(0));
        let reload = Arc::new(AtomicBool::new(false));
        let (wake, write) = UnixStream::pair()?;
        for signal in [SIGTERM, SIGINT] {
            signal_hook::flag::register_usize(signal, stop.clone(), signal as usize)?;
        }
        signal_hook::flag::register(SIGHUP, reload.clone())?;
        for signal in [SIGTERM, SIGINT, SIGHUP, SIGCHLD] {
            signal_hook::low_level::pipe::register(signal, write.try_clone()?)?;
        }
        Ok(Signals { stop, reload, wake })
    }

    /// The stop signal received since the last call, if any.
    fn take_stop(&self) -> Option<i32> {
        match self.stop.swap(0, Ordering::SeqCst) {
            0 => None,
            s => i32::try_from(s).ok(),
        }
    }

    /// Whether SIGHUP came since the last call.
    fn take_reload(&self) -> bool {
        self.reload.swap(false, Ordering::SeqCst)
    }

    /// Sleeps until a signal arrives or `timeout` passes (`None`: until a signal).
    fn wait(&self, timeout: Option<Duration>) -> io::Result<()> {
        let mut wake = &self.wake;
        wake.set_read_timeout(timeout.map(|t| t.max(Duration::from_millis(1))))?;
        let mut buf = [0u8; 64];
        match wake.read(&mut buf) {
            Ok(_) => Ok(()),
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock
                        | io::ErrorKind::TimedOut
                        | io::ErrorKind::Interrupted
                ) =>
            {
                Ok(())
            }
            Err(e) => Err(e),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Cli;

    const BOUND: Duration = Duration::from_secs(12);

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    /// A plan with its workers started as pids 100, 101, …
    fn running(workers: usize, t0: Instant) -> Plan {
        let mut plan = Plan::new(workers, BOUND, t0);
        for slot in plan.due(t0) {
            plan.started(slot, 100 + slot as u32, t0);
        }
        plan
    }

    #[test]
    fn every_worker_starts_at_once_and_then_nothing_is_due() {
        let t0 = Instant::now();
        let mut plan = Plan::new(3, BOUND, t0);
        assert_eq!(plan.due(t0), [0, 1, 2]);
        assert_eq!(plan.next_deadline(), Some(t0));
        for slot in 0..3 {
            plan.started(slot, 100 + slot as u32, t0);
        }
        assert!(plan.due(t0 + Duration::from_secs(3600)).is_empty());
        assert_eq!(
            plan.next_deadline(),
            None,
            "only an exit or a signal wakes it"
        );
        assert_eq!(plan.running(), [(0, 100), (1, 101), (2, 102)]);
        assert_eq!(plan.outcome(), None);
    }

    #[test]
    fn a_worker_that_keeps_dying_backs_off_doubling_up_to_five_seconds() {
        let t0 = Instant::now();
        let mut plan = running(2, t0);
        let mut now = t0;
        let mut delays = Vec::new();
        for pid in 200..209 {
            now += ms(10);
            let After::Restart(delay) = plan.exited(0, Exit::Signal(libc::SIGKILL), now) else {
                panic!("a worker that died is restarted");
            };
            delays.push(delay.as_millis());
            assert!(
                plan.due(now + delay - ms(1)).is_empty(),
                "not before its delay"
            );
            assert_eq!(plan.next_deadline(), Some(now + delay));
            now += delay;
            assert_eq!(plan.due(now), [0]);
            plan.started(0, pid, now);
        }
        assert_eq!(delays, [100, 200, 400, 800, 1600, 3200, 5000, 5000, 5000]);
        assert_eq!(
            plan.running(),
            [(0, 208), (1, 101)],
            "the other never stopped"
        );
    }

    #[test]
    fn the_back_off_starts_over_after_a_worker_lived_thirty_seconds() {
        let t0 = Instant::now();
        let mut plan = running(1, t0);
        let mut now = t0;
        for _ in 0..4 {
            let After::Restart(d) = plan.exited(0, Exit::Code(1), now) else {
                panic!()
            };
            now += d;
            plan.started(0, 7, now);
        }
        // Lived just under 30 s: the back-off goes on (1.6 s).
        now += STABLE_AFTER - ms(1);
        assert_eq!(plan.exited(0, Exit::Code(1), now), After::Restart(ms(1600)));
        now += ms(1600);
        plan.started(0, 8, now);
        now += STABLE_AFTER;
        assert_eq!(plan.exited(0, Exit::Code(1), now), After::Restart(ms(100)));
        now += ms(100);
        plan.started(0, 9, now);
        assert_eq!(plan.exited(0, Exit::Code(0), now), After::Restart(ms(200)));
    }

    #[test]
    fn a_worker_that_cannot_be_started_is_tried_again_with_the_same_back_off() {
        let t0 = Instant::now();
        let mut plan = Plan::new(1, BOUND, t0);
        assert_eq!(plan.start_failed(0, t0), ms(100));
        assert!(plan.due(t0 + ms(99)).is_empty());
        assert_eq!(plan.due(t0 + ms(100)), [0]);
        assert_eq!(plan.start_failed(0, t0 + ms(100)), ms(200));
        plan.started(0, 5, t0 + ms(300));
        assert_eq!(
            plan.exited(0, Exit::Code(1), t0 + ms(400)),
            After::Restart(ms(400))
        );
    }

    #[test]
    fn a_stop_ends_with_0_when_every_worker_exits_well() {
        let t0 = Instant::now();
        let mut plan = running(3, t0);
        let at = t0 + Duration::from_secs(60);
        plan.stop(at, libc::SIGTERM);
        assert!(plan.is_stopping());
        assert_eq!(plan.running().len(), 3, "they are asked, not yet gone");
        assert_eq!(plan.outcome(), None);
        assert_eq!(plan.exited(0, Exit::Code(0), at), After::Stopped);
        // Killed by the signal it was sent (before its handler was in place): a clean stop.
        assert_eq!(
            plan.exited(1, Exit::Signal(libc::SIGTERM), at),
            After::Stopped
        );
        assert_eq!(plan.outcome(), None, "one still runs");
        assert!(
            plan.due(at + Duration::from_secs(3600)).is_empty(),
            "none restarts"
        );
        assert_eq!(plan.exited(2, Exit::Code(0), at), After::Stopped);
        assert_eq!(plan.outcome(), Some(0));
    }

    #[test]
    fn a_stop_ends_with_1_when_a_worker_fails_or_dies_of_another_signal() {
        for bad in [
            Exit::Code(1),
            Exit::Signal(libc::SIGSEGV),
            Exit::Signal(libc::SIGTERM),
        ] {
            let t0 = Instant::now();
            let mut plan = running(2, t0);
            plan.stop(t0, libc::SIGINT);
            plan.exited(0, Exit::Code(0), t0);
            plan.exited(1, bad, t0);
            assert_eq!(plan.outcome(), Some(1), "{bad}");
        }
    }

    #[test]
    fn a_worker_waiting_for_its_restart_is_not_started_after_a_stop() {
        let t0 = Instant::now();
        let mut plan = running(2, t0);
        assert!(matches!(
            plan.exited(0, Exit::Code(1), t0),
            After::Restart(_)
        ));
        plan.stop(t0 + ms(50), libc::SIGTERM);
        assert!(plan.due(t0 + Duration::from_secs(10)).is_empty());
        assert_eq!(plan.running(), [(1, 101)]);
        plan.exited(1, Exit::Code(0), t0 + ms(60));
        assert_eq!(
            plan.outcome(),
            Some(0),
            "the worker that had died before counts not"
        );
    }

    #[test]
    fn workers_still_running_after_the_bound_are_killed_once() {
        let t0 = Instant::now();
        let mut plan = running(2, t0);
        plan.stop(t0, libc::SIGTERM);
        assert_eq!(plan.next_deadline(), Some(t0 + BOUND));
        // A second signal does not push the deadline back.
        plan.stop(t0 + Duration::from_secs(5), libc::SIGINT);
        assert_eq!(plan.next_deadline(), Some(t0 + BOUND));
        plan.exited(0, Exit::Code(0), t0 + ms(500));
        assert!(!plan.kill_due(t0 + BOUND - ms(1)));
        assert!(plan.kill_due(t0 + BOUND));
        assert!(!plan.kill_due(t0 + BOUND + ms(1)), "once");
        assert_eq!(plan.next_deadline(), None);
        plan.exited(1, Exit::Signal(libc::SIGKILL), t0 + BOUND);
        assert_eq!(plan.outcome(), Some(1));
    }

    #[test]
    fn nothing_is_killed_when_every_worker_exited_in_time() {
        let t0 = Instant::now();
        let mut plan = running(1, t0);
        plan.stop(t0, libc::SIGTERM);
        plan.exited(0, Exit::Code(0), t0);
        assert!(!plan.kill_due(t0 + BOUND));
        assert_eq!(plan.outcome(), Some(0));
    }

    #[test]
    fn a_worker_that_refuses_its_settings_makes_the_supervisor_give_up_with_2() {
        let t0 = Instant::now();
        let mut plan = running(2, t0);
        assert_eq!(plan.exited(0, Exit::Code(2), t0), After::GiveUp);
        assert!(plan.due(t0 + Duration::from_secs(60)).is_empty());
        plan.stop(t0, libc::SIGTERM);
        assert_eq!(plan.outcome(), None);
        plan.exited(1, Exit::Code(0), t0);
        assert_eq!(plan.outcome(), Some(2));
    }

    #[test]
    fn exits_read_as_a_code_or_a_signal_with_its_name() {
        assert_eq!(Exit::of(ExitStatus::from_raw(3 << 8)), Exit::Code(3));
        assert_eq!(
            Exit::of(ExitStatus::from_raw(libc::SIGKILL)),
            Exit::Signal(9)
        );
        assert_eq!(Exit::Code(1).to_string(), "exit code 1");
        assert_eq!(Exit::Signal(9).to_string(), "signal 9 (SIGKILL)");
        assert_eq!(Exit::Signal(64).to_string(), "signal 64");
    }

    #[test]
    fn port_0_is_refused_with_workers() {
        let cfg = Config {
            workers: 2,
            port: 0,
            ..Config::default()
        };
        let e = check(&cfg).unwrap_err();
        assert!(
            e.contains("--workers (WORKERS) 2 needs a fixed --port (PORT)"),
            "{e}"
        );
        assert!(
            check(&Config {
                port: 8080,
                ..cfg.clone()
            })
            .is_ok()
        );
        assert!(
            check(&Config { workers: 1, ..cfg }).is_ok(),
            "one process may take port 0"
        );
    }

    #[test]
    fn the_worker_flags_override_the_command_line_and_the_environment() {
        // Were the first --workers to win, 3 workers without --redis would be refused.
        let args = ["--reuse-port", "false", "--workers", "3", "--port=9000"];
        let worker = worker_args(args.map(OsString::from));
        let worker: Vec<String> = worker
            .into_iter()
            .map(|a| a.into_string().unwrap())
            .collect();
        assert_eq!(worker[..5], args);
        let env = |k: &str| match k {
            "WORKERS" => Some("5".to_string()),
            "REUSE_PORT" => Some("false".to_string()),
            _ => None,
        };
        let Ok(Cli::Run(cfg)) = Config::from_args(worker, env) else {
            panic!("the worker's settings are accepted");
        };
        assert_eq!((cfg.workers, cfg.reuse_port, cfg.port), (1, true, 9000));
    }
}
