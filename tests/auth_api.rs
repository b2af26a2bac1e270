//! Issue 9, auth items: the REST API behind the token, tokens with absurd times, JWT claim
//! rules, and the `Host` allow-list against DNS rebinding.

mod common;

use std::time::{SystemTime, UNIX_EPOCH};

use chatterbox::auth;
use chatterbox::config::Config;
use common::{Running, status, upgrade_request};
use serde_json::{Value, json};

const SECRET: &str = "api-secret";

/// Every endpoint that shows the chat's state; each must be closed when auth is on.
const API: [&str; 6] = [
    "/api/stats",
    "/api/rooms",
    "/api/rooms/general",
    "/api/rooms/general/messages",
    "/api/members",
    "/metrics",
];

fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

fn server(f: impl FnOnce(&mut Config)) -> Running {
    let mut cfg = Config {
        db_path: ":memory:".into(),
        ..Config::default()
    };
    f(&mut cfg);
    Running::start(cfg)
}

fn token(claims: Value) -> String {
    auth::sign(&claims, SECRET.as_bytes())
}

fn good_token() -> String {
    token(json!({"sub":"reader","exp":now_secs() + 600}))
}

fn get(s: &Running, path: &str, extra: &str) -> String {
    s.http(&format!(
        "GET {path} HTTP/1.1\r\nHost: localhost\r\n{extra}\r\n"
    ))
}

/// A WebSocket member holding `token`, past its welcome.
fn member(s: &Running, token: &str) -> common::Client {
    let url = format!("ws://{}/ws?token={token}", s.addr);
    let (ws, _) = tungstenite::connect(url).expect("upgrade");
    if let tungstenite::stream::MaybeTlsStream::Plain(t) = ws.get_ref() {
        t.set_read_timeout(Some(std::time::Duration::from_secs(5)))
            .unwrap();
    }
    let mut c = common::Client { ws };
    c.until(|e| e["event"] == "history");
    c
}

fn body(r: &str) -> &str {
    r.split_once("\r\n\r\n").map_or("", |(_, b)| b)
}

/// `path` with `token=` added to its query.
fn with_query_token(path: &str, token: &str) -> String {
    let sep = if path.contains('?') { '&' } else { '?' };
    format!("{path}{sep}token={token}")
}

fn assert_unauthorized(r: &str, what: &str) {
    assert_eq!(status(r), 401, "{what}: {r}");
    let v: Value = serde_json::from_str(body(r)).unwrap_or_else(|_| panic!("{what}: {r}"));
    assert_eq!(v["error"], "unauthorized", "{what}: {r}");
    assert!(v["message"].as_str().is_some_and(|m| !m.is_empty()), "{r}");
}

#[test]
fn with_a_secret_every_api_endpoint_needs_a_valid_token() {
    let s = server(|c| c.jwt_secret = SECRET.into());
    // Something worth stealing in the room.
    let mut w = member(
        &s,
        &token(json!({"sub":"w","name":"writer","exp":now_secs() + 600})),
    );
    w.send(json!({"command":"broadcast","message":"secret plans","request_id":"r"}));
    w.until(|e| e["event"] == "ack");

    let expired = token(json!({"sub":"reader","exp":now_secs() - 5}));
    let wrong_key = auth::sign(&json!({"sub":"reader","exp":now_secs() + 600}), b"guess");
    let good = good_token();
    for path in API {
        let r = get(&s, path, "");
        assert_unauthorized(&r, &format!("{path} without a token"));
        assert!(!r.contains("secret plans") && !r.contains("writer"), "{r}");
        for (what, bad) in [
            ("garbage", "garbage"),
            ("wrong key", wrong_key.as_str()),
            ("expired", expired.as_str()),
        ] {
            let r = get(&s, path, &format!("Authorization: Bearer {bad}\r\n"));
            assert_unauthorized(&r, &format!("{path} bearer {what}"));
            assert!(!r.contains(bad), "the answer never echoes the token");
            let r = get(&s, &with_query_token(path, bad), "");
            assert_unauthorized(&r, &format!("{path} query {what}"));
        }
        let r = get(&s, path, &format!("Authorization: Bearer {good}\r\n"));
        assert_eq!(status(&r), 200, "{path} bearer good: {r}");
        let r = get(&s, &with_query_token(path, &good), "");
        assert_eq!(status(&r), 200, "{path} query good: {r}");
    }
    // The query token sits next to the endpoint's own parameters.
    let r = get(
        &s,
        &format!("/api/rooms/general/messages?limit=5&token={good}"),
        "",
    );
    assert_eq!(status(&r), 200, "{r}");
    assert!(body(&r).contains("secret plans"), "{r}");
    // Unknown paths under /api are closed too: nothing about the API leaks without a token.
    assert_unauthorized(&get(&s, "/api/nope", ""), "/api/nope");
    // What stays open.
    assert_eq!(status(&get(&s, "/health", "")), 200);
    assert_eq!(status(&get(&s, "/", "")), 200);
    s.stop();
}

#[test]
fn metrics_can_be_made_public_and_the_rest_stays_closed() {
    let s = server(|c| {
        c.jwt_secret = SECRET.into();
        c.metrics_public = true;
    });
    assert_eq!(status(&get(&s, "/metrics", "")), 200);
    assert_unauthorized(&get(&s, "/api/stats", ""), "/api/stats");
    s.stop();
}

#[test]
fn without_a_secret_the_api_is_open_as_before() {
    let s = server(|_| {});
    for path in API {
        assert_eq!(status(&get(&s, path, "")), 200, "{path}");
    }
    s.stop();
}

#[test]
fn a_token_with_a_huge_exp_is_simply_a_long_session() {
    let s = server(|c| c.jwt_secret = SECRET.into());
    for (name, exp) in [("far", 1u64 << 63), ("farthest", u64::MAX)] {
        let t = token(json!({"sub":name,"name":name,"exp":exp}));
        let mut c = member(&s, &t);
        c.send(json!({"command":"ping","request_id":"p"}));
        assert_eq!(c.until(|e| e["event"] == "pong")["request_id"], "p");
        c.send(json!({"command":"broadcast","message":"still here","request_id":"b"}));
        c.until(|e| e["event"] == "ack");
        let r = get(
            &s,
            "/api/members",
            &format!("Authorization: Bearer {t}\r\n"),
        );
        assert_eq!(status(&r), 200, "{r}");
        assert!(body(&r).contains(name), "{r}");
    }
    assert_eq!(
        status(&get(&s, "/health", "")),
        200,
        "the server is still up"
    );
    s.stop();
}

#[test]
fn tokens_must_carry_exp_and_the_configured_audience_and_issuer() {
    let s = server(|c| {
        c.jwt_secret = SECRET.into();
        c.jwt_audience = "chat".into();
        c.jwt_issuer = "https://id.example".into();
    });
    let exp = now_secs() + 600;
    let iss = "https://id.example";
    let ok = [
        json!({"sub":"a","exp":exp,"aud":"chat","iss":iss}),
        json!({"sub":"b","exp":exp,"aud":["other","chat"],"iss":iss}),
    ];
    for claims in ok {
        let r = s.http(&upgrade_request(
            &format!("/ws?token={}", token(claims.clone())),
            "",
        ));
        assert_eq!(status(&r), 101, "{claims}: {r}");
    }
    let refused = [
        json!({"sub":"c","aud":"chat","iss":iss}),
        json!({"sub":"d","exp":exp,"iss":iss}),
        json!({"sub":"e","exp":exp,"aud":"other","iss":iss}),
        json!({"sub":"f","exp":exp,"aud":["x","y"],"iss":iss}),
        json!({"sub":"g","exp":exp,"aud":"chat"}),
        json!({"sub":"h","exp":exp,"aud":"chat","iss":"https://evil.example"}),
    ];
    for claims in refused {
        let t = token(claims.clone());
        let r = s.http(&upgrade_request(&format!("/ws?token={t}"), ""));
        assert_eq!(status(&r), 401, "{claims}: {r}");
        let r = get(&s, "/api/stats", &format!("Authorization: Bearer {t}\r\n"));
        assert_unauthorized(&r, &claims.to_string());
    }
    s.stop();

    // Without exp only when the deployment says so.
    let s = server(|c| {
        c.jwt_secret = SECRET.into();
        c.jwt_require_exp = false;
    });
    let r = s.http(&upgrade_request(
        &format!("/ws?token={}", token(json!({"sub":"forever"}))),
        "",
    ));
    assert_eq!(status(&r), 101, "{r}");
    s.stop();
}

#[test]
fn an_allowed_hosts_list_refuses_every_other_host() {
    let s = server(|c| c.allowed_hosts = "chat.example, localhost:1234".into());
    let port = s.addr.port();
    let ask = |path: &str, host: &str| {
        status(&s.http(&format!("GET {path} HTTP/1.1\r\nHost: {host}\r\n\r\n")))
    };
    for path in ["/", "/api/stats", "/api/members", "/metrics", "/ws"] {
        for evil in [
            format!("evil.example:{port}"),
            "chat.example.evil.io".to_string(),
            "localhost:9999".to_string(),
            "localhost".to_string(),
            String::new(),
        ] {
            assert_eq!(ask(path, &evil), 421, "{path} Host: {evil}");
        }
        // Allowed hosts get the path's own answer (a plain GET of /ws is not an upgrade: 400),
        // not a refusal and not silence.
        let own = if path == "/ws" { 400 } else { 200 };
        assert_eq!(ask(path, "chat.example"), own, "{path}");
        assert_eq!(ask(path, &format!("Chat.Example:{port}")), own, "{path}");
        assert_eq!(ask(path, "localhost:1234"), own, "{path}");
    }
    // A missing Host is refused too.
    let r = s.http("GET /api/stats HTTP/1.1\r\n\r\n");
    assert_eq!(status(&r), 421, "{r}");
    // The upgrade itself works from an allowed host.
    let r = s.http(&upgrade_request("/ws", "").replace("Host: localhost", "Host: chat.example"));
    assert_eq!(status(&r), 101, "{r}");
    // Health checks (often by IP) stay open.
    assert_eq!(ask("/health", "10.0.0.1"), 200);
    s.stop();

    // Empty: any host, as before.
    let s = server(|_| {});
    let r = s.http("GET /api/stats HTTP/1.1\r\nHost: evil.example\r\n\r\n");
    assert_eq!(status(&r), 200);
    s.stop();
}
