"""Black-box fuzzing of the running server (SPEC.md §3-§5: "Bad input … never crashes the server,
never leaks a connection, never touches another member").

One fuzzing client sends a fixed-seed stream of hostile frames: random JSON shapes, known commands
with wrong-typed fields, deep nesting, huge numbers, lone surrogates, NUL bytes, long strings,
random bytes as text and as binary frames, now and then a frame over the size limit. After each
frame it sends a `ping` barrier, so that everything before the `pong` is the answer to that frame.
Meanwhile a well-behaved pair exchanges numbered broadcasts in a room of its own.

Asserted: every frame gets an answer (an `error` with a known code, or a reply), or the server
closes the connection with a code in {1002, 1007, 1008, 1009} when the frame deserves it (then the
fuzzer reconnects); the pair receives every message, in order, with consecutive ids; at the end the
server is up (`/health`) and only the pair is connected.
"""

from __future__ import annotations

import asyncio
import json
import random
import string

from conftest import Client, ConnectionClosed, http_request

SEED = 0xC4A7
FRAMES = 5000
PAIR_MESSAGES = 50  # each member of the pair sends this many
MAX_FRAME = 8192
CALM_ROOM = "calm-pair-room"
CLOSE_CODES = {1002, 1007, 1008, 1009}
ERROR_CODES = {"bad_json", "unknown_command", "invalid", "not_member", "not_found",
               "rate_limited", "limit_reached"}
EVENTS = {"me", "broadcast", "history", "list", "rooms", "direct", "ack", "system", "pong",
          "error"}
COMMANDS = ["me", "list", "broadcast", "join", "leave", "rooms", "history", "direct", "ping"]
FIELDS = ["room", "message", "data", "echo", "msg_id", "last_n", "since", "before", "limit",
          "to", "request_id"]
ROOMS = ["general", "fz1", "fz2", "fz3", "", "bad room", "é", "r" * 64, "r" * 65]


class Frame:
    """One fuzz frame and what the test knows about its answer."""

    def __init__(self, data: str | bytes, *, binary: bool = False, code: str | None = None,
                 close: int | None = None, may_be_silent: bool = False):
        self.data = data
        self.binary = binary
        self.code = code  # the error code it must get, when known
        self.close = close  # the close code it must get, when it must close
        self.may_be_silent = may_be_silent

    def __repr__(self) -> str:
        return f"Frame({self.data[:120]!r}, binary={self.binary})"


class Gen:
    def __init__(self, seed: int):
        self.r = random.Random(seed)

    def text(self, n: int | None = None) -> str:
        n = self.r.randint(0, 12) if n is None else n
        alphabet = string.ascii_letters + string.digits + " _-.\"\\{}[]:,é€😀\t\n\x00"
        return "".join(self.r.choice(alphabet) for _ in range(n))

    def scalar(self):
        r = self.r
        return r.choice([
            lambda: None, lambda: r.random() < 0.5, lambda: r.randint(-2**63, 2**64 - 1),
            lambda: r.choice([0, -1, 1, 2**64, -2**64, 10**30]), lambda: r.uniform(-1e9, 1e9),
            lambda: self.text(), lambda: r.choice(ROOMS), lambda: "x" * r.randint(0, 1200),
        ])()

    def value(self, depth: int = 0):
        r = self.r
        pick = r.random()
        if depth > 3 or pick < 0.6:
            return self.scalar()
        if pick < 0.8:
            return [self.value(depth + 1) for _ in range(r.randint(0, 4))]
        return {self.key(): self.value(depth + 1) for _ in range(r.randint(0, 4))}

    def key(self) -> str:
        return self.r.choice(FIELDS + ["command", "x", "", "é", "__proto__"] + [self.text(4)])

    def dumps(self, obj) -> str:
        return json.dumps(obj, ensure_ascii=self.r.random() < 0.5)

    # --- the kinds of frames ---

    def known_command(self) -> Frame:
        """A known command whose fields are random: right ones, wrong types, extra keys."""
        r = self.r
        obj = {"command": r.choice(COMMANDS)}
        for _ in range(r.randint(0, 5)):
            obj[r.choice(FIELDS)] = self.value()
        if r.random() < 0.3:
            obj["request_id"] = r.choice([f"q{r.randint(0, 99)}", "x" * 65, 7, None, ""])
        if obj["command"] == "broadcast" and r.random() < 0.5:
            obj["message"] = r.choice(["hello", "x" * 1000, "x" * 1001, " ", "\x00"])
        silent = (obj["command"] == "broadcast"
                  and not isinstance(obj.get("request_id"), str)
                  and (obj.get("echo") is False or "msg_id" in obj))
        return Frame(self.dumps(obj), may_be_silent=silent)

    def random_object(self) -> Frame:
        obj = {self.key(): self.value() for _ in range(self.r.randint(0, 6))}
        command, rid = obj.get("command"), obj.get("request_id")
        if rid is not None and not (isinstance(rid, str) and len(rid) <= 64):
            code = "invalid"  # a bad request_id is refused before the command is looked at
        elif not isinstance(command, str):
            code = "invalid"
        elif command not in COMMANDS:
            code = "unknown_command"
        else:
            code = None
        silent = obj.get("command") == "broadcast"
        return Frame(self.dumps(obj), code=code, may_be_silent=silent)

    def random_json(self) -> Frame:
        """Valid JSON that is not an object."""
        v = self.value()
        while isinstance(v, dict):
            v = self.value()
        return Frame(json.dumps(v), code="bad_json")

    def deep(self) -> Frame:
        r = self.r
        # serde_json refuses more than 128 levels; every shape stays under the frame limit.
        n = r.randint(129, 4000)
        shape = r.randrange(4)
        if shape == 0:
            text = "[" * n
        elif shape == 1:
            text = "[" * n + "]" * n
        elif shape == 2:
            n = min(n, 1300)
            text = '{"a":' * n + "1" + "}" * n
        else:
            text = ('{"command":"broadcast","message":"deep","data":'
                    + "[" * n + "]" * n + "}")
        return Frame(text, code="bad_json")

    def huge_number(self) -> Frame:
        r = self.r
        field = r.choice(["limit", "before", "since", "last_n"])
        cmd = "history" if field in ("limit", "before") else "join"
        number, code = r.choice([("1e400", "bad_json"), ("-1e400", "bad_json"),
                                 ("18446744073709551616", "invalid"), ("-1", "invalid"),
                                 ("1.5", "invalid"), ("1" + "0" * 400, "bad_json")])
        text = f'{{"command":"{cmd}","room":"fz1","{field}":{number}}}'
        return Frame(text, code=code)

    def surrogate(self) -> Frame:
        s = self.r.choice(["\\ud800", "\\udfff", "\\ud800x", "\\udc00\\ud800", "\\ud83d"])
        where = self.r.choice(["message", "request_id", "room"])
        text = f'{{"command":"broadcast","message":"m","{where}":"{s}"}}'
        return Frame(text, code="bad_json")

    def nul(self) -> Frame:
        text = self.r.choice(['{"command":"me"}\x00', "\x00", '{"command":"broadcast",'
                              '"message":"a\x00b"}', '{"\x00":1}'])
        return Frame(text, code="bad_json")

    def long_string(self) -> Frame:
        r = self.r
        room = "general"
        n = r.randint(1001, MAX_FRAME - 100)
        text = self.dumps({"command": "broadcast", "room": room, "message": "x" * n})
        return Frame(text, code="invalid")

    def garbage_text(self) -> Frame:
        text = self.text(self.r.randint(1, 200))
        try:
            parsed = json.loads(text)
        except ValueError:
            return Frame(text, code="bad_json")
        return Frame(text, code=None if isinstance(parsed, dict) else "bad_json")

    def bytes_as_text(self) -> Frame:
        data = bytes(self.r.randrange(256) for _ in range(self.r.randint(1, 300)))
        if self.r.random() < 0.3:
            data = b'{"command":"broadcast","message":"' + b"\xed\xa0\x80" + b'"}'
        try:
            data.decode("utf-8")
        except UnicodeDecodeError:
            return Frame(data, close=1007)
        return Frame(data, may_be_silent=False)

    def binary(self) -> Frame:
        data = bytes(self.r.randrange(256) for _ in range(self.r.randint(0, 300)))
        if self.r.random() < 0.3:
            data = b'{"command":"ping"}'
        return Frame(data, binary=True, code="bad_json")

    def oversize(self) -> Frame:
        n = MAX_FRAME + self.r.randint(1, 4000)
        if self.r.random() < 0.5:
            return Frame("x" * n, close=1009)
        return Frame(b"\x00" * n, binary=True, close=1009)

    def valid(self) -> Frame:
        r = self.r
        room = r.choice(["general", "fz1", "fz2"])
        obj = r.choice([
            {"command": "broadcast", "room": room, "message": f"fz {r.randint(0, 999)}"},
            {"command": "join", "room": room, "last_n": r.randint(0, 5)},
            {"command": "leave", "room": room},
            {"command": "history", "room": room, "limit": r.randint(0, 300)},
            {"command": "list"}, {"command": "rooms"}, {"command": "me"},
            {"command": "direct", "to": r.choice(["nobody", "calm_a"]), "message": "psst"},
        ])
        return Frame(self.dumps(obj))

    def frame(self) -> Frame:
        kinds = [(self.known_command, 30), (self.random_object, 12), (self.random_json, 5),
                 (self.deep, 4), (self.huge_number, 5), (self.surrogate, 5), (self.nul, 3),
                 (self.long_string, 3), (self.garbage_text, 8), (self.bytes_as_text, 6),
                 (self.binary, 5), (self.oversize, 1), (self.valid, 13)]
        make = self.r.choices([k for k, _ in kinds], weights=[w for _, w in kinds])[0]
        f = make()
        if isinstance(f.data, str) and CALM_ROOM in f.data:
            f.data = f.data.replace(CALM_ROOM, "fz1")
        size = len(f.data.encode("utf-8") if isinstance(f.data, str) else f.data)
        if size > MAX_FRAME:
            f.code, f.close = None, 1009  # random shapes can grow past the limit
        return f


async def pair_reader(c: Client, want: int) -> list[dict]:
    """Every member message of the calm room `c` receives, until `want` of them."""
    got: list[dict] = []
    while len(got) < want:
        ev = await c.recv(timeout=20)
        if ev.get("event") == "broadcast" and ev.get("room") == CALM_ROOM \
                and ev.get("member") != "system":
            got.append(ev)
    return got


async def fuzz_client(server) -> Client:
    c = await Client.connect(server, max_size=None)
    await c.welcome()
    return c


async def test_fuzzed_frames_get_answers_and_spare_the_others(server_factory):
    srv = server_factory(rate_per_sec=1_000_000, rate_burst=1_000_000,
                         flood_close_after=1_000_000, log_level="warn")

    a = await Client.joined(srv, "calm_a")
    b = await Client.joined(srv, "calm_b")
    for c in (a, b):
        await c.send({"command": "join", "room": CALM_ROOM})
        await c.recv_event("history", room=CALM_ROOM)
    readers = [asyncio.create_task(pair_reader(c, 2 * PAIR_MESSAGES)) for c in (a, b)]
    pair_every = FRAMES // PAIR_MESSAGES
    pair_sent = 0

    gen = Gen(SEED)
    fz = await fuzz_client(srv)
    closes: dict[int, int] = {}
    answered = silent = 0
    for i in range(FRAMES):
        if i % pair_every == 0 and pair_sent < PAIR_MESSAGES:
            await a.send({"command": "broadcast", "room": CALM_ROOM, "message": f"a-{pair_sent}"})
            await b.send({"command": "broadcast", "room": CALM_ROOM, "message": f"b-{pair_sent}"})
            pair_sent += 1

        f = gen.frame()
        sync = f"fz-sync-{i}"
        answer: list[dict] = []
        try:
            await fz.ws.send(f.data, text=not f.binary)
            await fz.send({"command": "ping", "request_id": sync})
            while True:
                ev = await fz.recv(timeout=10)
                if ev.get("event") == "pong" and ev.get("request_id") == sync:
                    break
                answer.append(ev)
        except ConnectionClosed as e:
            code = e.rcvd.code if e.rcvd is not None else None
            assert code in CLOSE_CODES, f"frame {i} {f}: closed with {code}"
            assert f.close is not None, f"frame {i} {f}: closed ({code}) though it needed no close"
            assert code == f.close, f"frame {i} {f}: closed with {code}, expected {f.close}"
            closes[code] = closes.get(code, 0) + 1
            fz = await fuzz_client(srv)
            continue

        assert f.close is None, f"frame {i} {f}: expected close {f.close}, got {answer}"
        for ev in answer:
            assert ev.get("event") in EVENTS, f"frame {i}: unknown event {ev}"
            if ev["event"] == "error":
                assert ev.get("code") in ERROR_CODES, f"frame {i}: {ev}"
                assert isinstance(ev.get("message"), str) and ev["message"], ev
            if ev["event"] == "broadcast":
                assert ev.get("room") != CALM_ROOM, f"frame {i}: fuzzer saw the calm room"
        errors = [ev for ev in answer if ev["event"] == "error"]
        if f.code is not None:
            assert [e["code"] for e in errors] == [f.code], f"frame {i} {f}: {answer}"
        if not answer:
            assert f.may_be_silent, f"frame {i} {f}: no answer"
            silent += 1
        else:
            answered += 1

    got = await asyncio.wait_for(asyncio.gather(*readers), 30)
    for c, msgs in zip((a, b), got):
        ids = [m["id"] for m in msgs]
        assert ids == list(range(1, 2 * PAIR_MESSAGES + 1)), f"{c.name}: ids {ids}"
        for who in ("a", "b"):
            mine = [m["message"] for m in msgs if m["member"] == f"calm_{who}"]
            assert mine == [f"{who}-{n}" for n in range(PAIR_MESSAGES)], f"{c.name}: {mine}"
    assert got[0] == got[1], "both members see the same messages in the same order"

    await fz.close()
    assert srv.running, "the server died"
    health = http_request(srv.port, "/health")
    assert (health.status, health.text) == (200, "ok")
    # No leaked members: once the fuzzer is gone only the pair is left.
    members = None
    for _ in range(100):
        members = srv.get_json("/api/members")
        if members == ["calm_a", "calm_b"]:
            break
        await asyncio.sleep(0.05)
    assert members == ["calm_a", "calm_b"]
    print(f"fuzz: answered={answered} silent={silent} closes={closes}")
    assert answered + silent + sum(closes.values()) == FRAMES
    assert answered > FRAMES // 2, (answered, silent, closes)
    assert closes.get(1007, 0) > 0 and closes.get(1009, 0) > 0, closes
    await a.close()
    await b.close()
