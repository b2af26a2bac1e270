"""The servers under test: chatterbox (memory or SQLite store) and the peers in peers/."""

import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import urllib.request

from .common import CHATTERBOX, PEERS, descendants, log, pinned

# How to start each target. chatterbox is built here; every peer is a folder
# benchmark/peers/<name>/ with a `start` script that serves on $HOST:$PORT, any path
# upgrades, and relays every text frame to every client, sender included (`raw`).
# A peer missing from this table is still run with these defaults when named in --targets.
PEER_DEFAULTS = {"proto": "raw", "path": "/ws", "ready": "tcp", "self_delivery": True}
PEER_TABLE = {
    "node-ws": {"ready": "http"},
    "bun": {"ready": "http"},
    "ws-rs": {"ready": "http"},
    "python-websockets": {"ready": "http"},
    "tokio-tungstenite": {"ready": "tcp"},  # no /health: a TCP connect is the probe
}

# Server flags for the benchmark: limits raised so that the load, not a policy, is measured.
CHATTERBOX_FLAGS = [
    "--host", "127.0.0.1",
    "--log-level", "warn",
    "--rate-per-sec", "1000000",
    "--rate-burst", "1000000",
    "--flood-close-after", "1000000",
    "--max-connections", "60000",
    "--max-connections-per-ip", "60000",
    "--max-rooms", "5000",
    "--idle-timeout", "3600",
]


class Target:
    """One server under test: chatterbox (with a store variant) or a peer."""

    def __init__(self, name, db, binary=None, tag=None, tls=None):
        self.name = name
        # (cert, key) when this chatterbox serves TLS (`run --tls`).
        self.tls = tls
        self.db = db
        self.binary = binary or CHATTERBOX
        if name == "chatterbox":
            self.proto, self.path, self.ready = "chatterbox", "/ws", "http"
            self.self_delivery = True
            self.label = ("chatterbox" + (f"-{tag}" if tag else "")
                          + ("" if db == "memory" else "-sqlite") + ("-tls" if tls else ""))
        else:
            start = os.path.join(PEERS, name, "start")
            if not os.access(start, os.X_OK):
                raise SystemExit(f"unknown target '{name}': no executable {start}")
            spec = dict(PEER_DEFAULTS, **PEER_TABLE.get(name, {}))
            self.proto, self.path, self.ready = spec["proto"], spec["path"], spec["ready"]
            self.self_delivery = spec["self_delivery"]
            self.label = name
        self.proc = None
        self.tmp = None
        # A database file to serve instead of a fresh temp file (`run --joins`: prefilled).
        self.db_path = None

    def setup(self):
        """A peer's install/build step, outside of any timing."""
        if self.name == "chatterbox":
            return
        setup = os.path.join(PEERS, self.name, "setup")
        if os.access(setup, os.X_OK):
            log(f"{self.name}: running setup")
            r = subprocess.run([setup], stdout=subprocess.DEVNULL, timeout=900)
            if r.returncode != 0:
                raise RuntimeError(f"{self.name}/setup failed ({r.returncode})")

    def start(self, port, logfile, server_core):
        # MAX_CONNECTIONS lifts ws-rs's own cap (the others have none) above the idle levels.
        env = dict(os.environ, PORT=str(port), HOST="127.0.0.1", MAX_CONNECTIONS="60000")
        if self.name == "chatterbox":
            if self.db == "sqlite" and self.db_path:
                db_path = self.db_path
            elif self.db == "sqlite":
                self.tmp = tempfile.mkdtemp(prefix="chatterbox-bench-")
                db_path = os.path.join(self.tmp, "bench.db")
            else:
                db_path = ":memory:"
            cmd = [self.binary, "--port", str(port), "--db-path", db_path] + CHATTERBOX_FLAGS
            if self.tls:
                cmd += ["--tls-cert", self.tls[0], "--tls-key", self.tls[1]]
        else:
            cmd = [os.path.join(PEERS, self.name, "start")]
        self.log = open(logfile, "w")
        self.proc = subprocess.Popen(pinned(server_core, cmd), env=env, stdout=self.log,
                                     stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.time() + (30 if self.name == "chatterbox" else 180)
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.label} exited at start ({self.proc.returncode}), see {logfile}")
            if self.is_ready(port):
                time.sleep(0.2)
                return descendants(self.proc.pid)
            time.sleep(0.1)
        raise RuntimeError(f"{self.label} not ready on port {port} in time, see {logfile}")

    def is_ready(self, port):
        if self.ready == "http":
            try:
                scheme, ctx = "http", None
                if self.tls:
                    import ssl
                    scheme, ctx = "https", ssl.create_default_context(cafile=self.tls[0])
                with urllib.request.urlopen(f"{scheme}://127.0.0.1:{port}/health", timeout=1,
                                            context=ctx) as r:
                    return r.status == 200
            except Exception:
                return False
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                return True
        except OSError:
            return False

    def addrs(self, port):
        """loadgen's --target: the one address this server listens on."""
        return f"127.0.0.1:{port}"

    def loadgen_extra(self):
        """Extra loadgen options for this target (a cluster adds its Redis)."""
        return []

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
        self.log.close()
        self.proc = None
        if self.tmp:
            shutil.rmtree(self.tmp, ignore_errors=True)
            self.tmp = None
        return code
