"""A coin movement, and the one codec of its outbox entry. Pure: no I/O.

Every change of a balance is a movement: one typed value, numbered per partition by the Lua
script that makes it, appended to the partition's outbox and settled into the ledger keyed by
(partition, seq). Every script writes the same entry, three fields:

    k    the kind's one-letter code (Kind.code)
    seq  the number the script gave it
    j    the rest as a JSON array, built here in Python and passed to the script as an ARGV

The script only adds the number. One JSON field rather than a field per attribute: fewer
bytes in the AOF, the stream and the settler's reads (about half the AOF bytes per gift of a
field per attribute). Only this module encodes or decodes an entry: scripts, settler, audit,
rebuild and quarantine all go through it. A new kind adds a member to Kind, a body layout
below, and its ledger legs (store/rows.py, store/sqlite_settle.py).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from enum import StrEnum


class Kind(StrEnum):
    """What a movement does; its value is the name the ledger's movements table holds."""

    GIFT = "gift"
    CREDIT = "credit"  # coins for a paid recharge order (or an admin grant)
    # Reserved for the coin economy and the creator side; no script makes them yet.
    REFUND = "refund"
    REWARD = "reward"
    ADJUSTMENT = "adjustment"
    WITHDRAWAL = "withdrawal"

    @property
    def code(self) -> str:
        """The one-letter code an outbox entry carries in its `k` field."""
        return _CODE[self]


_CODE = {Kind.GIFT: "g", Kind.CREDIT: "c", Kind.REFUND: "r", Kind.REWARD: "w", Kind.ADJUSTMENT: "a",
         Kind.WITHDRAWAL: "x"}
_BY_CODE = {code: kind for kind, code in _CODE.items()}


@dataclass(frozen=True, slots=True)
class Movement:
    """One coin movement from a partition's outbox."""

    partition: int
    seq: int
    kind: Kind
    user_id: str
    coins: int
    ts_ms: int
    # credits
    order_id: str = ""
    credit_kind: str = ""  # recharge | grant
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

    @property
    def ref(self) -> str:
        """What the movement is about: the gift id, or the credited order's id."""
        return self.gift_id if self.kind is Kind.GIFT else self.order_id

    @classmethod
    def from_fields(cls, f: dict[str, str]) -> Movement:
        """The movement of an outbox (or quarantine) entry's fields."""
        return decode(f["k"], f["seq"], f["j"])


def gift_id(partition: int, seq: int) -> str:
    """A gift's id: send_gift.lua makes it from gift_id_prefix and the number it gives."""
    return f"g{partition}-{seq}"


def gift_id_prefix(partition: int) -> str:
    return f"g{partition}-"


def gift_body(partition: int, sender_id: str, sender_name: str, host_id: str, room_id: str, gift: str,
              count: int, coins: int, share_bp: int, ts_ms: int, client_id: str) -> str:
    """A gift's `j` field, as send_gift.lua appends it."""
    return _dumps([partition, sender_id, sender_name, host_id, room_id, gift, count, coins, share_bp, ts_ms,
                   client_id])


def credit_body(partition: int, user_id: str, coins: int, ts_ms: int, order_id: str, credit_kind: str) -> str:
    """A credit's `j` field, as credit.lua appends it."""
    return _dumps([partition, user_id, coins, ts_ms, order_id, credit_kind])


def decode(code: str, seq_text: str, body: str) -> Movement:
    """The movement of one entry's three fields (k, seq, j)."""
    # Positional, in field order: the settler builds tens of thousands a second, and keyword
    # arguments gathered in a dict cost a third more.
    kind = _BY_CODE[code]
    seq = int(seq_text)
    if kind is Kind.GIFT:
        p, uid, name, host, room, gift, n, coins, bp, ts, cid = json.loads(body)
        return Movement(p, seq, kind, uid, coins, ts, "", "", f"g{p}-{seq}", name, host, room, gift, n, bp, cid)
    if kind is Kind.CREDIT:
        p, uid, coins, ts, order, credit_kind = json.loads(body)
        return Movement(p, seq, kind, uid, coins, ts, order, credit_kind)
    raise ValueError(f"no outbox layout for movements of kind {kind} yet")


def from_flat(flat: list[str]) -> Movement:
    """The movement of an entry's fields as Redis replies them, [name, value, name, value, ...]."""
    # Every writer appends k, seq, j in that order: read them by position, no dict per entry.
    if len(flat) == 6 and flat[0] == "k" and flat[2] == "seq" and flat[4] == "j":
        return decode(flat[1], flat[3], flat[5])
    it = iter(flat)
    return Movement.from_fields(dict(zip(it, it, strict=True)))


def encode(m: Movement) -> dict[str, str | int]:
    """The fields of `m`'s outbox entry: Movement.from_fields reads `m` back from them."""
    if m.kind is Kind.GIFT:
        body = gift_body(m.partition, m.user_id, m.sender_name, m.host_id, m.room_id, m.gift, m.count, m.coins,
                         m.share_bp, m.ts_ms, m.client_id)
    elif m.kind is Kind.CREDIT:
        body = credit_body(m.partition, m.user_id, m.coins, m.ts_ms, m.order_id, m.credit_kind)
    else:
        raise ValueError(f"no outbox layout for movements of kind {m.kind} yet")
    return {"k": m.kind.code, "seq": m.seq, "j": body}


_dumps = json.JSONEncoder(ensure_ascii=False, separators=(",", ":")).encode
