"""Settlement against both ledgers: standalone settlers, a settler killed mid-batch, metrics."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from tests.support import FAST, ROOT, SECRET, Api, ServerProc, join, run_cli, token, wait_until


def _settler(redis_url: str, database_url: str, data_dir: Path, name: str) -> subprocess.Popen[bytes]:
    env = {**os.environ, "GIFTSTREAM_SECRET": SECRET, "GIFTSTREAM_SETTLE_CLAIM_IDLE_MS": "1500",
           "GIFTSTREAM_SETTLE_BATCH": "200"}
    return subprocess.Popen([sys.executable, "-m", "server.cli", "settle", "--redis-url", redis_url,
                             "--database-url", database_url, "--data-dir", str(data_dir), "--consumer", name],
                            cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


async def _storm(server: ServerProc, room: str, senders: list[str], per_sender: int) -> int:
    async def one(sender: str) -> int:
        async with join(server, room, token(sender)) as c:
            acked = 0
            for start in range(0, per_sender, 200):
                ids = [f"{sender}-{i}" for i in range(start, min(per_sender, start + 200))]
                for gid in ids:
                    await c.gift(gid, "rose", 1)
                for gid in ids:
                    acked += (await c.reply(gid))["type"] == "ack"
            return acked

    return sum(await asyncio.gather(*(one(s) for s in senders)))


async def _earnings(server: ServerProc, host: str) -> dict[str, Any]:
    api = Api(server, token(host, "host"))
    try:
        return await api.earnings()
    finally:
        await api.close()


async def test_killed_settler_loses_and_duplicates_nothing(make_server: Callable[..., ServerProc], redis_url: str,
                                                           database_url: str, tmp_path: Path) -> None:
    # The gateway settles nothing itself: two standalone settlers share the work.
    server = make_server(redis_url=redis_url, database_url=database_url,
                         env={**FAST, "GIFTSTREAM_SETTLER": "0"}).start()
    host = Api(server, token("sh", "host"))
    room = await host.create_room()
    senders = [f"ss{i}" for i in range(4)]
    for s in senders:
        api = Api(server, token(s))
        await api.recharge(coins=5000)
        await api.close()
    acked = await _storm(server, room, senders, 1500)
    assert acked == 6000
    doomed = _settler(redis_url, database_url, tmp_path, "doomed")
    # kill it mid-way: some gifts settled, many still pending on it
    await wait_until(lambda: _received_between(server, 1, 5999), timeout=30, interval=0.02)
    doomed.send_signal(signal.SIGKILL)
    doomed.wait()
    mid = (await _earnings(server, "sh"))["gifts_received"]
    assert 0 < mid < 6000
    rescuer = _settler(redis_url, database_url, tmp_path, "rescuer")
    try:
        await wait_until(lambda: _received_between(server, 6000, 6000), timeout=60)
    finally:
        rescuer.send_signal(signal.SIGTERM)
        assert rescuer.wait(30) == 0
    earnings = await _earnings(server, "sh")
    assert earnings["gifts_received"] == 6000 and earnings["diamond_units"] == 6000 * 5000
    result = run_cli("audit", "--json", "--redis-url", redis_url, "--database-url", database_url,
                     "--data-dir", str(tmp_path))
    assert result.returncode == 0, result.stdout + result.stderr
    report = json.loads(result.stdout)
    assert report["totals"]["unsettled"] == 0 and report["diamonds"]["gifts"] == 6000
    await host.close()


async def _received_between(server: ServerProc, lo: int, hi: int) -> bool:
    n: int = (await _earnings(server, "sh"))["gifts_received"]
    return lo <= n <= hi


async def test_metrics_expose_outbox_lag_and_settle_rate(make_server: Callable[..., ServerProc],
                                                          redis_url: str, database_url: str) -> None:
    server = make_server(redis_url=redis_url, database_url=database_url,
                         env={**FAST, "GIFTSTREAM_SETTLER": "0"}).start()
    host = Api(server, token("mh", "host"))
    room = await host.create_room()
    api = Api(server, token("mv"))
    await api.recharge(coins=100)
    await _storm(server, room, ["mv"], 40)
    text = (await api.client.get("/metrics")).text
    assert "giftstream_outbox_entries 41" in text  # 1 credit + 40 gifts, none settled
    health = (await api.client.get("/healthz")).json()
    assert health["outbox_entries"] == 41 and health["outbox_lag_ms"] > 0
    await api.close()
    await host.close()


async def test_rebuild_wallets_reproduces_live_balances(make_server: Callable[..., ServerProc], redis_url: str,
                                                        database_url: str, tmp_path: Path) -> None:
    import redis as redis_sync

    from server.keys import UserKeys

    server = make_server(redis_url=redis_url, database_url=database_url, env=FAST).start()
    host = Api(server, token("rbh", "host"))
    room = await host.create_room()
    users = [f"rb{i}" for i in range(5)]
    for i, u in enumerate(users):
        api = Api(server, token(u))
        await api.recharge(coins=100 + i)
        await api.close()
    await _storm(server, room, users, 37)
    before = {}
    for u in users:
        api = Api(server, token(u))
        before[u] = (await api.wallet())["coins"]
        await api.close()
    assert before == {u: 100 + i - 37 for i, u in enumerate(users)}
    # Disaster: two wallets lost, one corrupted (part of the outbox may still be unsettled).
    r = redis_sync.Redis.from_url(redis_url, decode_responses=True)
    r.delete(UserKeys("rb0", 16).wallet, UserKeys("rb1", 16).wallet)
    r.hset(UserKeys("rb2", 16).wallet, mapping={"coins": 999_999, "credited": 999_999})
    args = ["--redis-url", redis_url, "--database-url", database_url, "--data-dir", str(tmp_path)]
    assert run_cli("audit", *args).returncode == 1
    result = run_cli("rebuild-wallets", *args)
    assert result.returncode == 0, result.stdout + result.stderr
    for u in users:
        api = Api(server, token(u))
        assert (await api.wallet())["coins"] == before[u], u
        await api.close()
    audit = run_cli("audit", *args)
    assert audit.returncode == 0, audit.stdout + audit.stderr
    await host.close()


async def test_control_characters_from_a_client_or_a_token_never_stop_settlement(
        make_server: Callable[..., ServerProc], redis_url: str, database_url: str) -> None:
    """PostgreSQL text cannot hold NUL: a gift id or a display name carrying one must not reach the
    ledger, where its batch would fail forever and hold every later gift back. The id is refused
    at the socket; the name is cleaned when the token is read."""
    server = make_server(redis_url=redis_url, database_url=database_url).start()
    host = Api(server, token("nh", "host"))
    sender_token = token("ns", name="Nul\x00 and\x07 bell\u200b")
    sender = Api(server, sender_token)
    assert (await sender.recharge(coins=100)).status_code == 201
    room = await host.create_room()
    async with join(server, room, sender_token) as c:
        await c.send({"type": "gift", "id": "bad\x00id", "gift": "rose", "count": 1})
        refused = await c.recv()
        while refused["type"] not in ("error", "ack"):
            refused = await c.recv()
        assert (refused["type"], refused.get("code")) == ("error", "bad_request"), refused
        await c.gift("good-1")
        ack = await c.reply("good-1")
        assert ack["type"] == "ack", ack
        events = [e async for e in _events_until(c, ack["gift_id"])]
        # Format characters go too (a zero-width space here): see protocol.plain.
        assert events[-1]["from"] == {"id": "ns", "name": "Nul and bell"}
    await wait_until(lambda: _received_one(host), timeout=20)
    assert (await sender.wallet())["coins"] == 99
    await host.close()
    await sender.close()


async def _events_until(client: Any, gift_id: str) -> Any:
    while True:
        await client.recv()
        for e in client.events:
            if e.get("gift_id") == gift_id:
                yield e
                return


async def _received_one(host: Api) -> bool:
    return bool((await host.earnings())["gifts_received"] == 1)


def test_settle_requeue_runs_once_and_exits(redis_url: str, tmp_path: Path) -> None:
    (tmp_path / "var").mkdir()  # a data dir a serve made: tools refuse a missing one
    result = run_cli("settle", "--requeue", "--redis-url", redis_url, "--data-dir", str(tmp_path / "var"))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "moved 0 quarantined movements back to the outbox" in result.stdout
