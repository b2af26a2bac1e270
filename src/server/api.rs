//! The REST API and `/metrics`: read-only views of the chat core, rendered as JSON or text.
//!
//! Everything is answered from the core's memory at once, except a room's messages: that page
//! is asked of the history engine, and the HTTP answer ([`page_response`]) is written when the
//! engine replies ([`Answer::Later`]); the loop does not wait.

use std::fmt::Write as _;

use serde::Serialize;
use serde_json::json;

use super::http::{Head, Response};
use crate::auth::{self, AuthError, Policy};
use crate::chat::{Chat, Outbox, RestPage};
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
    /// Connections the TLS layer refused: plain HTTP on the TLS port, failed handshakes,
    /// garbage records (always 0 without TLS).
    pub tls_refused: u64,
}

fn error(status: u16, code: &str, message: String) -> Response {
    Response::json(status, &json!({"error": code, "message": message}))
}

/// Whether the request may read the REST API (`/api`, `/api/...`) and `/metrics`: the one
/// place that decides it. With auth off, anyone may; with `--jwt-secret`, a token valid under
/// the same rules as for `/ws` (`Authorization: Bearer` or `?token=`) is needed, except for
/// `/metrics` with `--metrics-public`. Other paths are not its business and pass. A refusal
/// is the `401` to send. (A server API key, when one comes, is to be accepted here too.)
pub fn authorize(cfg: &Config, head: &Head, unix_now: u64) -> Result<(), Response> {
    let path = head.path.as_str();
    let api = path == "/api" || path.starts_with("/api/");
    let metrics = path == "/metrics";
    if !(api || (metrics && !cfg.metrics_public)) {
        return Ok(());
    }
    let Some(policy) = Policy::of(cfg) else {
        return Ok(());
    };
    let refused = |e: AuthError| {
        error(401, "unauthorized", e.text().to_string()).with_header("WWW-Authenticate", "Bearer")
    };
    let token = head
        .token()
        .map_err(|_| refused(AuthError::Malformed))?
        .ok_or_else(|| refused(AuthError::Missing))?;
    auth::verify(&token, &policy, unix_now)
        .map(|_| ())
        .map_err(refused)
}

/// Answers `/api/...` and `/metrics`; `None` when the path is not one of them. `out` takes
/// what the core sends while a page is asked for (the memory engine answers at once).
pub fn route(
    chat: &mut Chat,
    head: &Head,
    t: TransportStats,
    out: &mut impl Outbox,
) -> Option<Answer> {
    let path = head.path.as_str();
    let known = path == "/metrics"
        || path == "/api/stats"
        || path == "/api/rooms"
        || path == "/api/members"
        || path.starts_with("/api/rooms/");
    if !known {
        return None;
    }
    if head.method != "GET" {
        return Some(Answer::Now(Response::method_not_allowed("GET")));
    }
    if let Some(rest) = path.strip_prefix("/api/rooms/") {
        return Some(room_route(chat, head, rest, out));
    }
    Some(Answer::Now(match path {
        "/api/stats" => Response::json(200, &stats_json(chat, t)),
        "/api/members" => Response::json(200, &chat.member_names()),
        "/api/rooms" => {
            let rooms: Vec<_> = chat
                .room_list()
                .into_iter()
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

fn room_route(chat: &mut Chat, head: &Head, rest: &str, out: &mut impl Outbox) -> Answer {
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
    json!({
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
    })
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
