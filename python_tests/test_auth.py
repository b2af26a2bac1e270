"""Authentication and origin checks from outside: HS256 tokens, 401/403, and tokens kept out of
the server's logs."""

import base64
import hashlib
import hmac
import json
import time

from conftest import Client, connect_status, ws_connect

SECRET = "pytest-secret"


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def token(claims: dict, secret: str = SECRET, alg: str = "HS256") -> str:
    head = b64(json.dumps({"alg": alg, "typ": "JWT"}).encode())
    body = b64(json.dumps(claims).encode())
    sig = hmac.new(secret.encode(), f"{head}.{body}".encode(), hashlib.sha256).digest()
    return f"{head}.{body}.{b64(sig)}"


async def test_token_gives_identity_and_never_reaches_the_logs(server_factory):
    server = server_factory(jwt_secret=SECRET, log_level="trace")
    good = token({"sub": "user-7", "name": "grace", "exp": int(time.time()) + 600})
    ws = await ws_connect(server.ws_url(token=good), open_timeout=5, close_timeout=1)
    me = json.loads(await ws.recv())
    assert (me["event"], me["member"], me["id"]) == ("me", "grace", "user-7")
    await ws.close()

    forged = token({"sub": "admin", "exp": int(time.time()) + 600}, secret="guess")
    expired = token({"sub": "x", "exp": int(time.time()) - 5})
    none_alg = b64(b'{"alg":"none"}') + "." + b64(b'{"sub":"x"}') + "."
    for bad in (forged, expired, none_alg, "not-a-token"):
        assert await connect_status(server, token=bad) == 401, bad
    assert await connect_status(server) == 401, "no token at all"

    await server.wait_log("Member grace disconnected")
    # The harness writes its own "=== start ..." line (the command line, secret included) into
    # the same file; only what the server wrote counts.
    log = "\n".join(l for l in server.log_text().splitlines() if not l.startswith("=== "))
    assert "Member grace connected" in log
    for secret_text in (good, forged, expired, none_alg, SECRET):
        assert secret_text not in log, "a token or the secret reached the log"


async def test_without_a_secret_the_server_is_open(server):
    c = await Client.joined(server, "anyone")
    assert c.name == "anyone" and c.id, "welcomed with the asked-for name and an id"
    await c.close()


async def test_browser_origin_must_match_the_host(server):
    same = f"http://127.0.0.1:{server.port}"
    ok = await ws_connect(server.ws_url(), origin=same, open_timeout=5, close_timeout=1)
    await ok.close()
    assert await connect_status(server, connect_kwargs={"origin": "http://evil.example"}) == 403


async def test_with_a_secret_the_rest_api_needs_a_token_like_ws(server_factory):
    server = server_factory(jwt_secret=SECRET)
    writer = token({"sub": "w", "name": "writer", "exp": int(time.time()) + 600})
    ws = await ws_connect(server.ws_url(token=writer), open_timeout=5, close_timeout=1)
    c = Client(ws, server)
    await c.welcome()
    ack = await c.request({"command": "broadcast", "message": "for members only"})
    assert ack["event"] == "ack", ack

    reader = token({"sub": "r", "exp": int(time.time()) + 600})
    for path in ("/api/rooms/general/messages", "/api/members", "/api/rooms", "/api/stats",
                 "/metrics"):
        r = server.get(path)
        assert r.status == 401, (path, r)
        assert r.json()["error"] == "unauthorized", r
        assert b"for members only" not in r.body and b"writer" not in r.body
        r = server.get(path, headers={"Authorization": f"Bearer {reader}"})
        assert r.status == 200, (path, r)
    r = server.get(f"/api/rooms/general/messages?token={reader}")
    assert r.status == 200 and r.json()["messages"][-1]["message"] == "for members only", r
    assert server.get("/health").status == 200
    await c.close()
