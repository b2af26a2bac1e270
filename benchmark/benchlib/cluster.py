"""Cluster mode (`--cluster N`): one redis-server and N chatterbox nodes started with `--redis`,
measured as one target (`chatterbox-clusterN`) next to a standalone chatterbox.

Every process of the server side is pinned to the server core (Redis too), the generator to
its own. loadgen spreads its connections over the nodes round-robin (connection i to node
i % N), sums the nodes' CPU as the server's, and samples Redis apart (`--redis-pid`: its CPU;
`--redis`: INFO `total_commands_processed`, so a step reports Redis commands per message).
"""

import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import urllib.request

from .common import free_port, pinned
from .targets import CHATTERBOX_FLAGS

REDIS_SERVER = shutil.which("redis-server") or "/usr/bin/redis-server"


def free_ports(k, exclude=()):
    """`k` distinct free ports on 127.0.0.1 (never 6379 nor any in `exclude`): every socket is
    held open until all are chosen, so two of them cannot be the same port."""
    socks, ports = [], []
    try:
        while len(ports) < k:
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            socks.append(s)
            p = s.getsockname()[1]
            if p != 6379 and p not in exclude:
                ports.append(p)
    finally:
        for s in socks:
            s.close()
    return ports


def redis_call(port, *args, timeout=2.0):
    """One Redis command over a fresh connection (RESP array of bulk strings); returns the
    raw reply text. Enough for INFO, PING, ZRANGE and friends in a benchmark harness."""
    parts = [f"*{len(args)}\r\n".encode()]
    for a in args:
        b = str(a).encode()
        parts.append(b"$%d\r\n%s\r\n" % (len(b), b))
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        s.sendall(b"".join(parts))
        buf = b""
        while True:
            chunk = s.recv(1 << 16)
            if not chunk:
                break
            buf += chunk
            if resp_complete(buf):
                break
    return buf


def resp_complete(buf):
    """Whether `buf` holds one whole RESP reply."""
    try:
        return _resp_end(buf, 0) is not None
    except ValueError:
        return True


def _resp_end(buf, pos):
    eol = buf.find(b"\r\n", pos)
    if eol < 0:
        return None
    kind, head = buf[pos:pos + 1], buf[pos + 1:eol]
    if kind in (b"+", b"-", b":"):
        return eol + 2
    n = int(head)
    if kind == b"$":
        if n < 0:
            return eol + 2
        end = eol + 2 + n + 2
        return end if len(buf) >= end else None
    if kind == b"*":
        p = eol + 2
        for _ in range(max(n, 0)):
            p = _resp_end(buf, p)
            if p is None:
                return None
        return p
    raise ValueError(f"not RESP: {buf[:40]!r}")


def resp_parse(buf):
    """The value of one RESP reply: str, int, None, list, or an Exception for an error."""
    val, _ = _resp_val(buf, 0)
    return val


def _resp_val(buf, pos):
    eol = buf.index(b"\r\n", pos)
    kind, head = buf[pos:pos + 1], buf[pos + 1:eol]
    if kind == b"+":
        return head.decode(), eol + 2
    if kind == b"-":
        return RuntimeError(head.decode()), eol + 2
    if kind == b":":
        return int(head), eol + 2
    n = int(head)
    if kind == b"$":
        if n < 0:
            return None, eol + 2
        return buf[eol + 2:eol + 2 + n].decode("utf-8", "replace"), eol + 2 + n + 2
    out, p = [], eol + 2
    for _ in range(max(n, 0)):
        v, p = _resp_val(buf, p)
        out.append(v)
    return out, p


def info_field(port, section, field):
    """One numeric field of `INFO section`, or None."""
    try:
        text = resp_parse(redis_call(port, "INFO", section))
    except OSError:
        return None
    if not isinstance(text, str):
        return None
    for line in text.splitlines():
        if line.startswith(field + ":"):
            try:
                return float(line.split(":", 1)[1])
            except ValueError:
                return None
    return None


class Redis:
    """A redis-server of our own: a free port on 127.0.0.1 (never 6379), no persistence
    (`--save '' --appendonly no`), its dir a temp folder, pinned to the server core."""

    def __init__(self):
        self.proc = None
        self.port = None
        self.dir = None
        self.log = None

    def start(self, logfile, core, port=None):
        self.dir = tempfile.mkdtemp(prefix="chatterbox-bench-redis-")
        port = port or free_ports(1)[0]
        self.port = port
        cmd = [REDIS_SERVER, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
               "--dir", self.dir, "--daemonize", "no", "--protected-mode", "yes", "--loglevel", "warning"]
        self.log = open(logfile, "w")
        self.proc = subprocess.Popen(pinned(core, cmd), stdout=self.log, stderr=subprocess.STDOUT,
                                     start_new_session=True)
        deadline = time.time() + 10
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"redis-server exited at start ({self.proc.returncode}), see {logfile}")
            try:
                if resp_parse(redis_call(port, "PING", timeout=0.5)) == "PONG":
                    return
            except OSError:
                pass
            time.sleep(0.05)
        raise RuntimeError(f"redis-server not ready on port {port}, see {logfile}")

    @property
    def pid(self):
        return self.proc.pid if self.proc else None

    @property
    def url(self):
        return f"redis://127.0.0.1:{self.port}"

    def commands(self):
        v = info_field(self.port, "stats", "total_commands_processed")
        return int(v) if v is not None else None

    def alive(self):
        return self.proc is not None and self.proc.poll() is None

    def stop(self):
        if self.proc is None:
            return None
        code = self.proc.poll()
        if code is None:
            try:
                os.killpg(self.proc.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
            try:
                code = self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                code = self.proc.wait(timeout=10)
        self.proc = None
        if self.log:
            self.log.close()
            self.log = None
        if self.dir:
            shutil.rmtree(self.dir, ignore_errors=True)
            self.dir = None
        return code


class Node:
    """One chatterbox node of the cluster: its own port, its own working folder."""

    def __init__(self, binary, index):
        self.binary, self.index = binary, index
        self.proc = None
        self.port = None
        self.dir = tempfile.mkdtemp(prefix=f"chatterbox-bench-node{index}-")
        self.log = None

    def start(self, redis_url, logfile, core, port=None, extra=()):
        self.port = port or free_port()
        cmd = [self.binary, "--port", str(self.port), "--redis", redis_url] + CHATTERBOX_FLAGS + list(extra)
        self.log = open(logfile, "a")
        self.proc = subprocess.Popen(pinned(core, cmd), cwd=self.dir, stdout=self.log,
                                     stderr=subprocess.STDOUT, start_new_session=True)

    def ready(self):
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/health", timeout=1) as r:
                return r.status == 200
        except Exception:
            return False

    def wait_ready(self, logfile, timeout=30):
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.proc.poll() is not None:
                self.proc = None
                if self.log:
                    self.log.close()
                    self.log = None
                raise RuntimeError(f"node {self.index} exited at start, see {logfile}")
            if self.ready():
                return
            time.sleep(0.1)
        raise RuntimeError(f"node {self.index} not ready on port {self.port} in time, see {logfile}")

    @property
    def pid(self):
        # taskset execs the server: the pid is the server's.
        return self.proc.pid if self.proc else None

    def alive(self):
        return self.proc is not None and self.proc.poll() is None

    def kill(self):
        """SIGKILL, as a crash would."""
        if self.proc is None:
            return None
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        code = self.proc.wait(timeout=10)
        self.proc = None
        if self.log:
            self.log.close()
            self.log = None
        return code

    def stop(self):
        if self.proc is None:
            return None
        code = self.proc.poll()
        if code is None:
            try:
                os.killpg(self.proc.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
            try:
                code = self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                code = self.proc.wait(timeout=10)
        self.proc = None
        if self.log:
            self.log.close()
            self.log = None
        return code

    def cleanup(self):
        self.stop()
        if self.dir:
            shutil.rmtree(self.dir, ignore_errors=True)
            self.dir = None


class ClusterTarget:
    """N chatterbox nodes sharing one Redis, measured as one server: `chatterbox-clusterN`.
    Same interface as `targets.Target` for `scenarios.run_one`."""

    def __init__(self, n, binary, tag=None):
        self.name = "chatterbox"
        self.n = n
        self.binary = binary
        self.db = "redis"
        self.tls = None
        self.proto, self.path, self.ready = "chatterbox", "/ws", "http"
        self.self_delivery = True
        self.label = "chatterbox" + (f"-{tag}" if tag else "") + f"-cluster{n}"
        self.redis = None
        self.nodes = []

    def setup(self):
        if not os.access(REDIS_SERVER, os.X_OK):
            raise RuntimeError(f"no redis-server at {REDIS_SERVER} (apt-get install redis-server)")

    def start(self, port, logfile, server_core):
        """Redis, then the nodes (the first on `port`); returns the nodes' pids."""
        stem = logfile[:-4] if logfile.endswith(".log") else logfile
        ports = free_ports(self.n, exclude={port})
        self.redis = Redis()
        self.redis.start(stem + ".redis.log", server_core, port=ports[0])
        self.nodes = [Node(self.binary, i) for i in range(self.n)]
        node_ports = [port] + free_ports(self.n - 1, exclude={port, ports[0]})
        for i, node in enumerate(self.nodes):
            node.start(self.redis.url, self.node_log(logfile, i), server_core, port=node_ports[i])
        for i, node in enumerate(self.nodes):
            try:
                node.wait_ready(self.node_log(logfile, i))
            except RuntimeError:
                # Its port was taken in between (another process on the machine): once more on
                # another one.
                node.start(self.redis.url, self.node_log(logfile, i), server_core,
                           port=free_ports(1, exclude={n.port for n in self.nodes} | {ports[0]})[0])
                node.wait_ready(self.node_log(logfile, i))
        time.sleep(0.3)
        return [node.pid for node in self.nodes]

    @staticmethod
    def node_log(logfile, i):
        stem = logfile[:-4] if logfile.endswith(".log") else logfile
        return f"{stem}.node{i}.log"

    def addrs(self, port=None):
        return ",".join(f"127.0.0.1:{node.port}" for node in self.nodes)

    def loadgen_extra(self):
        return ["--redis-pid", str(self.redis.pid), "--redis", f"127.0.0.1:{self.redis.port}"]

    def alive(self):
        return bool(self.nodes) and all(n.alive() for n in self.nodes) and self.redis is not None \
            and self.redis.alive()

    def stop(self):
        """Stops the nodes (SIGTERM) and Redis; returns the first non-zero node exit status
        (0 when every node exited 0)."""
        codes = [n.stop() for n in self.nodes]
        for n in self.nodes:
            n.cleanup()
        self.nodes = []
        if self.redis:
            self.redis.stop()
            self.redis = None
        bad = [c for c in codes if c not in (0, None)]
        return bad[0] if bad else (0 if codes else None)
