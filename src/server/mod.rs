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
//! - Each connection keeps its deadlines in a timer table; the loop's heap holds the earliest
//!   of each, and the poll timeout is the next deadline, so an idle server does not wake up.
//! - SIGINT/SIGTERM arrive through a self-pipe; the store's writer thread and [`Stopper`] wake
//!   the loop through a `Waker`.
//!
//! Where each concern lives:
//!
//! - `mod.rs` — the loop: bind, poll, dispatch an event, the turn (backlog, timers, closes,
//!   flush), reading frames into the core, dropping a connection.
//! - `accept.rs` — accepting sockets, reading the head, the router, and the switch to
//!   WebSocket.
//! - `admission.rs` — pure decisions: `at_accept` (socket and per-address caps) and `admit`,
//!   whether a `/ws` request becomes a member (handshake headers, origin, token, member cap,
//!   name).
//! - `conn.rs` — one connection: its phase, its `Life` (open, close queued, closing, write
//!   side shut) and the transitions, its socket reads and writes.
//! - `closing.rs` — every close the server decides: a [`Close`] is queued
//!   with `close_later` and written by `process_closing`, the one place that turns it into a
//!   close frame; read errors and the shutdown end there too.
//! - `timers.rs` — `TimerTable` (one deadline per `Timer`: head, close grace, token expiry,
//!   pong, idle, ping) and `timer_due`, the one place each timer is acted on.
//! - `output.rs` — the `Sink` (the output bound and reply credit) and which buffers are kept.
//! - [`startup`] — the info lines logged at start (version, address, store, auth, origin
//!   rule, trusted proxies).
//! - `listen.rs` — the listening socket (`SO_REUSEPORT` for `--reuse-port`, the backlog).
//! - `stream.rs` — the socket under a connection, plain or TLS (an enum); `tls.rs` (feature
//!   `tls`) — certificate and key, their reload on `SIGHUP`, rustls driven from the loop.
//! - [`wire`] — the WebSocket read path without a socket; [`http`] — heads and responses;
//!   [`api`] — the REST endpoints.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap};
use std::io::{self, Read};
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use log::info;
use mio::net::{TcpListener, UnixStream};
use mio::{Events, Interest, Poll, Token, Waker};
use slab::Slab;
use tungstenite::Message;
use tungstenite::protocol::WebSocketConfig;

use crate::chat::{Chat, Close, Now};
use crate::config::Config;

mod accept;
mod admission;
pub mod api;
mod closing;
mod conn;
pub mod http;
mod listen;
mod output;
pub mod report;
#[cfg(feature = "server-api")]
mod server_api;
pub mod startup;
mod stream;
mod timers;
#[cfg(feature = "tls")]
mod tls;
pub mod wire;

use conn::{Conn, Drained, Life, Phase};
use output::Sink;
use timers::Timer;
use wire::{Next, ReadLimits};

const LISTENER: Token = Token(usize::MAX - 1);
const WAKER: Token = Token(usize::MAX - 2);
const SIGNAL: Token = Token(usize::MAX - 3);
/// `SIGHUP`: reload the TLS certificate and key.
#[cfg(feature = "tls")]
const RELOAD: Token = Token(usize::MAX - 4);

/// Messages read from one connection before the loop turns to others; the rest waits for the
/// next iteration, so one busy client cannot starve the room.
const READ_BUDGET: usize = 64;
/// How long a connection closed by the server may take to receive its close frame.
const CLOSE_GRACE: Duration = Duration::from_secs(2);

/// How long after the shutdown grace the history store may take to write what it holds (the
/// writer then gets half a second more to stop): a shutdown ends within grace + 5 s.
const STORE_CLOSE_SLACK: Duration = Duration::from_secs(4);

/// How soon after connections go the heap is trimmed, so that a mass disconnect gives its
/// memory back without waiting for traffic to resume.
const IDLE_TRIM_DELAY: Duration = Duration::from_millis(500);
/// Connections dropped (or the last one) that make a trim worth its walk over the heap.
const TRIM_AFTER_DROPS: usize = 64;

/// How soon after the traffic stops the output buffers kept for busy connections are freed.
const BUFFER_RELEASE_DELAY: Duration = Duration::from_millis(100);

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
    /// Connections not read while a command of theirs waits for the engine (see `unpark`).
    parked: Vec<usize>,
    closing: Vec<(usize, Close)>,
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
    /// Refusals and closes: logged once each, summed up in floods, counted by reason.
    report: report::Report,
    /// The TLS settings new connections get (certificate and key), when the port speaks TLS.
    #[cfg(feature = "tls")]
    tls: Option<Arc<rustls::ServerConfig>>,
    /// The `SIGHUP` pipe's reading end.
    #[cfg(feature = "tls")]
    reload: Option<UnixStream>,
    /// Connections the TLS layer refused (plain HTTP, failed handshakes, garbage records).
    tls_refused: u64,
}

fn now_of(mono: Instant) -> Now {
    let unix_ms = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64);
    Now { mono, unix_ms }
}

/// The address to listen on: `host` as an IP address (IPv6 with or without brackets), else
/// the first address its name resolves to. The error names the host.
fn resolve(host: &str, port: u16) -> io::Result<SocketAddr> {
    use std::net::ToSocketAddrs;
    let bare = host
        .strip_prefix('[')
        .and_then(|h| h.strip_suffix(']'))
        .unwrap_or(host);
    if let Ok(ip) = bare.parse::<IpAddr>() {
        return Ok(SocketAddr::new(ip, port));
    }
    let shown = crate::log_safe(host);
    let found = (host, port).to_socket_addrs().map_err(|e| {
        io::Error::new(
            e.kind(),
            format!("cannot resolve host '{shown}': {}", os_text(&e)),
        )
    })?;
    found.into_iter().next().ok_or_else(|| {
        io::Error::new(
            io::ErrorKind::NotFound,
            format!("cannot resolve host '{shown}': it has no address"),
        )
    })
}

/// An I/O error as a phrase: `address already in use` (no capital, no `(os error 98)`).
fn os_text(e: &io::Error) -> String {
    let mut text = e.to_string();
    if let Some(i) = text.find(" (os error") {
        text.truncate(i);
    }
    if let Some(first) = text.get_mut(..1) {
        first.make_ascii_lowercase();
    }
    text
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
        let addr = resolve(&cfg.host, cfg.port)?;
        #[cfg(feature = "tls")]
        let tls = match (cfg.tls_cert.is_empty(), cfg.tls_key.is_empty()) {
            (false, false) => {
                Some(tls::load(&cfg.tls_cert, &cfg.tls_key).map_err(io::Error::other)?)
            }
            _ => None,
        };
        if !cfg.jwt_public_key.is_empty() {
            crate::auth_keys::load(&cfg.jwt_public_key).map_err(io::Error::other)?;
        }
        let poll = Poll::new()?;
        let mut listener = listen::listen(addr, &cfg)?;
        let local = listener.local_addr()?;
        poll.registry()
            .register(&mut listener, LISTENER, Interest::READABLE)?;
        let waker = Arc::new(Waker::new(poll.registry(), WAKER)?);
        let notify_waker = waker.clone();
        let notify: Box<dyn Fn() + Send> = Box::new(move || {
            let _ = notify_waker.wake();
        });
        #[cfg(feature = "cluster")]
        let node = (!cfg.redis.is_empty()).then(crate::cluster::ClusterEngine::new_node_id);
        #[cfg(feature = "cluster")]
        let engine: Box<dyn crate::store::engine::Engine> = match &node {
            Some(node) => Box::new(
                crate::cluster::ClusterEngine::open(&cfg, node.clone(), notify)
                    .map_err(io::Error::other)?,
            ),
            None => crate::store::open_engine(
                &cfg.db_path,
                cfg.memory_history_per_room,
                crate::store::Retention::from_config(&cfg),
                notify,
            )
            .map_err(io::Error::other)?,
        };
        #[cfg(not(feature = "cluster"))]
        let engine = crate::store::open_engine(
            &cfg.db_path,
            cfg.memory_history_per_room,
            crate::store::Retention::from_config(&cfg),
            notify,
        )
        .map_err(io::Error::other)?;
        let report = report::Report::new(cfg.log_summary_window);
        let ws_config = wire::websocket_config(&cfg);
        let read_limits = ReadLimits::from_config(&cfg);
        let ids: crate::chat::MemberIds = Box::new(|| uuid::Uuid::new_v4().to_string());
        #[cfg(feature = "cluster")]
        let chat = match node {
            Some(node) => {
                log::info!("cluster: this is node {node}");
                Chat::new_cluster_node(cfg, engine, ids, node, Instant::now())
            }
            None => Chat::new(cfg, engine, ids),
        };
        #[cfg(not(feature = "cluster"))]
        let chat = Chat::new(cfg, engine, ids);
        Ok(Server {
            read_limits,
            poll,
            listener: Some(listener),
            local,
            signals: None,
            stop: Arc::new(AtomicBool::new(false)),
            waker,
            chat,
            conns: Slab::new(),
            per_ip: HashMap::new(),
            ws_count: 0,
            timers: BinaryHeap::new(),
            dirty: Vec::new(),
            backlog: Vec::new(),
            parked: Vec::new(),
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
            report,
            #[cfg(feature = "tls")]
            tls,
            #[cfg(feature = "tls")]
            reload: None,
            tls_refused: 0,
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
        #[cfg(feature = "tls")]
        if self.tls.is_some() || !self.cfg().jwt_public_key.is_empty() {
            let (read, write) = std::os::unix::net::UnixStream::pair()?;
            read.set_nonblocking(true)?;
            let mut read = UnixStream::from_std(read);
            self.poll
                .registry()
                .register(&mut read, RELOAD, Interest::READABLE)?;
            signal_hook::low_level::pipe::register(signal_hook::consts::SIGHUP, write)?;
            self.reload = Some(read);
        }
        Ok(())
    }

    /// Reads `--jwt-public-key` again (`SIGHUP`, with the certificate): tokens are checked with
    /// the new key from now on. A file that does not load is logged with its path and the
    /// error, and the key in use stays.
    #[cfg(feature = "tls")]
    pub fn reload_jwt_key(&mut self) {
        let path = &self.chat.config().jwt_public_key;
        if path.is_empty() {
            return;
        }
        match crate::auth_keys::load(path) {
            Ok(key) => info!("JWT public key ({}) reloaded from {path}", key.alg()),
            Err(e) => log::error!("JWT key reload failed, the old key stays in use: {e}"),
        }
    }

    /// Whether the port speaks TLS.
    pub fn is_tls(&self) -> bool {
        #[cfg(feature = "tls")]
        return self.tls.is_some();
        #[cfg(not(feature = "tls"))]
        false
    }

    /// Reads the certificate and key again (what `SIGHUP` does): new connections get the new
    /// ones, open connections keep theirs. A file that does not load is logged with its path
    /// and the error, and the certificate in use stays. `false` when nothing was replaced.
    #[cfg(feature = "tls")]
    pub fn reload_tls(&mut self) -> bool {
        if self.tls.is_none() {
            return false;
        }
        let cfg = self.chat.config();
        match tls::load(&cfg.tls_cert, &cfg.tls_key) {
            Ok(new) => {
                self.tls = Some(new);
                info!("TLS certificate reloaded from {}", cfg.tls_cert);
                true
            }
            Err(e) => {
                log::error!("TLS reload failed, the old certificate stays in use: {e}");
                false
            }
        }
    }

    /// Runs the loop until a shutdown completes: every client got close `1001` (or the grace
    /// ran out) and the history store is flushed.
    pub fn run(mut self) -> io::Result<()> {
        startup::log(self.cfg(), self.local, self.is_tls());
        if self.is_tls() {
            let cfg = self.chat.config();
            info!(
                "TLS only on this port (https, wss): certificate {}, key {}; SIGHUP reloads them",
                cfg.tls_cert, cfg.tls_key
            );
        }
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
                    #[cfg(feature = "tls")]
                    RELOAD => {
                        if let Some(s) = &mut self.reload {
                            let mut buf = [0u8; 64];
                            while matches!(s.read(&mut buf), Ok(n) if n > 0) {}
                        }
                        self.reload_tls();
                        self.reload_jwt_key();
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
            self.report.tick(now);
            self.unpark();
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
        self.report.finish();
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

    fn readable(&mut self, id: usize, now: Instant) {
        self.read_ready(id, now);
        // Over TLS, reading may make output of its own (handshake messages, the answer to a
        // key update), and plaintext queued during the handshake waits for its end.
        if self.conns.get(id).is_some_and(|c| c.pending() > 0) {
            self.mark_dirty(id);
        }
    }

    fn read_ready(&mut self, id: usize, now: Instant) {
        let budget = self.cfg().read_budget_bytes;
        if let Some(c) = self.conns.get_mut(id) {
            if c.close_started() {
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
            if let Some((id, room)) = self.take_waiter(token) {
                self.respond(id, api::page_response(&room, page), now);
            }
        }
        // Server API calls that waited for the engine (a publish until durable, a delete).
        #[cfg(feature = "server-api")]
        for (token, answer) in self.chat.take_api_answers() {
            if let Some((id, _)) = self.take_waiter(token) {
                self.respond(id, server_api::api_response(answer), now);
            }
        }
    }

    /// The connection (and room) that waits for the engine's answer `token`, when it still
    /// does: it may have closed meanwhile (its head timed out, say) and its id been reused, and
    /// then the answer has nowhere to go.
    fn take_waiter(&mut self, token: u64) -> Option<(usize, String)> {
        let (id, room) = self.rest_pages.remove(&token)?;
        let c = self.conns.get_mut(id)?;
        if c.page_pending != Some(token) || c.life != Life::Open {
            return None;
        }
        c.page_pending = None;
        Some((id, room))
    }

    fn read_frames(&mut self, id: usize, now: Instant) {
        let cfg_now = now_of(now);
        let max_pending = self.cfg().max_pending_output;
        let (pong, idle) = (self.cfg().pong_timeout, self.cfg().idle_timeout);
        for _ in 0..READ_BUDGET {
            let Some(c) = self.conns.get_mut(id) else {
                return;
            };
            if c.life != Life::Open {
                // A close is decided (by the core, backpressure or a timer): nothing more of
                // its input is served; once the close is under way the rest is discarded.
                return;
            }
            if self.chat.is_waiting(id) {
                // Its last command waits for the engine (a page, an id): the next one is read
                // once that is answered, so its answers keep the order of its commands.
                // (It may be pushed more than once; `unpark` takes each id once.)
                self.parked.push(id);
                return;
            }
            let next = c.read_message(self.iteration, max_pending);
            if !matches!(next, Next::Blocked) {
                c.timers.set(Timer::Pong, now + pong);
            }
            // Whatever tungstenite queued (pongs, close replies) must go out.
            if c.pending() > 0 {
                self.mark_dirty(id);
            }
            match next {
                Next::Message(Message::Text(text)) => {
                    if let Some(c) = self.conns.get_mut(id) {
                        if !idle.is_zero() {
                            c.timers.set(Timer::Idle, now + idle); // 0: no idle timeout
                        }
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
                        c.finish_by(now + CLOSE_GRACE);
                    }
                    self.schedule(id);
                    self.mark_dirty(id);
                    return;
                }
                Next::Blocked => return,
                Next::Spent => break,
                Next::OverBound => {
                    // Pongs and close replies count against the bound like everything else.
                    self.close_later(id, Close::SlowConsumer);
                    return;
                }
                Next::TooManyFragments => {
                    self.close_later(id, Close::TooManyFragments);
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

    /// Connections parked while a command of theirs waited for the engine go back to reading
    /// (through the backlog, so the next poll does not sleep) once it is answered.
    fn unpark(&mut self) {
        if self.parked.is_empty() {
            return;
        }
        // One pass over what the core awaits, not one per parked connection.
        let waiting: std::collections::HashSet<usize> = self.chat.waiting_conns().collect();
        let mut seen = std::collections::HashSet::new();
        for id in std::mem::take(&mut self.parked) {
            if !self.conns.contains(id) || !seen.insert(id) {
                continue;
            }
            if waiting.contains(&id) {
                self.parked.push(id);
            } else {
                self.defer(id);
            }
        }
    }

    /// Puts a connection whose read budget ran out on the backlog for the next turn.
    fn defer(&mut self, id: usize) {
        if self.conns.contains(id) && !self.backlog.contains(&id) {
            self.backlog.push(id);
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
        if let Some(why) = c.stream.take_refusal() {
            info!("refused a connection from {}: {why}", c.ip);
            self.tls_refused += 1;
        }
        if c.counted {
            self.ws_count -= 1;
        }
        if let Some(n) = self.per_ip.get_mut(&c.ip).filter(|_| c.ip_counted) {
            *n -= 1;
            if *n == 0 {
                self.per_ip.remove(&c.ip);
            }
        }
        self.backlog.retain(|&b| b != id);
        self.parked.retain(|&b| b != id);
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
            self.parked.shrink_to_fit();
            self.dirty.shrink_to_fit();
        }
        trim_heap();
    }
}

#[cfg(test)]
mod sink_tests;
