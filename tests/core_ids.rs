//! Issue 10: the core takes member ids from a source it is given (tests count them); the real
//! server on `127.0.0.1:0` gives every member a fresh UUID v4, as SPEC §2 says.

mod common;

use common::Running;
use serde_json::json;

#[test]
fn the_server_gives_each_member_a_different_uuid_v4() {
    let s = Running::memory();
    let mut ids = Vec::new();
    for name in ["a", "b", "c"] {
        let mut c = s.client(name);
        c.send(json!({"command":"me"}));
        let me = c.until(|e| e["event"] == "me");
        let id = me["id"].as_str().expect("an id").to_string();
        let uuid = uuid::Uuid::parse_str(&id).expect("a UUID");
        assert_eq!(uuid.get_version_num(), 4, "{id}");
        assert_eq!(uuid.get_variant(), uuid::Variant::RFC4122, "{id}");
        ids.push(id);
    }
    ids.sort();
    ids.dedup();
    assert_eq!(ids.len(), 3, "every member its own id");
}
