"""`giftstream audit` on the ledger itself: each movement's entries sum to zero per unit."""

from __future__ import annotations

import pytest
from redis.asyncio import Redis

from server.keys import UserKeys
from server.settlement.audit import NAMED, run_audit
from server.settlement.settler import Settler
from server.wallet.service import Wallet
from tests.ledger import PARTITIONS, Backend, credit, drain, gift, make_traffic

# The fixtures: backend, redis, wallet, ...
pytest_plugins = ["tests.ledger_fixtures"]
pytestmark = pytest.mark.timeout(120)


async def test_the_store_names_movements_whose_entries_do_not_sum_to_zero(backend: Backend) -> None:
    await backend.store.settle([credit(0, 1, coins=500), gift(0, 2, coins=7), gift(1, 1, coins=9)])
    assert await backend.store.unbalanced_movements(NAMED) == (0, [])
    await backend.query("UPDATE ledger SET delta = delta + 3 WHERE part = 0 AND seq = 2 AND leg = 3")
    await backend.query("UPDATE ledger SET delta = delta - 1 WHERE part = 1 AND seq = 1 AND leg = 0")
    await backend.query("UPDATE ledger SET delta = delta - 1 WHERE part = 1 AND seq = 1 AND leg = 2")
    assert await backend.store.unbalanced_movements(NAMED) == (
        3, [(0, 2, "diamond_unit", 3), (1, 1, "coin", -1), (1, 1, "diamond_unit", -1)])
    assert await backend.store.unbalanced_movements(1) == (3, [(0, 2, "diamond_unit", 3)])


async def test_audit_fails_naming_the_movement_whose_ledger_row_was_changed(
        backend: Backend, redis: Redis, wallet: Wallet) -> None:
    users = [f"au-{i}" for i in range(4)]
    await make_traffic(wallet, users, gifts=200)
    await drain(Settler(redis, backend.store, partitions=PARTITIONS, consumer="audit"), redis)
    assert (await run_audit(redis, backend.store, PARTITIONS))["ok"]
    part = UserKeys(users[0], PARTITIONS).partition
    [(seq,)] = await backend.query(f"SELECT MAX(seq) FROM ledger WHERE part = {part} AND leg = 3")
    # One host leg edited by hand: the global sums break too, but the audit says which movement.
    await backend.query(f"UPDATE ledger SET delta = delta + 1 WHERE part = {part} AND seq = {seq} AND leg = 3")
    report = await run_audit(redis, backend.store, PARTITIONS)
    assert not report["ok"]
    assert report["unbalanced_movements"] == 1
    named = [f for f in report["failures"] if "per movement" in f]
    assert named == [f"ledger entries do not sum to zero per movement and unit in 1 case(s): "
                     f"movement {part}-{seq} (diamond_unit +1)"], report["failures"]


async def test_audit_names_a_few_offenders_and_counts_them_all(backend: Backend, redis: Redis) -> None:
    await backend.store.settle([gift(0, s) for s in range(1, 9)])
    await backend.query("UPDATE ledger SET delta = delta + 2 WHERE leg = 1")
    report = await run_audit(redis, backend.store, PARTITIONS)
    [named] = [f for f in report["failures"] if "per movement" in f]
    listed = ", ".join(f"movement 0-{s} (coin +2)" for s in range(1, NAMED + 1))
    assert named == f"ledger entries do not sum to zero per movement and unit in 8 case(s): {listed} and 3 more"
