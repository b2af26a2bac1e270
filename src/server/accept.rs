//! Accepting sockets and answering their HTTP head: accept (with the caps of
//! [`super::admission::at_accept`]), the head read within its bound, the router (`/health`, the page, the REST API, the
//! `Host` allow-list) and the switch to WebSocket once [`super::admission::admit`] lets a
//! request in.

use std::io::{self, Read};
use std::time::{Duration, Instant};

use log::{debug, warn};
use mio::{Interest, Token};

use super::admission::AtAccept;
use super::conn::{Conn, Life, Phase};
use super::http::{self, Head, Parsed, Response};
use super::timers::Timer;
use super::wire::Wire;
use super::{CLOSE_GRACE, Server, admission, api, now_of, unix_secs, would_block};
use crate::auth;

/// How long to wait before accepting again after `accept` failed for want of descriptors or
/// memory.
const ACCEPT_RETRY: Duration = Duration::from_millis(100);

/// The browser client, compiled in.
const INDEX_HTML: &str = include_str!("../client/index.html");

impl Server {
    pub(super) fn accept(&mut self, now: Instant) {
        loop {
            let Some(listener) = &self.listener else {
                self.accept_retry_at = None;
                return;
            };
            let (stream, addr) = match listener.accept() {
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
            let ip = addr.ip();
            let from_ip = self.per_ip.get(&ip).copied().unwrap_or(0);
            let refuse = match admission::at_accept(self.conns.len(), from_ip, self.cfg()) {
                AtAccept::Drop(why) => {
                    debug!("dropping connection from {addr}: {why}");
                    continue;
                }
                AtAccept::Refuse => true,
                AtAccept::Serve => false,
            };
            let _ = stream.set_nodelay(true);
            #[cfg(feature = "tls")]
            let mut stream = match &self.tls {
                None => super::stream::Stream::Plain(stream),
                Some(config) => match super::tls::TlsStream::new(stream, config) {
                    Ok(t) => super::stream::Stream::Tls(Box::new(t)),
                    Err(e) => {
                        warn!("TLS connection from {addr} not started: {e}");
                        continue;
                    }
                },
            };
            #[cfg(not(feature = "tls"))]
            let mut stream = stream;
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
            entry.insert(Conn::new(stream, ip, deadline));
            *self.per_ip.entry(ip).or_insert(0) += 1;
            if refuse {
                let refusal = Response::text(429, "too many connections from your address\n");
                self.respond(id, refusal, now);
            } else {
                self.schedule(id);
            }
        }
    }

    pub(super) fn read_head(&mut self, id: usize, now: Instant) {
        let max = self.cfg().max_head_bytes;
        let Some(c) = self.conns.get_mut(id) else {
            return;
        };
        let Phase::Http { head, .. } = &mut c.phase else {
            return;
        };
        let mut buf = [0u8; 4096];
        let mut eof = false;
        // Never past the bound: a connection whose answer is pending (a REST page being read)
        // or already queued is not parsed again, and must not keep buffering what it sends.
        while head.len() <= max {
            match c.stream.read(&mut buf) {
                Ok(0) => {
                    eof = true;
                    break;
                }
                Ok(n) => head.extend_from_slice(&buf[..n]),
                Err(e) if would_block(&e) => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(_) => {
                    eof = true;
                    break;
                }
            }
        }
        if c.life != Life::Open || c.page_pending.is_some() {
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

    pub(super) fn respond(&mut self, id: usize, response: Response, now: Instant) {
        let Some(c) = self.conns.get_mut(id) else {
            return;
        };
        c.out.extend_from_slice(&response.to_bytes());
        c.finish_by(now + CLOSE_GRACE);
        self.schedule(id);
        self.mark_dirty(id);
    }

    pub(super) fn route(&mut self, id: usize, head: Head, now: Instant) {
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
                        tls_refused: self.tls_refused,
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
    pub(super) fn health(&mut self) -> Response {
        if self.chat.store_available() {
            Response::text(200, "ok")
        } else {
            Response::text(503, "store unavailable")
        }
    }

    /// Checks an upgrade request ([`admission::admit`]) and, when it passes, switches the
    /// connection to WebSocket and hands the new member to the core. Refusals come back as the
    /// response to send.
    pub(super) fn upgrade(&mut self, id: usize, head: &Head, now: Instant) -> Result<(), Response> {
        if !self.conns.contains(id) {
            return Ok(());
        }
        let chat = &self.chat;
        let admission::Admission {
            key,
            name,
            identity,
        } = admission::admit(head, self.ws_count, chat.config(), unix_secs(), |n| {
            chat.check_name(n)
        })?;

        let cfg = self.chat.config();
        let (ping, pong, idle) = (cfg.ping_interval, cfg.pong_timeout, cfg.idle_timeout);
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
        c.timers.stop(Timer::Head);
        c.timers.set(Timer::Pong, now + pong);
        c.timers.set(Timer::Idle, now + idle);
        c.timers.set(Timer::Ping, now + ping);
        if let Some(exp) = identity
            .as_ref()
            .and_then(|i| i.exp)
            .and_then(|exp| auth::session_deadline(exp, unix_secs(), now))
        {
            c.timers.set(Timer::TokenExpiry, exp);
        }
        c.timer_at = None;
        self.ws_count += 1;
        self.mark_dirty(id);
        let member_id = identity.map(|i| i.sub);
        self.core(|chat, sink| chat.connect(now_of(now), id, name.as_deref(), member_id, sink));
        self.schedule(id);
        // Frames the client sent right behind its head are already buffered: read them now,
        // since no new readiness event will come for them.
        self.read_frames(id, now);
        Ok(())
    }
}
