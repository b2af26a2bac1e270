//! Validation of names and texts (SPEC §4), shared by the commands and the handshake.

use super::SYSTEM;
use super::protocol::{CommandError, ErrorCode, MAX_ID_CHARS};

/// Longest member name.
pub const MAX_MEMBER_NAME: usize = 32;
/// Longest room name.
pub const MAX_ROOM_NAME: usize = 64;

fn invalid(message: String) -> CommandError {
    CommandError::new(ErrorCode::Invalid, message)
}

fn name_chars_ok(s: &str) -> bool {
    s.bytes()
        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-'))
}

/// `^[A-Za-z0-9_.-]{1,32}$`, and not `system` in any case.
pub fn member_name(name: &str) -> Result<(), CommandError> {
    if name.is_empty() || name.len() > MAX_MEMBER_NAME || !name_chars_ok(name) {
        return Err(invalid(format!(
            "a member name is 1 to {MAX_MEMBER_NAME} of A-Z a-z 0-9 _ . -"
        )));
    }
    if name.eq_ignore_ascii_case(SYSTEM) {
        return Err(invalid("the name 'system' is reserved".into()));
    }
    Ok(())
}

/// `^[A-Za-z0-9_.-]{1,64}$`.
pub fn room_name(room: &str) -> Result<(), CommandError> {
    if room.is_empty() || room.len() > MAX_ROOM_NAME || !name_chars_ok(room) {
        return Err(invalid(format!(
            "a room name is 1 to {MAX_ROOM_NAME} of A-Z a-z 0-9 _ . -"
        )));
    }
    Ok(())
}

/// 1 to `max` characters, not only whitespace.
pub fn message_text(text: &str, max: usize) -> Result<(), CommandError> {
    if text.trim().is_empty() {
        return Err(invalid("message must not be empty".into()));
    }
    if text.chars().count() > max {
        return Err(invalid(format!("message is longer than {max} characters")));
    }
    Ok(())
}

/// A `msg_id`: 1 to 64 characters.
pub fn msg_id(id: &str) -> Result<(), CommandError> {
    if id.is_empty() || id.chars().count() > MAX_ID_CHARS {
        return Err(invalid(format!(
            "msg_id must be 1 to {MAX_ID_CHARS} characters"
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn member_names() {
        for ok in ["a", "Alice_1", "x.y-z", &"n".repeat(32)] {
            assert!(member_name(ok).is_ok(), "{ok}");
        }
        for bad in [
            "",
            "a b",
            "é",
            "a/b",
            &"n".repeat(33),
            "system",
            "SYSTEM",
            "<script>",
        ] {
            assert!(member_name(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn room_names() {
        assert!(room_name(&"r".repeat(64)).is_ok());
        assert!(room_name(&"r".repeat(65)).is_err());
        assert!(room_name("").is_err());
        assert!(room_name("a b").is_err());
    }

    #[test]
    fn message_texts() {
        assert!(message_text("hi", 1000).is_ok());
        assert!(
            message_text(&"é".repeat(1000), 1000).is_ok(),
            "characters, not bytes"
        );
        assert!(message_text(&"x".repeat(1001), 1000).is_err());
        assert!(message_text("", 1000).is_err());
        assert!(message_text(" \n\t ", 1000).is_err());
    }
}
