"""Rows the durable store reads and writes, shared by every backend."""

from __future__ import annotations

import json
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
        seq = int(f["seq"])
        entry = f.get("j")
        if entry is not None:  # send_gift.lua since the JSON entry (gift_entry below)
            p, uid, name, host, room, gift, n, coins, bp, ts, cid = json.loads(entry)
            return cls(p, seq, kind, uid, coins, ts, "", "", f"g{p}-{seq}", name, host, room, gift, n, bp, cid)
        # A field per attribute: entries written before the JSON entry, still read after an upgrade.
        return cls(int(f["p"]), seq, kind, f["uid"], int(f["c"]), int(f["ts"]), "", "",
                   f["id"], f.get("name", ""), f["host"], f["room"], f["gift"], int(f["n"]), int(f["bp"]),
                   f.get("cid", ""))


def outbox_fields(m: Movement) -> dict[str, str | int]:
    """The outbox fields `m` was read from (Movement.from_fields reads them back)."""
    if m.kind == "c":
        return {"k": "c", "p": m.partition, "seq": m.seq, "uid": m.user_id, "c": m.coins, "kind": m.credit_kind,
                "order": m.order_id, "ts": m.ts_ms}
    return {"k": m.kind, "seq": m.seq, "j": gift_entry(m.partition, m.user_id, m.sender_name, m.host_id, m.room_id,
                                                       m.gift, m.count, m.coins, m.share_bp, m.ts_ms, m.client_id)}


def gift_entry(partition: int, sender_id: str, sender_name: str, host_id: str, room_id: str, gift: str,
               count: int, coins: int, share_bp: int, ts_ms: int, client_id: str) -> str:
    """A gift as send_gift.lua appends it to the outbox (its 'j' field), beside its seq; the
    settler's Movement.from_fields reads it back. One field rather than one per attribute: fewer
    bytes in the AOF, the stream and the settler's reads."""
    return _dumps([partition, sender_id, sender_name, host_id, room_id, gift, count, coins, share_bp, ts_ms,
                   client_id])


_dumps = json.JSONEncoder(ensure_ascii=False, separators=(",", ":")).encode


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
    created_at: float
    ended_at: float | None


@dataclass(frozen=True, slots=True)
class PartitionTotals:
    count: int
    credited: int
    spent: int
