//! Settings that cannot hurt (issue 13, section 5) and the settings file, through the real
//! binary: a bad setting stops the start with exit 2 and one line naming flag and variable;
//! a failed listen or lookup names its culprit once; flag > env > file > default; an idle
//! timeout of 0 is off; a page that pings is not idle, one that only answers pings is.

mod common;

use std::net::TcpListener;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use chatterbox::config::Config;
use common::{Running, spawn_binary};
use serde_json::json;
use tungstenite::Message;

/// Runs the binary with `args` (and `env`), which must fail to start; a start that serves is
/// killed after a while and fails the test.
fn start_fails(args: &[&str], env: &[(&str, &str)]) -> Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_chatterbox"));
    cmd.args(["--db-path", ":memory:"])
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    for (k, v) in env {
        cmd.env(k, v);
    }
    let mut child = cmd.spawn().expect("the binary starts");
    let deadline = Instant::now() + Duration::from_secs(20);
    while child.try_wait().unwrap().is_none() {
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("{args:?} was not refused: the server kept running");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    child.wait_with_output().unwrap()
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// Exit 2 and exactly one line, which holds every one of `says`.
fn refused_with(args: &[&str], says: &[&str]) {
    let out = start_fails(args, &[]);
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(2), "{args:?}: {err}");
    assert_eq!(err.lines().count(), 1, "{args:?}: one line: {err}");
    for s in says {
        assert!(err.contains(s), "{args:?}: {err:?} lacks {s:?}");
    }
}

#[test]
fn bad_settings_stop_the_start_naming_flag_and_variable() {
    refused_with(
        &["--port", "99999"],
        &["--port (PORT): '99999' is out of range (0 to 65535)"],
    );
    refused_with(&["--port", "0", "--bogus"], &["unknown option --bogus"]);
    refused_with(
        &["--ping-interval", "0"],
        &["--ping-interval (PING_INTERVAL) must be at least"],
    );
    refused_with(
        &["--pong-timeout", "0"],
        &["--pong-timeout (PONG_TIMEOUT) must be at least"],
    );
    refused_with(
        &["--ping-interval", "30", "--pong-timeout", "30"],
        &[
            "--pong-timeout (PONG_TIMEOUT)",
            "longer than --ping-interval",
        ],
    );
    refused_with(
        &["--max-frame-size", "10"],
        &["--max-frame-size (MAX_FRAME_SIZE) must be from 512"],
    );
    refused_with(
        &["--log-format", "xml"],
        &["--log-format (LOG_FORMAT): 'xml' is not a log format"],
    );
    let out = start_fails(&[], &[("MAX_HEAD_BYTES", "10")]);
    assert_eq!(out.status.code(), Some(2));
    assert!(
        stderr(&out).contains("--max-head-bytes (MAX_HEAD_BYTES) must be from 1024"),
        "{}",
        stderr(&out)
    );
}

#[test]
fn a_port_in_use_is_named_once() {
    let taken = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = taken.local_addr().unwrap().port().to_string();
    for format in ["text", "json"] {
        let out = start_fails(
            &[
                "--host",
                "127.0.0.1",
                "--port",
                &port,
                "--log-format",
                format,
            ],
            &[],
        );
        let err = stderr(&out);
        assert_eq!(out.status.code(), Some(1), "{err}");
        let culprit = format!("cannot listen on 127.0.0.1:{port}: address already in use");
        assert_eq!(err.matches(&culprit).count(), 1, "once: {err}");
        assert_eq!(err.lines().count(), 1, "nothing else: {err}");
        if format == "json" {
            let v: serde_json::Value = serde_json::from_str(err.trim()).expect("a JSON line");
            assert_eq!(v["level"], "error");
            assert_eq!(v["msg"], format!("chatterbox: {culprit}"));
        }
    }
    // With the log off, the error is still printed, once.
    let out = start_fails(
        &["--host", "127.0.0.1", "--port", &port, "--log-level", "off"],
        &[],
    );
    assert_eq!(stderr(&out).matches("address already in use").count(), 1);
    drop(taken);
}

#[test]
fn ipv6_hosts_are_taken_with_or_without_brackets() {
    for host in ["::1", "[::1]"] {
        let cfg = Config {
            host: host.into(),
            port: 0,
            db_path: ":memory:".into(),
            ..Config::default()
        };
        match chatterbox::server::Server::bind(cfg) {
            Ok(s) => assert!(s.local_addr().is_ipv6(), "{host}"),
            // A machine without IPv6 on loopback: the error still names the address.
            Err(e) => assert!(e.to_string().starts_with("cannot listen on [::1]:0"), "{e}"),
        }
    }
}

#[test]
fn an_unknown_host_is_named_once() {
    // `.invalid` never resolves (RFC 6761), with or without a network.
    let out = start_fails(&["--host", "notahost.invalid", "--port", "0"], &[]);
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert_eq!(
        err.matches("cannot resolve host 'notahost.invalid'")
            .count(),
        1,
        "{err}"
    );
    assert_eq!(err.lines().count(), 1, "{err}");
}

/// A settings file in the test's temporary directory, removed when dropped.
struct SettingsFile(std::path::PathBuf);

impl SettingsFile {
    fn new(name: &str, text: &str) -> SettingsFile {
        let path = std::env::temp_dir().join(format!(
            "chatterbox-deploy-{}-{name}.conf",
            std::process::id()
        ));
        std::fs::write(&path, text).unwrap();
        SettingsFile(path)
    }
    fn path(&self) -> &str {
        self.0.to_str().unwrap()
    }
}

impl Drop for SettingsFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// The longest `message` the server at `addr` accepts, probed at the given lengths.
fn accepts(addr: std::net::SocketAddr, len: usize) -> bool {
    let (mut ws, _) = tungstenite::connect(format!("ws://{addr}/ws")).expect("upgrade");
    if let tungstenite::stream::MaybeTlsStream::Plain(s) = ws.get_ref() {
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    }
    let cmd = json!({"command": "broadcast", "message": "x".repeat(len), "request_id": "p"});
    ws.send(Message::text(cmd.to_string())).unwrap();
    loop {
        let Message::Text(t) = ws.read().expect("an answer") else {
            continue;
        };
        let v: serde_json::Value = serde_json::from_str(t.as_str()).unwrap();
        if v["request_id"] == "p" {
            return v["event"] == "ack";
        }
    }
}

#[test]
fn flag_beats_env_beats_file_beats_default() {
    let file = SettingsFile::new(
        "precedence",
        "# chatterbox settings\n\nMAX_MESSAGE_CHARS = 5   # the file's\nLOG_LEVEL='warn'\n",
    );
    let path = file.path().to_string();
    let run = |env: &[(&str, &str)], flags: &[&str]| {
        let env: Vec<(String, String)> = env
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        let mut args = vec!["--log-level", "info"];
        args.extend_from_slice(flags);
        spawn_binary(&args, |cmd| {
            cmd.envs(env);
        })
    };
    // The file alone, through CONFIG (LOG_LEVEL from the file loses to the flag above).
    let (mut child, addr) = run(&[("CONFIG", &path)], &[]);
    assert!(accepts(addr, 5) && !accepts(addr, 6), "the file's 5");
    child.kill().unwrap();
    // The environment wins over the file.
    let (mut child, addr) = run(&[("CONFIG", &path), ("MAX_MESSAGE_CHARS", "10")], &[]);
    assert!(
        accepts(addr, 10) && !accepts(addr, 11),
        "the environment's 10"
    );
    child.kill().unwrap();
    // The flag wins over both; --config names the file as well as CONFIG does.
    let (mut child, addr) = run(
        &[("MAX_MESSAGE_CHARS", "10")],
        &["--config", &path, "--max-message-chars", "20"],
    );
    assert!(accepts(addr, 20) && !accepts(addr, 21), "the flag's 20");
    child.kill().unwrap();
    // Nobody sets it: the default.
    let (mut child, addr) = run(&[], &[]);
    assert!(
        accepts(addr, 1000) && !accepts(addr, 1001),
        "the default 1000"
    );
    child.kill().unwrap();
}

#[test]
fn a_bad_settings_file_is_refused_naming_file_and_line() {
    let file = SettingsFile::new("bad", "PORT=0\n\nMAX_ROOMZ=5\n");
    let out = start_fails(&["--config", file.path()], &[]);
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(
        err.contains(&format!("{}:3: unknown setting 'MAX_ROOMZ'", file.path())),
        "{err}"
    );
    let file = SettingsFile::new("garbage", "PORT=0\nthis is not a setting\n");
    let out = start_fails(&[], &[("CONFIG", file.path())]);
    assert!(
        stderr(&out).contains(&format!("{}:2: expected NAME=value", file.path())),
        "{}",
        stderr(&out)
    );
    let out = start_fails(&["--config", "/nonexistent/chatterbox.conf"], &[]);
    assert!(stderr(&out).contains("cannot read '/nonexistent/chatterbox.conf'"));
}

fn open(addr: std::net::SocketAddr, name: &str) -> common::Client {
    let (ws, _) = tungstenite::connect(format!("ws://{addr}/ws?name={name}")).expect("upgrade");
    if let tungstenite::stream::MaybeTlsStream::Plain(s) = ws.get_ref() {
        s.set_read_timeout(Some(Duration::from_millis(20))).unwrap();
    }
    common::Client { ws }
}

/// Reads for about 50 ms, answering pings (tungstenite does) and keeping the events; the
/// close frame's code and reason when the server closed.
fn pump(c: &mut common::Client, events: &mut Vec<serde_json::Value>) -> Option<(u16, String)> {
    let until = Instant::now() + Duration::from_millis(50);
    while Instant::now() < until {
        match c.ws.read() {
            Ok(Message::Close(Some(f))) => return Some((f.code.into(), f.reason.to_string())),
            Ok(Message::Close(None)) => return Some((0, String::new())),
            Ok(Message::Text(t)) => events.push(serde_json::from_str(t.as_str()).unwrap()),
            Ok(_) => {}
            Err(tungstenite::Error::Io(e))
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock
                        | std::io::ErrorKind::TimedOut
                        | std::io::ErrorKind::Interrupted
                ) => {}
            Err(e) => panic!("read failed: {e}"),
        }
    }
    None
}

#[test]
fn a_reader_that_only_answers_pings_is_idle_one_that_pings_is_not() {
    // What the browser page does (a `ping` command every minute while open) keeps a member;
    // answering the server's pings alone does not.
    let server = Running::start(Config {
        db_path: ":memory:".into(),
        idle_timeout: Duration::from_millis(800),
        ping_interval: Duration::from_millis(100),
        pong_timeout: Duration::from_secs(10),
        ..Config::default()
    });
    let mut passive = open(server.addr, "passive");
    let mut page = open(server.addr, "page");
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut events = Vec::new();
    let closed = loop {
        assert!(
            Instant::now() < deadline,
            "the passive reader was never closed"
        );
        page.send(json!({"command": "ping"}));
        assert_eq!(
            pump(&mut page, &mut events),
            None,
            "the pinging page was closed"
        );
        if let Some(close) = pump(&mut passive, &mut Vec::new()) {
            break close;
        }
    };
    assert_eq!(closed, (1000, "idle".to_string()));
    assert!(events.iter().any(|e| e["event"] == "pong"));
    // Past the idle timeout since both connected, the page is still a member.
    page.send(json!({"command": "me", "request_id": "still"}));
    let mut events = Vec::new();
    while !events
        .iter()
        .any(|e: &serde_json::Value| e["request_id"] == "still")
    {
        assert!(Instant::now() < deadline, "no answer to me");
        assert_eq!(pump(&mut page, &mut events), None);
    }
}

#[test]
fn an_idle_timeout_of_zero_is_off() {
    // It used to close everyone at once; now 0 means no idle timeout. A member that sends no
    // command (but answers pings) outlives one the pong timeout closes (it never reads, so
    // never answers a ping).
    let server = Running::start(Config {
        db_path: ":memory:".into(),
        idle_timeout: Duration::ZERO,
        ping_interval: Duration::from_millis(100),
        pong_timeout: Duration::from_millis(600),
        ..Config::default()
    });
    let mut quiet = open(server.addr, "quiet");
    let _deaf = open(server.addr, "deaf");
    let started = Instant::now();
    let deadline = started + Duration::from_secs(20);
    let mut events = Vec::new();
    while !events
        .iter()
        .any(|e: &serde_json::Value| e["left"] == "deaf")
    {
        assert!(
            Instant::now() < deadline,
            "the deaf member was never closed"
        );
        assert_eq!(
            pump(&mut quiet, &mut events),
            None,
            "the quiet member was closed"
        );
    }
    assert!(started.elapsed() >= Duration::from_millis(600));
    quiet.send(json!({"command": "me", "request_id": "q"}));
    while !events.iter().any(|e| e["request_id"] == "q") {
        assert!(Instant::now() < deadline, "no answer to me");
        assert_eq!(pump(&mut quiet, &mut events), None);
    }
}
