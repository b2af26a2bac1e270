//! Connection caps counted from `accept`: one address cannot fill the connection table with
//! request heads before any upgrade.

mod common;

use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::os::fd::FromRawFd;
use std::time::Duration;

use chatterbox::config::Config;
use common::{Running, status, upgrade_request};

/// A TCP connection to `to` from the loopback address `from` (any port).
fn connect_from(from: Ipv4Addr, to: SocketAddr) -> std::io::Result<TcpStream> {
    let SocketAddr::V4(to) = to else {
        panic!("the test server listens on IPv4")
    };
    let sockaddr = |ip: Ipv4Addr, port: u16| libc::sockaddr_in {
        sin_family: libc::AF_INET as libc::sa_family_t,
        sin_port: port.to_be(),
        sin_addr: libc::in_addr {
            s_addr: u32::from(ip).to_be(),
        },
        sin_zero: [0; 8],
    };
    let len = std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t;
    // SAFETY: plain socket calls on a descriptor this function owns until it is wrapped.
    unsafe {
        let fd = libc::socket(libc::AF_INET, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0);
        if fd < 0 {
            return Err(std::io::Error::last_os_error());
        }
        let stream = TcpStream::from_raw_fd(fd);
        let local = sockaddr(from, 0);
        if libc::bind(fd, (&raw const local).cast(), len) != 0 {
            return Err(std::io::Error::last_os_error());
        }
        let remote = sockaddr(*to.ip(), to.port());
        if libc::connect(fd, (&raw const remote).cast(), len) != 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(stream)
    }
}

/// Sends `request` from `from` and reads the answer up to the close (or a 101).
fn request_from(from: Ipv4Addr, to: SocketAddr, request: &str) -> String {
    let mut s = connect_from(from, to).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s.write_all(request.as_bytes()).unwrap();
    let mut out = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        match s.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => out.extend_from_slice(&buf[..n]),
        }
        if out.starts_with(b"HTTP/1.1 101") {
            break;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[test]
fn one_address_cannot_fill_the_table_with_request_heads() {
    let s = Running::start(Config {
        db_path: ":memory:".into(),
        max_connections: 100,
        max_connections_per_ip: 10,
        head_timeout: Duration::from_secs(60),
        ..Config::default()
    });
    let here = Ipv4Addr::new(127, 0, 0, 1);
    let other = Ipv4Addr::new(127, 0, 0, 2);
    // 400 half-open request heads from one address.
    let mut held = Vec::new();
    for _ in 0..400 {
        let mut sock = connect_from(here, s.addr).expect("the listener keeps accepting");
        let _ = sock.write_all(b"GET /ws HTTP/1.1\r\nHost: slow");
        held.push(sock);
    }
    // Another address still gets in, and its requests are answered.
    let up = request_from(other, s.addr, &upgrade_request("/ws?name=elsewhere", ""));
    assert_eq!(status(&up), 101, "{up}");
    let stats = request_from(other, s.addr, "GET /api/stats HTTP/1.1\r\nHost: t\r\n\r\n");
    assert_eq!(status(&stats), 200, "{stats}");
    let body: serde_json::Value =
        serde_json::from_str(stats.split_once("\r\n\r\n").unwrap().1).unwrap();
    // 10 heads, at most 10 refusals still being answered, the member and this request.
    let sockets = body["connections"].as_u64().unwrap();
    assert!(
        sockets <= 22,
        "one address holds too much of the table: {body}"
    );

    // The address over its cap is told so with 429 rather than left waiting.
    let refused = request_from(here, s.addr, "GET /health HTTP/1.1\r\nHost: t\r\n\r\n");
    assert!(
        refused.is_empty() || status(&refused) == 429,
        "over the cap: 429 or closed at once, got {refused:?}"
    );
    drop(held);
    s.stop();
}

#[test]
fn a_socket_over_the_per_address_cap_is_answered_429() {
    let s = Running::start(Config {
        db_path: ":memory:".into(),
        max_connections_per_ip: 3,
        head_timeout: Duration::from_secs(60),
        ..Config::default()
    });
    let here = Ipv4Addr::new(127, 0, 0, 1);
    let held: Vec<_> = (0..3)
        .map(|_| {
            let mut sock = connect_from(here, s.addr).unwrap();
            sock.write_all(b"GET /health HTTP/1.1\r\n").unwrap();
            sock
        })
        .collect();
    // The three heads are still arriving, yet they count: the fourth socket gets 429.
    let r = request_from(here, s.addr, "GET /health HTTP/1.1\r\nHost: t\r\n\r\n");
    assert_eq!(status(&r), 429, "{r}");
    // Finishing a held head is answered normally.
    let mut first = held.into_iter().next().unwrap();
    first
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    first.write_all(b"Host: t\r\n\r\n").unwrap();
    let mut answer = String::new();
    let _ = first.read_to_string(&mut answer);
    assert_eq!(status(&answer), 200, "{answer}");
    s.stop();
}
