"""The browser client (`GET /`, src/client/index.html) end to end, in a real headless Chromium.

Two pages chat as two members (one desktop in light mode, one phone-sized in dark mode), in
`general`, in a new room and privately; the page must render every text as text, keep member
lists live, show errors where they happened, and come back after the server is killed with
everything it missed, once. Screenshots go to python_tests/output/ (or $CHATTERBOX_TEST_OUTPUT);
with UPDATE_SCREENSHOT=1 the desktop one is also copied to docs/screenshot.png.

Needs the `playwright` package (python_tests/requirements-browser.txt) and Debian's chromium;
it never downloads a browser.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import pytest

from conftest import REPO_ROOT, Client

# Skipped where the browser stack is missing, except in CI (CI=true), where that is a failure.
try:
    import playwright.async_api as pw
except ImportError:
    if os.environ.get("CI"):
        raise
    pytest.skip("pip install -r python_tests/requirements-browser.txt", allow_module_level=True)
expect = pw.expect

CHROMIUM = Path(os.environ.get("CHROMIUM", "/usr/bin/chromium"))
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
OUTPUT = Path(os.environ.get("CHATTERBOX_TEST_OUTPUT", Path(__file__).parent / "output"))
DESKTOP = {"viewport": {"width": 1100, "height": 720}}
PHONE = {"viewport": {"width": 390, "height": 780}, "is_mobile": True, "has_touch": True,
         "color_scheme": "dark"}

# Upper bound for every wait on the page (a bound only turns a hang into a failure).
expect.set_options(timeout=15_000)

XSS = '<img src=x onerror="window.__xss=1"><script>window.__xss=2</script><b>bold?</b> & done'


@pytest.fixture
async def browser():
    if not CHROMIUM.exists():
        (pytest.fail if os.environ.get("CI") else pytest.skip)(f"no Chromium at {CHROMIUM} (apt-get install chromium)")
    async with pw.async_playwright() as p:
        b = await p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            yield b
        finally:
            await b.close()


class Member:
    """One person in a browser page; helpers act through labels and buttons, as a person would."""

    def __init__(self, page, name: str, errors: list[str]):
        self.page, self.name = page, name
        page.on("pageerror", lambda e: errors.append(f"{name}: {e}"))
        self.box = page.get_by_label("Message", exact=True)
        self.sent: list[dict] = []   # every command the page sent, in order
        page.on("websocket", lambda ws: ws.on("framesent", self._record))

    def _record(self, payload) -> None:
        if isinstance(payload, str):
            self.sent.append(json.loads(payload))

    @classmethod
    async def open(cls, browser, srv, name: str, errors: list[str], **context) -> "Member":
        ctx = await browser.new_context(**context)
        m = cls(await ctx.new_page(), name, errors)
        await m.page.goto(srv.http + "/")
        await m.page.get_by_label("Your name").fill(name)
        await m.page.get_by_label("Your name").press("Enter")   # the keyboard alone connects
        await m.expect_state("online")
        await expect(m.page.locator("#me")).to_have_text(f"You are {name}")
        await expect(m.box).to_be_focused()
        return m

    async def expect_state(self, state: str) -> None:
        await expect(self.page.locator("#state")).to_have_attribute("data-state", state)

    async def say(self, text: str) -> None:
        await self.box.fill(text)
        await self.box.press("Enter")

    def log(self, view: str):
        """The list of messages of a view: '#room' or '@member'."""
        return self.page.locator(f'#log ol[data-view="{view}"]')

    def message(self, view: str, text: str):
        return self.log(view).locator("li.msg[data-id] .text", has_text=text)

    async def messages(self, room: str) -> list[tuple[int, str, str]]:
        """(id, member, text) of every stored message the page shows in `room`, in page order."""
        return [tuple(m) for m in await self.page.evaluate(
            """view => [...document.querySelectorAll(`#log ol[data-view="${view}"] > li.msg[data-id]`)]
                .map(li => [+li.dataset.id, li.querySelector('.who').textContent,
                            li.querySelector('.text').textContent])""", "#" + room)]

    async def panel(self, toggle: str) -> None:
        """On a phone the room and member lists hide behind header buttons."""
        button = self.page.locator(f"#toggle-{toggle}")
        if await button.is_visible() and await button.get_attribute("aria-expanded") != "true":
            await button.click()

    async def open_view(self, label: str) -> None:
        await self.panel("rooms")
        await self.page.locator("#room-list > li > button:first-child, #dm-list > li > button:first-child",
                                has_text=label).first.click()

    async def members(self):
        await self.panel("members")
        return self.page.locator("#member-list")

    async def shot(self, file: str) -> Path:
        OUTPUT.mkdir(parents=True, exist_ok=True)
        path = OUTPUT / file
        await self.page.screenshot(path=str(path))
        return path


def contiguous(msgs: list[tuple[int, str, str]]) -> bool:
    return [m[0] for m in msgs] == list(range(1, len(msgs) + 1))


def contiguous_across_a_crash(msgs: list[tuple[int, str, str]], n_before: int) -> bool:
    """1..n_before before a kill -9, then one unbroken run above them: after a crash a room's
    ids continue above its durable reservation (PROTOCOL.md), so they may jump once, never repeat."""
    ids = [m[0] for m in msgs]
    before, after = ids[:n_before], ids[n_before:]
    run = after == list(range(after[0], after[0] + len(after))) if after else True
    return before == list(range(1, n_before + 1)) and run and (not after or after[0] > n_before)


async def test_two_members_chat_reconnect_and_presence(server_factory, browser, tmp_path):
    # Tiny pages: after the restart the page gets general's last 2 messages, a resume cut after 2
    # and pages of 2, so it must find and fill the gaps itself.
    srv = server_factory(db_path=tmp_path / "chat.db", max_history=2, resume_cap=2, history_page_cap=2)
    errors: list[str] = []
    alice = await Member.open(browser, srv, "alice", errors, **DESKTOP)
    bob = await Member.open(browser, srv, "bob", errors, **PHONE)

    # --- general: plain text both ways; Shift+Enter makes a new line, Enter sends
    await alice.say("hello bob")
    await expect(bob.message("#general", "hello bob")).to_have_count(1)
    await bob.box.type("hi alice")
    await bob.box.press("Shift+Enter")
    await bob.box.type("second line")
    await bob.box.press("Enter")
    await expect(alice.message("#general", "second line")).to_have_text("hi alice\nsecond line")
    await expect(await alice.members()).to_contain_text("bob")
    assert await alice.messages("general") == [(1, "alice", "hello bob"),
                                               (2, "bob", "hi alice\nsecond line")]

    # --- the counter shows the 1000-character limit and a longer text cannot be sent
    await alice.box.fill("x" * 1001)
    await expect(alice.page.locator("#count")).to_have_class(re.compile(r"\bover\b"))
    await expect(alice.page.locator("#count")).to_contain_text("1001 / 1000")
    await expect(alice.page.get_by_role("button", name="Send")).to_be_disabled()
    await alice.box.press("Enter")
    await alice.box.fill("")
    await expect(alice.page.locator("#count")).to_have_text("0 / 1000")
    await expect(alice.log("#general").locator("li.pending, li.failed")).to_have_count(0)

    # --- a new room: alice creates it by joining, bob finds it in the room list (`rooms`)
    await alice.page.get_by_label("Join or create a room").fill("lab")
    await alice.page.get_by_label("Join or create a room").press("Enter")
    await expect(alice.page.locator("#view-title")).to_have_text("# lab")
    await bob.panel("rooms")
    await bob.page.get_by_role("button", name="Refresh").click()
    await bob.page.get_by_role("button", name="Join # lab").click()
    await expect(bob.page.locator("#view-title")).to_have_text("# lab")
    await expect(alice.log("#lab").locator("li.notice", has_text="bob has joined!")).to_have_count(1)
    await expect(await alice.members()).to_contain_text("bob")
    await bob.say("lab message from bob")
    await alice.say("lab reply from alice")
    await expect(alice.message("#lab", "lab message from bob")).to_have_count(1)
    await expect(bob.message("#lab", "lab reply from alice")).to_have_count(1)
    assert await bob.messages("lab") == [(1, "bob", "lab message from bob"),
                                         (2, "alice", "lab reply from alice")]
    assert await alice.messages("general") == await bob.messages("general")

    # --- a direct message: from the member list, shown apart from the rooms
    await (await alice.members()).get_by_role("button", name="Direct message bob").click()
    await expect(alice.page.locator("#view-title")).to_have_text("Direct messages with bob")
    await alice.say("a secret for bob")
    await expect(alice.log("@bob").locator("li.direct", has_text="a secret for bob")).to_have_count(1)
    await expect(bob.page.locator("#dm-list")).to_contain_text("alice")
    await bob.open_view("alice")
    dm = bob.log("@alice").locator("li.direct")
    await expect(dm).to_have_count(1)
    await expect(dm.locator(".who")).to_have_text("alice → you")
    await expect(dm.locator(".text")).to_have_text("a secret for bob")
    for m in (alice, bob):   # not stored, not in any room
        await expect(m.page.locator('#log ol[data-view^="#"]', has_text="a secret")).to_have_count(0)

    # --- markup in a message is text: shown literally, nothing runs, no element is made
    await bob.open_view("# general")
    await bob.say(XSS)
    await alice.open_view("# general")
    for m in (alice, bob):
        await expect(m.message("#general", "window.__xss=2")).to_have_text(XSS)
        assert await m.page.evaluate("window.__xss") is None
        assert await m.page.locator("#log img, #log script, #log b").count() == 0

    # --- kill -9; the page shows it is reconnecting, and misses what carol says meanwhile
    before = {"general": await alice.messages("general"), "lab": await alice.messages("lab")}
    n_sent = len(alice.sent)
    srv.kill()
    await alice.expect_state("reconnecting")
    await bob.expect_state("reconnecting")
    await alice.page.context.set_offline(True)   # keeps alice away after the restart
    await alice.say("written while offline")      # waits, pending, and is sent once back online
    await expect(alice.log("#general").locator("li.pending")).to_have_count(1)
    srv.start()                                    # same port, flags and db file
    carol = await Client.joined(srv, name="carol")
    await carol.request({"command": "join", "room": "lab"})
    missed = {"general": [f"while away {i}" for i in range(6)], "lab": ["lab while away 0", "lab while away 1"]}
    later = {"general": missed["general"] + ["written while offline"], "lab": missed["lab"]}
    for room, texts in missed.items():
        for text in texts:
            ack = await carol.request({"command": "broadcast", "room": room, "message": text})
            assert ack["event"] == "ack", ack
    await bob.expect_state("online")
    await alice.expect_state("reconnecting")
    await alice.page.context.set_offline(False)
    await alice.expect_state("online")

    for m in (alice, bob):
        for room, texts in later.items():
            for text in texts:
                await expect(m.message("#" + room, text)).to_have_count(1)
    await expect(alice.log("#general").locator("li.pending")).to_have_count(0)
    for room in ("general", "lab"):
        shown = await alice.messages(room)
        assert shown[:len(before[room])] == before[room], f"{room}: history changed"
        assert [t for _, _, t in shown[len(before[room]):]] == later[room], f"{room}: {shown}"
        assert contiguous_across_a_crash(shown, len(before[room])), (
            f"{room}: a gap or a duplicate: {[i for i, _, _ in shown]}"
        )
        assert shown == await bob.messages(room)
    # it rejoined each room from the last id it had, and asked for what the cut resume left out
    resumed = alice.sent[n_sent:]
    joins = {c["room"]: c.get("since") for c in resumed if c["command"] == "join"}
    assert joins == {"general": len(before["general"]), "lab": len(before["lab"])}, resumed
    assert any(c["command"] == "history" and c["room"] == "general" for c in resumed), resumed
    # messages sent while away count as unread in the room not on screen
    await expect(alice.page.locator("#room-list li", has_text="# lab").locator(".badge")).to_have_text("2")
    # after the reconnect the page still works both ways
    await alice.say("back again")
    await expect(bob.message("#general", "back again")).to_have_count(1)
    ev = await carol.recv_event("broadcast", room="general", message="back again", timeout=10)
    assert ev["member"] == "alice"

    # --- screenshots (desktop light and dark, phone dark with its room list open)
    await alice.open_view("# lab")
    await alice.panel("members")
    desktop = await alice.shot("browser-desktop-light.png")
    await alice.page.emulate_media(color_scheme="dark")
    await alice.shot("browser-desktop-dark.png")
    await alice.page.emulate_media(color_scheme="light")
    await bob.shot("browser-phone-dark.png")
    await bob.panel("rooms")
    await bob.shot("browser-phone-dark-rooms.png")
    await bob.page.keyboard.press("Escape")   # closes the panel, back to the message box
    await expect(bob.box).to_be_focused()
    if os.environ.get("UPDATE_SCREENSHOT") == "1":
        (REPO_ROOT / "docs").mkdir(exist_ok=True)
        shutil.copyfile(desktop, REPO_ROOT / "docs" / "screenshot.png")

    # --- bob closes his page: he leaves every room's member list; a direct message to him fails in place
    await alice.open_view("# general")
    await bob.page.context.close()
    await expect(alice.log("#general").locator("li.notice", has_text="bob has left!")).to_have_count(1)
    await expect(await alice.members()).not_to_contain_text("bob")
    await expect(await alice.members()).to_contain_text("carol")
    await alice.open_view("# lab")
    await expect(await alice.members()).not_to_contain_text("bob")
    await alice.open_view("bob")
    await alice.say("are you there?")
    await expect(alice.log("@bob").locator("li.error")).to_contain_text("not_found")

    await carol.close()
    assert errors == []


async def test_older_history_on_scroll_up(server_factory, browser):
    srv = server_factory(max_history=5, rate_per_sec=1000, rate_burst=1000)
    seeder = await Client.joined(srv, name="seeder")
    await seeder.request({"command": "join", "room": "archive"})
    total = 120   # 5 on join, then pages of 50 going up
    for i in range(1, total + 1):
        await seeder.send({"command": "broadcast", "room": "archive", "message": f"old {i}"})
    await seeder.request({"command": "ping"})   # everything before it is stored
    errors: list[str] = []
    reader = await Member.open(browser, srv, "reader", errors, **DESKTOP)
    await reader.page.get_by_label("Join or create a room").fill("archive")
    await reader.page.get_by_label("Join or create a room").press("Enter")
    await expect(reader.message("#archive", "old 120")).to_have_count(1)
    older = reader.page.get_by_role("button", name="Load older messages")
    await expect(older).to_be_visible()

    # scroll up with the wheel until the top of the room is reached
    log = reader.page.locator("#log")
    box = await log.bounding_box()
    await reader.page.mouse.move(box["x"] + box["width"] / 2, box["y"] + box["height"] / 2)
    for _ in range(60):
        if not await older.is_visible():
            break
        await reader.page.mouse.wheel(0, -4000)
        await reader.page.wait_for_timeout(100)
    await expect(older).to_be_hidden()
    shown = await reader.messages("archive")
    assert [t for _, _, t in shown] == [f"old {i}" for i in range(1, total + 1)]
    assert contiguous(shown)
    await seeder.close()
    assert errors == []


async def test_refused_commands_show_where_they_happened(server_factory, browser):
    # no refill: after the burst every command is refused with `rate_limited`
    srv = server_factory(rate_per_sec=0, rate_burst=6)
    errors: list[str] = []
    m = await Member.open(browser, srv, "eve", errors, **DESKTOP)
    failed = m.log("#general").locator("li.failed")
    sent = 0
    for i in range(10):
        await m.say(f"try {i}")
        # wait until the message is settled: stored (it has an id) or refused
        settled = m.log("#general").locator("li.msg:not(.pending) .text", has_text=re.compile(f"^try {i}$"))
        await expect(settled).to_have_count(1)
        if await failed.count():
            break
        sent += 1
    await expect(failed).to_have_count(1)
    await expect(failed.locator(".text")).to_have_text(f"try {sent}")
    await expect(failed.locator(".err")).to_contain_text("rate_limited")
    await expect(failed.get_by_role("button", name="Retry")).to_be_visible()
    assert sent >= 1
    assert [t for _, _, t in await m.messages("general")] == [f"try {i}" for i in range(sent)]

    # a name that is taken is refused before the upgrade; the page says so on its form
    ctx = await m.page.context.browser.new_context(**DESKTOP)
    page = await ctx.new_page()
    await page.goto(srv.http + "/")
    await page.get_by_label("Your name").fill("EVE")   # names are unique ignoring case
    await page.get_by_role("button", name="Connect").click()
    await expect(page.locator("#login-error")).to_contain_text("taken")
    assert errors == []


async def test_an_open_page_pings_so_a_reader_who_only_reads_is_not_idle(server, browser):
    # The server closes members that send no command for --idle-timeout (5 min); an open page
    # is not idle: it sends a `ping` command every minute while connected (the page's clock is
    # Playwright's, so a minute passes at once).
    errors: list[str] = []
    ctx = await browser.new_context(**DESKTOP)
    await ctx.clock.install()
    m = Member(await ctx.new_page(), "reader", errors)
    await m.page.goto(server.http + "/")
    await m.page.get_by_label("Your name").fill("reader")
    await m.page.get_by_label("Your name").press("Enter")
    await m.expect_state("online")

    def pings() -> int:
        return sum(1 for c in m.sent if c == {"command": "ping"})

    assert pings() == 0
    for minute in (1, 2, 3):
        await m.page.clock.fast_forward(61_000)
        for _ in range(200):   # the frame is recorded a moment after it is sent
            if pings() >= minute:
                break
            await m.page.wait_for_timeout(25)
        assert pings() == minute, m.sent
    await m.expect_state("online")
    assert "reader" in server.get_json("/api/members")
    assert errors == []
