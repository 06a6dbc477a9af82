"""`giftstream rebuild-wallets`: wallets recomputed from the ledger plus the unsettled outbox."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from redis.asyncio import Redis

from server.keys import UserKeys, outbox_key, totals_key
from server.settlement.audit import run_audit
from server.settlement.rebuild import _write_partition, rebuild_wallets
from server.settlement.settler import Settler, ensure_groups, outbox_lag
from server.wallet.service import GiftOrder, Wallet
from tests.ledger import PARTITIONS, Backend, make_traffic, wallets

# The fixtures: backend, redis, wallet, ...
pytest_plugins = ["tests.ledger_fixtures"]
pytestmark = pytest.mark.timeout(120)


async def test_rebuild_wallets_restores_balances_exactly(backend: Backend, redis: Redis,
                                                         wallet: Wallet) -> None:
    users = [f"user-{i}" for i in range(12)]
    await make_traffic(wallet, users)
    kept = GiftOrder(client_id="kept", sender_id=users[0], sender_name="zero", host_id="host-0",
                     room_id="room-1", gift="rose", count=2, unit_coins=5)
    first = await wallet.send_gift(kept)
    settler = Settler(redis, backend.store, partitions=PARTITIONS, consumer="test", max_batch=64)
    assert await settler.settle_once(block_ms=None) > 0  # part settled, part still in the outbox
    assert (await outbox_lag(redis, PARTITIONS))["outbox_entries"] > 0
    original = await wallets(redis, users)

    await redis.delete(UserKeys(users[0], PARTITIONS).wallet)
    await redis.hset(UserKeys(users[1], PARTITIONS).wallet, mapping={"coins": 999_999})
    await redis.hset(UserKeys(users[2], PARTITIONS).wallet, mapping={"credited": 1, "spent": 0})
    await redis.hset(UserKeys(users[3], PARTITIONS).wallet, "budget", 77)
    await redis.hset(UserKeys("ghost", PARTITIONS).wallet, mapping={"coins": 5, "credited": 5})

    dry = await rebuild_wallets(redis, backend.store, PARTITIONS, dry_run=True)
    assert dry["changed"] == 4 and dry["dry_run"]
    assert await redis.hget(UserKeys(users[1], PARTITIONS).wallet, "coins") == "999999"

    report = await rebuild_wallets(redis, backend.store, PARTITIONS)
    assert report["ok"], report
    assert report["changed"] == 4
    assert report["unsettled_movements"] > 0
    assert await wallets(redis, users) == original
    assert await wallets(redis, ["ghost"]) == {"ghost": {"coins": "0", "credited": "0", "spent": "0"}}
    assert await redis.hget(UserKeys(users[3], PARTITIONS).wallet, "budget") == "77"  # other fields kept
    assert report["coins"] == sum(int(w["coins"]) for w in original.values())

    # Idempotency keys were not touched: a retried gift replays, it is not charged again.
    replay = await wallet.send_gift(kept)
    assert replay.replayed and replay.gift_id == first.gift_id
    assert await wallets(redis, users) == original
    assert (await rebuild_wallets(redis, backend.store, PARTITIONS))["changed"] == 0
    while await settler.settle_once(block_ms=None):
        pass
    assert (await run_audit(redis, backend.store, PARTITIONS))["ok"]


async def test_rebuild_beside_a_running_settler_sees_every_movement_once(
        backend: Backend, redis: Redis, wallet: Wallet) -> None:
    """Entries committed to SQL while the rebuild reads must be counted once, not zero or two times."""
    users = [f"user-{i}" for i in range(8)]
    await make_traffic(wallet, users, gifts=3000)
    original = await wallets(redis, users)
    settler = Settler(redis, backend.store, partitions=PARTITIONS, consumer="test", max_batch=64)

    reports: list[dict[str, Any]] = []
    rebuild_started = asyncio.Event()

    async def settle_all() -> None:
        while await settler.settle_once(block_ms=None):
            # The next commit waits for a rebuild that starts after this one, so the commits
            # fall among the rebuilds' reads instead of all landing in the first.
            rebuild_started.clear()
            await asyncio.wait_for(rebuild_started.wait(), 60)

    settling = asyncio.create_task(settle_all())
    while not settling.done():
        rebuild_started.set()
        reports.append(await rebuild_wallets(redis, backend.store, PARTITIONS))
    await settling
    assert settler.batches >= 5 and len(reports) >= 3
    assert [r["changed"] for r in reports] == [0] * len(reports)
    assert all(r["ok"] for r in reports)
    assert await wallets(redis, users) == original


async def test_rebuild_never_writes_a_partition_that_moved(backend: Backend, redis: Redis,
                                                           wallet: Wallet) -> None:
    await wallet.credit("alice", "order-1", 100)
    keys = UserKeys("alice", PARTITIONS)
    seq = int(await redis.hget(totals_key(keys.partition), "seq") or 0)
    await wallet.credit("alice", "order-2", 50)  # the partition moves after the snapshot
    assert not await _write_partition(redis, keys.partition, seq, {keys.wallet: {"coins": 1}})
    assert await redis.hget(keys.wallet, "coins") == "150"
    assert await _write_partition(redis, keys.partition, seq + 1, {keys.wallet: {"coins": 150}})


async def test_rebuild_restores_partition_totals_behind_the_ledger(backend: Backend, redis: Redis,
                                                                  wallet: Wallet) -> None:
    await wallet.credit("alice", "order-1", 100)
    settler = Settler(redis, backend.store, partitions=PARTITIONS, consumer="test")
    assert await settler.settle_once(block_ms=None) == 1
    part = UserKeys("alice", PARTITIONS).partition
    await redis.delete(totals_key(part), outbox_key(part))  # Redis lost the partition
    dry = await rebuild_wallets(redis, backend.store, PARTITIONS, dry_run=True)
    assert dry["totals_behind"] == [{"partition": part, "redis_seq": 0, "settled_movements": 1, "restored": None}]
    assert await redis.exists(totals_key(part)) == 0
    report = await rebuild_wallets(redis, backend.store, PARTITIONS)
    assert not report["ok"]  # movements made before the rebuild may have reused numbers: said loudly
    restored = {"seq": 1, "credited": 100, "spent": 0}
    assert report["totals_behind"] == [{"partition": part, "redis_seq": 0, "settled_movements": 1,
                                        "restored": restored}]
    assert await redis.hget(UserKeys("alice", PARTITIONS).wallet, "coins") == "100"
    # The next movement gets a new number and settles, instead of being dropped as a duplicate.
    await wallet.credit("alice", "order-2", 50)
    await ensure_groups(redis, PARTITIONS)  # lost with the outbox; a running settler makes it again
    assert await settler.settle_once(block_ms=None) == 1
    assert settler.settled == 2 and settler.duplicates == 0
    assert (await run_audit(redis, backend.store, PARTITIONS))["ok"]
