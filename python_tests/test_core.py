"""Core behaviour of SPEC.md §2-§3 and §6: lifecycle, basic commands, logs, the HTTP front door."""

from __future__ import annotations

import asyncio
import re
import signal
import time

from conftest import Client, connect_status, parse_status, raw_exchange

UUID_V4 = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}$")
DEFAULT_NAME = re.compile(r"^member[1-9][0-9]*$")
ALONE = "No other members are currently connected."


def now_ms() -> int:
    return int(time.time() * 1000)


# ---------------------------------------------------------------------------------------------
# The four tests of the original brief
# ---------------------------------------------------------------------------------------------


async def test_1_two_members_in_storage(server):
    a = await Client.joined(server)
    b = await Client.joined(server)
    await a.send({"command": "list"})
    listed = await a.recv_event("list")
    assert sorted(listed["members"]) == sorted([a.name, b.name])
    assert len(listed["members"]) == 2
    assert server.get_json("/api/members") == [a.name, b.name]
    assert server.get_json("/api/stats")["members"] == 2
    print("✅ Test 1 passed: 2 members connected and present in storage")
    await a.close()
    await b.close()


async def test_2_broadcast_reaches_all(server):
    clients = [await Client.joined(server) for _ in range(3)]
    sender = clients[0]
    await sender.send({"command": "broadcast", "message": "Hello world!"})
    for c in clients:
        ev = await c.recv_event("broadcast", member=sender.name)
        assert ev["message"] == "Hello world!"
        assert ev["room"] == "general"
    print("✅ Test 2 passed: Broadcast message received by all members")
    for c in clients:
        await c.close()


async def test_3_disconnect_removes_member(server):
    a = await Client.joined(server)
    b = await Client.joined(server)
    gone = b.name
    await b.close()
    await a.recv_until(lambda e: e.get("left") == gone)
    await a.send({"command": "list"})
    listed = await a.recv_event("list")
    assert gone not in listed["members"]
    assert listed["members"] == [a.name]
    assert gone not in server.get_json("/api/members")
    print("✅ Test 3 passed: Disconnected member removed from server list")
    await a.close()


async def test_4_me_then_joined(server):
    c = await Client.connect(server)
    me = await c.recv()
    assert me["event"] == "me"
    assert DEFAULT_NAME.match(me["member"]), me
    assert UUID_V4.match(me["id"]), me
    joined = await c.recv()
    assert joined["event"] == "broadcast"
    assert joined["member"] == "system"
    assert joined["message"] == f"{me['member']} has joined!"
    print("✅ Test 4 passed: Member received me + joined broadcast")
    await c.close()


# ---------------------------------------------------------------------------------------------
# Welcome sequence and names
# ---------------------------------------------------------------------------------------------


async def test_welcome_order_me_joined_history(server):
    c = await Client.connect(server)
    me = await c.recv()
    joined = await c.recv()
    history = await c.recv()
    assert me["event"] == "me" and {"member", "id"} <= me.keys()
    assert joined == {
        "event": "broadcast", "room": "general", "member": "system",
        "message": f"{me['member']} has joined!", "joined": me["member"],
    }
    assert history["event"] == "history"
    assert history["room"] == "general"
    assert history["messages"] == []
    assert history["more"] is False
    await c.close()


async def test_existing_members_get_joined_notice_and_newcomer_gets_history(server):
    a = await Client.joined(server)
    await a.send({"command": "broadcast", "message": "first", "request_id": "x"})
    await a.recv_event("ack")
    b = await Client.connect(server)
    me, joined, history = await b.welcome()
    note = await a.recv_until(lambda e: e.get("joined") == b.name)
    assert note["room"] == "general" and note["member"] == "system"
    assert note["message"] == f"{b.name} has joined!"
    assert [m["message"] for m in history["messages"]] == ["first"]
    msg = history["messages"][0]
    assert msg["id"] == 1 and msg["member"] == a.name and isinstance(msg["ts"], int)
    await a.close()
    await b.close()


async def test_default_names_are_unique(server):
    clients = [await Client.joined(server) for _ in range(4)]
    names = [c.name for c in clients]
    assert len(set(names)) == 4
    assert all(DEFAULT_NAME.match(n) for n in names)
    ids = [c.id for c in clients]
    assert len(set(ids)) == 4 and all(UUID_V4.match(i) for i in ids)
    for c in clients:
        await c.close()


async def test_name_query_honoured(server):
    c = await Client.connect(server, name="alice_1.x-Y")
    me, joined, _ = await c.welcome()
    assert me["member"] == "alice_1.x-Y"
    assert joined["joined"] == "alice_1.x-Y"
    await c.close()


async def test_invalid_name_refused_400(server):
    for bad in ["bad name", "a" * 33, "héllo", "semi;colon", "slash/x"]:
        assert await connect_status(server, bad) == 400, bad
    # 32 characters is the maximum and is accepted
    assert await connect_status(server, "b" * 32) == 101


async def test_taken_name_refused_409_ignoring_case(server):
    a = await Client.joined(server, name="Alice")
    for taken in ["Alice", "alice", "ALICE"]:
        assert await connect_status(server, taken) == 409, taken
    # the refused attempts changed nothing
    assert server.get_json("/api/members") == ["Alice"]
    await a.close()
    # once Alice is gone the name is free again
    await asyncio.sleep(0)
    for _ in range(50):
        if server.get_json("/api/members") == []:
            break
        await asyncio.sleep(0.05)
    c = await Client.joined(server, name="alice")
    assert c.name == "alice"
    await c.close()


async def test_system_name_reserved(server):
    # SPEC: `system` is reserved. A reserved name is refused before the upgrade; we accept 400
    # (a bad name) or 409 (taken by the system), never a successful upgrade.
    for name in ["system", "System", "SYSTEM"]:
        assert await connect_status(server, name) in (400, 409), name


# ---------------------------------------------------------------------------------------------
# Commands
# ---------------------------------------------------------------------------------------------


async def test_me_command(server):
    c = await Client.joined(server, name="carol")
    ev = await c.request({"command": "me"})
    assert ev["event"] == "me"
    assert ev["member"] == "carol"
    assert ev["id"] == c.id
    assert ev["rooms"] == ["general"]
    await c.close()


async def test_list_oldest_first(server):
    names = ["zed", "amy", "mo"]
    clients = [await Client.joined(server, name=n) for n in names]
    ev = await clients[1].request({"command": "list"})
    assert ev["event"] == "list"
    assert ev["members"] == names
    for c in clients:
        await c.close()


async def test_ping_pong(server):
    c = await Client.joined(server)
    before = now_ms()
    await c.send({"command": "ping"})
    ev = await c.recv()
    assert ev["event"] == "pong"
    assert isinstance(ev["ts"], int) and not isinstance(ev["ts"], bool)
    # Unix milliseconds: same clock as ours, give or take a minute
    assert before - 60_000 <= ev["ts"] <= now_ms() + 60_000
    await c.close()


async def test_broadcast_fields(server):
    a = await Client.joined(server, name="ann")
    b = await Client.joined(server, name="bob")
    before = now_ms()
    await a.send({"command": "broadcast", "message": "Hello world!"})
    for c in (a, b):
        ev = await c.recv_event("broadcast", member="ann")
        assert set(ev) == {"event", "room", "member", "message", "id", "ts"}, ev
        assert ev["room"] == "general"
        assert ev["message"] == "Hello world!"
        assert ev["id"] == 1
        assert isinstance(ev["ts"], int)
        assert before - 60_000 <= ev["ts"] <= now_ms() + 60_000
    await a.close()
    await b.close()


async def test_alone_notice(server):
    a = await Client.joined(server)
    await a.send({"command": "broadcast", "message": "anyone?"})
    got = await a.sync()
    assert {"event": "system", "message": ALONE} in got
    assert any(e.get("event") == "broadcast" and e.get("message") == "anyone?" for e in got)
    # not alone any more: no notice
    b = await Client.joined(server)
    await a.send({"command": "broadcast", "message": "hi bob"})
    got = await a.sync()
    assert not any(e.get("event") == "system" for e in got), got
    assert any(e.get("event") == "broadcast" and e.get("message") == "hi bob" for e in got)
    await a.close()
    await b.close()


async def test_request_id_echoed_on_reply_ack_and_error(server):
    a = await Client.joined(server)
    b = await Client.joined(server)
    await a.send({"command": "me", "request_id": "q-me"})
    ev = await a.recv_until(lambda e: e.get("event") == "me")
    assert ev["request_id"] == "q-me"

    await a.send({"command": "list", "request_id": "q-list"})
    ev = await a.recv_event("list")
    assert ev["request_id"] == "q-list"

    await a.send({"command": "ping", "request_id": "q-ping"})
    ev = await a.recv_event("pong")
    assert ev["request_id"] == "q-ping"

    await a.send({"command": "broadcast", "message": "acked", "request_id": "q-b"})
    ack = await a.recv_event("ack")
    assert ack["request_id"] == "q-b"
    assert ack["room"] == "general"
    echo = await b.recv_event("broadcast", message="acked")
    assert ack["id"] == echo["id"] == 1

    await a.send({"command": "no_such_thing", "request_id": "q-err"})
    err = await a.recv_event("error")
    assert err["request_id"] == "q-err"
    assert err["code"] == "unknown_command"
    assert isinstance(err["message"], str) and err["message"]
    await a.close()
    await b.close()


async def test_left_notice_on_disconnect(server):
    a = await Client.joined(server)
    b = await Client.joined(server)
    name = b.name
    await b.close()
    ev = await a.recv_until(lambda e: e.get("left") == name)
    assert ev == {"event": "broadcast", "room": "general", "member": "system",
                  "message": f"{name} has left!", "left": name}
    await a.close()


async def test_abrupt_disconnect_counts_as_disconnect(server):
    a = await Client.joined(server)
    b = await Client.joined(server)
    name = b.name
    # drop the TCP connection without a close frame
    b.ws.transport.abort()
    await a.recv_until(lambda e: e.get("left") == name)
    assert server.get_json("/api/members") == [a.name]
    await a.close()


async def test_client_close_is_answered(server):
    # RFC 6455 §5.5.1: the endpoint that receives a Close frame sends one back
    c = await Client.joined(server)
    other = await Client.joined(server)
    await asyncio.wait_for(c.ws.close(code=1000, reason="bye"), 10)
    # websockets reports 1006 when no Close frame came back
    assert c.ws.close_code == 1000, f"server answered the close with {c.ws.close_code}"
    await other.recv_until(lambda e: e.get("left") == c.name)
    await other.close()


async def test_log_lines(server):
    c = await Client.joined(server, name="logger")
    await server.wait_log("🔌 Member logger connected")
    await c.send({"command": "broadcast", "message": "Hello world!"})
    await c.recv_event("broadcast")
    await server.wait_log("📤 Broadcast from logger: Hello world!")
    await c.close()
    await server.wait_log("🔌 Member logger disconnected")


# ---------------------------------------------------------------------------------------------
# HTTP front door and shutdown
# ---------------------------------------------------------------------------------------------


def test_health(server):
    r = server.get("/health")
    assert r.status == 200
    assert r.header("Content-Type").startswith("text/plain")
    assert r.body == b"ok"


def test_unknown_path_404(server):
    assert server.get("/nope").status == 404
    assert server.get("/api/nope").status == 404
    assert server.get("/healthz").status == 404


def test_post_health_405_with_allow(server):
    r = server.get("/health", method="POST", body=b"x")
    assert r.status == 405
    allow = r.header("Allow")
    assert allow is not None and "GET" in allow.upper()


def test_garbage_http_400(server):
    raw = raw_exchange(server.port, b"\x00\x01\x02 this is not http\r\n\r\n")
    assert parse_status(raw) == 400
    raw = raw_exchange(server.port, b"GET /health HTTP/1.1\r\nBroken header line\r\n\r\n")
    assert parse_status(raw) == 400
    # the server is still fine
    assert server.get("/health").status == 200


async def test_sigterm_closes_1001_and_exits_0(server):
    clients = [await Client.joined(server) for _ in range(3)]
    for proc in server.procs:  # in cluster mode, every node
        proc.send_signal(signal.SIGTERM)
    for c in clients:
        code, _reason = await c.expect_closed(timeout=10)
        assert code == 1001
    for proc in server.procs:
        rc = await asyncio.to_thread(proc.wait, 10)
        assert rc == 0
