"""SQL both backends run as written, once, with `?` placeholders.

SQLite takes them as they are; PostgreSQL's asyncpg wants `$1, $2, ...`, which `numbered`
gives (postgres.py converts each statement once, at import). Settlement itself differs per
backend (sqlite_settle.py stages and derives rows in SQL, postgres.py COPYs them) and stays
with each backend.
"""

from __future__ import annotations

import itertools
import re

UPSERT_USER = ("INSERT INTO users (id, name, created_ms) VALUES (?, ?, ?)"
               " ON CONFLICT (id) DO UPDATE SET name = excluded.name")

# orders
_ORDER_SELECT = ("SELECT id, user_id, idempotency_key, package_id, coins, price_cents, currency, payment_method,"
                 " status, created_ms FROM orders")
# created_ms is given twice: once as created, once as updated.
INSERT_ORDER = (
    "INSERT INTO orders (id, user_id, idempotency_key, package_id, coins, price_cents, currency,"
    " payment_method, status, created_ms, updated_ms) VALUES (?,?,?,?,?,?,?,?,?,?,?)"
    " ON CONFLICT (user_id, idempotency_key) DO NOTHING")
ORDER_BY_KEY = _ORDER_SELECT + " WHERE user_id = ? AND idempotency_key = ?"
ORDER_BY_ID = _ORDER_SELECT + " WHERE id = ?"
ORDERS_WITH_STATUS = _ORDER_SELECT + " WHERE status = ? ORDER BY created_ms LIMIT ?"
SET_ORDER_STATUS = "UPDATE orders SET status = ?, updated_ms = ? WHERE id = ?"
SET_ORDER_STATUS_FROM = SET_ORDER_STATUS + " AND status = ?"

# rooms
INSERT_ROOM = "INSERT INTO rooms (id, host_id, title, created_ms, ended_ms) VALUES (?,?,?,?,?)"
END_ROOM = "UPDATE rooms SET ended_ms = ? WHERE id = ? AND ended_ms IS NULL"
ROOM_BY_ID = "SELECT id, host_id, title, created_ms, ended_ms FROM rooms WHERE id = ?"

# figures: earnings, audit, rebuild
EARNINGS = "SELECT diamond_units, gifts_received FROM host_earnings WHERE host_id = ?"
PARTITION_TOTALS = (
    "SELECT COUNT(*), COALESCE(SUM(CASE WHEN kind = 'credit' THEN coins END), 0),"
    " COALESCE(SUM(CASE WHEN kind = 'gift' THEN coins END), 0) FROM movements WHERE part = ? AND seq <= ?")
WALLET_TOTALS = (
    "SELECT user_id, COALESCE(SUM(CASE WHEN kind = 'credit' THEN coins END), 0),"
    " COALESCE(SUM(CASE WHEN kind = 'gift' THEN coins END), 0) FROM movements GROUP BY user_id")
# The four diamond figures, read in one snapshot.
GIFT_DIAMONDS = "SELECT COALESCE(SUM(diamond_units), 0), COUNT(*) FROM gifts"
HOST_DIAMONDS = "SELECT COALESCE(SUM(diamond_units), 0), COALESCE(SUM(gifts_received), 0) FROM host_earnings"
LEDGER_HOST_DIAMONDS = ("SELECT COALESCE(SUM(delta), 0) FROM ledger"
                        " WHERE unit = 'diamond_unit' AND account LIKE 'host:%'")
UNBALANCED_UNITS = "SELECT COUNT(*) FROM (SELECT unit FROM ledger GROUP BY unit HAVING SUM(delta) <> 0) AS u"
# Double entry per movement: (part, seq, unit, sum) of the first offenders, and how many there
# are in all (the window counts the groups before LIMIT). One pass over the ledger in key order.
UNBALANCED_MOVEMENTS = (
    "SELECT part, seq, unit, SUM(delta), COUNT(*) OVER () FROM ledger GROUP BY part, seq, unit"
    " HAVING SUM(delta) <> 0 ORDER BY part, seq, unit LIMIT ?")


def numbered(sql: str) -> str:
    """`?` placeholders as asyncpg's `$1, $2, ...` (none of our statements has `?` in a literal)."""
    counter = itertools.count(1)
    return re.sub(r"\?", lambda _m: f"${next(counter)}", sql)
