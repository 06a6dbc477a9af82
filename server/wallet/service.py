"""Coin and point movements, each one Lua script: gift debits, credits, and the keyed movements of
the coin economy (claw-backs, reversals, adjustments, rewards); restriction and budget."""

from __future__ import annotations

import asyncio
import datetime as dt
import hashlib
import json
import logging
import time
from dataclasses import dataclass
from typing import Any

from redis.asyncio import Redis

from server.batcher import ScriptBatcher
from server.codes import Err, GiftstreamError
from server.keys import LEGACY_IDEMPOTENCY_PATTERN, LEGACY_IDEMPOTENCY_UNTIL, WALLET_CHANNEL, UserKeys
from server.movement import COUNTERS, Kind, credit_body, gift_body, gift_id_prefix, keyed_body
from server.settings import Settings

log = logging.getLogger("giftstream.wallet")

_GIFT_CODE = Kind.GIFT.code
_CREDIT_CODE = Kind.CREDIT.code
# Why a balance changed, as the `wallet` socket event and the history name it.
REASON = {Kind.CREDIT: "recharge", Kind.REFUND: "refund", Kind.DISPUTE: "dispute",
          Kind.DISPUTE_REVERSAL: "dispute_reversal", Kind.REWARD: "reward", Kind.ADJUSTMENT: "adjustment"}
# The sentence a restricted user reads when the cause is their negative balance.
NEGATIVE_BALANCE = ("your balance is below zero after a refund or chargeback; a recharge that brings it back "
                    "to zero or above lifts this")


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

    @property
    def fingerprint_digest(self) -> bytes:
        """What a gift id's record keeps of the fingerprint: 8 bytes of BLAKE2b. It is only ever
        compared with a retry of the same id by the same user, so a different gift under that id
        passes for a replay once in 2^64 such retries (and is then not charged)."""
        return hashlib.blake2b(self.fingerprint.encode(), digest_size=8).digest()


@dataclass(frozen=True, slots=True)
class Moved:
    """What move.lua left: both balances after the movement, its number, and whether it was made
    before (a repeat of the same (kind, user, ref) changes nothing)."""

    coins: int
    points: int
    seq: int
    replayed: bool


_month_cache: tuple[int, str] = (-1, "")

# How long a gift id's record lived in the layout before 2026-11-30 (a string key per id): an
# upgraded data set may hold such records this long after its first start on the hash layout.
LEGACY_IDEMPOTENCY_TTL_S = 24 * 3600


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
        # Until then (ms) gift ids may also have records of the string-key layout (start()).
        self.legacy_until_ms = 0

    async def start(self) -> None:
        """Once per process, before its first gift: whether gift ids charged by a release before
        2026-11-30 (a string key per id, kept 24 h) may be retried still, so that send_gift.lua
        must look for their records too. The first node of this release to start on a data set
        decides for every node: 24 h from then if it finds such a record, never if it finds none
        (a new data set). Looking costs one GET per new gift, and only that day."""
        until = await self.redis.get(LEGACY_IDEMPOTENCY_UNTIL)
        if until is None:
            now_ms = int(time.time() * 1000)
            found = False
            async for _ in self.redis.scan_iter(match=LEGACY_IDEMPOTENCY_PATTERN, count=10_000):
                found = True
                break
            await self.redis.set(LEGACY_IDEMPOTENCY_UNTIL, now_ms + LEGACY_IDEMPOTENCY_TTL_S * 1000 if found else 0,
                                 nx=True)
            until = await self.redis.get(LEGACY_IDEMPOTENCY_UNTIL)
        self.legacy_until_ms = int(until or 0)

    def keys(self, user_id: str) -> UserKeys:
        return UserKeys(user_id, self.settings.partitions)

    def _legacy(self, k: UserKeys, order: GiftOrder, now_ms: int) -> tuple[list[str], list[str]]:
        """send_gift.lua's and gift_replay.lua's extra key and argument while old records may live."""
        if now_ms < self.legacy_until_ms:
            return [k.legacy_idempotency(order.client_id)], [order.fingerprint]
        return [], []

    async def send_gift(self, order: GiftOrder) -> Debit:
        return self.debit_result(await self.debit(order))

    def debit(self, order: GiftOrder) -> asyncio.Future[Any]:
        """Queue the debit in this tick's pipeline; the future holds send_gift.lua's raw reply."""
        k = self.keys(order.sender_id)
        now = time.time()
        coins, share_bp, now_ms = order.coins, self.settings.host_share_bp, int(now * 1000)
        old_key, old_arg = self._legacy(k, order, now_ms)
        return self.batcher.call(
            "send_gift",
            [k.wallet, k.gift_ids, k.totals, k.outbox, *old_key],
            [order.fingerprint_digest, coins, month_of(now), self.settings.idempotency_ttl_s,
             gift_id_prefix(k.partition), now_ms, _GIFT_CODE,
             gift_body(k.partition, order.sender_id, order.sender_name, order.host_id, order.room_id, order.gift,
                       order.count, coins, share_bp, now_ms, order.client_id),
             k.gift_id_field(order.client_id), *old_arg],
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
        k = self.keys(order.sender_id)
        old_key, old_arg = self._legacy(k, order, int(time.time() * 1000))
        result = await self.batcher.call(
            "gift_replay", [k.gift_ids, *old_key],
            [k.gift_id_field(order.client_id), order.fingerprint_digest, gift_id_prefix(k.partition), *old_arg])
        if not result:
            return None
        if _text(result[0]) != "ok":
            raise GiftstreamError(Err.IDEMPOTENCY_CONFLICT, _GIFT_MESSAGES[Err.IDEMPOTENCY_CONFLICT])
        return Debit(_text(result[1]), int(result[2]), True, int(result[4]))

    async def credit(self, user_id: str, order_id: str, coins: int, kind: str = "recharge") -> int:
        """Credit a paid order exactly once; returns the balance after it."""
        result = await self.credit_later(user_id, order_id, coins, kind)
        balance = int(result[1])
        if _text(result[0]) == "ok":
            await self.notify(user_id, balance, coins, REASON[Kind.CREDIT], order_id)
        return balance

    def credit_later(self, user_id: str, order_id: str, coins: int, kind: str = "recharge") -> asyncio.Future[Any]:
        """Queue the credit in this tick's pipeline; the future holds credit.lua's raw reply."""
        k = self.keys(user_id)
        return self.batcher.call(
            "credit",
            [k.wallet, k.orders, k.totals, k.outbox],
            [order_id, coins, _CREDIT_CODE,
             credit_body(k.partition, user_id, coins, int(time.time() * 1000), order_id, kind)],
        )

    # --- keyed movements: claw-backs, reversals, adjustments, rewards (move.lua) -----------------

    async def move(self, user_id: str, kind: Kind, ref: str, coins: int, points: int = 0, reason: str = "") -> Moved:
        """Change the balances by (coins, points) once per (kind, user, ref): a repeat with the same
        changes returns the first result, one with other changes is an idempotency_conflict. Coins
        may go below zero; points may not (insufficient_points)."""
        k = self.keys(user_id)
        coin_field, coin_sign, points_field, points_sign = COUNTERS[kind]
        result = await self.batcher.call(
            "move",
            [k.wallet, k.done(kind.code), k.totals, k.outbox],
            [f"{user_id}\n{ref}", coins, points, f"{coins}|{points}", kind.code,
             keyed_body(k.partition, user_id, coins, points, int(time.time() * 1000), ref, reason),
             coin_field, coin_sign * coins, points_field, points_sign * points],
        )
        if _text(result[0]) != "ok":
            code = Err(_text(result[1]))
            raise GiftstreamError(code, _MOVE_MESSAGES.get(code))
        moved = Moved(int(result[1]), int(result[2]), int(result[3]), bool(int(result[4])))
        if not moved.replayed and coins:
            await self.notify(user_id, moved.coins, coins, REASON[kind], ref)
        return moved

    async def claw_back(self, user_id: str, ref: str, coins: int, kind: Kind) -> int:
        """Take a refunded (Kind.REFUND) or disputed (Kind.DISPUTE) order's coins back, exactly once
        per (kind, order id); the balance may go negative, which restricts the account until a
        credit brings it back to zero. Returns the balance after."""
        if kind not in (Kind.REFUND, Kind.DISPUTE):
            raise ValueError(f"a claw-back is a refund or a dispute, not {kind}")
        if coins <= 0:
            raise ValueError("a claw-back takes a positive number of coins")
        return (await self.move(user_id, kind, ref, -coins, reason=kind.value)).coins

    async def reverse_claw_back(self, user_id: str, ref: str, coins: int) -> int:
        """Give a disputed order's coins back after the dispute was won, exactly once per order id.
        Returns the balance after."""
        if coins <= 0:
            raise ValueError("a reversal gives a positive number of coins")
        return (await self.move(user_id, Kind.DISPUTE_REVERSAL, ref, coins, reason="dispute won")).coins

    async def adjust(self, user_id: str, key: str, coins: int, reason: str) -> Moved:
        """Support's signed correction, exactly once per idempotency key."""
        return await self.move(user_id, Kind.ADJUSTMENT, key, coins, reason=reason)

    async def grant_points(self, user_id: str, key: str, points: int, reason: str) -> Moved:
        """Reward points granted by an admin, exactly once per idempotency key."""
        return await self.move(user_id, Kind.POINTS_GRANT, key, 0, points, reason=reason)

    async def check_in(self, user_id: str, now: float | None = None) -> Moved:
        """The daily check-in's points, once per UTC day (already_checked_in after that)."""
        moved = await self.move(user_id, Kind.CHECK_IN, day_of(now), 0, self.settings.check_in_points,
                                reason="daily check-in")
        if moved.replayed:
            raise GiftstreamError(Err.ALREADY_CHECKED_IN, "you have checked in today already; come back tomorrow "
                                  "(the day turns at 00:00 UTC)")
        return moved

    async def checked_in(self, user_id: str, now: float | None = None) -> bool:
        k = self.keys(user_id)
        return bool(await self.redis.hexists(k.done(Kind.CHECK_IN.code), f"{user_id}\n{day_of(now)}"))

    async def redeem(self, user_id: str, key: str, points: int) -> Moved:
        """Points into coins at the configured rate, in one script, exactly once per key."""
        rate_points, rate_coins = self.settings.reward_rate_points, self.settings.reward_rate_coins
        if points <= 0 or points % rate_points:
            raise GiftstreamError(Err.BAD_AMOUNT, f"points must be a positive multiple of {rate_points}")
        coins = points // rate_points * rate_coins
        return await self.move(user_id, Kind.REWARD, key, coins, -points, reason="points redeemed")

    # --- restriction and budget ----------------------------------------------------------------

    async def restrict(self, user_id: str, reason: str) -> None:
        """An admin's restriction: send_gift.lua refuses every gift until `unrestrict`."""
        await self.redis.hset(self.keys(user_id).wallet, mapping={"restricted": "1", "restricted_reason": reason})

    async def unrestrict(self, user_id: str) -> None:
        await self.redis.hdel(self.keys(user_id).wallet, "restricted", "restricted_reason")

    async def set_monthly_budget(self, user_id: str, budget: int | None) -> None:
        """Lower at once, raise or remove after settings.budget_raise_delay_s (set_budget.lua)."""
        await self.batcher.call("set_budget", [self.keys(user_id).wallet],
                                ["" if budget is None else budget, int(time.time() * 1000),
                                 self.settings.budget_raise_delay_s * 1000])

    async def view(self, user_id: str) -> dict[str, Any]:
        """GET /v1/wallet: both balances, this month's spending, the budget and any pending change,
        and the restriction with its reason."""
        k = self.keys(user_id)
        now = time.time()
        fields = ["coins", "points", "m:" + month_of(now), "budget", "budget_next", "budget_from", "restricted",
                  "restricted_reason"]
        coins, points, spent, budget, nxt, since, restricted, why = await self.redis.hmget(k.wallet, fields)
        if since is not None and int(now * 1000) >= int(since):
            budget, nxt, since = (None if nxt == "none" else nxt), None, None
        balance = int(coins or 0)
        reason = why if restricted == "1" else NEGATIVE_BALANCE if balance < 0 else None
        return {
            "coins": balance, "points": int(points or 0), "month_spent": int(spent or 0),
            "monthly_budget": int(budget) if budget is not None else None,
            "pending_budget": None if nxt is None or nxt == "none" else int(nxt),
            "pending_from": int(since) if since is not None else None,
            "restricted": reason is not None, "restricted_reason": reason,
        }

    async def notify(self, user_id: str, coins: int, change: int, reason: str, ref: str) -> None:
        """Tell the user's room sockets, on every node, that their balance changed (rooms/wallet_events.py).
        Best effort: the movement is made already, and GET /v1/wallet shows it either way."""
        event = {"user_id": user_id, "coins": coins, "change": change, "reason": reason, "ref": ref}
        try:
            await self.redis.publish(WALLET_CHANNEL, json.dumps(event))
        except Exception as exc:  # the money moved; a missed live update is not worth failing it
            log.warning("wallet event for %s not published: %s", user_id, exc)

    async def balance(self, user_id: str) -> dict[str, int]:
        k = self.keys(user_id)
        month = "m:" + month_of()
        coins, spent, budget = await self.redis.hmget(k.wallet, ["coins", month, "budget"])
        return {
            "coins": int(coins or 0),
            "month_spent": int(spent or 0),
            "monthly_budget": int(budget) if budget is not None else None,  # type: ignore[dict-item]
        }


def day_of(ts: float | None = None) -> str:
    """YYYY-MM-DD in UTC: the check-in's day."""
    return dt.datetime.fromtimestamp(time.time() if ts is None else ts, dt.UTC).strftime("%Y-%m-%d")


_MOVE_MESSAGES = {
    Err.INSUFFICIENT_POINTS: "not enough reward points for this redemption",
    Err.IDEMPOTENCY_CONFLICT: "this idempotency_key was already used with other amounts",
}

_GIFT_MESSAGES = {
    Err.INSUFFICIENT_FUNDS: "not enough coins for this gift; recharge and retry with the same id",
    Err.IDEMPOTENCY_CONFLICT: "this id was already used for a different gift or count",
    Err.ACCOUNT_RESTRICTED: "this account cannot send gifts",
    Err.BUDGET_EXCEEDED: "this gift would pass your monthly spending cap",
}
