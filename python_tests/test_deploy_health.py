"""What an operator sees (issue 13, section 4): `/health` as JSON for a checker, `503` with a
reason when the store cannot write (a full tmpfs, as in test_store_faults.py; needs root),
`HEAD`, the process gauges of `/metrics`, and the start-up lines of the real binary.
"""

from __future__ import annotations

import asyncio
import re
import time

from conftest import Client, http_request
from test_store_faults import FAST, broadcast_until_unavailable, disk, fill  # noqa: F401

JSON = {"Accept": "application/json"}


def health_json(port: int) -> tuple[int, dict]:
    r = http_request(port, "/health", headers=JSON)
    assert r.header("Content-Type") == "application/json", r
    return r.status, r.json()


async def test_health_json_counts_and_plain_stays_plain(server_factory):
    srv = server_factory()
    a = await Client.joined(srv, name="a")
    await a.request({"command": "join", "room": "side"})
    status, body = health_json(srv.port)
    assert status == 200
    assert body["status"] == "ok" and body["members"] == 1 and body["rooms"] == 2, body
    assert body["connections"] >= 2 and isinstance(body["uptime_secs"], int), body
    assert set(body) == {"status", "connections", "members", "rooms", "uptime_secs"}
    r = srv.get("/health")
    assert (r.status, r.text, r.header("Content-Type").split(";")[0]) == (200, "ok", "text/plain")
    r = http_request(srv.port, "/health", method="HEAD", headers=JSON)
    assert r.status == 200 and r.body == b"" and r.header("Content-Type") == "application/json"
    await a.close()


async def test_health_json_says_unavailable_with_a_reason_when_the_disk_is_full(
        server_factory, disk):  # noqa: F811
    srv = server_factory(db_path=disk / "chat.db", max_unstored=50, **FAST)
    a = await Client.joined(srv, name="a")
    filler = fill(disk)
    _, refusal = await broadcast_until_unavailable(a, 5000)
    assert refusal["code"] == "unavailable"
    deadline = time.monotonic() + 30
    while True:
        status, body = health_json(srv.port)
        if status == 503:
            break
        assert time.monotonic() < deadline, f"/health stayed {status} {body}"
        await asyncio.sleep(0.1)
    assert body["status"] == "unavailable" and "history store" in body["reason"], body
    assert body["members"] == 1, body
    assert srv.get("/health").text == "store unavailable"
    filler.unlink()
    deadline = time.monotonic() + 60
    while health_json(srv.port)[0] != 200:
        assert time.monotonic() < deadline, "/health never came back"
        try:
            await a.recv(timeout=0.5)
        except AssertionError:
            pass
    assert health_json(srv.port)[1]["status"] == "ok"
    await a.close()


async def test_metrics_show_the_process_and_the_build(server_factory):
    srv = server_factory()
    text = srv.get("/metrics").text
    rss = int(re.search(r"^process_resident_memory_bytes (\d+)$", text, re.M).group(1))
    fds = int(re.search(r"^process_open_fds (\d+)$", text, re.M).group(1))
    assert rss > 1 << 20 and fds >= 3, (rss, fds)
    assert re.search(r'^chatterbox_build_info\{version="[0-9.]+",features="[a-z,-]*"\} 1$',
                     text, re.M), text


async def test_startup_lines_name_version_address_store_auth_origin_and_proxies(
        server_factory, tmp_path):
    db = tmp_path / "hist.db"
    srv = server_factory(db_path=db, trusted_proxies="10.0.0.0/8", allowed_origins="*")
    log = srv.log_text()
    for line in (r"chatterbox \d+\.\d+\.\d+ \(features: [a-z,-]+\)",
                 rf"chatterbox listening on 127\.0\.0\.1:{srv.port} \(plain\)",
                 rf"store: SQLite file {re.escape(str(db))}",
                 r"auth: off",
                 r"origin rule: any origin \(\*\)",
                 r"trusted proxies: 10\.0\.0\.0/8"):
        # One line each, once.
        assert len(re.findall(line, log)) == 1, f"{line!r} not once in:\n{log}"
