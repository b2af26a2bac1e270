//! Any bytes that are UTF-8 → `protocol::decode`: it must never panic, and what it returns must
//! agree with what the text is.
#![no_main]

use chatterbox::chat::protocol::{COMMAND_NAMES, ErrorCode, MAX_ID_CHARS, decode};
use libfuzzer_sys::fuzz_target;
use serde_json::Value;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let request = decode(text);

    // A request_id is only kept when it is a string of at most 64 characters.
    if let Some(id) = &request.request_id {
        assert!(
            id.chars().count() <= MAX_ID_CHARS,
            "request_id kept too long"
        );
    }

    let parsed: Option<Value> = serde_json::from_str(text).ok();
    match &request.command {
        Ok(_) => {
            // Only a JSON object naming a known command decodes.
            let Some(Value::Object(map)) = &parsed else {
                panic!("decoded a command from something that is not a JSON object: {text:?}");
            };
            let name = map.get("command").and_then(Value::as_str);
            assert!(
                name.is_some_and(|n| COMMAND_NAMES.contains(&n)),
                "decoded without a known command name: {text:?}"
            );
        }
        Err(e) => {
            match &parsed {
                Some(Value::Object(_)) => assert_ne!(e.code, ErrorCode::BadJson, "{text:?}"),
                _ => assert_eq!(e.code, ErrorCode::BadJson, "{text:?}"),
            }
            // Decoding only yields these codes; the rest belong to the commands.
            assert!(
                matches!(
                    e.code,
                    ErrorCode::BadJson | ErrorCode::UnknownCommand | ErrorCode::Invalid
                ),
                "{:?}",
                e.code
            );
            assert!(!e.message.is_empty());
            // The human text may quote the input (serde quotes a wrong-typed value), but it
            // must not grow beyond it: no amplification of what a client sent.
            assert!(
                e.message.len() <= text.len() + 256,
                "error message of {} bytes for {} bytes of input",
                e.message.len(),
                text.len()
            );
        }
    }
});
