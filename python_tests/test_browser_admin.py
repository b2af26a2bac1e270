"""The admin page (`GET /admin`, src/client/admin.html) and the chat page with auth on, end to end
in a real headless Chromium (started as in test_browser.py, whose fixture and helpers this file
shares).

The admin signs in with the server API key and moderates while members watch in their chat
pages: a deleted message vanishes from them, a disconnected member's page says so, a closed room
is shown as closed, a post as the server arrives. The chat page with `--jwt-secret` takes its
token from the address's fragment or its sign-in field and shows a refused or expired token and
a forbidden room where they happen. Screenshots go to python_tests/output/ (or
$CHATTERBOX_TEST_OUTPUT); with UPDATE_SCREENSHOT=1 the desktop admin one is also copied to
docs/admin.png.
"""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import time

from conftest import REPO_ROOT, Client, http_request
from test_auth import SECRET, token
from test_browser import DESKTOP, OUTPUT, PHONE, XSS, Member, browser, expect  # noqa: F401 (fixture)

API_KEY = "admin-key-for-the-browser-test"


async def open_admin(browser, srv, errors: list[str], **context):
    ctx = await browser.new_context(**context)
    page = await ctx.new_page()
    page.on("pageerror", lambda e: errors.append(f"admin: {e}"))
    await page.goto(srv.http + "/admin")
    return page


async def sign_in(page, key: str) -> None:
    """By keyboard: the key field has the focus, Enter submits."""
    field = page.get_by_label("API key")
    await expect(field).to_be_focused()
    await field.fill(key)
    await field.press("Enter")


def server_log(srv) -> str:
    """What the server wrote (the harness's own `=== start` lines, with the flags, left out)."""
    return "\n".join(line for line in srv.log_text().splitlines() if not line.startswith("=== start"))


def api(srv, method: str, path: str, body: bytes | None = None):
    return http_request(srv.port, path, method=method, body=body, headers={"X-API-Key": API_KEY})


async def fits_without_sideways_scrolling(page) -> bool:
    return await page.evaluate("document.documentElement.scrollWidth <= window.innerWidth")


async def test_admin_signs_in_deletes_disconnects_closes_and_posts(server_factory, browser):
    srv = server_factory(api_key=API_KEY)
    errors: list[str] = []
    alice = await Member.open(browser, srv, "alice", errors, **DESKTOP)
    await alice.say(XSS)
    await alice.say("delete me")
    await expect(alice.message("#general", "delete me")).to_have_count(1)
    bob = await Client.joined(srv, name="bob")   # a member outside any browser sees the events too

    admin = await open_admin(browser, srv, errors, **DESKTOP)

    # --- a wrong key is refused on the form, which keeps the focus for another try
    for wrong in ["not-the-key", API_KEY + " ", "🔑" * 20, "k" * 9000]:   # 9000: over the head limit
        await sign_in(admin, wrong)
        await expect(admin.locator("#login-error")).to_have_text("Wrong API key.")
        await admin.evaluate("document.getElementById('login-error').textContent = ''")
    await expect(admin.locator("#app")).to_be_hidden()
    await sign_in(admin, API_KEY)
    await expect(admin.locator("#app")).to_be_visible()
    assert await admin.evaluate("sessionStorage.getItem('chatterbox.api-key')") == API_KEY

    # --- live figures and the rooms with their member counts
    await expect(admin.locator("#f-members")).to_have_text("2")
    await expect(admin.locator("#f-rooms")).to_have_text("1")
    general = admin.get_by_role("button", name="Open room general")
    row = admin.locator("#rooms tr", has=general)
    await expect(row.locator("td").nth(1)).to_have_text("2")
    await expect(row.locator("td").nth(2)).to_have_text("2")

    # --- a room's members and recent messages, opened with the keyboard; the polls (every 2 s,
    # "updated <time>") re-render the lists without taking the focus away
    await general.focus()
    for _ in range(2):
        shown = await admin.locator("#status").text_content()
        await expect(admin.locator("#status")).not_to_have_text(shown)
    await expect(general).to_be_focused()
    await general.press("Enter")
    members, msgs = admin.locator("#members"), admin.locator("#msgs")
    await expect(members.locator("li")).to_have_count(2)
    await expect(members).to_contain_text("alice")
    await expect(msgs.locator("li")).to_have_count(2)
    await expect(msgs.locator("li").first).to_contain_text("delete me")   # newest first
    await expect(msgs.locator("li").nth(1)).to_contain_text(XSS)          # markup is text
    delete_1 = admin.get_by_role("button", name="Delete message 1 from alice")
    await delete_1.focus()
    shown = await admin.locator("#status").text_content()
    await expect(admin.locator("#status")).not_to_have_text(shown)
    await expect(delete_1).to_be_focused()
    assert await admin.evaluate("window.__xss") is None
    assert await admin.locator("#msgs img, #msgs script").count() == 0

    # --- delete: gone from the member's page and from history, the id stays taken
    await admin.get_by_role("button", name="Delete message 2 from alice").click()
    await expect(alice.message("#general", "delete me")).to_have_count(0)
    await expect(alice.message("#general", "window.__xss=2")).to_have_count(1)
    await expect(msgs.locator("li")).to_have_count(1)
    assert (await bob.recv_event("deleted", room="general"))["id"] == 2
    page = srv.get_json("/api/rooms/general/messages")
    assert [m["id"] for m in page["messages"]] == [1]

    # --- post as the server (as "ops"): it arrives as an ordinary broadcast with the next id
    await admin.get_by_label("As member").fill("ops")
    await admin.get_by_label("Message", exact=True).fill("maintenance at noon")
    await admin.get_by_role("button", name="Post", exact=True).click()
    await expect(admin.locator("#post-result")).to_have_text("Posted to general as message #3.")
    await expect(alice.message("#general", "maintenance at noon")).to_have_count(1)
    assert await alice.messages("general") == [(1, "alice", XSS),
                                               (3, "ops", "maintenance at noon")]
    ev = await bob.recv_event("broadcast", message="maintenance at noon")
    assert (ev["member"], ev["id"]) == ("ops", 3)

    # --- a room of its own: its row appears; closing it (by the API) is shown in alice's page
    await alice.page.get_by_label("Join or create a room").fill("lab")
    await alice.page.get_by_label("Join or create a room").press("Enter")
    await expect(alice.page.locator("#view-title")).to_have_text("# lab")
    await expect(admin.get_by_role("button", name="Open room lab")).to_be_visible()
    assert api(srv, "DELETE", "/api/rooms/lab").status == 204
    await expect(alice.log("#lab").locator("li.error")).to_have_text("This room was closed by the server.")
    await expect(admin.get_by_role("button", name="Open room lab")).to_have_count(0)
    await alice.open_view("# general")

    # --- the chart: a point per poll, messages per second in and out
    lines = ["is the build green?", "yes, all 214 tests", "deploying 2.3.1 now", "done: 2.3.1 is live",
             "thanks!", "latency looks fine", "rolling back the canary", "canary back to 2.3.1",
             "all quiet again", "lunch?", "in 10 minutes", "ok"]

    async def chatter():
        for i, line in enumerate(lines):
            await bob.send({"command": "broadcast", "message": line})
            await asyncio.sleep(0.4 if i % 3 else 1.2)
    traffic = asyncio.create_task(chatter())
    await expect(admin.locator("#line-in")).to_have_attribute("points", re.compile(r"^(\S+ ){3,}\S+$"))
    await traffic
    await expect(admin.locator("#line-out")).to_have_attribute("points", re.compile(r"^(\S+ ){3,}\S+$"))
    await expect(msgs.locator("li").first).to_contain_text(lines[-1])
    await admin.get_by_label("Reason given to a disconnected member").fill("take a break")
    desktop = OUTPUT / "admin-desktop.png"
    OUTPUT.mkdir(parents=True, exist_ok=True)
    await admin.set_viewport_size({"width": 1100, "height": 900})
    await admin.evaluate("scrollTo(0, 0)")
    await admin.screenshot(path=str(desktop))

    # --- disconnect: alice's page says why and does not come back by itself; the list drops her
    await admin.get_by_role("button", name="Disconnect alice").click()
    await expect(alice.log("#general").locator("li.error")).to_have_text(
        "Disconnected by the server: take a break")
    await alice.expect_state("offline")
    await expect(members).not_to_contain_text("alice")
    await expect(admin.locator("#f-members")).to_have_text("1")
    again = alice.page.get_by_role("button", name="Reconnect now")   # her choice, not automatic
    await expect(again).to_be_visible()
    await again.click()
    await alice.expect_state("online")
    await expect(members).to_contain_text("alice")

    # --- the same page on a phone: one column, nothing wider than the screen
    await admin.set_viewport_size(PHONE["viewport"])
    assert await fits_without_sideways_scrolling(admin)
    await admin.screenshot(path=str(OUTPUT / "admin-phone.png"), full_page=True)
    if os.environ.get("UPDATE_SCREENSHOT") == "1":
        shutil.copyfile(desktop, REPO_ROOT / "docs" / "admin.png")

    # --- a key that stops working (the server restarted with another) signs the admin out
    await bob.close()
    srv.stop()
    srv.flags["api_key"] = "rotated-key-0123456789"
    srv.start()
    await admin.get_by_label("Message", exact=True).fill("still there?")
    await admin.get_by_role("button", name="Post", exact=True).click()
    await expect(admin.locator("#login-error")).to_have_text("The server refused the API key.")
    await expect(admin.locator("#app")).to_be_hidden()
    assert await admin.evaluate("sessionStorage.getItem('chatterbox.api-key')") is None
    assert API_KEY not in server_log(srv) and "rotated-key-0123456789" not in server_log(srv)
    assert errors == []


async def test_admin_page_without_a_server_api_or_behind_jwt(server_factory, browser):
    errors: list[str] = []
    srv = server_factory()   # no --api-key: the server API is off
    admin = await open_admin(browser, srv, errors, **PHONE)
    assert await fits_without_sideways_scrolling(admin)
    await sign_in(admin, "anything")
    await expect(admin.locator("#login-error")).to_have_text(
        "The server API is off: start the server with --api-key.")

    # with JWT on, the key alone opens the reads the page needs
    srv = server_factory(api_key=API_KEY, jwt_secret=SECRET)
    r = http_request(srv.port, "/admin")
    assert r.status == 200 and r.header("Content-Type").startswith("text/html")
    assert "frame-ancestors 'none'" in r.header("Content-Security-Policy")
    assert http_request(srv.port, "/admin", method="POST").status == 405
    admin = await open_admin(browser, srv, errors, **DESKTOP)
    await sign_in(admin, API_KEY)
    await expect(admin.get_by_role("button", name="Open room general")).to_be_visible()
    await expect(admin.locator("#f-connections")).to_have_text(re.compile(r"^\d+$"))
    # the server goes away: the page says so and keeps the last figures
    srv.stop()
    await expect(admin.locator("#status")).to_have_text("cannot reach the server")
    await expect(admin.locator("#app")).to_be_visible()
    assert errors == []


def page_requests(page) -> list:
    """Every HTTP request the page makes (documents and fetches), WebSockets apart."""
    seen: list = []
    page.on("request", lambda r: seen.append(r))
    return seen


async def test_chat_page_takes_its_token_from_the_fragment_or_the_sign_in_field(server_factory, browser):
    srv = server_factory(jwt_secret=SECRET, log_level="trace", read_only_rooms="news")
    t = token({"sub": "u-7", "name": "tina", "exp": int(time.time()) + 600,
               "rooms": ["general", "team-*", "news"]})
    errors: list[str] = []
    ctx = await browser.new_context(**DESKTOP)
    tina = Member(await ctx.new_page(), "tina", errors)
    requests = page_requests(tina.page)
    sockets: list[str] = []
    tina.page.on("websocket", lambda ws: sockets.append(ws.url))

    await tina.page.goto(srv.http + "/#token=" + t)   # signs in at once
    await tina.expect_state("online")
    await expect(tina.page.locator("#me")).to_have_text("You are tina")   # the token names her
    assert tina.page.url == srv.http + "/", "the token stays in the address bar"
    assert await tina.page.evaluate("sessionStorage.getItem('chatterbox.token')") == t
    await tina.say("signed in")
    await expect(tina.message("#general", "signed in")).to_have_count(1)

    # --- a reload keeps her signed in (this tab's sessionStorage); no address carries the token
    await tina.page.reload()
    await tina.expect_state("online")
    for r in requests:
        assert t not in r.url, f"token in a request line: {r.method} {r.url}"
    # the WebSocket is the one place: a browser cannot set headers there (docs/SECURITY.md)
    assert len(sockets) == 2 and all(f"token={t}" in u for u in sockets), sockets
    assert t not in server_log(srv), "the token reached the server's log"

    # --- a room outside her `rooms`: forbidden, said next to the room field; one inside works
    join = tina.page.get_by_label("Join or create a room")
    await join.fill("secret")
    await join.press("Enter")
    await expect(tina.page.locator("#join-error")).to_contain_text("Could not join secret: forbidden")
    await expect(tina.page.locator('#log ol[data-view="#secret"]')).to_have_count(0)
    await join.fill("team-a")
    await join.press("Enter")
    await expect(tina.page.locator("#view-title")).to_have_text("# team-a")
    await expect(tina.page.locator("#join-error")).to_have_text("")
    # a read-only room: she may read it; her message is refused where she wrote it
    await join.fill("news")
    await join.press("Enter")
    await expect(tina.page.locator("#view-title")).to_have_text("# news")
    await tina.say("may I?")
    failed = tina.log("#news").locator("li.failed")
    await expect(failed.locator(".err")).to_contain_text("Not sent: forbidden")
    await expect(failed.get_by_role("button", name="Retry")).to_be_visible()

    # --- a token without `general` in its rooms: the page does not pretend to be in it
    only_team = token({"sub": "u-8", "name": "tom", "exp": int(time.time()) + 600, "rooms": ["team-*"]})
    tom = Member(await (await browser.new_context(**PHONE)).new_page(), "tom", errors)
    await tom.page.goto(srv.http + "/#token=" + only_team)
    await tom.expect_state("online")
    await expect(tom.page.locator("#view-title")).to_have_text("No room: join one")
    await expect(tom.page.locator('#log ol[data-view="#general"]')).to_have_count(0)

    # --- a token typed into the sign-in field works the same; a forged one is refused there
    page = (await (await browser.new_context(**DESKTOP)).new_page())
    page.on("pageerror", lambda e: errors.append(f"field: {e}"))
    fetches = page_requests(page)
    await page.goto(srv.http + "/")
    forged = t[:-3] + ("AAA" if not t.endswith("AAA") else "BBB")
    await page.get_by_label("Token").fill(forged)
    await page.get_by_label("Token").press("Enter")
    await expect(page.locator("#login-error")).to_have_text(
        "The server refused the token: the token's signature is invalid.")
    await expect(page.get_by_label("Token")).to_be_focused()
    asked = [r for r in fetches if "/api/" in r.url]
    assert asked and all(r.headers.get("authorization") == "Bearer " + forged and forged not in r.url
                         for r in asked), [(r.url, r.headers) for r in asked]
    other = token({"sub": "u-9", "name": "uma", "exp": int(time.time()) + 600})
    await page.get_by_label("Token").fill("Bearer " + other)   # as copied from a header
    await page.get_by_role("button", name="Connect").click()
    await expect(page.locator("#me")).to_have_text("You are uma")
    assert errors == []


async def test_chat_page_shows_an_expired_token_at_sign_in_and_when_the_session_ends(server_factory, browser):
    srv = server_factory(jwt_secret=SECRET)
    errors: list[str] = []
    page = await (await browser.new_context(**DESKTOP)).new_page()
    page.on("pageerror", lambda e: errors.append(str(e)))
    old = token({"sub": "u-1", "name": "olga", "exp": int(time.time()) - 60})
    await page.goto(srv.http + "/#token=" + old)
    await expect(page.locator("#login-error")).to_have_text(
        "The server refused the token: the token has expired.")
    await expect(page.locator("#login")).to_be_visible()
    await expect(page.get_by_label("Token")).to_be_focused()
    await expect(page.get_by_label("Token")).to_have_value("")
    assert await page.evaluate("sessionStorage.getItem('chatterbox.token')") is None

    # a session whose token runs out while it is open: closed 1008 by the server, shown at sign-in
    short = token({"sub": "u-1", "name": "olga", "exp": int(time.time()) + 3})
    await page.get_by_label("Token").fill(short)
    await page.get_by_label("Token").press("Enter")
    await expect(page.locator("#me")).to_have_text("You are olga")
    await expect(page.locator("#login-error")).to_have_text(
        "Your token has expired: sign in with a new one.")
    await expect(page.locator("#app")).to_be_hidden()
    # a fresh token brings her back, without reloading the page
    fresh = token({"sub": "u-1", "name": "olga", "exp": int(time.time()) + 600})
    await page.get_by_label("Token").fill(fresh)
    await page.get_by_label("Token").press("Enter")
    await expect(page.locator("#state")).to_have_attribute("data-state", "online")
    await expect(page.locator("#app")).to_be_visible()
    assert errors == []


async def test_chat_page_refuses_bad_and_huge_tokens_in_place(server_factory, browser):
    srv = server_factory(jwt_secret=SECRET)
    errors: list[str] = []
    page = await (await browser.new_context(**DESKTOP)).new_page()
    page.on("pageerror", lambda e: errors.append(str(e)))
    sockets: list[str] = []
    page.on("websocket", lambda ws: sockets.append(ws.url))
    # control characters, a bad escape, a header injection: refused by the page, never sent
    for fragment in ["abc%0D%0AX-Evil:%201", "%E0%A4%A", "a%20b", "<script>"]:
        await page.goto(srv.http + "/#token=" + fragment)
        await expect(page.locator("#login-error")).to_have_text(
            "That is not a token: a token has only letters, digits and - _ .")
        await expect(page.get_by_label("Token")).to_be_focused()
        assert page.url == srv.http + "/"
    assert sockets == []
    # one too long for the server's request head (8 KiB): 431 for /ws and for the REST API
    await page.get_by_label("Token").fill("x" * 9000)
    await page.get_by_label("Token").press("Enter")
    await expect(page.locator("#login-error")).to_have_text("The token is too long for this server.")
    assert await page.evaluate("sessionStorage.getItem('chatterbox.token')") is None
    assert len(sockets) == 1
    assert srv.get("/health").status == 200
    # a link with a good token, followed in the open page (no reload), signs in
    good = token({"sub": "u-2", "name": "gus", "exp": int(time.time()) + 600})
    await page.goto(srv.http + "/#token=" + good)
    await expect(page.locator("#me")).to_have_text("You are gus")
    assert page.url == srv.http + "/"
    assert errors == []
