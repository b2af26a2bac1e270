//! Accepting sockets and answering their HTTP head: accept (with the caps of
//! [`super::admission::at_accept`]), the head read within its bound, the router (`/health`, the page, the REST API, the
//! `Host` allow-list) and the switch to WebSocket once [`super::admission::admit`] lets a
//! request in.

use std::io::{self, Read};
use std::time::{Duration, Instant};

use log::warn;
use mio::{Interest, Token};

use super::admission::AtAccept;
use super::conn::{Conn, Life, Phase};
use super::http::{self, Head, Parsed, Response};
use super::timers::Timer;
use super::wire::Wire;
use super::{CLOSE_GRACE, Server, admission, api, now_of, unix_secs, would_block};
use crate::{auth, proxy};

/// How long to wait before accepting again after `accept` failed for want of descriptors or
/// memory.
const ACCEPT_RETRY: Duration = Duration::from_millis(100);

/// The browser client, compiled in (as `build.rs` leaves it: without indentation and comment
/// lines).
const INDEX_HTML: &str = include_str!(concat!(env!("OUT_DIR"), "/index.html"));

/// The admin page (cargo feature `admin-page`), compiled in. It answers only to the server API
/// key, and may not be framed (a page elsewhere could trick a click on its buttons).
#[cfg(feature = "admin-page")]
const ADMIN_HTML: &str = include_str!(concat!(env!("OUT_DIR"), "/admin.html"));

/// What a refusal's answer says: its text, or a JSON error's `message`.
fn refusal_text(r: &Response) -> String {
    let body = String::from_utf8_lossy(&r.body);
    if r.content_type == "application/json" {
        if let Ok(v) = serde_json::from_str::<serde_json::Value>(&body) {
            if let Some(m) = v.get("message").and_then(|m| m.as_str()) {
                return m.to_string();
            }
        }
    }
    body.into_owned()
}

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
            let ip = addr.ip().to_canonical();
            // A trusted proxy's sockets count against the address its heads name, not its own.
            let trusted = cfg!(feature = "deploy") && self.cfg().trusted_proxies.contains(ip);
            let from_ip = (!trusted).then(|| self.per_ip.get(&ip).copied().unwrap_or(0));
            let refuse = match admission::at_accept(self.conns.len(), from_ip, self.cfg()) {
                AtAccept::Drop(why) => {
                    let why = || why.to_string();
                    self.report
                        .refused(now, ip, admission::Refusal::Dropped, None, why);
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
            let c = entry.insert(Conn::new(stream, ip, deadline));
            if trusted {
                c.ip_counted = false;
            } else {
                *self.per_ip.entry(ip).or_insert(0) += 1;
            }
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
        #[cfg(feature = "server-api")]
        let max_body = self.cfg().max_api_body;
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
            Parsed::Complete(h) if h.len <= max => {
                // A body (the server API's) follows the head: wait until it is all here.
                #[cfg(feature = "server-api")]
                let body = {
                    let len = match http::body_length(&h, max_body) {
                        Ok(len) => len,
                        Err(refusal) => return self.respond(id, refusal, now),
                    };
                    // Only as many bytes as the body still lacks: a request reads no more
                    // than its head and its declared body (what follows an upgrade head
                    // stays unread).
                    while !eof && head.len() < h.len + len {
                        let want = (h.len + len - head.len()).min(buf.len());
                        match c.stream.read(&mut buf[..want]) {
                            Ok(0) => eof = true,
                            Ok(n) => head.extend_from_slice(&buf[..n]),
                            Err(e) if would_block(&e) => break,
                            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                            Err(_) => eof = true,
                        }
                    }
                    if head.len() < h.len + len {
                        if eof {
                            self.drop_conn(id);
                        }
                        return;
                    }
                    head[h.len..h.len + len].to_vec()
                };
                #[cfg(not(feature = "server-api"))]
                let body = Vec::new();
                self.route(id, h, &body, now)
            }
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

    /// Sends `response` and ends the connection once it is written. A refusal (its status
    /// says so, [`admission::Refusal::of_status`]) is reported: logged and counted.
    pub(super) fn respond(&mut self, id: usize, response: Response, now: Instant) {
        if let (Some(why), Some(c)) = (
            admission::Refusal::of_status(response.status),
            self.conns.get(id),
        ) {
            let status = Some(response.status);
            let detail = || refusal_text(&response);
            self.report.refused(now, c.ip, why, status, detail);
        }
        self.send(id, response, now);
    }

    /// Sends `response` and ends the connection once it is written, reporting nothing.
    fn send(&mut self, id: usize, response: Response, now: Instant) {
        let Some(c) = self.conns.get_mut(id) else {
            return;
        };
        let mut bytes = response.to_bytes();
        if c.head_only {
            // `HEAD`: the same head, `Content-Length` included, and no body.
            bytes.truncate(bytes.len() - response.body.len());
        }
        c.out.extend_from_slice(&bytes);
        c.finish_by(now + CLOSE_GRACE);
        self.schedule(id);
        self.mark_dirty(id);
    }

    pub(super) fn route(&mut self, id: usize, head: Head, body: &[u8], now: Instant) {
        let Some(c) = self.conns.get_mut(id) else {
            return;
        };
        // `HEAD` is answered as `GET` is, without the body (see `respond`).
        c.head_only = head.method == "HEAD";
        let get = head.method == "GET" || c.head_only;
        let client = proxy::client(c.peer, &head, &self.chat.config().trusted_proxies);
        if cfg!(feature = "deploy") && !c.ip_counted {
            // A trusted proxy's socket: from now on it counts against the client it names.
            c.ip = client.addr;
            c.ip_counted = true;
            let slot = self.per_ip.entry(client.addr).or_insert(0);
            let from_ip = *slot;
            *slot += 1;
            if let Err(refusal) = admission::at_head(from_ip, self.chat.config()) {
                return self.respond(id, refusal, now);
            }
        }
        let host = client
            .forwarded_host
            .as_deref()
            .or_else(|| head.header("host"));
        // DNS rebinding: a page on evil.example whose name now resolves here sends
        // `Host: evil.example`. Health checks often come by address, and tell nothing.
        if head.path != "/health" && !http::host_allowed(host, &self.cfg().allowed_hosts) {
            let r = Response::text(421, "this server does not answer to that host\n");
            return self.respond(id, r, now);
        }
        let response = match head.path.as_str() {
            // A 503 here answers a health check; it refuses nobody.
            "/health" if get => {
                let r = self.health(&head);
                return self.send(id, r, now);
            }
            "/" if get => {
                let mut r = Response::text(200, INDEX_HTML);
                r.content_type = "text/html; charset=utf-8";
                r
            }
            "/ws" if head.method == "GET" => match self.upgrade(id, &head, host, now) {
                Ok(()) => return,
                Err(r) => r,
            },
            "/ws" => Response::method_not_allowed("GET"),
            #[cfg(feature = "admin-page")]
            "/admin" if get => {
                let mut r = Response::text(200, ADMIN_HTML)
                    .with_header("Content-Security-Policy", "frame-ancestors 'none'")
                    .with_header("X-Frame-Options", "DENY")
                    .with_header("Cache-Control", "no-store");
                r.content_type = "text/html; charset=utf-8";
                r
            }
            #[cfg(feature = "admin-page")]
            "/admin" => Response::method_not_allowed("GET, HEAD"),
            "/health" | "/" => Response::method_not_allowed("GET, HEAD"),
            _ => match api::authorize(self.cfg(), &head, unix_secs()) {
                Err(refused) => refused,
                Ok(access) => {
                    let t = api::TransportStats {
                        connections: self.conns.len(),
                        uptime_secs: self.started.elapsed().as_secs(),
                        close_frames_lost: self.close_frames_lost,
                        report: self.report.counts(),
                        tls_refused: self.tls_refused,
                    };
                    let call = api::Call {
                        head: &head,
                        body,
                        access: &access,
                        now: now_of(now),
                    };
                    match self.core(|chat, sink| api::route(chat, &call, t, sink)) {
                        Some(api::Answer::Now(r)) => r,
                        Some(api::Answer::Later { token, room }) => {
                            return self.await_page(id, token, room, now);
                        }
                        #[cfg(feature = "server-api")]
                        Some(api::Answer::LaterApi { token }) => {
                            return self.await_page(id, token, String::new(), now);
                        }
                        None => Response::text(404, "not found\n"),
                    }
                }
            },
        };
        self.respond(id, response, now);
    }

    /// `200 ok`, or `503` while the history store cannot write or its backlog is full. Asked
    /// with `Accept: application/json`, the same as
    /// `{"status":"ok","connections":N,"members":N,"rooms":N,"uptime_secs":N}` (on `503`:
    /// `"status":"unavailable"` and a `reason`).
    pub(super) fn health(&mut self, head: &Head) -> Response {
        let cluster_down = {
            #[cfg(feature = "cluster")]
            {
                self.chat.cluster_down()
            }
            #[cfg(not(feature = "cluster"))]
            None::<String>
        };
        let reason = if cluster_down.is_some() {
            Some("Redis is unavailable")
        } else if !self.chat.engine_writable() {
            Some("the history store cannot write")
        } else if !self.chat.store_available() {
            Some("the history store's backlog is full")
        } else {
            None
        };
        let status = if reason.is_some() { 503 } else { 200 };
        if !cfg!(feature = "deploy") || !http::accepts_json(head) {
            return Response::text(
                status,
                if reason.is_some() {
                    "store unavailable"
                } else {
                    "ok"
                },
            );
        }
        // Written by hand: every value is a number or one of the fixed texts above.
        let (word, reason) = match reason {
            Some(r) => ("unavailable", format!(",\"reason\":\"{r}\"")),
            None => ("ok", String::new()),
        };
        let body = format!(
            "{{\"status\":\"{word}\",\"connections\":{},\"members\":{},\"rooms\":{},\"uptime_secs\":{}{reason}}}",
            self.conns.len(),
            self.chat.member_count(),
            self.chat.room_count(),
            self.started.elapsed().as_secs(),
        );
        let mut r = Response::text(status, body);
        r.content_type = "application/json";
        r
    }

    /// Checks an upgrade request ([`admission::admit`]) and, when it passes, switches the
    /// connection to WebSocket and hands the new member to the core. Refusals come back as the
    /// response to send.
    pub(super) fn upgrade(
        &mut self,
        id: usize,
        head: &Head,
        host: Option<&str>,
        now: Instant,
    ) -> Result<(), Response> {
        if !self.conns.contains(id) {
            return Ok(());
        }
        let chat = &self.chat;
        let admission::Admission {
            key,
            name,
            identity,
        } = admission::admit(head, host, self.ws_count, chat.config(), unix_secs(), |n| {
            chat.check_name(n)
        })?;
        // Cluster mode: no member is taken while Redis cannot be reached.
        #[cfg(feature = "cluster")]
        if let Some(r) = chat.cluster_refusal(name.is_none()) {
            return Err(Response::text(r.status, format!("{}\n", r.reason)));
        }

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
        if !idle.is_zero() {
            c.timers.set(Timer::Idle, now + idle); // 0: no idle timeout
        }
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
        let (member_id, perms) = match identity {
            Some(i) => (Some(i.sub), i.permissions),
            None => (None, crate::auth::Permissions::default()),
        };
        self.core(|chat, sink| {
            chat.connect_with(now_of(now), id, name.as_deref(), member_id, perms, sink)
        });
        self.schedule(id);
        // Frames the client sent right behind its head are already buffered: read them now,
        // since no new readiness event will come for them.
        self.read_frames(id, now);
        Ok(())
    }
}
