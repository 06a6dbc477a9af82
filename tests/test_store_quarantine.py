"""A movement the ledger refuses is set aside in its partition's quarantine, named by the audit,
and settles exactly once when requeued after its cause is fixed."""

from __future__ import annotations

from typing import Any

import pytest
from redis.asyncio import Redis

from server.keys import UserKeys, quarantine_key, totals_key
from server.movement import Movement
from server.settlement.audit import run_audit
from server.settlement.outbox import requeue
from server.settlement.settler import Settler, outbox_lag
from server.store.sqlite import SQLiteStore
from server.wallet.service import GiftOrder, Wallet
from tests.ledger import PARTITIONS, Backend, drain, make_traffic, wallets

# The fixtures: backend, redis, wallet, ...
pytest_plugins = ["tests.ledger_fixtures"]
pytestmark = pytest.mark.timeout(120)


async def test_a_movement_the_ledger_refuses_is_set_aside_and_holds_nothing_back(
        backend: Backend, redis: Redis, wallet: Wallet) -> None:
    """A movement that fails on its data (here a gift without a room, as a bug upstream would
    write it) fails every retry. The settler settles the rest of its batch, sets it aside in the
    partition's quarantine with the error, and the audit names it until it is requeued."""
    users = [f"qu-{i}" for i in range(6)]
    await make_traffic(wallet, users, gifts=300)
    poison = await wallet.send_gift(GiftOrder("poison-1", users[0], users[0], "host-0", None,  # type: ignore[arg-type]
                                              "rose", 1, 3))
    await make_traffic(wallet, [f"qv-{i}" for i in range(3)], gifts=100)
    entries = (await outbox_lag(redis, PARTITIONS))["outbox_entries"]
    settler = Settler(redis, backend.store, partitions=PARTITIONS, consumer="q", max_batch=4000)
    await drain(settler, redis)
    assert (settler.settled, settler.quarantined) == (entries - 1, 1)
    part = UserKeys(users[0], PARTITIONS).partition
    quarantine: Any = await redis.xrange(quarantine_key(part))
    [(_, held)] = quarantine
    assert Movement.from_fields(held).gift_id == poison.gift_id
    assert "room_id" in held["error"] or "NULL" in held["error"].upper(), held["error"]
    assert (await outbox_lag(redis, PARTITIONS))["quarantined"] == 1
    report = await run_audit(redis, backend.store, PARTITIONS)
    assert not report["ok"]
    assert [f for f in report["failures"] if "set aside" in f] == report["failures"], report["failures"]
    assert len(report["failures"]) == 1 and f"partition {part}: 1 movements" in report["failures"][0]

    # Requeued with its cause not fixed: it is set aside again, and nothing is settled twice.
    assert await requeue(redis, PARTITIONS) == 1
    assert await redis.xlen(quarantine_key(part)) == 0
    again = Settler(redis, backend.store, partitions=PARTITIONS, consumer="q2")
    await drain(again, redis)
    assert (again.settled, again.quarantined) == (0, 1)
    assert await redis.xlen(quarantine_key(part)) == 1
    await redis.delete(quarantine_key(part))  # leave the shared valkey as the other tests expect it


async def test_the_settler_sets_aside_movements_numbered_again_after_redis_lost_its_totals(
        backend: Backend, redis: Redis, wallet: Wallet) -> None:
    await wallet.credit("ria", "order-r1", 100)
    settler = Settler(redis, backend.store, partitions=PARTITIONS, consumer="r")
    assert await settler.settle_once(block_ms=None) == 1
    part = UserKeys("ria", PARTITIONS).partition
    await redis.delete(totals_key(part))  # Redis lost the partition's numbering
    await wallet.credit("ria", "order-r2", 50)  # numbered 1 again
    await drain(settler, redis)
    assert (settler.settled, settler.duplicates, settler.quarantined) == (1, 0, 1)
    quarantine: Any = await redis.xrange(quarantine_key(part))
    [(_, held)] = quarantine
    assert Movement.from_fields(held).order_id == "order-r2" and "ReusedSequence" in held["error"]
    await redis.delete(quarantine_key(part))


async def test_a_set_aside_movement_requeued_after_its_cause_is_fixed_settles_exactly_once(
        backend: Backend, redis: Redis, wallet: Wallet) -> None:
    """The whole quarantine round trip on money: the ledger refuses one user's movements (a rule
    an operator added by mistake), the settler sets them aside and settles the rest; once the
    rule is gone, `requeue` puts them back and each settles once. Conservation holds at the end."""
    if isinstance(backend.store, SQLiteStore):
        refuse = ("CREATE TRIGGER refuse BEFORE INSERT ON movements WHEN NEW.user_id = 'blocked'"
                  " BEGIN SELECT RAISE(ABORT, 'refused by the operator'); END")
        allow = "DROP TRIGGER refuse"
    else:
        refuse = "ALTER TABLE movements ADD CONSTRAINT refuse CHECK (user_id <> 'blocked') NOT VALID"
        allow = "ALTER TABLE movements DROP CONSTRAINT refuse"
    users = ["blocked", *(f"ok-{i}" for i in range(4))]
    await make_traffic(wallet, users, gifts=200)
    entries = (await outbox_lag(redis, PARTITIONS))["outbox_entries"]
    await backend.query(refuse)
    settler = Settler(redis, backend.store, partitions=PARTITIONS, consumer="fix", max_batch=4000)
    await drain(settler, redis)
    part = UserKeys("blocked", PARTITIONS).partition
    held = await redis.xlen(quarantine_key(part))
    assert held >= 2 and (settler.settled, settler.quarantined) == (entries - held, held)  # its credit and gifts
    assert not (await run_audit(redis, backend.store, PARTITIONS))["ok"]
    before = await wallets(redis, users)

    await backend.query(allow)
    assert await requeue(redis, PARTITIONS) == held
    again = Settler(redis, backend.store, partitions=PARTITIONS, consumer="fix2")
    await drain(again, redis)
    assert (again.settled, again.duplicates, again.quarantined) == (held, 0, 0)
    assert await redis.xlen(quarantine_key(part)) == 0
    assert await wallets(redis, users) == before  # settling moves no coin in Redis
    report = await run_audit(redis, backend.store, PARTITIONS)
    assert report["ok"], report["failures"]
