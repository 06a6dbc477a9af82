"""SQL both backends run as written, once, with `?` placeholders.

SQLite takes them as they are; PostgreSQL's asyncpg wants `$1, $2, ...`, which `numbered`
gives (postgres.py converts each statement once, at import). Settlement itself differs per
backend (sqlite_settle.py stages and derives rows in SQL, postgres.py COPYs them) and stays
with each backend.
"""

from __future__ import annotations

import functools
import itertools
import re

from server.store.models import ORDERS_PAID

UPSERT_USER = ("INSERT INTO users (id, name, created_ms) VALUES (?, ?, ?)"
               " ON CONFLICT (id) DO UPDATE SET name = excluded.name")

# orders
_ORDER_COLUMNS = ("id, user_id, idempotency_key, package_id, coins, price_cents, currency, payment_method, status,"
                  " created_ms, channel, payment_id, decline_reason")
_ORDER_SELECT = f"SELECT {_ORDER_COLUMNS} FROM orders"
# created_ms is given twice: once as created, once as updated.
INSERT_ORDER = (
    "INSERT INTO orders (id, user_id, idempotency_key, package_id, coins, price_cents, currency,"
    " payment_method, status, created_ms, channel, payment_id, decline_reason, updated_ms)"
    " VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?)"
    " ON CONFLICT (user_id, idempotency_key) DO NOTHING")
ORDER_BY_KEY = _ORDER_SELECT + " WHERE user_id = ? AND idempotency_key = ?"
ORDER_BY_ID = _ORDER_SELECT + " WHERE id = ?"
ORDER_BY_PAYMENT = _ORDER_SELECT + " WHERE payment_id = ?"
ORDERS_WITH_STATUS = _ORDER_SELECT + " WHERE status = ? ORDER BY created_ms LIMIT ?"
SET_ORDER_STATUS = "UPDATE orders SET status = ?, updated_ms = ? WHERE id = ?"
SET_ORDER_STATUS_FROM = SET_ORDER_STATUS + " AND status = ?"
# A user's orders newest first, from a cursor (created_ms, id) exclusive.
USER_ORDERS = _ORDER_SELECT + " WHERE user_id = ? ORDER BY created_ms DESC, id DESC LIMIT ?"
USER_ORDERS_BEFORE = (_ORDER_SELECT + " WHERE user_id = ? AND (created_ms < ? OR (created_ms = ? AND id < ?))"
                      " ORDER BY created_ms DESC, id DESC LIMIT ?")
PENDING_BEFORE = _ORDER_SELECT + " WHERE status = 'pending' AND created_ms < ? ORDER BY created_ms LIMIT ?"
# Applying an outcome (payments/recharges.py): transitions keyed (order, status).
_TRANSITION_COLUMNS = "order_id, status, at_ms, event_id, coins, done_ms"
INSERT_TRANSITION = f"INSERT INTO order_transitions ({_TRANSITION_COLUMNS}) VALUES (?,?,?,?,?,?)"
ORDER_TRANSITIONS = f"SELECT {_TRANSITION_COLUMNS} FROM order_transitions WHERE order_id = ? ORDER BY at_ms, status"
TRANSITIONS_TODO = (f"SELECT {_TRANSITION_COLUMNS} FROM order_transitions WHERE done_ms IS NULL"
                    " ORDER BY at_ms LIMIT ?")
TRANSITION_DONE = "UPDATE order_transitions SET done_ms = ? WHERE order_id = ? AND status = ? AND done_ms IS NULL"
APPLY_ORDER = "UPDATE orders SET status = ?, decline_reason = COALESCE(?, decline_reason), updated_ms = ? WHERE id = ?"
INSERT_EVENT = (
    "INSERT INTO payment_events (id, provider, type, payment_id, order_id, outcome, received_ms, body)"
    " VALUES (?,?,?,?,?,?,?,?) ON CONFLICT (id) DO NOTHING")
SET_EVENT_OUTCOME = "UPDATE payment_events SET outcome = ? WHERE id = ?"
# audit: every applied event made transitions and every transition an event made names it; every
# paid order's credit is one movement of its coins, no credit names an order that was not paid,
# and no order's claw-back or reversal was made twice.
TRANSITIONS_WITHOUT_EVENT = (
    "SELECT COUNT(*) FROM order_transitions t WHERE t.event_id IS NOT NULL AND NOT EXISTS"
    " (SELECT 1 FROM payment_events e WHERE e.id = t.event_id AND e.outcome = 'applied' AND e.order_id = t.order_id)")
# A claw-back or reversal settled twice for one order (each is keyed (kind, order) in Redis).
CLAWBACKS_TWICE = (
    "SELECT kind, ref, COUNT(*) FROM movements WHERE kind IN ('refund', 'dispute', 'dispute_reversal')"
    " GROUP BY kind, ref HAVING COUNT(*) > 1 ORDER BY kind, ref LIMIT ?")
EVENTS_WITHOUT_TRANSITIONS = (
    "SELECT COUNT(*) FROM payment_events e WHERE e.outcome = 'applied'"
    " AND NOT EXISTS (SELECT 1 FROM order_transitions t WHERE t.event_id = e.id)")
EVENT_FIGURES = ("SELECT COUNT(*), COALESCE(SUM(CASE WHEN outcome = 'applied' THEN 1 ELSE 0 END), 0)"
                 " FROM payment_events")
_PAID = ",".join(f"'{status}'" for status in ORDERS_PAID)
# A paid order whose credit is still to make (between the SQL commit and Redis) is not asked about.
PAID_ORDERS = (
    f"SELECT o.id, o.user_id, o.coins FROM orders o WHERE o.status IN ({_PAID}) AND NOT EXISTS"
    " (SELECT 1 FROM order_transitions t WHERE t.order_id = o.id AND t.status = 'credited' AND t.done_ms IS NULL)"
    " ORDER BY o.id")
CREDITS_OF_UNPAID_ORDERS = (
    "SELECT m.ref, o.status FROM movements m JOIN orders o ON o.id = m.ref"
    f" WHERE m.kind = 'credit' AND o.status NOT IN ({_PAID}) ORDER BY m.ref LIMIT ?")
CREDITS_PER_ORDER = (
    "SELECT m.ref, COUNT(*), SUM(m.coins), MIN(o.coins) FROM movements m JOIN orders o ON o.id = m.ref"
    " WHERE m.kind = 'credit' GROUP BY m.ref HAVING COUNT(*) <> 1 OR SUM(m.coins) <> MIN(o.coins)"
    " ORDER BY m.ref LIMIT ?")

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
# A host's diamonds sit on host:<id>, or on host_held:<id> while a refund or dispute holds them.
# Every diamond hosts were ever credited, wherever it is now: available, held, reserved, paid out.
LEDGER_HOST_DIAMONDS = ("SELECT COALESCE(SUM(delta), 0) FROM ledger WHERE unit = 'diamond_unit' AND (account LIKE"
                        " 'host:%' OR account LIKE 'host_held:%' OR account LIKE 'host_reserved:%'"
                        " OR account = 'platform:payouts')")
UNBALANCED_UNITS = "SELECT COUNT(*) FROM (SELECT unit FROM ledger GROUP BY unit HAVING SUM(delta) <> 0) AS u"
# Double entry per movement: (part, seq, unit, sum) of the first offenders, and how many there
# are in all (the window counts the groups before LIMIT). One pass over the ledger in key order.
UNBALANCED_MOVEMENTS = (
    "SELECT part, seq, unit, SUM(delta), COUNT(*) OVER () FROM ledger GROUP BY part, seq, unit"
    " HAVING SUM(delta) <> 0 ORDER BY part, seq, unit LIMIT ?")


# coin economy: per-kind figures of keyed movements (audit, rebuild) and a user's statement
PARTITION_KIND_TOTALS = (
    "SELECT kind, COALESCE(SUM(coins), 0), COALESCE(SUM(points), 0) FROM movements"
    " WHERE part = ? AND seq <= ? AND kind NOT IN ('gift', 'credit') GROUP BY kind")
WALLET_KIND_TOTALS = (
    "SELECT user_id, kind, COALESCE(SUM(coins), 0), COALESCE(SUM(points), 0) FROM movements"
    " WHERE kind NOT IN ('gift', 'credit') GROUP BY user_id, kind")
# Newest first, strictly before the cursor's sequence number (movements_user_seq, 0003_wallet.sql).
USER_MOVEMENTS = (
    "SELECT part, seq, kind, coins, ref, ts_ms, points FROM movements"
    " WHERE user_id = ? AND seq < ? AND kind NOT IN ('check_in', 'points_grant') ORDER BY seq DESC LIMIT ?")


@functools.cache
def numbered(sql: str) -> str:
    """`?` placeholders as asyncpg's `$1, $2, ...` (none of our statements has `?` in a literal),
    converted once a statement: every PostgreSQL half of the store calls it per query."""
    counter = itertools.count(1)
    return re.sub(r"\?", lambda _m: f"${next(counter)}", sql)

# One ledger leg: settlement's legs (SQLite), a hold's and a withdrawal's.
INSERT_LEDGER_LEG = "INSERT INTO ledger (part, seq, leg, account, unit, delta) VALUES (?,?,?,?,?,?)"
