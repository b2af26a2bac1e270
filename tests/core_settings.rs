//! Settings of the core that would break it later are refused at start.
//!
//! `--max-rooms-per-member 0` was accepted, and then no member could join `general`: the
//! welcome was `me` alone, without the join notice or the `history` every client waits for,
//! and every broadcast to `general` was `not_member`. `--max-rooms 0` claimed a server of no
//! rooms that still holds `general`.

use std::time::Instant;

use chatterbox::chat::{Chat, Now, Recorder, counted_ids};
use chatterbox::config::{Cli, Config};
use chatterbox::store::engine::Immediate;
use chatterbox::store::memory::MemoryStore;

fn run(args: &[&str]) -> Result<Cli, String> {
    Config::from_args(args.iter().map(|s| s.to_string()), |_| None)
}

#[test]
fn zero_room_caps_are_refused_at_start() {
    for flag in ["--max-rooms-per-member", "--max-rooms"] {
        let e = run(&[flag, "0"])
            .err()
            .unwrap_or_else(|| panic!("{flag} 0 accepted"));
        assert!(e.contains(flag), "{e}");
        assert!(run(&[flag, "1"]).is_ok(), "{flag} 1");
    }
}

/// At the smallest caps allowed, a member still gets the whole welcome and can talk.
#[test]
fn at_the_smallest_caps_a_member_is_welcomed_into_general() {
    let cfg = Config {
        max_rooms: 1,
        max_rooms_per_member: 1,
        ..Config::default()
    };
    cfg.validate().expect("the smallest caps are valid");
    let mut chat = Chat::new(
        cfg,
        Box::new(Immediate::new(MemoryStore::new(10))),
        counted_ids(),
    );
    let mut out = Recorder::default();
    let now = Now {
        mono: Instant::now(),
        unix_ms: 1,
    };
    chat.connect(now, 1, Some("a"), None, &mut out);
    let events: Vec<String> = out
        .take(1)
        .iter()
        .map(|e| e["event"].as_str().unwrap_or_default().to_string())
        .collect();
    assert_eq!(events, ["me", "broadcast", "history"]);
    let cmd = r#"{"command":"join","room":"other"}"#;
    chat.handle_text(now, 1, cmd, &mut out);
    assert_eq!(out.events(1, "error")[0]["code"], "limit_reached");
}
