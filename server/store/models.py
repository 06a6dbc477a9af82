"""Rows the durable store reads and writes, shared by every backend."""

from __future__ import annotations

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
    created_at: float

    def to_json(self) -> dict[str, Any]:
        return {
            "order_id": self.id, "user_id": self.user_id, "package_id": self.package_id,
            "coins": self.coins, "price_cents": self.price_cents, "currency": self.currency,
            "payment_method": self.payment_method, "status": self.status,
            "idempotency_key": self.idempotency_key, "created_at": self.created_at,
        }


@dataclass(frozen=True, slots=True)
class Movement:
    """One coin movement from a partition's outbox: a credit ('c') or a gift ('g')."""

    partition: int
    seq: int
    kind: str
    user_id: str
    coins: int
    ts_ms: int
    # credits
    order_id: str = ""
    credit_kind: str = ""
    # gifts
    gift_id: str = ""
    sender_name: str = ""
    host_id: str = ""
    room_id: str = ""
    gift: str = ""
    count: int = 0
    share_bp: int = 0
    client_id: str = ""

    @property
    def diamond_units(self) -> int:
        """Host share in 1/10000 diamond: coins * basis points, exact."""
        return self.coins * self.share_bp

    @classmethod
    def from_fields(cls, f: dict[str, str]) -> Movement:
        # Positional, in field order: a settler builds one per outbox entry, and keyword
        # arguments gathered in a dict cost a third more.
        kind = f["k"]
        if kind == "c":
            return cls(int(f["p"]), int(f["seq"]), kind, f["uid"], int(f["c"]), int(f["ts"]),
                       f["order"], f.get("kind", "recharge"))
        return cls(int(f["p"]), int(f["seq"]), kind, f["uid"], int(f["c"]), int(f["ts"]), "", "",
                   f["id"], f.get("name", ""), f["host"], f["room"], f["gift"], int(f["n"]), int(f["bp"]),
                   f.get("cid", ""))


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
    created_at: float
    ended_at: float | None


@dataclass(frozen=True, slots=True)
class PartitionTotals:
    count: int
    credited: int
    spent: int
