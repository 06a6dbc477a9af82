"""Restarts and crashes on the embedded defaults: nothing acknowledged is ever lost or doubled."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import websockets
from redis.asyncio import Redis

from server.batcher import ScriptBatcher
from server.keys import RoomKeys
from server.rooms.state import Rooms
from server.scripts import Scripts
from server.settings import Settings
from server.wallet.service import GiftOrder, Wallet
from tests.support import FAST, Api, Client, ServerProc, join, run_cli, token, wait_until


def _valkey_pid(data_dir: Path) -> int:
    return int(json.loads((data_dir / "valkey.json").read_text())["pid"])


async def test_restart_keeps_balances_and_settles_leftover_outbox(make_server: Callable[..., ServerProc],
                                                                  tmp_path: Path) -> None:
    data = tmp_path / "var"
    # First run without a settler: every gift stays in the outbox.
    first = make_server(data, env={"GIFTSTREAM_SETTLER": "0"}).start()
    host, v = Api(first, token("h", "host")), Api(first, token("v"))
    await v.recharge(coins=500)
    room = await host.create_room()
    async with join(first, room, v.token) as c:
        for i in range(40):
            await c.gift(f"r{i}", "panda", 1)
        acks = [await c.reply(f"r{i}") for i in range(40)]
    assert all(a["type"] == "ack" for a in acks)
    assert (await host.earnings())["gifts_received"] == 0
    await host.close()
    await v.close()
    assert first.terminate() in (0, -signal.SIGTERM)
    assert not (data / "valkey.json").exists(), "serve must stop its embedded valkey on SIGTERM"

    second = make_server(data, port=first.port).start()
    host, v = Api(second, token("h", "host")), Api(second, token("v"))
    assert (await v.wallet())["coins"] == 300
    await wait_until(lambda: _received(host, 40), timeout=20)
    assert (await host.earnings())["diamond_units"] == 40 * 5 * 5000
    await host.close()
    await v.close()
    result = run_cli("audit", "--data-dir", str(data))
    assert result.returncode == 0, result.stdout + result.stderr


async def _received(host: Api, n: int) -> bool:
    received: int = (await host.earnings())["gifts_received"]
    return received >= n


async def test_kill9_mid_storm_then_retry_charges_exactly_once(make_server: Callable[..., ServerProc],
                                                               tmp_path: Path) -> None:
    data = tmp_path / "var"
    server = make_server(data, env=FAST).start()  # a storm, not a person
    valkey_before = _valkey_pid(data)
    host = Api(server, token("hk", "host"))
    room = await host.create_room()
    senders = [f"k{i}" for i in range(6)]
    for s in senders:
        await Api(server, token(s)).recharge(coins=2000, key="first")
    plan = {s: [f"{s}-{i}" for i in range(300)] for s in senders}
    acked: dict[str, dict[str, str]] = {s: {} for s in senders}

    async def storm(sender: str) -> None:
        try:
            async with join(server, room, token(sender)) as c:
                async def read_acks() -> None:
                    while True:
                        msg = await c.recv(10)
                        if msg["type"] == "ack":
                            acked[sender][msg["id"]] = msg["gift_id"]

                reader = asyncio.create_task(read_acks())
                for gid in plan[sender]:
                    await c.gift(gid, "rose", 2)
                    await asyncio.sleep(0.003)  # pacing, so the kill lands mid-storm
                await reader
        except (websockets.ConnectionClosed, OSError, TimeoutError):
            pass

    tasks = [asyncio.create_task(storm(s)) for s in senders]
    await wait_until(lambda: sum(len(a) for a in acked.values()) >= 300, timeout=30, interval=0.01)
    server.kill9()
    await asyncio.gather(*tasks)
    total_acked_before = sum(len(a) for a in acked.values())
    assert 0 < total_acked_before < 1800, "the kill must land mid-storm"
    assert _alive(valkey_before), "the killed serve leaves its valkey running"

    # Restart on the same data dir: the orphaned valkey must not block it.
    server = make_server(data, port=server.port, env=FAST).start()
    for sender in senders:  # clients retry every gift, acknowledged or not, with the same ids
        async with join(server, room, token(sender)) as c:
            for gid in plan[sender]:
                await c.gift(gid, "rose", 2)
                reply = await c.reply(gid)
                assert reply["type"] == "ack", reply
                if gid in acked[sender]:
                    assert reply["gift_id"] == acked[sender][gid], "an acknowledged gift changed identity"
                    assert reply["replayed"] is True
    for sender in senders:
        wallet = await Api(server, token(sender)).wallet()
        assert wallet["coins"] == 2000 - 300 * 2, (sender, wallet)
    await wait_until(lambda: _received(host, 1800), timeout=30)
    earnings = await host.earnings()
    assert earnings["gifts_received"] == 1800
    assert earnings["diamond_units"] == 1800 * 2 * 5000
    result = run_cli("audit", "--json", "--data-dir", str(data))
    assert result.returncode == 0, result.stdout + result.stderr
    assert json.loads(result.stdout)["totals"]["movements"] == 6 + 1800


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
        return True
    except ProcessLookupError:
        return False


async def test_sigterm_drains_and_closes_sockets_with_1001(make_server: Callable[..., ServerProc],
                                                           redis_url: str) -> None:
    server = make_server(redis_url=redis_url).start()
    host = Api(server, token("dh", "host"))
    room = await host.create_room()
    v = Api(server, token("dv"))
    await v.recharge(coins=100)
    async with join(server, room, v.token) as c:
        for i in range(20):
            await c.gift(f"d{i}")
        replies = [await c.reply(f"d{i}") for i in range(20)]
        assert all(r["type"] == "ack" for r in replies)
        server.proc.send_signal(signal.SIGTERM)  # type: ignore[union-attr]
        with pytest.raises(websockets.ConnectionClosed) as closed:
            while True:
                await c.recv(20)
    assert closed.value.rcvd is not None and closed.value.rcvd.code == 1001
    advice = json.loads(closed.value.rcvd.reason)
    assert advice["reason"] == "server restarting" and advice["reconnect"] is True
    assert 1000 <= advice["retry_ms"] < 5000
    assert server.proc.wait(30) in (0, -signal.SIGTERM)  # type: ignore[union-attr]
    await host.close()
    await v.close()
    # Everything acknowledged before the drain was settled by the drain itself.
    import sqlite3

    db = sqlite3.connect(server.data_dir / "giftstream.sqlite3")
    assert db.execute("SELECT COUNT(*) FROM gifts WHERE sender_id = 'dv'").fetchone()[0] == 20


async def test_a_gift_charged_by_a_gateway_that_died_before_publishing_is_shown_once_on_retry(
        make_server: Callable[..., ServerProc], redis_url: str, tmp_path: Path) -> None:
    """The debit and the room publish are two Lua calls (two cluster slots). A gateway that died
    between them charged a gift nobody saw. The sender's retry with the same id must show it,
    once, and count it once in the room's totals and leaderboard; retrying again changes nothing."""
    server = make_server(tmp_path / "var", redis_url=redis_url).start()
    host, v = Api(server, token("dh", "host")), Api(server, token("dv", name="Dee"))
    await v.recharge(coins=100)
    room = await host.create_room()
    # What the dead gateway did: the debit, through the real script, and nothing after it.
    redis = Redis.from_url(redis_url, decode_responses=True)
    scripts = Scripts()
    await scripts.load(redis)
    wallet = Wallet(redis, ScriptBatcher(redis, scripts), Settings())
    charged = await wallet.send_gift(GiftOrder("lost-1", "dv", "Dee", "dh", room, "panda", 2, 5))
    await redis.aclose()
    async with join(server, room, token("dw")) as watcher, join(server, room, v.token) as sender:
        for attempt in range(3):
            sender.replies.pop("lost-1", None)
            await sender.gift("lost-1", "panda", 2)
            ack = await sender.reply("lost-1")
            assert (ack["type"], ack["gift_id"], ack["balance"], ack["replayed"]) == (
                "ack", charged.gift_id, 90, True), (attempt, ack)
            await watcher.until(lambda: _gift_events(watcher, charged.gift_id) >= 1)
        await watcher.drain(0.5)
        assert _gift_events(watcher, charged.gift_id) == 1
        [event] = [e for e in watcher.events if e.get("gift_id") == charged.gift_id]
        assert (event["from"], event["coins"], event["ts"]) == ({"id": "dv", "name": "Dee"}, 10, charged.debit_ms)
        info = (await v.client.get(f"/v1/rooms/{room}")).json()
        assert info["coins_total"] == 10 and info["gifts_total"] == 1, info
        assert info["top_gifters"] == [{"id": "dv", "name": "Dee", "coins": 10}]
    await wait_until(lambda: _received(host, 1), timeout=20)
    assert (await v.wallet())["coins"] == 90
    await host.close()
    await v.close()


def _gift_events(client: Client, gift_id: str) -> int:
    return sum(e.get("type") == "gift" and e.get("gift_id") == gift_id for e in client.events)


async def test_room_publish_shows_a_gift_once_and_not_past_the_republish_window(redis_url: str) -> None:
    """room_publish.lua, called as retries call it: the first call publishes, a repeat writes
    nothing, and a gift debited before the window is not published late."""
    redis = Redis.from_url(redis_url)
    scripts = Scripts()
    await scripts.load(redis)
    rooms = Rooms(redis, ScriptBatcher(redis, scripts), Settings(republish_window_s=60))
    room = "pubonce-" + os.urandom(4).hex()
    await rooms.create(room, "host", "Host", "t")
    now = int(time.time() * 1000)

    def event(gift_id: str, at: int) -> dict[str, Any]:
        return {"type": "gift", "gift_id": gift_id, "from": {"id": "u", "name": "U"}, "gift": "rose", "count": 1,
                "coins": 1, "ts": at}

    first = await rooms.publish_gift_later(room, event("g1-1", now), now)
    again = await asyncio.gather(*(rooms.publish_gift_later(room, event("g1-1", now), now) for _ in range(3)))
    assert first[2] == 0 and all(a == [None, 0, 1] for a in again), (first, again)
    stale = now - 61_000
    assert await rooms.publish_gift_later(room, event("g1-2", stale), stale) == [None, 0, 2]
    # A late publish, into an earlier minute's record, gives that record its expiry (the current
    # minute's gets it from the presence tick: tests/test_rooms.py).
    late = now - now % 60_000 - 1  # the previous minute's last ms: at most 60 s ago, inside the window
    assert (await rooms.publish_gift_later(room, event("g1-3", late), late))[2] == 0
    assert 0 < await redis.pttl(RoomKeys(room).published(late)) <= (60 + 120) * 1000
    state = await rooms.get(room)
    assert state is not None and (state.coins_total, state.gifts_total) == (2, 2)
    assert await redis.xlen(RoomKeys(room).events) == 2
    await redis.aclose()
