//! The transport: one `mio` event loop that owns every socket and turns readiness into calls
//! on the chat core.
//!
//! - The listener is drained to `WouldBlock` on each event; each connection lives in a `Slab`
//!   whose key is its `Token`.
//! - A connection first speaks HTTP ([`http`]): `/health`, the page, the REST API ([`api`]), or the
//!   WebSocket upgrade, after which tungstenite parses its frames.
//! - Everything the core sends in one iteration is appended to per-connection buffers and
//!   written once at the end of the iteration ("corking"); `WRITABLE` interest is held only
//!   while a buffer has bytes. A buffer over its bound closes the connection as a slow consumer
//!   (replies to the connection's own commands do not count against it: see `Sink::queue`).
//! - Timers (head deadline, pings, frame and idle timeouts, close deadlines) sit in one heap;
//!   the poll timeout is the next deadline, so an idle server does not wake up.
//! - SIGINT/SIGTERM arrive through a self-pipe; the store's writer thread and [`Stopper`] wake
//!   the loop through a `Waker`.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap};
use std::io::{self, Read};
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use log::{debug, info, warn};
use mio::net::{TcpListener, UnixStream};
use mio::{Events, Interest, Poll, Token, Waker};
use slab::Slab;
use tungstenite::protocol::WebSocketConfig;
use tungstenite::{Error as WsError, Message};

use crate::auth;
use crate::chat::{Chat, ConnId, Now, Outbox, Payload};
use crate::config::Config;

pub mod api;
mod conn;
pub mod http;
pub mod wire;

use conn::{Conn, Drained, Flushed, Phase};
use http::{Head, Parsed, Response};
use wire::{Next, ReadLimits, Wire};

const LISTENER: Token = Token(usize::MAX - 1);
const WAKER: Token = Token(usize::MAX - 2);
const SIGNAL: Token = Token(usize::MAX - 3);

/// Messages read from one connection before the loop turns to others; the rest waits for the
/// next iteration, so one busy client cannot starve the room.
const READ_BUDGET: usize = 64;
/// How long a connection closed by the server may take to receive its close frame.
const CLOSE_GRACE: Duration = Duration::from_secs(2);
/// Sockets accepted beyond `max_connections`, so that refusals can still be answered with a
/// status instead of a reset.
const HANDSHAKE_SLACK: usize = 256;

/// How long after the shutdown grace the history store may take to write what it holds (the
/// writer then gets half a second more to stop): a shutdown ends within grace + 5 s.
const STORE_CLOSE_SLACK: Duration = Duration::from_secs(4);

/// How soon after connections go the heap is trimmed, so that a mass disconnect gives its
/// memory back without waiting for traffic to resume.
const IDLE_TRIM_DELAY: Duration = Duration::from_millis(500);
/// Connections dropped (or the last one) that make a trim worth its walk over the heap.
const TRIM_AFTER_DROPS: usize = 64;

/// How long to wait before accepting again after `accept` failed for want of descriptors or
/// memory.
const ACCEPT_RETRY: Duration = Duration::from_millis(100);

/// The capacity a connection's output buffer starts with when something is queued.
const OUT_BUFFER_START: usize = 4096;

/// How soon after the traffic stops the output buffers kept for busy connections are freed.
const BUFFER_RELEASE_DELAY: Duration = Duration::from_millis(100);

/// The browser client, compiled in.
const INDEX_HTML: &str = include_str!("../client/index.html");

/// Asks a running [`Server`] to shut down as if it got SIGTERM. Cloneable and `Send`.
#[derive(Clone)]
pub struct Stopper {
    flag: Arc<AtomicBool>,
    waker: Arc<Waker>,
}

impl Stopper {
    /// Starts the shutdown.
    pub fn stop(&self) {
        self.flag.store(true, Ordering::SeqCst);
        let _ = self.waker.wake();
    }
}

/// The server: listener, connections, timers and the chat core.
pub struct Server {
    poll: Poll,
    listener: Option<TcpListener>,
    local: SocketAddr,
    signals: Option<UnixStream>,
    stop: Arc<AtomicBool>,
    waker: Arc<Waker>,
    chat: Chat,
    conns: Slab<Conn>,
    per_ip: HashMap<IpAddr, usize>,
    ws_count: usize,
    timers: BinaryHeap<Reverse<(Instant, usize)>>,
    dirty: Vec<usize>,
    /// Connections that still had messages to read when their budget ran out.
    backlog: Vec<usize>,
    closing: Vec<(usize, u16, &'static str)>,
    ws_config: WebSocketConfig,
    read_limits: ReadLimits,
    started: Instant,
    shutdown_at: Option<Instant>,
    /// Loop turns so far (starts at 1).
    iteration: u64,
    /// Connections that kept their output buffer on the last turn, and on this one.
    kept: Vec<usize>,
    kept_now: Vec<usize>,
    /// When to accept again after `accept` failed (out of descriptors).
    accept_retry_at: Option<Instant>,
    /// Close frames still unwritten when their grace time ran out.
    close_frames_lost: u64,
    /// Connections dropped since the last heap trim, and when the next one is due.
    dropped_since_trim: usize,
    trim_at: Option<Instant>,
    /// REST pages the engine has yet to answer: its token → the HTTP connection and room.
    rest_pages: HashMap<u64, (usize, String)>,
}

/// The `Outbox` the core writes into: appends to connection buffers and notes what to flush.
struct Sink<'a> {
    conns: &'a mut Slab<Conn>,
    dirty: &'a mut Vec<usize>,
    closing: &'a mut Vec<(usize, u16, &'static str)>,
    max_pending: usize,
}

impl Outbox for Sink<'_> {
    fn send(&mut self, to: ConnId, payload: &Payload) {
        self.queue(to, payload, false);
    }

    fn reply(&mut self, to: ConnId, payload: &Payload) {
        self.queue(to, payload, true);
    }

    fn close(&mut self, to: ConnId, code: u16, reason: &'static str) {
        self.closing.push((to, code, reason));
    }
}

impl Sink<'_> {
    /// Appends a frame to a connection's output, or closes it as a slow consumer.
    ///
    /// The bound is `max_pending` bytes queued, but replies (answers to the connection's own
    /// command) do not count against it: their size is the server's choice, and a `list` of
    /// 10,000 names is 350 KB. So the connection may hold the bound plus its credit, the largest
    /// reply queued since its output last ran empty. A reply raises the credit to its own size
    /// first, so it is queued whenever what is queued before it is within the bound (room
    /// traffic and small replies behind it too); a client that asks for a second big reply
    /// before reading the first one, or does not read room traffic, is a slow consumer. Memory
    /// per connection stays at most the bound plus one reply.
    fn queue(&mut self, to: ConnId, payload: &Payload, reply: bool) {
        let Some(c) = self.conns.get_mut(to) else {
            return;
        };
        if !c.can_send() {
            return;
        }
        let pending = c.pending();
        let len = payload.bytes().len();
        if pending == 0 {
            c.reply_credit = 0;
        }
        let credit = if reply {
            c.reply_credit.max(len)
        } else {
            c.reply_credit
        };
        if pending + len > self.max_pending + credit {
            // Backpressure: this client cannot keep up. It gets nothing more but its close.
            self.closing.push((to, 1008, "slow consumer"));
            c.closing = true;
            return;
        }
        c.reply_credit = credit;
        if c.out.capacity() == 0 {
            // Drained buffers are given back (idle connections hold none); a fresh one starts
            // big enough for a burst, so it does not grow step by step.
            c.out.reserve(OUT_BUFFER_START.max(payload.bytes().len()));
        }
        c.out.extend_from_slice(payload.bytes());
        if !c.dirty {
            c.dirty = true;
            self.dirty.push(to);
        }
    }
}

fn now_of(mono: Instant) -> Now {
    let unix_ms = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64);
    Now { mono, unix_ms }
}

/// mio listens with a backlog of 128; a connect storm overflows that and the dropped SYNs wait
/// a second for their retry. Calling `listen` again on a listening socket resizes its queue.
fn set_backlog(listener: &TcpListener, backlog: u32) -> io::Result<()> {
    use std::os::fd::AsRawFd;
    let backlog = i32::try_from(backlog).unwrap_or(i32::MAX);
    // SAFETY: `listen` only reads its arguments; the descriptor is valid for the listener's life.
    if unsafe { libc::listen(listener.as_raw_fd(), backlog) } == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Returns free heap memory to the system (glibc keeps it otherwise, fragmented by bursts).
fn trim_heap() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim only walks the allocator's own free lists.
    unsafe {
        libc::malloc_trim(0);
    }
}

fn unix_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

fn would_block(e: &io::Error) -> bool {
    e.kind() == io::ErrorKind::WouldBlock
}

impl Server {
    /// Binds the listener and opens the history store the settings name.
    pub fn bind(cfg: Config) -> io::Result<Server> {
        let addr: SocketAddr = format!("{}:{}", cfg.host, cfg.port).parse().or_else(|_| {
            use std::net::ToSocketAddrs;
            (cfg.host.as_str(), cfg.port)
                .to_socket_addrs()?
                .next()
                .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "no address"))
        })?;
        let poll = Poll::new()?;
        let mut listener = TcpListener::bind(addr)?;
        set_backlog(&listener, cfg.listen_backlog)?;
        let local = listener.local_addr()?;
        poll.registry()
            .register(&mut listener, LISTENER, Interest::READABLE)?;
        let waker = Arc::new(Waker::new(poll.registry(), WAKER)?);
        let notify_waker = waker.clone();
        let engine = crate::store::open_engine(
            &cfg.db_path,
            cfg.memory_history_per_room,
            Box::new(move || {
                let _ = notify_waker.wake();
            }),
        )
        .map_err(io::Error::other)?;
        let ws_config = wire::websocket_config(&cfg);
        let read_limits = ReadLimits::from_config(&cfg);
        Ok(Server {
            read_limits,
            poll,
            listener: Some(listener),
            local,
            signals: None,
            stop: Arc::new(AtomicBool::new(false)),
            waker,
            chat: Chat::new(cfg, engine, Box::new(|| uuid::Uuid::new_v4().to_string())),
            conns: Slab::new(),
            per_ip: HashMap::new(),
            ws_count: 0,
            timers: BinaryHeap::new(),
            dirty: Vec::new(),
            backlog: Vec::new(),
            closing: Vec::new(),
            ws_config,
            started: Instant::now(),
            shutdown_at: None,
            iteration: 1,
            kept: Vec::new(),
            kept_now: Vec::new(),
            accept_retry_at: None,
            close_frames_lost: 0,
            dropped_since_trim: 0,
            trim_at: None,
            rest_pages: HashMap::new(),
        })
    }

    /// The address the listener is bound to (useful with port 0).
    pub fn local_addr(&self) -> SocketAddr {
        self.local
    }

    /// A handle that shuts the server down from another thread.
    pub fn stopper(&self) -> Stopper {
        Stopper {
            flag: self.stop.clone(),
            waker: self.waker.clone(),
        }
    }

    /// Makes SIGINT and SIGTERM start the shutdown.
    pub fn handle_signals(&mut self) -> io::Result<()> {
        let (read, write) = std::os::unix::net::UnixStream::pair()?;
        read.set_nonblocking(true)?;
        let mut read = UnixStream::from_std(read);
        self.poll
            .registry()
            .register(&mut read, SIGNAL, Interest::READABLE)?;
        signal_hook::low_level::pipe::register(signal_hook::consts::SIGTERM, write.try_clone()?)?;
        signal_hook::low_level::pipe::register(signal_hook::consts::SIGINT, write)?;
        self.signals = Some(read);
        Ok(())
    }

    /// Runs the loop until a shutdown completes: every client got close `1001` (or the grace
    /// ran out) and the history store is flushed.
    pub fn run(mut self) -> io::Result<()> {
        info!("chatterbox listening on {}", self.local);
        let mut events = Events::with_capacity(1024);
        loop {
            let timeout = if self.backlog.is_empty() {
                self.next_timeout()
            } else {
                Some(Duration::ZERO)
            };
            if let Err(e) = self.poll.poll(&mut events, timeout) {
                if e.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(e);
            }
            let now = Instant::now();
            self.iteration += 1;
            for event in events.iter() {
                match event.token() {
                    LISTENER => self.accept(now),
                    WAKER => {
                        if self.stop.load(Ordering::SeqCst) {
                            self.begin_shutdown(now);
                        }
                        self.engine_replies(now);
                    }
                    SIGNAL => {
                        if let Some(s) = &mut self.signals {
                            let mut buf = [0u8; 64];
                            while matches!(s.read(&mut buf), Ok(n) if n > 0) {}
                        }
                        self.begin_shutdown(now);
                    }
                    Token(id) => {
                        if event.is_writable() || event.is_error() {
                            self.mark_dirty(id);
                        }
                        if event.is_readable() || event.is_read_closed() || event.is_error() {
                            self.readable(id, now);
                        }
                    }
                }
            }
            for id in std::mem::take(&mut self.backlog) {
                self.readable(id, now);
            }
            if self.accept_retry_at.is_some_and(|at| now >= at) {
                self.accept(now);
            }
            self.fire_timers(now);
            self.process_closing(now);
            self.flush_dirty();
            if self.trim_at.is_some_and(|at| now >= at) {
                self.trim_idle();
            }
            if let Some(at) = self.shutdown_at {
                if self.conns.is_empty() || now >= at {
                    break;
                }
            }
        }
        // The store gets until grace + STORE_CLOSE_SLACK after the shutdown began, whatever
        // the disk does; what it could not write by then is counted, and the exit says so.
        let deadline = self.shutdown_at.unwrap_or_else(Instant::now) + STORE_CLOSE_SLACK;
        self.release_held(deadline);
        let unstored = self.core(|chat, sink| chat.close_store(deadline, sink));
        self.flush_dirty();
        if unstored > 0 {
            return Err(io::Error::other(format!(
                "{unstored} messages were not stored: the history store could not write them"
            )));
        }
        info!("chatterbox stopped");
        Ok(())
    }

    /// Runs `f` on the chat core with an outbox over this server's connections.
    fn core<R>(&mut self, f: impl FnOnce(&mut Chat, &mut Sink<'_>) -> R) -> R {
        let max_pending = self.chat.config().max_pending_output;
        let mut sink = Sink {
            conns: &mut self.conns,
            dirty: &mut self.dirty,
            closing: &mut self.closing,
            max_pending,
        };
        f(&mut self.chat, &mut sink)
    }

    fn cfg(&self) -> &Config {
        self.chat.config()
    }

    // ----- accepting and reading -----

    fn accept(&mut self, now: Instant) {
        loop {
            let Some(listener) = &self.listener else {
                self.accept_retry_at = None;
                return;
            };
            let (mut stream, addr) = match listener.accept() {
                Ok(pair) => pair,
                Err(e) if would_block(&e) => {
                    self.accept_retry_at = None;
                    return;
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                // The peer gave up before we took it: the next one may be fine.
                Err(e) if e.raw_os_error() == Some(libc::ECONNABORTED) => continue,
                Err(e) => {
                    // Out of file descriptors or memory: the rest wait in the kernel's queue.
                    // The listener is edge-triggered, so no event comes for them when
                    // descriptors free up: try again after a short back-off.
                    if self.accept_retry_at.is_none() {
                        warn!("accept failed: {e}; retrying every {ACCEPT_RETRY:?}");
                    }
                    self.accept_retry_at = Some(now + ACCEPT_RETRY);
                    return;
                }
            };
            self.accept_retry_at = None;
            if self.conns.len() >= self.cfg().max_connections + HANDSHAKE_SLACK {
                debug!("dropping connection from {addr}: socket cap reached");
                continue;
            }
            // A socket counts against its address from here, whatever it turns out to be: a
            // head still being read holds a slot as much as a member does. Past the cap it is
            // answered 429; past twice the cap (that many refusals still being answered) it is
            // closed at once, so one address never holds more than that of the table.
            let ip = addr.ip();
            let per_ip_cap = self.cfg().max_connections_per_ip;
            let from_ip = self.per_ip.get(&ip).copied().unwrap_or(0);
            if from_ip >= per_ip_cap.saturating_mul(2) {
                debug!("dropping connection from {addr}: per-address cap reached");
                continue;
            }
            let _ = stream.set_nodelay(true);
            let entry = self.conns.vacant_entry();
            let id = entry.key();
            if self
                .poll
                .registry()
                .register(&mut stream, Token(id), Interest::READABLE)
                .is_err()
            {
                continue;
            }
            let deadline = now + self.chat.config().head_timeout;
            entry.insert(Conn::new(stream, ip, now, deadline));
            *self.per_ip.entry(ip).or_insert(0) += 1;
            if from_ip >= per_ip_cap {
                let refusal = Response::text(429, "too many connections from your address\n");
                self.respond(id, refusal, now);
            } else {
                self.schedule(id, deadline);
            }
        }
    }

    fn readable(&mut self, id: usize, now: Instant) {
        let budget = self.cfg().read_budget_bytes;
        if let Some(c) = self.conns.get_mut(id) {
            if c.close_by.is_some() {
                // On its way out: input is read (within the budget) and discarded.
                match c.drain(budget) {
                    // Once the output is written; until then the close deadline bounds it.
                    Drained::Closed if c.pending() == 0 => self.drop_conn(id),
                    Drained::More => self.defer(id),
                    Drained::Closed | Drained::Empty => {}
                }
                return;
            }
        }
        match self
            .conns
            .get(id)
            .map(|c| matches!(c.phase, Phase::Http { .. }))
        {
            Some(true) => self.read_head(id, now),
            Some(false) => self.read_frames(id, now),
            None => {}
        }
    }

    fn read_head(&mut self, id: usize, now: Instant) {
        let max = self.cfg().max_head_bytes;
        let Some(c) = self.conns.get_mut(id) else {
            return;
        };
        let Phase::Http { head, .. } = &mut c.phase else {
            return;
        };
        let mut buf = [0u8; 4096];
        let mut eof = false;
        loop {
            match c.stream.read(&mut buf) {
                Ok(0) => {
                    eof = true;
                    break;
                }
                Ok(n) => {
                    head.extend_from_slice(&buf[..n]);
                    if head.len() > max {
                        break;
                    }
                }
                Err(e) if would_block(&e) => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(_) => {
                    eof = true;
                    break;
                }
            }
        }
        if c.closing || c.page_pending.is_some() {
            return;
        }
        let parsed = http::parse(head);
        let too_big = head.len() > max;
        match parsed {
            Parsed::Complete(h) if h.len <= max => self.route(id, h, now),
            Parsed::Complete(_) | Parsed::TooLarge => {
                self.respond(id, Response::text(431, "request head too large\n"), now)
            }
            Parsed::Partial if too_big => {
                self.respond(id, Response::text(431, "request head too large\n"), now)
            }
            Parsed::Partial if eof => self.drop_conn(id),
            Parsed::Partial => {}
            Parsed::Invalid => {
                self.respond(id, Response::text(400, "malformed HTTP request\n"), now)
            }
        }
    }

    /// Shutdown: broadcasts taken but still waiting for their id get until `deadline` (while
    /// the engine can write) to be numbered and stored, so that a command answered before the
    /// stop means its broadcasts are kept.
    fn release_held(&mut self, deadline: Instant) {
        while self.chat.held_broadcasts() > 0
            && self.chat.engine_writable()
            && Instant::now() < deadline
        {
            self.core(|chat, sink| chat.flush(sink));
            if self.chat.held_broadcasts() > 0 {
                // A last id read by the engine's reader thread: not covered by the flush.
                std::thread::sleep(Duration::from_millis(1));
            }
        }
    }

    /// The engine has replies (its waker fired): the core applies them, and the REST pages
    /// among them are answered.
    fn engine_replies(&mut self, now: Instant) {
        self.core(|chat, sink| chat.handle_engine(sink));
        self.answer_pages(now);
    }

    /// HTTP connection `id` waits for REST page `token` of `room`: its answer is written when
    /// the engine replies (at once, for the memory engine), and the loop does not wait.
    fn await_page(&mut self, id: usize, token: u64, room: String, now: Instant) {
        if let Some(c) = self.conns.get_mut(id) {
            c.page_pending = Some(token);
            self.rest_pages.insert(token, (id, room));
        }
        self.answer_pages(now);
    }

    /// Writes the REST pages the engine has answered to the connections still waiting for them
    /// (a connection id may have been reused: the token tells).
    fn answer_pages(&mut self, now: Instant) {
        for (token, page) in self.chat.take_rest_pages() {
            let Some((id, room)) = self.rest_pages.remove(&token) else {
                continue;
            };
            let Some(c) = self.conns.get_mut(id) else {
                continue;
            };
            if c.page_pending != Some(token) || c.closing {
                // Closed meanwhile (its head timed out, say): the answer has nowhere to go.
                continue;
            }
            c.page_pending = None;
            self.respond(id, api::page_response(&room, page), now);
        }
    }

    fn respond(&mut self, id: usize, response: Response, now: Instant) {
        let Some(c) = self.conns.get_mut(id) else {
            return;
        };
        c.out.extend_from_slice(&response.to_bytes());
        c.start_close(0, "", now + CLOSE_GRACE);
        self.schedule(id, now + CLOSE_GRACE);
        self.mark_dirty(id);
    }

    fn route(&mut self, id: usize, head: Head, now: Instant) {
        let get = head.method == "GET";
        // DNS rebinding: a page on evil.example whose name now resolves here sends
        // `Host: evil.example`. Health checks often come by address, and tell nothing.
        if head.path != "/health"
            && !http::host_allowed(head.header("host"), &self.cfg().allowed_hosts)
        {
            let r = Response::text(421, "this server does not answer to that host\n");
            return self.respond(id, r, now);
        }
        let response = match head.path.as_str() {
            "/health" if get => self.health(),
            "/" if get => {
                let mut r = Response::text(200, INDEX_HTML);
                r.content_type = "text/html; charset=utf-8";
                r
            }
            "/ws" if get => match self.upgrade(id, &head, now) {
                Ok(()) => return,
                Err(r) => r,
            },
            "/health" | "/" | "/ws" => Response::method_not_allowed("GET"),
            _ => match api::authorize(self.cfg(), &head, unix_secs()) {
                Err(refused) => refused,
                Ok(()) => {
                    let t = api::TransportStats {
                        connections: self.conns.len(),
                        uptime_secs: self.started.elapsed().as_secs(),
                        close_frames_lost: self.close_frames_lost,
                    };
                    match self.core(|chat, sink| api::route(chat, &head, t, sink)) {
                        Some(api::Answer::Now(r)) => r,
                        Some(api::Answer::Later { token, room }) => {
                            return self.await_page(id, token, room, now);
                        }
                        None => Response::text(404, "not found\n"),
                    }
                }
            },
        };
        self.respond(id, response, now);
    }

    /// `200 ok`, or `503` while the history store cannot write or its backlog is full.
    fn health(&mut self) -> Response {
        if self.chat.store_available() {
            Response::text(200, "ok")
        } else {
            Response::text(503, "store unavailable")
        }
    }

    /// Checks an upgrade request and, when it passes, switches the connection to WebSocket and
    /// hands the new member to the core. Refusals come back as the response to send.
    fn upgrade(&mut self, id: usize, head: &Head, now: Instant) -> Result<(), Response> {
        let bad = |why: &str| Response::text(400, format!("{why}\n"));
        if !head
            .header("upgrade")
            .is_some_and(|u| u.eq_ignore_ascii_case("websocket"))
        {
            return Err(bad("expected a WebSocket upgrade (Upgrade: websocket)"));
        }
        if !head.header_has_token("connection", "upgrade") {
            return Err(bad("expected Connection: Upgrade"));
        }
        if head.header("sec-websocket-version") != Some("13") {
            return Err(bad("unsupported Sec-WebSocket-Version (expected 13)")
                .with_header("Sec-WebSocket-Version", "13"));
        }
        let key = match head.header("sec-websocket-key") {
            Some(k) if k.len() == 24 && k.ends_with("==") => k.to_string(),
            _ => return Err(bad("missing or malformed Sec-WebSocket-Key")),
        };
        let cfg = self.chat.config();
        if let Some(origin) = head.header("origin") {
            if !http::origin_allowed(origin, head.header("host"), &cfg.allowed_origins) {
                return Err(Response::text(403, "origin not allowed\n"));
            }
        }
        let identity = match auth::Policy::of(cfg) {
            None => None,
            Some(policy) => {
                let token = head
                    .token()
                    .map_err(|_| bad("the token is badly escaped"))?
                    .ok_or(auth::AuthError::Missing);
                match token.and_then(|t| auth::verify(&t, &policy, unix_secs())) {
                    Ok(identity) => Some(identity),
                    Err(e) => return Err(Response::text(401, format!("{}\n", e.text()))),
                }
            }
        };
        let name = match identity.as_ref().and_then(|i| i.name.clone()) {
            Some(n) => Some(n),
            None => head
                .query_param("name")
                .map_err(|_| bad("the name is badly escaped"))?,
        };
        let name = name.filter(|n| !n.is_empty());
        if !self.conns.contains(id) {
            return Ok(());
        }
        if self.ws_count >= cfg.max_connections {
            return Err(Response::text(503, "server is full\n"));
        }
        // The per-address cap was applied at accept.
        if let Some(n) = &name {
            self.chat
                .check_name(n)
                .map_err(|r| Response::text(r.status, format!("{}\n", r.reason)))?;
        }

        let ping_interval = self.chat.config().ping_interval;
        let Some(c) = self.conns.get_mut(id) else {
            return Ok(());
        };
        let Phase::Http { head: bytes, .. } = &mut c.phase else {
            return Ok(());
        };
        let rest = bytes.split_off(head.len);
        c.out.extend_from_slice(&http::switching_protocols(&key));
        c.phase = Phase::Ws(Box::new(Wire::new(rest, self.ws_config, self.read_limits)));
        c.member = true;
        c.counted = true;
        c.last_frame = now;
        c.last_command = now;
        c.next_ping = now + ping_interval;
        c.expires_at = identity
            .as_ref()
            .and_then(|i| i.exp)
            .and_then(|exp| auth::session_deadline(exp, unix_secs(), now));
        c.timer_at = None;
        self.ws_count += 1;
        self.mark_dirty(id);
        let member_id = identity.map(|i| i.sub);
        self.core(|chat, sink| chat.connect(now_of(now), id, name.as_deref(), member_id, sink));
        self.schedule_ws(id);
        // Frames the client sent right behind its head are already buffered: read them now,
        // since no new readiness event will come for them.
        self.read_frames(id, now);
        Ok(())
    }

    fn read_frames(&mut self, id: usize, now: Instant) {
        let cfg_now = now_of(now);
        let max_pending = self.cfg().max_pending_output;
        for _ in 0..READ_BUDGET {
            let Some(c) = self.conns.get_mut(id) else {
                return;
            };
            let next = c.read_message(self.iteration, max_pending);
            if !matches!(next, Next::Blocked) {
                c.last_frame = now;
            }
            // Whatever tungstenite queued (pongs, close replies) must go out.
            if c.pending() > 0 {
                self.mark_dirty(id);
            }
            match next {
                Next::Message(Message::Text(text)) => {
                    if let Some(c) = self.conns.get_mut(id) {
                        c.last_command = now;
                    }
                    self.core(|chat, sink| chat.handle_text(cfg_now, id, text.as_str(), sink));
                }
                Next::Message(Message::Binary(_)) => {
                    self.core(|chat, sink| chat.handle_binary(cfg_now, id, sink));
                }
                Next::Message(Message::Ping(_) | Message::Pong(_) | Message::Frame(_)) => {}
                Next::Message(Message::Close(_)) => {
                    // tungstenite queued the reply inside itself: move it to the output, then
                    // let the connection go once it is written.
                    self.end_member(id);
                    if let Some(c) = self.conns.get_mut(id) {
                        c.flush_protocol();
                        c.closing = true;
                        c.close_by = Some(now + CLOSE_GRACE);
                    }
                    self.schedule(id, now + CLOSE_GRACE);
                    self.mark_dirty(id);
                    return;
                }
                Next::Blocked => return,
                Next::Spent => break,
                Next::OverBound => {
                    // Pongs and close replies count against the bound like everything else.
                    if let Some(c) = self.conns.get_mut(id) {
                        c.closing = true;
                    }
                    self.closing.push((id, 1008, "slow consumer"));
                    return;
                }
                Next::TooManyFragments => {
                    debug!("closing connection {id}: too many fragments");
                    self.closing.push((id, 1008, "too many fragments"));
                    return;
                }
                Next::Failed(e) => {
                    self.protocol_error(id, e, now);
                    return;
                }
            }
        }
        // Budget spent with data possibly left: come back next iteration.
        self.defer(id);
    }

    /// Puts a connection whose read budget ran out on the backlog for the next turn.
    fn defer(&mut self, id: usize) {
        if self.conns.contains(id) && !self.backlog.contains(&id) {
            self.backlog.push(id);
        }
    }

    /// Ends a connection after a read error, with the close code the error calls for.
    fn protocol_error(&mut self, id: usize, e: WsError, now: Instant) {
        use tungstenite::error::{CapacityError, ProtocolError};
        let (code, reason) = match &e {
            WsError::Capacity(CapacityError::MessageTooLong { .. }) => (1009, "message too big"),
            WsError::Capacity(_) => (1009, "message too big"),
            WsError::Utf8(_) => (1007, "invalid UTF-8"),
            WsError::Protocol(ProtocolError::InvalidCloseSequence) => (1002, "protocol error"),
            WsError::Protocol(_) => (1002, "protocol error"),
            // Closed, reset, or any other I/O failure: nothing can be sent.
            _ => {
                debug!("connection {id} ended: {e}");
                self.drop_conn(id);
                return;
            }
        };
        debug!("closing connection {id} with {code}: {e}");
        self.end_member(id);
        if let Some(c) = self.conns.get_mut(id) {
            // tungstenite may already be past the point of sending a close; then just drop.
            if matches!(&c.phase, Phase::Ws(ctx) if ctx.can_write()) {
                c.start_close(code, reason, now + CLOSE_GRACE);
                self.schedule(id, now + CLOSE_GRACE);
                self.mark_dirty(id);
            } else {
                self.drop_conn(id);
            }
        }
    }

    /// Removes the connection's member from the chat (once), telling its rooms.
    fn end_member(&mut self, id: usize) {
        let Some(c) = self.conns.get_mut(id) else {
            return;
        };
        if !std::mem::take(&mut c.member) {
            return;
        }
        self.core(|chat, sink| chat.disconnect(id, sink));
    }

    /// Closes what the core or backpressure asked to close. Closing one member may make the
    /// core write to (and overflow) others, so this runs until nothing is left.
    fn process_closing(&mut self, now: Instant) {
        while let Some((id, code, reason)) = self.closing.pop() {
            let Some(c) = self.conns.get_mut(id) else {
                continue;
            };
            if c.close_by.is_some() {
                continue;
            }
            if reason == "slow consumer" {
                self.chat.count_slow_consumer();
                debug!("closing connection {id}: slow consumer");
            }
            c.closing = false;
            c.start_close(code, reason, now + CLOSE_GRACE);
            self.schedule(id, now + CLOSE_GRACE);
            self.mark_dirty(id);
            self.end_member(id);
        }
    }

    // ----- writing -----

    fn mark_dirty(&mut self, id: usize) {
        if let Some(c) = self.conns.get_mut(id) {
            if !c.dirty {
                c.dirty = true;
                self.dirty.push(id);
            }
        }
    }

    fn flush_dirty(&mut self) {
        while let Some(id) = self.dirty.pop() {
            let Some(c) = self.conns.get_mut(id) else {
                continue;
            };
            c.dirty = false;
            match c.flush(self.iteration) {
                Flushed::Failed => {
                    self.drop_conn(id);
                    continue;
                }
                Flushed::Done if c.close_by.is_some() => {
                    // Output written, close frame included: half-close, then read and discard
                    // until the client closes too (or the grace runs out). Dropping a socket
                    // with unread input would send a reset that can destroy what we wrote.
                    if !c.write_closed {
                        c.write_closed = true;
                        let _ = c.stream.shutdown(std::net::Shutdown::Write);
                    }
                    match c.drain(self.read_limits.budget_bytes) {
                        Drained::Closed => {
                            self.drop_conn(id);
                            continue;
                        }
                        Drained::More => {
                            if !self.backlog.contains(&id) {
                                self.backlog.push(id);
                            }
                        }
                        Drained::Empty => {}
                    }
                }
                Flushed::Done if c.out.capacity() > 0 => self.kept_now.push(id),
                _ => {}
            }
            let wanted = c.wanted_interest();
            if wanted != c.interest {
                c.interest = wanted;
                let _ = self
                    .poll
                    .registry()
                    .reregister(&mut c.stream, Token(id), wanted);
            }
        }
        // A connection kept its buffer because it was busy; one that was not written on this
        // turn is busy no more and gives it back.
        let mut released = false;
        for id in std::mem::take(&mut self.kept) {
            if let Some(c) = self.conns.get_mut(id)
                && c.drained_on != self.iteration
                && c.pending() == 0
            {
                c.out = Vec::new();
                released = true;
            }
        }
        std::mem::swap(&mut self.kept, &mut self.kept_now);
        if released && self.kept.is_empty() {
            // The traffic stopped: hand the heap a burst left behind back to the system.
            trim_heap();
        }
    }

    /// Forgets a connection: the member leaves, the socket is deregistered and closed.
    fn drop_conn(&mut self, id: usize) {
        self.end_member(id);
        if !self.conns.contains(id) {
            return;
        }
        let mut c = self.conns.remove(id);
        let _ = self.poll.registry().deregister(&mut c.stream);
        if c.counted {
            self.ws_count -= 1;
        }
        if let Some(n) = self.per_ip.get_mut(&c.ip) {
            *n -= 1;
            if *n == 0 {
                self.per_ip.remove(&c.ip);
            }
        }
        self.backlog.retain(|&b| b != id);
        self.dropped_since_trim += 1;
        if self.trim_at.is_none()
            && (self.dropped_since_trim >= TRIM_AFTER_DROPS || self.conns.is_empty())
        {
            self.trim_at = Some(Instant::now() + IDLE_TRIM_DELAY);
        }
    }

    /// Gives memory back after connections went: the loop's own tables when none are left,
    /// and the allocator's free pages.
    fn trim_idle(&mut self) {
        self.trim_at = None;
        self.dropped_since_trim = 0;
        if self.conns.is_empty() {
            self.conns.shrink_to_fit();
            self.per_ip.shrink_to_fit();
            self.backlog.shrink_to_fit();
            self.dirty.shrink_to_fit();
        }
        trim_heap();
    }

    // ----- timers -----

    fn next_timeout(&mut self) -> Option<Duration> {
        let mut timer = self.timers.peek().map(|Reverse((at, _))| *at);
        if !self.kept.is_empty() {
            // One more turn soon, so that buffers kept for busy connections are given back
            // once the traffic stops (an idle server then sleeps with none).
            let release = Instant::now() + BUFFER_RELEASE_DELAY;
            timer = Some(timer.map_or(release, |t| t.min(release)));
        }
        if let Some(at) = self.trim_at {
            timer = Some(timer.map_or(at, |t| t.min(at)));
        }
        if let Some(at) = self.accept_retry_at {
            timer = Some(timer.map_or(at, |t| t.min(at)));
        }
        let next = match (timer, self.shutdown_at) {
            (Some(t), Some(s)) => t.min(s),
            (t, s) => t.or(s)?,
        };
        Some(next.saturating_duration_since(Instant::now()))
    }

    fn schedule(&mut self, id: usize, at: Instant) {
        let Some(c) = self.conns.get_mut(id) else {
            return;
        };
        if c.timer_at.is_some_and(|t| t <= at) {
            return;
        }
        c.timer_at = Some(at);
        self.timers.push(Reverse((at, id)));
    }

    fn schedule_ws(&mut self, id: usize) {
        let cfg = self.chat.config();
        let (pong, idle) = (cfg.pong_timeout, cfg.idle_timeout);
        let Some(c) = self.conns.get(id) else { return };
        let mut at = c
            .next_ping
            .min(c.last_frame + pong)
            .min(c.last_command + idle);
        if let Some(exp) = c.expires_at {
            at = at.min(exp);
        }
        self.schedule(id, at);
    }

    fn fire_timers(&mut self, now: Instant) {
        while let Some(&Reverse((at, id))) = self.timers.peek() {
            if at > now {
                break;
            }
            self.timers.pop();
            let Some(c) = self.conns.get_mut(id) else {
                continue;
            };
            if c.timer_at != Some(at) {
                continue; // stale entry; a newer one exists
            }
            c.timer_at = None;
            self.timer_due(id, now);
        }
    }

    fn timer_due(&mut self, id: usize, now: Instant) {
        let cfg = self.chat.config();
        let (ping, pong, idle) = (cfg.ping_interval, cfg.pong_timeout, cfg.idle_timeout);
        let Some(c) = self.conns.get_mut(id) else {
            return;
        };
        if let Some(by) = c.close_by {
            if now >= by {
                if c.pending() > 0 && matches!(c.phase, Phase::Ws(_)) {
                    // A client that does not read (a slow consumer, typically) never gets its
                    // close frame. Nothing more can be done for it; count it.
                    self.close_frames_lost += 1;
                    debug!("connection {id}: close frame not taken within the grace time");
                }
                self.drop_conn(id);
            } else {
                self.schedule(id, by);
            }
            return;
        }
        match &c.phase {
            Phase::Http { deadline, .. } => {
                if now >= *deadline {
                    debug!("closing connection {id}: request head timed out");
                    self.drop_conn(id);
                } else {
                    let d = *deadline;
                    self.schedule(id, d);
                }
            }
            Phase::Ws(_) => {
                if c.expires_at.is_some_and(|exp| now >= exp) {
                    self.closing.push((id, 1008, "token expired"));
                } else if now >= c.last_frame + pong {
                    self.closing.push((id, 1000, "timeout"));
                } else if now >= c.last_command + idle {
                    self.closing.push((id, 1000, "idle"));
                } else {
                    if now >= c.next_ping {
                        c.ping();
                        c.next_ping = now + ping;
                        self.mark_dirty(id);
                    }
                    self.schedule_ws(id);
                }
            }
        }
    }

    // ----- shutdown -----

    fn begin_shutdown(&mut self, now: Instant) {
        if self.shutdown_at.is_some() {
            return;
        }
        info!("shutting down: closing {} connections", self.conns.len());
        if let Some(mut l) = self.listener.take() {
            let _ = self.poll.registry().deregister(&mut l);
        }
        let grace = self.chat.config().shutdown_grace;
        self.shutdown_at = Some(now + grace);
        let ids: Vec<usize> = self.conns.iter().map(|(id, _)| id).collect();
        for id in ids {
            let Some(c) = self.conns.get_mut(id) else {
                continue;
            };
            if c.close_by.is_some() {
                continue;
            }
            if let Phase::Http { .. } = c.phase {
                self.drop_conn(id);
                continue;
            }
            c.start_close(1001, "server shutting down", now + grace);
            self.schedule(id, now + grace);
            self.mark_dirty(id);
            // Its rooms hear nothing: every member is closing, and closing ones get no frames.
            self.end_member(id);
        }
    }
}

#[cfg(test)]
mod sink_tests;
