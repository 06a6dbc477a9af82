"""Rows the durable store reads and writes, shared by every backend. Times are integer ms."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

ORDER_PENDING = "pending"
ORDER_PAID = "paid"
ORDER_CREDITED = "credited"
ORDER_DECLINED = "declined"

# Ledger accounts. Each movement's entries sum to zero per unit (double entry).
PAYMENTS_ACCOUNT = "platform:payments"  # coins issued against money received
GIFT_REVENUE_ACCOUNT = "platform:gifts"  # coins spent on gifts
DIAMOND_POOL_ACCOUNT = "platform:diamonds"  # diamonds owed to hosts
USER_ACCOUNT_PREFIX = "user:"
HOST_ACCOUNT_PREFIX = "host:"


def user_account(user_id: str) -> str:
    return USER_ACCOUNT_PREFIX + user_id


def host_account(host_id: str) -> str:
    return HOST_ACCOUNT_PREFIX + host_id


@dataclass(frozen=True, slots=True)
class Order:
    id: str
    user_id: str
    idempotency_key: str
    package_id: str
    coins: int
    price_cents: int
    currency: str
    payment_method: str
    status: str
    created_ms: int

    def to_json(self) -> dict[str, Any]:
        return {
            "order_id": self.id, "user_id": self.user_id, "package_id": self.package_id,
            "coins": self.coins, "price_cents": self.price_cents, "currency": self.currency,
            "payment_method": self.payment_method, "status": self.status,
            "idempotency_key": self.idempotency_key, "created_at": self.created_ms,
        }


class ReusedSequence(ValueError):
    """A movement's (partition, seq) is settled already with other content: Redis numbered a new
    movement like a settled one (it lost the partition's totals). Not a redelivery, so not to be
    dropped as one: the settler sets it aside."""


UNITS_PER_DIAMOND = 10_000


@dataclass(frozen=True, slots=True)
class SettleResult:
    movements: int
    gifts: int
    credits: int
    duplicates: int


@dataclass(frozen=True, slots=True)
class Room:
    id: str
    host_id: str
    title: str
    created_ms: int
    ended_ms: int | None


@dataclass(frozen=True, slots=True)
class PartitionTotals:
    count: int
    credited: int
    spent: int


def now_ms() -> int:
    """The wall clock in integer milliseconds, the ledger's one unit of time."""
    return time.time_ns() // 1_000_000
