"""SPEC.md §5: nothing acknowledged is lost, across `kill -9` and SIGTERM, with the store on disk."""

from __future__ import annotations

import asyncio
import signal

from conftest import Client


def stored(srv, room: str) -> list[dict]:
    r = srv.get_json(f"/api/rooms/{room}/messages?limit=200")
    assert r["more"] is False
    return r["messages"]


async def test_acked_messages_survive_sigkill(server_factory, tmp_path):
    db = tmp_path / "chat.db"
    srv = server_factory(db_path=db)
    a = await Client.joined(srv, name="a")
    await a.send({"command": "join", "room": "dev"})
    await a.recv_event("history", room="dev")
    # send without waiting, then collect every ack
    n_general, n_dev = 25, 10
    for i in range(n_general):
        await a.send({"command": "broadcast", "message": f"g{i}", "request_id": f"g{i}"})
    for i in range(n_dev):
        await a.send({"command": "broadcast", "room": "dev", "message": f"d{i}",
                      "request_id": f"d{i}", "data": {"i": i}})
    acks = {}
    while len(acks) < n_general + n_dev:
        ev = await a.recv_until(lambda e: e.get("event") in ("ack", "error"))
        assert ev["event"] == "ack", ev
        acks[ev["request_id"]] = ev
    srv.kill()
    await a.expect_closed(timeout=10)

    srv.start()
    general = stored(srv, "general")
    assert [m["id"] for m in general] == [acks[f"g{i}"]["id"] for i in range(n_general)]
    assert [m["id"] for m in general] == list(range(1, n_general + 1))
    assert [m["message"] for m in general] == [f"g{i}" for i in range(n_general)]
    assert all(m["member"] == "a" for m in general)

    # dev is no longer in memory (nobody is in it) but its history is on disk
    b = await Client.joined(srv, name="b")
    await b.send({"command": "join", "room": "dev", "since": 0})
    h = await b.recv_event("history", room="dev")
    assert [m["id"] for m in h["messages"]] == list(range(1, n_dev + 1))
    assert [m["message"] for m in h["messages"]] == [f"d{i}" for i in range(n_dev)]
    assert [m["data"] for m in h["messages"]] == [{"i": i} for i in range(n_dev)]
    assert h["more"] is False

    # ids go on above every id handed out, never reused; after a crash they may skip the rest
    # of the block reserved ahead of delivery (ID_BLOCK = 1000, docs/PROTOCOL.md)
    ev = await b.request({"command": "broadcast", "message": "after restart"})
    assert n_general < ev["id"] <= n_general + 1000
    ev = await b.request({"command": "broadcast", "room": "dev", "message": "dev after"})
    assert n_dev < ev["id"] <= n_dev + 1000
    await b.close()


async def test_unacked_messages_survive_sigterm(server_factory, tmp_path):
    db = tmp_path / "chat.db"
    srv = server_factory(db_path=db)
    a = await Client.joined(srv, name="a")
    b = await Client.joined(srv, name="b")
    n = 30
    for i in range(n):
        await a.send({"command": "broadcast", "message": f"u{i}"})
    # once the server has answered a later command it has taken all of them in; no acks asked
    await a.send({"command": "ping", "request_id": "barrier"})
    await a.recv_event("pong")
    srv.proc.send_signal(signal.SIGTERM)
    code, _ = await b.expect_closed(timeout=10)
    assert code == 1001
    rc = await asyncio.to_thread(srv.proc.wait, 10)
    assert rc == 0

    srv.start()
    msgs = stored(srv, "general")
    assert [m["message"] for m in msgs] == [f"u{i}" for i in range(n)]
    assert [m["id"] for m in msgs] == list(range(1, n + 1))
    c = await Client.joined(srv, name="c")
    ev = await c.request({"command": "broadcast", "message": "next"})
    assert ev["id"] == n + 1
    await c.close()


async def test_restart_twice_keeps_sequence(server_factory, tmp_path):
    """A clean restart continues at the next id; a `kill -9` continues above the block of ids
    reserved ahead (never below an id that was handed out)."""
    db = tmp_path / "chat.db"
    srv = server_factory(db_path=db)
    expected, ids = [], []
    crashed = False
    for round_ in range(4):
        c = await Client.joined(srv, name=f"r{round_}")
        for i in range(3):
            ev = await c.request({"command": "broadcast", "message": f"{round_}.{i}"})
            expected.append(f"{round_}.{i}")
            if not ids:
                assert ev["id"] == 1
            elif i == 0 and crashed:
                assert ids[-1] < ev["id"] <= ids[-1] + 1000
            else:
                assert ev["id"] == ids[-1] + 1
            ids.append(ev["id"])
        await c.close()
        crashed = round_ % 2 == 1
        if crashed:
            srv.kill()
            srv.start()
        else:
            srv.restart()
    msgs = stored(srv, "general")
    assert [m["message"] for m in msgs] == expected
    assert [m["id"] for m in msgs] == ids


async def test_memory_store_forgets_on_restart(server_factory):
    srv = server_factory()  # :memory:
    c = await Client.joined(srv)
    await c.request({"command": "broadcast", "message": "ephemeral"})
    await c.close()
    srv.restart()
    assert stored(srv, "general") == []
