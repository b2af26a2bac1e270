//! The transport against hostile clients: control frames against the output bound, floods of
//! empty continuation frames against the read budget and the fragment cap, and one address
//! against the connection table.

mod common;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use chatterbox::config::Config;
use common::{Running, status, upgrade_request};
use serde_json::json;

/// A masked client frame (mask key 0, so the payload goes as is).
fn frame(fin: bool, opcode: u8, payload: &[u8]) -> Vec<u8> {
    assert!(payload.len() < 126);
    let mut f = vec![
        (u8::from(fin) << 7) | opcode,
        0x80 | payload.len() as u8,
        0,
        0,
        0,
        0,
    ];
    f.extend_from_slice(payload);
    f
}

/// A raw socket past the upgrade (the 101 and the welcome are not read).
fn raw_member(addr: SocketAddr, name: &str) -> TcpStream {
    let s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s.set_write_timeout(Some(Duration::from_secs(10))).unwrap();
    (&s).write_all(upgrade_request(&format!("/ws?name={name}"), "").as_bytes())
        .unwrap();
    s
}

/// Reads frames from a raw socket until a close frame; returns its code.
fn read_close_code(s: &mut TcpStream) -> Option<u16> {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    // Skip the 101 head.
    loop {
        if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            buf.drain(..end + 4);
            break;
        }
        match s.read(&mut chunk) {
            Ok(0) | Err(_) => return None,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
        }
    }
    loop {
        // Parse whole server frames (unmasked) off the front.
        while buf.len() >= 2 {
            let (op, len7) = (buf[0] & 0x0f, (buf[1] & 0x7f) as usize);
            let (hdr, len) = match len7 {
                126 if buf.len() >= 4 => (4, u16::from_be_bytes([buf[2], buf[3]]) as usize),
                127 if buf.len() >= 10 => (
                    10,
                    u64::from_be_bytes(buf[2..10].try_into().unwrap()) as usize,
                ),
                126 | 127 => break,
                n => (2, n),
            };
            if buf.len() < hdr + len {
                break;
            }
            if op == 8 {
                return (len >= 2).then(|| u16::from_be_bytes([buf[hdr], buf[hdr + 1]]));
            }
            buf.drain(..hdr + len);
        }
        match s.read(&mut chunk) {
            Ok(0) | Err(_) => return None,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
        }
    }
}

#[test]
fn pongs_count_against_the_output_bound() {
    let s = Running::start(Config {
        db_path: ":memory:".into(),
        max_pending_output: 64 * 1024,
        // Far less than the bound per turn: only pongs that pile up unread can pass it.
        read_budget_bytes: 4096,
        ..Config::default()
    });
    // Pings as fast as possible, never a read: the pongs pile up on the server.
    let flooder = raw_member(s.addr, "pinger");
    let mut burst = Vec::new();
    for _ in 0..512 {
        burst.extend(frame(true, 0x9, &[b'p'; 125]));
    }
    let mut sent = 0usize;
    // 128 MiB is far beyond kernel buffers and the bound; the server must cut it off first.
    // (The deadline only ends the test if it does not.)
    let give_up = Instant::now() + Duration::from_secs(60);
    while sent < 128 << 20 && Instant::now() < give_up {
        match (&flooder).write_all(&burst) {
            Ok(()) => sent += burst.len(),
            Err(_) => break,
        }
    }
    assert!(
        sent < 128 << 20 && Instant::now() < give_up,
        "the server took 128 MiB of pings from a client that never reads"
    );
    let stats = s.get_json("/api/stats");
    assert_eq!(stats["slow_consumers_closed"], 1, "{stats}");
    drop(flooder);
    s.stop();
}

#[test]
fn a_close_frame_the_client_never_takes_is_counted() {
    let s = Running::start(Config {
        db_path: ":memory:".into(),
        max_pending_output: 16 * 1024,
        read_budget_bytes: 4096,
        ..Config::default()
    });
    // A client that never reads is closed as a slow consumer; its close frame stays queued.
    // A small receive buffer keeps the kernel from taking it in on the client's behalf.
    let flooder = raw_member(s.addr, "pinger");
    let size: libc::c_int = 4096;
    // SAFETY: setsockopt reads `size` for the duration of the call on a socket we own.
    let set = unsafe {
        libc::setsockopt(
            std::os::fd::AsRawFd::as_raw_fd(&flooder),
            libc::SOL_SOCKET,
            libc::SO_RCVBUF,
            (&raw const size).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    assert_eq!(set, 0);
    let mut burst = Vec::new();
    for _ in 0..512 {
        burst.extend(frame(true, 0x9, &[b'p'; 125]));
    }
    while (&flooder).write_all(&burst).is_ok() {}
    // The socket is dropped at the end of the grace time (2 s); the deadline only turns a
    // missing count into a failure.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let stats = s.get_json("/api/stats");
        if stats["close_frames_lost"] == 1 {
            break;
        }
        assert!(Instant::now() < deadline, "never counted: {stats}");
        thread::sleep(Duration::from_millis(100));
    }
    let metrics = s.http("GET /metrics HTTP/1.1\r\nHost: t\r\n\r\n");
    assert!(
        metrics.contains("chatterbox_close_frames_lost_total 1"),
        "{metrics}"
    );
    drop(flooder);
    s.stop();
}

#[test]
fn a_flood_of_empty_continuations_does_not_hold_the_loop() {
    let s = Running::start(Config {
        db_path: ":memory:".into(),
        // No fragment cap here: the read budget alone must keep the loop turning.
        max_fragments: usize::MAX,
        ..Config::default()
    });
    let mut other = s.client("other");
    let flooder = raw_member(s.addr, "flooder");
    let stop = Arc::new(AtomicBool::new(false));
    let stop_flood = stop.clone();
    let written = Arc::new(AtomicUsize::new(0));
    let written_flood = written.clone();
    let flood = thread::spawn(move || {
        (&flooder).write_all(&frame(false, 0x1, b"x")).unwrap();
        let mut burst = Vec::new();
        for _ in 0..10_000 {
            burst.extend(frame(false, 0x0, b""));
        }
        let give_up = Instant::now() + Duration::from_secs(30);
        while !stop_flood.load(Ordering::SeqCst) && Instant::now() < give_up {
            if (&flooder).write_all(&burst).is_err() {
                break;
            }
            written_flood.fetch_add(burst.len(), Ordering::SeqCst);
        }
    });
    // While it streams, another member and a new HTTP client are served (timeouts only turn a
    // held loop into a failure).
    thread::sleep(Duration::from_millis(200));
    let served = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        other.send(json!({"command":"ping","request_id":"p"}));
        let pong = other.until(|e| e["event"] == "pong");
        assert_eq!(pong["request_id"], "p");
        s.http("GET /health HTTP/1.1\r\nHost: t\r\n\r\n")
    }));
    // The flood was still going when the others were served: it goes on after them (within
    // a bound: a debug build drains it in bursts), and the server had by then taken far more
    // than one turn's read budget (64 KiB) of it.
    let before = written.load(Ordering::SeqCst);
    let until = Instant::now() + Duration::from_secs(5);
    while written.load(Ordering::SeqCst) == before && Instant::now() < until {
        thread::sleep(Duration::from_millis(20));
    }
    let during = written.load(Ordering::SeqCst);
    stop.store(true, Ordering::SeqCst);
    flood.join().unwrap();
    let health = served.expect("another member and /health are served during the flood");
    assert!(
        during > before,
        "the flood had stopped before the others were served: {before} then {during}"
    );
    assert!(
        before > 1 << 20,
        "only {before} bytes of flood were taken: the loop was not under it"
    );
    assert_eq!(status(&health), 200, "{health}");
    s.stop();
}

#[test]
fn a_message_of_too_many_fragments_is_closed_with_1008() {
    let s = Running::start(Config {
        db_path: ":memory:".into(),
        max_fragments: 4,
        ..Config::default()
    });
    // Four fragments are a message.
    let mut ok = raw_member(s.addr, "four");
    let cmd = br#"{"command":"ping","request_id":"4"}"#;
    let mut bytes = frame(false, 0x1, &cmd[..5]);
    bytes.extend(frame(false, 0x0, &cmd[5..10]));
    bytes.extend(frame(true, 0x9, b"a ping between fragments"));
    bytes.extend(frame(false, 0x0, &cmd[10..]));
    bytes.extend(frame(true, 0x0, b""));
    ok.write_all(&bytes).unwrap();
    let mut seen = Vec::new();
    let mut chunk = [0u8; 4096];
    while !String::from_utf8_lossy(&seen).contains(r#""request_id":"4""#) {
        let n = ok.read(&mut chunk).expect("the pong event");
        assert!(n > 0, "closed: {}", String::from_utf8_lossy(&seen));
        seen.extend_from_slice(&chunk[..n]);
    }
    // A fifth fragment is one too many, however empty.
    let mut flood = raw_member(s.addr, "five");
    let mut bytes = frame(false, 0x1, b"{");
    for _ in 0..4 {
        bytes.extend(frame(false, 0x0, b""));
    }
    flood.write_all(&bytes).unwrap();
    assert_eq!(read_close_code(&mut flood), Some(1008));
    assert_eq!(s.get_json("/api/members"), json!(["four"]));
    s.stop();
}

#[test]
fn the_new_limits_are_range_checked_at_start() {
    use chatterbox::config::Cli;
    let run = |args: &[&str]| {
        Config::from_args(args.iter().map(|a| a.to_string()), |_| None).map(|c| match c {
            Cli::Run(c) => (c.read_budget_bytes, c.max_fragments),
            Cli::Print(_) => unreachable!(),
        })
    };
    assert_eq!(run(&[]), Ok((64 * 1024, 256)));
    assert_eq!(
        run(&["--read-budget-bytes", "512", "--max-fragments", "1"]),
        Ok((512, 1))
    );
    for bad in [
        ["--read-budget-bytes", "511"],
        ["--read-budget-bytes", "67108865"],
        ["--max-fragments", "0"],
    ] {
        let e = run(&bad).unwrap_err();
        assert!(e.contains(bad[0]), "{e}");
    }
    let help = Config::help();
    assert!(help.contains("--read-budget-bytes") && help.contains("MAX_FRAGMENTS"));
}
