"""Rows a settled batch writes, built from movements not seen before.

PostgreSQL COPYs these. SQLite derives the same rows in SQL from staged movements
(sqlite_settle.py), so that its thread binds few values; tests/test_store_settle.py pins the rows
of both backends column by column, so the two derivations cannot drift apart.

The row functions are generators: COPY encodes each row as it is made and drops it, so a
batch's six rows per gift never all exist at once (they were most of the settler's
garbage-collector work when built as lists).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from server.movement import KEYED, Kind, Movement
from server.store.models import (
    ADJUSTMENTS_ACCOUNT,
    DIAMOND_POOL_ACCOUNT,
    DIAMOND_UNIT,
    GIFT_REVENUE_ACCOUNT,
    HOST_ACCOUNT_PREFIX,
    PAYMENTS_ACCOUNT,
    REWARDS_ACCOUNT,
    USER_ACCOUNT_PREFIX,
)

MovementRow = tuple[int, int, str, str, int, str, int, int]
GiftRow = tuple[str, int, int, str, str, str, str, str, int, int, int, int, str, int, int]
LedgerRow = tuple[int, int, int, str, str, int]

GIFT = Kind.GIFT
CREDIT = Kind.CREDIT
# The other side of a keyed movement's legs: claw-backs and reversals return coins to (or take
# them from) payments, where they were issued.
COUNTER_ACCOUNT = {Kind.REFUND: PAYMENTS_ACCOUNT, Kind.DISPUTE: PAYMENTS_ACCOUNT,
                   Kind.DISPUTE_REVERSAL: PAYMENTS_ACCOUNT, Kind.REWARD: REWARDS_ACCOUNT,
                   Kind.ADJUSTMENT: ADJUSTMENTS_ACCOUNT, Kind.CHECK_IN: REWARDS_ACCOUNT,
                   Kind.POINTS_GRANT: REWARDS_ACCOUNT}


def movement_rows(movements: list[Movement]) -> Iterator[MovementRow]:
    """(part, seq, kind, user_id, coins, ref, ts_ms, points): a movements row, and what a redelivery is
    compared with."""
    for m in movements:
        yield (m.partition, m.seq, m.kind, m.user_id, m.coins, m.gift_id if m.kind is GIFT else m.order_id,
               m.ts_ms, m.points)


def gift_rows(movements: list[Movement], now_ms: int) -> Iterator[GiftRow]:
    for m in movements:
        if m.kind is GIFT:
            yield (m.gift_id, m.partition, m.seq, m.user_id, m.sender_name, m.host_id, m.room_id, m.gift, m.count,
                   m.coins, m.share_bp, m.diamond_units, m.client_id, m.ts_ms, now_ms)


def ledger_rows(movements: list[Movement]) -> Iterator[LedgerRow]:
    """Double entry: each movement's legs sum to zero per unit."""
    for m in movements:
        p, s, coins = m.partition, m.seq, m.coins
        if m.kind is CREDIT:  # coins from payments to the user
            yield p, s, 0, PAYMENTS_ACCOUNT, "coin", -coins
            yield p, s, 1, USER_ACCOUNT_PREFIX + m.user_id, "coin", coins
            continue
        if m.kind in KEYED:
            yield from keyed_legs(m)
            continue
        # a gift: coins from the user to gift revenue, diamond units from the pool to the host
        units = m.diamond_units
        yield p, s, 0, USER_ACCOUNT_PREFIX + m.user_id, "coin", -coins
        yield p, s, 1, GIFT_REVENUE_ACCOUNT, "coin", coins
        yield p, s, 2, DIAMOND_POOL_ACCOUNT, DIAMOND_UNIT, -units
        yield p, s, 3, HOST_ACCOUNT_PREFIX + m.host_id, DIAMOND_UNIT, units


def keyed_legs(m: Movement) -> Iterator[LedgerRow]:
    """A keyed movement's legs: its signed coin change between its counter account and the user
    (legs 0, 1), and its signed points change the same way (legs 2, 3); a zero change has none."""
    p, s, user, counter = m.partition, m.seq, USER_ACCOUNT_PREFIX + m.user_id, COUNTER_ACCOUNT[m.kind]
    if m.coins:
        yield p, s, 0, counter, "coin", -m.coins
        yield p, s, 1, user, "coin", m.coins
    if m.points:
        yield p, s, 2, counter, "point", -m.points
        yield p, s, 3, user, "point", m.points


def host_credit(movements: list[Movement]) -> dict[str, list[int]]:
    """host -> [diamond units, gifts received] from the batch's gifts."""
    hosts: dict[str, list[int]] = {}
    for m in movements:
        if m.kind is GIFT:
            units = m.diamond_units
            host = hosts.get(m.host_id)
            if host is None:
                hosts[m.host_id] = [units, 1]
            else:
                host[0] += units
                host[1] += 1
    return hosts


# A UTC day in ms: host_days.day is a gift's sent_ms // DAY_MS (days since 1970-01-01).
DAY_MS = 86_400_000


def host_days(movements: list[Movement]) -> dict[tuple[str, int], list[int]]:
    """(host, UTC day) -> [diamond units, gifts] from the batch's gifts."""
    days: dict[tuple[str, int], list[int]] = {}
    for m in movements:
        if m.kind is GIFT:
            key = (m.host_id, m.ts_ms // DAY_MS)
            day = days.get(key)
            if day is None:
                days[key] = [m.diamond_units, 1]
            else:
                day[0] += m.diamond_units
                day[1] += 1
    return days


def credited_orders(movements: list[Movement]) -> list[str]:
    return [m.order_id for m in movements if m.kind is CREDIT]


# --- rows read back -------------------------------------------------------------------------

def kind_totals(rows: Any) -> dict[str, dict[str, tuple[int, int]]]:
    """user -> kind -> (coins, points) from rows of queries.WALLET_KIND_TOTALS."""
    out: dict[str, dict[str, tuple[int, int]]] = {}
    for user, kind, coins, points in rows:
        out.setdefault(user, {})[kind] = (int(coins), int(points))
    return out


def movement_of(user_id: str, r: Any) -> Movement:
    """A movement from a row of queries.USER_MOVEMENTS (part, seq, kind, coins, ref, ts_ms, points)."""
    kind = Kind(r[2])
    ref = str(r[4])
    if kind is Kind.GIFT:
        return Movement(int(r[0]), int(r[1]), kind, user_id, int(r[3]), int(r[5]), gift_id=ref)
    return Movement(int(r[0]), int(r[1]), kind, user_id, int(r[3]), int(r[5]), ref, points=int(r[6]))
