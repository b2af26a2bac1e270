"""Issue 11 from outside: the server API with its key, moderation, token permissions, and an
API publish answered 201 surviving `kill -9`."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
import time

import pytest

from conftest import Client, connect_status, http_request, ws_connect
from test_store_faults import disk  # noqa: F401 (the fixture)

KEY = "pytest-api-key-0123456789"
SECRET = "pytest-secret-for-issue-11"


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def token(claims: dict) -> str:
    claims = {"exp": int(time.time()) + 600, **claims}
    head = b64(json.dumps({"alg": "HS256", "typ": "JWT"}).encode())
    body = b64(json.dumps(claims).encode())
    sig = hmac.new(SECRET.encode(), f"{head}.{body}".encode(), hashlib.sha256).digest()
    return f"{head}.{body}.{b64(sig)}"


def api(srv, method: str, path: str, body=None, key: str | None = KEY, raw: bytes | None = None):
    headers = {"X-API-Key": key} if key is not None else {}
    data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
    return http_request(srv.port, path, method=method, body=data, headers=headers)


def ids(srv, room: str) -> list[int]:
    return [m["id"] for m in srv.get_json(f"/api/rooms/{room}/messages?limit=200")["messages"]]


async def test_the_key_opens_the_server_api_and_never_reaches_the_log(server_factory):
    srv = server_factory(api_key=KEY, log_level="trace")
    path = "/api/rooms/general/messages"
    for key in (None, "wrong", KEY + "x", KEY.upper(), ""):
        r = api(srv, "POST", path, {"message": "m"}, key=key)
        assert r.status == 401, (key, r)
        assert r.json()["error"] == "unauthorized"
    r = api(srv, "POST", path, {"message": "hello"})
    assert (r.status, r.json()) == (201, {"room": "general", "id": 1})
    assert ids(srv, "general") == [1]
    await srv.wait_log("API publish to room general as server")
    # The harness writes the command line (flags included) into the same file: skip it.
    server_lines = [l for l in srv.log_text().splitlines() if not l.startswith("=== start")]
    assert server_lines and not any(KEY in l for l in server_lines)


async def test_without_a_key_the_server_api_answers_404(server):
    for method, path in [("POST", "/api/rooms/general/messages"), ("POST", "/api/rooms"),
                         ("DELETE", "/api/rooms/general/messages/1"), ("DELETE", "/api/rooms/x"),
                         ("POST", "/api/members/a/disconnect"), ("POST", "/api/direct/a")]:
        r = api(server, method, path, {"message": "m", "name": "x"})
        assert r.status == 404, (method, path, r)


async def test_publish_dedup_and_ids_shared_with_members(server_factory):
    srv = server_factory(api_key=KEY)
    a = await Client.joined(srv, name="alice")
    ack = await a.request({"command": "broadcast", "message": "mine", "request_id": "1"})
    assert ack["id"] == 1
    r = api(srv, "POST", "/api/rooms/general/messages",
            {"message": "from backend", "member": "deploy-bot", "data": {"sha": "abc"},
             "msg_id": "deploy-1"})
    assert (r.status, r.json()) == (201, {"room": "general", "id": 2})
    ev = await a.recv_event("broadcast", id=2)
    assert (ev["member"], ev["message"], ev["data"]) == ("deploy-bot", "from backend",
                                                         {"sha": "abc"})
    r = api(srv, "POST", "/api/rooms/general/messages",
            {"message": "from backend", "msg_id": "deploy-1"})
    assert (r.status, r.json()) == (200, {"room": "general", "id": 2})
    ack = await a.request({"command": "broadcast", "message": "next", "request_id": "2"})
    assert ack["id"] == 3
    assert ids(srv, "general") == [1, 2, 3]
    stats = srv.get_json("/api/stats")
    assert stats["api_calls"]["publish"] == 2
    assert 'chatterbox_api_calls_total{call="publish"} 2' in srv.get("/metrics").text
    await a.close()


@pytest.mark.parametrize("raw,status", [
    (b"", 400), (b"not json", 400), (b"[]", 400), (b"\xff\xfe", 400), (b'{"message":7}', 400),
    (b'{"message":"m","member":"sys\\u0007"}', 400), (b'{"message":"m","member":"system"}', 400),
    (b'{"message":"' + b"x" * 9000 + b'"}', 413),
])
def test_hostile_bodies_get_a_clear_answer(server_factory, raw, status):
    srv = server_factory(api_key=KEY)
    r = api(srv, "POST", "/api/rooms/general/messages", raw=raw)
    assert r.status == status, r
    assert r.json()["error"] in ("bad_json", "invalid", "too_large")
    assert srv.get_json("/api/rooms/general")["messages"] == 0
    assert srv.get("/health").status == 200


async def test_delete_removes_from_history_and_tells_the_room(server_factory, tmp_path):
    srv = server_factory(api_key=KEY, db_path=tmp_path / "d.db")
    a = await Client.joined(srv, name="alice")
    for i in range(3):
        await a.request({"command": "broadcast", "message": f"m{i}", "request_id": str(i)})
    r = api(srv, "DELETE", "/api/rooms/general/messages/2")
    assert r.status == 204 and r.body == b""
    ev = await a.recv_event("deleted")
    assert ev == {"event": "deleted", "room": "general", "id": 2}
    assert ids(srv, "general") == [1, 3]
    await srv.wait_log("the API deletes message 2 of room general")
    for bad in ("2", "4", "0", "99999999999999999999", "x", "-1"):
        assert api(srv, "DELETE", f"/api/rooms/general/messages/{bad}").status == 404, bad
    await a.close()
    srv.restart()
    assert ids(srv, "general") == [1, 3], "still deleted after a restart"
    r = api(srv, "POST", "/api/rooms/general/messages", {"message": "after"})
    assert r.status == 201 and r.json()["id"] == 4, r


async def test_disconnect_closes_with_4000_and_the_reason(server_factory):
    srv = server_factory(api_key=KEY)
    a = await Client.joined(srv, name="alice")
    b = await Client.joined(srv, name="bob")
    r = api(srv, "POST", "/api/members/bob/disconnect", {"reason": "flooding the room"})
    assert r.status == 204, r
    assert await b.expect_closed() == (4000, "flooding the room")
    ev = await a.recv_until(lambda e: e.get("left") == "bob")
    assert ev["message"] == "bob has left!"
    await srv.wait_log("the API disconnects bob: flooding the room")
    assert api(srv, "POST", "/api/members/bob/disconnect").status == 404
    assert api(srv, "POST", "/api/members/alice/disconnect",
               {"reason": "a\nb"}).status == 400
    await a.close()


async def test_rooms_created_and_deleted(server_factory):
    srv = server_factory(api_key=KEY)
    assert api(srv, "POST", "/api/rooms", {"name": "lobby"}).status == 201
    assert srv.get_json("/api/rooms/lobby")["members"] == []
    a = await Client.joined(srv, name="alice")
    await a.send({"command": "join", "room": "lobby"})
    await a.recv_event("history", room="lobby")
    ack = await a.request({"command": "broadcast", "room": "lobby", "message": "x",
                           "request_id": "1"})
    assert ack["id"] == 1
    assert api(srv, "DELETE", "/api/rooms/general").status == 409
    assert api(srv, "DELETE", "/api/rooms/lobby").status == 204
    assert await a.recv_event("room_closed") == {"event": "room_closed", "room": "lobby"}
    assert srv.get("/api/rooms/lobby").status == 404
    await a.send({"command": "join", "room": "lobby"})
    h = await a.recv_event("history", room="lobby")
    assert h["messages"] == []
    ack = await a.request({"command": "broadcast", "room": "lobby", "message": "y",
                           "request_id": "2"})
    assert ack["id"] == 2, "ids are not reused"
    await a.close()


async def test_direct_from_the_server(server_factory):
    srv = server_factory(api_key=KEY)
    a = await Client.joined(srv, name="alice")
    assert api(srv, "POST", "/api/direct/alice", {"message": "hi"}).status == 204
    ev = await a.recv_event("direct")
    assert (ev["from"], ev["to"], ev["message"]) == ("server", "alice", "hi")
    assert api(srv, "POST", "/api/direct/nobody", {"message": "hi"}).status == 404
    await a.close()


async def test_token_permissions_and_read_only_rooms(server_factory):
    srv = server_factory(api_key=KEY, jwt_secret=SECRET, read_only_rooms="news")
    t = token({"sub": "ann", "rooms": ["general", "team-*"], "publish": ["team-*"]})
    ws = await ws_connect(srv.ws_url(token=t), open_timeout=5, close_timeout=1)
    a = Client(ws, srv)
    await a.welcome()
    assert a.name == "ann", "sub is the name"
    err = await a.request({"command": "join", "room": "secret", "request_id": "j"})
    assert err["code"] == "forbidden", err
    err = await a.request({"command": "broadcast", "message": "x", "request_id": "b"})
    assert err["code"] == "forbidden", err
    err = await a.request({"command": "kick", "member": "ann", "request_id": "k"})
    assert err["code"] == "forbidden", err
    # ?name= must match the token's name.
    assert await connect_status(srv, name="mallory", token=token({"sub": "bob"})) == 403
    # REST reads follow the token's rooms.
    api(srv, "POST", "/api/rooms", {"name": "news"})
    hdr = {"Authorization": f"Bearer {t}"}
    assert [r["name"] for r in srv.get("/api/rooms", headers=hdr).json()] == ["general"]
    assert srv.get("/api/rooms/news/messages", headers=hdr).status == 403
    assert srv.get("/api/rooms/news/messages", headers={"X-API-Key": KEY}).status == 200
    # news is read-only: bob may not post, the API may.
    wb = await ws_connect(srv.ws_url(token=token({"sub": "bob"})), open_timeout=5,
                          close_timeout=1)
    b = Client(wb, srv)
    await b.welcome()
    await b.send({"command": "join", "room": "news"})
    await b.recv_event("history", room="news")
    err = await b.request({"command": "broadcast", "room": "news", "message": "x",
                           "request_id": "n"})
    assert err["code"] == "forbidden", err
    r = api(srv, "POST", "/api/rooms/news/messages", {"message": "announcement"})
    assert r.status == 201
    assert (await b.recv_event("broadcast", room="news", id=1))["message"] == "announcement"
    bad = token({"sub": "x", "admin": "yes"})
    assert await connect_status(srv, token=bad) == 401
    await a.close()
    await b.close()


async def test_an_api_publish_answered_201_survives_kill_9(server_factory, tmp_path):
    srv = server_factory(api_key=KEY, db_path=tmp_path / "k.db")
    answered = []
    for i in range(30):
        r = api(srv, "POST", "/api/rooms/general/messages",
                {"message": f"p{i}", "data": {"i": i}})
        assert r.status == 201, r
        answered.append(r.json()["id"])
    assert answered == list(range(1, 31))
    srv.kill()
    srv.start()
    page = srv.get_json("/api/rooms/general/messages?limit=200")["messages"]
    assert [m["id"] for m in page] == answered
    assert [m["message"] for m in page] == [f"p{i}" for i in range(30)]
    assert all(m["member"] == "server" for m in page)
    r = api(srv, "POST", "/api/rooms/general/messages", {"message": "after"})
    assert r.status == 201 and r.json()["id"] > 30


async def test_an_api_publish_on_a_full_disk_is_refused_503_and_works_once_space_returns(
        server_factory, disk):
    """The server API meets the store's bound like members do: with the disk full and
    `--max-unstored` waiting messages, a publish answers 503 at once and changes nothing; once
    space returns it is answered 201 with the next id."""
    from test_store_faults import FAST, broadcast_until_unavailable, fill, wait_health

    srv = server_factory(api_key=KEY, db_path=disk / "chat.db", max_unstored=50, **FAST)
    a = await Client.joined(srv, name="a")
    before = await a.request({"command": "broadcast", "message": "before"})
    assert before["event"] == "ack", before
    filler = fill(disk)
    delivered, refusal = await broadcast_until_unavailable(a, 5000)
    assert refusal["code"] == "unavailable", refusal
    r = api(srv, "POST", "/api/rooms/general/messages", {"message": "from the backend"})
    assert r.status == 503 and json.loads(r.text)["error"] == "unavailable", (r.status, r.text)
    await asyncio.sleep(0.2)
    assert not [e for e in a.seen if e.get("message") == "from the backend"], "not delivered"

    filler.unlink()
    await wait_health(srv, 200, timeout=60)
    r = api(srv, "POST", "/api/rooms/general/messages", {"message": "from the backend"})
    assert r.status == 201, (r.status, r.text)
    last = max([before["id"], *delivered])
    assert json.loads(r.text)["id"] == last + 1, "a refused publish uses no id"
    await a.close()
