//! The REST API and `/metrics`: read-only views of the chat core, rendered as JSON or text,
//! and the server API (writes, with `X-API-Key`), whose calls are inputs to the core.
//!
//! Reads are answered from the core's memory at once, except a room's messages: that page
//! is asked of the history engine, and the HTTP answer ([`page_response`]) is written when the
//! engine replies ([`Answer::Later`]); the loop does not wait. A server publish is answered
//! once the message is durable and a delete once the message was found
//! (`Answer::LaterApi`, rendered in `server/server_api.rs`).

use std::fmt::Write as _;

use serde::Serialize;
use serde_json::json;
use sha2::{Digest, Sha256};

use super::http::{Head, Response};
use crate::auth::{self, AuthError, Permissions, Policy};
use crate::chat::{Chat, Now, Outbox, RestPage};
use crate::config::Config;
use crate::store::StoredMessage;
use crate::store::engine::RequestToken;

/// What a request to the API gets.
#[derive(Debug)]
pub enum Answer {
    /// The response, now.
    Now(Response),
    /// The response waits for the engine's page with this token (see
    /// [`Chat::take_rest_pages`]); [`page_response`] renders it.
    Later {
        /// The token [`Chat::request_rest_page`] gave.
        token: RequestToken,
        /// The room asked for, decoded.
        room: String,
    },
    #[cfg(feature = "server-api")]
    /// The response waits for a server API call's answer with this token (see
    /// `Chat::take_api_answers`); `server_api::api_response` renders it.
    LaterApi {
        /// The token the call returned.
        token: RequestToken,
    },
}

/// Who a request to `/api` or `/metrics` is, as [`authorize`] found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Access {
    /// Auth is off (or the path is open): everything readable.
    Open,
    /// The API key: the server API and every read.
    Key,
    /// A token: reads, filtered by its `rooms`.
    Token(Permissions),
}

impl Access {
    fn may_read(&self, room: &str) -> bool {
        if cfg!(not(feature = "server-api")) {
            // Tokens carry no permissions in such a build (they are refused).
            return true;
        }
        match self {
            Access::Token(p) => p.rooms.allows(room),
            Access::Open | Access::Key => true,
        }
    }
}

/// One request to the API: its head, its body, who sent it, and when.
#[derive(Debug)]
pub struct Call<'a> {
    /// The request head.
    pub head: &'a Head,
    /// The body (empty without one), at most `--max-api-body` bytes.
    pub body: &'a [u8],
    /// What [`authorize`] found.
    pub access: &'a Access,
    /// The time, for the core.
    pub now: Now,
}

/// Whether `given` is the API key, in constant time: both are hashed first, so neither
/// their contents nor their lengths change how long the comparison takes.
fn same_key(given: &str, key: &str) -> bool {
    let (a, b) = (
        Sha256::digest(given.as_bytes()),
        Sha256::digest(key.as_bytes()),
    );
    a.iter().zip(b.iter()).fold(0u8, |d, (x, y)| d | (x ^ y)) == 0
}

/// Gauges the transport knows and the core does not.
#[derive(Debug, Clone, Copy)]
pub struct TransportStats {
    /// Open sockets (HTTP and WebSocket).
    pub connections: usize,
    /// Seconds since start.
    pub uptime_secs: u64,
    /// Close frames never delivered: the client did not read them within the grace time.
    pub close_frames_lost: u64,
    /// Refusals and closes by reason.
    pub report: super::report::Counts,
    /// Connections the TLS layer refused: plain HTTP on the TLS port, failed handshakes,
    /// garbage records (always 0 without TLS).
    pub tls_refused: u64,
}

pub(super) fn error(status: u16, code: &str, message: String) -> Response {
    Response::json(status, &json!({"error": code, "message": message}))
}

/// Whether the request may use the REST API (`/api`, `/api/...`) and `/metrics`: the one
/// place that decides it. The server API (the writes) needs `X-API-Key` equal to
/// `--api-key` (compared in constant time; `404` while no key is set, `401` for a missing or
/// wrong one). Reads: with auth off, anyone may; with `--jwt-secret`, the API key or a token
/// valid under the same rules as for `/ws` (`Authorization: Bearer` or `?token=`) is needed,
/// except for `/metrics` with `--metrics-public`. Other paths are not its business and pass.
/// A refusal is the response to send.
pub fn authorize(cfg: &Config, head: &Head, unix_now: u64) -> Result<Access, Response> {
    let path = head.path.as_str();
    let api = path == "/api" || path.starts_with("/api/");
    let metrics = path == "/metrics";
    // Without the server API no key can be set (`Config::validate`).
    let key_ok = cfg!(feature = "server-api")
        && !cfg.api_key.is_empty()
        && head
            .header("x-api-key")
            .is_some_and(|k| same_key(k, &cfg.api_key));
    #[cfg(feature = "server-api")]
    if super::server_api::server_call(&head.method, path).is_some() {
        if cfg.api_key.is_empty() {
            return Err(error(
                404,
                "not_found",
                "the server API is off (no --api-key)".into(),
            ));
        }
        if !key_ok {
            return Err(error(
                401,
                "unauthorized",
                "the server API needs the header X-API-Key with the API key".into(),
            ));
        }
        return Ok(Access::Key);
    }
    if !(api || (metrics && !cfg.metrics_public)) {
        return Ok(Access::Open);
    }
    if key_ok {
        return Ok(Access::Key);
    }
    let Some(policy) = Policy::of(cfg) else {
        return Ok(Access::Open);
    };
    let refused = |e: AuthError| {
        error(401, "unauthorized", e.text().to_string()).with_header("WWW-Authenticate", "Bearer")
    };
    let token = head
        .token()
        .map_err(|_| refused(AuthError::Malformed))?
        .ok_or_else(|| refused(AuthError::Missing))?;
    auth::verify(&token, &policy, unix_now)
        .map(|identity| Access::Token(identity.permissions))
        .map_err(refused)
}

/// Answers `/api/...` and `/metrics`; `None` when the path is not one of them. `out` takes
/// what the core sends while a page is asked for (the memory engine answers at once).
pub fn route(
    chat: &mut Chat,
    call: &Call<'_>,
    t: TransportStats,
    out: &mut impl Outbox,
) -> Option<Answer> {
    let head = call.head;
    let path = head.path.as_str();
    #[cfg(feature = "server-api")]
    if let Some(server) = super::server_api::server_call(&head.method, path) {
        return Some(super::server_api::server_route(chat, call, server, out));
    }
    let known = path == "/metrics"
        || path == "/api/stats"
        || path == "/api/rooms"
        || path == "/api/members"
        || path.starts_with("/api/rooms/");
    if !known {
        return None;
    }
    if head.method != "GET" && head.method != "HEAD" {
        return Some(Answer::Now(Response::method_not_allowed("GET, HEAD")));
    }
    if let Some(rest) = path.strip_prefix("/api/rooms/") {
        return Some(room_route(chat, head, call.access, rest, out));
    }
    Some(Answer::Now(match path {
        "/api/stats" => Response::json(200, &stats_json(chat, t)),
        "/api/members" => Response::json(200, &chat.member_names()),
        "/api/rooms" => {
            let rooms: Vec<_> = chat
                .room_list()
                .into_iter()
                .filter(|(name, _, _)| call.access.may_read(name))
                .map(|(name, members, messages)| json!({"name": name, "members": members, "messages": messages}))
                .collect();
            Response::json(200, &rooms)
        }
        "/metrics" => Response {
            status: 200,
            content_type: "text/plain; version=0.0.4; charset=utf-8",
            headers: Vec::new(),
            body: metrics(chat, t).into_bytes(),
        },
        _ => Response::text(404, "not found\n"),
    }))
}

fn room_route(
    chat: &mut Chat,
    head: &Head,
    access: &Access,
    rest: &str,
    out: &mut impl Outbox,
) -> Answer {
    let now = |r: Response| Answer::Now(r);
    let (name, tail) = match rest.split_once('/') {
        Some((n, t)) => (n, Some(t)),
        None => (rest, None),
    };
    let Ok(name) = super::http::percent_decode(name) else {
        return now(error(
            400,
            "invalid",
            "the room name is badly escaped".into(),
        ));
    };
    if crate::chat::validate::room_name(&name).is_err() {
        // No such room can exist, and the name goes no further (not to the store, whose
        // errors are logged with the room).
        return now(error(
            404,
            "not_found",
            format!("room '{name}' does not exist"),
        ));
    }
    if !access.may_read(&name) {
        return now(error(
            403,
            "forbidden",
            format!("your token does not allow room '{name}'"),
        ));
    }
    match tail {
        None => now(match chat.room_detail(&name) {
            Some((members, messages)) => Response::json(
                200,
                &json!({"name": name, "members": members, "messages": messages}),
            ),
            None => error(404, "not_found", format!("room '{name}' does not exist")),
        }),
        Some("messages") => {
            let number = |key: &str| -> Result<Option<u64>, Response> {
                match head.query_param(key) {
                    Ok(None) => Ok(None),
                    Ok(Some(v)) => v.parse().map(Some).map_err(|_| {
                        error(
                            400,
                            "invalid",
                            format!("{key} must be a non-negative integer"),
                        )
                    }),
                    Err(_) => Err(error(400, "invalid", "the query is badly escaped".into())),
                }
            };
            let (limit, before) = match (number("limit"), number("before")) {
                (Ok(l), Ok(b)) => (l, b),
                (Err(r), _) | (_, Err(r)) => return now(r),
            };
            let token = chat.request_rest_page(&name, before, limit, out);
            Answer::Later { token, room: name }
        }
        Some(_) => now(error(
            404,
            "not_found",
            format!("no such resource under room '{name}'"),
        )),
    }
}

/// The answer to `GET /api/rooms/{room}/messages` once the engine replied: the page, `404` for
/// a room that never was, `503` when the history cannot be read now.
pub fn page_response(room: &str, page: RestPage) -> Response {
    match page {
        Ok(Some(page)) => {
            #[derive(Serialize)]
            struct Body<'a> {
                room: &'a str,
                messages: &'a [StoredMessage],
                more: bool,
            }
            Response::json(
                200,
                &Body {
                    room,
                    messages: &page.messages,
                    more: page.more,
                },
            )
        }
        Ok(None) => error(404, "not_found", format!("room '{room}' does not exist")),
        Err(e) => error(
            503,
            "unavailable",
            format!("the history of room '{room}' cannot be read now ({e}); retry later"),
        ),
    }
}

fn stats_json(chat: &Chat, t: TransportStats) -> serde_json::Value {
    let s = chat.stats();
    #[cfg_attr(not(feature = "server-api"), allow(unused_mut))]
    let mut v = json!({
        "members": chat.member_count(),
        "rooms": chat.room_count(),
        "connections": t.connections,
        "messages_in": s.messages_in,
        "messages_out": s.messages_out,
        "broadcasts": s.broadcasts,
        "slow_consumers_closed": s.slow_consumers_closed,
        "rate_limited": s.rate_limited,
        "flood_closed": s.flood_closed,
        "members_connected_total": s.members_connected_total,
        "uptime_secs": t.uptime_secs,
        "close_frames_lost": t.close_frames_lost,
        "tls_refused": t.tls_refused,
    });
    // Cluster mode: `members` and `rooms` above are the cluster's; the counters are this
    // node's; `cluster.connections` adds the other nodes' members to this node's sockets.
    #[cfg(feature = "cluster")]
    if let Some((node, nodes, remote)) = chat.cluster_view() {
        v["cluster"] = json!({
            "node": node,
            "nodes": nodes,
            "connections": t.connections + remote,
        });
    }
    #[cfg(feature = "server-api")]
    {
        v["api_calls"] = json!({
            "publish": s.api_calls.publish,
            "delete": s.api_calls.delete,
            "disconnect": s.api_calls.disconnect,
            "room_create": s.api_calls.room_create,
            "room_delete": s.api_calls.room_delete,
            "direct": s.api_calls.direct,
        });
    }
    v
}

fn metrics(chat: &Chat, t: TransportStats) -> String {
    let s = chat.stats();
    let rows: [(&str, &str, &str, u64); 12] = [
        (
            "chatterbox_members",
            "gauge",
            "Members connected now.",
            chat.member_count() as u64,
        ),
        (
            "chatterbox_rooms",
            "gauge",
            "Rooms in memory now.",
            chat.room_count() as u64,
        ),
        (
            "chatterbox_connections",
            "gauge",
            "Open sockets now.",
            t.connections as u64,
        ),
        (
            "chatterbox_messages_in_total",
            "counter",
            "Frames received from members.",
            s.messages_in,
        ),
        (
            "chatterbox_messages_out_total",
            "counter",
            "Event frames queued to members.",
            s.messages_out,
        ),
        (
            "chatterbox_broadcasts_total",
            "counter",
            "Member broadcasts stored.",
            s.broadcasts,
        ),
        (
            "chatterbox_slow_consumers_closed_total",
            "counter",
            "Connections closed as slow consumers.",
            s.slow_consumers_closed,
        ),
        (
            "chatterbox_rate_limited_total",
            "counter",
            "Commands dropped by the rate limit.",
            s.rate_limited,
        ),
        (
            "chatterbox_flood_closed_total",
            "counter",
            "Connections closed for flooding.",
            s.flood_closed,
        ),
        (
            "chatterbox_members_connected_total",
            "counter",
            "Members connected since start.",
            s.members_connected_total,
        ),
        (
            "chatterbox_uptime_seconds",
            "gauge",
            "Seconds since the server started.",
            t.uptime_secs,
        ),
        (
            "chatterbox_close_frames_lost_total",
            "counter",
            "Close frames a client did not take within the grace time.",
            t.close_frames_lost,
        ),
    ];
    let mut out = String::with_capacity(1024);
    for (name, kind, help, value) in rows {
        let _ = write!(
            out,
            "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {value}\n"
        );
    }
    t.report.prometheus(&mut out);
    process_metrics(&mut out);
    #[cfg(feature = "server-api")]
    {
        let a = s.api_calls;
        out.push_str(
            "# HELP chatterbox_api_calls_total Server API calls carried out (admin commands included).\n\
             # TYPE chatterbox_api_calls_total counter\n",
        );
        for (call, n) in [
            ("publish", a.publish),
            ("delete", a.delete),
            ("disconnect", a.disconnect),
            ("room_create", a.room_create),
            ("room_delete", a.room_delete),
            ("direct", a.direct),
        ] {
            let _ = writeln!(out, "chatterbox_api_calls_total{{call=\"{call}\"}} {n}");
        }
    }
    // TLS (issue 13).
    let _ = write!(
        out,
        "# HELP chatterbox_tls_refused_total Connections the TLS layer refused (plain HTTP, \
         failed handshakes, garbage records).\n# TYPE chatterbox_tls_refused_total counter\n\
         chatterbox_tls_refused_total {}\n",
        t.tls_refused
    );
    out
}

/// The process gauges (from `/proc/self`, left out where it is missing) and the build info.
fn process_metrics(out: &mut String) {
    if !cfg!(feature = "deploy") {
        return;
    }
    let gauge = |out: &mut String, name: &str, help: &str, value: u64| {
        let _ = write!(
            out,
            "# HELP {name} {help}\n# TYPE {name} gauge\n{name} {value}\n"
        );
    };
    if let Some(rss) = resident_pages().map(|p| p * page_size()) {
        gauge(
            out,
            "process_resident_memory_bytes",
            "Resident memory size in bytes.",
            rss,
        );
    }
    if let Some(fds) = open_fds() {
        gauge(out, "process_open_fds", "Open file descriptors.", fds);
    }
    let _ = write!(
        out,
        "# HELP chatterbox_build_info The version and cargo features of this binary.\n\
         # TYPE chatterbox_build_info gauge\n\
         chatterbox_build_info{{version=\"{}\",features=\"{}\"}} 1\n",
        env!("CARGO_PKG_VERSION"),
        super::startup::features()
    );
}

// `/proc` is read with libc directly: `std::fs` would add kilobytes to the smallest build.

fn page_size() -> u64 {
    // SAFETY: sysconf only reads a constant of the system.
    u64::try_from(unsafe { libc::sysconf(libc::_SC_PAGESIZE) }).unwrap_or(4096)
}

/// Resident set size in pages: the second field of `/proc/self/statm`.
fn resident_pages() -> Option<u64> {
    let mut buf = [0u8; 128];
    // SAFETY: a NUL-terminated path; `read` writes at most `buf.len()` bytes into `buf`; the
    // descriptor is closed on every path.
    let n = unsafe {
        let fd = libc::open(
            c"/proc/self/statm".as_ptr(),
            libc::O_RDONLY | libc::O_CLOEXEC,
        );
        if fd < 0 {
            return None;
        }
        let n = libc::read(fd, buf.as_mut_ptr().cast(), buf.len());
        libc::close(fd);
        usize::try_from(n).ok()?
    };
    let text = std::str::from_utf8(&buf[..n]).ok()?;
    text.split_ascii_whitespace().nth(1)?.parse().ok()
}

/// Open descriptors: the entries of `/proc/self/fd`, less the one listing it.
fn open_fds() -> Option<u64> {
    let mut n = 0u64;
    // SAFETY: a NUL-terminated path; entries are only counted (and their names read while the
    // directory is open); the directory is closed before returning.
    unsafe {
        let dir = libc::opendir(c"/proc/self/fd".as_ptr());
        if dir.is_null() {
            return None;
        }
        loop {
            let entry = libc::readdir(dir);
            if entry.is_null() {
                break;
            }
            if (*entry).d_name[0] != b'.' as libc::c_char {
                n += 1;
            }
        }
        libc::closedir(dir);
    }
    Some(n.saturating_sub(1))
}
