"""Issue 9, the core's bounds, from the outside: a history page or a `list` bigger than the output
bound never closes the member who asked for it, and `data` comes back as the bytes sent."""

from __future__ import annotations

import json

from conftest import Client


def bomb(i: int) -> dict:
    """The issue's recipe: 1,000 × "💣" and 3,500 characters of data, within every default."""
    return {"command": "broadcast", "message": "💣" * 1000, "data": f"{i:04}" + "x" * 3496,
            "echo": False, "request_id": f"b{i}"}


def ids(ev: dict) -> list[int]:
    return [m["id"] for m in ev["messages"]]


async def drop_bombs(srv) -> None:
    c = await Client.joined(srv, name="sender")
    for i in range(50):
        # raw UTF-8: json.dumps' default \ud83d\udca3 escapes would triple the frame past 8 KiB
        await c.send_raw(json.dumps(bomb(i), ensure_ascii=False))
    await c.recv_until(lambda e: e.get("event") == "ack" and e.get("request_id") == "b49",
                       timeout=15)
    await c.close()


async def page_through(srv) -> None:
    """A newcomer gets a cut page with more:true, stays, and pages back to message 1."""
    c = await Client.connect(srv, "newcomer")
    _, _, page = await c.welcome()
    got = ids(page)
    assert 0 < len(got) < 50 and got[-1] == 50 and page["more"] is True, got
    seen = got
    while seen[0] > 1:
        ev = await c.request({"command": "history", "room": "general", "before": seen[0],
                              "limit": 200})
        assert ev["event"] == "history" and ev["messages"], ev
        assert ev["more"] is (ev["messages"][0]["id"] > 1)
        seen = ids(ev) + seen
    assert seen == list(range(1, 51))
    assert (await c.request({"command": "ping"}))["event"] == "pong"
    await c.close()


async def test_the_bombs_lock_no_joiner_out_even_after_a_restart(server_factory, tmp_path):
    srv = server_factory(db_path=str(tmp_path / "bombs.db"), rate_burst=1000)
    await drop_bombs(srv)
    await page_through(srv)
    srv.restart()
    await page_through(srv)
    rest = srv.get_json("/api/rooms/general/messages?limit=200")
    assert 0 < len(rest["messages"]) < 50 and rest["more"] is True


async def test_a_list_over_the_output_bound_reaches_the_asker(server_factory):
    srv = server_factory(max_pending_output=4096, notice_max_members=0)
    asker = await Client.joined(srv, name="asker")
    others = [await Client.joined(srv, name=f"{i:03}" + "n" * 29) for i in range(150)]
    ev = await asker.request({"command": "list"})
    assert ev["event"] == "list" and len(ev["members"]) == 151
    assert (await asker.request({"command": "ping"}))["event"] == "pong"
    for o in others:
        await o.close()
    await asker.close()


def test_page_bytes_over_half_the_output_bound_is_refused_at_start(tmp_path):
    from conftest import Server
    import pytest
    srv = Server(tmp_path, {"max_pending_output": 100000, "max_page_bytes": 50001})
    with pytest.raises(RuntimeError, match=r"max-page-bytes \(MAX_PAGE_BYTES\) must be at most half"):
        srv.start()


FRAGILE = ["-0", "1e-400", "123456789012345678901234567890", '{"a":1,"a":2}',
           '{ "spaced" : [1, 2.50, "\\u00e9"] }']


async def test_data_is_the_bytes_sent_live_in_history_and_after_a_restart(server_factory,
                                                                          tmp_path):
    srv = server_factory(db_path=str(tmp_path / "data.db"))
    c = await Client.joined(srv, name="writer")
    for i, raw in enumerate(FRAGILE):
        await c.send_raw('{"command":"broadcast","message":"m%d","data":%s,"request_id":"f%d"}'
                         % (i, raw, i))
        while True:
            text = await c.ws.recv()
            if '"event":"broadcast"' in text:
                break
        assert text.endswith(f'"data":{raw}}}'), text
    await c.recv_until(lambda e: e.get("request_id") == f"f{len(FRAGILE) - 1}")
    await c.close()
    srv.restart()
    c = await Client.joined(srv, name="reader")
    await c.send({"command": "history", "room": "general"})
    while True:
        text = await c.ws.recv()
        if '"event":"history"' in text:
            break
    body = srv.get("/api/rooms/general/messages").text
    for where in (text, body):
        for raw in FRAGILE:
            assert f'"data":{raw}}}' in where, (raw, where)
    json.loads(body)
    await c.close()
