//! Any bytes → `http::parse`, and for a complete head the accessors the server uses on it.
//! Besides "never panics", it checks what the event loop relies on when a head arrives in pieces.
#![no_main]

use chatterbox::server::http::{Parsed, parse, percent_decode};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    match parse(data) {
        Parsed::Complete(head) => {
            assert!(
                head.len > 0 && head.len <= data.len(),
                "head length out of range"
            );
            // The head alone parses to the same head: bytes after it never change it.
            assert_eq!(
                parse(&data[..head.len]),
                Parsed::Complete(head.clone()),
                "the head alone parses differently"
            );
            // A head arriving in pieces: every cut before its end is Partial (never Invalid or
            // TooLarge), or the server would refuse a valid request that came in two reads.
            for cut in [head.len - 1, head.len / 2, 1] {
                if cut > 0 && cut < head.len {
                    let p = parse(&data[..cut]);
                    assert_eq!(
                        p,
                        Parsed::Partial,
                        "prefix of {cut} of a {}-byte head",
                        head.len
                    );
                }
            }
            assert!(!head.method.is_empty());
            if let Ok(Some(name)) = head.query_param("name") {
                // Decoding only ever shrinks: the value fits in the query it came from.
                assert!(name.len() <= head.query.as_deref().map_or(0, str::len));
            }
            let _ = head.query_param("token");
            let _ = head.header("sec-websocket-key");
            let _ = head.header_has_token("connection", "upgrade");
            for (name, _) in &head.headers {
                assert_eq!(name, &name.to_ascii_lowercase());
            }
        }
        Parsed::Partial | Parsed::Invalid | Parsed::TooLarge => {}
    }
    // The decoder on its own, for any text.
    if let Ok(text) = std::str::from_utf8(data)
        && let Ok(decoded) = percent_decode(text)
    {
        // Each escape (3 bytes) yields one byte, anything else one byte: never longer.
        assert!(decoded.len() <= text.len());
        // Accepted only when every `%` starts an escape of two hex digits (RFC 3986).
        let b = text.as_bytes();
        let mut i = 0;
        while i < b.len() {
            if b[i] == b'%' {
                assert!(
                    i + 2 < b.len() && b[i + 1].is_ascii_hexdigit() && b[i + 2].is_ascii_hexdigit(),
                    "accepted a bad escape at {i} in {text:?}"
                );
                i += 3;
            } else {
                i += 1;
            }
        }
    }
});
