"""The terminal client (`python -m client_demo.cli`) against a real `giftstream serve`.

Every command runs as a subprocess, the way a user runs it; balances are checked
through the HTTP API, not through the client's own output.
"""

from __future__ import annotations

import asyncio
import re
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.support import ROOT, Api, ServerProc, token, wait_until

pytestmark = pytest.mark.timeout(120)


def cli(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "client_demo.cli", *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=timeout)


async def acli(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    """The client in a thread, so the test's event loop (and its sockets) keep running."""
    return await asyncio.to_thread(cli, *args, timeout=timeout)


def ok(result: subprocess.CompletedProcess[str]) -> str:
    assert result.returncode == 0, f"exit {result.returncode}\n{result.stdout}\n{result.stderr}"
    return result.stdout


class Watch:
    """`watch` in its own process; a thread collects its output lines."""

    def __init__(self, server: ServerProc, room: str, user_token: str, *extra: str) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "client_demo.cli", "watch", "--url", server.base, "--token", user_token,
             "--room", room, *extra],
            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        self.lines: list[str] = []
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.append(line.rstrip("\n"))

    def count(self, text: str) -> int:
        return sum(text in line for line in list(self.lines))

    def index(self, text: str) -> int:
        return next(i for i, line in enumerate(list(self.lines)) if text in line)

    async def wait_for(self, text: str, timeout: float = 20) -> None:
        await wait_until(lambda: self.count(text) > 0, timeout=timeout, interval=0.05,
                         message=lambda: f"watch never printed {text!r}; output:\n" + "\n".join(self.lines))

    async def wait_exit(self, timeout: float = 15) -> int:
        code = await asyncio.to_thread(self.proc.wait, timeout)
        await asyncio.to_thread(self.reader.join, 5)
        return code

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.reader.join(5)


@pytest.fixture
def watch() -> Iterator[Callable[..., Watch]]:
    procs: list[Watch] = []

    def make(server: ServerProc, room: str, user_token: str, *extra: str) -> Watch:
        w = Watch(server, room, user_token, *extra)
        procs.append(w)
        return w

    yield make
    for w in procs:
        w.stop()


async def test_recharge_and_wallet(server: ServerProc, api: Callable[..., Api]) -> None:
    tok = token("rita", name="Rita")
    common = ("--url", server.base, "--token", tok)
    out = ok(await acli("recharge", *common, "--package", "coins_65", "--key", "k1"))
    assert "credited: 65 coins (coins_65, 0.99 USD)" in out and "balance 65" in out
    # Same key again: the same order, credited once.
    again = ok(await acli("recharge", *common, "--package", "coins_65", "--key", "k1"))
    assert out.split()[1] == again.split()[1] and "balance 65" in again
    assert "balance 165" in ok(await acli("recharge", *common, "--coins", "100"))

    declined = await acli("recharge", *common, "--coins", "100", "--method", "sandbox_card_declined")
    assert declined.returncode == 1 and "402 payment_declined" in declined.stderr
    conflict = await acli("recharge", *common, "--package", "coins_330", "--key", "k1")
    assert conflict.returncode == 1 and "409 idempotency_conflict" in conflict.stderr

    assert "rita: 165 coins; spent this month 0" in ok(await acli("wallet", *common))
    assert (await api("rita").wallet())["coins"] == 165


async def test_gift_charges_exactly_and_reports_errors(server: ServerProc, api: Callable[..., Api]) -> None:
    room = await api("hana", "host").create_room()
    viewer = api("vic", name="Vic")
    assert (await viewer.recharge(coins=100)).status_code == 201
    common = ("--url", server.base, "--token", viewer.token, "--room", room)

    out = ok(await acli("gift", *common, "--gift", "rose", "--count", "5", "--repeat", "4", "--rate", "0"))
    assert len(re.findall(r"^ack cli-\S+: g\d+-\d+ balance \d+$", out, re.M)) == 4, out
    assert "done: 4 acked (0 replayed), 0 failed; balance 80" in out
    assert (await viewer.wallet())["coins"] == 80

    poor = await acli("gift", *common, "--gift", "galaxy")
    assert poor.returncode == 1 and "insufficient_funds" in poor.stdout
    unknown = await acli("gift", *common, "--gift", "unicorn")
    assert unknown.returncode == 1 and "unknown_gift" in unknown.stdout
    assert (await viewer.wallet())["coins"] == 80


@pytest.mark.parametrize("subprotocol", [[], ["--json"]], ids=["msgpack", "json"])
async def test_gift_resends_the_same_id_after_a_lost_ack(server: ServerProc, api: Callable[..., Api],
                                                         subprotocol: list[str]) -> None:
    room = await api("hana", "host").create_room()
    viewer = api("vic", name="Vic")
    assert (await viewer.recharge(coins=100)).status_code == 201

    out = ok(await acli("gift", "--url", server.base, "--token", viewer.token, "--room", room, "--gift", "panda",
                        "--count", "2", "--repeat", "5", "--drop-ack", "3", *subprotocol))
    assert "dropping the connection" in out and re.search(r"^resend cli-\S+-3 ", out, re.M), out
    assert len(re.findall(r"^ack cli-\S+-3: .*\(replayed", out, re.M)) == 1, out
    assert "done: 5 acked (1 replayed), 0 failed" in out
    # Five gifts of 10 coins, charged once each, and published to the room once each.
    assert (await viewer.wallet())["coins"] == 50
    info = (await viewer.client.get(f"/v1/rooms/{room}")).json()
    assert info["gifts_total"] == 5 and info["coins_total"] == 50


@pytest.mark.parametrize("subprotocol", [[], ["--json"]], ids=["msgpack", "json"])
async def test_watch_lists_events_and_stops_when_the_room_ends(
        server: ServerProc, api: Callable[..., Api], watch: Callable[..., Watch], subprotocol: list[str]) -> None:
    host = api("hana", "host", name="Hana")
    room = await host.create_room()
    w = watch(server, room, host.token, *subprotocol)
    await w.wait_for(f"joined room {room} hosted by Hana as Hana (host)")

    alice = api("alice", name="Alice")
    assert (await alice.recharge(coins=100)).status_code == 201
    ok(await acli("gift", "--url", server.base, "--token", alice.token, "--room", room, "--gift", "rose",
                  "--count", "5", "--repeat", "3"))
    for combo in (1, 2, 3):
        await w.wait_for(f"Alice sent Rose x5 (combo {combo})  [5 coins]")
    await w.wait_for("top gifters: 1. Alice 15")
    await w.wait_for("viewers: ")

    assert "ended at offset" in ok(await acli("end-room", "--url", server.base, "--token", host.token,
                                              "--room", room))
    assert await w.wait_exit() == 0, "\n".join(w.lines)
    assert w.lines[-2:] == ["room ended", "closed 4410: room ended"], w.lines
    for combo in (1, 2, 3):
        assert w.count(f"Alice sent Rose x5 (combo {combo})") == 1


async def test_watch_resumes_after_a_server_restart(
        server: ServerProc, api: Callable[..., Api], watch: Callable[..., Watch],
        make_server: Callable[..., ServerProc], redis_url: str, tmp_path: Path) -> None:
    host = api("hana", "host", name="Hana")
    room = await host.create_room()
    bob = api("bob", name="Bob")
    assert (await bob.recharge(coins=100)).status_code == 201
    # A second node on the same Redis, so gifts keep flowing while the watcher's node restarts.
    other = make_server(data_dir=tmp_path / "other", redis_url=redis_url, args=["--no-settler"]).start()

    async def gift(node: ServerProc, count: int) -> None:
        ok(await acli("gift", "--url", node.base, "--token", bob.token, "--room", room, "--gift", "rose",
                      "--count", str(count)))

    w = watch(server, room, host.token)
    await w.wait_for("joined room")
    await gift(server, 1)
    await w.wait_for("Bob sent Rose x1")

    await asyncio.to_thread(server.terminate)
    await w.wait_for("disconnected (1001")
    await gift(other, 2)
    await gift(other, 3)
    await asyncio.to_thread(server.start)

    await w.wait_for("resuming after offset")
    await w.wait_for("Bob sent Rose x3")
    await gift(server, 4)
    await w.wait_for("Bob sent Rose x4")
    order = [w.index(f"Bob sent Rose x{n} ") for n in (1, 2, 3, 4)]
    assert order == sorted(order), w.lines
    assert all(w.count(f"Bob sent Rose x{n} ") == 1 for n in (1, 2, 3, 4)), w.lines
    assert not w.count("resume failed"), w.lines


async def test_watch_stops_on_terminal_close_codes(server: ServerProc, api: Callable[..., Api]) -> None:
    room = await api("hana", "host").create_room()
    bad = await acli("watch", "--url", server.base, "--token", "not-a-token", "--room", room, timeout=20)
    assert bad.returncode == 1 and "closed 4401: invalid token" in bad.stdout, bad.stdout
    missing = await acli("watch", "--url", server.base, "--token", token("vic"), "--room", "nosuchroom",
                         timeout=20)
    assert missing.returncode == 1 and "closed 4404" in missing.stdout, missing.stdout


async def test_host_commands_and_earnings(server: ServerProc, api: Callable[..., Api]) -> None:
    host = api("hana", "host", name="Hana")
    viewer = api("vic", name="Vic")
    as_host = ("--url", server.base, "--token", host.token)
    as_viewer = ("--url", server.base, "--token", viewer.token)

    created = ok(await acli("create-room", *as_host, "--title", "Night show"))
    match = re.search(r"^room (\S+) created: 'Night show'", created, re.M)
    assert match, created
    room = match.group(1)
    denied = await acli("create-room", *as_viewer)
    assert denied.returncode == 1 and "403 forbidden" in denied.stderr

    assert (await viewer.recharge(coins=100)).status_code == 201
    ok(await acli("gift", *as_viewer, "--room", room, "--gift", "perfume", "--count", "5"))
    info = ok(await acli("room", "--url", server.base, "--room", room))
    assert "'Night show' hosted by Hana (hana), live" in info and "1 gifts, 100 coins" in info
    assert "1. Vic 100 coins" in info

    # 100 coins at the default 50% host share: 50 diamonds, once the settler has run.
    await wait_until(lambda: _earned(host), timeout=20)
    assert ("hana: 50 diamonds (500000 units of 1/10000) from 1 settled gifts; held 0, reserved 0, paid out 0, "
            "lifetime 50") in ok(
        await acli("earnings", *as_host))

    stranger = await acli("end-room", *as_viewer, "--room", room)
    assert stranger.returncode == 1 and "403 forbidden" in stranger.stderr
    assert "ended at offset" in ok(await acli("end-room", *as_host, "--room", room))
    assert "was already ended" in ok(await acli("end-room", *as_host, "--room", room))
    assert ", ended," in ok(await acli("room", "--url", server.base, "--room", room))
    gone = await acli("room", "--url", server.base, "--room", "nosuchroom")
    assert gone.returncode == 1 and "404 not_found" in gone.stderr


async def _earned(host: Api) -> bool:
    return bool((await host.earnings())["gifts_received"] == 1)


class Live(Watch):
    """`python -m client_demo host|viewer --plain` in its own process, keys written to its stdin."""

    def __init__(self, server: ServerProc, role: str, room: str, user_token: str) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "client_demo", role, "--plain", "--url", server.base, "--token", user_token,
             "--room", room],
            cwd=ROOT, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        self.lines = []
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def keys(self, keys: str) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(keys + "\n")
        self.proc.stdin.flush()


async def test_host_and_viewer_screens_in_plain_mode(server: ServerProc, api: Callable[..., Api]) -> None:
    host = api("hana", "host", name="Hana")
    room = await host.create_room()
    viewer = api("vic", name="Vic")
    assert (await viewer.recharge(coins=100)).status_code == 201
    screens: list[Live] = []
    try:
        hosting = Live(server, "host", room, host.token)
        screens.append(hosting)
        await hosting.wait_for(f"joined room {room} hosted by Hana as Hana (host)")
        watching = Live(server, "viewer", room, viewer.token)
        screens.append(watching)
        await watching.wait_for("balance 100; keys: 1 rose, 2 tiktok, 3 finger_heart, 4 panda,")
        await watching.wait_for(f"joined room {room} hosted by Hana as Vic (viewer)")

        watching.keys("1")  # a Rose
        await watching.wait_for("sent Rose: ack cli-")
        watching.keys("4 x")  # a Panda; x is no gift's key
        await watching.wait_for("balance 94")
        await hosting.wait_for("Vic sent Rose x1 (combo 1)  [1 coins]  | total 1 gifts, 1 coins")
        await hosting.wait_for("Vic sent Panda x1 (combo 1)  [5 coins]  | total 2 gifts, 6 coins")
        await hosting.wait_for("top gifters: 1. Vic 6")
        await watching.wait_for("Vic sent Panda x1")
        assert watching.count("sent Panda: ack cli-") == 1 and watching.count("sent Rose: ack") == 1
        watching.keys("q")
        assert await watching.wait_exit() == 0, watching.lines
        assert (await viewer.wallet())["coins"] == 94

        assert (await host.client.post(f"/v1/rooms/{room}/end")).status_code == 200
        assert await hosting.wait_exit() == 0, hosting.lines
        assert hosting.lines[-1] == "closed 4410: room ended", hosting.lines
    finally:
        for s in screens:
            s.stop()


def test_the_screens_draw_with_rich() -> None:
    import io

    from rich.console import Console

    from client_demo.live import RoomView, gift_keys, render

    view = RoomView("host", {"rose": "Rose"})
    view.apply({"type": "connected", "room": "demo", "viewers": 3, "offset": "0-0", "host": {}, "you": {}})
    view.apply({"type": "gift", "from": {"name": "Vic"}, "gift": "rose", "count": 5, "coins": 5, "offset": "1-0"})
    view.apply({"type": "leaderboard", "top": [{"name": "Vic", "coins": 5}]})
    view.apply({"type": "goal", "progress": 5, "target": 20, "done": False})
    out = io.StringIO()
    Console(file=out, width=100, color_system=None).print(render(view, "demo", {}))
    screen = out.getvalue()
    assert "3 watching" in screen and "1 gifts, 5 coins" in screen and "Vic sent Rose x5" in screen
    assert "goal 5/20 (25%)" in screen and "1." in screen and "Vic" in screen

    viewer = RoomView("viewer", {}, balance=42)
    keys = gift_keys({"gifts": [{"id": "rose", "name": "Rose", "coins": 1}]})
    out = io.StringIO()
    Console(file=out, width=100, color_system=None).print(render(viewer, "demo", keys))
    assert "balance 42 coins" in out.getvalue() and "1 Rose (1)" in out.getvalue()
