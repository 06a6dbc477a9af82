"""The live room at /demo in a real headless Chromium (Debian's `chromium`, driven by Playwright).

A host tab opens a room; a viewer tab recharges and sends gifts from the tray; the host sees
them in the feed and the leaderboard, the viewer's balance drops by their price; the viewer's
network is cut and restored (a TcpProxy between that browser and the server) and the gifts
sent meanwhile show up in its feed exactly once.

Without chromium or playwright these tests skip, saying which is missing, unless
GIFTSTREAM_TEST_BROWSER=required (as in .ci/run): then they fail. GIFTSTREAM_SCREENSHOT=<path>
writes host and viewer side by side to that PNG (docs/demo.png in the README).
"""

from __future__ import annotations

import asyncio
import base64
import os
import re
import shutil
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from tests.support import Api, ServerProc, TcpProxy, join, token

pytestmark = pytest.mark.timeout(120)

BROWSER_ENV = "GIFTSTREAM_TEST_BROWSER"
SHOT_ENV = "GIFTSTREAM_SCREENSHOT"
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
# The browser's own download is not reachable, and the test needs nothing from outside.
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync"]
VIEWPORT = {"width": 1100, "height": 860}


def missing() -> str | None:
    try:
        import playwright.async_api  # noqa: F401
    except ImportError:
        return "playwright is not installed (pip install -e '.[test]')"
    if not Path(CHROMIUM).exists():
        return f"no Chromium at {CHROMIUM} (apt-get install -y chromium)"
    return None


@pytest.fixture(scope="module")
async def browser() -> AsyncIterator[Any]:
    why = missing()
    if why:
        if os.environ.get(BROWSER_ENV) == "required":
            pytest.fail(f"{why}; {BROWSER_ENV}=required")
        pytest.skip(why)
    from playwright.async_api import async_playwright

    async with async_playwright() as pw:
        b = await pw.chromium.launch(executable_path=CHROMIUM, args=ARGS, headless=True)
        try:
            yield b
        finally:
            await b.close()


class Tab:
    """A page in its own browser context (its own storage), with the errors it hit."""

    def __init__(self, page: Any) -> None:
        self.page = page
        self.errors: list[str] = []
        page.on("pageerror", lambda exc: self.errors.append(f"uncaught: {exc}"))
        page.on("console", self._console)
        page.on("dialog", lambda dialog: asyncio.ensure_future(dialog.accept()))

    def _console(self, msg: Any) -> None:
        # A cut network makes the browser log failed connections; anything the policy blocked,
        # or any error of the page's own, is a bug.
        if msg.type == "error" and ("Content Security Policy" in msg.text or "demo.js" in msg.text):
            self.errors.append(msg.text)

    def hook(self, name: str) -> Any:
        return self.page.get_by_test_id(name)

    async def text(self, name: str) -> str:
        return str(await self.hook(name).text_content()).strip()

    async def gift_ids(self) -> list[str]:
        return [str(i) for i in await self.page.locator('[data-testid="feed"] > [data-gift-id]').evaluate_all(
            "items => items.map(i => i.dataset.giftId)")]


@pytest.fixture
async def tabs(browser: Any) -> AsyncIterator[Any]:
    contexts: list[Any] = []
    made: list[Tab] = []

    async def open_tab() -> Tab:
        context = await browser.new_context(viewport=VIEWPORT)
        contexts.append(context)
        tab = Tab(await context.new_page())
        made.append(tab)
        return tab

    yield open_tab
    for context in contexts:
        await context.close()
    assert not [e for t in made for e in t.errors], [e for t in made for e in t.errors]


async def test_host_and_viewer_live_room_survives_a_network_drop(server: ServerProc, tabs: Any,
                                                                tmp_path: Path) -> None:
    from playwright.async_api import expect

    host_token = token("hana", "host", name="Hana")
    # A name is user input: it must show as text, never as markup.
    viewer_name = "Vera <i>V</i>"
    viewer_token = token("vera", name=viewer_name)

    host = await tabs()
    await host.page.goto(server.base + "/demo")
    await host.hook("token-input").fill(host_token)
    await host.hook("open-room").click()
    await expect(host.hook("status")).to_have_text("connected")
    room = await host.hook("room-input").input_value()
    assert room

    # The viewer's browser reaches the server through a proxy the test can cut.
    proxy = TcpProxy("127.0.0.1", server.port)
    try:
        viewer = await tabs()
        await viewer.page.goto(f"http://127.0.0.1:{proxy.port}/demo?room={room}&token={viewer_token}")
        await expect(viewer.hook("status")).to_have_text("connected")
        assert "token=" not in viewer.page.url, "the token leaves the address bar"
        await expect(viewer.hook("balance")).to_have_text("0")
        await viewer.hook("recharge-coins_65").click()
        await expect(viewer.hook("balance")).to_have_text("65")

        await viewer.hook("gift-rose").click()
        await viewer.hook("gift-panda").click()
        await expect(viewer.hook("balance")).to_have_text("59")  # a Rose is 1 coin, a Panda 5

        host_feed = host.hook("feed").locator(":scope > [data-gift-id]")
        await expect(host_feed).to_have_count(2)
        await expect(host_feed.nth(0)).to_contain_text("Rose")
        await expect(host_feed.nth(1)).to_contain_text("Panda")
        await expect(host.hook("leaderboard")).to_contain_text(viewer_name)
        await expect(host.hook("leaderboard")).to_contain_text("6")
        assert await host.hook("leaderboard").locator("i").count() == 0
        assert await host.hook("feed").locator("i").count() == 0
        await expect(viewer.hook("feed").locator(":scope > [data-gift-id]")).to_have_count(2)
        await expect(host.hook("viewers")).not_to_have_text("0")

        # The viewer's network goes away; another viewer sends gifts meanwhile.
        proxy.cut()
        await expect(viewer.hook("status")).to_have_text("reconnecting")
        walt_token = token("walt", name="Walt")
        walt = Api(server, walt_token)
        try:
            assert (await walt.recharge(package_id="coins_65")).status_code == 201
        finally:
            await walt.close()
        away: list[str] = []
        async with join(server, room, walt_token, "giftstream.json") as sock:
            for i in range(3):
                await sock.gift(f"away-{i}", "rose")
                reply = await sock.reply(f"away-{i}")
                assert reply["type"] == "ack", reply
                away.append(reply["gift_id"])
        await expect(host_feed).to_have_count(5)
        assert (await viewer.gift_ids())[2:] == []

        proxy.restore()
        await expect(viewer.hook("status")).to_have_text("connected", timeout=20_000)
        await expect(viewer.hook("feed").locator(":scope > [data-gift-id]")).to_have_count(5)
        ids = await viewer.gift_ids()
        assert ids[2:] == away and len(set(ids)) == 5, ids

        # Live again: a gift after the drop arrives once on both sides.
        await viewer.hook("gift-rose").click()
        await expect(viewer.hook("balance")).to_have_text("58")
        await expect(host_feed).to_have_count(6)
        await expect(viewer.hook("feed").locator(":scope > [data-gift-id]")).to_have_count(6)
        assert len(set(await host.gift_ids())) == 6

        shot = os.environ.get(SHOT_ENV)
        if shot:
            await side_by_side(tabs, [host, viewer], Path(shot))

        # The host ends the LIVE: both are told, and the viewer does not reconnect.
        await host.page.locator("#end-room").click()
        await expect(viewer.hook("status")).to_have_text("ended")
        await expect(host.hook("status")).to_have_text("ended")
        await expect(viewer.page.locator("#banner")).to_contain_text("ended")
    finally:
        proxy.close()


async def test_a_restarting_server_is_waited_for_as_advised(make_server: Any, redis_url: str, tabs: Any) -> None:
    """SIGTERM closes the room's sockets with 1001 and a retry_ms: the page waits that long, finds
    the server again on the same port, resumes, and shows a gift sent since once."""
    from playwright.async_api import expect

    first = make_server(redis_url=redis_url).start()
    host = Api(first, token("hana", "host", name="Hana"))
    try:
        room = await host.create_room()
    finally:
        await host.close()
    viewer = await tabs()
    await viewer.page.goto(f"{first.base}/demo?room={room}&token={token('vera', name='Vera')}")
    await expect(viewer.hook("status")).to_have_text("connected")

    stopping = asyncio.get_running_loop().run_in_executor(None, first.terminate)
    await expect(viewer.hook("status")).to_have_text("reconnecting", timeout=30_000)
    advised = int(await viewer.hook("status").get_attribute("data-retry-ms") or -1)
    assert 1000 <= advised <= 4999, advised  # the 1001 close's advice (docs/protocol.md, Close codes)
    await stopping

    second = make_server(redis_url=redis_url, port=first.port).start()
    walt_token = token("walt", name="Walt")
    walt = Api(second, walt_token)
    try:
        assert (await walt.recharge(package_id="coins_65")).status_code == 201
    finally:
        await walt.close()
    async with join(second, room, walt_token, "giftstream.json") as sock:
        await sock.gift("after-restart", "panda")
        gift_id = (await sock.reply("after-restart"))["gift_id"]
    await expect(viewer.hook("status")).to_have_text("connected", timeout=30_000)
    await expect(viewer.page.locator(f'[data-testid="feed"] > [data-gift-id="{gift_id}"]')).to_have_count(1)
    await expect(viewer.hook("feed").locator(":scope > [data-gift-id]")).to_have_count(1)


async def test_a_gap_too_long_to_replay_shows_the_room_as_it_is(make_server: Any, redis_url: str,
                                                                 tabs: Any) -> None:
    """A room stream that keeps 3 events: a viewer away for 6 gets resume_failed, shows the
    snapshot (totals, leaderboard) instead of the gifts it missed, and carries on live."""
    from playwright.async_api import expect

    server = make_server(redis_url=redis_url, env={"GIFTSTREAM_RESUME_MAX_EVENTS": "3"}).start()
    host = Api(server, token("hana", "host", name="Hana"))
    try:
        room = await host.create_room()
    finally:
        await host.close()
    walt_token = token("walt", name="Walt")
    walt = Api(server, walt_token)
    try:
        assert (await walt.recharge(package_id="coins_65")).status_code == 201
    finally:
        await walt.close()
    proxy = TcpProxy("127.0.0.1", server.port)
    try:
        viewer = await tabs()
        await viewer.page.goto(f"http://127.0.0.1:{proxy.port}/demo?room={room}&token={token('vera', name='Vera')}")
        await expect(viewer.hook("status")).to_have_text("connected")
        proxy.cut()
        await expect(viewer.hook("status")).to_have_text("reconnecting")
        async with join(server, room, walt_token, "giftstream.json") as sock:
            for i in range(6):
                await sock.gift(f"gap-{i}", "panda")
                assert (await sock.reply(f"gap-{i}"))["type"] == "ack"
            proxy.restore()
            await expect(viewer.hook("status")).to_have_text("connected", timeout=20_000)
            await expect(viewer.page.locator("#coins-total")).to_have_text("30")
            await expect(viewer.hook("leaderboard")).to_contain_text("Walt")
            await expect(viewer.page.locator(".toast")).to_contain_text("away")
            await sock.gift("gap-live", "rose")
            live_id = (await sock.reply("gap-live"))["gift_id"]
        await expect(viewer.hook("feed").locator(":scope > [data-gift-id]")).to_have_count(1)
        assert await viewer.gift_ids() == [live_id]
        await expect(viewer.page.locator("#coins-total")).to_have_text("31")
    finally:
        proxy.close()


async def test_a_bad_token_is_named_and_not_retried(server: ServerProc, tabs: Any) -> None:
    from playwright.async_api import expect

    host = Api(server, token("hana", "host", name="Hana"))
    try:
        room = await host.create_room()
    finally:
        await host.close()
    expired = token("vera", name="Vera", ttl_s=-10)
    tab = await tabs()
    await tab.page.goto(f"{server.base}/demo?room={room}&token=not.a.token")
    await expect(tab.page.locator("#join-error")).to_contain_text("token")
    await tab.hook("token-input").fill(expired)
    await tab.hook("join").click()
    await expect(tab.page.locator("#join-error")).to_contain_text("expired")
    # A token the server refuses (another secret): the 4401 advice says not to reconnect.
    forged = token("vera", name="Vera")[:-4] + "AAAA"
    await tab.hook("token-input").fill(forged)
    await tab.hook("room-input").fill(room)
    await tab.hook("join").click()
    await expect(tab.page.locator("#join-error")).to_contain_text("invalid token")
    await expect(tab.hook("status")).to_have_text("offline")


async def test_the_goal_shows_from_the_welcome_fills_and_goes_when_cleared(server: ServerProc, tabs: Any) -> None:
    """A LIVE goal set before the viewer came is shown from the welcome, fills with the gifts'
    `goal` events, is marked done, and goes away when the host clears it."""
    from playwright.async_api import expect

    host = Api(server, token("hana", "host", name="Hana"))
    walt_token = token("walt", name="Walt")
    walt = Api(server, walt_token)
    try:
        room = await host.create_room()
        assert (await host.client.put(f"/v1/rooms/{room}/goal", json={"gift": "rose", "count": 3})).status_code == 200
        assert (await walt.recharge(package_id="coins_65")).status_code == 201
        tab = await tabs()
        await tab.page.goto(f"{server.base}/demo?room={room}&token={token('vera', name='Vera')}")
        await expect(tab.hook("status")).to_have_text("connected")
        goal, figures = tab.page.locator("#goal"), tab.page.locator("#goal-figures")
        await expect(figures).to_have_text("0 / 3")
        await expect(goal).to_be_visible()
        async with join(server, room, walt_token, "giftstream.json") as sock:
            for i in range(3):
                await sock.gift(f"goal-{i}", "rose")
                assert (await sock.reply(f"goal-{i}"))["type"] == "ack"
        await expect(figures).to_have_text("3 / 3")
        await expect(goal).to_have_class(re.compile(r"\bdone\b"))
        assert (await host.client.delete(f"/v1/rooms/{room}/goal")).status_code == 200
        await expect(goal).to_be_hidden()
    finally:
        await host.close()
        await walt.close()


async def side_by_side(tabs: Any, shown: list[Tab], path: Path) -> None:
    """One PNG of the tabs next to each other, composed in a page of its own (no image library)."""
    for t in shown:
        await t.page.evaluate("window.scrollTo(0, 0)")
    shots = [base64.b64encode(await t.page.screenshot()).decode() for t in shown]
    canvas = await tabs()
    await canvas.page.set_viewport_size({"width": VIEWPORT["width"] * len(shots) + 12 * (len(shots) + 1),
                                         "height": VIEWPORT["height"] + 24})
    images = "".join(f'<img src="data:image/png;base64,{s}">' for s in shots)
    await canvas.page.set_content("<body style='margin:0;background:#050508;display:flex;gap:12px;padding:12px'>"
                                  f"{images}</body>")
    await canvas.page.wait_for_function("[...document.images].every(i => i.complete)")
    path.parent.mkdir(parents=True, exist_ok=True)
    await canvas.page.screenshot(path=str(path))


async def test_a_host_who_is_live_already_is_taken_back_to_that_room(server: ServerProc, tabs: Any) -> None:
    """One live room per host: "open a room" while live answers already_live, and the page
    enters the room it names instead of failing."""
    from playwright.async_api import expect

    host_token = token("hana", "host", name="Hana")
    host = Api(server, host_token)
    try:
        room = await host.create_room()
    finally:
        await host.close()
    tab = await tabs()
    await tab.page.goto(server.base + "/demo")
    await tab.hook("token-input").fill(host_token)
    await tab.hook("open-room").click()
    await expect(tab.hook("status")).to_have_text("connected")
    assert await tab.hook("room-input").input_value() == room
