//! The harness shared by the integration tests: the real server on its own thread at
//! `127.0.0.1:0`, raw HTTP, and a blocking WebSocket client.
#![allow(dead_code)] // each test file uses its own part of the harness

#[cfg(feature = "cluster")]
pub mod cluster;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::thread;
use std::time::Duration;

use chatterbox::config::Config;
use chatterbox::server::{Server, Stopper};
use serde_json::Value;
use tungstenite::stream::MaybeTlsStream;
use tungstenite::{Message, WebSocket};

/// An upgrade request for `path` with the given extra header lines (each ending in CRLF).
pub fn upgrade_request(path: &str, extra: &str) -> String {
    format!(
        "GET {path} HTTP/1.1\r\nHost: localhost\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n{extra}\r\n"
    )
}

/// The status code at the start of a raw HTTP response.
pub fn status(response: &str) -> u16 {
    response
        .get(9..12)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0)
}

pub struct Running {
    pub addr: SocketAddr,
    pub stopper: Stopper,
    handle: Option<thread::JoinHandle<std::io::Result<()>>>,
}

impl Running {
    pub fn start(cfg: Config) -> Running {
        // The server stays on its own thread from bind to exit, as in the binary.
        let (tx, rx) = std::sync::mpsc::channel();
        let handle = thread::spawn(move || {
            // Test clients rarely answer a close frame: don't wait long for them at the end.
            let server = Server::bind(Config {
                host: "127.0.0.1".into(),
                port: 0,
                shutdown_grace: Duration::from_millis(200),
                ..cfg
            })?;
            tx.send((server.local_addr(), server.stopper())).unwrap();
            server.run()
        });
        let (addr, stopper) = rx.recv().expect("the server binds");
        Running {
            addr,
            stopper,
            handle: Some(handle),
        }
    }

    pub fn memory() -> Running {
        Running::start(Config {
            db_path: ":memory:".into(),
            ..Config::default()
        })
    }

    pub fn stop(mut self) {
        self.stopper.stop();
        self.handle.take().unwrap().join().unwrap().unwrap();
    }

    /// Sends a raw request and returns what came back: everything up to the server's close,
    /// or, for a successful upgrade, up to the welcome's `history` event.
    pub fn http(&self, request: &str) -> String {
        let mut s = TcpStream::connect(self.addr).unwrap();
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
        }
        String::from_utf8_lossy(&out).into_owned()
    }

    pub fn get_json(&self, path: &str) -> Value {
        let r = self.http(&format!("GET {path} HTTP/1.1\r\nHost: t\r\n\r\n"));
        let body = r.split_once("\r\n\r\n").expect("a body").1;
        serde_json::from_str(body).expect("JSON body")
    }

    pub fn client(&self, name: &str) -> Client {
        let url = format!("ws://{}/ws?name={name}", self.addr);
        let (ws, _) = tungstenite::connect(url).expect("upgrade");
        if let MaybeTlsStream::Plain(s) = ws.get_ref() {
            s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        }
        let mut c = Client { ws };
        c.until(|e| e["event"] == "history");
        c
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        if let Some(h) = self.handle.take() {
            self.stopper.stop();
            let _ = h.join();
        }
    }
}

pub struct Client {
    pub ws: WebSocket<MaybeTlsStream<TcpStream>>,
}

impl Client {
    pub fn send(&mut self, v: Value) {
        self.ws.send(Message::text(v.to_string())).unwrap();
    }
    pub fn recv(&mut self) -> Value {
        loop {
            match self.ws.read().expect("a frame within 5 s") {
                Message::Text(t) => return serde_json::from_str(t.as_str()).unwrap(),
                Message::Close(c) => panic!("closed: {c:?}"),
                _ => {}
            }
        }
    }
    pub fn until(&mut self, pred: impl Fn(&Value) -> bool) -> Value {
        loop {
            let v = self.recv();
            if pred(&v) {
                return v;
            }
        }
    }
    /// Reads until the server closes; returns the close code.
    pub fn close_code(&mut self) -> Option<u16> {
        loop {
            match self.ws.read() {
                Ok(Message::Close(c)) => return c.map(|c| u16::from(c.code)),
                Ok(_) => {}
                Err(_) => return None,
            }
        }
    }
}

/// The real binary on `127.0.0.1:0` with `--db-path :memory:`, the `extra` flags, and whatever
/// `configure` adds to the command (limits, say); returns it with the address it logged. Its log
/// is read on a thread for the rest of its life, so the server never blocks on a full pipe.
pub fn spawn_binary(
    extra: &[&str],
    configure: impl FnOnce(&mut std::process::Command),
) -> (std::process::Child, SocketAddr) {
    use std::io::BufRead;
    let mut cmd = binary_command(extra);
    configure(&mut cmd);
    let mut child = cmd.spawn().expect("the binary starts");
    let mut lines = std::io::BufReader::new(child.stderr.take().unwrap()).lines();
    let addr = loop {
        let line = lines.next().expect("a log line").unwrap();
        if let Some(a) = listen_addr(&line) {
            break a;
        }
    };
    thread::spawn(move || lines.for_each(drop));
    (child, addr)
}

/// The real binary's command: `127.0.0.1:0`, `--db-path :memory:`, then `extra`; stdin and
/// stdout closed, stderr (its log) piped.
pub fn binary_command<S: AsRef<std::ffi::OsStr>>(extra: &[S]) -> std::process::Command {
    let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_chatterbox"));
    cmd.args([
        "--host",
        "127.0.0.1",
        "--port",
        "0",
        "--db-path",
        ":memory:",
    ])
    .args(extra)
    .stdin(std::process::Stdio::null())
    .stdout(std::process::Stdio::null())
    .stderr(std::process::Stdio::piped());
    cmd
}

/// The address of a `chatterbox listening on ADDR (plain)` (or `(TLS)`) log line.
pub fn listen_addr(line: &str) -> Option<SocketAddr> {
    let rest = line.split("listening on ").nth(1)?;
    rest.split_whitespace().next()?.parse().ok()
}

/// The real binary on `127.0.0.1:0` with `--db-path :memory:` and `extra`, its log lines sent to
/// the receiver (for tests that wait for what the server logs, e.g. after a signal).
pub fn spawn_binary_logged(
    extra: &[&std::ffi::OsStr],
) -> (
    std::process::Child,
    SocketAddr,
    std::sync::mpsc::Receiver<String>,
) {
    use std::io::BufRead;
    let mut child = binary_command(extra).spawn().expect("the binary starts");
    let (tx, rx) = std::sync::mpsc::channel();
    let stderr = child.stderr.take().unwrap();
    thread::spawn(move || {
        for line in std::io::BufReader::new(stderr)
            .lines()
            .map_while(Result::ok)
        {
            let _ = tx.send(line);
        }
    });
    let addr = loop {
        let line = rx
            .recv_timeout(Duration::from_secs(10))
            .expect("a log line");
        if let Some(a) = listen_addr(&line) {
            break a;
        }
    };
    (child, addr, rx)
}

/// Waits (at most 10 s) for a log line containing `needle` and returns it.
pub fn wait_log(rx: &std::sync::mpsc::Receiver<String>, needle: &str) -> String {
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        let line = rx
            .recv_timeout(left)
            .unwrap_or_else(|_| panic!("no log line with {needle:?}"));
        if line.contains(needle) {
            return line;
        }
    }
}
