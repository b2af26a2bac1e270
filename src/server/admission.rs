//! Admission, as pure functions the loop applies (no sockets): [`at_accept`] decides what a
//! new socket gets from the socket and per-address counts; [`admit`] whether a `GET /ws`
//! request becomes a member, from the request, the member count, the settings and the time.
//!
//! The `Host` allow-list is applied by the router, for every path but `/health`.

use crate::auth;
use crate::chat::Refusal;
use crate::config::Config;

use super::http::{Head, Response};

/// Sockets accepted beyond `max_connections`, so that refusals can still be answered with a
/// status instead of a reset.
const HANDSHAKE_SLACK: usize = 256;

/// What a freshly accepted socket gets.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum AtAccept {
    /// Read its head.
    Serve,
    /// Answer `429` at once: its address holds its share of the table.
    Refuse,
    /// Close it without a word, for this reason (a debug line).
    Drop(&'static str),
}

/// Decides at accept, from the sockets open (`sockets`) and those from the same address
/// (`from_ip`, this one not included). A socket counts against its address from accept on,
/// whatever it turns out to be: a head still being read holds a slot as much as a member
/// does. Past the per-address cap it is answered `429`; past twice the cap (that many refusals
/// still being answered) it is dropped, so one address never holds more than that of the table.
pub(crate) fn at_accept(sockets: usize, from_ip: usize, cfg: &Config) -> AtAccept {
    let per_ip_cap = cfg.max_connections_per_ip;
    if sockets >= cfg.max_connections + HANDSHAKE_SLACK {
        AtAccept::Drop("socket cap reached")
    } else if from_ip >= per_ip_cap.saturating_mul(2) {
        AtAccept::Drop("per-address cap reached")
    } else if from_ip >= per_ip_cap {
        AtAccept::Refuse
    } else {
        AtAccept::Serve
    }
}

/// A request that passed: what the connection needs to become a member.
#[derive(Debug)]
pub(crate) struct Admission {
    /// `Sec-WebSocket-Key`, for the `101` answer.
    pub(crate) key: String,
    /// The name asked for (from the token, else `?name=`); `None` lets the core pick one.
    pub(crate) name: Option<String>,
    /// Who the token says the member is (authentication on).
    pub(crate) identity: Option<auth::Identity>,
}

/// Checks an upgrade request, in this order: `Upgrade`, `Connection`, version and key; origin;
/// the token (authentication on); the name's escaping; the member cap (`members` connected
/// now); and the name itself, through `check_name` (the core's rules and names taken).
/// `unix_now` is the time tokens are checked against. A refusal is the response to send.
pub(crate) fn admit(
    head: &Head,
    members: usize,
    cfg: &Config,
    unix_now: u64,
    check_name: impl FnOnce(&str) -> Result<(), Refusal>,
) -> Result<Admission, Response> {
    let bad = |why: &str| Response::text(400, format!("{why}\n"));
    if !head
        .header("upgrade")
        .is_some_and(|u| u.eq_ignore_ascii_case("websocket"))
    {
        return Err(bad("expected a WebSocket upgrade (Upgrade: websocket)"));
    }
    if !head.header_has_token("connection", "upgrade") {
        return Err(bad("expected Connection: Upgrade"));
    }
    if head.header("sec-websocket-version") != Some("13") {
        return Err(bad("unsupported Sec-WebSocket-Version (expected 13)")
            .with_header("Sec-WebSocket-Version", "13"));
    }
    let key = match head.header("sec-websocket-key") {
        Some(k) if k.len() == 24 && k.ends_with("==") => k.to_string(),
        _ => return Err(bad("missing or malformed Sec-WebSocket-Key")),
    };
    if let Some(origin) = head.header("origin") {
        if !super::http::origin_allowed(origin, head.header("host"), &cfg.allowed_origins) {
            return Err(Response::text(403, "origin not allowed\n"));
        }
    }
    let identity = match auth::Policy::of(cfg) {
        None => None,
        Some(policy) => {
            let token = head
                .token()
                .map_err(|_| bad("the token is badly escaped"))?
                .ok_or(auth::AuthError::Missing);
            match token.and_then(|t| auth::verify(&t, &policy, unix_now)) {
                Ok(identity) => Some(identity),
                Err(e) => return Err(Response::text(401, format!("{}\n", e.text()))),
            }
        }
    };
    let asked = head
        .query_param("name")
        .map_err(|_| bad("the name is badly escaped"))?;
    // With a token, its name (`name`, else `sub`) is the member's: `?name=` may only repeat it.
    let name = match &identity {
        Some(i) => {
            let theirs = i.member_name();
            if let Some(a) = asked.as_deref().filter(|a| !a.is_empty()) {
                if !a.eq_ignore_ascii_case(theirs) {
                    return Err(Response::text(
                        403,
                        "the token names another member: leave out ?name= or use the token's name\n",
                    ));
                }
            }
            Some(theirs.to_string())
        }
        None => asked,
    };
    let name = name.filter(|n| !n.is_empty());
    if members >= cfg.max_connections {
        return Err(Response::text(503, "server is full\n"));
    }
    if let Some(n) = &name {
        check_name(n).map_err(|r| Response::text(r.status, format!("{}\n", r.reason)))?;
    }
    Ok(Admission {
        key,
        name,
        identity,
    })
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::{Admission, AtAccept, admit, at_accept};
    use crate::auth;
    use crate::chat::Refusal;
    use crate::config::Config;
    use crate::server::http::{self, Head, Parsed, Response};

    const NOW: u64 = 1_800_000_000;
    const KEY: &str = "dGhlIHNhbXBsZSBub25jZQ==";

    fn head(target: &str, extra: &[(&str, &str)]) -> Head {
        let mut req = format!(
            "GET {target} HTTP/1.1\r\nHost: chat.example\r\nUpgrade: websocket\r\n\
             Connection: keep-alive, Upgrade\r\nSec-WebSocket-Version: 13\r\n"
        );
        let mut key = Some(KEY);
        for (name, value) in extra {
            if name.eq_ignore_ascii_case("sec-websocket-key") {
                key = None;
            }
            req.push_str(&format!("{name}: {value}\r\n"));
        }
        if let Some(k) = key {
            req.push_str(&format!("Sec-WebSocket-Key: {k}\r\n"));
        }
        req.push_str("\r\n");
        match http::parse(req.as_bytes()) {
            Parsed::Complete(h) => h,
            _ => panic!("test request did not parse"),
        }
    }

    /// A head without one of the headers [`head`] always sends.
    fn head_without(target: &str, missing: &str) -> Head {
        let mut h = head(target, &[]);
        h.headers.retain(|(n, _)| !n.eq_ignore_ascii_case(missing));
        h
    }

    fn free(_: &str) -> Result<(), Refusal> {
        Ok(())
    }

    fn admitted(r: Result<Admission, Response>) -> Admission {
        match r {
            Ok(a) => a,
            Err(r) => panic!("refused {}: {}", r.status, String::from_utf8_lossy(&r.body)),
        }
    }

    fn refused(r: Result<Admission, Response>) -> (u16, String) {
        match r {
            Ok(a) => panic!("admitted {a:?}"),
            Err(r) => (r.status, String::from_utf8_lossy(&r.body).into_owned()),
        }
    }

    fn with_auth() -> Config {
        Config {
            jwt_secret: "k".into(),
            ..Config::default()
        }
    }

    fn token(claims: serde_json::Value) -> String {
        auth::sign(&claims, b"k")
    }

    #[test]
    fn at_accept_serves_then_refuses_then_drops() {
        let cfg = Config {
            max_connections: 10,
            max_connections_per_ip: 3,
            ..Config::default()
        };
        assert_eq!(at_accept(0, 0, &cfg), AtAccept::Serve);
        assert_eq!(at_accept(5, 2, &cfg), AtAccept::Serve);
        assert_eq!(at_accept(5, 3, &cfg), AtAccept::Refuse);
        assert_eq!(at_accept(5, 5, &cfg), AtAccept::Refuse);
        assert_eq!(
            at_accept(5, 6, &cfg),
            AtAccept::Drop("per-address cap reached")
        );
        // The table holds the member cap plus room for refusals, whatever the address.
        assert_eq!(at_accept(10 + 255, 0, &cfg), AtAccept::Serve);
        assert_eq!(
            at_accept(10 + 256, 0, &cfg),
            AtAccept::Drop("socket cap reached")
        );
    }

    #[test]
    fn a_plain_upgrade_passes_with_its_key_and_name() {
        let cfg = Config::default();
        let a = admitted(admit(&head("/ws?name=alice", &[]), 0, &cfg, NOW, free));
        assert_eq!(a.key, KEY);
        assert_eq!(a.name.as_deref(), Some("alice"));
        assert!(a.identity.is_none());
        // No name, or an empty one: the core picks.
        let a = admitted(admit(&head("/ws?name=", &[]), 0, &cfg, NOW, free));
        assert_eq!(a.name, None);
        let a = admitted(admit(&head("/ws", &[]), 0, &cfg, NOW, free));
        assert_eq!(a.name, None);
    }

    #[test]
    fn handshake_headers_are_checked_in_order() {
        let cfg = Config::default();
        let (status, body) = refused(admit(&head_without("/ws", "upgrade"), 0, &cfg, NOW, free));
        assert_eq!(
            (status, body.as_str()),
            (400, "expected a WebSocket upgrade (Upgrade: websocket)\n")
        );
        let h = head_without("/ws", "connection");
        assert_eq!(
            refused(admit(&h, 0, &cfg, NOW, free)).1,
            "expected Connection: Upgrade\n"
        );
        let h = head_without("/ws", "sec-websocket-version");
        match admit(&h, 0, &cfg, NOW, free) {
            Err(r) => {
                assert_eq!(r.status, 400);
                assert!(
                    r.headers
                        .contains(&("Sec-WebSocket-Version", "13".to_string()))
                );
            }
            Ok(a) => panic!("admitted {a:?}"),
        }
        for key in ["short==", "dGhlIHNhbXBsZSBub25jZQxx"] {
            let h = head("/ws", &[("Sec-WebSocket-Key", key)]);
            assert_eq!(
                refused(admit(&h, 0, &cfg, NOW, free)),
                (400, "missing or malformed Sec-WebSocket-Key\n".to_string())
            );
        }
        let h = head_without("/ws", "sec-websocket-key");
        assert_eq!(refused(admit(&h, 0, &cfg, NOW, free)).0, 400);
    }

    #[test]
    fn a_foreign_origin_is_refused_the_own_one_passes() {
        let cfg = Config::default();
        let h = head("/ws", &[("Origin", "https://evil.example")]);
        assert_eq!(
            refused(admit(&h, 0, &cfg, NOW, free)),
            (403, "origin not allowed\n".into())
        );
        let h = head("/ws", &[("Origin", "https://chat.example")]);
        admitted(admit(&h, 0, &cfg, NOW, free));
    }

    #[test]
    fn with_auth_a_token_is_required_and_names_the_member() {
        let cfg = with_auth();
        assert_eq!(refused(admit(&head("/ws", &[]), 0, &cfg, NOW, free)).0, 401);
        let bad = token(json!({"sub": "u1", "exp": NOW - 1}));
        let h = head(&format!("/ws?token={bad}"), &[]);
        assert_eq!(refused(admit(&h, 0, &cfg, NOW, free)).0, 401);
        assert_eq!(
            refused(admit(&head("/ws?token=%zz", &[]), 0, &cfg, NOW, free)).0,
            400
        );
        let good = token(json!({"sub": "u1", "name": "Alice", "exp": NOW + 60}));
        // The token's name is the member's: another `?name=` is refused, the same one (in
        // any case) or none passes.
        let h = head(&format!("/ws?name=bob&token={good}"), &[]);
        assert_eq!(refused(admit(&h, 0, &cfg, NOW, free)).0, 403);
        let h = head(&format!("/ws?name=alice&token={good}"), &[]);
        assert_eq!(
            admitted(admit(&h, 0, &cfg, NOW, free)).name.as_deref(),
            Some("Alice")
        );
        let h = head(&format!("/ws?token={good}"), &[]);
        let a = admitted(admit(&h, 0, &cfg, NOW, free));
        assert_eq!(a.name.as_deref(), Some("Alice"));
        // Without a `name` claim, `sub` is the name.
        let sub_only = token(json!({"sub": "u2", "exp": NOW + 60}));
        let h = head(&format!("/ws?token={sub_only}"), &[]);
        assert_eq!(
            admitted(admit(&h, 0, &cfg, NOW, free)).name.as_deref(),
            Some("u2")
        );
        let h = head(&format!("/ws?name=carol&token={sub_only}"), &[]);
        assert_eq!(refused(admit(&h, 0, &cfg, NOW, free)).0, 403);
        let id = a.identity.expect("an identity");
        assert_eq!((id.sub.as_str(), id.exp), ("u1", Some(NOW + 60)));
        // Through the header as well.
        let bearer = format!("Bearer {good}");
        let h = head("/ws", &[("Authorization", bearer.as_str())]);
        admitted(admit(&h, 0, &cfg, NOW, free));
    }

    #[test]
    fn a_full_server_refuses_with_503() {
        let cfg = Config {
            max_connections: 2,
            ..Config::default()
        };
        admitted(admit(&head("/ws", &[]), 1, &cfg, NOW, free));
        assert_eq!(
            refused(admit(&head("/ws", &[]), 2, &cfg, NOW, free)),
            (503, "server is full\n".into())
        );
    }

    #[test]
    fn the_name_is_escaped_then_checked_by_the_core() {
        let cfg = Config::default();
        assert_eq!(
            refused(admit(&head("/ws?name=%ff", &[]), 0, &cfg, NOW, free)),
            (400, "the name is badly escaped\n".into())
        );
        let taken = |n: &str| {
            Err(Refusal {
                status: 409,
                reason: format!("the name '{n}' is taken"),
            })
        };
        assert_eq!(
            refused(admit(&head("/ws?name=alice", &[]), 0, &cfg, NOW, taken)),
            (409, "the name 'alice' is taken\n".into())
        );
        // Without a name nothing is asked of the core.
        let never = |_: &str| -> Result<(), Refusal> { panic!("no name to check") };
        admitted(admit(&head("/ws", &[]), 0, &cfg, NOW, never));
    }
}
