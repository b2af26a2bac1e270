//! `--reuse-port` and `--workers N` (issue 12) against the real binary: two processes on one
//! port both get connections, a port without the flag is taken once, the worker count's
//! refusals, and (cluster build, with a real `redis-server`) a supervisor of two workers that
//! restarts one killed with `kill -9` and stops them all on SIGTERM.
//!
//! Which process holds a connection is read from `/proc`: the server side of the client's
//! TCP connection (`/proc/net/tcp`) names a socket inode, and one process has it among its
//! descriptors (`/proc/PID/fd`).

mod common;

use std::net::{SocketAddr, TcpListener, TcpStream};
use std::process::{Child, Output};
use std::time::Duration;

use common::{binary_command, spawn_binary_logged};
use tungstenite::stream::MaybeTlsStream;
use tungstenite::{WebSocket, connect};

/// A port that was free a moment ago (the kernel does not hand it out again at once).
fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// Runs the binary to its exit (it is expected to refuse to start) with `args` after the
/// harness's `--host 127.0.0.1 --port 0 --db-path :memory:`.
fn start_fails(args: &[&str], env: &[(&str, &str)]) -> Output {
    let mut cmd = binary_command(args);
    cmd.envs(env.iter().copied());
    cmd.output().expect("the binary runs")
}

/// The socket inodes of the server side of connections from `client_port` to `server_port`
/// (IPv4 and IPv6 tables).
fn server_inodes(server_port: u16, client_port: u16) -> Vec<String> {
    let mut inodes = Vec::new();
    for table in ["/proc/net/tcp", "/proc/net/tcp6"] {
        let Ok(text) = std::fs::read_to_string(table) else {
            continue;
        };
        for line in text.lines().skip(1) {
            let f: Vec<&str> = line.split_whitespace().collect();
            let port = |addr: &str| {
                addr.rsplit(':')
                    .next()
                    .and_then(|p| u16::from_str_radix(p, 16).ok())
            };
            if f.len() > 9
                && port(f[1]) == Some(server_port)
                && port(f[2]) == Some(client_port)
                && f[9] != "0"
            {
                inodes.push(f[9].to_string());
            }
        }
    }
    inodes
}

/// Which of `pids` holds the server side of `client`'s connection, if any.
fn owner(client: &TcpStream, pids: &[u32]) -> Option<u32> {
    let server = client.peer_addr().ok()?.port();
    let inodes = server_inodes(server, client.local_addr().ok()?.port());
    pids.iter().copied().find(|pid| {
        let Ok(fds) = std::fs::read_dir(format!("/proc/{pid}/fd")) else {
            return false;
        };
        fds.filter_map(Result::ok).any(|fd| {
            std::fs::read_link(fd.path()).is_ok_and(|target| {
                let target = target.to_string_lossy();
                inodes.iter().any(|i| target == format!("socket:[{i}]"))
            })
        })
    })
}

type Ws = WebSocket<MaybeTlsStream<TcpStream>>;

/// A member on `addr` (its upgrade done and its welcome read, so the server has accepted it).
fn member(addr: SocketAddr, name: &str) -> Ws {
    let (mut ws, _) = connect(format!("ws://{addr}/ws?name={name}")).expect("upgrade");
    if let MaybeTlsStream::Plain(s) = ws.get_ref() {
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    }
    loop {
        let msg = ws.read().expect("the welcome");
        if msg
            .to_text()
            .is_ok_and(|t| t.contains(r#""event":"history""#))
        {
            return ws;
        }
    }
}

fn tcp(ws: &Ws) -> &TcpStream {
    match ws.get_ref() {
        MaybeTlsStream::Plain(s) => s,
        _ => unreachable!("plain connections only"),
    }
}

/// Opens members on `addr` (at most `most`) until one is held by each of `wanted`; returns
/// the owners seen, one per member, with the members kept open (the kernel hashes each
/// connection by its source port, so a handful reach every listener).
fn spread(addr: SocketAddr, pids: &[u32], wanted: &[u32], most: usize) -> (Vec<u32>, Vec<Ws>) {
    let (mut owners, mut members) = (Vec::new(), Vec::new());
    for i in 0..most {
        let ws = member(addr, &format!("m{i}"));
        // The accepted socket is in the owner's table once the welcome came.
        let found = owner(tcp(&ws), pids).expect("one of the processes holds the connection");
        owners.push(found);
        members.push(ws);
        if wanted.iter().all(|w| owners.contains(w)) {
            break;
        }
    }
    (owners, members)
}

/// Kills and reaps a child at the end of a test, however it ends.
struct Reap(Child);

impl Drop for Reap {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn two_processes_share_a_port_with_reuse_port_and_both_get_connections() {
    let port = free_port().to_string();
    let flags = ["--port", &port, "--reuse-port", "true"].map(std::ffi::OsStr::new);
    let (a, addr_a, _log_a) = spawn_binary_logged(&flags);
    let a = Reap(a);
    let (b, addr_b, _log_b) = spawn_binary_logged(&flags);
    let b = Reap(b);
    // Both logged the same address: the second bound the port the first holds.
    assert_eq!(addr_a, addr_b);
    assert_eq!(addr_a.port().to_string(), port);
    let pids = [a.0.id(), b.0.id()];
    let (owners, _members) = spread(addr_a, &pids, &pids, 64);
    assert!(
        pids.iter().all(|p| owners.contains(p)),
        "connections reach both processes: {owners:?} of {pids:?}"
    );
}

#[test]
fn without_reuse_port_a_second_process_cannot_bind_the_port() {
    let port = free_port().to_string();
    let culprit = format!("cannot listen on 127.0.0.1:{port}: address already in use");
    // The first shares the port, the second does not ask to: refused.
    let (first, _, _log) =
        spawn_binary_logged(&["--port", &port, "--reuse-port", "true"].map(std::ffi::OsStr::new));
    let first = Reap(first);
    let out = start_fails(&["--port", &port], &[]);
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    assert_eq!(
        stderr(&out).matches(&culprit).count(),
        1,
        "{}",
        stderr(&out)
    );
    drop(first);
    // The first does not share it: a second with --reuse-port is refused too.
    let (first, _, _log) = spawn_binary_logged(&["--port", &port].map(std::ffi::OsStr::new));
    let _first = Reap(first);
    let out = start_fails(&["--port", &port, "--reuse-port", "true"], &[]);
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    assert!(stderr(&out).contains(&culprit), "{}", stderr(&out));
}

#[test]
fn workers_above_1_are_refused_without_redis() {
    let port = free_port().to_string();
    for (args, env) in [
        (&["--port", &port, "--workers", "2"][..], &[][..]),
        (&["--port", &port][..], &[("WORKERS", "2")][..]),
    ] {
        let out = start_fails(args, env);
        let err = stderr(&out);
        assert_eq!(out.status.code(), Some(2), "{err}");
        assert!(
            err.contains("--workers (WORKERS) above 1 needs --redis (REDIS_URL)"),
            "{err}"
        );
        // Nothing was started: no listening line, no supervisor.
        assert!(
            !err.contains("listening on") && !err.contains("supervisor"),
            "{err}"
        );
    }
    let out = start_fails(&["--workers", "0"], &[]);
    assert_eq!(out.status.code(), Some(2));
    assert!(stderr(&out).contains("--workers (WORKERS) must be from 1 to 256"));
}

#[cfg(feature = "cluster")]
mod with_redis {
    use std::io::{BufRead, Read, Write};
    use std::path::PathBuf;
    use std::process::Command;
    use std::sync::mpsc::Receiver;
    use std::time::Instant;

    use common::{listen_addr, status};

    use super::*;

    /// A directory of its own under the system's temporary one, removed at the end.
    struct TempDir(PathBuf);

    impl TempDir {
        fn new(tag: &str) -> TempDir {
            let nanos = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .subsec_nanos();
            let dir = std::env::temp_dir()
                .join(format!("chatterbox-{tag}-{}-{nanos}", std::process::id()));
            std::fs::create_dir_all(&dir).unwrap();
            TempDir(dir)
        }
    }

    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    /// A `redis-server` on a unix socket in `dir`, no persistence; killed at the end.
    struct Redis {
        child: Reap,
        url: String,
    }

    impl Redis {
        fn start(dir: &TempDir) -> Redis {
            let sock = dir.0.join("redis.sock");
            let child = Command::new("redis-server")
                .args(["--port", "0", "--save", "", "--appendonly", "no"])
                .arg("--unixsocket")
                .arg(&sock)
                .current_dir(&dir.0)
                .stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::null())
                .spawn()
                .expect("redis-server is installed");
            let child = Reap(child);
            let deadline = Instant::now() + Duration::from_secs(10);
            while std::os::unix::net::UnixStream::connect(&sock).is_err() {
                assert!(Instant::now() < deadline, "redis-server did not start");
                std::thread::sleep(Duration::from_millis(20));
            }
            Redis {
                child,
                url: format!("unix://{}", sock.display()),
            }
        }
    }

    /// The binary without the harness's `--db-path :memory:` (cluster mode refuses it), its
    /// log lines sent to the receiver.
    fn supervisor(dir: &TempDir, args: &[&str]) -> (Reap, Receiver<String>) {
        let mut child = Command::new(env!("CARGO_BIN_EXE_chatterbox"))
            .args(["--host", "127.0.0.1", "--shutdown-grace", "0.5"])
            .args(args)
            .current_dir(&dir.0)
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .expect("the binary starts");
        let (tx, rx) = std::sync::mpsc::channel();
        let stderr = child.stderr.take().unwrap();
        std::thread::spawn(move || {
            for line in std::io::BufReader::new(stderr)
                .lines()
                .map_while(Result::ok)
            {
                let _ = tx.send(line);
            }
        });
        (Reap(child), rx)
    }

    /// The next log line containing `needle` (at most 10 s), the lines before it in `seen`.
    fn next_line(rx: &Receiver<String>, needle: &str, seen: &mut Vec<String>) -> String {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let line = rx
                .recv_timeout(left)
                .unwrap_or_else(|_| panic!("no log line with {needle:?} after {seen:#?}"));
            seen.push(line.clone());
            if line.contains(needle) {
                return line;
            }
        }
    }

    /// The pid of a `supervisor: started worker N (pid P)` line.
    fn started_pid(line: &str, n: usize) -> u32 {
        let rest = line
            .split(&format!("supervisor: started worker {n} (pid "))
            .nth(1)
            .unwrap_or_else(|| panic!("not worker {n}'s start: {line}"));
        rest.trim_end_matches(')').parse().unwrap()
    }

    fn health(addr: SocketAddr) -> u16 {
        let mut s = TcpStream::connect(addr).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        s.write_all(b"GET /health HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n")
            .unwrap();
        let mut out = String::new();
        let _ = s.read_to_string(&mut out);
        status(&out)
    }

    fn alive(pid: u32) -> bool {
        // Reaped by the supervisor, a worker is gone from /proc; a zombie would still be there.
        std::fs::metadata(format!("/proc/{pid}")).is_ok()
    }

    #[test]
    fn port_0_with_workers_names_the_reason() {
        let out = Command::new(env!("CARGO_BIN_EXE_chatterbox"))
            .args(["--host", "127.0.0.1", "--port", "0", "--workers", "3"])
            .args(["--redis", "redis://127.0.0.1:1"])
            .output()
            .unwrap();
        let err = stderr(&out);
        assert_eq!(out.status.code(), Some(2), "{err}");
        assert!(
            err.contains("--workers (WORKERS) 3 needs a fixed --port (PORT)"),
            "{err}"
        );
        assert!(!err.contains("supervisor: started"), "{err}");
    }

    #[test]
    fn two_workers_are_restarted_when_killed_and_stop_together_on_sigterm() {
        let dir = TempDir::new("workers");
        let redis = Redis::start(&dir);
        let port = free_port();
        let port_text = port.to_string();
        let (mut sup, log) = supervisor(
            &dir,
            &[
                "--port",
                &port_text,
                "--workers",
                "2",
                "--redis",
                &redis.url,
            ],
        );
        let mut seen = Vec::new();
        let first = started_pid(&next_line(&log, "started worker 1", &mut seen), 1);
        let second = started_pid(&next_line(&log, "started worker 2", &mut seen), 2);
        assert_ne!(first, second);
        for _ in 0..2 {
            let line = next_line(&log, "listening on", &mut seen);
            assert_eq!(listen_addr(&line).map(|a| a.port()), Some(port), "{line}");
        }
        let addr: SocketAddr = ([127, 0, 0, 1], port).into();
        assert_eq!(health(addr), 200);
        // Both workers answer on the one port.
        let pids = [first, second];
        let (owners, members) = spread(addr, &pids, &pids, 64);
        assert!(
            pids.iter().all(|p| owners.contains(p)),
            "{owners:?} of {pids:?}"
        );
        drop(members);

        // kill -9 of worker 1: the supervisor says so and starts a new one.
        // SAFETY: `kill` only reads its arguments; the pid is the supervisor's live child.
        assert_eq!(unsafe { libc::kill(first as i32, libc::SIGKILL) }, 0);
        let line = next_line(&log, "exited with", &mut seen);
        assert!(
            line.contains(&format!(
                "supervisor: worker 1 (pid {first}) exited with signal 9 (SIGKILL); restarting in 0.1s"
            )),
            "{line}"
        );
        let again = started_pid(&next_line(&log, "started worker 1", &mut seen), 1);
        assert!(again != first && again != second);
        next_line(&log, "listening on", &mut seen);
        assert!(alive(second) && alive(again) && !alive(first));
        // The new worker answers: a connection reaches it.
        let pids = [again, second];
        let (owners, members) = spread(addr, &pids, &[again], 64);
        assert!(
            owners.contains(&again),
            "{owners:?}: the new worker {again} got none"
        );
        assert_eq!(health(addr), 200);
        drop(members);

        // SIGTERM to the supervisor: forwarded; every worker exits, the supervisor with 0.
        // SAFETY: as above.
        assert_eq!(unsafe { libc::kill(sup.0.id() as i32, libc::SIGTERM) }, 0);
        let deadline = Instant::now() + Duration::from_secs(20);
        let code = loop {
            if let Some(status) = sup.0.try_wait().unwrap() {
                break status.code();
            }
            assert!(
                Instant::now() < deadline,
                "the supervisor did not exit: {seen:#?}"
            );
            std::thread::sleep(Duration::from_millis(20));
        };
        seen.extend(log.try_iter());
        assert_eq!(code, Some(0), "{seen:#?}");
        for pid in [again, second] {
            assert!(!alive(pid), "worker {pid} still runs");
            assert!(
                seen.iter()
                    .any(|l| l.contains(&format!("(pid {pid}) exited with exit code 0"))),
                "{seen:#?}"
            );
        }
        assert!(
            seen.iter()
                .any(|l| l.contains("supervisor: all workers exited"))
        );
        // Nobody listens on the port any more.
        assert!(TcpStream::connect(addr).is_err());
        drop(redis.child);
    }
}
