//! Accepting after the server ran out of file descriptors: connections that queued meanwhile
//! are taken once descriptors free up, without waiting for another connection to arrive.
//!
//! The server runs as the real binary with a low `RLIMIT_NOFILE`, so only its own descriptors
//! count.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::os::unix::process::CommandExt;
use std::process::{Command, Stdio};
use std::time::Duration;

/// Starts the binary with at most `nofile` descriptors; returns it and its address.
fn start_with_nofile(nofile: u64) -> (std::process::Child, SocketAddr) {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_chatterbox"));
    cmd.args([
        "--host",
        "127.0.0.1",
        "--port",
        "0",
        "--db-path",
        ":memory:",
    ])
    .args(["--head-timeout", "60"])
    .stdin(Stdio::null())
    .stdout(Stdio::null())
    .stderr(Stdio::piped());
    // SAFETY: setrlimit is async-signal-safe; nothing else runs between fork and exec.
    unsafe {
        cmd.pre_exec(move || {
            let lim = libc::rlimit {
                rlim_cur: nofile,
                rlim_max: nofile,
            };
            if libc::setrlimit(libc::RLIMIT_NOFILE, &lim) == 0 {
                Ok(())
            } else {
                Err(std::io::Error::last_os_error())
            }
        });
    }
    let mut child = cmd.spawn().expect("the binary starts");
    let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
    let addr = loop {
        let line = lines.next().expect("a log line").unwrap();
        if let Some(a) = line.split("listening on ").nth(1) {
            break a.trim().parse().unwrap();
        }
    };
    // Keep reading the log so the server never blocks on a full pipe.
    std::thread::spawn(move || lines.for_each(drop));
    (child, addr)
}

#[test]
fn connections_queued_while_out_of_descriptors_are_accepted_when_they_free_up() {
    let (mut server, addr) = start_with_nofile(32);
    // More half-open heads than the server has descriptors for: the last ones wait in the
    // kernel's accept queue.
    let mut held = Vec::new();
    for _ in 0..48 {
        let mut s = TcpStream::connect(addr).expect("the kernel queues the connection");
        s.write_all(b"GET /health HTTP/1.1\r\n").unwrap();
        held.push(s);
    }
    // One more, complete, while the server is still out of descriptors.
    let mut probe = TcpStream::connect(addr).unwrap();
    probe
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    probe
        .write_all(b"GET /health HTTP/1.1\r\nHost: t\r\n\r\n")
        .unwrap();
    // Give the server the moment to meet the probe and fail to accept it (without the pause
    // the test can only pass more easily, never fail wrongly).
    std::thread::sleep(Duration::from_millis(300));
    // Descriptors free up; no new connection arrives after this.
    drop(held);
    let mut answer = String::new();
    let r = probe.read_to_string(&mut answer);
    let _ = server.kill();
    let _ = server.wait();
    r.expect("the queued connection is answered (10 s timeout)");
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer:?}");
}
