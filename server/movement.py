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

Gifts and credits carry their amount in `coins` (a gift takes it, a credit gives it). Every other
kind is a *keyed* movement (wallet/move.lua, exactly once per (kind, user, ref)): `coins` and
`points` are the signed changes it made to the two balances (a refund's coins are negative), and
`order_id` holds its reference (the order it claws back, the grant's key, the check-in day).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from enum import StrEnum


class Kind(StrEnum):
    """What a movement does; its value is the name the ledger's movements table holds."""

    GIFT = "gift"
    CREDIT = "credit"  # coins for a paid recharge order (or an admin grant)
    REFUND = "refund"  # a refunded order's coins taken back (the balance may go negative)
    DISPUTE = "dispute"  # a disputed (charged-back) order's coins taken back
    DISPUTE_REVERSAL = "dispute_reversal"  # a won dispute gives them back
    REWARD = "reward"  # points redeemed into coins
    ADJUSTMENT = "adjustment"  # support's signed correction of a balance
    CHECK_IN = "check_in"  # the daily check-in's points
    POINTS_GRANT = "points_grant"  # points granted by an admin
    # Reserved for the creator side; no script makes it yet.
    WITHDRAWAL = "withdrawal"

    @property
    def code(self) -> str:
        """The one-letter code an outbox entry carries in its `k` field."""
        return _CODE[self]


_CODE = {Kind.GIFT: "g", Kind.CREDIT: "c", Kind.REFUND: "r", Kind.DISPUTE: "d", Kind.DISPUTE_REVERSAL: "v",
         Kind.REWARD: "w", Kind.ADJUSTMENT: "a", Kind.CHECK_IN: "i", Kind.POINTS_GRANT: "p", Kind.WITHDRAWAL: "x"}
_BY_CODE = {code: kind for kind, code in _CODE.items()}

# Kinds move.lua makes, each exactly once per (kind, user, ref).
KEYED = frozenset({Kind.REFUND, Kind.DISPUTE, Kind.DISPUTE_REVERSAL, Kind.REWARD, Kind.ADJUSTMENT, Kind.CHECK_IN,
                   Kind.POINTS_GRANT})
# Kinds that change the coin balance, as GET /v1/wallet/transactions names them (a credit is a recharge).
COIN_KINDS = frozenset({Kind.GIFT, Kind.CREDIT, Kind.REFUND, Kind.DISPUTE, Kind.DISPUTE_REVERSAL, Kind.REWARD,
                        Kind.ADJUSTMENT})
# The wallet hash's running sums, per keyed kind (coin field, points field): `audit` checks
# coins = credited + rewarded + adjusted - spent - clawed + reversed, points = points_earned - points_redeemed.
# The claw-backs and redemptions are kept as positive sums, so each field only grows (but adjusted, signed).
COUNTERS: dict[Kind, tuple[str, int, str, int]] = {
    # kind: (coin field, sign applied to the coin change, points field, sign applied to the points change)
    Kind.REFUND: ("clawed", -1, "", 0),
    Kind.DISPUTE: ("clawed", -1, "", 0),
    Kind.DISPUTE_REVERSAL: ("reversed", 1, "", 0),
    Kind.REWARD: ("rewarded", 1, "points_redeemed", -1),
    Kind.ADJUSTMENT: ("adjusted", 1, "", 0),
    Kind.CHECK_IN: ("", 0, "points_earned", 1),
    Kind.POINTS_GRANT: ("", 0, "points_earned", 1),
}


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
    # keyed kinds: the points change, and why (a person's words, for support and the history)
    points: int = 0
    reason: str = ""

    @property
    def signed_coins(self) -> int:
        """The change to the user's coin balance: a gift's coins are taken, a credit's given."""
        return -self.coins if self.kind is Kind.GIFT else self.coins

    @property
    def diamond_units(self) -> int:
        """Host share in 1/10000 diamond: coins * basis points, exact."""
        return self.coins * self.share_bp

    @property
    def ref(self) -> str:
        """What the movement is about: the gift id, the order's id, or a keyed movement's reference."""
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


def keyed_body(partition: int, user_id: str, coins: int, points: int, ts_ms: int, ref: str, reason: str) -> str:
    """A keyed movement's `j` field, as move.lua appends it."""
    return _dumps([partition, user_id, coins, points, ts_ms, ref, reason])


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
    if kind in KEYED:
        p, uid, coins, points, ts, ref, reason = json.loads(body)
        return Movement(p, seq, kind, uid, coins, ts, ref, points=points, reason=reason)
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
    elif m.kind in KEYED:
        body = keyed_body(m.partition, m.user_id, m.coins, m.points, m.ts_ms, m.order_id, m.reason)
    else:
        raise ValueError(f"no outbox layout for movements of kind {m.kind} yet")
    return {"k": m.kind.code, "seq": m.seq, "j": body}


_dumps = json.JSONEncoder(ensure_ascii=False, separators=(",", ":")).encode
