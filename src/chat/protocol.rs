//! The wire protocol: commands clients send, events the server sends, error codes.
//!
//! Commands are a closed serde enum tagged by `command`; events are another, tagged by `event`.
//! Decoding goes in two steps so each failure gets its own code: the frame must be a JSON object
//! (`bad_json`), its `command` must be known (`unknown_command`), its fields must fit (`invalid`).

use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;
use serde_json::{Map, Value};

use crate::store::StoredMessage;

/// Longest `request_id` and `msg_id` in characters.
pub const MAX_ID_CHARS: usize = 64;

/// A command from a client, fields as in SPEC §3.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(tag = "command", rename_all = "snake_case")]
pub enum Command {
    /// Who am I.
    Me,
    /// Members connected, or members of one room.
    List {
        /// Restrict to this room.
        room: Option<String>,
    },
    /// A message to a room.
    Broadcast {
        /// The text.
        message: String,
        /// Target room (default `general`).
        room: Option<String>,
        /// Any JSON, relayed and stored as the bytes sent (filled in by [`decode`]).
        #[serde(skip_deserializing)]
        data: Option<RawJson>,
        /// Whether the sender gets its own message (default true).
        echo: Option<bool>,
        /// Idempotency key.
        msg_id: Option<String>,
    },
    /// Enter a room (created on demand).
    Join {
        /// The room.
        room: String,
        /// How many recent messages to send.
        last_n: Option<u64>,
        /// Send every message after this id instead.
        since: Option<u64>,
    },
    /// Leave a room.
    Leave {
        /// The room.
        room: String,
    },
    /// Rooms that exist.
    Rooms,
    /// A page of a room's history.
    History {
        /// The room.
        room: String,
        /// Only messages with a smaller id.
        before: Option<u64>,
        /// Page size (capped).
        limit: Option<u64>,
    },
    /// A message to one member.
    Direct {
        /// The recipient's name.
        to: String,
        /// The text.
        message: String,
        /// Any JSON, relayed as the bytes sent (filled in by [`decode`]).
        #[serde(skip_deserializing)]
        data: Option<RawJson>,
    },
    /// Liveness check.
    Ping,
}

/// Every command name, for telling `unknown_command` from `invalid`.
pub const COMMAND_NAMES: &[&str] = &[
    "me",
    "list",
    "broadcast",
    "join",
    "leave",
    "rooms",
    "history",
    "direct",
    "ping",
];

/// Error codes of SPEC §3.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorCode {
    /// Not JSON, not an object, or a binary frame.
    BadJson,
    /// `command` names nothing we know.
    UnknownCommand,
    /// A field missing, of the wrong type, empty, too long, a bad name.
    Invalid,
    /// Not a member of that room.
    NotMember,
    /// No such member or room.
    NotFound,
    /// Over the command rate.
    RateLimited,
    /// Too many rooms, room full.
    LimitReached,
    /// The history store cannot take the message now (its backlog is full, or it cannot make
    /// the message's id durable); nothing changed, retry later.
    Unavailable,
}

/// A command that could not be carried out: its code and a sentence for people.
#[derive(Debug, Clone, PartialEq)]
pub struct CommandError {
    /// The machine-readable code.
    pub code: ErrorCode,
    /// The human-readable text.
    pub message: String,
}

impl CommandError {
    /// Builds an error.
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        CommandError {
            code,
            message: message.into(),
        }
    }
}

/// A decoded frame: the command (or why there is none) and the `request_id` to echo.
#[derive(Debug)]
pub struct Request {
    /// The `request_id` the answer must echo, when one was given and valid.
    pub request_id: Option<String>,
    /// The command, or the error to answer with.
    pub command: Result<Command, CommandError>,
}

/// Decodes one text frame into a [`Request`].
pub fn decode(text: &str) -> Request {
    let map: Map<String, Value> = match serde_json::from_str::<Value>(text) {
        Ok(Value::Object(map)) => map,
        Ok(_) => {
            return Request::error(None, ErrorCode::BadJson, "a command must be a JSON object");
        }
        Err(e) => return Request::error(None, ErrorCode::BadJson, format!("not valid JSON: {e}")),
    };
    let request_id = match map.get("request_id") {
        None | Some(Value::Null) => None,
        Some(Value::String(s)) if s.chars().count() <= MAX_ID_CHARS => Some(s.clone()),
        Some(Value::String(_)) => {
            return Request::error(
                None,
                ErrorCode::Invalid,
                "request_id is longer than 64 characters",
            );
        }
        Some(_) => return Request::error(None, ErrorCode::Invalid, "request_id must be a string"),
    };
    let has_data = map.contains_key("data");
    let command = match map.get("command") {
        Some(Value::String(name)) if COMMAND_NAMES.contains(&name.as_str()) => {
            serde_json::from_value::<Command>(Value::Object(map))
                .map_err(|e| CommandError::new(ErrorCode::Invalid, strip_position(e)))
                .and_then(|c| {
                    if has_data {
                        with_raw_data(c, text)
                    } else {
                        Ok(c)
                    }
                })
        }
        Some(Value::String(name)) => Err(CommandError::new(
            ErrorCode::UnknownCommand,
            format!("unknown command '{}'", truncate(name, 64)),
        )),
        Some(_) => Err(CommandError::new(
            ErrorCode::Invalid,
            "command must be a string",
        )),
        None => Err(CommandError::new(
            ErrorCode::Invalid,
            "missing field `command`",
        )),
    };
    Request {
        request_id,
        command,
    }
}

/// Reads `data` again from the frame's text, as the client wrote it. The parsed map above has
/// already turned `-0` into `-0.0`, `1e-400` into `0.0` and long integers into floats, and an
/// internally tagged enum cannot hold raw JSON, so the one field is read on its own.
fn with_raw_data(mut command: Command, text: &str) -> Result<Command, CommandError> {
    #[derive(Deserialize)]
    struct DataOnly {
        data: Option<RawJson>,
    }
    if let Command::Broadcast { data, .. } | Command::Direct { data, .. } = &mut command {
        *data = serde_json::from_str::<DataOnly>(text)
            .map_err(|e| CommandError::new(ErrorCode::Invalid, strip_position(e)))?
            .data;
    }
    Ok(command)
}

/// A JSON value kept as the exact text the client sent it in (no whitespace around it, every
/// byte inside as it came): `data` is relayed and stored verbatim, so numbers like `-0`,
/// `1e-400` or `123456789012345678901234567890` and repeated keys come back unchanged.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(transparent)]
pub struct RawJson(Box<RawValue>);

impl RawJson {
    /// Checks that `text` is one JSON value and keeps it as it is; `None` when it is not JSON.
    pub fn from_text(text: String) -> Option<Self> {
        RawValue::from_string(text).ok().map(RawJson)
    }

    /// The JSON text.
    pub fn get(&self) -> &str {
        self.0.get()
    }
}

/// Two raw values are equal when their bytes are.
impl PartialEq for RawJson {
    fn eq(&self, other: &Self) -> bool {
        self.get() == other.get()
    }
}

/// Serializes a parsed value (compactly): for tests and tools that build `data` in code.
impl From<Value> for RawJson {
    fn from(v: Value) -> Self {
        // A `Value` always serializes, and serializes to valid JSON.
        RawJson(serde_json::value::to_raw_value(&v).expect("a Value serializes"))
    }
}

impl Request {
    fn error(request_id: Option<String>, code: ErrorCode, message: impl Into<String>) -> Self {
        Request {
            request_id,
            command: Err(CommandError::new(code, message)),
        }
    }
}

/// serde_json's messages end in "at line 1 column 1" for values, which means nothing to a
/// client, and quote the offending value, which can be kilobytes: keep the message short.
fn strip_position(e: serde_json::Error) -> String {
    let s = e.to_string();
    let s = s.find(" at line ").map_or(s.as_str(), |i| &s[..i]);
    let short = truncate(s, 120);
    if short.len() < s.len() {
        format!("{short}…")
    } else {
        short.to_string()
    }
}

fn truncate(s: &str, max: usize) -> &str {
    match s.char_indices().nth(max) {
        Some((i, _)) => &s[..i],
        None => s,
    }
}

/// A room in the `rooms` event.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct RoomSummary {
    /// The room's name.
    pub name: String,
    /// Members in it now.
    pub members: usize,
}

/// An event to a client. Borrowed fields keep serialization free of copies.
#[derive(Debug, Serialize)]
#[serde(tag = "event", rename_all = "snake_case")]
pub enum Event<'a> {
    /// Who the member is.
    Me {
        /// The name.
        member: &'a str,
        /// The UUID.
        id: &'a str,
        /// Rooms the member is in (absent in the welcome).
        #[serde(skip_serializing_if = "Option::is_none")]
        rooms: Option<Vec<&'a str>>,
        /// Echoed request id.
        #[serde(skip_serializing_if = "Option::is_none")]
        request_id: Option<&'a str>,
    },
    /// A room message, or a system notice in a room.
    Broadcast {
        /// The room.
        room: &'a str,
        /// The sender (`system` for notices).
        member: &'a str,
        /// The text.
        message: &'a str,
        /// Sequence number (member messages only).
        #[serde(skip_serializing_if = "Option::is_none")]
        id: Option<u64>,
        /// Unix ms (member messages only).
        #[serde(skip_serializing_if = "Option::is_none")]
        ts: Option<u64>,
        /// Attached JSON.
        #[serde(skip_serializing_if = "Option::is_none")]
        data: Option<&'a RawJson>,
        /// Who joined (join notices).
        #[serde(skip_serializing_if = "Option::is_none")]
        joined: Option<&'a str>,
        /// Who left (leave notices).
        #[serde(skip_serializing_if = "Option::is_none")]
        left: Option<&'a str>,
    },
    /// A page of history.
    History {
        /// The room.
        room: &'a str,
        /// Ascending by id.
        messages: &'a [StoredMessage],
        /// Whether more exist beyond this page.
        more: bool,
        /// Echoed request id.
        #[serde(skip_serializing_if = "Option::is_none")]
        request_id: Option<&'a str>,
    },
    /// Member names.
    List {
        /// Names, oldest connection (or join) first.
        members: Vec<&'a str>,
        /// The room, when asked for one.
        #[serde(skip_serializing_if = "Option::is_none")]
        room: Option<&'a str>,
        /// Echoed request id.
        #[serde(skip_serializing_if = "Option::is_none")]
        request_id: Option<&'a str>,
    },
    /// Rooms in the server.
    Rooms {
        /// Name and member count of each.
        rooms: Vec<RoomSummary>,
        /// Echoed request id.
        #[serde(skip_serializing_if = "Option::is_none")]
        request_id: Option<&'a str>,
    },
    /// A direct message.
    Direct {
        /// Sender.
        from: &'a str,
        /// Recipient.
        to: &'a str,
        /// The text.
        message: &'a str,
        /// Unix ms.
        ts: u64,
        /// Attached JSON.
        #[serde(skip_serializing_if = "Option::is_none")]
        data: Option<&'a RawJson>,
        /// Echoed request id (the sender's copy only).
        #[serde(skip_serializing_if = "Option::is_none")]
        request_id: Option<&'a str>,
    },
    /// A command was carried out.
    Ack {
        /// Echoed request id.
        request_id: &'a str,
        /// The room it concerned.
        room: &'a str,
        /// The message id, for broadcasts.
        #[serde(skip_serializing_if = "Option::is_none")]
        id: Option<u64>,
    },
    /// A notice from the server to one member.
    System {
        /// The text.
        message: &'a str,
    },
    /// Answer to `ping`.
    Pong {
        /// Unix ms.
        ts: u64,
        /// Echoed request id.
        #[serde(skip_serializing_if = "Option::is_none")]
        request_id: Option<&'a str>,
    },
    /// A command failed.
    Error {
        /// The code.
        code: ErrorCode,
        /// For people.
        message: &'a str,
        /// Echoed request id.
        #[serde(skip_serializing_if = "Option::is_none")]
        request_id: Option<&'a str>,
    },
}

impl Event<'_> {
    /// Serializes the event as JSON text.
    pub fn to_json(&self) -> String {
        // Serializing these types cannot fail: every map key is a string.
        serde_json::to_string(self).unwrap_or_else(|_| String::from("{}"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn code(text: &str) -> ErrorCode {
        decode(text).command.unwrap_err().code
    }

    #[test]
    fn decodes_every_command_shape() {
        assert_eq!(decode(r#"{"command":"me"}"#).command.unwrap(), Command::Me);
        let r = decode(
            r#"{"command":"broadcast","message":"hi","room":"a","echo":false,"request_id":"r1"}"#,
        );
        assert_eq!(r.request_id.as_deref(), Some("r1"));
        match r.command.unwrap() {
            Command::Broadcast {
                message,
                room,
                echo,
                ..
            } => {
                assert_eq!(
                    (message.as_str(), room.as_deref(), echo),
                    ("hi", Some("a"), Some(false))
                );
            }
            other => panic!("{other:?}"),
        }
        assert!(matches!(
            decode(r#"{"command":"join","room":"x","since":3}"#)
                .command
                .unwrap(),
            Command::Join { since: Some(3), .. }
        ));
    }

    #[test]
    fn each_failure_has_its_code() {
        assert_eq!(code("not json"), ErrorCode::BadJson);
        assert_eq!(code("[1,2]"), ErrorCode::BadJson);
        assert_eq!(code("\"str\""), ErrorCode::BadJson);
        assert_eq!(code(r#"{"command":"fly"}"#), ErrorCode::UnknownCommand);
        assert_eq!(code(r#"{"nope":1}"#), ErrorCode::Invalid);
        assert_eq!(code(r#"{"command":7}"#), ErrorCode::Invalid);
        assert_eq!(code(r#"{"command":"broadcast"}"#), ErrorCode::Invalid);
        assert_eq!(
            code(r#"{"command":"broadcast","message":5}"#),
            ErrorCode::Invalid
        );
        assert_eq!(
            code(r#"{"command":"join","room":"a","since":-1}"#),
            ErrorCode::Invalid
        );
        let long = "x".repeat(65);
        assert_eq!(
            code(&format!(r#"{{"command":"me","request_id":"{long}"}}"#)),
            ErrorCode::Invalid
        );
        assert_eq!(
            code(r#"{"command":"me","request_id":1}"#),
            ErrorCode::Invalid
        );
    }

    #[test]
    fn data_keeps_the_bytes_sent_and_is_still_checked() {
        for raw in [
            "-0",
            "1e-400",
            "123456789012345678901234567890",
            r#"{"a":1,"a":2}"#,
        ] {
            let text = format!(r#"{{"command":"broadcast","message":"m","data":{raw}}}"#);
            match decode(&text).command.unwrap() {
                Command::Broadcast { data, .. } => assert_eq!(data.unwrap().get(), raw),
                other => panic!("{other:?}"),
            }
            let text = format!(r#"{{"command":"direct","to":"b","message":"m","data":{raw}}}"#);
            match decode(&text).command.unwrap() {
                Command::Direct { data, .. } => assert_eq!(data.unwrap().get(), raw),
                other => panic!("{other:?}"),
            }
        }
        let absent = decode(r#"{"command":"broadcast","message":"m","data":null}"#);
        assert!(matches!(
            absent.command.unwrap(),
            Command::Broadcast { data: None, .. }
        ));
        assert_eq!(
            code(r#"{"command":"broadcast","message":"m","data":[1,}"#),
            ErrorCode::BadJson
        );
        assert_eq!(
            code(r#"{"command":"broadcast","message":"m","data":1,"data":2}"#),
            ErrorCode::Invalid,
            "a repeated data field is ambiguous"
        );
    }

    #[test]
    fn request_id_survives_a_bad_command() {
        let r = decode(r#"{"command":"fly","request_id":"abc"}"#);
        assert_eq!(r.request_id.as_deref(), Some("abc"));
        assert!(r.command.is_err());
    }

    #[test]
    fn events_are_tagged_and_skip_absent_fields() {
        let v: Value = serde_json::from_str(
            &Event::Broadcast {
                room: "general",
                member: "system",
                message: "a has joined!",
                id: None,
                ts: None,
                data: None,
                joined: Some("a"),
                left: None,
            }
            .to_json(),
        )
        .unwrap();
        assert_eq!(
            v,
            serde_json::json!({"event":"broadcast","room":"general","member":"system","message":"a has joined!","joined":"a"})
        );
        let e = Event::Error {
            code: ErrorCode::NotMember,
            message: "m",
            request_id: Some("q"),
        };
        assert_eq!(
            e.to_json(),
            r#"{"event":"error","code":"not_member","message":"m","request_id":"q"}"#
        );
    }
}
