"""Redelivery: a movement delivered again changes nothing, one numbered again is refused; settlers
committing at once, crashing between commit and ack, or losing the database settle each movement once."""

from __future__ import annotations

import dataclasses
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from prometheus_client import REGISTRY
from redis.asyncio import Redis

from server.movement import Kind, Movement
from server.settlement.audit import run_audit
from server.settlement.outbox import snapshot
from server.settlement.settler import Settler, outbox_lag
from server.store.base import Store
from server.store.models import (
    ORDER_CREDITED,
    ORDER_PENDING,
    ReusedSequence,
    SettleResult,
)
from server.store.postgres import PostgresStore
from server.wallet.service import Wallet
from tests.ledger import PARTITIONS, Backend, credit, drain, gift, make_traffic, order
from tests.support import TcpProxy, wait_until

# The fixtures: backend, redis, wallet, ...
pytest_plugins = ["tests.ledger_fixtures"]
pytestmark = pytest.mark.timeout(120)


async def test_a_mixed_redelivery_settles_only_the_new_movements(backend: Backend) -> None:
    """A batch redelivered after a crash: some movements committed before, some repeated inside
    the batch, some new. Only the new ones change anything, and every other copy is a duplicate."""
    await backend.store.create_order(order("o-old", key="k-old"))
    await backend.store.create_order(order("o-new", key="k-new"))
    settled_before = [gift(0, s, coins=s) for s in range(1, 6)] + [credit(1, 1, order="o-old")]
    assert (await backend.store.settle(settled_before)).movements == 6
    # Changed by hand since: the redelivered credit must not touch it again.
    await backend.store.set_order_status("o-old", ORDER_PENDING)
    earnings = await backend.store.earnings("host-1")

    new = [gift(0, s, coins=s) for s in range(6, 9)] + [credit(1, 2, order="o-new")]
    batch = [*settled_before[2:], new[0], settled_before[0], *new, new[1], new[3]]
    result = await backend.store.settle(batch)
    assert (result.movements, result.gifts, result.credits) == (4, 3, 1)
    assert result.duplicates == len(batch) - 4
    assert await backend.store.earnings("host-1") == (earnings[0] + (6 + 7 + 8) * 5000, earnings[1] + 3)
    assert (await backend.query("SELECT COUNT(*) FROM movements"))[0][0] == 10
    assert (await backend.query("SELECT COUNT(*) FROM gifts"))[0][0] == 8
    assert (await backend.query("SELECT COUNT(*) FROM ledger"))[0][0] == 8 * 4 + 2 * 2
    assert (await backend.store.get_order("o-new")).status == ORDER_CREDITED  # type: ignore[union-attr]
    assert (await backend.store.get_order("o-old")).status == ORDER_PENDING  # type: ignore[union-attr]
    assert (await backend.store.diamond_figures())["unbalanced_units"] == 0


# --- property: redelivery and order never change the outcome ---------------------------------

_namespaces = iter(range(10**9))


@st.composite
def deliveries(draw: st.DrawFn) -> tuple[list[Movement], list[list[int]]]:
    """Movements of one partition, and batches delivering each of them one to three times, in any order."""
    n = draw(st.integers(1, 40))
    kinds = draw(st.lists(st.sampled_from("cg"), min_size=n, max_size=n))
    coins = draw(st.lists(st.integers(1, 10**9), min_size=n, max_size=n))
    bps = draw(st.lists(st.integers(0, 10_000), min_size=n, max_size=n))
    users = draw(st.lists(st.integers(0, 3), min_size=n, max_size=n))
    hosts = draw(st.lists(st.integers(0, 2), min_size=n, max_size=n))
    copies = draw(st.lists(st.integers(1, 3), min_size=n, max_size=n))
    plan = [i for i, k in enumerate(copies) for _ in range(k)]
    rnd = draw(st.randoms(use_true_random=False))
    rnd.shuffle(plan)
    cuts = sorted(draw(st.sets(st.integers(1, max(1, len(plan) - 1)), max_size=6)))
    batches = [plan[a:b] for a, b in zip([0, *cuts], [*cuts, len(plan)], strict=True) if plan[a:b]]
    movements = [
        credit(0, i + 1, user=f"u{users[i]}", coins=coins[i]) if kinds[i] == "c"
        else gift(0, i + 1, user=f"u{users[i]}", host=f"h{hosts[i]}", coins=coins[i], bp=bps[i])
        for i in range(n)]
    return movements, batches


def _renamed(m: Movement, ns: str, part: int) -> Movement:
    """The same movement in a namespace of its own (partition, users, hosts, ids), so examples
    can share one database without seeing each other."""
    return dataclasses.replace(
        m, partition=part, user_id=f"{ns}{m.user_id}", host_id=f"{ns}{m.host_id}" if m.host_id else "",
        gift_id=f"{ns}{m.gift_id}" if m.gift_id else "", order_id=f"{ns}{m.order_id}" if m.order_id else "")


async def _figures(store: Store, ns: str, part: int, movements: list[Movement]) -> dict[str, Any]:
    hosts = sorted({m.host_id for m in movements if m.kind is Kind.GIFT})
    wallets = {u[len(ns):]: v for u, v in (await store.wallet_totals()).items() if u.startswith(ns)}
    return {"partition": await store.partition_totals(part, 10**6),
            "earnings": {h[len(ns):]: await store.earnings(h) for h in hosts},
            "wallets": wallets}


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(case=deliveries())
async def test_redelivery_in_any_order_equals_settling_each_once(
        backend: Backend, case: tuple[list[Movement], list[list[int]]]) -> None:
    movements, batches = case
    k = next(_namespaces)
    once_ns, redelivered_ns = f"x{k}-", f"y{k}-"
    once_part, redelivered_part = 2 * k + 100, 2 * k + 101
    once = [_renamed(m, once_ns, once_part) for m in movements]
    again = [_renamed(m, redelivered_ns, redelivered_part) for m in movements]

    for m in once:
        assert (await backend.store.settle([m])).movements == 1
    settled = duplicates = 0
    for batch in batches:
        result = await backend.store.settle([again[i] for i in batch])
        settled += result.movements
        duplicates += result.duplicates
    assert settled == len(movements)
    assert duplicates == sum(len(b) for b in batches) - len(movements)

    expected = await _figures(backend.store, once_ns, once_part, once)
    assert await _figures(backend.store, redelivered_ns, redelivered_part, again) == expected
    # and both agree with the movements themselves
    units: dict[str, int] = {}
    for m in movements:
        if m.kind is Kind.GIFT:
            units[m.host_id] = units.get(m.host_id, 0) + m.coins * m.share_bp
    assert {h: e[0] for h, e in expected["earnings"].items()} == units
    assert expected["partition"].count == len(movements)
    assert (await backend.store.diamond_figures())["unbalanced_units"] == 0


async def test_a_settled_number_with_other_content_is_refused_not_dropped(backend: Backend) -> None:
    """A redelivery (same number, same content) is a duplicate and changes nothing; the same
    number with other content (Redis lost its totals and numbered a new movement like a settled
    one) is refused, so it is set aside rather than silently counted as settled."""
    first = gift(5, 1, user="ann", coins=10)
    assert (await backend.store.settle([first])).movements == 1
    assert (await backend.store.settle([first, gift(5, 2)])).duplicates == 1
    reused = gift(5, 1, user="bob", coins=10)
    with pytest.raises(ReusedSequence):
        await backend.store.settle([gift(5, 3), reused])
    assert backend.store.is_permanent(ReusedSequence("x"))
    same_user_later = Movement(**{**{f: getattr(first, f) for f in first.__slots__}, "ts_ms": first.ts_ms + 1})
    with pytest.raises(ReusedSequence):
        await backend.store.settle([same_user_later])
    # nothing of the refused batches was written
    assert await backend.store.settled_seqs(5, [1, 2, 3]) == {1, 2}


def _observations() -> tuple[float, float]:
    """How many settlement batches were timed, and how many lags observed, in this process."""
    return (REGISTRY.get_sample_value("giftstream_settle_batch_seconds_count") or 0.0,
            REGISTRY.get_sample_value("giftstream_settle_lag_seconds_count") or 0.0)


async def test_settler_with_batches_committing_at_once_settles_each_movement_once(
        backend: Backend, redis: Redis, wallet: Wallet) -> None:
    users = [f"user-{i}" for i in range(10)]
    await make_traffic(wallet, users, gifts=2000)
    entries = (await outbox_lag(redis, PARTITIONS))["outbox_entries"]
    observed = _observations()
    settler = Settler(redis, backend.store, partitions=PARTITIONS, consumer="test", max_batch=64, commits=3)
    await drain(settler, redis)
    assert (settler.settled, settler.duplicates) == (entries, 0)
    assert settler.batches > 10
    # Each batch is timed (commit and ack) and gives its oldest movement's settlement lag.
    batch_seconds, lag_seconds = (after - before for after, before in zip(_observations(), observed, strict=True))
    assert batch_seconds == lag_seconds == settler.batches
    report = await run_audit(redis, backend.store, PARTITIONS)
    assert report["ok"], report["failures"]


async def test_settler_redelivery_after_a_crash_between_commit_and_ack_changes_nothing(
        backend: Backend, redis: Redis, wallet: Wallet) -> None:
    """A settler committed part of what it read, then died before XACK: the entries are still in
    the outbox. Its successor reads them again with new ones; only the new ones are written."""
    users = [f"user-{i}" for i in range(6)]
    await make_traffic(wallet, users, gifts=500)
    pending: list[Movement] = []
    for p in range(PARTITIONS):
        _totals, movements = await snapshot(redis, p)
        pending += movements
    committed = pending[::3]  # every third movement, across partitions and kinds
    assert (await backend.store.settle(committed)).movements == len(committed)

    settler = Settler(redis, backend.store, partitions=PARTITIONS, consumer="successor")
    await drain(settler, redis)
    assert settler.settled == len(pending) - len(committed)
    assert settler.duplicates == len(committed)
    totals = [await backend.store.partition_totals(p, 10**9) for p in range(PARTITIONS)]
    assert sum(t.count for t in totals) == len(pending)
    report = await run_audit(redis, backend.store, PARTITIONS)
    assert report["ok"], report["failures"]


async def test_postgres_settle_raises_while_down_and_recovers(pg_database: str) -> None:
    parts = urlsplit(pg_database)
    proxy = TcpProxy(parts.hostname or "127.0.0.1", parts.port or 5432)
    proxy.cut()  # down before the store ever connects: the lazy pool must not cache a failure
    userinfo = parts.netloc.rpartition("@")[0]
    store = PostgresStore(urlunsplit(parts._replace(netloc=f"{userinfo}@127.0.0.1:{proxy.port}")))
    direct = PostgresStore(pg_database)
    try:
        with pytest.raises((OSError, asyncpg.PostgresError, asyncpg.InterfaceError)):
            await store.migrate()
        proxy.restore()
        await store.migrate()
        assert (await store.settle([gift(0, 1)])).movements == 1

        proxy.cut()  # connections in the pool die mid-life
        with pytest.raises((OSError, asyncpg.PostgresError, asyncpg.InterfaceError)):
            await store.settle([gift(0, 2), gift(0, 3)])
        assert await direct.settled_seqs(0, [2, 3]) == set()  # nothing half-written

        proxy.restore()
        results: list[SettleResult] = []

        async def settled() -> bool:
            # The settler retries; a connection found dead on use may cost a try or two.
            try:
                results.append(await store.settle([gift(0, 2), gift(0, 3)]))
            except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError):
                return False
            return True

        await wait_until(settled, timeout=10)
        assert len(results) == 1 and results[0].movements == 2
        assert await direct.earnings("host-1") == (3 * 5000, 3)
    finally:
        await store.close()
        await direct.close()
        proxy.close()
