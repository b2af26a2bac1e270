"""Smoke check for the benchmark peers.

    benchmark/peers/python-websockets/setup
    benchmark/peers/python-websockets/.venv/bin/python benchmark/peers/smoke.py [PEER ...]

For each peer: start it on a free loopback port, connect two clients (one on
"/", one on "/ws?x=1"), have each send one text frame, and check that both
clients receive both frames (so the sender gets its own message). Also reports
whether GET /health answers 200. Then stops the peer with SIGTERM. Every wait
is bounded. Exit status is non-zero if any peer failed.
"""

import asyncio
import http.client
import os
import signal
import socket
import subprocess
import sys
import time

from websockets.asyncio.client import connect

HERE = os.path.dirname(os.path.abspath(__file__))
PEERS = ["node-ws", "bun", "tokio-tungstenite", "ws-rs", "python-websockets"]
STARTUP_LIMIT = 600  # seconds: the first start may build/install


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for_port(port, proc, limit):
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            return False
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return True
        except OSError:
            time.sleep(0.2)
    return False


def health(port):
    try:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=3)
        conn.request("GET", "/health")
        status = conn.getresponse().status
        conn.close()
        return status
    except Exception as exc:  # noqa: BLE001 - report, don't fail: /health is optional
        return f"no ({type(exc).__name__})"


async def exchange(port):
    base = f"ws://127.0.0.1:{port}"
    async with connect(f"{base}/", compression=None, open_timeout=5) as a, \
               connect(f"{base}/ws?x=1", compression=None, open_timeout=5) as b:
        await asyncio.sleep(0.2)  # let both joins settle before broadcasting
        await a.send("hello from a")
        await b.send("hello from b")
        got = {}
        for name, ws in (("a", a), ("b", b)):
            got[name] = sorted([await asyncio.wait_for(ws.recv(), 5) for _ in range(2)])
        return got


def check(peer):
    port = free_port()
    env = dict(os.environ, PORT=str(port), HOST="127.0.0.1")
    log_path = os.path.join("/tmp", f"peer-{peer}-{port}.log")
    with open(log_path, "wb") as log:
        proc = subprocess.Popen([os.path.join(HERE, peer, "start")], env=env,
                                stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        if not wait_for_port(port, proc, STARTUP_LIMIT):
            return False, f"did not listen (exit={proc.poll()}); log: {log_path}"
        got = asyncio.run(exchange(port))
        want = sorted(["hello from a", "hello from b"])
        ok = got["a"] == want and got["b"] == want
        return ok, f"client a got {got['a']}, client b got {got['b']}, GET /health -> {health(port)}"
    except Exception as exc:  # noqa: BLE001
        return False, f"{type(exc).__name__}: {exc}; log: {log_path}"
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)


def main():
    peers = sys.argv[1:] or PEERS
    failed = 0
    for peer in peers:
        ok, detail = check(peer)
        failed += not ok
        print(f"{'PASS' if ok else 'FAIL'} {peer}: {detail}", flush=True)
    print(f"{len(peers) - failed} passed, {failed} failed")
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
