"""Recharge orders and rooms in the durable store, on both backends."""

from __future__ import annotations

import pytest

from server.store.models import (
    ORDER_CREDITED,
    ORDER_DECLINED,
    ORDER_PAID,
    ORDER_PENDING,
    Room,
    now_ms,
)
from tests.ledger import Backend, credit, order

# The fixtures: backend, redis, wallet, ...
pytest_plugins = ["tests.ledger_fixtures"]
pytestmark = pytest.mark.timeout(120)


async def test_create_order_replays_on_the_same_idempotency_key(backend: Backend) -> None:
    first, created = await backend.store.create_order(order("o1", key="same"))
    assert created
    again, created = await backend.store.create_order(order("o2", key="same"))
    assert not created
    assert again == first
    assert await backend.store.get_order("o2") is None
    other_user, created = await backend.store.create_order(order("o3", user="viewer-2", key="same"))
    assert created and other_user.id == "o3"


async def test_order_status_transitions(backend: Backend) -> None:
    await backend.store.create_order(order("o1"))
    assert await backend.store.set_order_status("o1", ORDER_PAID, only_from=ORDER_PENDING)
    assert not await backend.store.set_order_status("o1", ORDER_PAID, only_from=ORDER_PENDING)
    assert not await backend.store.set_order_status("missing", ORDER_PAID)
    assert [o.id for o in await backend.store.orders_with_status(ORDER_PAID)] == ["o1"]


async def test_credits_mark_orders_credited(backend: Backend) -> None:
    for oid, key, status in (("o1", "k1", ORDER_PENDING), ("o2", "k2", ORDER_PAID),
                             ("o3", "k3", ORDER_DECLINED)):
        await backend.store.create_order(order(oid, key=key, status=status))
    result = await backend.store.settle([credit(0, 1, order="o1"), credit(0, 2, order="o2"),
                                         credit(0, 3, order="o3")])
    assert result.credits == 3
    statuses = {oid: (await backend.store.get_order(oid)).status for oid in ("o1", "o2", "o3")}  # type: ignore[union-attr]
    # A declined order is never turned into credited by a late movement: a person must look at it.
    assert statuses == {"o1": ORDER_CREDITED, "o2": ORDER_CREDITED, "o3": ORDER_DECLINED}


async def test_rooms_keep_their_times_in_milliseconds_and_end_once(backend: Backend) -> None:
    created = now_ms()
    await backend.store.create_room(Room("r1", "host-1", "First LIVE", created, None))
    assert await backend.store.get_room("r1") == Room("r1", "host-1", "First LIVE", created, None)
    await backend.store.end_room("r1", created + 1500)
    await backend.store.end_room("r1", created + 9000)  # ended already: the first end stands
    assert await backend.store.get_room("r1") == Room("r1", "host-1", "First LIVE", created, created + 1500)
    assert await backend.store.get_room("missing") is None


async def test_an_order_keeps_its_creation_time_in_milliseconds(backend: Backend) -> None:
    draft = order("o1")
    stored, _ = await backend.store.create_order(draft)
    assert stored == draft and await backend.store.get_order("o1") == draft
    assert isinstance(draft.created_ms, int) and draft.to_json()["created_at"] == draft.created_ms
    updated = await backend.query("SELECT created_ms, updated_ms FROM orders")
    assert updated == [(draft.created_ms, draft.created_ms)]
    assert await backend.store.set_order_status("o1", ORDER_PAID)
    [(created, updated_ms)] = await backend.query("SELECT created_ms, updated_ms FROM orders")
    assert created == draft.created_ms <= updated_ms <= now_ms()
