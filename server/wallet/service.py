"""Coin movements on the hot path: gift debits and credits, each one Lua script."""

from __future__ import annotations

import asyncio
import datetime as dt
import time
from dataclasses import dataclass
from typing import Any

from redis.asyncio import Redis

from server.batcher import ScriptBatcher
from server.codes import Err, GiftstreamError
from server.keys import UserKeys
from server.movement import Kind, credit_body, gift_body, gift_id_prefix
from server.settings import Settings

_GIFT_CODE = Kind.GIFT.code
_CREDIT_CODE = Kind.CREDIT.code


@dataclass(frozen=True, slots=True)
class Debit:
    gift_id: str
    balance: int
    replayed: bool
    # When the gift was first charged (ms): a replay gives the first charge's time.
    debit_ms: int


@dataclass(frozen=True, slots=True)
class GiftOrder:
    """Everything send_gift.lua needs to debit one gift."""

    client_id: str
    sender_id: str
    sender_name: str
    host_id: str
    room_id: str
    gift: str
    count: int
    unit_coins: int

    @property
    def coins(self) -> int:
        return self.unit_coins * self.count

    @property
    def fingerprint(self) -> str:
        return f"{self.room_id}|{self.gift}|{self.count}"


_month_cache: tuple[int, str] = (-1, "")


def month_of(ts: float | None = None) -> str:
    """YYYY-MM in UTC; memoised per second (it is asked once per gift)."""
    global _month_cache
    now = ts if ts is not None else time.time()
    second = int(now)
    if _month_cache[0] != second:
        _month_cache = (second, dt.datetime.fromtimestamp(second, dt.UTC).strftime("%Y-%m"))
    return _month_cache[1]


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


class Wallet:
    def __init__(self, redis: Redis, batcher: ScriptBatcher, settings: Settings) -> None:
        self.redis = redis
        self.batcher = batcher
        self.settings = settings

    def keys(self, user_id: str) -> UserKeys:
        return UserKeys(user_id, self.settings.partitions)

    async def send_gift(self, order: GiftOrder) -> Debit:
        return self.debit_result(await self.debit(order))

    def debit(self, order: GiftOrder) -> asyncio.Future[Any]:
        """Queue the debit in this tick's pipeline; the future holds send_gift.lua's raw reply."""
        k = self.keys(order.sender_id)
        now = time.time()
        coins, share_bp, now_ms = order.coins, self.settings.host_share_bp, int(now * 1000)
        return self.batcher.call(
            "send_gift",
            [k.wallet, k.idempotency(order.client_id), k.totals, k.outbox],
            [order.fingerprint, coins, month_of(now), self.settings.idempotency_ttl_s, gift_id_prefix(k.partition),
             now_ms, _GIFT_CODE,
             gift_body(k.partition, order.sender_id, order.sender_name, order.host_id, order.room_id, order.gift,
                       order.count, coins, share_bp, now_ms, order.client_id)],
        )

    @staticmethod
    def debit_result(result: Any) -> Debit:
        status = _text(result[0])
        if status != "ok":
            code = Err(_text(result[1]))
            raise GiftstreamError(code, _GIFT_MESSAGES.get(code))
        return Debit(_text(result[1]), int(result[2]), bool(int(result[3])), int(result[4]))

    async def replay(self, order: GiftOrder) -> Debit | None:
        """The first result of this client id, if it was already charged (read-only)."""
        key = self.keys(order.sender_id).idempotency(order.client_id)
        result = await self.batcher.call("gift_replay", [key], [order.fingerprint])
        if not result:
            return None
        if _text(result[0]) != "ok":
            raise GiftstreamError(Err.IDEMPOTENCY_CONFLICT, _GIFT_MESSAGES[Err.IDEMPOTENCY_CONFLICT])
        return Debit(_text(result[1]), int(result[2]), True, int(result[4]))

    async def set_budget(self, user_id: str, monthly_cap: int | None) -> None:
        """A user's own monthly spending cap; send_gift.lua refuses gifts past it."""
        k = self.keys(user_id)
        if monthly_cap is None:
            await self.redis.hdel(k.wallet, "budget")
        else:
            await self.redis.hset(k.wallet, "budget", monthly_cap)

    async def credit(self, user_id: str, order_id: str, coins: int, kind: str = "recharge") -> int:
        """Credit a paid order exactly once; returns the balance after it."""
        return int((await self.credit_later(user_id, order_id, coins, kind))[1])

    def credit_later(self, user_id: str, order_id: str, coins: int, kind: str = "recharge") -> asyncio.Future[Any]:
        """Queue the credit in this tick's pipeline; the future holds credit.lua's raw reply."""
        k = self.keys(user_id)
        return self.batcher.call(
            "credit",
            [k.wallet, k.orders, k.totals, k.outbox],
            [order_id, coins, _CREDIT_CODE,
             credit_body(k.partition, user_id, coins, int(time.time() * 1000), order_id, kind)],
        )

    async def balance(self, user_id: str) -> dict[str, int]:
        k = self.keys(user_id)
        month = "m:" + month_of()
        coins, spent, budget = await self.redis.hmget(k.wallet, ["coins", month, "budget"])
        return {
            "coins": int(coins or 0),
            "month_spent": int(spent or 0),
            "monthly_budget": int(budget) if budget is not None else None,  # type: ignore[dict-item]
        }


_GIFT_MESSAGES = {
    Err.INSUFFICIENT_FUNDS: "not enough coins for this gift; recharge and retry with the same id",
    Err.IDEMPOTENCY_CONFLICT: "this id was already used for a different gift or count",
    Err.ACCOUNT_RESTRICTED: "this account cannot send gifts",
    Err.BUDGET_EXCEEDED: "this gift would pass your monthly spending cap",
}
