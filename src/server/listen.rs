//! The listening socket, made with the socket calls themselves: `SO_REUSEPORT`
//! (`--reuse-port`) must be set between `socket` and `bind`, which neither `std` nor `mio`
//! offers, and `listen` gets the queue `--listen-backlog` asks for at once.

use std::io;
use std::net::SocketAddr;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

use mio::net::TcpListener;

use super::os_text;
use crate::config::Config;

/// A non-blocking listener on `addr` (IPv4 or IPv6) with `SO_REUSEADDR`, plus `SO_REUSEPORT`
/// when `cfg.reuse_port` (several processes then share the port and the kernel spreads the
/// connections over them), listening with a queue of `cfg.listen_backlog` (the kernel caps it
/// at `net.core.somaxconn`). The error names the address: `cannot listen on ADDR: address
/// already in use`.
pub(super) fn listen(addr: SocketAddr, cfg: &Config) -> io::Result<TcpListener> {
    let named = |e: io::Error| {
        io::Error::new(
            e.kind(),
            format!("cannot listen on {addr}: {}", os_text(&e)),
        )
    };
    let fd = socket(addr).map_err(named)?;
    set_flag(&fd, libc::SO_REUSEADDR).map_err(named)?;
    if cfg.reuse_port {
        set_flag(&fd, libc::SO_REUSEPORT).map_err(named)?;
    }
    bind(&fd, addr).map_err(named)?;
    let backlog = i32::try_from(cfg.listen_backlog).unwrap_or(i32::MAX);
    // SAFETY: `listen` only reads its arguments; `fd` is an open socket owned here.
    check(unsafe { libc::listen(fd.as_raw_fd(), backlog) }).map_err(named)?;
    let listener = std::net::TcpListener::from(fd);
    listener.set_nonblocking(true).map_err(named)?;
    Ok(TcpListener::from_std(listener))
}

/// A new TCP socket of `addr`'s family, closed on `exec` (a worker's listener never leaks into
/// a process it starts).
fn socket(addr: SocketAddr) -> io::Result<OwnedFd> {
    let family = match addr {
        SocketAddr::V4(_) => libc::AF_INET,
        SocketAddr::V6(_) => libc::AF_INET6,
    };
    #[cfg(any(target_os = "linux", target_os = "android"))]
    let kind = libc::SOCK_STREAM | libc::SOCK_CLOEXEC;
    #[cfg(not(any(target_os = "linux", target_os = "android")))]
    let kind = libc::SOCK_STREAM;
    // SAFETY: `socket` only reads its arguments.
    let raw = unsafe { libc::socket(family, kind, 0) };
    check(raw)?;
    // SAFETY: `raw` is a descriptor just returned by `socket`, owned by nobody else.
    let fd = unsafe { OwnedFd::from_raw_fd(raw) };
    #[cfg(not(any(target_os = "linux", target_os = "android")))]
    // SAFETY: `fcntl` with F_SETFD only sets the descriptor's flags.
    check(unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_SETFD, libc::FD_CLOEXEC) })?;
    Ok(fd)
}

/// Turns the boolean socket option `option` (at `SOL_SOCKET`) on.
fn set_flag(fd: &OwnedFd, option: libc::c_int) -> io::Result<()> {
    let on: libc::c_int = 1;
    // SAFETY: the value points to a live `c_int` and its size is passed with it.
    check(unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            libc::SOL_SOCKET,
            option,
            (&on as *const libc::c_int).cast(),
            size_of::<libc::c_int>() as libc::socklen_t,
        )
    })
}

/// Binds `fd` to `addr`, written out as the kernel's `sockaddr_in` / `sockaddr_in6`.
fn bind(fd: &OwnedFd, addr: SocketAddr) -> io::Result<()> {
    // SAFETY: an all-zero `sockaddr_storage` is valid (it is plain bytes); it is large and
    // aligned enough for either address type written into it below.
    let mut storage: libc::sockaddr_storage = unsafe { std::mem::zeroed() };
    let len = match addr {
        SocketAddr::V4(a) => {
            // SAFETY: as above, all zeros is a valid `sockaddr_in`.
            let mut sin: libc::sockaddr_in = unsafe { std::mem::zeroed() };
            sin.sin_family = libc::AF_INET as libc::sa_family_t;
            sin.sin_port = a.port().to_be();
            sin.sin_addr = libc::in_addr {
                s_addr: u32::from_ne_bytes(a.ip().octets()),
            };
            // SAFETY: `sockaddr_storage` holds any socket address, so the write fits.
            unsafe { std::ptr::write((&raw mut storage).cast(), sin) };
            size_of::<libc::sockaddr_in>()
        }
        SocketAddr::V6(a) => {
            // SAFETY: as above, all zeros is a valid `sockaddr_in6`.
            let mut sin6: libc::sockaddr_in6 = unsafe { std::mem::zeroed() };
            sin6.sin6_family = libc::AF_INET6 as libc::sa_family_t;
            sin6.sin6_port = a.port().to_be();
            sin6.sin6_addr = libc::in6_addr {
                s6_addr: a.ip().octets(),
            };
            sin6.sin6_flowinfo = a.flowinfo();
            sin6.sin6_scope_id = a.scope_id();
            // SAFETY: as for IPv4.
            unsafe { std::ptr::write((&raw mut storage).cast(), sin6) };
            size_of::<libc::sockaddr_in6>()
        }
    };
    // SAFETY: `storage` holds an address of `len` bytes; `bind` only reads it.
    check(unsafe {
        libc::bind(
            fd.as_raw_fd(),
            (&raw const storage).cast(),
            len as libc::socklen_t,
        )
    })
}

/// A libc return value as a result: `-1` is the error in `errno`.
fn check(ret: libc::c_int) -> io::Result<()> {
    if ret == -1 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::net::{Ipv4Addr, Ipv6Addr, TcpStream};

    use super::*;

    fn cfg(reuse_port: bool) -> Config {
        Config {
            reuse_port,
            ..Config::default()
        }
    }

    #[test]
    fn two_listeners_share_a_port_only_with_reuse_port() {
        let first = listen((Ipv4Addr::LOCALHOST, 0).into(), &cfg(true)).unwrap();
        let addr = first.local_addr().unwrap();
        let second = listen(addr, &cfg(true)).expect("SO_REUSEPORT on both: the port is shared");
        assert_eq!(second.local_addr().unwrap(), addr);
        let refused = listen(addr, &cfg(false)).map(drop).unwrap_err();
        assert_eq!(refused.kind(), io::ErrorKind::AddrInUse);
        assert_eq!(
            refused.to_string(),
            format!("cannot listen on {addr}: address already in use")
        );
    }

    #[test]
    fn without_reuse_port_a_port_is_taken_once() {
        let first = listen((Ipv4Addr::LOCALHOST, 0).into(), &cfg(false)).unwrap();
        let addr = first.local_addr().unwrap();
        // A listener without the flag keeps the port to itself, whatever the second asks.
        for reuse in [false, true] {
            let e = listen(addr, &cfg(reuse)).map(drop).unwrap_err();
            assert_eq!(e.kind(), io::ErrorKind::AddrInUse, "reuse_port {reuse}");
        }
    }

    #[test]
    fn the_listener_accepts_and_does_not_block() {
        let l = listen((Ipv4Addr::LOCALHOST, 0).into(), &cfg(true)).unwrap();
        let e = l.accept().map(drop).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::WouldBlock);
        let client = TcpStream::connect(l.local_addr().unwrap()).unwrap();
        let accepted = loop {
            match l.accept() {
                Ok((_, peer)) => break peer,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    std::thread::sleep(std::time::Duration::from_millis(5))
                }
                Err(e) => panic!("{e}"),
            }
        };
        assert_eq!(accepted, client.local_addr().unwrap());
    }

    #[test]
    fn ipv6_addresses_are_bound_as_ipv6() {
        match listen((Ipv6Addr::LOCALHOST, 0).into(), &cfg(true)) {
            Ok(l) => {
                let addr = l.local_addr().unwrap();
                assert!(addr.is_ipv6() && addr.port() != 0, "{addr}");
                TcpStream::connect(addr).expect("a connection to [::1]");
            }
            // A machine without IPv6 on loopback: the error still names the address.
            Err(e) => assert!(e.to_string().starts_with("cannot listen on [::1]:0"), "{e}"),
        }
    }
}
