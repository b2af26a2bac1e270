//! The wire protocol: commands clients send, events the server sends, error codes.
//!
//! Commands are a closed serde enum tagged by `command` ([`Command`], re-exported here; each
//! command's struct and `apply` live in `chat/commands/<name>.rs`); events are another enum,
//! tagged by `event`.
//! Decoding goes in two steps so each failure gets its own code: the frame must be a JSON object
//! (`bad_json`), its `command` must be known (`unknown_command`), its fields must fit (`invalid`).

use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;
use serde_json::{Map, Value};

use crate::store::StoredMessage;

/// Longest `request_id` and `msg_id` in characters.
pub const MAX_ID_CHARS: usize = 64;

pub use super::commands::{
    Broadcast, Command, Direct, History, Join, Leave, List, ListRooms, Me, Ping,
};
#[cfg(feature = "server-api")]
pub use super::commands::{Delete, Kick};

/// Every command name, for telling `unknown_command` from `invalid`: [`Command::NAMES`].
pub const COMMAND_NAMES: &[&str] = Command::NAMES;

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
    /// The member's token does not allow it (its `rooms`, `publish`, `admin`; a read-only
    /// room); nothing changed.
    Forbidden,
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

/// The `data` field of a JSON object's text, as the sender wrote it (`None` when absent or
/// `null`); `invalid` for a repeated key. The server API reads its bodies' `data` with it.
pub fn raw_data(text: &str) -> Result<Option<RawJson>, CommandError> {
    #[derive(Deserialize)]
    struct DataOnly {
        data: Option<RawJson>,
    }
    serde_json::from_str::<DataOnly>(text)
        .map(|d| d.data)
        .map_err(|e| CommandError::new(ErrorCode::Invalid, strip_position(e)))
}

/// Reads `data` again from the frame's text, as the client wrote it. The parsed map above has
/// already turned `-0` into `-0.0`, `1e-400` into `0.0` and long integers into floats, and an
/// internally tagged enum cannot hold raw JSON, so the one field is read on its own.
fn with_raw_data(mut command: Command, text: &str) -> Result<Command, CommandError> {
    if let Command::Broadcast(Broadcast { data, .. }) | Command::Direct(Direct { data, .. }) =
        &mut command
    {
        *data = raw_data(text)?;
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
    /// Message `id` of `room` was removed by a moderator; its id stays taken.
    #[cfg(feature = "server-api")]
    Deleted {
        /// The room.
        room: &'a str,
        /// The message removed.
        id: u64,
    },
    /// The room was deleted: the member is no longer in it.
    #[cfg(feature = "server-api")]
    RoomClosed {
        /// The room.
        room: &'a str,
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
        assert_eq!(
            decode(r#"{"command":"me"}"#).command.unwrap(),
            Command::Me(Me {})
        );
        let r = decode(
            r#"{"command":"broadcast","message":"hi","room":"a","echo":false,"request_id":"r1"}"#,
        );
        assert_eq!(r.request_id.as_deref(), Some("r1"));
        match r.command.unwrap() {
            Command::Broadcast(Broadcast {
                message,
                room,
                echo,
                ..
            }) => {
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
            Command::Join(Join { since: Some(3), .. })
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
                Command::Broadcast(Broadcast { data, .. }) => assert_eq!(data.unwrap().get(), raw),
                other => panic!("{other:?}"),
            }
            let text = format!(r#"{{"command":"direct","to":"b","message":"m","data":{raw}}}"#);
            match decode(&text).command.unwrap() {
                Command::Direct(Direct { data, .. }) => assert_eq!(data.unwrap().get(), raw),
                other => panic!("{other:?}"),
            }
        }
        let absent = decode(r#"{"command":"broadcast","message":"m","data":null}"#);
        assert!(matches!(
            absent.command.unwrap(),
            Command::Broadcast(Broadcast { data: None, .. })
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

    /// The exact answers `decode` gave before the commands became structs (issue 10): codes,
    /// messages and the echoed `request_id`, for each way a frame can be wrong.
    #[test]
    fn decode_errors_are_word_for_word_as_before() {
        let cases: &[(&str, ErrorCode, &str, Option<&str>)] = &[
            (
                r#"{"command":"list","room":5}"#,
                ErrorCode::Invalid,
                "invalid type: integer `5`, expected a string",
                None,
            ),
            (
                r#"{"command":"broadcast"}"#,
                ErrorCode::Invalid,
                "missing field `message`",
                None,
            ),
            (
                r#"{"command":"broadcast","message":5}"#,
                ErrorCode::Invalid,
                "invalid type: integer `5`, expected a string",
                None,
            ),
            (
                r#"{"command":"broadcast","message":"hi","room":7}"#,
                ErrorCode::Invalid,
                "invalid type: integer `7`, expected a string",
                None,
            ),
            (
                r#"{"command":"broadcast","message":"hi","echo":"yes"}"#,
                ErrorCode::Invalid,
                "invalid type: string \"yes\", expected a boolean",
                None,
            ),
            (
                r#"{"command":"broadcast","message":"hi","msg_id":3}"#,
                ErrorCode::Invalid,
                "invalid type: integer `3`, expected a string",
                None,
            ),
            (
                r#"{"command":"broadcast","message":"hi","data":1,"data":2}"#,
                ErrorCode::Invalid,
                "duplicate field `data`",
                None,
            ),
            (
                r#"{"command":"broadcast","message":["x"]}"#,
                ErrorCode::Invalid,
                "invalid type: sequence, expected a string",
                None,
            ),
            (
                r#"{"command":"broadcast","message":null}"#,
                ErrorCode::Invalid,
                "invalid type: null, expected a string",
                None,
            ),
            (
                r#"{"command":"broadcast","message":"m","data":[1,}"#,
                ErrorCode::BadJson,
                "not valid JSON: expected value at line 1 column 48",
                None,
            ),
            (
                r#"{"command":"join"}"#,
                ErrorCode::Invalid,
                "missing field `room`",
                None,
            ),
            (
                r#"{"command":"join","room":"a","last_n":-1}"#,
                ErrorCode::Invalid,
                "invalid value: integer `-1`, expected u64",
                None,
            ),
            (
                r#"{"command":"join","room":"a","last_n":"5"}"#,
                ErrorCode::Invalid,
                "invalid type: string \"5\", expected u64",
                None,
            ),
            (
                r#"{"command":"join","room":"a","since":1.5}"#,
                ErrorCode::Invalid,
                "invalid type: floating point `1.5`, expected u64",
                None,
            ),
            (
                r#"{"command":"join","room":1}"#,
                ErrorCode::Invalid,
                "invalid type: integer `1`, expected a string",
                None,
            ),
            (
                r#"{"command":"join","room":"a","since":18446744073709551616}"#,
                ErrorCode::Invalid,
                "invalid type: floating point `1.8446744073709552e+19`, expected u64",
                None,
            ),
            (
                r#"{"command":"leave"}"#,
                ErrorCode::Invalid,
                "missing field `room`",
                None,
            ),
            (
                r#"{"command":"leave","room":false}"#,
                ErrorCode::Invalid,
                "invalid type: boolean `false`, expected a string",
                None,
            ),
            (
                r#"{"command":"history"}"#,
                ErrorCode::Invalid,
                "missing field `room`",
                None,
            ),
            (
                r#"{"command":"history","room":"a","before":"x","limit":2}"#,
                ErrorCode::Invalid,
                "invalid type: string \"x\", expected u64",
                None,
            ),
            (
                r#"{"command":"history","room":"a","limit":{}}"#,
                ErrorCode::Invalid,
                "invalid type: map, expected u64",
                None,
            ),
            (
                r#"{"command":"direct"}"#,
                ErrorCode::Invalid,
                "missing field `to`",
                None,
            ),
            (
                r#"{"command":"direct","to":"b"}"#,
                ErrorCode::Invalid,
                "missing field `message`",
                None,
            ),
            (
                r#"{"command":"direct","message":"m"}"#,
                ErrorCode::Invalid,
                "missing field `to`",
                None,
            ),
            (
                r#"{"command":"direct","to":1,"message":"m"}"#,
                ErrorCode::Invalid,
                "invalid type: integer `1`, expected a string",
                None,
            ),
            (
                r#"{"command":"fly"}"#,
                ErrorCode::UnknownCommand,
                "unknown command 'fly'",
                None,
            ),
            (
                r#"{"command":""}"#,
                ErrorCode::UnknownCommand,
                "unknown command ''",
                None,
            ),
            (
                r#"{"command":"BROADCAST"}"#,
                ErrorCode::UnknownCommand,
                "unknown command 'BROADCAST'",
                None,
            ),
            (
                r#"{"command":7}"#,
                ErrorCode::Invalid,
                "command must be a string",
                None,
            ),
            (
                r#"{"command":null}"#,
                ErrorCode::Invalid,
                "command must be a string",
                None,
            ),
            (
                r#"{"command":["me"]}"#,
                ErrorCode::Invalid,
                "command must be a string",
                None,
            ),
            (
                r#"{"nope":1}"#,
                ErrorCode::Invalid,
                "missing field `command`",
                None,
            ),
            (r#"{}"#, ErrorCode::Invalid, "missing field `command`", None),
            (
                r#"[1]"#,
                ErrorCode::BadJson,
                "a command must be a JSON object",
                None,
            ),
            (
                r#""s""#,
                ErrorCode::BadJson,
                "a command must be a JSON object",
                None,
            ),
            (
                r#"not json"#,
                ErrorCode::BadJson,
                "not valid JSON: expected ident at line 1 column 2",
                None,
            ),
            (
                r#"{"command":"me","request_id":1}"#,
                ErrorCode::Invalid,
                "request_id must be a string",
                None,
            ),
            (
                r#"{"command":"me","request_id":"xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx"}"#,
                ErrorCode::Invalid,
                "request_id is longer than 64 characters",
                None,
            ),
            (
                r#"{"command":"fly","request_id":"r"}"#,
                ErrorCode::UnknownCommand,
                "unknown command 'fly'",
                Some("r"),
            ),
            (
                r#"{"command":"broadcast","request_id":"r"}"#,
                ErrorCode::Invalid,
                "missing field `message`",
                Some("r"),
            ),
        ];
        for (text, code, message, request_id) in cases {
            let r = decode(text);
            let e = r.command.expect_err(text);
            assert_eq!((e.code, e.message.as_str()), (*code, *message), "{text}");
            assert_eq!(r.request_id.as_deref(), *request_id, "{text}");
        }
        let long = format!(
            r#"{{"command":"join","room":"a","since":"{}"}}"#,
            "x".repeat(150)
        );
        let e = decode(&long).command.unwrap_err();
        assert_eq!(e.code, ErrorCode::Invalid);
        assert_eq!(
            e.message,
            format!(r#"invalid type: string "{}…"#, "x".repeat(98)),
            "cut at 120 characters"
        );
    }

    /// Commands without fields ignore any field sent along, and `null` is an absent field.
    #[test]
    fn extra_fields_and_nulls_decode_as_before() {
        let ok = |text: &str| decode(text).command.expect(text);
        let r = decode(r#"{"command":"me","extra":1,"request_id":"a"}"#);
        assert_eq!(r.command.unwrap(), Command::Me(Me {}));
        assert_eq!(r.request_id.as_deref(), Some("a"));
        assert_eq!(ok(r#"{"command":"me","room":5}"#), Command::Me(Me {}));
        assert_eq!(
            ok(r#"{"command":"rooms","x":[1]}"#),
            Command::Rooms(ListRooms {})
        );
        assert_eq!(
            ok(r#"{"command":"ping","request_id":null}"#),
            Command::Ping(Ping {})
        );
        assert_eq!(
            ok(r#"{"command":"list","room":null}"#),
            Command::List(List { room: None })
        );
        assert_eq!(
            ok(r#"{"command":"broadcast","message":"hi","echo":null,"msg_id":null,"room":null}"#),
            Command::Broadcast(Broadcast {
                message: "hi".into(),
                room: None,
                data: None,
                echo: None,
                msg_id: None,
            })
        );
        assert_eq!(
            ok(r#"{"command":"broadcast","message":"hi","message":"again"}"#),
            Command::Broadcast(Broadcast {
                message: "again".into(),
                room: None,
                data: None,
                echo: None,
                msg_id: None,
            }),
            "the last of repeated keys"
        );
        assert_eq!(
            ok(r#"{"command":"me","command":"ping"}"#),
            Command::Ping(Ping {})
        );
        assert_eq!(
            ok(r#"{"command":"direct","to":"b","message":"m","data":null}"#),
            Command::Direct(Direct {
                to: "b".into(),
                message: "m".into(),
                data: None,
            })
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
