"""kill -9 of the embedded valkey mid-storm: `serve` starts it again from its AOF, and the
clients' retries with the same ids charge every gift once."""

from __future__ import annotations

import asyncio
import json
import os
import signal
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest
import websockets

from tests.support import FAST, Api, ServerProc, join, run_cli, token, wait_until

pytestmark = pytest.mark.timeout(180)

GIFTS_EACH = 150


def _valkey_pid(data_dir: Path) -> int:
    return int(json.loads((data_dir / "valkey.json").read_text())["pid"])


def _healthy(server: ServerProc) -> bool:
    try:
        return httpx.get(server.base + "/healthz", timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


async def _received(host: Api, n: int) -> bool:
    return bool((await host.earnings())["gifts_received"] >= n)


async def test_kill9_of_the_embedded_valkey_mid_storm_is_restarted_and_charges_each_gift_once(
        make_server: Callable[..., ServerProc], tmp_path: Path) -> None:
    data = tmp_path / "var"
    server = make_server(data, env=FAST).start()
    host = Api(server, token("vh", "host"))
    room = await host.create_room()
    senders = [f"vk{i}" for i in range(4)]
    for s in senders:
        assert (await Api(server, token(s)).recharge(coins=1000, key="first")).status_code == 201
    acked: dict[str, dict[str, str]] = {s: {} for s in senders}
    retried = 0

    async def gifter(sender: str) -> None:
        """A client that retries each gift with its id until it is acknowledged, reconnecting
        when its socket closes (1013 while Redis is down, or a dropped connection)."""
        nonlocal retried
        todo = [f"{sender}-{i}" for i in range(GIFTS_EACH)]
        while todo:
            try:
                async with join(server, room, token(sender)) as c:
                    while todo:
                        gid = todo[0]
                        await c.gift(gid, "rose", 1)
                        reply = await c.reply(gid, timeout=10)
                        del c.replies[gid]
                        if reply["type"] == "ack":
                            acked[sender][gid] = reply["gift_id"]
                            todo.pop(0)
                        else:
                            assert reply["code"] == "unavailable", reply
                            retried += 1
                            await asyncio.sleep(0.05)  # the client's own retry pacing
            except (websockets.ConnectionClosed, websockets.InvalidStatus, OSError, TimeoutError):
                if not todo:
                    raise
                retried += 1
                await asyncio.sleep(0.1)

    tasks = [asyncio.create_task(gifter(s)) for s in senders]
    await wait_until(lambda: sum(len(a) for a in acked.values()) >= 100, timeout=60, interval=0.01)
    killed = _valkey_pid(data)
    os.kill(killed, signal.SIGKILL)
    acked_at_kill = sum(len(a) for a in acked.values())
    await asyncio.wait_for(asyncio.gather(*tasks), 120)
    assert acked_at_kill < len(senders) * GIFTS_EACH, "the kill must land mid-storm"
    assert retried > 0, "the clients must have seen the outage"

    restarted = _valkey_pid(data)
    assert restarted != killed
    await wait_until(lambda: _healthy(server), timeout=30)
    log = server.log.read_text()
    assert log.count("embedded valkey failing") == 1, log[-3000:]
    assert "embedded valkey working again" in log

    total = len(senders) * GIFTS_EACH
    for s in senders:
        assert len(acked[s]) == GIFTS_EACH
        assert (await Api(server, token(s)).wallet())["coins"] == 1000 - GIFTS_EACH, s
    await wait_until(lambda: _received(host, total), timeout=60)
    earnings = await host.earnings()
    assert earnings["gifts_received"] == total
    result = run_cli("audit", "--json", "--data-dir", str(data))
    assert result.returncode == 0, result.stdout + result.stderr
    assert json.loads(result.stdout)["totals"]["movements"] == len(senders) + total

    # serve still owns the restarted valkey: SIGTERM stops it.
    assert server.terminate() in (0, -signal.SIGTERM)
    assert not (data / "valkey.json").exists()
    await wait_until(lambda: not _alive(restarted), timeout=10)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
        return True
    except ProcessLookupError:
        return False
