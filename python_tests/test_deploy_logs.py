"""What an operator sees (issue 13): JSON logs that stay valid JSON whatever clients send, text
logs with a date, refusals and closes logged with address and reason and counted in /metrics,
the idle choice for readers who only read, and the settings file's precedence."""

import json
import re
import subprocess

from conftest import Client, binary_path, http_request, raw_exchange, ws_handshake_bytes

RFC3339 = re.compile(r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}\.\d{3}Z$")


def server_lines(server) -> list[str]:
    # The harness writes its own "=== start ..." lines into the same file.
    return [l for l in server.log_text().splitlines() if l and not l.startswith("=== ")]


def metric(server, name: str) -> int:
    """A sample of `/metrics`; in cluster mode the sum over the nodes (each counts its own
    connections, and the test's clients are spread over them)."""
    total = 0
    for port in server.ports:
        body = http_request(port, "/metrics").text
        for line in body.splitlines():
            if line.startswith(name + " "):
                total += int(line.split()[-1])
                break
        else:
            raise AssertionError(f"{name} not in /metrics:\n{body}")
    return total


async def test_json_logs_are_valid_for_hostile_input_and_keep_the_contract_lines(server_factory):
    srv = server_factory(log_format="json")
    c = await Client.joined(srv, "mallory")
    hostile = 'quote" back\\slash\n{"level":"error","msg":"forged"}\x1b[2J\x00\u2028\u202e📤'
    for text in [hostile, "Hello world!"]:
        ack = await c.request({"command": "broadcast", "message": text})
        assert ack["event"] == "ack", ack
    # refusals whose answer text carries client input
    raw_exchange(srv.port, ws_handshake_bytes("/ws?name=%1b%22x%0a"))
    raw_exchange(srv.port, ws_handshake_bytes("/ws", extra='Origin: https://evil"\r\n'))
    await srv.wait_log("refused 127.0.0.1: 403 forbidden")
    await c.close()
    await srv.wait_log("Member mallory disconnected")

    objects = []
    for line in server_lines(srv):
        obj = json.loads(line)  # every line is one JSON object
        assert isinstance(obj, dict), line
        assert RFC3339.match(obj["ts"]), line
        assert obj["level"] in {"error", "warn", "info", "debug", "trace"}, line
        assert not any(ord(ch) < 0x20 for ch in line), repr(line)
        objects.append(obj)
    msgs = [o["msg"] for o in objects]
    for contract in ["🔌 Member mallory connected", "📤 Broadcast from mallory: Hello world!",
                     "🔌 Member mallory disconnected"]:
        assert contract in msgs, msgs
    # no forged object or field: the hostile text stays inside its msg, escaped as in text logs
    assert not any(o.get("msg") == "forged" for o in objects)
    hostile_line = next(m for m in msgs if m.startswith("📤 Broadcast from mallory: quote"))
    assert "\\n" in hostile_line and "\\u{1b}[2J" in hostile_line and "\n" not in hostile_line
    refusal = next(o for o in objects if o.get("reason") == "forbidden")
    assert (refusal["addr"], refusal["status"]) == ("127.0.0.1", 403)


async def test_text_logs_carry_a_date_and_refusals_are_counted_by_reason(server):
    # the first word of every server line is its UTC date and time
    for line in server_lines(server):
        assert RFC3339.match(line.split(" ", 1)[0]), line
    before = metric(server, 'chatterbox_refused_total{reason="forbidden"}')
    for _ in range(3):
        raw = raw_exchange(server.port, ws_handshake_bytes("/ws", extra="Origin: https://evil.example\r\n"))
        assert raw.startswith(b"HTTP/1.1 403"), raw[:100]
    assert metric(server, 'chatterbox_refused_total{reason="forbidden"}') == before + 3
    await server.wait_log("refused 127.0.0.1: 403 forbidden: origin not allowed")
    # /health is never counted as a refusal
    assert http_request(server.port, "/health").status == 200


async def test_an_idle_close_is_logged_and_a_pinging_reader_stays(server_factory):
    srv = server_factory(idle_timeout=1.0)
    reader = await Client.joined(srv, "reader")   # sends a ping command now and then
    silent = await Client.joined(srv, "silent")   # answers the server's pings, nothing more
    code = None
    for _ in range(40):
        await reader.sync()
        try:
            code, reason = await silent.expect_closed(timeout=0.25)
            break
        except AssertionError:
            continue
    assert (code, reason) == (1000, "idle")
    await srv.wait_log("[INFO] closed 127.0.0.1: 1000 idle (idle)")
    assert metric(srv, 'chatterbox_closed_total{reason="idle"}') == 1
    me = await reader.request({"command": "me"})
    assert me["member"] == "reader"


def first_line(tmp_path, args: list[str], env: dict[str, str]) -> str:
    """The first log line of a server started with `args` and `env` (then stopped)."""
    proc = subprocess.Popen([str(binary_path()), "--host", "127.0.0.1", "--port", "0",
                             "--db-path", ":memory:", *args], stdin=subprocess.DEVNULL,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            cwd=tmp_path, env={"PATH": "/usr/bin:/bin", **env})
    try:
        return proc.stderr.readline()
    finally:
        proc.kill()
        proc.wait(timeout=10)


def test_settings_file_loses_to_env_and_flags(tmp_path):
    conf = tmp_path / "chatterbox.conf"
    conf.write_text("# test\nLOG_FORMAT = 'json'  # for the collector\n")
    assert first_line(tmp_path, [], {"CONFIG": str(conf)}).startswith('{"ts":')
    text = first_line(tmp_path, ["--config", str(conf)], {"LOG_FORMAT": "text"})
    assert RFC3339.match(text.split(" ", 1)[0]), text
    flag = first_line(tmp_path, ["--config", str(conf), "--log-format", "json"],
                      {"LOG_FORMAT": "text"})
    assert json.loads(flag)["msg"].startswith("chatterbox "), flag
    assert RFC3339.match(first_line(tmp_path, [], {}).split(" ", 1)[0]), "the default is text"
    # a bad line stops the start, naming the file and the line
    conf.write_text("# test\nPORT=99999\n")
    r = subprocess.run([str(binary_path()), "--config", str(conf)], capture_output=True,
                       text=True, timeout=10, stdin=subprocess.DEVNULL, cwd=tmp_path)
    assert r.returncode == 2, r.stderr
    assert f"{conf}:2: PORT (--port): '99999' is out of range" in r.stderr, r.stderr
