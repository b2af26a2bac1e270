//! What goes inside the frames: the timestamped payload and the little of the chatterbox
//! event format the generator needs (the event name and an error's code), found by byte
//! search instead of a JSON parse because it runs for every delivery.

use std::io::Write;

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Proto {
    /// chatterbox JSON commands and events; rooms via `join`.
    Chatterbox,
    /// Peers: every text frame received is relayed verbatim to all connected clients.
    Raw,
}

impl Proto {
    pub fn parse(s: &str) -> Result<Proto, String> {
        match s {
            "chatterbox" => Ok(Proto::Chatterbox),
            "raw" => Ok(Proto::Raw),
            _ => Err(format!("--proto must be chatterbox or raw, not '{s}'")),
        }
    }
}

/// One timestamped message: `~STEP.SENDER.ROOM.SEQ.TNS~` padded with `x` to the wanted size.
/// `TNS` is the intended send time on CLOCK_MONOTONIC (shared by every process of the host).
/// `SEQ` counts per (sender, room) within a step, from 0.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub struct Stamp {
    pub step: u32,
    pub sender: u32,
    pub room: u32,
    pub seq: u32,
    pub t_ns: u64,
}

pub fn write_stamp(out: &mut Vec<u8>, s: &Stamp, size: usize) {
    let start = out.len();
    write!(
        out,
        "~{}.{}.{}.{}.{}~",
        s.step, s.sender, s.room, s.seq, s.t_ns
    )
    .expect("Vec write");
    while out.len() - start < size {
        out.push(b'x');
    }
}

/// Parses a stamp starting at `b[0] == b'~'`.
pub fn parse_stamp(b: &[u8]) -> Option<Stamp> {
    let mut i = 1;
    let mut nums = [0u64; 5];
    for (n, slot) in nums.iter_mut().enumerate() {
        let start = i;
        let mut v: u64 = 0;
        while i < b.len() && b[i].is_ascii_digit() {
            v = v.wrapping_mul(10).wrapping_add((b[i] - b'0') as u64);
            i += 1;
        }
        if i == start || i >= b.len() {
            return None;
        }
        let want = if n == 4 { b'~' } else { b'.' };
        if b[i] != want {
            return None;
        }
        i += 1;
        *slot = v;
    }
    Some(Stamp {
        step: nums[0] as u32,
        sender: nums[1] as u32,
        room: nums[2] as u32,
        seq: nums[3] as u32,
        t_ns: nums[4],
    })
}

/// Finds the stamp in a frame (raw: the frame itself; chatterbox: inside `message`).
/// Names and room names cannot hold `~`, so the first `~` is the stamp.
pub fn find_stamp(frame: &[u8]) -> Option<Stamp> {
    let at = memchr::memchr(b'~', frame)?;
    parse_stamp(&frame[at..])
}

const EVENT_KEY: &[u8] = b"\"event\":\"";

/// The value of the top-level `"event"` key of a chatterbox event. The tag is the first key
/// in practice, so the common case is one prefix comparison.
pub fn event_name(frame: &[u8]) -> &[u8] {
    let start = if frame.len() > 10 && &frame[1..10] == EVENT_KEY {
        10
    } else {
        match memchr::memmem::find(frame, EVENT_KEY) {
            Some(i) => i + EVENT_KEY.len(),
            None => return b"",
        }
    };
    let rest = &frame[start..];
    match memchr::memchr(b'"', rest) {
        Some(end) => &rest[..end],
        None => b"",
    }
}

/// `"code":"..."` of an error event, for counting errors by kind.
pub fn error_code(frame: &[u8]) -> String {
    const KEY: &[u8] = b"\"code\":\"";
    memchr::memmem::find(frame, KEY)
        .and_then(|i| {
            let rest = &frame[i + KEY.len()..];
            memchr::memchr(b'"', rest).map(|e| String::from_utf8_lossy(&rest[..e]).into_owned())
        })
        .unwrap_or_else(|| "unknown".into())
}

pub fn broadcast_command(out: &mut Vec<u8>, room: &str, s: &Stamp, size: usize) {
    out.extend_from_slice(b"{\"command\":\"broadcast\",\"room\":\"");
    out.extend_from_slice(room.as_bytes());
    out.extend_from_slice(b"\",\"message\":\"");
    write_stamp(out, s, size);
    out.extend_from_slice(b"\"}");
}

pub fn leave_command(out: &mut Vec<u8>, room: &str) {
    out.extend_from_slice(b"{\"command\":\"leave\",\"room\":\"");
    out.extend_from_slice(room.as_bytes());
    out.extend_from_slice(b"\"}");
}

/// The room of a `history` event: the first `"room":"..."` of the frame (chatterbox writes
/// it before the messages, which have no `room` field).
pub fn history_room(frame: &[u8]) -> Option<&[u8]> {
    const KEY: &[u8] = b"\"room\":\"";
    let i = memchr::memmem::find(frame, KEY)? + KEY.len();
    let rest = &frame[i..];
    memchr::memchr(b'"', rest).map(|e| &rest[..e])
}

pub fn join_command(out: &mut Vec<u8>, room: &str) {
    out.extend_from_slice(b"{\"command\":\"join\",\"room\":\"");
    out.extend_from_slice(room.as_bytes());
    out.extend_from_slice(b"\"}");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stamp_round_trip_with_padding() {
        let s = Stamp {
            step: 3,
            sender: 917,
            room: 12,
            seq: 40_001,
            t_ns: 123_456_789_012,
        };
        let mut v = Vec::new();
        write_stamp(&mut v, &s, 64);
        assert_eq!(v.len(), 64);
        assert_eq!(parse_stamp(&v), Some(s));
    }

    #[test]
    fn stamp_inside_a_chatterbox_event() {
        let s = Stamp {
            step: 1,
            sender: 2,
            room: 0,
            seq: 7,
            t_ns: 99,
        };
        let mut cmd = Vec::new();
        broadcast_command(&mut cmd, "bench", &s, 10);
        let text = String::from_utf8(cmd).unwrap();
        let v: serde_json::Value = serde_json::from_str(&text).unwrap();
        let msg = v["message"].as_str().unwrap();
        let ev = format!(
            r#"{{"event":"broadcast","room":"bench","member":"lg_2","message":"{msg}","id":8,"ts":1}}"#
        );
        assert_eq!(event_name(ev.as_bytes()), b"broadcast");
        assert_eq!(find_stamp(ev.as_bytes()), Some(s));
    }

    #[test]
    fn history_room_is_the_first_room_field() {
        let ev = br#"{"event":"history","room":"cold42","messages":[{"id":1,"member":"a","message":"room","ts":1}],"more":false}"#;
        assert_eq!(history_room(ev), Some(&b"cold42"[..]));
        assert_eq!(history_room(br#"{"event":"history","messages":[]}"#), None);
    }

    #[test]
    fn truncated_or_foreign_text_is_no_stamp() {
        assert_eq!(parse_stamp(b"~1.2.3.4"), None);
        assert_eq!(parse_stamp(b"~1.2.3.4.5"), None);
        assert_eq!(find_stamp(b"member7 has joined!"), None);
        assert_eq!(parse_stamp(b"~1.2.x.4.5~"), None);
    }

    #[test]
    fn event_name_when_tag_is_not_first() {
        assert_eq!(
            event_name(br#"{"code":"rate_limited","event":"error"}"#),
            b"error"
        );
        assert_eq!(
            error_code(br#"{"code":"rate_limited","event":"error"}"#),
            "rate_limited"
        );
        assert_eq!(event_name(b"not json"), b"");
    }
}
