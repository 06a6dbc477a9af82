"""Rows the durable store reads and writes, shared by every backend. Times are integer ms."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

ORDER_PENDING = "pending"
ORDER_PAID = "paid"  # before payments had transitions: paid, credit to make (Recharges.reconcile)
ORDER_CREDITED = "credited"
ORDER_DECLINED = "declined"
ORDER_EXPIRED = "expired"
ORDER_REFUNDED = "refunded"
ORDER_DISPUTED = "disputed"
ORDER_DISPUTE_WON = "dispute_won"
ORDER_DISPUTE_LOST = "dispute_lost"
# Every status in the order an order reaches them (transitions made in one step share a time).
ORDER_STATUSES = (ORDER_PENDING, ORDER_DECLINED, ORDER_EXPIRED, ORDER_PAID, ORDER_CREDITED, ORDER_REFUNDED,
                  ORDER_DISPUTED, ORDER_DISPUTE_WON, ORDER_DISPUTE_LOST)
# An order in one of these was paid: it holds (or held) a credit movement of its coins.
ORDERS_PAID = (ORDER_PAID, ORDER_CREDITED, ORDER_REFUNDED, ORDER_DISPUTED, ORDER_DISPUTE_WON, ORDER_DISPUTE_LOST)

# Ledger accounts. Each movement's entries sum to zero per unit (double entry).
PAYMENTS_ACCOUNT = "platform:payments"  # coins issued against money received
GIFT_REVENUE_ACCOUNT = "platform:gifts"  # coins spent on gifts
DIAMOND_POOL_ACCOUNT = "platform:diamonds"  # diamonds owed to hosts
REWARDS_ACCOUNT = "platform:rewards"  # reward points issued, and coins bought with them
ADJUSTMENTS_ACCOUNT = "platform:adjustments"  # support's corrections
USER_ACCOUNT_PREFIX = "user:"
HOST_ACCOUNT_PREFIX = "host:"
# A host's diamonds held because the coins that paid for them were refunded or disputed
# (store/holds.py): host:<id> -> host_held:<id> while held, back on a won dispute.
HOST_HELD_ACCOUNT_PREFIX = "host_held:"


def user_account(user_id: str) -> str:
    return USER_ACCOUNT_PREFIX + user_id


def host_account(host_id: str) -> str:
    return HOST_ACCOUNT_PREFIX + host_id


def host_held_account(host_id: str) -> str:
    return HOST_HELD_ACCOUNT_PREFIX + host_id


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
    channel: str = "web"
    # The provider's id of the payment: webhooks name the order by it.
    payment_id: str | None = None
    decline_reason: str | None = None

    def to_json(self) -> dict[str, Any]:
        return {
            "order_id": self.id, "payment_id": self.payment_id, "user_id": self.user_id,
            "package_id": self.package_id, "coins": self.coins, "price_cents": self.price_cents,
            "currency": self.currency, "channel": self.channel, "payment_method": self.payment_method,
            "status": self.status, "decline_reason": self.decline_reason,
            "idempotency_key": self.idempotency_key, "created_at": self.created_ms,
        }


@dataclass(frozen=True, slots=True)
class Transition:
    """A status an order reached, once: keyed (order, status)."""

    order_id: str
    status: str
    at_ms: int
    # The webhook event that made it; None for the recharge request or the expiry sweep.
    event_id: str | None
    # The signed coin movement it makes: + a credit or a reversal, - a claw-back, 0 none.
    coins: int
    # When that movement was made in Redis; None while it is still to make.
    done_ms: int | None


def in_order(transitions: list[Transition]) -> list[Transition]:
    """An order's transitions as they were made."""
    return sorted(transitions, key=lambda t: (t.at_ms, ORDER_STATUSES.index(t.status)
                                              if t.status in ORDER_STATUSES else len(ORDER_STATUSES)))


@dataclass(frozen=True, slots=True)
class PaymentEvent:
    """A provider's webhook event as received, keyed by its id."""

    id: str
    provider: str
    type: str
    payment_id: str
    order_id: str
    received_ms: int
    body: str


@dataclass(frozen=True, slots=True)
class Plan:
    """What applying an outcome to an order does: the statuses it reaches, in order, with the
    coins each moves, and the decline reason to record (if any)."""

    steps: tuple[tuple[str, int], ...]
    decline_reason: str | None = None


@dataclass(frozen=True, slots=True)
class Applied:
    """The result of applying an outcome: `duplicate` when its event was applied before."""

    order: Order
    new: tuple[Transition, ...]
    duplicate: bool = False


class ReusedSequence(ValueError):
    """A movement's (partition, seq) is settled already with other content: Redis numbered a new
    movement like a settled one (it lost the partition's totals). Not a redelivery, so not to be
    dropped as one: the settler sets it aside."""


UNITS_PER_DIAMOND = 10_000
# The ledger unit of host diamonds: 1/UNITS_PER_DIAMOND of a diamond (gift shares, holds, withdrawals).
DIAMOND_UNIT = "diamond_unit"


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
