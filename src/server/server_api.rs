//! The server API (cargo feature `server-api`): the writes of `/api/...` that need the API
//! key — post, delete a message, disconnect a member, create and delete rooms, direct —
//! each turned into one input of the chat core ([`crate::chat::Chat::server_publish`] and
//! the others). [`super::api::authorize`] checked the key before any of this runs; answers
//! that wait for the engine come back as [`ApiAnswer`]s, rendered by [`api_response`].

use serde_json::json;

use super::api::{Answer, Call, error};
use super::http::Response;
use crate::chat::protocol::{CommandError, ErrorCode, RawJson};
use crate::chat::{ApiAnswer, Chat, Outbox, Reason, ServerPost};

/// A call of the server API, from its method and path (names still percent-encoded).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum ServerCall<'a> {
    Publish(&'a str),
    DeleteMessage(&'a str, &'a str),
    Disconnect(&'a str),
    CreateRoom,
    DeleteRoom(&'a str),
    Direct(&'a str),
}

pub(super) fn server_call<'a>(method: &str, path: &'a str) -> Option<ServerCall<'a>> {
    let parts: Vec<&str> = path.strip_prefix("/api/")?.split('/').collect();
    let call = match (method, parts.as_slice()) {
        ("POST", ["rooms"]) => ServerCall::CreateRoom,
        ("DELETE", ["rooms", r]) => ServerCall::DeleteRoom(r),
        ("POST", ["rooms", r, "messages"]) => ServerCall::Publish(r),
        ("DELETE", ["rooms", r, "messages", id]) => ServerCall::DeleteMessage(r, id),
        ("POST", ["members", m, "disconnect"]) => ServerCall::Disconnect(m),
        ("POST", ["direct", m]) => ServerCall::Direct(m),
        _ => return None,
    };
    Some(call)
}

/// The status a command error of the server API is answered with.
fn status_of(code: ErrorCode) -> u16 {
    match code {
        ErrorCode::NotFound => 404,
        ErrorCode::LimitReached => 409,
        ErrorCode::Forbidden => 403,
        ErrorCode::RateLimited => 429,
        ErrorCode::Unavailable => 503,
        _ => 400,
    }
}

fn command_error(e: &CommandError) -> Response {
    let code = serde_json::to_value(e.code).unwrap_or_default();
    Response::json(
        status_of(e.code),
        &json!({"error": code, "message": e.message}),
    )
}

/// A request body: a JSON object (`bad_json` otherwise), read through the same parser as
/// commands; its fields are taken with [`Body::text`] and [`Body::data`].
struct Body<'a> {
    text: &'a str,
    map: serde_json::Map<String, serde_json::Value>,
}

impl<'a> Body<'a> {
    fn parse(body: &'a [u8]) -> Result<Self, Response> {
        let bad = || error(400, "bad_json", "the body must be a JSON object".into());
        let text = std::str::from_utf8(body).map_err(|_| bad())?;
        match serde_json::from_str::<serde_json::Value>(text) {
            Ok(serde_json::Value::Object(map)) => Ok(Body { text, map }),
            _ => Err(bad()),
        }
    }

    /// A string field; `None` when absent or `null`, `invalid` when of another type.
    fn text(&mut self, key: &str) -> Result<Option<String>, Response> {
        match self.map.remove(key) {
            None | Some(serde_json::Value::Null) => Ok(None),
            Some(serde_json::Value::String(s)) => Ok(Some(s)),
            Some(_) => Err(error(400, "invalid", format!("{key} must be a string"))),
        }
    }

    /// A string field that must be there.
    fn required(&mut self, key: &str) -> Result<String, Response> {
        self.text(key)?
            .ok_or_else(|| error(400, "invalid", format!("missing field `{key}`")))
    }

    /// `data`, as the bytes sent.
    fn data(&self) -> Result<Option<RawJson>, Response> {
        if !self.map.contains_key("data") {
            return Ok(None);
        }
        crate::chat::protocol::raw_data(self.text).map_err(|e| command_error(&e))
    }
}

/// A path segment that names a room or member: decoded; `None` when badly escaped.
fn segment(s: &str) -> Option<String> {
    super::http::percent_decode(s).ok()
}

/// Carries out one server API call (the key was checked by [`authorize`]).
pub(super) fn server_route(
    chat: &mut Chat,
    call: &Call<'_>,
    server: ServerCall<'_>,
    out: &mut impl Outbox,
) -> Answer {
    match server_answer(chat, call, server, out) {
        Ok(answer) => answer,
        Err(response) => Answer::Now(response),
    }
}

fn server_answer(
    chat: &mut Chat,
    call: &Call<'_>,
    server: ServerCall<'_>,
    out: &mut impl Outbox,
) -> Result<Answer, Response> {
    let unknown_room = |r: &str| {
        error(
            404,
            "not_found",
            format!("room '{}' does not exist", crate::log_safe(r)),
        )
    };
    let unknown_member = |m: &str| {
        error(
            404,
            "not_found",
            format!("no member named '{}'", crate::log_safe(m)),
        )
    };
    // A room named in the path must be a valid room name; no such room can exist otherwise.
    let room_of = |r: &str| -> Result<String, Response> {
        segment(r)
            .filter(|r| crate::chat::validate::room_name(r).is_ok())
            .ok_or_else(|| unknown_room(r))
    };
    let ce = |e: CommandError| command_error(&e);
    match server {
        ServerCall::Publish(r) => {
            let room = room_of(r)?;
            let mut b = Body::parse(call.body)?;
            let post = ServerPost {
                room,
                member: b.text("member")?,
                message: b.required("message")?,
                data: b.data()?,
                msg_id: b.text("msg_id")?,
            };
            let token = chat.server_publish(call.now, post, out).map_err(ce)?;
            Ok(Answer::LaterApi { token })
        }
        ServerCall::DeleteMessage(r, id) => {
            let room = room_of(r)?;
            let no_id = || {
                error(
                    404,
                    "not_found",
                    format!("room '{room}' has no message {}", crate::log_safe(id)),
                )
            };
            if id.is_empty() || !id.bytes().all(|b| b.is_ascii_digit()) {
                return Err(no_id());
            }
            let id: u64 = id.parse().map_err(|_| no_id())?;
            let token = chat.delete_message(&room, id, out).map_err(ce)?;
            Ok(Answer::LaterApi { token })
        }
        ServerCall::Disconnect(m) => {
            let name = segment(m).ok_or_else(|| unknown_member(m))?;
            let reason = if call.body.iter().all(u8::is_ascii_whitespace) {
                None
            } else {
                Body::parse(call.body)?.text("reason")?
            };
            let reason = reason.as_deref().unwrap_or(crate::chat::KICK_REASON);
            let reason = Reason::new(reason).ok_or_else(|| {
                error(
                    400,
                    "invalid",
                    "reason must be at most 123 bytes without control characters".into(),
                )
            })?;
            chat.disconnect_member(&name, reason, "the API", out)
                .map_err(ce)?;
            Ok(Answer::Now(Response::empty(204)))
        }
        ServerCall::CreateRoom => {
            let name = Body::parse(call.body)?.required("name")?;
            let new = chat.create_room(&name).map_err(ce)?;
            let status = if new { 201 } else { 200 };
            Ok(Answer::Now(Response::json(status, &json!({"name": name}))))
        }
        ServerCall::DeleteRoom(r) => {
            let room = room_of(r)?;
            if room == crate::chat::DEFAULT_ROOM {
                return Err(error(
                    409,
                    "conflict",
                    "the room 'general' cannot be deleted".into(),
                ));
            }
            let token = chat.delete_room(&room, out).map_err(ce)?;
            Ok(Answer::LaterApi { token })
        }
        ServerCall::Direct(m) => {
            let name = segment(m).ok_or_else(|| unknown_member(m))?;
            let mut b = Body::parse(call.body)?;
            let message = b.required("message")?;
            let data = b.data()?;
            chat.server_direct(call.now, &name, &message, data.as_ref(), out)
                .map_err(ce)?;
            Ok(Answer::Now(Response::empty(204)))
        }
    }
}

/// The answer to a server API call that waited for the engine.
pub fn api_response(answer: ApiAnswer) -> Response {
    match answer {
        ApiAnswer::Published { room, id, repeat } => Response::json(
            if repeat { 200 } else { 201 },
            &json!({"room": room, "id": id}),
        ),
        ApiAnswer::Done => Response::empty(204),
        ApiAnswer::NotFound(m) => error(404, "not_found", m),
        ApiAnswer::Unavailable(m) => error(503, "unavailable", m),
    }
}
