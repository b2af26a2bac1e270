"""Validation, errors and limits of SPEC.md §3 (errors) and §4: bad input gets an error or a close
code, never a crash, and never touches another member."""

from __future__ import annotations

import asyncio
import json
import socket
import time

from conftest import (Client, RawWs, connect_status, parse_status, raw_exchange, read_all,
                      ws_handshake_bytes)


async def assert_alive(c: Client) -> None:
    await c.send({"command": "ping", "request_id": "alive"})
    ev = await c.recv_event("pong")
    assert ev["request_id"] == "alive"


async def expect_error(c: Client, payload, code: str, raw: bool = False) -> dict:
    if raw:
        await c.send_raw(payload)
    else:
        await c.send(payload)
    ev = await c.recv_event("error")
    assert ev["code"] == code, ev
    assert isinstance(ev["message"], str) and ev["message"], ev
    return ev


# ---------------------------------------------------------------------------------------------
# Error codes
# ---------------------------------------------------------------------------------------------


async def test_bad_json(server):
    c = await Client.joined(server)
    await expect_error(c, "this is not json", "bad_json", raw=True)
    await expect_error(c, '{"command": "ping"', "bad_json", raw=True)
    await expect_error(c, "[1, 2, 3]", "bad_json", raw=True)
    await expect_error(c, '"just a string"', "bad_json", raw=True)
    await expect_error(c, "42", "bad_json", raw=True)
    await expect_error(c, "null", "bad_json", raw=True)
    await expect_error(c, b'{"command":"ping"}', "bad_json", raw=True)  # binary frame
    await assert_alive(c)
    await c.close()


async def test_unknown_command(server):
    c = await Client.joined(server)
    await expect_error(c, {"command": "dance"}, "unknown_command")
    await expect_error(c, {"command": "BROADCAST", "message": "x"}, "unknown_command")
    # an object without `command` at all is refused too (unknown_command or invalid)
    await c.send({"message": "no command"})
    ev = await c.recv_event("error")
    assert ev["code"] in ("unknown_command", "invalid"), ev
    await assert_alive(c)
    await c.close()


async def test_invalid_fields(server):
    a = await Client.joined(server)
    b = await Client.joined(server)
    bad = [
        {"command": "broadcast"},                               # missing message
        {"command": "broadcast", "message": 123},               # wrong type
        {"command": "broadcast", "message": ["x"]},             # wrong type
        {"command": "broadcast", "message": None},              # wrong type
        {"command": "broadcast", "message": ""},                # empty
        {"command": "broadcast", "message": "   \t\n "},        # only whitespace
        {"command": "broadcast", "message": "x" * 1001},        # too long
        {"command": "broadcast", "message": "é" * 1001},        # too long in characters
        {"command": "broadcast", "message": "x", "room": ""},   # bad room name
        {"command": "broadcast", "message": "x", "room": 5},    # wrong type
        {"command": "join"},                                    # missing room
        {"command": "join", "room": "no spaces"},               # bad room name
        {"command": "join", "room": "r" * 65},                  # room name too long
        {"command": "direct", "message": "x"},                  # missing to
        {"command": "direct", "to": b.name},                    # missing message
        {"command": "history", "room": "general", "limit": "x"},  # wrong type
        {"command": "broadcast", "message": "x", "msg_id": "m" * 65},  # msg_id too long
        {"command": "ping", "request_id": "r" * 65},            # request_id too long
        {"command": "ping", "request_id": 7},                   # request_id wrong type
    ]
    for cmd in bad:
        ev = await expect_error(a, cmd, "invalid")
        if isinstance(cmd.get("request_id"), str) and len(cmd["request_id"]) <= 64:
            assert ev.get("request_id") == cmd["request_id"]
    # request_id is echoed on an invalid command
    ev = await expect_error(a, {"command": "broadcast", "request_id": "rid-1"}, "invalid")
    assert ev["request_id"] == "rid-1"
    await assert_alive(a)
    # the limits are inclusive: 1000 characters (multi-byte too) and 64-char ids are fine
    await a.send({"command": "broadcast", "message": "é" * 1000, "request_id": "r" * 64})
    ack = await a.recv_event("ack")
    assert ack["request_id"] == "r" * 64
    # no error changed state: the first stored message got id 1 and b saw nothing before it
    assert ack["id"] == 1
    ev = await b.recv_until(lambda e: e.get("event") == "broadcast" and e.get("member") == a.name)
    assert ev["message"] == "é" * 1000 and ev["id"] == 1
    assert server.get_json("/api/members") == [a.name, b.name]
    await a.close()
    await b.close()


async def test_errors_do_not_reach_other_members(server):
    a = await Client.joined(server)
    b = await Client.joined(server)
    await a.send_raw("garbage")
    await a.send({"command": "nope"})
    await a.send({"command": "broadcast", "message": ""})
    await a.send({"command": "broadcast", "message": "after errors"})
    ev = await b.recv_until(lambda e: e.get("member") == a.name)
    assert ev["message"] == "after errors"
    assert not any(e.get("event") == "error" for e in b.seen)
    await a.close()
    await b.close()


# ---------------------------------------------------------------------------------------------
# Frame size
# ---------------------------------------------------------------------------------------------


async def test_oversized_frame_closes_1009(server):
    c = await Client.joined(server)
    other = await Client.joined(server)
    big = json.dumps({"command": "broadcast", "message": "x", "data": "y" * 9000})
    await c.send_raw(big)
    code, _ = await c.expect_closed()
    assert code == 1009
    # the server and the other member are fine
    await assert_alive(other)
    if not any(e.get("left") == c.name for e in other.seen):
        await other.recv_until(lambda e: e.get("left") == c.name)
    await other.close()


async def test_oversized_fragmented_message_closes_1009(server):
    c = await Client.joined(server)
    # three 4000-byte fragments: every frame is under the limit, the message is not
    await c.ws.send(iter(["a" * 4000, "b" * 4000, "c" * 4000]))
    code, _ = await c.expect_closed()
    assert code == 1009
    assert server.get("/health").status == 200


async def test_frame_size_limit_is_a_setting(server_factory):
    srv = server_factory(max_frame_size=20000)
    c = await Client.joined(srv)
    await c.send({"command": "broadcast", "message": "x", "data": "y" * 12000,
                  "request_id": "big"})
    ack = await c.recv_event("ack")
    assert ack["id"] == 1
    await c.close()


# ---------------------------------------------------------------------------------------------
# Timeouts
# ---------------------------------------------------------------------------------------------


async def test_idle_close_1000(server_factory):
    srv = server_factory(idle_timeout=0.5)
    c = await Client.joined(srv)
    code, reason = await c.expect_closed(timeout=10)
    assert (code, reason) == (1000, "idle")


async def test_commands_keep_connection_from_idle(server_factory):
    srv = server_factory(idle_timeout=1.0)
    c = await Client.joined(srv)
    # keep sending commands for 2.5 idle periods; the connection must stay open
    for _ in range(10):
        await asyncio.sleep(0.25)
        await c.send({"command": "ping"})
        await c.recv_event("pong")
    # then stop: closed as idle
    code, reason = await c.expect_closed(timeout=10)
    assert (code, reason) == (1000, "idle")


async def test_no_frame_timeout_closes_silent_client(server_factory):
    srv = server_factory(ping_interval=0.2, pong_timeout=0.8)
    raw = await asyncio.to_thread(RawWs.open, srv.port)
    # a client that answers pings (websockets does so automatically) stays connected
    live = await Client.joined(srv)
    try:
        frames, closed = await asyncio.to_thread(raw.read_until_closed, 10)
        assert closed, "silent client was not closed"
        opcodes = [op for op, _ in frames]
        assert 0x9 in opcodes, f"server never pinged: {opcodes}"
    finally:
        raw.close()
    await asyncio.sleep(1.0)
    await assert_alive(live)
    await live.close()


async def test_head_timeout_closes_partial_request(server_factory):
    srv = server_factory(head_timeout=0.5)

    def partial() -> bool:
        with socket.create_connection(("127.0.0.1", srv.port), timeout=5) as s:
            s.sendall(b"GET /ws HTTP/1.1\r\nHost: 127.0.0.1\r\n")
            _, closed = read_all(s, 8)
            return closed

    assert await asyncio.to_thread(partial)
    assert srv.get("/health").status == 200


async def test_head_timeout_is_not_reset_by_trickling_bytes(server_factory):
    srv = server_factory(head_timeout=0.5)

    def trickle() -> bool:
        with socket.create_connection(("127.0.0.1", srv.port), timeout=5) as s:
            s.sendall(b"GET /health HTTP/1.1\r\nX-Slow: ")
            deadline = time.monotonic() + 8
            while time.monotonic() < deadline:
                try:
                    s.sendall(b"a")
                except OSError:
                    return True
                _, closed = read_all(s, 0.1)
                if closed:
                    return True
            return False

    assert await asyncio.to_thread(trickle)


def test_head_over_limit_431(server_factory):
    srv = server_factory(max_head_bytes=1024)
    head = b"GET /health HTTP/1.1\r\nHost: x\r\nX-Pad: " + b"a" * 2000 + b"\r\n\r\n"
    assert parse_status(raw_exchange(srv.port, head)) == 431
    # a head under the limit is fine
    ok = b"GET /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\nX-Pad: " + b"a" * 500 + b"\r\n\r\n"
    assert parse_status(raw_exchange(srv.port, ok)) == 200


def test_bad_websocket_key_or_version_400(server):
    assert parse_status(raw_exchange(server.port, ws_handshake_bytes(key="short"))) == 400
    assert parse_status(raw_exchange(server.port, ws_handshake_bytes(key="!!!!not base64!!!!!!!=="))) == 400
    no_key = (b"GET /ws HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
              b"Sec-WebSocket-Version: 13\r\n\r\n")
    assert parse_status(raw_exchange(server.port, no_key)) == 400
    # RFC 6455 suggests 426 for an unsupported version; the SPEC says malformed is 400
    assert parse_status(raw_exchange(server.port, ws_handshake_bytes(version="8"))) in (400, 426)
    assert server.get_json("/api/stats")["members"] == 0


def test_plain_get_ws_without_upgrade_is_refused(server):
    r = server.get("/ws")
    assert 400 <= r.status < 500


# ---------------------------------------------------------------------------------------------
# Connection limits
# ---------------------------------------------------------------------------------------------


async def wait_status(srv, want: int, **kw) -> int:
    """Connection slots free up when the server has seen a close: retry for a bounded while."""
    status = None
    for _ in range(50):
        status = await connect_status(srv, **kw)
        if status == want:
            break
        await asyncio.sleep(0.1)
    return status


async def test_max_connections_503(server_factory):
    srv = server_factory(max_connections=2)
    a = await Client.joined(srv)
    b = await Client.joined(srv)
    assert await connect_status(srv) == 503
    assert srv.get_json("/api/members") == [a.name, b.name]
    await b.close()
    assert await wait_status(srv, 101) == 101
    await a.close()


async def test_max_connections_per_ip_429(server_factory):
    srv = server_factory(max_connections_per_ip=2)
    a = await Client.joined(srv)
    b = await Client.joined(srv)
    assert await connect_status(srv) == 429
    # another client address (127.0.0.2 is loopback too) has its own allowance
    assert await connect_status(srv, connect_kwargs={"local_addr": ("127.0.0.2", 0)}) == 101
    await a.close()
    assert await wait_status(srv, 101) == 101
    await b.close()


# ---------------------------------------------------------------------------------------------
# Slow consumer
# ---------------------------------------------------------------------------------------------


async def test_slow_consumer_is_closed_others_unaffected(server_factory):
    srv = server_factory(max_pending_output=65536, rate_per_sec=100000, rate_burst=100000,
                         flood_close_after=1000000)
    observer = await Client.joined(srv, name="observer")
    flooder = await Client.joined(srv, name="flooder")
    slow = await asyncio.to_thread(RawWs.open, srv.port, "slow", 4096)
    await observer.recv_until(lambda e: e.get("joined") == "slow")
    try:
        pad = "p" * 4000
        sent = 0
        batch = 10
        gone = False
        while sent < 3000 and not gone:
            for _ in range(batch):
                sent += 1
                await flooder.send({"command": "broadcast", "message": f"m{sent}",
                                    "data": pad, "echo": False})
            # lock-step with the observer so that only the slow client falls behind
            await observer.recv_until(
                lambda e: e.get("event") == "broadcast" and e.get("message") == f"m{sent}",
                timeout=10)
            gone = any(e.get("left") == "slow" for e in observer.seen)
        assert gone, f"slow consumer still connected after {sent} messages"
        # the observer got every message once, in order, without gaps
        got = [e for e in observer.seen if e.get("event") == "broadcast" and e.get("member") == "flooder"]
        assert [e["message"] for e in got] == [f"m{i}" for i in range(1, sent + 1)]
        assert [e["id"] for e in got] == list(range(1, sent + 1))
        assert "slow" not in srv.get_json("/api/members")
        # what the slow client does get, once it reads: an in-order prefix, then Close 1008
        frames, closed = await asyncio.to_thread(slow.read_until_closed, 10)
        assert closed
        texts = [json.loads(p) for op, p in frames if op == 0x1]
        flood = [e["message"] for e in texts if e.get("member") == "flooder"]
        assert flood == [f"m{i}" for i in range(1, len(flood) + 1)]
        assert len(flood) < sent
        assert frames and frames[-1][0] == 0x8, f"no Close frame at the end: {frames[-1:]}"
        close = frames[-1][1]
        assert int.from_bytes(close[:2], "big") == 1008
        assert close[2:].decode() == "slow consumer"
        stats = srv.get_json("/api/stats")
        assert stats["slow_consumers_closed"] >= 1
        assert srv.get("/health").status == 200
        await assert_alive(flooder)
    finally:
        slow.close()
    await observer.close()
    await flooder.close()


# ---------------------------------------------------------------------------------------------
# Rate limiting
# ---------------------------------------------------------------------------------------------


async def test_rate_limited_commands_are_dropped(server_factory):
    srv = server_factory(rate_per_sec=1, rate_burst=5, flood_close_after=50)
    a = await Client.joined(srv)
    b = await Client.joined(srv)
    n = 12
    for i in range(n):
        await a.send({"command": "broadcast", "message": f"f{i}", "request_id": f"q{i}"})
    answers = {}
    while len(answers) < n:
        ev = await a.recv_until(lambda e: e.get("event") in ("ack", "error"))
        assert "request_id" in ev, f"answer without the command's request_id: {ev}"
        assert ev["request_id"] not in answers, f"two answers for {ev['request_id']}"
        answers[ev["request_id"]] = ev
    acked = [f"q{i}" for i in range(n) if answers[f"q{i}"]["event"] == "ack"]
    limited = [f"q{i}" for i in range(n) if answers[f"q{i}"]["event"] == "error"]
    assert all(answers[r]["code"] == "rate_limited" for r in limited)
    assert len(acked) >= 5, "the burst must go through"
    assert len(limited) >= 1, "nothing was rate limited"
    # dropped means dropped: only the acked ones were delivered and stored, ids without gaps
    assert [answers[r]["id"] for r in acked] == list(range(1, len(acked) + 1))
    stored = srv.get_json("/api/rooms/general/messages?limit=100")["messages"]
    assert [m["message"] for m in stored] == [f"f{r[1:]}" for r in acked]
    assert srv.get_json("/api/stats")["rate_limited"] >= len(limited)
    # the connection is still open and works again once tokens are back
    ev = None
    for _ in range(40):
        await asyncio.sleep(0.25)
        await a.send({"command": "ping", "request_id": "later"})
        ev = await a.recv_until(lambda e: e.get("request_id") == "later")
        if ev["event"] == "pong":
            break
    assert ev is not None and ev["event"] == "pong"
    # the other member got exactly the accepted messages
    got = [(await b.recv_event("broadcast", member=a.name))["message"] for _ in acked]
    assert got == [m["message"] for m in stored]
    extra = await b.sync()
    assert not any(e.get("event") == "broadcast" and e.get("member") == a.name for e in extra)
    await a.close()
    await b.close()


async def test_flooding_client_is_closed_1008(server_factory):
    srv = server_factory(rate_per_sec=1, rate_burst=5, flood_close_after=10)
    a = await Client.joined(srv)
    other = await Client.joined(srv)
    for i in range(200):
        try:
            await a.send({"command": "ping"})
        except Exception:
            break
    code, _ = await a.expect_closed(timeout=10)
    assert code == 1008
    assert any(e.get("code") == "rate_limited" for e in a.seen)
    await other.recv_until(lambda e: e.get("left") == a.name)
    await assert_alive(other)
    await other.close()
