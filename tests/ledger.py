"""Builders and helpers for the durable store's tests (tests/test_store_*.py), on both backends.

Their fixtures (backend, redis, wallet, ...) are in tests/ledger_fixtures.py, which a test
module loads with `pytest_plugins = ["tests.ledger_fixtures"]`.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import sqlite3
from typing import Any

import asyncpg
from redis.asyncio import Redis

from server.keys import UserKeys
from server.movement import Kind, Movement
from server.settlement.settler import Settler, outbox_lag
from server.store.base import Store
from server.store.models import ORDER_PENDING, Order, now_ms
from server.store.sqlite import SQLiteStore
from server.wallet.service import GiftOrder, Wallet
from tests.support import wait_until

# --- backends -------------------------------------------------------------------------------


class Backend:
    """A migrated store plus raw SQL on the same database, to check what the store wrote."""

    def __init__(self, store: Store, url: str) -> None:
        self.store = store
        self.url = url

    async def query(self, sql: str) -> list[tuple[Any, ...]]:
        if isinstance(self.store, SQLiteStore):
            with contextlib.closing(sqlite3.connect(self.store.path)) as db, db:
                return [tuple(r) for r in db.execute(sql).fetchall()]
        conn = await asyncpg.connect(self.url)
        try:
            return [tuple(r) for r in await conn.fetch(sql)]
        finally:
            await conn.close()


# --- movements and orders -------------------------------------------------------------------

TS0 = 1_767_225_600_000  # 2026-01-01, ms


def gift(part: int, seq: int, *, user: str = "viewer-1", host: str = "host-1", coins: int = 1,
         bp: int = 5000, room: str = "room-1") -> Movement:
    return Movement(partition=part, seq=seq, kind=Kind.GIFT, user_id=user, coins=coins, ts_ms=TS0 + seq,
                    gift_id=f"g{part}-{seq}", sender_name=user.title(), host_id=host, room_id=room,
                    gift="rose", count=coins, share_bp=bp, client_id=f"c-{part}-{seq}")


def credit(part: int, seq: int, *, user: str = "viewer-1", coins: int = 100, order: str = "") -> Movement:
    return Movement(partition=part, seq=seq, kind=Kind.CREDIT, user_id=user, coins=coins, ts_ms=TS0 + seq,
                    order_id=order or f"o-{part}-{seq}", credit_kind="recharge")


def keyed(part: int, seq: int, kind: Kind, *, user: str = "viewer-1", coins: int = 0, order: str = "",
          ts_ms: int | None = None) -> Movement:
    """A keyed movement (a refund's or dispute's coins are negative, a reversal's positive)."""
    return Movement(partition=part, seq=seq, kind=kind, user_id=user, coins=coins,
                    ts_ms=TS0 + seq if ts_ms is None else ts_ms, order_id=order or f"o-{part}-{seq}")


def order(order_id: str, user: str = "viewer-1", key: str = "k1", status: str = ORDER_PENDING) -> Order:
    return Order(id=order_id, user_id=user, idempotency_key=key, package_id="p100", coins=100, price_cents=99,
                 currency="USD", payment_method="sandbox_card", status=status, created_ms=now_ms())


# --- Redis: real Lua scripts on the session valkey ------------------------------------------

PARTITIONS = 4


async def make_traffic(wallet: Wallet, users: list[str], gifts: int = 300) -> None:
    """Credits and gifts through the real Lua scripts, every user in a different state."""
    rng = random.Random(7)
    for i, user in enumerate(users):
        await wallet.credit(user, f"order-{user}", 10 * gifts + i)
    sends = []
    for n in range(gifts):
        user = rng.choice(users)
        sends.append(wallet.send_gift(GiftOrder(client_id=f"cid-{n}", sender_id=user, sender_name=user,
                                                host_id=f"host-{n % 3}", room_id="room-1", gift="rose",
                                                count=1, unit_coins=rng.randint(1, 9))))
    await asyncio.gather(*sends)


async def wallets(redis: Redis, users: list[str]) -> dict[str, dict[str, Any]]:
    out = {}
    for user in users:
        values = await redis.hmget(UserKeys(user, PARTITIONS).wallet, ["coins", "credited", "spent"])
        out[user] = dict(zip(["coins", "credited", "spent"], values, strict=True))
    return out


async def drain(settler: Settler, redis: Redis) -> None:
    """Run the settler until the outbox is empty."""

    async def drained() -> bool:
        return (await outbox_lag(redis, PARTITIONS))["outbox_entries"] == 0

    settler.start()
    try:
        await wait_until(drained, timeout=60, interval=0.02, message="the settler did not drain the outbox")
    finally:
        await settler.stop(flush=False)
