"""kill -9 of `serve` in the middle of webhook deliveries, then the provider redelivers: every
order is credited exactly once and `giftstream audit` passes."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest

from server.payments.orders import Outcome, plan
from server.store import open_store
from server.store.models import PaymentEvent, now_ms
from tests.payments import ENV, Payer, audit, deliver, event
from tests.support import ServerProc, wait_until

pytestmark = pytest.mark.timeout(180)

ORDERS = 30


async def test_kill9_mid_deliveries_then_redelivery_credits_once(make_server: Callable[..., ServerProc],
                                                                 tmp_path: Path) -> None:
    data = tmp_path / "var"
    first = make_server(data, env=ENV).start()  # embedded valkey, SQLite in the data dir
    users = [Payer(first, f"crash{i}") for i in range(ORDERS)]
    orders = [await u.pending(method="card", package_id="coins_330") for u in users]
    for u in users:
        await u.close()
    events = [event(o["payment_id"], o["price_cents"]) for o in orders]
    answered: list[int] = []

    async with httpx.AsyncClient(base_url=first.base, timeout=30) as client:

        async def provider(e: dict[str, Any]) -> None:
            for _ in range(3):  # each event three times, all at once with the others
                try:
                    r = await deliver(client, e)
                except httpx.HTTPError:
                    return  # the server died under it: the provider will redeliver
                answered.append(r.status_code)

        deliveries = asyncio.gather(*(provider(e) for e in events))
        await wait_until(lambda: len(answered) >= ORDERS // 2, timeout=60, interval=0.01)
        first.kill9()
        await deliveries
    assert len(answered) < 3 * ORDERS, "the kill came after every delivery: nothing was tested"

    second = make_server(data, port=first.port, env=ENV).start()
    async with httpx.AsyncClient(base_url=second.base, timeout=30) as client:
        for round_ in range(2):  # the provider redelivers every event, twice, concurrently
            answers = await asyncio.gather(*(deliver(client, e) for e in events))
            assert all(r.status_code == 200 for r in answers), [r.text for r in answers if r.status_code != 200]
            if round_:
                assert all(r.json() == {"duplicate": True} for r in answers)  # every event is recorded now
    users = [Payer(second, f"crash{i}") for i in range(ORDERS)]
    try:
        for u, o in zip(users, orders, strict=True):
            assert await u.coins() == 330, u.user_id
            assert (await u.order(o["order_id"]))["status"] == "credited"
    finally:
        for u in users:
            await u.close()

    async def settled() -> bool:
        async with httpx.AsyncClient(base_url=second.base) as c:
            return bool((await c.get("/healthz")).json().get("outbox_entries") == 0)

    await wait_until(settled, timeout=30)
    report = audit(second)
    assert report["payments"]["paid_orders"] == ORDERS
    assert report["payments"]["events_applied"] == ORDERS


async def test_a_crash_between_the_sql_commit_and_the_credit_is_made_good_once(
        make_server: Callable[..., ServerProc], tmp_path: Path, redis_url: str, database_url: str) -> None:
    """The exact window, on both backends: the event and its credit transition are committed in
    SQL, and `serve` dies before the credit reaches Redis. The next start makes it; the provider's
    redelivery is a duplicate and credits nothing more."""
    data = tmp_path / "var"
    first = make_server(data, redis_url=redis_url, database_url=database_url, env=ENV).start()
    payer = Payer(first, "halfway")
    order = await payer.pending(method="card", package_id="coins_330")
    await payer.close()
    first.kill9()
    sent = event(order["payment_id"], order["price_cents"])
    store = open_store(database_url)
    try:
        record = PaymentEvent(sent["id"], "sandbox", sent["type"], order["payment_id"], order["order_id"], now_ms(),
                              json.dumps(sent))
        applied = await store.apply(order["order_id"], record, lambda o, reached: plan(o, reached, Outcome.SUCCEEDED))
        assert [(t.status, t.done_ms) for t in applied.new] == [("credited", None)]
    finally:
        await store.close()

    second = make_server(data, redis_url=redis_url, database_url=database_url, port=first.port, env=ENV).start()
    payer = Payer(second, "halfway")
    try:
        assert await payer.coins() == 330  # made at start
        r = await deliver(payer.client, sent)
        assert r.status_code == 200 and r.json() == {"duplicate": True}, r.text
        assert await payer.coins() == 330
        assert (await payer.order(order["order_id"]))["status"] == "credited"
    finally:
        await payer.close()

    async def settled() -> bool:
        async with httpx.AsyncClient(base_url=second.base) as c:
            return bool((await c.get("/healthz")).json().get("outbox_entries") == 0)

    await wait_until(settled, timeout=30)
    assert audit(second)["payments"]["paid_orders_without_credit"] == 0
