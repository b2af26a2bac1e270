"""Log forging (issue 9): client-chosen text is escaped in the server's log, so a broadcast
cannot write fake log lines or terminal escapes; and bad settings stop the start with exit 2."""

import subprocess

from conftest import Client, binary_path

FAKE = "21:00:00 [WARN] fake"


def server_lines(server) -> list[str]:
    # The harness writes its own "=== start ..." lines into the same file.
    return [l for l in server.log_text().splitlines() if not l.startswith("=== ")]


async def test_broadcasts_cannot_forge_log_lines_or_send_terminal_escapes(server):
    c = await Client.joined(server, "mallory")
    hostile = [
        f"hi\n{FAKE}",
        f"hi\r\n{FAKE} crlf",
        "\x1b[2J\x1b[31mred\x1b[0m",
        f"line\u2028{FAKE} ls",
        "bidi \u202etxt.exe",
    ]
    for text in hostile:
        ack = await c.request({"command": "broadcast", "message": text})
        assert ack["event"] == "ack", ack
    ack = await c.request({"command": "broadcast", "message": "Hello world!"})
    assert ack["event"] == "ack", ack
    await server.wait_log("Broadcast from mallory: Hello world!")
    await c.close()
    await server.wait_log("Member mallory disconnected")

    raw = server.log_path.read_bytes()
    assert b"\x1b" not in raw, "an ESC byte reached the log"
    assert b"\r" not in raw and "\u2028".encode() not in raw and "\u202e".encode() not in raw
    lines = server_lines(server)
    for line in lines:
        assert not line.startswith("21:00:00"), f"forged line: {line!r}"
        assert FAKE not in line or "Broadcast from mallory" in line, line
    text = "\n".join(lines)
    # Escaped, still readable, on the line that logged the broadcast.
    assert f"📤 Broadcast from mallory: hi\\n{FAKE}" in text, text
    assert "📤 Broadcast from mallory: \\u{1b}[2J\\u{1b}[31mred\\u{1b}[0m" in text, text
    # Ordinary input keeps the contract lines exactly.
    assert "📤 Broadcast from mallory: Hello world!" in text
    assert "🔌 Member mallory connected" in text
    assert "🔌 Member mallory disconnected" in text


def start_fails(cwd, *args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    """Runs the binary with settings that must be refused; a start that serves is a failure
    (the timeout turns it into one)."""
    return subprocess.run([str(binary_path()), "--port", "0", *args], capture_output=True,
                          text=True, timeout=10, env=env, stdin=subprocess.DEVNULL, cwd=cwd)


def test_an_empty_db_path_or_a_huge_duration_stops_the_start_with_exit_2(tmp_path):
    for args, named in [
        (["--db-path", ""], "--db-path"),
        (["--db-path", "   "], "--db-path"),
        (["--db-path", ":memory:", "--idle-timeout", "1e19"], "--idle-timeout"),
        (["--db-path", ":memory:", "--dedup-window", "1e19"], "--dedup-window"),
        (["--db-path", ":memory:", "--head-timeout", "90000"], "--head-timeout"),
    ]:
        try:
            r = start_fails(tmp_path, *args)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"{args}: the server started instead of refusing")
        assert r.returncode == 2, (args, r.returncode, r.stderr)
        assert named in r.stderr, (args, r.stderr)
    try:
        r = start_fails(tmp_path, env={"DB_PATH": "", "PATH": "/usr/bin:/bin"})
    except subprocess.TimeoutExpired:
        raise AssertionError("DB_PATH= : the server started instead of refusing")
    assert r.returncode == 2 and "DB_PATH" in r.stderr, r.stderr
