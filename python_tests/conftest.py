"""Test harness for the chatterbox pytest suite: an outside client of SPEC.md.

What lives here:

- ``Server``: one chatterbox process on a free loopback port, stderr captured to a file.
- ``server_factory`` / ``server`` fixtures: start servers with flags, stop them all at teardown.
- ``Client``: a small async wrapper around ``websockets`` where every wait has a timeout.
- HTTP helpers (``http_request``, ``http_json``, ``raw_exchange``) for the REST API and for
  byte-level tests of the HTTP front door.

Binary: env ``CHATTERBOX_BIN``, else ``<repo>/target/release/chatterbox`` where ``<repo>`` is the
parent of this folder.

TLS mode: with ``CHATTERBOX_TLS=1`` (and a binary built with ``--features tls``) every server
gets ``--tls-cert``/``--tls-key`` for a certificate made once per run with ``openssl req -x509``,
and every helper speaks ``https://``/``wss://``, verifying against that certificate.

Cluster mode (issue 12): with ``CHATTERBOX_CLUSTER=N`` (N >= 2, a binary built with ``--features
cluster``) every ``Server`` is a cluster: a ``redis-server`` of its own (``redis-server`` on PATH,
a free port, ``--save ''``) and N nodes with ``--redis redis://127.0.0.1:PORT``, each on its own
port. ``Server.port`` (REST, raw HTTP) is the first node; ``Server.ws_url`` hands out the nodes
round-robin, so a test's WebSocket clients are spread over them (client i on node i % N). A
client's welcome waits until every node lists it and its close until none does (presence crosses
Redis; without the barrier "connect on A, then `list` on B" would race). ``log_text`` is every
node's log. Tests that cannot make sense against a cluster are skipped with a reason: the lists
``CLUSTER_SKIP_MODULES`` and ``CLUSTER_SKIP_TESTS`` below, and any server asked for a
``db_path`` (Redis holds the history: SQLite files, their faults and their restarts are not
there).
"""

from __future__ import annotations

import asyncio
import atexit
import base64
import http.client
import json
import os
import signal
import socket
import ssl
import subprocess
import tempfile
import time
import urllib.parse
from pathlib import Path
from typing import Any, Callable

import pytest
import websockets
from websockets.asyncio.client import connect as ws_connect
from websockets.exceptions import ConnectionClosed, InvalidStatus

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_BIN = REPO_ROOT / "target" / "release" / "chatterbox"

# Upper bounds for waits. They are generous on purpose: the machine is shared, and a bound only
# turns a hang into a failure; no test asserts that something is fast.
STARTUP_TIMEOUT = 15.0
STOP_TIMEOUT = 10.0
RECV_TIMEOUT = 5.0

# TLS mode (see the module's doc).
TLS = os.environ.get("CHATTERBOX_TLS") == "1"
_tls_files: tuple[Path, Path] | None = None


# Cluster mode (see the module's doc): the number of nodes per server, 0 when off.
CLUSTER = int(os.environ.get("CHATTERBOX_CLUSTER") or 0)
assert CLUSTER != 1, "CHATTERBOX_CLUSTER is the number of nodes: 2 or more (or 0: off)"

# Whole modules that cannot make sense against a cluster, with the reason.
CLUSTER_SKIP_MODULES = {
    "test_store_faults.py": "SQLite file faults (cluster mode keeps history in Redis)",
    "test_durability.py": "durability of the SQLite file across kill -9 (tests/cluster.rs "
                          "covers node death and Redis faults)",
    "test_tls.py": "TLS mode, run against one standalone TLS build",
    "test_edge_container.py": "the container image runs one standalone process",
    "test_edge_service.py": "the systemd unit runs one standalone process",
}
# Single tests, by node id, with the reason.
CLUSTER_SKIP_TESTS = {
    "test_limits.py::test_max_connections_503":
        "--max-connections is per process: a cluster of N nodes lets N times as many in",
    "test_limits.py::test_max_connections_per_ip_429":
        "--max-connections-per-ip is per process: a cluster of N nodes lets N times as many in",
    "test_api_server.py::test_disconnect_closes_with_4000_and_the_reason":
        "the server API disconnects members of the node it is asked on only (another node's "
        "member is 404 by design)",
}


def pytest_collection_modifyitems(config, items):
    if not CLUSTER:
        return
    for item in items:
        module = Path(str(item.fspath)).name
        reason = CLUSTER_SKIP_MODULES.get(module) or CLUSTER_SKIP_TESTS.get(
            f"{module}::{item.name.split('[')[0]}")
        if reason:
            item.add_marker(pytest.mark.skip(reason=f"cluster mode: {reason}"))


def tls_files() -> tuple[Path, Path]:
    """(certificate, key): a self-signed P-256 certificate for 127.0.0.1 and localhost, made
    with openssl once per run."""
    global _tls_files
    if _tls_files is None:
        d = Path(tempfile.mkdtemp(prefix="chatterbox-tls-"))
        cert, key = d / "cert.pem", d / "key.pem"
        subprocess.run(
            ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
             "-nodes", "-days", "2", "-subj", "/CN=localhost", "-keyout", str(key), "-out", str(cert),
             "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1",
             "-addext", "basicConstraints=critical,CA:FALSE"],
            check=True, capture_output=True)
        _tls_files = (cert, key)
    return _tls_files


def client_ssl_context() -> ssl.SSLContext:
    """A client context that trusts only the test certificate (hostname checked too)."""
    return ssl.create_default_context(cafile=str(tls_files()[0]))


def tls_wrap(sock: socket.socket) -> socket.socket:
    """In TLS mode, the socket after a verified handshake; otherwise the socket itself."""
    if not TLS:
        return sock
    return client_ssl_context().wrap_socket(sock, server_hostname="127.0.0.1")


def binary_path() -> Path:
    env = os.environ.get("CHATTERBOX_BIN")
    return Path(env) if env else DEFAULT_BIN


def free_port() -> int:
    """A port that was free a moment ago (bind port 0 on loopback and let it go)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _flag_args(flags: dict[str, Any]) -> list[str]:
    args: list[str] = []
    for key, value in flags.items():
        if value is None or value is False:
            continue
        flag = "--" + key.replace("_", "-")
        if value is True:
            args.append(flag)
        else:
            args.extend([flag, str(value)])
    return args


# --------------------------------------------------------------------------------------------
# HTTP helpers
# --------------------------------------------------------------------------------------------


class HttpResponse:
    def __init__(self, status: int, headers: list[tuple[str, str]], body: bytes):
        self.status = status
        self.headers = headers
        self.body = body

    def header(self, name: str) -> str | None:
        for k, v in self.headers:
            if k.lower() == name.lower():
                return v
        return None

    @property
    def text(self) -> str:
        return self.body.decode("utf-8")

    def json(self) -> Any:
        return json.loads(self.body)

    def __repr__(self) -> str:
        return f"HttpResponse({self.status}, {self.headers!r}, {self.body[:200]!r})"


def http_request(
    port: int,
    path: str,
    method: str = "GET",
    body: bytes | None = None,
    headers: dict[str, str] | None = None,
    timeout: float = RECV_TIMEOUT,
) -> HttpResponse:
    conn = (http.client.HTTPSConnection("127.0.0.1", port, timeout=timeout,
                                        context=client_ssl_context())
            if TLS else http.client.HTTPConnection("127.0.0.1", port, timeout=timeout))
    try:
        conn.request(method, path, body=body, headers=headers or {})
        resp = conn.getresponse()
        data = resp.read()
        return HttpResponse(resp.status, resp.getheaders(), data)
    finally:
        conn.close()


def http_json(port: int, path: str) -> Any:
    resp = http_request(port, path)
    assert resp.status == 200, f"GET {path}: {resp!r}"
    return resp.json()


def raw_exchange(port: int, data: bytes, timeout: float = RECV_TIMEOUT) -> bytes:
    """Send raw bytes, read until the server closes (or `timeout` passes) and return all read."""
    with tls_wrap(socket.create_connection(("127.0.0.1", port), timeout=timeout)) as s:
        s.sendall(data)
        return read_until_closed(s, timeout)


def read_until_closed(s: socket.socket, timeout: float = RECV_TIMEOUT) -> bytes:
    return read_all(s, timeout)[0]


def read_all(s: socket.socket, timeout: float = RECV_TIMEOUT) -> tuple[bytes, bool]:
    """Read until the peer closes or `timeout` passes: (bytes read, whether the peer closed)."""
    deadline = time.monotonic() + timeout
    chunks: list[bytes] = []
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            return b"".join(chunks), False
        s.settimeout(left)
        try:
            chunk = s.recv(65536)
        except socket.timeout:
            return b"".join(chunks), False
        except (ConnectionResetError, BrokenPipeError, ssl.SSLEOFError):
            return b"".join(chunks), True
        if not chunk:
            return b"".join(chunks), True
        chunks.append(chunk)


def parse_frames(data: bytes) -> list[tuple[int, bytes]]:
    """Split unmasked server-to-client WebSocket frames: [(opcode, payload)], stopping at a
    partial frame."""
    frames = []
    i = 0
    while i + 2 <= len(data):
        b0, b1 = data[i], data[i + 1]
        n = b1 & 0x7F
        j = i + 2
        if n == 126:
            if j + 2 > len(data):
                break
            n = int.from_bytes(data[j:j + 2], "big")
            j += 2
        elif n == 127:
            if j + 8 > len(data):
                break
            n = int.from_bytes(data[j:j + 8], "big")
            j += 8
        if b1 & 0x80:
            j += 4  # a masked frame from a server would be a bug, but skip the key anyway
        if j + n > len(data):
            break
        frames.append((b0 & 0x0F, data[j:j + n]))
        i = j + n
    return frames


def masked_frame(opcode: int, payload: bytes, fin: bool = True) -> bytes:
    """One client-to-server frame (masked, as RFC 6455 requires)."""
    head = bytes([(0x80 if fin else 0) | opcode])
    n = len(payload)
    if n < 126:
        head += bytes([0x80 | n])
    elif n < 65536:
        head += bytes([0x80 | 126]) + n.to_bytes(2, "big")
    else:
        head += bytes([0x80 | 127]) + n.to_bytes(8, "big")
    mask = os.urandom(4)
    return head + mask + bytes(b ^ mask[k % 4] for k, b in enumerate(payload))


class RawWs:
    """A WebSocket client on a bare socket: does the handshake, then only what the test says
    (it never answers pings and never reads unless asked)."""

    def __init__(self, sock: socket.socket, leftover: bytes):
        self.sock = sock
        self.leftover = leftover

    @classmethod
    def open(cls, port: int, name: str | None = None, rcvbuf: int | None = None,
             timeout: float = RECV_TIMEOUT) -> "RawWs":
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        if rcvbuf is not None:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        s.settimeout(timeout)
        s.connect(("127.0.0.1", port))
        s = tls_wrap(s)
        path = "/ws" + (f"?name={urllib.parse.quote(name)}" if name else "")
        s.sendall(ws_handshake_bytes(path))
        buf = b""
        deadline = time.monotonic() + timeout
        while b"\r\n\r\n" not in buf:
            if time.monotonic() > deadline:
                raise AssertionError(f"no handshake answer: {buf!r}")
            chunk = s.recv(4096)
            if not chunk:
                raise AssertionError(f"closed during handshake: {buf!r}")
            buf += chunk
        head, rest = buf.split(b"\r\n\r\n", 1)
        assert parse_status(head) == 101, head
        return cls(s, rest)

    def read_until_closed(self, timeout: float = RECV_TIMEOUT) -> tuple[list[tuple[int, bytes]], bool]:
        data, closed = read_all(self.sock, timeout)
        return parse_frames(self.leftover + data), closed

    def close(self) -> None:
        try:
            self.sock.close()
        except OSError:
            pass


def parse_status(raw: bytes) -> int:
    """The status code of a raw HTTP response (first line `HTTP/1.1 NNN ...`)."""
    first = raw.split(b"\r\n", 1)[0]
    parts = first.split()
    assert len(parts) >= 2 and parts[0].startswith(b"HTTP/"), f"not an HTTP response: {raw[:200]!r}"
    return int(parts[1])


def ws_handshake_bytes(path: str = "/ws", key: str | None = None, version: str = "13",
                       extra: str = "") -> bytes:
    key = key if key is not None else base64.b64encode(os.urandom(16)).decode()
    return (
        f"GET {path} HTTP/1.1\r\n"
        f"Host: 127.0.0.1\r\n"
        f"Upgrade: websocket\r\n"
        f"Connection: Upgrade\r\n"
        f"Sec-WebSocket-Key: {key}\r\n"
        f"Sec-WebSocket-Version: {version}\r\n"
        f"{extra}"
        f"\r\n"
    ).encode()


# --------------------------------------------------------------------------------------------
# Server
# --------------------------------------------------------------------------------------------


_redis_procs: list[subprocess.Popen] = []


@atexit.register
def _kill_redis() -> None:
    """No redis-server outlives the run, whoever forgot to stop one."""
    for proc in _redis_procs:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


class Redis:
    """A redis-server of one cluster-mode server: 127.0.0.1, a free port, its files in
    `workdir`, no persistence (`--save '' --appendonly no`)."""

    def __init__(self, workdir: Path):
        self.dir = Path(workdir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}"

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def start(self) -> None:
        if self.running:
            return
        self.proc = subprocess.Popen(
            ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1",
             "--dir", str(self.dir), "--logfile", str(self.dir / "redis.log"),
             "--save", "", "--appendonly", "no", "--daemonize", "no"],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        _redis_procs.append(self.proc)
        deadline = time.monotonic() + STARTUP_TIMEOUT
        while True:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=1.0) as s:
                    s.sendall(b"PING\r\n")
                    if s.recv(16).startswith(b"+PONG"):
                        return
            except OSError:
                pass
            if self.proc.poll() is not None or time.monotonic() > deadline:
                log = self.dir / "redis.log"
                text = log.read_text(errors="replace") if log.exists() else ""
                self.stop()
                raise RuntimeError(f"redis-server on port {self.port} did not start:\n{text}")
            time.sleep(0.02)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


class Server:
    """One chatterbox process on 127.0.0.1 with a fixed port chosen at construction; in cluster
    mode, a Redis and `CLUSTER` nodes on ports chosen at construction (the first is `port`)."""

    def __init__(self, workdir: Path, flags: dict[str, Any] | None = None,
                 binary: Path | None = None):
        self.binary = Path(binary) if binary else binary_path()
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.flags: dict[str, Any] = {"host": "127.0.0.1", "db_path": ":memory:",
                                      "log_level": "info"}
        if TLS:
            cert, key = tls_files()
            self.flags.update(tls_cert=str(cert), tls_key=str(key))
        self.flags.update(flags or {})
        self.port: int = int(self.flags.pop("port", 0)) or free_port()
        self.log_path = self.workdir / f"chatterbox-{self.port}.log"
        self.proc: subprocess.Popen | None = None
        self.starts = 0
        # Cluster mode: the other nodes (the first is `port`/`proc`/`log_path` above).
        self.redis: Redis | None = None
        self.ports = [self.port]
        self.peer_procs: list[subprocess.Popen | None] = []
        self._next_node = 0
        if CLUSTER:
            db = self.flags.pop("db_path")
            if str(db) != ":memory:":
                pytest.skip("cluster mode: Redis holds the history; this test is about "
                            f"--db-path {db}")
            self.redis = Redis(self.workdir / "redis")
            self.ports += [free_port() for _ in range(CLUSTER - 1)]
            self.peer_procs = [None] * (CLUSTER - 1)

    # -- addresses ---------------------------------------------------------------------------

    @property
    def http(self) -> str:
        return f"{'https' if TLS else 'http'}://127.0.0.1:{self.port}"

    def ws_url(self, **query: Any) -> str:
        """The `/ws` URL; in cluster mode each call names the next node (round-robin)."""
        q = {k: v for k, v in query.items() if v is not None}
        suffix = ("?" + urllib.parse.urlencode(q)) if q else ""
        port = self.ports[self._next_node % len(self.ports)]
        self._next_node += 1
        return f"{'wss' if TLS else 'ws'}://127.0.0.1:{port}/ws{suffix}"

    # -- lifecycle ---------------------------------------------------------------------------

    def args(self, node: int = 0) -> list[str]:
        args = [str(self.binary), "--port", str(self.ports[node])] + _flag_args(self.flags)
        if self.redis is not None:
            args += ["--redis", self.redis.url]
        return args

    def _log_path(self, node: int) -> Path:
        return self.log_path if node == 0 else self.workdir / f"chatterbox-{self.ports[node]}.log"

    @property
    def procs(self) -> list[subprocess.Popen]:
        """Every process started (one; in cluster mode, one per node)."""
        return [p for p in [self.proc, *self.peer_procs] if p is not None]

    def start(self) -> "Server":
        if not self.binary.exists():
            pytest.fail(f"chatterbox binary not found at {self.binary} "
                        f"(build with `cargo build --release` or set CHATTERBOX_BIN)")
        assert all(p.poll() is not None for p in self.procs), "server already running"
        self.starts += 1
        if self.redis is not None:
            self.redis.start()
        for node in range(len(self.ports)):
            with open(self._log_path(node), "ab") as log:
                log.write(f"\n=== start #{self.starts}: {' '.join(self.args(node))}\n".encode())
                log.flush()
                # Each node in a directory of its own: nothing a node writes is shared.
                cwd = self.workdir if node == 0 else self.workdir / f"node{node}"
                cwd.mkdir(exist_ok=True)
                proc = subprocess.Popen(
                    self.args(node), stdin=subprocess.DEVNULL, stdout=log, stderr=log, cwd=cwd,
                )
            if node == 0:
                self.proc = proc
            else:
                self.peer_procs[node - 1] = proc
            if node == 0:
                self._wait_healthy()
            else:
                self._wait_node_healthy(node)
        return self

    def _wait_healthy(self) -> None:
        self._wait_node_healthy(0)

    def _wait_node_healthy(self, node: int) -> None:
        proc = self.proc if node == 0 else self.peer_procs[node - 1]
        deadline = time.monotonic() + STARTUP_TIMEOUT
        last_err: Exception | None = None
        while time.monotonic() < deadline:
            assert proc is not None
            if proc.poll() is not None:
                raise RuntimeError(f"chatterbox exited with {proc.returncode} at startup:\n"
                                   f"{self.log_text()}")
            try:
                resp = http_request(self.ports[node], "/health", timeout=1.0)
                if resp.status == 200:
                    return
            except OSError as e:  # not listening yet
                last_err = e
            time.sleep(0.05)
        self.kill()
        raise RuntimeError(f"chatterbox did not answer /health in {STARTUP_TIMEOUT}s "
                           f"({last_err}):\n{self.log_text()}")

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self, timeout: float = STOP_TIMEOUT) -> int | None:
        """SIGTERM, wait, return the exit code (SIGKILL and return None if it would not stop).
        In cluster mode every node gets SIGTERM at once; the first exit code that is not 0
        wins. Redis keeps running (a restart finds the history); see `shutdown`."""
        if self.proc is None:
            return None
        for p in self.procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        codes: list[int | None] = []
        for p in self.procs:
            try:
                p.wait(timeout)
                codes.append(p.returncode)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
                codes.append(None)
        return next((c for c in codes if c != 0), 0) if codes[1:] else codes[0]

    def kill(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                p.kill()
                p.wait()

    def shutdown(self) -> None:
        """Kill whatever still runs, Redis included (the fixture's teardown)."""
        self.kill()
        if self.redis is not None:
            self.redis.stop()

    def restart(self) -> "Server":
        if any(p.poll() is None for p in self.procs):
            self.stop()
        return self.start()

    def log_text(self) -> str:
        """The log (in cluster mode every node's, the first node's first)."""
        out = []
        for node in range(len(self.ports)):
            try:
                text = self._log_path(node).read_text(encoding="utf-8", errors="replace")
            except FileNotFoundError:
                continue
            out.append(text if text.endswith("\n") or node == len(self.ports) - 1
                       else text + "\n")
        return "".join(out)

    async def wait_log(self, needle: str, timeout: float = RECV_TIMEOUT) -> str:
        """Wait until `needle` appears in the log (logs may be written a moment after events)."""
        deadline = time.monotonic() + timeout
        while True:
            text = self.log_text()
            if needle in text:
                return text
            if time.monotonic() > deadline:
                raise AssertionError(f"{needle!r} not in server log:\n{text[-3000:]}")
            await asyncio.sleep(0.05)

    # -- HTTP shortcuts ----------------------------------------------------------------------

    def get(self, path: str, **kw: Any) -> HttpResponse:
        return http_request(self.port, path, **kw)

    def get_json(self, path: str) -> Any:
        return http_json(self.port, path)


@pytest.fixture
def server_factory(tmp_path: Path):
    servers: list[Server] = []

    def make(**flags: Any) -> Server:
        srv = Server(tmp_path / f"srv{len(servers)}", flags)
        servers.append(srv)
        return srv.start()

    yield make
    for srv in servers:
        try:
            srv.stop()
        finally:
            srv.shutdown()


@pytest.fixture
def server(server_factory) -> Server:
    return server_factory()


# --------------------------------------------------------------------------------------------
# WebSocket client
# --------------------------------------------------------------------------------------------


class Client:
    """An async chat client. `connect` does not read anything; `welcome()` reads me/joined/history.

    Every received event is appended to `seen`; `recv_until` returns the first event matching a
    predicate and keeps the ones it skipped in `skipped`.
    """

    def __init__(self, ws: Any, server: Server | None = None):
        self.ws = ws
        self.server = server
        self.name: str | None = None
        self.id: str | None = None
        self.seen: list[dict] = []
        self.skipped: list[dict] = []

    @classmethod
    async def connect(cls, server: Server, name: str | None = None,
                      timeout: float = RECV_TIMEOUT, **kwargs: Any) -> "Client":
        opts: dict[str, Any] = dict(
            # close_timeout bounds how long close() waits for the server's Close frame and
            # TCP close; a missing answer is checked by its own test, not paid at every cleanup
            open_timeout=timeout, close_timeout=1.0, compression=None, proxy=None,
            max_size=None, max_queue=None,
        )
        if TLS:
            opts["ssl"] = client_ssl_context()
        opts.update(kwargs)
        ws = await asyncio.wait_for(ws_connect(server.ws_url(name=name), **opts), timeout)
        return cls(ws, server)

    @classmethod
    async def joined(cls, server: Server, name: str | None = None, **kwargs: Any) -> "Client":
        """Connect and consume the welcome (me, own joined notice, history)."""
        c = await cls.connect(server, name, **kwargs)
        await c.welcome()
        return c

    async def welcome(self, timeout: float = RECV_TIMEOUT) -> tuple[dict, dict | None, dict]:
        """Read me, the own joined notice and history. The notice is None when the server sent
        none (rooms over `notice_max_members` get no notices)."""
        me = await self.recv(timeout)
        assert me.get("event") == "me", f"first event must be me, got {me}"
        self.name, self.id = me["member"], me["id"]
        joined: dict | None = await self.recv(timeout)
        if joined.get("event") == "history":
            await self._cluster_barrier(present=True)
            return me, None, joined
        assert joined.get("event") == "broadcast" and joined.get("joined") == self.name, \
            f"second event must be own joined notice, got {joined}"
        history = await self.recv(timeout)
        assert history.get("event") == "history", f"third event must be history, got {history}"
        await self._cluster_barrier(present=True)
        return me, joined, history

    async def _cluster_barrier(self, present: bool, timeout: float = RECV_TIMEOUT) -> None:
        """Cluster mode: wait until every node's `/api/members` lists this member (`present`)
        or no longer does. Best effort: it gives up quietly when the REST API does not answer
        200 (auth on, a node down) or after `timeout`, and leaves the verdict to the test."""
        srv = self.server
        if srv is None or srv.redis is None or self.name is None:
            return
        deadline = time.monotonic() + timeout
        for port in srv.ports:
            while time.monotonic() < deadline:
                try:
                    resp = http_request(port, "/api/members", timeout=1.0)
                except OSError:
                    return
                if resp.status != 200:
                    return
                if (self.name in resp.json()) == present:
                    break
                await asyncio.sleep(0.02)

    async def send(self, obj: Any) -> None:
        await asyncio.wait_for(self.ws.send(json.dumps(obj)), RECV_TIMEOUT)

    async def send_raw(self, data: str | bytes) -> None:
        await asyncio.wait_for(self.ws.send(data), RECV_TIMEOUT)

    async def recv(self, timeout: float = RECV_TIMEOUT) -> dict:
        try:
            raw = await asyncio.wait_for(self.ws.recv(), timeout)
        except (asyncio.TimeoutError, TimeoutError):
            raise AssertionError(f"no event within {timeout}s (client {self.name}); "
                                 f"last seen: {self.seen[-5:]}") from None
        assert isinstance(raw, str), f"server sent a binary frame: {raw[:100]!r}"
        ev = json.loads(raw)
        assert isinstance(ev, dict), f"event is not an object: {raw[:200]}"
        self.seen.append(ev)
        return ev

    async def recv_until(self, pred: Callable[[dict], bool],
                         timeout: float = RECV_TIMEOUT) -> dict:
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"no matching event within {timeout}s (client {self.name}); "
                                     f"skipped: {self.skipped[-10:]}")
            ev = await self.recv(left)
            if pred(ev):
                return ev
            self.skipped.append(ev)

    async def recv_event(self, event: str, timeout: float = RECV_TIMEOUT, **fields: Any) -> dict:
        """The next event named `event` whose fields include `fields`."""
        return await self.recv_until(
            lambda e: e.get("event") == event and all(e.get(k) == v for k, v in fields.items()),
            timeout)

    async def request(self, obj: dict, timeout: float = RECV_TIMEOUT) -> dict:
        """Send a command with a fresh request_id and return the event echoing it."""
        rid = obj.get("request_id") or f"r{next(_rid)}"
        obj = dict(obj, request_id=rid)
        await self.send(obj)
        # the answer is the reply, ack or error carrying the id (never the room's broadcast copy)
        return await self.recv_until(
            lambda e: e.get("request_id") == rid and e.get("event") != "broadcast", timeout)

    async def sync(self, timeout: float = RECV_TIMEOUT) -> list[dict]:
        """Barrier: ping and return every event received before the pong."""
        before = len(self.seen)
        await self.send({"command": "ping", "request_id": "sync"})
        await self.recv_until(lambda e: e.get("event") == "pong", timeout)
        return [e for e in self.seen[before:-1]]

    async def expect_closed(self, timeout: float = RECV_TIMEOUT) -> tuple[int | None, str | None]:
        """Read (and keep) events until the server closes; return (close code, reason)."""
        deadline = time.monotonic() + timeout
        try:
            while True:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise AssertionError(f"connection not closed within {timeout}s; "
                                         f"last seen: {self.seen[-5:]}")
                try:
                    raw = await asyncio.wait_for(self.ws.recv(), left)
                except (asyncio.TimeoutError, TimeoutError):
                    continue
                if isinstance(raw, str):
                    try:
                        self.seen.append(json.loads(raw))
                    except ValueError:
                        pass
        except ConnectionClosed as e:
            rcvd = e.rcvd
            return (rcvd.code, rcvd.reason) if rcvd is not None else (None, None)

    async def close(self) -> None:
        try:
            await asyncio.wait_for(self.ws.close(), RECV_TIMEOUT)
        except (asyncio.TimeoutError, TimeoutError, OSError, ConnectionClosed):
            pass
        await self._cluster_barrier(present=False)


def _counter():
    n = 0
    while True:
        n += 1
        yield n


_rid = _counter()


async def connect_status(server: Server, name: str | None = None,
                         connect_kwargs: dict[str, Any] | None = None, **query: Any) -> int:
    """Try a WebSocket upgrade; return 101 on success (closing at once) or the refusal status.
    `connect_kwargs` go to websockets' connect (e.g. `local_addr=("127.0.0.2", 0)`)."""
    try:
        ws = await asyncio.wait_for(
            ws_connect(server.ws_url(name=name, **query), open_timeout=RECV_TIMEOUT,
                       close_timeout=1.0, compression=None, proxy=None,
                       **({"ssl": client_ssl_context()} if TLS else {}),
                       **(connect_kwargs or {})), RECV_TIMEOUT)
    except InvalidStatus as e:
        return e.response.status_code
    await ws.close()
    return 101


__all__ = [
    "Client", "Server", "HttpResponse", "connect_status", "free_port", "http_json",
    "http_request", "parse_status", "raw_exchange", "read_until_closed", "ws_handshake_bytes",
    "read_all", "parse_frames", "masked_frame", "RawWs", "TLS", "tls_files",
    "client_ssl_context", "tls_wrap", "CLUSTER", "Redis",
    "ConnectionClosed", "InvalidStatus", "websockets",
]
