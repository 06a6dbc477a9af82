"""Rows a settled batch writes, built from movements not seen before.

PostgreSQL COPYs these. SQLite derives the same rows in SQL from staged movements
(sqlite_settle.py), so that its thread binds few values; tests/test_store.py pins the rows
of both backends column by column, so the two derivations cannot drift apart.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field

from server.store.models import (
    DIAMOND_POOL_ACCOUNT,
    GIFT_REVENUE_ACCOUNT,
    PAYMENTS_ACCOUNT,
    Movement,
    host_account,
    user_account,
)

MovementRow = tuple[int, int, str, str, int, str, float]
GiftRow = tuple[str, int, int, str, str, str, str, str, int, int, int, int, str, float, float]
LedgerRow = tuple[int, int, int, str, str, int]


@dataclass
class BatchRows:
    movements: list[MovementRow] = field(default_factory=list)
    gifts: list[GiftRow] = field(default_factory=list)
    ledger: list[LedgerRow] = field(default_factory=list)
    credited_orders: list[str] = field(default_factory=list)
    # host -> (diamond units, gifts)
    hosts: dict[str, list[int]] = field(default_factory=lambda: defaultdict(lambda: [0, 0]))


def build(movements: list[Movement], now: float) -> BatchRows:
    rows = BatchRows()
    for m in movements:
        at = m.ts_ms / 1000.0
        if m.kind == "c":
            rows.movements.append((m.partition, m.seq, "credit", m.user_id, m.coins, m.order_id, at))
            rows.ledger.append((m.partition, m.seq, 0, PAYMENTS_ACCOUNT, "coin", -m.coins))
            rows.ledger.append((m.partition, m.seq, 1, user_account(m.user_id), "coin", m.coins))
            rows.credited_orders.append(m.order_id)
            continue
        units = m.diamond_units
        rows.movements.append((m.partition, m.seq, "gift", m.user_id, m.coins, m.gift_id, at))
        rows.gifts.append((m.gift_id, m.partition, m.seq, m.user_id, m.sender_name, m.host_id, m.room_id,
                           m.gift, m.count, m.coins, m.share_bp, units, m.client_id, at, now))
        rows.ledger.append((m.partition, m.seq, 0, user_account(m.user_id), "coin", -m.coins))
        rows.ledger.append((m.partition, m.seq, 1, GIFT_REVENUE_ACCOUNT, "coin", m.coins))
        rows.ledger.append((m.partition, m.seq, 2, DIAMOND_POOL_ACCOUNT, "diamond_unit", -units))
        rows.ledger.append((m.partition, m.seq, 3, host_account(m.host_id), "diamond_unit", units))
        host = rows.hosts[m.host_id]
        host[0] += units
        host[1] += 1
    return rows
