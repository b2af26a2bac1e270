//! The operator's logs (issue 13, section 4), through the real binary: each refusal and each
//! close the server decides is logged once with the address and the reason and counted in
//! `/metrics` by reason; a flood is summed up instead of flooding; `--log-format json` writes
//! one valid JSON object per line whatever clients send; text lines carry a date;
//! `--log-messages false` keeps message text out of the log.

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::process::Child;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::{status, upgrade_request};
use serde_json::{Value, json};
use tungstenite::Message;

/// The binary on a free port, its stderr collected line by line.
struct Logged {
    child: Child,
    addr: SocketAddr,
    lines: Arc<Mutex<Vec<String>>>,
}

impl Logged {
    fn start(args: &[&str]) -> Logged {
        let mut child = common::binary_command(args)
            .spawn()
            .expect("the binary starts");
        let lines = Arc::new(Mutex::new(Vec::new()));
        let sink = lines.clone();
        let stderr = child.stderr.take().unwrap();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines() {
                let Ok(line) = line else { break };
                sink.lock().unwrap().push(line);
            }
        });
        let mut s = Logged {
            child,
            addr: "0.0.0.0:0".parse().unwrap(),
            lines,
        };
        let line = s.wait_line(|l| l.contains("listening on "));
        s.addr = common::listen_addr(&line).expect("an address");
        s
    }

    fn lines(&self) -> Vec<String> {
        self.lines.lock().unwrap().clone()
    }

    /// Waits (at most 20 s, a bound that only turns a hang into a failure) for a line.
    fn wait_line(&self, pred: impl Fn(&str) -> bool) -> String {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Some(l) = self.lines().into_iter().find(|l| pred(l)) {
                return l;
            }
            assert!(
                Instant::now() < deadline,
                "no such line in the log:\n{}",
                self.lines().join("\n")
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Sends a raw request; everything the server sends until it closes.
    fn http(&self, request: &str) -> String {
        let mut s = TcpStream::connect(self.addr).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        s.write_all(request.as_bytes()).unwrap();
        let mut out = Vec::new();
        let _ = s.read_to_end(&mut out);
        String::from_utf8_lossy(&out).into_owned()
    }

    fn metrics(&self) -> String {
        self.http("GET /metrics HTTP/1.1\r\nHost: t\r\n\r\n")
    }

    fn ws(
        &self,
        name: &str,
    ) -> tungstenite::WebSocket<tungstenite::stream::MaybeTlsStream<TcpStream>> {
        let (ws, _) =
            tungstenite::connect(format!("ws://{}/ws?name={name}", self.addr)).expect("upgrade");
        if let tungstenite::stream::MaybeTlsStream::Plain(s) = ws.get_ref() {
            s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        }
        ws
    }
}

impl Drop for Logged {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The value of a Prometheus sample line `name` (labels included), or 0 when absent.
fn sample(metrics: &str, name: &str) -> u64 {
    metrics
        .lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
        .unwrap_or(0)
}

const FOREIGN: &str = "Origin: https://evil.example\r\n";

#[test]
fn a_refusal_is_logged_once_with_address_and_reason_and_counted() {
    let server = Logged::start(&[]);
    let r = server.http(&upgrade_request("/ws", FOREIGN));
    assert_eq!(status(&r), 403);
    // A later refusal of another kind marks the point by which the first's lines are written.
    let r = server.http(&upgrade_request("/ws?name=%ff", ""));
    assert_eq!(status(&r), 400);
    server.wait_line(|l| l.contains("400 bad_request"));
    let lines = server.lines();
    // Matched on the status with its reason: a bare "403" can be part of the listening port.
    let forbidden: Vec<_> = lines
        .iter()
        .filter(|l| l.contains(" 403 forbidden"))
        .collect();
    assert_eq!(forbidden.len(), 1, "once: {lines:#?}");
    assert!(
        forbidden[0].contains("[INFO] refused 127.0.0.1: 403 forbidden: origin not allowed"),
        "{}",
        forbidden[0]
    );
    let m = server.metrics();
    assert_eq!(
        sample(&m, r#"chatterbox_refused_total{reason="forbidden"}"#),
        1,
        "{m}"
    );
    assert_eq!(
        sample(&m, r#"chatterbox_refused_total{reason="bad_request"}"#),
        1
    );
    assert_eq!(
        sample(&m, r#"chatterbox_refused_total{reason="name_taken"}"#),
        0
    );
    assert!(m.contains("chatterbox_refused_total{reason=\"name_taken\"} 0\n"));
    // The health check's answer is no refusal, and a REST 404 neither.
    server.http("GET /health HTTP/1.1\r\nHost: t\r\n\r\n");
    server.http("GET /nowhere HTTP/1.1\r\nHost: t\r\n\r\n");
    let m = server.metrics();
    let refused: u64 = m
        .lines()
        .filter(|l| l.starts_with("chatterbox_refused_total{"))
        .map(|l| l.rsplit(' ').next().unwrap().parse::<u64>().unwrap())
        .sum();
    assert_eq!(refused, 2, "{m}");
}

#[test]
fn a_flood_is_summed_up_not_logged_line_by_line() {
    let server = Logged::start(&["--log-summary-window", "1"]);
    const N: usize = 300;
    for _ in 0..N {
        assert_eq!(status(&server.http(&upgrade_request("/ws", FOREIGN))), 403);
    }
    // Every one is counted; the log holds a few lines and the rest in summaries.
    let m = server.metrics();
    assert_eq!(
        sample(&m, r#"chatterbox_refused_total{reason="forbidden"}"#),
        N as u64
    );
    let summed = |lines: &[String]| -> (usize, u64) {
        let single = lines
            .iter()
            .filter(|l| l.contains("refused 127.0.0.1: 403 forbidden"))
            .count();
        let more: u64 = lines
            .iter()
            .filter(|l| l.ends_with("refused 403 forbidden"))
            .map(|l| {
                let n = l
                    .split("… and ")
                    .nth(1)
                    .unwrap()
                    .split(" more")
                    .next()
                    .unwrap();
                assert!(l.contains(" more from 127.0.0.1 in 1 s: "), "{l}");
                n.replace(',', "").parse::<u64>().unwrap()
            })
            .sum();
        (single, more)
    };
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let (single, more) = summed(&server.lines());
        if single as u64 + more == N as u64 {
            // One line per window at most; the flood takes a few windows at the very most.
            assert!(single <= 10, "{single} single lines for {N} refusals");
            break;
        }
        assert!(
            Instant::now() < deadline,
            "{single} lines + {more} summed up != {N}:\n{}",
            server.lines().join("\n")
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn closes_the_server_decides_are_logged_and_counted_by_reason() {
    let server = Logged::start(&[
        "--idle-timeout",
        "0.3",
        "--rate-per-sec",
        "1",
        "--rate-burst",
        "1",
        "--flood-close-after",
        "2",
    ]);
    let mut idle = server.ws("sleepy");
    let code = loop {
        match idle.read() {
            Ok(Message::Close(c)) => break c.map(|c| u16::from(c.code)),
            Ok(_) => {}
            Err(e) => panic!("{e}"),
        }
    };
    assert_eq!(code, Some(1000));
    let line = server.wait_line(|l| l.contains("closed 127.0.0.1: 1000 idle"));
    assert!(line.contains("[INFO]"), "{line}");
    let mut flood = server.ws("flood");
    for _ in 0..10 {
        if flood
            .send(Message::text(json!({"command": "ping"}).to_string()))
            .is_err()
        {
            break;
        }
    }
    let line = server.wait_line(|l| l.contains("closed 127.0.0.1: 1008 rate_limited"));
    assert!(line.contains("[WARN]"), "{line}");
    let m = server.metrics();
    assert_eq!(
        sample(&m, r#"chatterbox_closed_total{reason="idle"}"#),
        1,
        "{m}"
    );
    assert_eq!(
        sample(&m, r#"chatterbox_closed_total{reason="rate_limited"}"#),
        1
    );
    assert_eq!(
        sample(&m, r#"chatterbox_closed_total{reason="slow_consumer"}"#),
        0
    );
}

#[test]
fn a_client_that_never_answers_pings_is_logged_as_a_pong_timeout() {
    let server = Logged::start(&["--ping-interval", "0.1", "--pong-timeout", "0.3"]);
    // A raw upgrade that then reads nothing, so never answers a ping.
    let mut deaf = TcpStream::connect(server.addr).unwrap();
    deaf.write_all(upgrade_request("/ws?name=deaf", "").as_bytes())
        .unwrap();
    let line = server.wait_line(|l| l.contains("closed 127.0.0.1: 1000 pong_timeout"));
    assert!(line.contains("[INFO]"), "{line}");
    let m = server.metrics();
    assert_eq!(
        sample(&m, r#"chatterbox_closed_total{reason="pong_timeout"}"#),
        1,
        "{m}"
    );
    assert_eq!(sample(&m, r#"chatterbox_closed_total{reason="idle"}"#), 0);
    drop(deaf);
}

/// `2026-12-02T01:05:34.123Z`.
fn is_rfc3339_utc(ts: &str) -> bool {
    let b = ts.as_bytes();
    b.len() == 24
        && ts.ends_with('Z')
        && [4, 7].iter().all(|&i| b[i] == b'-')
        && b[10] == b'T'
        && [13, 16].iter().all(|&i| b[i] == b':')
        && b[19] == b'.'
        && b.iter()
            .enumerate()
            .all(|(i, c)| [4, 7, 10, 13, 16, 19, 23].contains(&i) || c.is_ascii_digit())
}

#[test]
fn text_lines_carry_a_date() {
    let server = Logged::start(&[]);
    let line = server
        .lines()
        .into_iter()
        .find(|l| l.contains("listening on"))
        .unwrap();
    let (ts, rest) = line.split_once(' ').unwrap();
    assert!(is_rfc3339_utc(ts), "{line}");
    assert!(rest.starts_with("[INFO] "), "{line}");
}

#[test]
fn json_lines_are_valid_whatever_clients_send_and_keep_the_contract_lines() {
    let server = Logged::start(&["--log-format", "json", "--log-level", "debug"]);
    let mut alice = server.ws("alice");
    let hostile = "a\"b\\c\n{\"level\":\"error\"}\u{1b}[31m\u{0}\u{7f}\u{2028}\u{202e}é📤\r\n";
    for text in [hostile, "Hello world!"] {
        let cmd = json!({"command": "broadcast", "message": text, "request_id": "b"});
        alice.send(Message::text(cmd.to_string())).unwrap();
        loop {
            let Message::Text(t) = alice.read().unwrap() else {
                continue;
            };
            if t.as_str().contains(r#""request_id":"b""#) {
                break;
            }
        }
    }
    // Hostile header values and names in refusals, too.
    let bad = upgrade_request("/ws?name=%1b%5b2J%22x", "Origin: https://a\u{1b}\"\r\n");
    server.http(&bad);
    server.http(&upgrade_request("/ws?name=bad%22name%0a", ""));
    alice.close(None).unwrap();
    let _ = alice.read();
    server.wait_line(|l| l.contains("Member alice disconnected"));
    let lines = server.lines();
    let mut msgs = Vec::new();
    for line in &lines {
        let v: Value = serde_json::from_str(line).unwrap_or_else(|e| panic!("{e}: {line:?}"));
        let obj = v.as_object().expect("an object");
        assert!(is_rfc3339_utc(obj["ts"].as_str().unwrap()), "{line}");
        assert!(
            ["error", "warn", "info", "debug", "trace"].contains(&obj["level"].as_str().unwrap())
        );
        assert!(
            !line.chars().any(|c| c.is_control()),
            "raw control: {line:?}"
        );
        msgs.push(obj["msg"].as_str().unwrap().to_string());
    }
    for contract in [
        "🔌 Member alice connected",
        "📤 Broadcast from alice: Hello world!",
        "🔌 Member alice disconnected",
    ] {
        assert!(msgs.iter().any(|m| m == contract), "{contract}: {msgs:#?}");
    }
    // The hostile message is there, escaped as in text logs.
    let escaped = chatterbox::log_safe(hostile).to_string();
    assert!(
        msgs.contains(&format!("📤 Broadcast from alice: {escaped}")),
        "{msgs:#?}"
    );
    // A refusal carries its fields.
    let refusal = lines
        .iter()
        .map(|l| serde_json::from_str::<Value>(l).unwrap())
        .find(|v| v["reason"] == "bad_request")
        .expect("a refusal line");
    assert_eq!(refusal["addr"], "127.0.0.1");
    assert_eq!(refusal["status"], 400);
    assert_eq!(refusal["level"], "info");
}

#[test]
fn log_messages_false_logs_who_but_not_what() {
    let server = Logged::start(&["--log-messages", "false"]);
    let mut bob = server.ws("bob");
    let cmd = json!({"command": "broadcast", "message": "secret plans", "request_id": "s"});
    bob.send(Message::text(cmd.to_string())).unwrap();
    loop {
        let Message::Text(t) = bob.read().unwrap() else {
            continue;
        };
        if t.as_str().contains(r#""event":"ack""#) {
            break;
        }
    }
    let line = server.wait_line(|l| l.contains("Broadcast from bob"));
    assert!(line.ends_with("[INFO] 📤 Broadcast from bob"), "{line}");
    bob.close(None).unwrap();
    let _ = bob.read();
    server.wait_line(|l| l.contains("Member bob disconnected"));
    assert!(!server.lines().iter().any(|l| l.contains("secret")));
}
