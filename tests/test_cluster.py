"""Cluster mode on a real local Valkey Cluster: 3 primaries with a replica each (conftest's
`cluster`, as `giftstream dev-cluster` starts it), gateways and settlers as users run them."""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
import signal
import sqlite3
import string
import subprocess
import sys
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis
import redis.cluster

from server import devcluster
from server.batcher import ScriptBatcher
from server.cluster import is_cluster, parse, slot_of
from server.clusterpipe import ClusterPipe
from server.devcluster import LocalCluster
from server.keys import PREFIX, RoomKeys, UserKeys, partition_tag
from server.node import redis_client
from server.rooms.goals import Goals
from server.rooms.hub import Hub
from server.rooms.presence import Presence
from server.rooms.state import Rooms
from server.scripts import SCRIPTS, Scripts
from server.settings import Settings
from server.wallet.service import GiftOrder, Wallet
from tests.support import FAST, ROOT, SECRET, Api, Client, ServerProc, join, run_cli, token, wait_until

pytestmark = pytest.mark.timeout(120)

ENV = {**FAST, "GIFTSTREAM_PRESENCE_INTERVAL_S": "0.2"}


@pytest.fixture
def cluster_url(cluster: LocalCluster) -> str:
    """The session cluster, flushed for this test (every primary)."""
    client = redis.cluster.RedisCluster(host="127.0.0.1", port=cluster.nodes[0].port)
    client.flushall()
    client.close()
    return cluster.url


@pytest.fixture
def cserver(make_server: Callable[..., ServerProc], cluster_url: str) -> ServerProc:
    return make_server(redis_url=cluster_url, env=ENV).start()


@pytest.fixture
async def api(cserver: ServerProc) -> AsyncIterator[Callable[..., Api]]:
    clients: list[Api] = []

    def make(user_id: str, role: str = "viewer") -> Api:
        client = Api(cserver, token(user_id, role))
        clients.append(client)
        return client

    yield make
    for c in clients:
        await c.close()


def test_cluster_urls_name_every_node_with_the_urls_credentials() -> None:
    nodes = parse("rediss+cluster://app:s%40cret@10.0.0.1:7000,10.0.0.2:7001/0")
    assert [(n.host, n.port, n.username, n.password, n.tls) for n in nodes] == [
        ("10.0.0.1", 7000, "app", "s@cret", True), ("10.0.0.2", 7001, "app", "s@cret", True)]
    assert is_cluster("redis+cluster://h:1") and not is_cluster("redis://h:1/0")
    with pytest.raises(ValueError):
        parse("redis+cluster://h:1/3")


def _key_fields(keys: UserKeys | RoomKeys) -> list[str]:
    """Every key name a UserKeys or RoomKeys holds (whatever keys.py adds later)."""
    values = (getattr(keys, name) for name in type(keys).__slots__)
    return [v for v in values if isinstance(v, str) and v.startswith(PREFIX + ":")]


def test_dev_cluster_prints_its_url_and_comes_back_with_its_data(tmp_path: Path) -> None:
    def start() -> tuple[subprocess.Popen[str], str]:
        proc = subprocess.Popen([sys.executable, "-m", "server.cli", "dev-cluster", "--primaries", "3",
                                 "--replicas", "0", "--data-dir", str(tmp_path)], cwd=ROOT, text=True,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        assert proc.stdout is not None
        for line in proc.stdout:
            if line.strip().startswith("export GIFTSTREAM_REDIS_URL="):
                return proc, line.strip().split("=", 1)[1]
        raise AssertionError(f"dev-cluster exited with {proc.wait()} without a URL")

    proc, url = start()
    try:
        nodes = parse(url)
        assert len(nodes) == 3 and all(n.port < 55536 for n in nodes)
        client = redis.cluster.RedisCluster(host=nodes[0].host, port=nodes[0].port)
        assert client.cluster_info()["cluster_state"] == "ok"  # type: ignore[no-untyped-call]
        client.set("{dev}kept", "1")
        client.close()
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0
    with pytest.raises(redis.ConnectionError):
        redis.Redis(host=nodes[0].host, port=nodes[0].port, retry=None).ping()
    proc, again = start()
    try:
        assert again == url
        client = redis.cluster.RedisCluster(host=nodes[0].host, port=nodes[0].port)
        assert client.get("{dev}kept") == b"1"
        client.close()
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0


class _Recording(ScriptBatcher):
    """The real batcher, noting each script call's keys."""

    seen: list[tuple[str, list[str]]]

    def call(self, name: str, keys: list[str], args: list[Any]) -> asyncio.Future[Any]:
        self.seen.append((name, list(keys)))
        return super().call(name, keys, args)


async def test_every_scripts_keys_share_one_slot(cluster_url: str) -> None:
    """For random users and rooms: every key of a user or room has its tag's slot, and every Lua
    call the code makes (each script at least once, run on the cluster) names keys of one slot."""
    rnd = random.Random(14)

    def name() -> str:
        return "".join(rnd.choices(string.ascii_letters + string.digits + ":-_.", k=rnd.randint(1, 24)))

    for _ in range(200):
        user, room = name(), name().replace("}", "")
        u, r = UserKeys(user, 16), RoomKeys(room)
        user_keys = [*_key_fields(u), u.done("g")]
        room_keys = [*_key_fields(r), r.published(rnd.randint(0, 2**41))]
        assert len(user_keys) >= 5 and len(room_keys) >= 8
        assert {slot_of(k) for k in user_keys} == {slot_of(partition_tag(u.partition)[1:-1])}
        assert {slot_of(k) for k in room_keys} == {slot_of("r:" + room)}

    settings = Settings(partitions=16)
    client = redis_client(cluster_url, decode=True)
    client_bin = redis_client(cluster_url, decode=False)
    scripts = Scripts(sharded_pubsub=True)
    await scripts.load(client)
    batcher = _Recording(client, scripts)
    batcher.seen = []
    try:
        wallet = Wallet(client, batcher, settings)
        rooms = Rooms(client_bin, batcher, settings)
        for i in range(6):
            user, room = f"{name()}{i}", f"room{i}{name().replace('}', '')}"[:60]
            await rooms.create(room, "h", "H", "t")
            await wallet.credit(user, f"o{i}", 100)
            order = GiftOrder(f"g{i}", user, "U", "h", room, "rose", 1, 1)
            debit = await wallet.send_gift(order)
            assert await wallet.replay(order) is not None
            await wallet.adjust(user, f"adj{i}", 5, "test")
            await wallet.set_monthly_budget(user, 1000)
            await rooms.publish_gift_later(room, {"type": "gift", "gift_id": debit.gift_id, "from": {"id": user,
                                           "name": "U"}, "gift": "rose", "count": 1, "coins": 1, "ts": debit.debit_ms},
                                           debit.debit_ms)
            presence = Presence(client, Hub(20), rooms, "n1", 1.0)
            await presence.room_view(room)
            await presence.announce(room)
            goals = Goals(batcher, settings)
            await goals.set(room, None, 10)
            await goals.clear(room)
            await rooms.end(room)
    finally:
        await batcher.pipe.aclose()
        await client.aclose()
        await client_bin.aclose()
    assert {n for n, _ in batcher.seen} == set(SCRIPTS), "a script is not exercised here: add its call"
    for script, keys in batcher.seen:
        assert len({slot_of(k) for k in keys}) == 1, (script, keys)


async def test_the_lean_pipeline_follows_ask_and_moved_and_gives_up_on_tryagain(cluster_url: str,
                                                                                 cluster: LocalCluster) -> None:
    pipe = ClusterPipe(cluster_url)
    a, b, slot = "{pipe-test}a", "{pipe-test}b", slot_of("pipe-test")
    assert await pipe.execute([["SET", a, "1"], ["SET", b, "2"]]) == [b"OK", b"OK"]
    source = cluster.node(devcluster.owner_port(cluster, slot))
    target = cluster.node(next(p for p in devcluster.primary_ports(cluster) if p != source.port))
    target_id = target.command("CLUSTER", "MYID")
    target.command("CLUSTER", "SETSLOT", slot, "IMPORTING", source.command("CLUSTER", "MYID"))
    source.command("CLUSTER", "SETSLOT", slot, "MIGRATING", target_id)
    source.command("MIGRATE", "127.0.0.1", target.port, "", 0, 5000, "KEYS", a)
    try:
        # mid-migration: `a` is on the target (ASK), `b` still on the source; a script of both
        # gets TRYAGAIN until the move is done, and is answered unavailable after a few waits
        replies = await pipe.execute([["GET", a], ["GET", b],
                                      ["EVAL", "return redis.call('MGET', KEYS[1], KEYS[2])", 2, a, b]])
        assert replies[:2] == [b"1", b"2"] and isinstance(replies[2], ConnectionError), replies
        assert pipe.redirects == 1
    finally:
        source.command("MIGRATE", "127.0.0.1", target.port, "", 0, 5000, "KEYS", b)
        for n in [target, source] + [cluster.node(p) for p in devcluster.primary_ports(cluster)]:
            n.command("CLUSTER", "SETSLOT", slot, "NODE", target_id)
    # the pipeline's map still names the source: MOVED, followed, and the map learns it
    assert await pipe.execute([["GET", a], ["GET", b]]) == [b"1", b"2"]
    assert pipe.redirects == 3 and pipe.map.owner(slot).port == target.port
    assert await pipe.execute([["GET", a]]) == [b"1"] and pipe.redirects == 3
    await pipe.aclose()


async def test_round_trip_on_a_cluster(cserver: ServerProc, api: Callable[..., Api]) -> None:
    host, alice = api("chost1", "host"), api("calice")
    r = await alice.recharge(package_id="coins_65", key="r1")
    assert r.status_code == 201 and r.json()["balance"] == 65
    room = await host.create_room()
    async with join(cserver, room, host.token, "giftstream.json") as h, \
            join(cserver, room, token("cbob")) as bob, join(cserver, room, alice.token) as a:
        await a.gift("g-1", "rose", 5)
        ack = await a.reply("g-1")
        assert ack["type"] == "ack" and ack["balance"] == 60 and ack["gift_id"]
        for client in (h, bob, a):
            [event] = await client.wait_events(1)
            assert event["gift_id"] == ack["gift_id"] and (event["gift"], event["count"]) == ("rose", 5)
    await wait_until(lambda: _received(host, 1), timeout=10)
    assert (await host.earnings())["diamond_units"] == 25_000
    assert (await alice.wallet())["coins"] == 60
    # rebuild-wallets and requeue on the cluster: a wallet Redis got wrong is recomputed from the ledger
    wallet_key = UserKeys("calice", 16).wallet
    client = redis.cluster.RedisCluster.from_url(f"redis://{cserver.redis_url.split('//')[1].split(',')[0]}")
    try:
        client.hset(wallet_key, "coins", 999)
        url = ["--redis-url", cserver.redis_url, "--data-dir", str(cserver.data_dir)]
        result = run_cli("rebuild-wallets", *url)
        assert result.returncode == 0 and json.loads(result.stdout)["changed"] == 1, result.stdout + result.stderr
        assert client.hget(wallet_key, "coins") == b"60"
    finally:
        client.close()
    result = run_cli("settle", "--requeue", *url)
    assert result.returncode == 0 and "moved 0 quarantined movements" in result.stdout, result.stderr
    _audit(cserver)


async def _received(host: Api, n: int) -> bool:
    return int((await host.earnings())["gifts_received"]) >= n


async def test_no_overdraft_and_one_charge_per_id_on_a_cluster(cserver: ServerProc, api: Callable[..., Api]) -> None:
    host, payer = api("chost2", "host"), api("cpayer")
    assert (await payer.recharge(coins=100)).status_code == 201
    room = await host.create_room()
    async with contextlib.AsyncExitStack() as stack:
        socks = [await stack.enter_async_context(join(cserver, room, payer.token)) for _ in range(8)]
        await asyncio.gather(*(socks[i % 8].gift(f"c-{i}") for i in range(200)))
        replies = [await socks[i % 8].reply(f"c-{i}") for i in range(200)]
        # the same ids again, from other sockets: replayed, never charged twice
        await asyncio.gather(*(socks[(i + 1) % 8].gift(f"c-{i}") for i in range(20)))
        again = [await socks[(i + 1) % 8].reply(f"c-{i}") for i in range(20)]
    acks = [r for r in replies if r["type"] == "ack"]
    assert len(acks) == 100 and {r["code"] for r in replies if r["type"] == "error"} == {"insufficient_funds"}
    first = {r["id"]: r for r in replies}
    for r in again:
        if first[r["id"]]["type"] == "ack":
            assert r["type"] == "ack" and r["replayed"] is True and r["gift_id"] == first[r["id"]]["gift_id"]
    assert (await payer.wallet())["coins"] == 0


async def test_resume_and_two_gateways_share_a_room(make_server: Callable[..., ServerProc], cserver: ServerProc,
                                                    api: Callable[..., Api]) -> None:
    other = make_server(data_dir=cserver.data_dir.parent / "b", redis_url=cserver.redis_url, env=ENV,
                        database_url=f"sqlite:///{cserver.data_dir / 'giftstream.sqlite3'}").start()
    host, sender = api("chost3", "host"), api("csender")
    await sender.recharge(coins=500)
    room = await host.create_room()
    async with join(cserver, room, sender.token) as s, join(other, room, token("cwatch")) as w:
        ids = [f"a{i}" for i in range(5)]
        await _send(s, ids)
        seen = await w.wait_events(5)  # sent on one gateway, seen on the other
        last, epoch = seen[-1]["offset"], w.welcome["epoch"]
        await w.until(lambda: any(m.get("type") == "presence" and m.get("viewers") == 2 for m in w.events))
    async with join(cserver, room, sender.token) as s:
        missed = await _send(s, [f"b{i}" for i in range(30)])
    async with join(other, room, token("cwatch")) as w:
        # a balance change made through one gateway reaches the user's socket on the other
        watcher = api("cwatch")
        assert (await watcher.recharge(coins=100)).status_code == 201
        await w.until(lambda: any(m["type"] == "wallet" and m["change"] == 100 for m in w.other))
        await w.send({"type": "resume", "since": last, "epoch": epoch})
        await w.wait_events(30)
        await w.drain(0.3)
        gifts = [e["gift_id"] for e in w.events if e["type"] == "gift"]
    assert sorted(gifts) == sorted(m["gift_id"] for m in missed)


async def _send(client: Client, ids: list[str], gift: str = "rose") -> list[dict[str, Any]]:
    for gid in ids:
        await client.gift(gid, gift)
    replies = [await client.reply(gid) for gid in ids]
    assert all(r["type"] == "ack" for r in replies), replies[:3]
    return replies


class Storm:
    """Senders gifting in windows of 10, resending what was answered `unavailable` with the same
    id until it is acked (as a client does through a failover or a slot move), at least
    `per_user` gifts each and on until the disturbance is over (at most MAX_GIFTS each)."""

    MAX_GIFTS = 900

    def __init__(self, server: ServerProc, room: str, users: list[str], per_user: int) -> None:
        self.server, self.room, self.users, self.per_user = server, room, users, per_user
        self.acks: dict[str, dict[str, Any]] = {}
        self.sent: dict[str, int] = {}
        self.unavailable = 0
        self.started = asyncio.Event()
        self.calm = asyncio.Event()

    async def run(self) -> None:
        await asyncio.gather(*(self._user(u) for u in self.users))

    async def _user(self, user: str) -> None:
        async with join(self.server, self.room, token(user)) as c:
            n = 0
            while n < self.MAX_GIFTS and (n < self.per_user or not self.calm.is_set()):
                pending = [f"{user}-{i}" for i in range(n, n + 10)]
                n += 10
                while pending:
                    for gid in pending:
                        c.replies.pop(gid, None)
                        await c.gift(gid)
                    again = []
                    for gid in pending:
                        reply = await c.reply(gid, timeout=30)
                        if reply["type"] == "ack":
                            assert gid not in self.acks or self.acks[gid]["gift_id"] == reply["gift_id"]
                            self.acks[gid] = reply
                        else:
                            assert reply["code"] == "unavailable", reply
                            self.unavailable += 1
                            again.append(gid)
                    pending = again
                    if again:
                        await asyncio.sleep(0.1)
                self.started.set()
            self.sent[user] = n


async def _storm_with(server: ServerProc, api: Callable[..., Api], users: list[str], per_user: int,
                      disturb: Callable[[str], Any]) -> Storm:
    host = api(f"h-{users[0]}", "host")
    for u in users:
        assert (await api(u).recharge(coins=1000)).status_code == 201
    room = await host.create_room()
    storm = Storm(server, room, users, per_user)
    async with join(server, room, token("watcher")) as watcher:
        task = asyncio.ensure_future(storm.run())
        await asyncio.wait_for(storm.started.wait(), 30)
        try:
            await asyncio.to_thread(disturb, room)
        finally:
            storm.calm.set()
        await task
        await watcher.wait_events(len(storm.acks), timeout=30)
        await watcher.drain(0.5)
    assert len(storm.acks) == sum(storm.sent.values()) and not task.exception()
    gifts = [e["gift_id"] for e in watcher.events if e["type"] == "gift"]
    # every acknowledged gift shown once, nothing else shown
    assert sorted(gifts) == sorted(r["gift_id"] for r in storm.acks.values())
    for u in users:  # each charged once: one coin per gift id
        assert (await api(u).wallet())["coins"] == 1000 - storm.sent[u]
    await wait_until(lambda: _received(host, len(storm.acks)), timeout=30)
    return storm


def _audit(server: ServerProc) -> None:
    result = run_cli("audit", "--redis-url", server.redis_url or "", "--data-dir", str(server.data_dir))
    assert result.returncode == 0 and "audit ok" in result.stdout, result.stdout + result.stderr


async def test_a_slot_move_of_a_room_and_a_partition_mid_storm_loses_and_doubles_nothing(
        cserver: ServerProc, api: Callable[..., Api], cluster: LocalCluster) -> None:
    users = [f"mv{i}" for i in range(4)]
    moved: list[int] = []

    def reshard(room: str) -> None:
        for slot in (slot_of("r:" + room), slot_of(partition_tag(UserKeys(users[0], 16).partition)[1:-1])):
            here = devcluster.owner_port(cluster, slot)
            there = next(p for p in devcluster.primary_ports(cluster) if p != here)
            moved.append(devcluster.migrate_slot(cluster, slot, there, batch=5, pause_s=0.05))

    await _storm_with(cserver, api, users, 150, reshard)
    assert all(moved), moved  # both slots held keys, moved while gifts flowed
    figures = await _metrics(cserver)
    # the gateway was sent on (MOVED or ASK), and its room subscription followed the room's slot
    assert figures["giftstream_cluster_redirects_total"] > 0 and figures["giftstream_bus_reconnects_total"] > 0
    _audit(cserver)


async def _metrics(server: ServerProc) -> dict[str, float]:
    async with httpx.AsyncClient() as client:
        text = (await client.get(server.base + "/metrics")).text
    return {line.split()[0]: float(line.split()[1]) for line in text.splitlines()
            if line.startswith("giftstream_") and " " in line}


async def test_a_failover_mid_storm_charges_each_gift_once(cserver: ServerProc, api: Callable[..., Api],
                                                           cluster: LocalCluster) -> None:
    users = [f"fo{i}" for i in range(4)]
    failed_over: list[int] = []

    def fail_over(room: str) -> None:
        """The primaries of the room's slot and of a sender's partition (one or two), in turn."""
        for slot in (slot_of("r:" + room), slot_of(partition_tag(UserKeys(users[0], 16).partition)[1:-1])):
            port = devcluster.owner_port(cluster, slot)
            if port not in failed_over:
                failed_over.append(port)
        for port in failed_over:
            devcluster.failover(cluster, port)

    await _storm_with(cserver, api, users, 150, fail_over)
    figures = await _metrics(cserver)
    assert failed_over and not set(failed_over) & set(devcluster.primary_ports(cluster))
    # the room's subscription moved to the promoted replica, and the Lua pipeline followed the slots
    assert figures["giftstream_bus_reconnects_total"] > 0 and figures["giftstream_cluster_slot_map_reads_total"] > 1
    _audit(cserver)


async def test_a_primary_killed_mid_storm_fails_over_and_charges_each_gift_once(
        cserver: ServerProc, api: Callable[..., Api], cluster: LocalCluster) -> None:
    """kill -9 of the primary of a sender's partition: its gifts in flight are answered
    `unavailable` until the replica takes over, and succeed on retry with the same id; every
    acknowledged debit was on the replica before its ack (WAIT), so none is lost or doubled."""
    users = [f"k9{i}" for i in range(4)]
    killed: list[int] = []

    def kill(_room: str) -> None:
        port = devcluster.owner_port(cluster, slot_of(partition_tag(UserKeys(users[0], 16).partition)[1:-1]))
        killed.append(port)
        devcluster.kill_primary(cluster, port)

    storm = await _storm_with(cserver, api, users, 150, kill)
    assert killed and killed[0] not in devcluster.primary_ports(cluster)
    assert storm.unavailable > 0  # the storm did run into the dead primary
    _audit(cserver)


def _settler(data_dir: Path, url: str, name: str) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, "-m", "server.cli", "settle", "--redis-url", url, "--data-dir",
                             str(data_dir), "--consumer", name], cwd=ROOT, text=True, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, env={**__import__("os").environ, "GIFTSTREAM_SECRET": SECRET})


@pytest.fixture
def settlers() -> Iterator[list[subprocess.Popen[str]]]:
    procs: list[subprocess.Popen[str]] = []
    yield procs
    for p in procs:
        if p.poll() is None:
            p.kill()
            p.wait()


async def test_settlers_share_every_shards_outboxes_and_settle_each_movement_once(
        make_server: Callable[..., ServerProc], cluster_url: str, settlers: list[subprocess.Popen[str]]) -> None:
    server = make_server(redis_url=cluster_url, env=ENV, args=["--no-settler"]).start()
    settlers += [_settler(server.data_dir, cluster_url, f"s{i}") for i in range(2)]
    for p in settlers:  # both reading before any movement is made
        assert p.stdout is not None
        await asyncio.to_thread(lambda out=p.stdout: next(line for line in out if "running" in line))
    users = [f"st{i}" for i in range(12)]
    # the senders' partitions live on every shard
    owners = {devcluster_owner(cluster_url, UserKeys(u, 16).partition) for u in users}
    assert len(owners) == 3
    host = Api(server, token("h-settle", "host"))
    try:
        for u in users:
            a = Api(server, token(u))
            assert (await a.recharge(coins=100)).status_code == 201
            await a.close()
        room = await host.create_room()
        async with contextlib.AsyncExitStack() as stack:
            socks = [await stack.enter_async_context(join(server, room, token(u))) for u in users]
            for start in range(0, 20, 5):  # in rounds, longer apart than a settler's linger
                await asyncio.gather(*(_send(s, [f"{u}-{i}" for i in range(start, start + 5)])
                                       for s, u in zip(socks, users, strict=True)))
                await asyncio.sleep(0.3)
        await wait_until(lambda: _received(host, 240), timeout=30)
    finally:
        await host.close()
    outs = []
    for p in settlers:
        p.send_signal(signal.SIGTERM)
        outs.append(p.communicate(timeout=30)[0])
    counts = [int(out.rsplit("settled ", 1)[1].split()[0]) for out in outs]
    # 12 credits and 240 gifts, each settled by one of the two settlers
    assert sum(counts) == 252 and all(counts), outs
    with sqlite3.connect(server.data_dir / "giftstream.sqlite3") as db:
        assert db.execute("SELECT COUNT(*) FROM gifts").fetchone()[0] == 240
    _audit(server)


def devcluster_owner(url: str, partition: int) -> str:
    """The address of the primary serving a partition's slot."""
    first = parse(url)[0]
    client = redis.Redis(host=first.host, port=first.port, decode_responses=True)
    slot = slot_of(partition_tag(partition)[1:-1])
    for low, high, primary, *_ in client.execute_command("CLUSTER", "SLOTS"):  # type: ignore[no-untyped-call]
        if int(low) <= slot <= int(high):
            return f"{primary[0]}:{primary[1]}"
    raise AssertionError(f"no owner for slot {slot}")
