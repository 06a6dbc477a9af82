"""Orders, webhook events and keyed transitions in the durable store, on both backends."""

from __future__ import annotations

import asyncio
from dataclasses import replace

import pytest

from server.payments.orders import Outcome, plan
from server.store import open_store
from server.store.base import Planner
from server.store.models import ORDER_PENDING, Order, PaymentEvent, now_ms
from tests.ledger import Backend

pytest_plugins = ["tests.ledger_fixtures"]
pytestmark = pytest.mark.timeout(120)


def draft(order_id: str, user: str = "u1", key: str | None = None, created: int | None = None) -> Order:
    return Order(order_id, user, key or order_id, "coins_330", 330, 499, "USD", "card", ORDER_PENDING,
                 created if created is not None else now_ms(), "web", f"pay_{order_id}")


def event(event_id: str, order_id: str) -> PaymentEvent:
    return PaymentEvent(event_id, "sandbox", "payment.succeeded", f"pay_{order_id}", order_id, now_ms(), "{}")


def planner(outcome: Outcome) -> Planner:
    return lambda o, reached: plan(o, reached, outcome)


async def test_a_new_order_has_its_channel_payment_and_first_transition(backend: Backend) -> None:
    order = replace(draft("o1"), channel="app_store", price_cents=799, payment_method="app_store")
    stored, created = await backend.store.create_order(order)
    assert created and stored == order
    assert await backend.store.get_order("o1") == order
    assert await backend.store.order_by_payment("pay_o1") == order
    assert await backend.store.order_by_payment("pay_none") is None
    [first] = await backend.store.order_transitions("o1")
    assert (first.status, first.at_ms, first.coins, first.event_id) == ("pending", order.created_ms, 0, None)
    again, created = await backend.store.create_order(replace(draft("o2", key="o1")))
    assert not created and again == order
    assert len(await backend.store.order_transitions("o1")) == 1


async def test_an_event_applies_once_and_its_coins_wait_to_be_moved(backend: Backend) -> None:
    await backend.store.create_order(draft("o1"))
    applied = await backend.store.apply("o1", event("evt_1", "o1"), planner(Outcome.SUCCEEDED))
    assert not applied.duplicate and applied.order.status == "credited"
    [credit] = applied.new
    assert (credit.status, credit.coins, credit.event_id, credit.done_ms) == ("credited", 330, "evt_1", None)
    again = await backend.store.apply("o1", event("evt_1", "o1"), planner(Outcome.SUCCEEDED))
    assert again.duplicate and again.new == () and again.order.status == "credited"
    # another event of the same outcome is recorded, but ignored: the order is past it
    other = await backend.store.apply("o1", event("evt_2", "o1"), planner(Outcome.SUCCEEDED))
    assert not other.duplicate and other.new == ()
    assert await backend.query("SELECT id, outcome FROM payment_events ORDER BY id") == [
        ("evt_1", "applied"), ("evt_2", "ignored")]
    assert [t.status for t in await backend.store.transitions_todo()] == ["credited"]
    await backend.store.transition_done("o1", "credited")
    assert await backend.store.transitions_todo() == []
    assert [(t.status, t.done_ms is not None) for t in await backend.store.order_transitions("o1")] == [
        ("pending", True), ("credited", True)]


async def test_concurrent_deliveries_and_outcomes_apply_each_once(backend: Backend, empty_url: str) -> None:
    """Five deliveries of one event and a rival outcome, on connections of their own, at once."""
    stores = [open_store(empty_url) for _ in range(4)]
    try:
        for i in range(10):
            oid = f"o{i}"
            await backend.store.create_order(draft(oid, key=oid))
            calls = [s.apply(oid, event(f"evt_{i}", oid), planner(Outcome.SUCCEEDED))
                     for s in (*stores, backend.store)]
            calls.append(stores[i % 4].apply(oid, None, planner(Outcome.EXPIRED)))
            results = await asyncio.gather(*calls)
            assert sum(not r.duplicate for r in results[:5]) == 1
            credits = [t for r in results for t in r.new if t.status == "credited"]
            assert len(credits) == 1 and credits[0].coins == 330
            assert (await backend.store.get_order(oid)).status == "credited"  # type: ignore[union-attr]
    finally:
        for s in stores:
            await s.close()


async def test_user_orders_page_newest_first_by_cursor(backend: Backend) -> None:
    for i in range(7):
        await backend.store.create_order(draft(f"o{i}", created=1000 + i // 2))  # pairs share a time
    await backend.store.create_order(draft("x", user="u2"))
    seen: list[str] = []
    before = None
    while True:
        page = await backend.store.user_orders("u1", before, 3)
        seen += [o.id for o in page]
        if len(page) < 3:
            break
        before = (page[-1].created_ms, page[-1].id)
    assert seen == ["o6", "o5", "o4", "o3", "o2", "o1", "o0"]


async def test_pending_before_finds_only_old_pending_orders(backend: Backend) -> None:
    now = now_ms()
    await backend.store.create_order(draft("old", created=now - 10_000))
    await backend.store.create_order(draft("new", created=now))
    await backend.store.create_order(draft("paid", created=now - 10_000))
    await backend.store.apply("paid", None, planner(Outcome.SUCCEEDED))
    assert [o.id for o in await backend.store.pending_before(now - 5_000)] == ["old"]
