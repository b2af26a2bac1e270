//! Accepting after the server ran out of file descriptors: connections that queued meanwhile
//! are taken once descriptors free up, without waiting for another connection to arrive.
//!
//! The server runs as the real binary with a low `RLIMIT_NOFILE`, so only its own descriptors
//! count.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::os::unix::process::CommandExt;
use std::time::Duration;

mod common;

/// Starts the binary with at most `nofile` descriptors; returns it and its address.
fn start_with_nofile(nofile: u64) -> (std::process::Child, SocketAddr) {
    common::spawn_binary(&["--head-timeout", "60"], |cmd| {
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
    })
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
