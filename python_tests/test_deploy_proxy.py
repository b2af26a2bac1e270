"""Behind a real nginx and a real Caddy (issue 13, section 1): the configurations of
docs/DEPLOY.md, run by Debian's nginx (its own prefix, pid, logs and temp paths in the test's
directory, `daemon off;`) and Debian's Caddy (admin API off, its data in the test's directory)
on a free port in front of chatterbox.

Clients connect through nginx from two loopback addresses (127.0.0.2 and 127.0.0.3) with a
browser's `Origin`; nginx reaches chatterbox from 127.0.0.1, the one trusted proxy. They are
counted by their own address (`--max-connections-per-ip 2`: the third from one address is
refused, the other address is not), what a client writes into `X-Forwarded-For` does not help
it, the origin check passes although nginx rewrote `Host`, and they chat. The same nginx in
front of a server that trusts nobody shows what the setting changes.

`scripts/test` installs nginx and Caddy with apt-get when they are missing; without one, its
tests skip.
"""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import subprocess
import time
from pathlib import Path

import pytest
from websockets.asyncio.client import connect as ws_connect
from websockets.exceptions import InvalidStatus

from conftest import REPO_ROOT, Client, Server, free_port, http_request

NGINX = shutil.which("nginx") or ("/usr/sbin/nginx" if Path("/usr/sbin/nginx").exists() else None)
CADDY = shutil.which("caddy")

needs_nginx = pytest.mark.skipif(NGINX is None,
                                 reason="nginx is not installed (scripts/test installs it)")
needs_caddy = pytest.mark.skipif(CADDY is None,
                                 reason="caddy is not installed (scripts/test installs it)")


def deploy_block(lang: str) -> str:
    """A configuration of docs/DEPLOY.md: its first ```<lang> block."""
    text = (REPO_ROOT / "docs" / "DEPLOY.md").read_text(encoding="utf-8")
    m = re.search(rf"```{lang}\n(.*?)```", text, re.S)
    assert m, f"docs/DEPLOY.md has no ```{lang} block"
    return m.group(1)


def wait_answering(proc: subprocess.Popen, port: int, log) -> None:
    deadline = time.monotonic() + 15
    while True:
        assert proc.poll() is None, f"the proxy exited: {log()}"
        try:
            if http_request(port, "/health", timeout=1.0).status == 200:
                return
        except OSError:
            pass
        assert time.monotonic() < deadline, f"the proxy never answered: {log()}"
        time.sleep(0.05)


class Nginx:
    """nginx in the foreground with everything it writes under `workdir`."""

    def __init__(self, workdir: Path, upstream_port: int):
        self.dir = workdir
        self.dir.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        block = deploy_block("nginx")
        assert "listen 80;" in block and "127.0.0.1:8080" in block, block
        block = block.replace("listen 80;", f"listen 127.0.0.1:{self.port};")
        block = block.replace("127.0.0.1:8080", f"127.0.0.1:{upstream_port}")
        temp = "\n".join(
            f"    {kind}_temp_path {self.dir / kind};"
            for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"))
        # As root, workers would drop to www-data and lose the test's private directory.
        user = "user root;\n" if os.geteuid() == 0 else ""
        conf = (f"{user}daemon off;\nworker_processes 1;\npid {self.dir / 'nginx.pid'};\n"
                f"error_log {self.dir / 'error.log'} info;\n"
                "events { worker_connections 256; }\n"
                f"http {{\n    access_log {self.dir / 'access.log'};\n{temp}\n{block}\n}}\n")
        self.conf = self.dir / "nginx.conf"
        self.conf.write_text(conf)
        self.proc: subprocess.Popen | None = None

    def start(self) -> "Nginx":
        cmd = [NGINX, "-p", str(self.dir), "-c", str(self.conf), "-e", str(self.dir / "error.log")]
        check = subprocess.run(cmd + ["-t"], capture_output=True, text=True)
        assert check.returncode == 0, f"nginx -t: {check.stderr}\n{self.conf.read_text()}"
        self.proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                     stderr=subprocess.DEVNULL)
        wait_answering(self.proc, self.port, self.log)
        return self

    def log(self) -> str:
        p = self.dir / "error.log"
        return p.read_text(errors="replace")[-3000:] if p.exists() else ""

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


class Caddy:
    """Caddy in the foreground on a free port, plain HTTP, without its admin API, its data and
    config directories under `workdir`."""

    def __init__(self, workdir: Path, upstream_port: int):
        self.dir = workdir
        self.dir.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        block = deploy_block("caddy")
        assert "chat.example.com {" in block and "127.0.0.1:8080" in block, block
        block = block.replace("chat.example.com {", f"http://:{self.port} {{")
        block = block.replace("127.0.0.1:8080", f"127.0.0.1:{upstream_port}")
        self.conf = self.dir / "Caddyfile"
        self.conf.write_text("{\n    admin off\n    auto_https off\n}\n\n" + block)
        self.log_path = self.dir / "caddy.log"
        self.proc: subprocess.Popen | None = None

    def start(self) -> "Caddy":
        env = dict(os.environ, HOME=str(self.dir), XDG_DATA_HOME=str(self.dir / "data"),
                   XDG_CONFIG_HOME=str(self.dir / "config"))
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(
                [CADDY, "run", "--config", str(self.conf), "--adapter", "caddyfile"],
                stdin=subprocess.DEVNULL, stdout=log, stderr=log, env=env, cwd=self.dir)
        wait_answering(self.proc, self.port, self.log)
        return self

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")[-3000:] if self.log_path.exists() else ""

    def stop(self) -> None:
        Nginx.stop(self)  # type: ignore[arg-type]


@pytest.fixture
def caddy_factory(tmp_path: Path):
    started: list[Caddy] = []

    def make(upstream: Server) -> Caddy:
        c = Caddy(tmp_path / f"caddy{len(started)}", upstream.port)
        started.append(c)
        return c.start()

    yield make
    for c in started:
        c.stop()


@pytest.fixture
def nginx_factory(tmp_path: Path):
    started: list[Nginx] = []

    def make(upstream: Server) -> Nginx:
        n = Nginx(tmp_path / f"nginx{len(started)}", upstream.port)
        started.append(n)
        return n.start()

    yield make
    for n in started:
        n.stop()


async def through(proxy: Nginx | Caddy, name: str, source: str, headers: dict[str, str] | None = None,
                  ) -> Client:
    """A browser-like client of the page nginx serves: from loopback address `source`, with
    the `Origin` of the page, connected through nginx and welcomed."""
    url = f"ws://localhost:{proxy.port}/ws?name={name}"
    ws = await asyncio.wait_for(ws_connect(
        url, origin=f"http://localhost:{proxy.port}", additional_headers=headers or {},
        local_addr=(source, 0), open_timeout=5, close_timeout=1, compression=None, proxy=None),
        10)
    c = Client(ws)
    await c.welcome()
    return c


async def refused_status(proxy: Nginx | Caddy, name: str, source: str,
                         headers: dict[str, str] | None = None) -> int:
    try:
        c = await through(proxy, name, source, headers)
    except InvalidStatus as e:
        return e.response.status_code
    await c.ws.close()
    raise AssertionError(f"{name} from {source} was let in")


async def counted_by_their_own_address_and_chat(srv: Server, proxy: Nginx | Caddy) -> None:
    """The scenario of both proxies; `srv` trusts 127.0.0.1 and allows 2 per address."""
    # Two from 127.0.0.2: its share. The origin check passes with nginx's Host rewrite.
    a1 = await through(proxy, "a1", "127.0.0.2")
    a2 = await through(proxy, "a2", "127.0.0.2")
    # A third from there is refused, however it names itself.
    assert await refused_status(proxy, "a3", "127.0.0.2") == 429
    spoof = {"X-Forwarded-For": "203.0.113.9", "Forwarded": "for=203.0.113.10"}
    assert await refused_status(proxy, "a4", "127.0.0.2", spoof) == 429
    # Another address through the same nginx (so from the same peer, 127.0.0.1) is in.
    b = await through(proxy, "b", "127.0.0.3")
    await a1.recv_event("broadcast", joined="b")
    await b.send({"command": "broadcast", "message": "hello through the proxy"})
    got = await a1.recv_event("broadcast", member="b")
    assert got["message"] == "hello through the proxy"
    assert sorted(srv.get_json("/api/members")) == ["a1", "a2", "b"]
    # Leaving frees the address's share.
    await a2.ws.close()
    deadline = time.monotonic() + 10
    while "a2" in srv.get_json("/api/members"):
        assert time.monotonic() < deadline, "a2 never left"
        await asyncio.sleep(0.05)
    a5 = await through(proxy, "a5", "127.0.0.2")
    # REST through nginx, HEAD included.
    r = http_request(proxy.port, "/api/stats", headers={"Host": "localhost"})
    assert r.status == 200 and r.json()["members"] == 3, r
    r = http_request(proxy.port, "/health", method="HEAD")
    assert r.status == 200 and r.body == b"" and r.header("Content-Length") == "2", r
    for c in (a1, b, a5):
        await c.ws.close()


@needs_nginx
async def test_clients_through_nginx_are_counted_by_their_own_address_and_chat(
        server_factory, nginx_factory):
    srv = server_factory(trusted_proxies="127.0.0.1", max_connections_per_ip=2)
    await counted_by_their_own_address_and_chat(srv, nginx_factory(srv))


@needs_caddy
async def test_clients_through_caddy_are_counted_by_their_own_address_and_chat(
        server_factory, caddy_factory):
    srv = server_factory(trusted_proxies="127.0.0.1", max_connections_per_ip=2)
    await counted_by_their_own_address_and_chat(srv, caddy_factory(srv))


@needs_nginx
async def test_the_same_nginx_without_trusted_proxies_shows_the_difference(
        server_factory, nginx_factory):
    srv = server_factory(max_connections_per_ip=2)
    proxy = nginx_factory(srv)
    # nginx rewrote Host and the forwarded host is not believed: the browser is refused.
    assert await refused_status(proxy, "a1", "127.0.0.2") == 403
    # Without a browser Origin two get in, from different addresses: both count as nginx.
    clients = []
    for name, source in (("a1", "127.0.0.2"), ("b1", "127.0.0.3")):
        ws = await ws_connect(f"ws://localhost:{proxy.port}/ws?name={name}",
                              local_addr=(source, 0), open_timeout=5, close_timeout=1,
                              compression=None, proxy=None)
        clients.append(Client(ws))
    try:
        await ws_connect(f"ws://localhost:{proxy.port}/ws?name=c1",
                         local_addr=("127.0.0.4", 0), open_timeout=5, proxy=None)
        raise AssertionError("a third user behind the proxy was let in")
    except InvalidStatus as e:
        assert e.response.status_code == 429
    for c in clients:
        await c.ws.close()
