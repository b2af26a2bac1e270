//! WebSocket client transport: many non-blocking connections on one mio `Poll`, one shared
//! 64 KiB read buffer, a minimal RFC 6455 client codec, and a timerfd for the send schedule.
//!
//! Reading is the hot path. A readable connection is read in big chunks into the shared
//! buffer and every complete frame in the chunk is handed to the scenario; only the partial
//! frame at the end is kept (`carry`), so the cost per frame is a header parse and a callback.

use std::io::{self, Read, Write};
use std::net::{Ipv4Addr, SocketAddrV4};
use std::os::fd::{FromRawFd, RawFd};
use std::time::Duration;

use mio::net::TcpStream;
use mio::unix::SourceFd;
use mio::{Events, Interest, Poll, Token};

use crate::clock::mono_ns;

const TIMER: Token = Token(usize::MAX - 1);
const READ_CHUNK: usize = 64 * 1024;
const MAX_FRAME: u64 = 64 * 1024 * 1024;
const MAX_RESPONSE_HEAD: usize = 16 * 1024;

/// A connection's socket: plain TCP, or TLS over it (`--tls-ca`).
enum Stream {
    Plain(TcpStream),
    Tls(Box<crate::tls::TlsConn>),
}

impl Stream {
    fn tcp(&self) -> &TcpStream {
        match self {
            Stream::Plain(s) => s,
            Stream::Tls(t) => &t.tcp,
        }
    }

    fn tcp_mut(&mut self) -> &mut TcpStream {
        match self {
            Stream::Plain(s) => s,
            Stream::Tls(t) => &mut t.tcp,
        }
    }

    fn is_tls(&self) -> bool {
        matches!(self, Stream::Tls(_))
    }
}

impl Read for Stream {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Stream::Plain(s) => s.read(buf),
            Stream::Tls(t) => t.read(buf),
        }
    }
}

impl Write for Stream {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Stream::Plain(s) => s.write(buf),
            Stream::Tls(t) => t.write(buf),
        }
    }
    fn flush(&mut self) -> io::Result<()> {
        match self {
            Stream::Plain(_) => Ok(()),
            Stream::Tls(t) => t.flush(),
        }
    }
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum State {
    Connecting,
    Handshake,
    Open,
    Closed,
}

/// What the transport tells the scenario about one connection.
pub enum Ev<'a> {
    /// `101 Switching Protocols` arrived; frames may follow in the same read.
    Opened,
    /// A complete text (or binary) message.
    Text(&'a [u8]),
    /// The connection never opened: connect error, non-101 status, bad response.
    Failed(String),
    /// An open connection ended (close frame from the server, EOF, reset).
    Closed { code: Option<u16> },
}

pub struct Conn<U> {
    /// Global connection index across all worker processes.
    pub idx: u32,
    /// Which of the server addresses it went to (an index into `Net`'s targets).
    pub target: usize,
    pub state: State,
    pub user: U,
    /// When `connect()` was issued and when the 101 response was read (mono ns).
    pub t_start: u64,
    pub t_open: u64,
    stream: Stream,
    out: Vec<u8>,
    out_pos: usize,
    carry: Vec<u8>,
    frag: Option<Vec<u8>>,
    mask: u32,
    sent_close: bool,
}

impl<U> Conn<U> {
    /// Queues one masked text frame and writes as much as the socket takes.
    pub fn send_text(&mut self, payload: &[u8]) {
        self.send_frame(0x1, payload);
    }

    fn send_frame(&mut self, opcode: u8, payload: &[u8]) {
        if self.state == State::Closed {
            return;
        }
        // xorshift: a different mask per frame, as a browser would do.
        self.mask ^= self.mask << 13;
        self.mask ^= self.mask >> 17;
        self.mask ^= self.mask << 5;
        encode_frame(&mut self.out, opcode, payload, self.mask.to_be_bytes());
        if self.state == State::Open {
            let _ = self.flush();
        }
    }

    /// Bytes queued but not yet accepted by the kernel.
    pub fn pending(&self) -> usize {
        self.out.len() - self.out_pos
    }

    fn flush(&mut self) -> io::Result<()> {
        while self.out_pos < self.out.len() {
            match self.stream.write(&self.out[self.out_pos..]) {
                Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(n) => self.out_pos += n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        match self.stream.flush() {
            Err(e) if e.kind() != io::ErrorKind::WouldBlock => return Err(e),
            _ => {}
        }
        if self.out_pos == self.out.len() {
            self.out.clear();
            self.out_pos = 0;
        } else if self.out_pos > 64 * 1024 {
            self.out.drain(..self.out_pos);
            self.out_pos = 0;
        }
        Ok(())
    }
}

pub fn encode_frame(out: &mut Vec<u8>, opcode: u8, payload: &[u8], mask: [u8; 4]) {
    out.push(0x80 | opcode);
    let n = payload.len();
    if n < 126 {
        out.push(0x80 | n as u8);
    } else if n < 65536 {
        out.push(0x80 | 126);
        out.extend_from_slice(&(n as u16).to_be_bytes());
    } else {
        out.push(0x80 | 127);
        out.extend_from_slice(&(n as u64).to_be_bytes());
    }
    out.extend_from_slice(&mask);
    let start = out.len();
    out.extend_from_slice(payload);
    for (i, b) in out[start..].iter_mut().enumerate() {
        *b ^= mask[i & 3];
    }
}

/// Transport-level counters (for the generator's own health report).
#[derive(Default, Clone, Copy)]
pub struct NetCounters {
    pub reads: u64,
    pub bytes_in: u64,
    pub frames_in: u64,
    /// Longest time spent handling one batch of readiness events (ns): the loop's own lag.
    pub max_batch_ns: u64,
}

/// A timerfd on CLOCK_MONOTONIC, so the loop wakes for the next scheduled send with
/// microsecond precision instead of epoll's millisecond timeout.
struct Timer {
    fd: RawFd,
    armed: u64,
}

impl Timer {
    fn new(poll: &Poll) -> io::Result<Timer> {
        // SAFETY: plain syscall; the result is checked.
        let fd = unsafe {
            libc::timerfd_create(
                libc::CLOCK_MONOTONIC,
                libc::TFD_NONBLOCK | libc::TFD_CLOEXEC,
            )
        };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        poll.registry()
            .register(&mut SourceFd(&fd), TIMER, Interest::READABLE)?;
        Ok(Timer { fd, armed: 0 })
    }

    fn arm(&mut self, deadline_ns: u64) {
        let deadline_ns = deadline_ns.max(1);
        if deadline_ns == self.armed {
            return;
        }
        self.armed = deadline_ns;
        let spec = libc::itimerspec {
            it_interval: libc::timespec {
                tv_sec: 0,
                tv_nsec: 0,
            },
            it_value: libc::timespec {
                tv_sec: (deadline_ns / 1_000_000_000) as libc::time_t,
                tv_nsec: (deadline_ns % 1_000_000_000) as libc::c_long,
            },
        };
        // SAFETY: fd is our timerfd; spec is a valid itimerspec.
        unsafe {
            libc::timerfd_settime(
                self.fd,
                libc::TFD_TIMER_ABSTIME,
                &spec,
                std::ptr::null_mut(),
            )
        };
    }

    fn fired(&mut self) {
        let mut b = [0u8; 8];
        // SAFETY: reads at most 8 bytes into `b`.
        unsafe { libc::read(self.fd, b.as_mut_ptr().cast(), 8) };
        self.armed = 0;
    }
}

impl Drop for Timer {
    fn drop(&mut self) {
        // SAFETY: we own the fd.
        unsafe { libc::close(self.fd) };
    }
}

pub struct Net<U> {
    poll: Poll,
    events: Events,
    conns: Vec<Option<Conn<U>>>,
    free: Vec<usize>,
    buf: Vec<u8>,
    /// The server addresses (one server, or the nodes of a cluster) and their `Host` headers.
    targets: Vec<SocketAddrV4>,
    hosts: Vec<String>,
    srcs: Vec<Ipv4Addr>,
    timer: Timer,
    /// Readiness from the last `epoll_wait` not handled yet because a send was due:
    /// edge-triggered events cannot be asked for again, so they wait here.
    backlog: Vec<(usize, bool, bool)>,
    backlog_pos: usize,
    pub counters: NetCounters,
    live: usize,
}

impl<U> Net<U> {
    /// `targets` must not be empty: connection `idx` goes to `targets[idx % len]` (see
    /// [`Net::connect`]).
    pub fn new(targets: Vec<SocketAddrV4>, srcs: Vec<Ipv4Addr>) -> io::Result<Net<U>> {
        if targets.is_empty() {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "no server address",
            ));
        }
        let poll = Poll::new()?;
        let timer = Timer::new(&poll)?;
        Ok(Net {
            poll,
            events: Events::with_capacity(4096),
            conns: Vec::new(),
            free: Vec::new(),
            buf: vec![0; READ_CHUNK],
            hosts: targets.iter().map(|t| t.to_string()).collect(),
            targets,
            srcs,
            timer,
            backlog: Vec::new(),
            backlog_pos: 0,
            counters: NetCounters::default(),
            live: 0,
        })
    }

    /// Connections not yet closed or failed.
    pub fn live(&self) -> usize {
        self.live
    }

    pub fn get_mut(&mut self, slot: usize) -> Option<&mut Conn<U>> {
        self.conns.get_mut(slot).and_then(|c| c.as_mut())
    }

    pub fn for_each_mut(&mut self, mut f: impl FnMut(usize, &mut Conn<U>)) {
        for (slot, c) in self.conns.iter_mut().enumerate() {
            if let Some(c) = c {
                f(slot, c);
            }
        }
    }

    /// How many server addresses there are.
    pub fn targets(&self) -> usize {
        self.targets.len()
    }

    /// Which server address connection `idx` goes to by default: round-robin,
    /// `idx % targets` (with two nodes, even members on the first, odd on the second).
    pub fn target_of(&self, idx: u32) -> usize {
        target_index(idx, self.targets.len())
    }

    /// Starts a non-blocking connect to the server address `targets[idx % len]` from source
    /// address `srcs[idx % len]` (bound before connect, port chosen at connect time) and
    /// queues the upgrade request for `path`.
    pub fn connect(&mut self, idx: u32, path: &str, user: U) -> Result<usize, String> {
        let t = self.target_of(idx);
        self.connect_to(t, idx, path, user)
    }

    /// [`Net::connect`] to the server address `targets[target]` (a failover to another node).
    pub fn connect_to(
        &mut self,
        target: usize,
        idx: u32,
        path: &str,
        user: U,
    ) -> Result<usize, String> {
        let target = target % self.targets.len();
        let dst = self.targets[target];
        let src = self.srcs[idx as usize % self.srcs.len()];
        let fd = open_socket(src, dst).map_err(|e| format!("connect: {e}"))?;
        // SAFETY: fd is a fresh socket we own; ownership moves into the TcpStream.
        let std = unsafe { std::net::TcpStream::from_raw_fd(fd) };
        let mut tcp = TcpStream::from_std(std);
        let slot = self.free.pop().unwrap_or_else(|| {
            self.conns.push(None);
            self.conns.len() - 1
        });
        if let Err(e) = self.poll.registry().register(
            &mut tcp,
            Token(slot),
            Interest::READABLE | Interest::WRITABLE,
        ) {
            self.free.push(slot);
            return Err(format!("register: {e}"));
        }
        let stream = match crate::tls::config() {
            None => Stream::Plain(tcp),
            Some(config) => match crate::tls::TlsConn::new(tcp, dst, config) {
                Ok(t) => Stream::Tls(Box::new(t)),
                Err(e) => {
                    self.free.push(slot);
                    return Err(format!("tls: {e}"));
                }
            },
        };
        let mut out = Vec::with_capacity(256);
        write!(
            out,
            "GET {path} HTTP/1.1\r\nHost: {}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
             Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n",
            self.hosts[target]
        )
        .expect("write to Vec");
        self.conns[slot] = Some(Conn {
            idx,
            target,
            state: State::Connecting,
            user,
            t_start: mono_ns(),
            t_open: 0,
            stream,
            out,
            out_pos: 0,
            carry: Vec::new(),
            frag: None,
            mask: 0x9e37_79b9 ^ (idx.wrapping_mul(2_654_435_761) | 1),
            sent_close: false,
        });
        self.live += 1;
        Ok(slot)
    }

    /// Sends a close frame (1000) and forgets the connection.
    pub fn close(&mut self, slot: usize) {
        if let Some(mut c) = self.conns.get_mut(slot).and_then(|c| c.take()) {
            if c.state == State::Open && !c.sent_close {
                c.send_frame(0x8, &1000u16.to_be_bytes());
            }
            let _ = self.poll.registry().deregister(c.stream.tcp_mut());
            if c.state != State::Closed {
                self.live -= 1;
            }
            self.free.push(slot);
        }
    }

    /// Starts a clean close: sends a close frame (1000) and keeps the connection until the
    /// server's close frame (reported as `Ev::Closed`) or EOF. Returns false when there is no
    /// open connection in `slot`.
    pub fn start_close(&mut self, slot: usize) -> bool {
        match self.conns.get_mut(slot).and_then(|c| c.as_mut()) {
            Some(c) if c.state == State::Open && !c.sent_close => {
                c.sent_close = true;
                c.send_frame(0x8, &1000u16.to_be_bytes());
                true
            }
            _ => false,
        }
    }

    /// Drops the connection without a close frame: the kernel sends a FIN, or with `reset`
    /// (SO_LINGER 0) a RST, as a crashed or unplugged client would.
    pub fn drop_conn(&mut self, slot: usize, reset: bool) {
        if let Some(mut c) = self.conns.get_mut(slot).and_then(|c| c.take()) {
            if reset {
                use std::os::fd::AsRawFd;
                let lg = libc::linger {
                    l_onoff: 1,
                    l_linger: 0,
                };
                // SAFETY: setsockopt on the socket we own, with a pointer to a local linger.
                unsafe {
                    libc::setsockopt(
                        c.stream.tcp().as_raw_fd(),
                        libc::SOL_SOCKET,
                        libc::SO_LINGER,
                        (&lg as *const libc::linger).cast(),
                        std::mem::size_of::<libc::linger>() as libc::socklen_t,
                    )
                };
            }
            let _ = self.poll.registry().deregister(c.stream.tcp_mut());
            if c.state != State::Closed {
                self.live -= 1;
            }
            self.free.push(slot);
        }
    }

    pub fn close_all(&mut self) {
        for slot in 0..self.conns.len() {
            self.close(slot);
        }
    }

    /// Waits for readiness (at most `max_wait`, or until `wake_at` mono ns if given) and
    /// handles ready connections, calling `f` for each transport event. When `wake_at`
    /// passes while a large batch is being handled it returns early (so the caller can send
    /// on time) and the rest of the batch is handled by the next call.
    pub fn poll(
        &mut self,
        wake_at: Option<u64>,
        max_wait: Duration,
        f: &mut impl FnMut(&mut Conn<U>, Ev<'_>, u64),
    ) -> io::Result<()> {
        if self.backlog_pos >= self.backlog.len() {
            self.backlog.clear();
            self.backlog_pos = 0;
            if let Some(t) = wake_at {
                self.timer.arm(t);
            }
            match self.poll.poll(&mut self.events, Some(max_wait)) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::Interrupted => return Ok(()),
                Err(e) => return Err(e),
            }
            for ev in self.events.iter() {
                if ev.token() == TIMER {
                    self.timer.fired();
                    continue;
                }
                let readable = ev.is_readable() || ev.is_read_closed() || ev.is_error();
                self.backlog
                    .push((ev.token().0, readable, ev.is_writable()));
            }
        }
        let t_batch = mono_ns();
        let Net {
            conns,
            free,
            buf,
            poll,
            counters,
            live,
            backlog,
            backlog_pos,
            ..
        } = self;
        while *backlog_pos < backlog.len() {
            let (slot, readable, writable) = backlog[*backlog_pos];
            *backlog_pos += 1;
            let Some(conn) = conns.get_mut(slot).and_then(|c| c.as_mut()) else {
                continue; // spurious event for a connection already gone
            };
            handle(conn, readable, writable, buf, counters, f);
            if conn.state == State::Closed {
                let mut c = conns[slot].take().expect("present");
                let _ = poll.registry().deregister(c.stream.tcp_mut());
                free.push(slot);
                *live -= 1;
            }
            if *backlog_pos % 8 == 0
                && let Some(t) = wake_at
                && mono_ns() >= t
            {
                break;
            }
        }
        let dt = mono_ns() - t_batch;
        if dt > counters.max_batch_ns {
            counters.max_batch_ns = dt;
        }
        Ok(())
    }
}

/// The server address of connection `idx` among `n`: round-robin.
pub fn target_index(idx: u32, n: usize) -> usize {
    idx as usize % n.max(1)
}

/// Parses `ADDR[,ADDR..]`: IPv4 `IP:PORT`s on loopback (127.0.0.0/8) only, at least one.
pub fn parse_targets(list: &str) -> Result<Vec<SocketAddrV4>, String> {
    let mut out = Vec::new();
    for part in list.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let a: SocketAddrV4 = part
            .parse()
            .map_err(|_| format!("server address '{part}' must be IPv4 ADDR:PORT"))?;
        if a.ip().octets()[0] != 127 {
            return Err(format!(
                "server address '{part}' must be a loopback address (127.0.0.0/8)"
            ));
        }
        out.push(a);
    }
    if out.is_empty() {
        return Err("no server address given".into());
    }
    Ok(out)
}

fn open_socket(src: Ipv4Addr, dst: SocketAddrV4) -> io::Result<RawFd> {
    fn check(r: libc::c_int) -> io::Result<libc::c_int> {
        if r < 0 {
            Err(io::Error::last_os_error())
        } else {
            Ok(r)
        }
    }
    fn sockaddr(a: SocketAddrV4) -> libc::sockaddr_in {
        libc::sockaddr_in {
            sin_family: libc::AF_INET as libc::sa_family_t,
            sin_port: a.port().to_be(),
            sin_addr: libc::in_addr {
                s_addr: u32::from(*a.ip()).to_be(),
            },
            sin_zero: [0; 8],
        }
    }
    // SAFETY: plain socket syscalls on a fd we own; every pointer passed is to a local value
    // of the size given, and every result is checked.
    unsafe {
        let fd = check(libc::socket(
            libc::AF_INET,
            libc::SOCK_STREAM | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
            0,
        ))?;
        let guard = |e: io::Error| {
            libc::close(fd);
            e
        };
        let one: libc::c_int = 1;
        let optlen = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
        let p = (&one as *const libc::c_int).cast();
        // Port chosen at connect() with the full 4-tuple: far more connections per source IP.
        check(libc::setsockopt(
            fd,
            libc::IPPROTO_IP,
            libc::IP_BIND_ADDRESS_NO_PORT,
            p,
            optlen,
        ))
        .map_err(guard)?;
        check(libc::setsockopt(
            fd,
            libc::IPPROTO_TCP,
            libc::TCP_NODELAY,
            p,
            optlen,
        ))
        .map_err(guard)?;
        let sa = sockaddr(SocketAddrV4::new(src, 0));
        let salen = std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t;
        check(libc::bind(
            fd,
            (&sa as *const libc::sockaddr_in).cast(),
            salen,
        ))
        .map_err(guard)?;
        let da = sockaddr(dst);
        if libc::connect(fd, (&da as *const libc::sockaddr_in).cast(), salen) < 0 {
            let e = io::Error::last_os_error();
            if e.raw_os_error() != Some(libc::EINPROGRESS) {
                return Err(guard(e));
            }
        }
        Ok(fd)
    }
}

fn close_conn<U>(
    conn: &mut Conn<U>,
    code: Option<u16>,
    f: &mut impl FnMut(&mut Conn<U>, Ev<'_>, u64),
) {
    match conn.state {
        State::Closed => {}
        State::Open => {
            conn.state = State::Closed;
            f(conn, Ev::Closed { code }, mono_ns());
        }
        State::Connecting | State::Handshake => {
            conn.state = State::Closed;
            f(
                conn,
                Ev::Failed("closed during handshake".into()),
                mono_ns(),
            );
        }
    }
}

fn fail<U>(conn: &mut Conn<U>, why: String, f: &mut impl FnMut(&mut Conn<U>, Ev<'_>, u64)) {
    if conn.state != State::Closed {
        conn.state = State::Closed;
        f(conn, Ev::Failed(why), mono_ns());
    }
}

fn handle<U>(
    conn: &mut Conn<U>,
    readable: bool,
    writable: bool,
    buf: &mut Vec<u8>,
    counters: &mut NetCounters,
    f: &mut impl FnMut(&mut Conn<U>, Ev<'_>, u64),
) {
    handle_io(conn, readable, writable, buf, counters, f);
    // Over TLS, reading ends the handshake (the upgrade request waits for it) and may queue
    // records of its own: write them now, no new readiness event would come for them.
    if conn.stream.is_tls()
        && conn.state != State::Closed
        && let Err(e) = conn.flush()
    {
        if conn.state == State::Open {
            return close_conn(conn, None, f);
        }
        fail(conn, format!("write: {e}"), f);
    }
}

fn handle_io<U>(
    conn: &mut Conn<U>,
    readable: bool,
    writable: bool,
    buf: &mut Vec<u8>,
    counters: &mut NetCounters,
    f: &mut impl FnMut(&mut Conn<U>, Ev<'_>, u64),
) {
    if conn.state == State::Connecting {
        match conn.stream.tcp().take_error() {
            Ok(None) => {}
            Ok(Some(e)) | Err(e) => return fail(conn, format!("connect: {e}"), f),
        }
        match conn.stream.tcp().peer_addr() {
            Ok(_) => conn.state = State::Handshake,
            Err(e) if e.kind() == io::ErrorKind::NotConnected => return,
            Err(e) => return fail(conn, format!("connect: {e}"), f),
        }
    }
    if (conn.pending() > 0 || writable)
        && let Err(e) = conn.flush()
    {
        if conn.state == State::Open {
            return close_conn(conn, None, f);
        }
        return fail(conn, format!("write: {e}"), f);
    }
    if !readable {
        return;
    }
    loop {
        let carry_len = conn.carry.len();
        if buf.len() < carry_len + READ_CHUNK {
            buf.resize(carry_len + READ_CHUNK, 0);
        }
        buf[..carry_len].copy_from_slice(&conn.carry);
        let space = buf.len() - carry_len;
        match conn.stream.read(&mut buf[carry_len..]) {
            Ok(0) => return close_conn(conn, None, f),
            Ok(n) => {
                counters.reads += 1;
                counters.bytes_in += n as u64;
                conn.carry.clear();
                let total = carry_len + n;
                let now = mono_ns();
                let used = process(conn, &mut buf[..total], now, counters, f);
                if conn.state == State::Closed {
                    return;
                }
                conn.carry.extend_from_slice(&buf[used..total]);
                if n < space && !conn.stream.is_tls() {
                    // The socket was drained; edge-triggered epoll reports the next arrival.
                    // (Over TLS a short read says nothing about the socket: read on.)
                    return;
                }
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => {
                if conn.state == State::Open {
                    return close_conn(conn, None, f);
                }
                return fail(conn, format!("read: {e}"), f);
            }
        }
    }
}

/// Parses the handshake response and then every complete frame in `data`; returns the
/// number of bytes consumed (the rest is a partial frame).
fn process<U>(
    conn: &mut Conn<U>,
    data: &mut [u8],
    now: u64,
    counters: &mut NetCounters,
    f: &mut impl FnMut(&mut Conn<U>, Ev<'_>, u64),
) -> usize {
    let mut pos = 0;
    if conn.state == State::Handshake {
        let Some(end) = memchr::memmem::find(data, b"\r\n\r\n") else {
            if data.len() > MAX_RESPONSE_HEAD {
                fail(conn, "response head too large".into(), f);
            }
            return 0;
        };
        let status = data
            .get(9..12)
            .and_then(|s| std::str::from_utf8(s).ok())
            .and_then(|s| s.parse::<u16>().ok());
        match status {
            Some(101) if data.starts_with(b"HTTP/1.1 ") => {}
            Some(code) => {
                fail(conn, format!("http {code}"), f);
                return data.len();
            }
            None => {
                fail(conn, "bad response".into(), f);
                return data.len();
            }
        }
        conn.state = State::Open;
        conn.t_open = now;
        pos = end + 4;
        f(conn, Ev::Opened, now);
    }
    while conn.state == State::Open {
        let d = &data[pos..];
        if d.len() < 2 {
            break;
        }
        let (b0, b1) = (d[0], d[1]);
        let fin = b0 & 0x80 != 0;
        let opcode = b0 & 0x0f;
        let masked = b1 & 0x80 != 0;
        let (mut hdr, len) = match b1 & 0x7f {
            126 => {
                if d.len() < 4 {
                    break;
                }
                (4usize, u16::from_be_bytes([d[2], d[3]]) as u64)
            }
            127 => {
                if d.len() < 10 {
                    break;
                }
                (
                    10usize,
                    u64::from_be_bytes(d[2..10].try_into().expect("8 bytes")),
                )
            }
            n => (2usize, n as u64),
        };
        if len > MAX_FRAME {
            close_conn(conn, Some(1009), f);
            break;
        }
        let mut key = [0u8; 4];
        if masked {
            if d.len() < hdr + 4 {
                break;
            }
            key.copy_from_slice(&d[hdr..hdr + 4]);
            hdr += 4;
        }
        let len = len as usize;
        if d.len() < hdr + len {
            break;
        }
        let (a, b) = (pos + hdr, pos + hdr + len);
        pos = b;
        if masked {
            for (i, x) in data[a..b].iter_mut().enumerate() {
                *x ^= key[i & 3];
            }
        }
        counters.frames_in += 1;
        match opcode {
            0x1 | 0x2 => {
                if fin {
                    f(conn, Ev::Text(&data[a..b]), now);
                } else {
                    conn.frag = Some(data[a..b].to_vec());
                }
            }
            0x0 => {
                if let Some(fr) = conn.frag.as_mut() {
                    fr.extend_from_slice(&data[a..b]);
                    if fin {
                        let whole = conn.frag.take().expect("fragment");
                        f(conn, Ev::Text(&whole), now);
                    }
                }
            }
            0x8 => {
                let code = (b - a >= 2).then(|| u16::from_be_bytes([data[a], data[a + 1]]));
                if !conn.sent_close {
                    conn.sent_close = true;
                    let echo = code.unwrap_or(1000).to_be_bytes();
                    conn.send_frame(0x8, &echo);
                }
                close_conn(conn, code, f);
            }
            0x9 => {
                let payload = data[a..b].to_vec();
                conn.send_frame(0xA, &payload);
            }
            0xA => {}
            _ => close_conn(conn, Some(1002), f),
        }
    }
    pos
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn connections_go_round_robin_over_the_addresses() {
        let picks: Vec<usize> = (0..6).map(|i| target_index(i, 2)).collect();
        assert_eq!(picks, [0, 1, 0, 1, 0, 1]);
        assert_eq!(target_index(7, 3), 1);
        assert_eq!(target_index(5, 1), 0);
    }

    #[test]
    fn addresses_parse_as_a_loopback_list() {
        let t = parse_targets("127.0.0.1:9000, 127.0.0.1:9001").unwrap();
        assert_eq!(t.len(), 2);
        assert_eq!(t[1].port(), 9001);
        assert_eq!(parse_targets("127.0.0.1:1").unwrap().len(), 1);
        assert!(parse_targets("10.0.0.1:9000").is_err());
        assert!(parse_targets("127.0.0.1:9000,localhost:1").is_err());
        assert!(parse_targets(" , ").is_err());
    }

    #[test]
    fn each_connection_dials_its_own_address() {
        let a = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let b = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = |l: &std::net::TcpListener| match l.local_addr().unwrap() {
            std::net::SocketAddr::V4(v) => v,
            _ => unreachable!(),
        };
        let mut net: Net<()> =
            Net::new(vec![addr(&a), addr(&b)], vec![Ipv4Addr::LOCALHOST]).unwrap();
        assert_eq!(net.targets(), 2);
        for i in 0..4 {
            let slot = net.connect(i, "/ws", ()).unwrap();
            assert_eq!(net.get_mut(slot).unwrap().target, i as usize % 2);
        }
        let slot = net.connect_to(1, 0, "/ws", ()).unwrap();
        assert_eq!(net.get_mut(slot).unwrap().target, 1);
        // Two connections reached each listener (and the failover one the second).
        let count = |l: &std::net::TcpListener| {
            l.set_nonblocking(true).unwrap();
            let mut n = 0;
            let deadline = mono_ns() + 2_000_000_000;
            while mono_ns() < deadline {
                match l.accept() {
                    Ok(_) => n += 1,
                    Err(_) => std::thread::sleep(Duration::from_millis(10)),
                }
                if n >= 3 {
                    break;
                }
            }
            n
        };
        assert_eq!(count(&a), 2);
        assert_eq!(count(&b), 3);
    }
}
