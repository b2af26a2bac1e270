"""TLS on the port, from the outside (runs in TLS mode only: ``CHATTERBOX_TLS=1`` and a binary
built with ``--features tls``; the TLS block of scripts/test runs it).

- The browser page loads over ``https://`` in headless Chromium (the test certificate is not
  in its store: the context ignores certificate errors) and chats over ``wss://`` with a
  Python client that verifies the certificate.
- A plain-HTTP request to the TLS port is answered ``400`` in plain text and closed; the server
  counts it and goes on serving TLS.
- A client that does not trust the certificate cannot connect.
"""

from __future__ import annotations

import os
import socket
import ssl
from pathlib import Path

import pytest

from conftest import TLS, Client, http_json, read_all

pytestmark = pytest.mark.skipif(not TLS, reason="TLS mode only (CHATTERBOX_TLS=1)")

CHROMIUM = Path(os.environ.get("CHROMIUM", "/usr/bin/chromium"))
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]


async def test_the_page_loads_over_https_and_chats_over_wss(server):
    try:
        import playwright.async_api as pw
    except ImportError:
        if os.environ.get("CI"):
            raise
        pytest.skip("pip install -r python_tests/requirements-browser.txt")
    if not CHROMIUM.exists():
        (pytest.fail if os.environ.get("CI") else pytest.skip)(f"no Chromium at {CHROMIUM}")
    expect = pw.expect
    assert server.http.startswith("https://")
    bob = await Client.joined(server, "bob")
    async with pw.async_playwright() as p:
        browser = await p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            ctx = await browser.new_context(ignore_https_errors=True)
            page = await ctx.new_page()
            sockets: list[str] = []
            page.on("websocket", lambda ws: sockets.append(ws.url))
            errors: list[str] = []
            page.on("pageerror", lambda e: errors.append(str(e)))
            await page.goto(server.http + "/")
            await page.get_by_label("Your name").fill("alice")
            await page.get_by_label("Your name").press("Enter")
            await expect(page.locator("#state")).to_have_attribute("data-state", "online",
                                                                   timeout=15_000)
            assert sockets and sockets[0].startswith("wss://127.0.0.1:"), sockets
            box = page.get_by_label("Message", exact=True)
            await box.fill("hello over tls")
            await box.press("Enter")
            got = await bob.recv_event("broadcast", member="alice")
            assert got["message"] == "hello over tls"
            await bob.send({"command": "broadcast", "message": "hi alice, encrypted"})
            await expect(page.locator("#log li.msg[data-id] .text",
                                      has_text="hi alice, encrypted")).to_have_count(1,
                                                                                     timeout=15_000)
            assert errors == []
        finally:
            await browser.close()
    await bob.close()


def test_plain_http_to_the_tls_port_is_refused_cleanly(server):
    with socket.create_connection(("127.0.0.1", server.port), timeout=5) as s:
        s.sendall(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        data, closed = read_all(s, 5.0)
    assert closed, data
    assert data.startswith(b"HTTP/1.1 400"), data
    assert b"TLS only" in data, data
    stats = http_json(server.port, "/api/stats")
    assert stats["tls_refused"] == 1, stats
    assert "plain HTTP request on the TLS port" in server.log_text()


def test_a_client_that_does_not_trust_the_certificate_cannot_connect(server):
    ctx = ssl.create_default_context()  # the system's roots only
    with socket.create_connection(("127.0.0.1", server.port), timeout=5) as s:
        with pytest.raises(ssl.SSLCertVerificationError):
            ctx.wrap_socket(s, server_hostname="127.0.0.1")
    assert http_json(server.port, "/api/stats")["members"] == 0
