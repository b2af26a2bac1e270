//! Memory after a mass disconnect: once the last connections are gone the server hands its
//! heap back, without waiting for traffic to resume.
//!
//! The server runs as the real binary, so `/proc/<pid>/status` shows its memory alone.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::process::Child;
use std::time::{Duration, Instant};

mod common;

fn start() -> (Child, SocketAddr) {
    common::spawn_binary(&["--max-connections-per-ip", "10000"], |_| {})
}

/// Resident memory of `pid` in KiB.
fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let line = status.lines().find(|l| l.starts_with("VmRSS:")).unwrap();
    line.split_whitespace().nth(1).unwrap().parse().unwrap()
}

fn members(addr: SocketAddr) -> u64 {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s.write_all(b"GET /api/stats HTTP/1.1\r\nHost: t\r\n\r\n")
        .unwrap();
    let mut r = String::new();
    let _ = s.read_to_string(&mut r);
    let body: serde_json::Value =
        serde_json::from_str(r.split_once("\r\n\r\n").unwrap().1).unwrap();
    body["members"].as_u64().unwrap()
}

/// Polls `f` until it holds; the deadline only turns a hang into a failure.
fn wait_for(what: &str, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while !f() {
        assert!(Instant::now() < deadline, "{what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn memory_falls_back_after_a_mass_disconnect() {
    let (mut server, addr) = start();
    let pid = server.id();
    wait_for("the server answers", || members(addr) == 0);
    let baseline = rss_kib(pid);
    const N: u64 = 3000;
    let mut held = Vec::new();
    let request = "GET /ws HTTP/1.1\r\nHost: t\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n";
    for _ in 0..N {
        let mut s = TcpStream::connect(addr).unwrap();
        s.write_all(request.as_bytes()).unwrap();
        held.push(s);
    }
    wait_for("every client became a member", || members(addr) == N);
    let peak = rss_kib(pid);
    drop(held);
    wait_for("every member left", || members(addr) == 0);
    // The members must have cost enough memory for the fall to be seen, and half of what they
    // took must be given back (without the trim it stays at the peak).
    assert!(
        peak > baseline + 2 * 1024,
        "{N} members took too little memory to test the trim: baseline {baseline}, peak {peak} KiB"
    );
    let bound = baseline + (peak - baseline) / 2;
    let mut last = 0;
    let deadline = Instant::now() + Duration::from_secs(10);
    while Instant::now() < deadline {
        last = rss_kib(pid);
        if last < bound {
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let _ = server.kill();
    let _ = server.wait();
    println!("RSS KiB: baseline {baseline}, peak {peak}, after the disconnect {last}");
    assert!(
        last < bound,
        "RSS {last} KiB after the disconnect; baseline {baseline} KiB, peak {peak} KiB, bound {bound} KiB"
    );
}
