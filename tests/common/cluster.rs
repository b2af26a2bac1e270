//! The cluster harness (feature `cluster`, issue 12): a `redis-server` of the test's own on a
//! free loopback port in a temp dir, chatterbox nodes as real processes of the binary with
//! `--redis`, raw RESP to look into Redis, and the reads with deadlines the cluster tests need.
//!
//! Everything started here is killed on `Drop`, so a failing test leaves nothing running.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use tungstenite::stream::MaybeTlsStream;
use tungstenite::{Error as WsError, Message};

use super::{Client, status, upgrade_request};

/// How long a start (Redis answering `PING`, a node answering `/health`) may take.
const START: Duration = Duration::from_secs(15);

/// A fresh empty directory under the system temp dir, unique in this process and across
/// processes; removed by whoever owns it.
pub fn temp_dir(what: &str) -> PathBuf {
    static N: AtomicU64 = AtomicU64::new(0);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    let dir = std::env::temp_dir().join(format!(
        "chatterbox-{what}-{}-{}-{nanos}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    ));
    std::fs::create_dir_all(&dir).expect("a temp dir");
    dir
}

/// A loopback port that was free a moment ago: bind port 0, take the port, drop the listener.
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port")
        .port()
}

fn signal(child: &Child, sig: libc::c_int) {
    // SAFETY: kill(2) on the pid of a child we own and have not reaped yet.
    unsafe { libc::kill(child.id() as libc::pid_t, sig) };
}

/// Waits for `child` at most `limit`; `None` when it is still running then.
fn wait_for_exit(child: &mut Child, limit: Duration) -> Option<ExitStatus> {
    let deadline = Instant::now() + limit;
    loop {
        if let Some(st) = child.try_wait().expect("try_wait") {
            return Some(st);
        }
        if Instant::now() >= deadline {
            return None;
        }
        thread::sleep(Duration::from_millis(10));
    }
}

// ------------------------------------------------------------------------------------------
// Redis
// ------------------------------------------------------------------------------------------

/// One RESP reply.
#[derive(Debug, Clone, PartialEq)]
pub enum Resp {
    /// `+OK`
    Simple(String),
    /// `-ERR …`
    Error(String),
    /// `:N`
    Int(i64),
    /// `$N …`, `None` for the nil bulk string.
    Bulk(Option<String>),
    /// `*N …`, `None` for the nil array.
    Array(Option<Vec<Resp>>),
}

impl Resp {
    /// The reply as text: strings as they are, integers in decimal, errors with their `-`,
    /// nil as the empty string, arrays as their items one per line.
    pub fn text(&self) -> String {
        match self {
            Resp::Simple(s) | Resp::Bulk(Some(s)) => s.clone(),
            Resp::Error(e) => format!("-{e}"),
            Resp::Int(n) => n.to_string(),
            Resp::Bulk(None) | Resp::Array(None) => String::new(),
            Resp::Array(Some(items)) => items.iter().map(Resp::text).collect::<Vec<_>>().join("\n"),
        }
    }

    /// The items of an array reply as text (empty for anything else).
    pub fn strings(&self) -> Vec<String> {
        match self {
            Resp::Array(Some(items)) => items.iter().map(Resp::text).collect(),
            _ => Vec::new(),
        }
    }
}

fn read_resp(r: &mut impl BufRead) -> std::io::Result<Resp> {
    let mut line = String::new();
    if r.read_line(&mut line)? == 0 {
        return Err(std::io::ErrorKind::UnexpectedEof.into());
    }
    let line = line.trim_end_matches("\r\n");
    let (kind, rest) = line.split_at(1.min(line.len()));
    let bad = || std::io::Error::new(std::io::ErrorKind::InvalidData, line.to_string());
    let n = || rest.parse::<i64>().map_err(|_| bad());
    Ok(match kind {
        "+" => Resp::Simple(rest.into()),
        "-" => Resp::Error(rest.into()),
        ":" => Resp::Int(n()?),
        "$" => {
            let len = n()?;
            if len < 0 {
                Resp::Bulk(None)
            } else {
                let mut buf = vec![0; len as usize + 2];
                r.read_exact(&mut buf)?;
                buf.truncate(len as usize);
                Resp::Bulk(Some(String::from_utf8_lossy(&buf).into_owned()))
            }
        }
        "*" => {
            let len = n()?;
            if len < 0 {
                Resp::Array(None)
            } else {
                let mut items = Vec::with_capacity(len as usize);
                for _ in 0..len {
                    items.push(read_resp(r)?);
                }
                Resp::Array(Some(items))
            }
        }
        _ => return Err(bad()),
    })
}

/// A `redis-server` of the test's own: `127.0.0.1` on a free port, its files in a temp dir,
/// `--save '' --appendonly no` unless the extra arguments say otherwise. Killed on drop.
pub struct Redis {
    port: u16,
    dir: PathBuf,
    extra: Vec<String>,
    child: Option<Child>,
}

impl Redis {
    /// Starts one without persistence (a restart loses everything).
    pub fn start() -> Redis {
        Redis::start_with(&[])
    }

    /// Starts one with these arguments after the defaults (later ones win), e.g.
    /// `&["--appendonly", "yes", "--appendfsync", "always"]`.
    pub fn start_with(extra: &[&str]) -> Redis {
        let mut r = Redis {
            port: free_port(),
            dir: temp_dir("redis"),
            extra: extra.iter().map(|s| s.to_string()).collect(),
            child: None,
        };
        r.start_again();
        r
    }

    /// Its port.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// `redis://127.0.0.1:PORT`, for `--redis`.
    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// Starts it again on the same port with the same dir and arguments (its data is kept
    /// only with `--appendonly yes`); waits until it answers `PING`.
    pub fn start_again(&mut self) {
        assert!(self.child.is_none(), "redis-server is already running");
        let log = self.dir.join("redis.log");
        let child = Command::new("redis-server")
            .args(["--port", &self.port.to_string(), "--bind", "127.0.0.1"])
            .arg("--dir")
            .arg(&self.dir)
            .arg("--logfile")
            .arg(&log)
            .args(["--save", "", "--appendonly", "no", "--daemonize", "no"])
            .args(["--protected-mode", "no"])
            .args(&self.extra)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("redis-server starts (is it installed? apt-get install redis-server)");
        self.child = Some(child);
        let deadline = Instant::now() + START;
        loop {
            if self.ping() {
                return;
            }
            if let Some(st) = self.child.as_mut().unwrap().try_wait().unwrap() {
                let text = std::fs::read_to_string(&log).unwrap_or_default();
                panic!("redis-server exited with {st}:\n{text}");
            }
            assert!(
                Instant::now() < deadline,
                "redis-server on port {} did not answer PING",
                self.port
            );
            thread::sleep(Duration::from_millis(20));
        }
    }

    /// Whether it answers `PING` with `+PONG` now (raw TCP, inline command).
    pub fn ping(&self) -> bool {
        let Ok(mut s) = TcpStream::connect(("127.0.0.1", self.port)) else {
            return false;
        };
        let _ = s.set_read_timeout(Some(Duration::from_secs(1)));
        if s.write_all(b"PING\r\n").is_err() {
            return false;
        }
        let mut buf = [0u8; 5];
        s.read_exact(&mut buf).is_ok() && &buf == b"+PONG"
    }

    /// SIGTERM, and waits for it to exit.
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            signal(&child, libc::SIGTERM);
            if wait_for_exit(&mut child, Duration::from_secs(10)).is_none() {
                let _ = child.kill();
                let _ = child.wait();
                panic!("redis-server did not stop on SIGTERM");
            }
        }
    }

    /// SIGKILL, and reaps it.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// `FLUSHALL`: every key gone, the data loss of a Redis restarted without its files.
    pub fn flushall(&self) {
        assert_eq!(self.cmd(&["FLUSHALL"]), "OK");
    }

    /// `CLIENT KILL TYPE pubsub`: every subscribed connection dropped; how many were.
    pub fn client_kill_pubsub(&self) -> i64 {
        match self.query(&["CLIENT", "KILL", "TYPE", "pubsub"]) {
            Resp::Int(n) => n,
            other => panic!("CLIENT KILL answered {other:?}"),
        }
    }

    /// One command, its reply.
    pub fn query(&self, args: &[&str]) -> Resp {
        let mut s = TcpStream::connect(("127.0.0.1", self.port)).expect("connect to redis");
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let mut out = format!("*{}\r\n", args.len()).into_bytes();
        for a in args {
            out.extend_from_slice(format!("${}\r\n", a.len()).as_bytes());
            out.extend_from_slice(a.as_bytes());
            out.extend_from_slice(b"\r\n");
        }
        s.write_all(&out).expect("write to redis");
        read_resp(&mut BufReader::new(s)).expect("a RESP reply")
    }

    /// One command, its reply as text (see [`Resp::text`]).
    pub fn cmd(&self, args: &[&str]) -> String {
        self.query(args).text()
    }

    /// The stored messages of `room` (`ZRANGE cb:h:{room} 0 -1`), parsed.
    pub fn history(&self, room: &str) -> Vec<Value> {
        self.query(&["ZRANGE", &format!("cb:h:{room}"), "0", "-1"])
            .strings()
            .iter()
            // An entry is the stored JSON, then the sender's node, connection, serial and
            // echo flag on lines of their own (what a node needs to deliver it after a gap).
            .map(|s| s.split('\n').next().unwrap_or_default())
            .map(|s| serde_json::from_str(s).unwrap_or_else(|e| panic!("{e}: {s}")))
            .collect()
    }
}

impl Drop for Redis {
    fn drop(&mut self) {
        self.kill();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

// ------------------------------------------------------------------------------------------
// Nodes
// ------------------------------------------------------------------------------------------

/// One chatterbox node: the real binary with `--redis URL --host 127.0.0.1 --port 0` and the
/// test's arguments, in a temp dir of its own, its log kept. Killed on drop; when the test is
/// failing, the tail of its log is printed then.
pub struct Node {
    /// The address it logged.
    pub addr: SocketAddr,
    child: Option<Child>,
    log: Arc<Mutex<Vec<String>>>,
    dir: PathBuf,
    seen_to: usize,
}

impl Node {
    /// Starts a node of `redis` and waits until its `/health` answers `200`.
    pub fn spawn(redis: &Redis, extra: &[&str]) -> Node {
        Node::spawn_on(&redis.url(), 0, extra)
    }

    /// Starts a node of the Redis at `url` on `port` (0: any) and waits until its `/health`
    /// answers `200`.
    pub fn spawn_on(url: &str, port: u16, extra: &[&str]) -> Node {
        let mut node = Node::spawn_unready(url, port, extra);
        let deadline = Instant::now() + START;
        while node.health().0 != 200 {
            assert!(
                Instant::now() < deadline,
                "node {} never answered /health 200:\n{}",
                node.addr,
                node.log_text()
            );
            if let Some(st) = node.child.as_mut().unwrap().try_wait().unwrap() {
                panic!("the node exited with {st}:\n{}", node.log_text());
            }
            thread::sleep(Duration::from_millis(20));
        }
        node
    }

    /// Starts a node on `port` (0: any) and returns once it logged its address (it may not
    /// serve yet).
    pub fn spawn_unready(url: &str, port: u16, extra: &[&str]) -> Node {
        let dir = temp_dir("node");
        let mut child = Command::new(env!("CARGO_BIN_EXE_chatterbox"))
            .args([
                "--redis",
                url,
                "--host",
                "127.0.0.1",
                "--port",
                &port.to_string(),
            ])
            // Test clients rarely answer a close frame: don't wait long for them at the end.
            .args(["--shutdown-grace", "0.3"])
            .args(extra)
            .current_dir(&dir)
            .env_remove("REDIS_URL")
            .env_remove("DB_PATH")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("the binary starts");
        let log = Arc::new(Mutex::new(Vec::new()));
        let (tx, rx) = std::sync::mpsc::channel();
        let stderr = child.stderr.take().unwrap();
        let sink = log.clone();
        thread::spawn(move || {
            let mut sent = false;
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if !sent {
                    if let Some(a) = super::listen_addr(&line) {
                        let _ = tx.send(a);
                        sent = true;
                    }
                }
                sink.lock().unwrap().push(line);
            }
        });
        let addr = match rx.recv_timeout(START) {
            Ok(a) => a,
            Err(_) => {
                let _ = child.kill();
                let _ = child.wait();
                panic!(
                    "the node logged no listen line:\n{}",
                    log.lock().unwrap().join("\n")
                );
            }
        };
        Node {
            addr,
            child: Some(child),
            log,
            dir,
            seen_to: 0,
        }
    }

    /// Its log so far.
    pub fn log_text(&self) -> String {
        self.log.lock().unwrap().join("\n")
    }

    /// Waits (at most 10 s) for a log line after the last one this returned that contains
    /// `needle`.
    pub fn wait_log(&mut self, needle: &str) -> String {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            {
                let log = self.log.lock().unwrap();
                if let Some(i) = log[self.seen_to..].iter().position(|l| l.contains(needle)) {
                    self.seen_to += i + 1;
                    return log[self.seen_to - 1].clone();
                }
            }
            assert!(
                Instant::now() < deadline,
                "no log line with {needle:?}:\n{}",
                self.log_text()
            );
            thread::sleep(Duration::from_millis(20));
        }
    }

    /// `kill -9`.
    pub fn kill9(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// SIGTERM; waits (at most 10 s) and returns the exit code (`None`: killed by a signal).
    pub fn sigterm(&mut self) -> Option<i32> {
        let mut child = self.child.take().expect("the node is running");
        signal(&child, libc::SIGTERM);
        match wait_for_exit(&mut child, Duration::from_secs(10)) {
            Some(st) => st.code(),
            None => {
                let _ = child.kill();
                let _ = child.wait();
                panic!("the node did not exit within 10 s of SIGTERM");
            }
        }
    }

    /// Its process id (while it runs).
    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("the node is running").id()
    }

    /// The CPU time (user + system) its process has used so far.
    pub fn cpu_time(&self) -> Duration {
        cpu_time(self.pid())
    }

    /// Whether the process is still running.
    pub fn running(&mut self) -> bool {
        match self.child.as_mut() {
            Some(c) => c.try_wait().unwrap().is_none(),
            None => false,
        }
    }

    /// A raw HTTP exchange with it (see [`http`]).
    pub fn http(&self, request: &str) -> String {
        http(self.addr, request)
    }

    /// `GET path`: the status and the body.
    pub fn get(&self, path: &str) -> (u16, String) {
        get(self.addr, path)
    }

    /// `GET path`, which must answer `200` with JSON.
    pub fn get_json(&self, path: &str) -> Value {
        let (code, body) = self.get(path);
        assert_eq!(code, 200, "GET {path} on {}: {body}", self.addr);
        serde_json::from_str(&body).unwrap_or_else(|e| panic!("GET {path}: {e}: {body}"))
    }

    /// `GET /health`: the status and the body (0 when it does not answer).
    pub fn health(&self) -> (u16, String) {
        match TcpStream::connect(self.addr) {
            Ok(_) => get(self.addr, "/health"),
            Err(_) => (0, String::new()),
        }
    }

    /// A member connected with `name` (`None`: a default name) and its welcome read.
    pub fn client(&self, name: Option<&str>) -> Client {
        connect(self.addr, name).unwrap_or_else(|code| {
            panic!(
                "upgrade of {name:?} on {} refused {code}:\n{}",
                self.addr,
                self.log_text()
            )
        })
    }

    /// The status an upgrade with `name` gets (the member is dropped at once on `101`).
    pub fn upgrade_status(&self, name: &str) -> u16 {
        status(&self.http(&upgrade_request(&format!("/ws?name={name}"), "")))
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        if thread::panicking() {
            let log = self.log.lock().unwrap();
            let tail = &log[log.len().saturating_sub(40)..];
            eprintln!("--- log of node {} (last lines) ---", self.addr);
            for l in tail {
                eprintln!("{l}");
            }
        }
        self.kill9();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// The CPU time (user + system) process `pid` has used so far, from `/proc/PID/stat`.
pub fn cpu_time(pid: u32) -> Duration {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).expect("/proc/PID/stat");
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .unwrap()
        .1
        .split_whitespace()
        .collect();
    // After the command: state is field 3, utime 14 and stime 15 (proc(5)).
    let ticks: u64 = fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap();
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as u64;
    Duration::from_millis(ticks * 1000 / hz)
}

/// Redis and `n` nodes of it with the same extra arguments.
pub fn cluster(n: usize, extra: &[&str]) -> (Redis, Vec<Node>) {
    let redis = Redis::start();
    let nodes = (0..n).map(|_| Node::spawn(&redis, extra)).collect();
    (redis, nodes)
}

/// Sends a raw request to `addr` and returns what came back: everything up to the server's
/// close, or, for a successful upgrade, up to the welcome's `history` event; a response with
/// `Content-Length` is read to its end only.
pub fn http(addr: SocketAddr, request: &str) -> String {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    s.write_all(request.as_bytes()).unwrap();
    let mut out = Vec::new();
    let mut buf = [0u8; 8192];
    loop {
        match s.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => out.extend_from_slice(&buf[..n]),
        }
        let text = String::from_utf8_lossy(&out);
        if text.starts_with("HTTP/1.1 101") && text.contains(r#""event":"history""#) {
            break;
        }
        if let Some((head, body)) = text.split_once("\r\n\r\n") {
            let len = head.lines().find_map(|l| {
                let (k, v) = l.split_once(':')?;
                k.eq_ignore_ascii_case("content-length")
                    .then(|| v.trim().parse::<usize>().ok())?
            });
            if len.is_some_and(|n| body.len() >= n) {
                break;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// `GET path` on `addr` (connection closed after it): the status and the body.
pub fn get(addr: SocketAddr, path: &str) -> (u16, String) {
    let r = http(
        addr,
        &format!("GET {path} HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n"),
    );
    let body = r.split_once("\r\n\r\n").map(|(_, b)| b).unwrap_or("");
    (status(&r), body.to_string())
}

/// A member on `addr` with `name` (`None`: a default name), its welcome read up to
/// `history`; the refusal's status when the upgrade is refused.
pub fn connect(addr: SocketAddr, name: Option<&str>) -> Result<Client, u16> {
    let url = match name {
        Some(n) => format!("ws://{addr}/ws?name={n}"),
        None => format!("ws://{addr}/ws"),
    };
    let ws = match tungstenite::connect(url) {
        Ok((ws, _)) => ws,
        Err(WsError::Http(resp)) => return Err(resp.status().as_u16()),
        Err(e) => panic!("upgrade on {addr}: {e}"),
    };
    if let MaybeTlsStream::Plain(s) = ws.get_ref() {
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    }
    let mut c = Client { ws };
    c.wait_for("the welcome's history", Duration::from_secs(5), |e| {
        e["event"] == "history"
    });
    Ok(c)
}

/// What a member received: the helpers a cluster test reads with, each with a deadline.
impl Client {
    /// The next event within `limit`; `None` when none came. Panics when the server closes.
    pub fn next_within(&mut self, limit: Duration) -> Option<Value> {
        let deadline = Instant::now() + limit;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return None;
            }
            if let MaybeTlsStream::Plain(s) = self.ws.get_ref() {
                s.set_read_timeout(Some(left)).unwrap();
            }
            match self.ws.read() {
                Ok(Message::Text(t)) => return Some(serde_json::from_str(t.as_str()).unwrap()),
                Ok(Message::Close(c)) => panic!("closed: {c:?}"),
                Ok(_) => {}
                Err(WsError::Io(e))
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::WouldBlock
                            | std::io::ErrorKind::TimedOut
                            | std::io::ErrorKind::Interrupted
                    ) =>
                {
                    return None;
                }
                Err(e) => panic!("read: {e}"),
            }
        }
    }

    /// The first event matching `pred` within `limit` (others are dropped); panics naming
    /// `what` and the last events seen otherwise.
    pub fn wait_for(
        &mut self,
        what: &str,
        limit: Duration,
        pred: impl Fn(&Value) -> bool,
    ) -> Value {
        let deadline = Instant::now() + limit;
        let mut seen = Vec::new();
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.next_within(left) {
                Some(v) if pred(&v) => return v,
                Some(v) => seen.push(v),
                None => panic!(
                    "no {what} within {limit:?}; last seen: {:?}",
                    &seen[seen.len().saturating_sub(10)..]
                ),
            }
        }
    }

    /// Every event that arrives within `limit`.
    pub fn collect_for(&mut self, limit: Duration) -> Vec<Value> {
        let deadline = Instant::now() + limit;
        let mut out = Vec::new();
        while let Some(v) = self.next_within(deadline.saturating_duration_since(Instant::now())) {
            out.push(v);
        }
        out
    }

    /// Sends `cmd` with a fresh `request_id` and returns the answer carrying it (reply, `ack`
    /// or `error`; never the room's copy of a broadcast), within 5 s. Events before it are
    /// dropped.
    pub fn request(&mut self, cmd: Value) -> Value {
        let (answer, _) = self.request_keeping(cmd);
        answer
    }

    /// [`Client::request`], also returning the events that came before the answer.
    pub fn request_keeping(&mut self, mut cmd: Value) -> (Value, Vec<Value>) {
        static RID: AtomicU64 = AtomicU64::new(0);
        let rid = format!("q{}", RID.fetch_add(1, Ordering::Relaxed));
        cmd["request_id"] = json!(rid);
        self.send(cmd.clone());
        let deadline = Instant::now() + Duration::from_secs(5);
        let mut before = Vec::new();
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.next_within(left) {
                Some(v) if v["request_id"] == rid.as_str() && v["event"] != "broadcast" => {
                    return (v, before);
                }
                Some(v) => before.push(v),
                None => panic!("no answer to {cmd} within 5 s; seen: {before:?}"),
            }
        }
    }

    /// A broadcast to `room` with a `request_id`: its answer (`ack` or `error`).
    pub fn publish(&mut self, room: &str, message: &str) -> Value {
        self.request(json!({"command": "broadcast", "room": room, "message": message}))
    }

    /// Every event before the answer to a `ping` (a barrier: all the server sent this member
    /// before it handled the ping).
    pub fn sync(&mut self) -> Vec<Value> {
        self.request_keeping(json!({"command": "ping"})).1
    }

    /// The member names a `list` answers (of `room`, or of the server).
    pub fn list(&mut self, room: Option<&str>) -> Vec<String> {
        let cmd = match room {
            Some(r) => json!({"command": "list", "room": r}),
            None => json!({"command": "list"}),
        };
        let ev = self.request(cmd);
        assert_eq!(ev["event"], "list", "{ev}");
        names(&ev["members"])
    }
}

/// A JSON array of strings as a `Vec`.
pub fn names(v: &Value) -> Vec<String> {
    v.as_array()
        .unwrap_or_else(|| panic!("not an array: {v}"))
        .iter()
        .map(|n| n.as_str().expect("a name").to_string())
        .collect()
}

/// Polls `check` every 50 ms until it returns `Some`, at most `limit`; panics naming `what`.
pub fn eventually<T>(what: &str, limit: Duration, mut check: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + limit;
    loop {
        if let Some(t) = check() {
            return t;
        }
        assert!(Instant::now() < deadline, "{what}: not within {limit:?}");
        thread::sleep(Duration::from_millis(50));
    }
}

/// Whether `e` is the system's `has joined!` notice of `name` in `room`.
pub fn is_joined(e: &Value, room: &str, name: &str) -> bool {
    e["event"] == "broadcast" && e["room"] == room && e["joined"] == name
}

/// Whether `e` is the system's `has left!` notice of `name` in `room`.
pub fn is_left(e: &Value, room: &str, name: &str) -> bool {
    e["event"] == "broadcast" && e["room"] == room && e["left"] == name
}

/// The ids of the member broadcasts of `room` among `events`, in the order received.
pub fn ids_in(events: &[Value], room: &str) -> Vec<u64> {
    events
        .iter()
        .filter(|e| e["event"] == "broadcast" && e["room"] == room && e["member"] != "system")
        .map(|e| e["id"].as_u64().expect("a broadcast with an id"))
        .collect()
}
