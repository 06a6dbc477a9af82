"""Settling a batch: the rows written, host credit and ledger figures, on both backends."""

from __future__ import annotations

import sqlite3
from dataclasses import replace
from pathlib import Path

import pytest

from server.movement import Kind
from server.store.models import (
    UNITS_PER_DIAMOND,
    PartitionTotals,
    now_ms,
)
from server.store.rows import DAY_MS
from server.store.sqlite import SQLiteStore
from tests.ledger import TS0, Backend, credit, gift, keyed

# The fixtures: backend, redis, wallet, ...
pytest_plugins = ["tests.ledger_fixtures"]
pytestmark = pytest.mark.timeout(120)


async def test_settle_twice_changes_nothing(backend: Backend) -> None:
    batch = [credit(0, 1, coins=10), gift(0, 2, coins=3), gift(1, 1, host="host-2", coins=7)]
    first = await backend.store.settle(batch)
    assert (first.movements, first.gifts, first.credits, first.duplicates) == (3, 2, 1, 0)
    figures = await backend.store.diamond_figures()
    earnings = await backend.store.earnings("host-1"), await backend.store.earnings("host-2")

    second = await backend.store.settle(batch)
    assert (second.movements, second.gifts, second.credits, second.duplicates) == (0, 0, 0, 3)
    assert await backend.store.diamond_figures() == figures
    assert (await backend.store.earnings("host-1"), await backend.store.earnings("host-2")) == earnings
    assert earnings == ((3 * 5000, 1), (7 * 5000, 1))
    assert (await backend.query("SELECT COUNT(*) FROM ledger"))[0][0] == 2 + 4 * 2


async def test_duplicates_inside_one_batch_count_once(backend: Backend) -> None:
    g = gift(2, 5, coins=4)
    result = await backend.store.settle([g, gift(2, 6, coins=1), g, g])
    assert (result.movements, result.gifts, result.duplicates) == (2, 2, 2)
    assert await backend.store.earnings("host-1") == (5 * 5000, 2)
    assert (await backend.query("SELECT COUNT(*) FROM gifts"))[0][0] == 2


async def test_every_backend_writes_exactly_these_rows(backend: Backend) -> None:
    """The rows of a settled batch, column by column: both backends must write the same ones."""
    batch = [credit(3, 7, user="ann", coins=500, order="ord-1"),
             gift(3, 8, user="ann", host="hal", coins=123, bp=4321, room="r9")]
    before = now_ms()
    await backend.store.settle(batch)
    after = now_ms()
    movements = await backend.query("SELECT part, seq, kind, user_id, coins, ref, ts_ms FROM movements"
                                    " ORDER BY part, seq")
    assert [tuple(r) for r in movements] == [(3, 7, "credit", "ann", 500, "ord-1", TS0 + 7),
                                             (3, 8, "gift", "ann", 123, "g3-8", TS0 + 8)]
    gifts = await backend.query("SELECT id, part, seq, sender_id, sender_name, host_id, room_id, gift, count,"
                                " coins, share_bp, diamond_units, client_id, sent_ms, settled_ms FROM gifts")
    assert len(gifts) == 1
    *columns, settled_ms = gifts[0]
    assert tuple(columns) == ("g3-8", 3, 8, "ann", "Ann", "hal", "r9", "rose", 123, 123, 4321, 123 * 4321,
                              "c-3-8", TS0 + 8)
    assert before <= settled_ms <= after and isinstance(settled_ms, int)
    ledger = await backend.query("SELECT part, seq, leg, account, unit, delta FROM ledger ORDER BY part, seq, leg")
    assert [tuple(r) for r in ledger] == [
        (3, 7, 0, "platform:payments", "coin", -500), (3, 7, 1, "user:ann", "coin", 500),
        (3, 8, 0, "user:ann", "coin", -123), (3, 8, 1, "platform:gifts", "coin", 123),
        (3, 8, 2, "platform:diamonds", "diamond_unit", -123 * 4321),
        (3, 8, 3, "host:hal", "diamond_unit", 123 * 4321)]
    assert await backend.query("SELECT host_id, diamond_units, gifts_received FROM host_earnings") == [
        ("hal", 123 * 4321, 1)]


async def test_every_backend_writes_exactly_these_days_holds_and_releases(backend: Backend) -> None:
    """A host's days, and a dispute's holds and their release by a won dispute, column by column."""
    day = TS0 // DAY_MS
    await backend.store.settle([credit(3, 7, user="ann", coins=500, order="ord-1"),
                                gift(3, 8, user="ann", host="hal", coins=123, bp=4321),
                                replace(gift(3, 9, user="ann", host="hal", coins=77), ts_ms=TS0 + DAY_MS),
                                gift(3, 10, user="ann", host="bo", coins=300, bp=3333)])
    await backend.store.settle([gift(3, 11, user="ann", host="hal", coins=1)])  # a second batch adds to its day
    assert sorted(await backend.query("SELECT host_id, day, diamond_units, gifts FROM host_days")) == [
        ("bo", day, 300 * 3333, 1), ("hal", day, 123 * 4321 + 5000, 2), ("hal", day + 1, 77 * 5000, 1)]

    hal = 123 * 4321 + 77 * 5000
    before = now_ms()
    await backend.store.settle([keyed(3, 12, Kind.DISPUTE, user="ann", coins=-500, order="ord-1",
                                      ts_ms=TS0 + DAY_MS + 1)])
    after = now_ms()
    holds = await backend.query("SELECT gift_id, order_id, kind, host_id, user_id, part, seq, coins, diamond_units,"
                                " held_ms, released_ms FROM gift_holds ORDER BY gift_id")
    assert [r[:9] for r in holds] == [("g3-10", "ord-1", "dispute", "bo", "ann", 3, 12, 300, 300 * 3333),
                                      ("g3-8", "ord-1", "dispute", "hal", "ann", 3, 12, 123, 123 * 4321),
                                      ("g3-9", "ord-1", "dispute", "hal", "ann", 3, 12, 77, 77 * 5000)]
    assert all(before <= r[9] <= after and r[10] is None for r in holds)
    legs = "SELECT part, seq, leg, account, unit, delta FROM ledger WHERE seq = {} ORDER BY leg"
    assert [tuple(r) for r in await backend.query(legs.format(12))] == [
        (3, 12, 0, "platform:payments", "coin", 500), (3, 12, 1, "user:ann", "coin", -500),
        (3, 12, 4, "host:bo", "diamond_unit", -300 * 3333), (3, 12, 5, "host_held:bo", "diamond_unit", 300 * 3333),
        (3, 12, 6, "host:hal", "diamond_unit", -hal), (3, 12, 7, "host_held:hal", "diamond_unit", hal)]
    assert sorted(await backend.query("SELECT host_id, diamond_units, held_units FROM host_earnings")) == [
        ("bo", 300 * 3333, 300 * 3333), ("hal", hal + 5000, hal)]

    await backend.store.settle([keyed(3, 13, Kind.DISPUTE_REVERSAL, user="ann", coins=500, order="ord-1")])
    assert [tuple(r) for r in await backend.query(legs.format(13))] == [
        (3, 13, 0, "platform:payments", "coin", -500), (3, 13, 1, "user:ann", "coin", 500),
        (3, 13, 4, "host:bo", "diamond_unit", 300 * 3333), (3, 13, 5, "host_held:bo", "diamond_unit", -300 * 3333),
        (3, 13, 6, "host:hal", "diamond_unit", hal), (3, 13, 7, "host_held:hal", "diamond_unit", -hal)]
    released = await backend.query("SELECT released_ms FROM gift_holds")
    assert len(released) == 3 and all(after <= r[0] <= now_ms() for r in released)
    assert sorted(await backend.query("SELECT host_id, held_units FROM host_earnings")) == [("bo", 0), ("hal", 0)]


async def test_sqlite_stages_batches_of_any_size_under_an_old_variable_limit(tmp_path: Path) -> None:
    """SQLite before 3.32 allows 999 variables per statement: the stage must still take any batch."""
    store = SQLiteStore(tmp_path / "ledger.sqlite3")
    try:
        await store.migrate()
        await store._run(lambda c: c.setlimit(sqlite3.SQLITE_LIMIT_VARIABLE_NUMBER, 999))
        seq = 0
        for size in (1, 63, 64, 65, 1000, 2049):
            batch = [gift(0, s) for s in range(seq + 1, seq + size + 1)]
            seq += size
            result = await store.settle(batch + batch[-2:])  # with two delivered twice
            assert (result.movements, result.duplicates) == (size, min(2, size))
        assert await store.earnings("host-1") == (seq * 5000, seq)
        assert await store.partition_totals(0, seq) == PartitionTotals(seq, 0, seq)
    finally:
        await store.close()


async def test_a_thousand_one_coin_gifts_at_half_share_make_500_diamonds(backend: Backend) -> None:
    gifts = [gift(i % 4, i // 4 + 1, user=f"viewer-{i % 7}") for i in range(1000)]
    for start, size in ((0, 1), (1, 99), (100, 400), (500, 500)):  # batch size must not matter
        await backend.store.settle(gifts[start : start + size])
    units, received = await backend.store.earnings("host-1")
    assert (units, received) == (5_000_000, 1000)
    assert units / UNITS_PER_DIAMOND == 500
    figures = await backend.store.diamond_figures()
    assert figures == {"gift_diamond_units": 5_000_000, "gifts": 1000, "host_diamond_units": 5_000_000,
                       "host_gifts_received": 1000, "ledger_host_diamond_units": 5_000_000,
                       "unbalanced_units": 0}


async def test_odd_shares_are_kept_exactly(backend: Backend) -> None:
    """1 coin at 33.33% is 3333 units; summed, nothing is rounded away."""
    await backend.store.settle([gift(0, s, coins=1, bp=3333) for s in range(1, 4)]
                               + [gift(0, 4, coins=7, bp=1)])
    assert await backend.store.earnings("host-1") == (3 * 3333 + 7, 4)


async def test_ledger_sums_to_zero_per_unit_and_per_movement(backend: Backend) -> None:
    await backend.store.settle([credit(0, 1, coins=500), gift(0, 2, coins=123, bp=4321),
                                gift(1, 1, user="viewer-2", host="host-2", coins=9, bp=10000)])
    per_unit = dict(await backend.query("SELECT unit, SUM(delta) FROM ledger GROUP BY unit"))
    assert {k: int(v) for k, v in per_unit.items()} == {"coin": 0, "diamond_unit": 0}
    unbalanced = await backend.query(
        "SELECT part, seq, unit FROM ledger GROUP BY part, seq, unit HAVING SUM(delta) <> 0")
    assert unbalanced == []
    host = await backend.query("SELECT SUM(delta) FROM ledger WHERE account = 'host:host-1'")
    assert int(host[0][0]) == 123 * 4321
    user = await backend.query(
        "SELECT SUM(delta) FROM ledger WHERE account = 'user:viewer-1' AND unit = 'coin'")
    assert int(user[0][0]) == 500 - 123


async def test_audit_and_rebuild_figures(backend: Backend) -> None:
    store = backend.store
    await store.settle([credit(0, 1, user="a", coins=1000), gift(0, 2, user="a", coins=30),
                        gift(0, 3, user="a", host="host-2", coins=20, bp=2500),
                        credit(1, 1, user="b", coins=50),
                        gift(1, 2, user="b", coins=50)])
    assert await store.partition_totals(0, 10) == PartitionTotals(3, 1000, 50)
    assert await store.partition_totals(0, 2) == PartitionTotals(2, 1000, 30)
    assert await store.partition_totals(1, 10) == PartitionTotals(2, 50, 50)
    assert await store.partition_totals(7, 10) == PartitionTotals(0, 0, 0)
    assert await store.settled_seqs(0, [1, 3, 4, 99]) == {1, 3}
    assert await store.settled_seqs(1, list(range(1, 1001))) == {1, 2}
    assert await store.settled_seqs(0, []) == set()
    assert await store.wallet_totals() == {"a": (1000, 50), "b": (50, 50)}
    host_units = 30 * 5000 + 20 * 2500 + 50 * 5000
    assert await store.diamond_figures() == {
        "gift_diamond_units": host_units, "gifts": 3,
        "host_diamond_units": host_units, "host_gifts_received": 3,
        "ledger_host_diamond_units": host_units, "unbalanced_units": 0}


async def test_empty_batch(backend: Backend) -> None:
    result = await backend.store.settle([])
    assert (result.movements, result.duplicates) == (0, 0)
    assert await backend.store.wallet_totals() == {}
