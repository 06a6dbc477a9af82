"""kill -9 of `serve` in the middle of webhook deliveries, then the provider redelivers: every
order is credited exactly once and `giftstream audit` passes."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest

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
