#![cfg(feature = "server-api")]
//! The server API (issue 11) against the real server: the key, every endpoint, their
//! effects on members, and hostile input.

mod common;

use std::time::Duration;

use chatterbox::auth;
use chatterbox::config::Config;
use common::{Client, Running};
use serde_json::{Value, json};
use tungstenite::Message;

const KEY: &str = "test-api-key-0123456789";
const SECRET: &str = "jwt-secret-for-the-api-tests";

fn server(cfg: impl FnOnce(&mut Config)) -> Running {
    let mut c = Config {
        db_path: ":memory:".into(),
        api_key: KEY.into(),
        rate_burst: 1000,
        ..Config::default()
    };
    cfg(&mut c);
    Running::start(c)
}

/// One request; returns the status and the body.
fn call(s: &Running, method: &str, path: &str, headers: &str, body: &str) -> (u16, String) {
    let r = s.http(&format!(
        "{method} {path} HTTP/1.1\r\nHost: t\r\n{headers}Content-Length: {}\r\n\r\n{body}",
        body.len()
    ));
    let status = common::status(&r);
    let body = r.split_once("\r\n\r\n").map_or("", |(_, b)| b).to_string();
    (status, body)
}

fn api(s: &Running, method: &str, path: &str, body: &str) -> (u16, String) {
    call(s, method, path, &format!("X-API-Key: {KEY}\r\n"), body)
}

fn json_of(body: &str) -> Value {
    serde_json::from_str(body).unwrap_or_else(|e| panic!("{e}: {body}"))
}

fn post(s: &Running, room: &str, body: Value) -> (u16, Value) {
    let (st, b) = api(
        s,
        "POST",
        &format!("/api/rooms/{room}/messages"),
        &body.to_string(),
    );
    (st, json_of(&b))
}

fn token(claims: Value) -> String {
    let mut claims = claims;
    claims["exp"] = json!(2_000_000_000u64);
    auth::sign(&claims, SECRET.as_bytes())
}

fn client_with_token(s: &Running, t: &str) -> Client {
    let url = format!("ws://{}/ws?token={t}", s.addr);
    let (ws, _) = tungstenite::connect(url).expect("upgrade");
    if let tungstenite::stream::MaybeTlsStream::Plain(t) = ws.get_ref() {
        t.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    }
    let mut c = Client { ws };
    c.until(|e| e["event"] == "me");
    c
}

#[test]
fn without_a_key_the_server_api_is_off_and_answers_404() {
    let s = server(|c| c.api_key = String::new());
    for (method, path) in [
        ("POST", "/api/rooms/general/messages"),
        ("DELETE", "/api/rooms/general/messages/1"),
        ("POST", "/api/members/a/disconnect"),
        ("POST", "/api/rooms"),
        ("DELETE", "/api/rooms/x"),
        ("POST", "/api/direct/a"),
    ] {
        let (st, body) = api(&s, method, path, r#"{"message":"m","name":"x"}"#);
        assert_eq!(st, 404, "{method} {path}: {body}");
    }
    assert_eq!(
        s.get_json("/api/rooms/general")["messages"],
        0,
        "nothing posted"
    );
    s.stop();
}

#[test]
fn the_right_key_opens_the_server_api_a_wrong_or_missing_one_is_401() {
    let s = server(|_| {});
    let body = r#"{"message":"hello"}"#;
    let path = "/api/rooms/general/messages";
    for headers in [
        String::new(),
        "X-API-Key: wrong\r\n".to_string(),
        format!("X-API-Key: {KEY}x\r\n"),
        format!("X-API-Key: {}\r\n", &KEY[..KEY.len() - 1]),
        format!("Authorization: Bearer {KEY}\r\n"),
    ] {
        let (st, b) = call(&s, "POST", path, &headers, body);
        assert_eq!(st, 401, "{headers:?}");
        assert_eq!(json_of(&b)["error"], "unauthorized");
        assert!(!b.contains(KEY), "the key is never echoed");
    }
    assert_eq!(
        s.get_json("/api/rooms/general")["messages"],
        0,
        "nothing posted"
    );
    let (st, b) = call(&s, "POST", path, &format!("X-API-Key: {KEY}\r\n"), body);
    assert_eq!((st, json_of(&b)), (201, json!({"room":"general","id":1})));
    s.stop();
}

#[test]
fn with_jwt_on_the_key_also_opens_the_reads_and_metrics() {
    let s = server(|c| c.jwt_secret = SECRET.into());
    for path in [
        "/api/stats",
        "/api/rooms",
        "/api/members",
        "/api/rooms/general/messages",
        "/metrics",
    ] {
        assert_eq!(call(&s, "GET", path, "", "").0, 401, "{path}");
        assert_eq!(
            call(&s, "GET", path, "X-API-Key: nope\r\n", "").0,
            401,
            "{path}"
        );
        assert_eq!(api(&s, "GET", path, "").0, 200, "{path}");
    }
    s.stop();
}

#[test]
fn a_publish_reaches_the_room_as_a_broadcast_and_ids_continue_with_the_members() {
    let s = server(|_| {});
    let mut a = s.client("alice");
    a.send(json!({"command":"broadcast","message":"first","request_id":"1"}));
    a.until(|e| e["event"] == "ack");
    let (st, b) = post(
        &s,
        "general",
        json!({"message":"from the backend","data":{"k":[1,2]}}),
    );
    assert_eq!((st, b), (201, json!({"room":"general","id":2})));
    let e = a.until(|e| e["event"] == "broadcast" && e["id"] == 2);
    assert_eq!(
        (&e["member"], &e["message"], &e["data"]),
        (
            &json!("server"),
            &json!("from the backend"),
            &json!({"k":[1,2]})
        )
    );
    assert!(e["ts"].as_u64().is_some());
    let (_, b) = post(
        &s,
        "general",
        json!({"message":"as a bot","member":"ci-bot"}),
    );
    assert_eq!(b["id"], 3);
    assert_eq!(a.until(|e| e["id"] == 3)["member"], "ci-bot");
    a.send(json!({"command":"broadcast","message":"after","request_id":"2"}));
    assert_eq!(a.until(|e| e["event"] == "ack")["id"], 4);
    // A new room is created for it; its own sequence starts at 1.
    let (st, b) = post(&s, "news", json!({"message":"n"}));
    assert_eq!((st, b), (201, json!({"room":"news","id":1})));
    let page = s.get_json("/api/rooms/general/messages");
    let ids: Vec<u64> = page["messages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["id"].as_u64().unwrap())
        .collect();
    assert_eq!(ids, vec![1, 2, 3, 4]);
    let metrics = s.http("GET /metrics HTTP/1.1\r\n\r\n");
    assert!(
        metrics.contains("chatterbox_api_calls_total{call=\"publish\"} 3"),
        "{metrics}"
    );
    assert_eq!(s.get_json("/api/stats")["api_calls"]["publish"], 3);
    s.stop();
}

#[test]
fn a_repeated_msg_id_answers_200_with_the_first_id() {
    let s = server(|_| {});
    let mut a = s.client("alice");
    let body = json!({"message":"once","msg_id":"evt-77"});
    assert_eq!(
        post(&s, "general", body.clone()),
        (201, json!({"room":"general","id":1}))
    );
    assert_eq!(
        post(&s, "general", body.clone()),
        (200, json!({"room":"general","id":1}))
    );
    assert_eq!(
        post(&s, "general", json!({"message":"other","msg_id":"evt-78"})).1["id"],
        2
    );
    a.until(|e| e["id"] == 1);
    assert_eq!(
        a.until(|e| e["event"] == "broadcast")["id"],
        2,
        "the repeat was not delivered"
    );
    assert_eq!(s.get_json("/api/rooms/general")["messages"], 2);
    s.stop();
}

#[test]
fn bad_bodies_and_names_are_refused_with_a_clear_error() {
    let s = server(|c| c.max_rooms = 3);
    let path = "/api/rooms/general/messages";
    for (body, code) in [
        ("", "bad_json"),
        ("not json", "bad_json"),
        ("[1,2]", "bad_json"),
        ("\"text\"", "bad_json"),
        ("{\"message\":", "bad_json"),
        ("{}", "invalid"),
        (r#"{"message":5}"#, "invalid"),
        (r#"{"message":""}"#, "invalid"),
        (r#"{"message":"   "}"#, "invalid"),
        (r#"{"message":"m","member":"system"}"#, "invalid"),
        (r#"{"message":"m","member":"bad name"}"#, "invalid"),
        (r#"{"message":"m","member":"a\u0000b"}"#, "invalid"),
        (r#"{"message":"m","member":"a\nb"}"#, "invalid"),
        (r#"{"message":"m","msg_id":""}"#, "invalid"),
        (r#"{"message":"m","data":1,"data":2}"#, "invalid"),
    ] {
        let (st, b) = api(&s, "POST", path, body);
        assert_eq!(
            (st, json_of(&b)["error"].as_str()),
            (400, Some(code)),
            "{body}"
        );
    }
    let long = json!({"message":"x".repeat(1001)}).to_string();
    assert_eq!(api(&s, "POST", path, &long).0, 400);
    // Over --max-api-body: 413 before the body is read.
    let huge = json!({"message":"x".repeat(9000)}).to_string();
    let (st, b) = api(&s, "POST", path, &huge);
    assert_eq!(
        (st, json_of(&b)["error"].as_str()),
        (413, Some("too_large"))
    );
    let r = s.http(&format!(
        "POST {path} HTTP/1.1\r\nX-API-Key: {KEY}\r\nContent-Length: 99999999999999999999999\r\n\r\n"
    ));
    assert_eq!(common::status(&r), 413, "{r}");
    let r = s.http(&format!(
        "POST {path} HTTP/1.1\r\nX-API-Key: {KEY}\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n"
    ));
    assert_eq!(common::status(&r), 411, "{r}");
    let r = s.http(&format!(
        "POST {path} HTTP/1.1\r\nX-API-Key: {KEY}\r\nContent-Length: 2\r\nContent-Length: 3\r\n\r\n{{}}"
    ));
    assert_eq!(common::status(&r), 400, "{r}");
    // Names in the path: invalid or control characters name nothing.
    for p in [
        "/api/rooms/bad%20room/messages",
        "/api/rooms/a%00b/messages",
        "/api/rooms/a%0Ab/messages",
        "/api/rooms/%zz/messages",
        &format!("/api/rooms/{}/messages", "r".repeat(65)),
    ] {
        assert_eq!(api(&s, "POST", p, r#"{"message":"m"}"#).0, 404, "{p}");
    }
    assert_eq!(
        s.get_json("/api/rooms/general")["messages"],
        0,
        "nothing was posted"
    );
    // The room cap holds for rooms the API creates.
    assert_eq!(api(&s, "POST", "/api/rooms", r#"{"name":"r1"}"#).0, 201);
    assert_eq!(api(&s, "POST", "/api/rooms", r#"{"name":"r2"}"#).0, 201);
    let (st, b) = post(&s, "r3", json!({"message":"m"}));
    assert_eq!((st, b["error"].as_str()), (409, Some("limit_reached")));
    s.stop();
}

#[test]
fn a_delete_removes_the_message_tells_the_room_and_never_frees_the_id() {
    let s = server(|_| {});
    let mut a = s.client("alice");
    for m in ["one", "two", "three"] {
        post(&s, "general", json!({"message":m}));
    }
    a.until(|e| e["id"] == 3);
    let (st, b) = api(&s, "DELETE", "/api/rooms/general/messages/2", "");
    assert_eq!((st, b.as_str()), (204, ""));
    assert_eq!(
        a.until(|e| e["event"] == "deleted"),
        json!({"event":"deleted","room":"general","id":2})
    );
    let page = s.get_json("/api/rooms/general/messages");
    let texts: Vec<&str> = page["messages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["message"].as_str().unwrap())
        .collect();
    assert_eq!(texts, vec!["one", "three"]);
    a.send(json!({"command":"history","room":"general"}));
    let h = a.until(|e| e["event"] == "history");
    assert_eq!(h["messages"].as_array().unwrap().len(), 2);
    for id in [
        "2",
        "4",
        "0",
        "99999999999999999999",
        "18446744073709551615",
        "-1",
        "1e3",
        "abc",
        "%31",
    ] {
        let (st, b) = api(
            &s,
            "DELETE",
            &format!("/api/rooms/general/messages/{id}"),
            "",
        );
        assert_eq!(st, 404, "{id}: {b}");
    }
    assert_eq!(
        api(&s, "DELETE", "/api/rooms/nowhere/messages/1", "").0,
        404
    );
    assert_eq!(post(&s, "general", json!({"message":"four"})).1["id"], 4);
    s.stop();
}

#[test]
fn a_disconnect_closes_with_4000_and_the_reason() {
    let s = server(|_| {});
    let mut a = s.client("alice");
    let mut b = s.client("bob");
    let (st, _) = api(
        &s,
        "POST",
        "/api/members/BOB/disconnect",
        r#"{"reason":"spamming"}"#,
    );
    assert_eq!(st, 204);
    let close = loop {
        match b.ws.read() {
            Ok(Message::Close(c)) => break c.expect("a close frame"),
            Ok(_) => {}
            Err(e) => panic!("no close frame: {e}"),
        }
    };
    assert_eq!(
        (u16::from(close.code), close.reason.as_str()),
        (4000, "spamming")
    );
    assert_eq!(a.until(|e| e["left"] == "bob")["message"], "bob has left!");
    assert_eq!(s.get_json("/api/members"), json!(["alice"]));
    assert_eq!(api(&s, "POST", "/api/members/bob/disconnect", "").0, 404);
    assert_eq!(api(&s, "POST", "/api/members/a%00b/disconnect", "").0, 404);
    let long = json!({"reason":"x".repeat(124)}).to_string();
    assert_eq!(
        api(&s, "POST", "/api/members/alice/disconnect", &long).0,
        400
    );
    let ctl = json!({"reason":"a\u{7}b"}).to_string();
    assert_eq!(
        api(&s, "POST", "/api/members/alice/disconnect", &ctl).0,
        400
    );
    assert_eq!(
        api(&s, "POST", "/api/members/alice/disconnect", "").0,
        204,
        "no body: the default reason"
    );
    assert_eq!(a.close_code(), Some(4000));
    s.stop();
}

#[test]
fn rooms_are_created_ahead_and_deleted_for_everyone_in_them() {
    let s = server(|_| {});
    let (st, b) = api(&s, "POST", "/api/rooms", r#"{"name":"lobby"}"#);
    assert_eq!((st, json_of(&b)), (201, json!({"name":"lobby"})));
    assert_eq!(api(&s, "POST", "/api/rooms", r#"{"name":"lobby"}"#).0, 200);
    for bad in [r#"{"name":"bad room"}"#, r#"{"name":""}"#, r#"{}"#, "nope"] {
        assert_eq!(api(&s, "POST", "/api/rooms", bad).0, 400, "{bad}");
    }
    assert_eq!(
        s.get_json("/api/rooms/lobby")["members"],
        json!([]),
        "kept while empty"
    );
    let mut a = s.client("alice");
    a.send(json!({"command":"join","room":"lobby"}));
    a.until(|e| e["event"] == "history");
    post(&s, "lobby", json!({"message":"one"}));
    post(&s, "lobby", json!({"message":"two"}));
    a.until(|e| e["id"] == 2);
    assert_eq!(api(&s, "DELETE", "/api/rooms/lobby", "").0, 204);
    assert_eq!(
        a.until(|e| e["event"] == "room_closed"),
        json!({"event":"room_closed","room":"lobby"})
    );
    a.send(json!({"command":"me"}));
    assert_eq!(a.until(|e| e["event"] == "me")["rooms"], json!(["general"]));
    assert_eq!(
        common::status(&s.http("GET /api/rooms/lobby HTTP/1.1\r\n\r\n")),
        404
    );
    let (st, b) = api(&s, "DELETE", "/api/rooms/general", "");
    assert_eq!((st, json_of(&b)["error"].as_str()), (409, Some("conflict")));
    assert_eq!(api(&s, "DELETE", "/api/rooms/never-was", "").0, 404);
    // Created again: empty, and its ids continue.
    let (_, b) = post(&s, "lobby", json!({"message":"three"}));
    assert_eq!(b["id"], 3);
    let page = s.get_json("/api/rooms/lobby/messages");
    assert_eq!(page["messages"].as_array().unwrap().len(), 1);
    s.stop();
}

#[test]
fn the_server_sends_a_direct_message() {
    let s = server(|_| {});
    let mut a = s.client("alice");
    assert_eq!(
        api(
            &s,
            "POST",
            "/api/direct/Alice",
            r#"{"message":"psst","data":[1]}"#
        )
        .0,
        204
    );
    let e = a.until(|e| e["event"] == "direct");
    assert_eq!(
        (&e["from"], &e["to"], &e["message"], &e["data"]),
        (
            &json!("server"),
            &json!("alice"),
            &json!("psst"),
            &json!([1])
        )
    );
    assert_eq!(
        api(&s, "POST", "/api/direct/nobody", r#"{"message":"m"}"#).0,
        404
    );
    assert_eq!(
        api(&s, "POST", "/api/direct/alice", r#"{"message":""}"#).0,
        400
    );
    assert_eq!(api(&s, "POST", "/api/direct/alice", "{").0, 400);
    s.stop();
}

#[test]
fn token_claims_allow_and_refuse_and_filter_the_rest_reads() {
    let s = server(|c| {
        c.jwt_secret = SECRET.into();
        c.read_only_rooms = "news".into();
    });
    let mut a = client_with_token(
        &s,
        &token(json!({"sub":"u1","name":"ann","rooms":["general","team-*"],"publish":["team-*"]})),
    );
    a.until(|e| e["event"] == "history");
    a.send(json!({"command":"join","room":"secret","request_id":"j"}));
    assert_eq!(a.until(|e| e["event"] == "error")["code"], "forbidden");
    a.send(json!({"command":"broadcast","message":"hi","request_id":"b"}));
    assert_eq!(a.until(|e| e["event"] == "error")["code"], "forbidden");
    a.send(json!({"command":"join","room":"team-x"}));
    a.until(|e| e["event"] == "history");
    a.send(json!({"command":"broadcast","room":"team-x","message":"ok","request_id":"c"}));
    assert_eq!(a.until(|e| e["event"] == "ack")["id"], 1);
    a.send(json!({"command":"delete","room":"team-x","id":1,"request_id":"d"}));
    assert_eq!(a.until(|e| e["event"] == "error")["code"], "forbidden");
    // Read-only rooms: an admin posts, others are refused.
    let mut boss = client_with_token(&s, &token(json!({"sub":"boss","admin":true})));
    boss.until(|e| e["event"] == "history");
    let mut bob = client_with_token(&s, &token(json!({"sub":"bob"})));
    bob.until(|e| e["event"] == "history");
    for c in [&mut boss, &mut bob] {
        c.send(json!({"command":"join","room":"news"}));
        c.until(|e| e["event"] == "history");
    }
    bob.send(json!({"command":"broadcast","room":"news","message":"x","request_id":"n"}));
    assert_eq!(bob.until(|e| e["event"] == "error")["code"], "forbidden");
    boss.send(json!({"command":"broadcast","room":"news","message":"x","request_id":"n"}));
    assert_eq!(boss.until(|e| e["event"] == "ack")["id"], 1);
    assert_eq!(
        post(&s, "news", json!({"message":"from the API"})).1["id"],
        2
    );
    boss.send(json!({"command":"delete","room":"news","id":2,"request_id":"d"}));
    assert_eq!(boss.until(|e| e["event"] == "ack")["id"], 2);
    assert_eq!(bob.until(|e| e["event"] == "deleted")["id"], 2);
    boss.send(json!({"command":"kick","member":"bob","reason":"bye"}));
    assert_eq!(bob.close_code(), Some(4000));
    // REST reads with ann's token follow its rooms; the key reads everything.
    let t = token(json!({"sub":"u9","rooms":["general","team-*"]}));
    let bearer = format!("Authorization: Bearer {t}\r\n");
    let (st, b) = call(&s, "GET", "/api/rooms", &bearer, "");
    assert_eq!(st, 200);
    let names: Vec<String> = json_of(&b)
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["name"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(names, vec!["general", "team-x"]);
    for path in ["/api/rooms/news", "/api/rooms/news/messages"] {
        let (st, b) = call(&s, "GET", path, &bearer, "");
        assert_eq!(
            (st, json_of(&b)["error"].as_str()),
            (403, Some("forbidden")),
            "{path}"
        );
        assert_eq!(api(&s, "GET", path, "").0, 200, "{path} with the key");
    }
    assert_eq!(
        call(&s, "GET", "/api/rooms/team-x/messages", &bearer, "").0,
        200
    );
    // A claim of the wrong shape refuses the token.
    let bad = token(json!({"sub":"x","rooms":"general"}));
    let (st, b) = call(
        &s,
        "GET",
        "/api/rooms",
        &format!("Authorization: Bearer {bad}\r\n"),
        "",
    );
    assert_eq!(st, 401);
    assert!(
        json_of(&b)["message"].as_str().unwrap().contains("rooms"),
        "{b}"
    );
    let r = s.http(&common::upgrade_request(&format!("/ws?token={bad}"), ""));
    assert_eq!(common::status(&r), 401, "{r}");
    s.stop();
}

#[test]
fn deleted_messages_and_rooms_stay_deleted_and_ids_are_not_reused_after_a_restart() {
    let dir = std::env::temp_dir().join(format!("chatterbox-api-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let db = dir.join("h.db").to_string_lossy().into_owned();
    let start = || {
        let db = db.clone();
        server(move |c| c.db_path = db)
    };
    let s = start();
    for m in ["a", "b", "c"] {
        post(&s, "general", json!({"message":m}));
        post(&s, "lobby", json!({"message":m}));
    }
    assert_eq!(
        api(&s, "DELETE", "/api/rooms/general/messages/3", "").0,
        204
    );
    assert_eq!(api(&s, "DELETE", "/api/rooms/lobby", "").0, 204);
    s.stop();
    let s = start();
    let page = s.get_json("/api/rooms/general/messages");
    let ids: Vec<u64> = page["messages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["id"].as_u64().unwrap())
        .collect();
    assert_eq!(ids, vec![1, 2]);
    assert_eq!(
        api(&s, "DELETE", "/api/rooms/general/messages/3", "").0,
        404,
        "still gone"
    );
    assert_eq!(
        post(&s, "general", json!({"message":"d"})).1["id"],
        4,
        "3 is not reused"
    );
    assert_eq!(
        s.get_json("/api/rooms/lobby/messages")["messages"],
        json!([]),
        "its history is gone"
    );
    assert_eq!(
        post(&s, "lobby", json!({"message":"again"})).1["id"],
        4,
        "the room's ids continue"
    );
    s.stop();
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_body_that_arrives_in_pieces_is_waited_for() {
    use std::io::{Read, Write};
    let s = server(|_| {});
    let body = json!({"message":"m","data":"x".repeat(6000)}).to_string();
    let mut t = std::net::TcpStream::connect(s.addr).unwrap();
    t.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let head = format!(
        "POST /api/rooms/general/messages HTTP/1.1\r\nX-API-Key: {KEY}\r\nContent-Length: {}\r\n\r\n",
        body.len()
    );
    t.write_all(head.as_bytes()).unwrap();
    t.write_all(&body.as_bytes()[..3000]).unwrap();
    t.flush().unwrap();
    // The server must not answer a partial body: the rest comes in another segment.
    std::thread::sleep(Duration::from_millis(50));
    t.write_all(&body.as_bytes()[3000..]).unwrap();
    let mut r = String::new();
    let _ = t.read_to_string(&mut r);
    assert_eq!(common::status(&r), 201, "{r}");
    assert_eq!(s.get_json("/api/rooms/general")["messages"], 1);
    s.stop();
}
