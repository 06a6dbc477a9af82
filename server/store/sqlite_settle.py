"""How a batch settles in SQLite: movements staged in a temp table, every row derived in SQL.

sqlite3 holds the GIL while it binds parameters and lets it go while SQLite runs a statement.
executemany() over built rows (six per gift: movement, gift, four ledger legs) bound 46
values and took the GIL back six times per gift, so the settler's event loop and this thread
mostly took turns. Here Python binds the 14 staged columns of each movement in multi-row
INSERTs, and SQLite derives movements, gifts, ledger legs, host credit and credited orders
from the stage in one statement each, without the GIL. The rows are the ones rows.py
gives (PostgreSQL COPYs those); tests/test_store_settle.py pins them column by column on both.
Keyed movements (claw-backs, rewards, adjustments: a handful, never thousands a second) take their
ledger legs from rows.py itself, bound from Python, and claw-backs their holds from holds.py.
"""

from __future__ import annotations

import sqlite3

from server.movement import Kind, Movement
from server.store import holds, queries
from server.store.models import (
    DIAMOND_POOL_ACCOUNT,
    GIFT_REVENUE_ACCOUNT,
    HOST_ACCOUNT_PREFIX,
    ORDER_CREDITED,
    ORDER_PAID,
    ORDER_PENDING,
    PAYMENTS_ACCOUNT,
    USER_ACCOUNT_PREFIX,
    ReusedSequence,
    SettleResult,
    now_ms,
)
from server.store.rows import DAY_MS, keyed_legs

# kind is the movement's Kind (its ledger name). Keyed on (part, seq) like movements: a movement
# delivered twice in one batch is staged once (the first copy), and the stage reads back in key
# order, the order the tables' keys want.
_CREATE_STAGE = """CREATE TEMP TABLE IF NOT EXISTS settle_stage (
    part INTEGER NOT NULL, seq INTEGER NOT NULL, kind TEXT NOT NULL, user_id TEXT NOT NULL,
    coins INTEGER NOT NULL, ts_ms INTEGER NOT NULL, ref TEXT NOT NULL, sender_name TEXT NOT NULL,
    host_id TEXT NOT NULL, room_id TEXT NOT NULL, gift TEXT NOT NULL, count INTEGER NOT NULL,
    share_bp INTEGER NOT NULL, client_id TEXT NOT NULL, points INTEGER NOT NULL,
    PRIMARY KEY (part, seq)) WITHOUT ROWID"""
_WIDTH = 15
_ROW = "(" + ",".join("?" * _WIDTH) + ")"
# Rows per staging INSERT: powers of two, so a batch of any size uses a few statements that
# sqlite3 has compiled and cached already (compiling costs about as much as running one). At
# most 2048 rows (30,720 variables, under SQLite's default limit of 32,766 since 3.32; older
# builds allow 999, and _max_rows() asks the connection).
_MAX_ROWS = 2048
# ON CONFLICT, not OR IGNORE: IGNORE would also drop a row breaking NOT NULL, silently.
_STAGE_SQL = {n: f"INSERT INTO settle_stage VALUES {','.join([_ROW] * n)} ON CONFLICT (part, seq) DO NOTHING"
              for n in (1 << k for k in range(_MAX_ROWS.bit_length()))}

# Settled before under the same number but with other content: not a redelivery (ReusedSequence).
# Every column compared is an integer or text: equal means the same movement.
_REUSED = (
    "SELECT s.part, s.seq FROM settle_stage s JOIN movements m ON m.part = s.part AND m.seq = s.seq"
    " WHERE m.user_id <> s.user_id OR m.coins <> s.coins OR m.ref <> s.ref OR m.ts_ms <> s.ts_ms"
    " OR m.kind <> s.kind OR m.points <> s.points LIMIT 1")
# Settled before (a redelivery): not new, so nothing below may write it again.
_DROP_SETTLED = ("DELETE FROM settle_stage WHERE EXISTS"
                 " (SELECT 1 FROM movements m WHERE m.part = settle_stage.part AND m.seq = settle_stage.seq)")
_MOVEMENTS = (
    "INSERT INTO movements (part, seq, kind, user_id, coins, ref, ts_ms, points)"
    " SELECT part, seq, kind, user_id, coins, ref, ts_ms, points FROM settle_stage")
_GIFTS = (
    "INSERT INTO gifts (id, part, seq, sender_id, sender_name, host_id, room_id, gift, count,"
    " coins, share_bp, diamond_units, client_id, sent_ms, settled_ms)"
    " SELECT ref, part, seq, user_id, sender_name, host_id, room_id, gift, count,"
    " coins, share_bp, coins * share_bp, client_id, ts_ms, :now FROM settle_stage WHERE kind = 'gift'")
# Double entry: a credit moves coins from payments to the user (legs 0, 1); a gift moves coins
# from the user to gift revenue (0, 1) and diamond units from the pool to the host (2, 3).
_LEDGER = (
    "INSERT INTO ledger (part, seq, leg, account, unit, delta)"
    " SELECT s.part, s.seq, l.leg,"
    " CASE WHEN s.kind = 'credit' THEN CASE l.leg WHEN 0 THEN :payments ELSE :user_prefix || s.user_id END"
    " ELSE CASE l.leg WHEN 0 THEN :user_prefix || s.user_id WHEN 1 THEN :gift_revenue"
    " WHEN 2 THEN :diamond_pool ELSE :host_prefix || s.host_id END END,"
    " CASE WHEN l.leg < 2 THEN 'coin' ELSE 'diamond_unit' END,"
    " CASE l.leg WHEN 0 THEN -s.coins WHEN 1 THEN s.coins WHEN 2 THEN -s.coins * s.share_bp"
    " ELSE s.coins * s.share_bp END"
    " FROM settle_stage s CROSS JOIN (SELECT 0 AS leg UNION ALL SELECT 1 UNION ALL SELECT 2 UNION ALL SELECT 3) l"
    " WHERE s.kind IN ('gift', 'credit') AND (l.leg < 2 OR s.kind = 'gift')")
# Keyed movements new in this batch: their legs come from rows.keyed_legs.
_KEYED_FRESH = "SELECT part, seq FROM settle_stage WHERE kind NOT IN ('gift', 'credit')"
_LEDGER_NAMES = {"payments": PAYMENTS_ACCOUNT, "gift_revenue": GIFT_REVENUE_ACCOUNT,
                 "diamond_pool": DIAMOND_POOL_ACCOUNT, "user_prefix": USER_ACCOUNT_PREFIX,
                 "host_prefix": HOST_ACCOUNT_PREFIX}
_HOSTS = (
    "INSERT INTO host_earnings (host_id, diamond_units, gifts_received)"
    " SELECT host_id, SUM(coins * share_bp), COUNT(*) FROM settle_stage WHERE kind = 'gift'"
    " GROUP BY host_id ORDER BY host_id"
    " ON CONFLICT (host_id) DO UPDATE SET diamond_units = diamond_units + excluded.diamond_units,"
    " gifts_received = gifts_received + excluded.gifts_received")
# A host's diamonds per UTC day of the gifts' sent_ms (0005_earnings.sql): one upsert per
# (host, day) of the batch, in key order.
_DAYS = (
    "INSERT INTO host_days (host_id, day, diamond_units, gifts)"
    f" SELECT host_id, ts_ms / {DAY_MS}, SUM(coins * share_bp), COUNT(*) FROM settle_stage WHERE kind = 'gift'"
    f" GROUP BY host_id, ts_ms / {DAY_MS} ORDER BY 1, 2"
    " ON CONFLICT (host_id, day) DO UPDATE SET diamond_units = diamond_units + excluded.diamond_units,"
    " gifts = gifts + excluded.gifts")
_ORDERS = (
    f"UPDATE orders SET status = '{ORDER_CREDITED}', updated_ms = :now"
    " WHERE id IN (SELECT ref FROM settle_stage WHERE kind = 'credit')"
    f" AND status IN ('{ORDER_PENDING}', '{ORDER_PAID}')")


def settle(conn: sqlite3.Connection, movements: list[Movement],
           hold_window_ms: int = holds.DEFAULT_HOLD_WINDOW_MS) -> SettleResult:
    """One transaction; idempotent on (partition, seq)."""
    if not movements:
        return SettleResult(0, 0, 0, 0)
    flat: list[int | str] = []
    put = flat.extend
    gift = Kind.GIFT
    for m in movements:
        put((m.partition, m.seq, m.kind, m.user_id, m.coins, m.ts_ms, m.gift_id if m.kind is gift else m.order_id,
             m.sender_name, m.host_id, m.room_id, m.gift, m.count, m.share_bp, m.client_id, m.points))
    conn.execute(_CREATE_STAGE)
    conn.execute("BEGIN IMMEDIATE")
    try:
        _stage(conn, flat, _max_rows(conn))
        reused = conn.execute(_REUSED).fetchone()
        if reused is not None:
            raise ReusedSequence(f"movement {reused[0]}-{reused[1]} is settled already with other content")
        conn.execute(_DROP_SETTLED)
        fresh = conn.execute(_MOVEMENTS).rowcount
        now = {"now": now_ms()}
        gifts = conn.execute(_GIFTS, now).rowcount
        conn.execute(_LEDGER, _LEDGER_NAMES)
        keyed = _keyed_ledger(conn, movements)
        conn.execute(_HOSTS)
        conn.execute(_DAYS)
        if keyed:  # after the gifts and host credit they may hold
            holds.settle_sqlite(conn, keyed, hold_window_ms, now["now"])
        conn.execute(_ORDERS, now)
        conn.execute("DELETE FROM settle_stage")
        conn.execute("COMMIT")
    except BaseException:
        conn.execute("ROLLBACK")  # the stage too: it is part of the transaction
        raise
    return SettleResult(fresh, gifts, fresh - gifts, len(movements) - fresh)


def _keyed_ledger(conn: sqlite3.Connection, movements: list[Movement]) -> list[Movement]:
    """The legs of the batch's new keyed movements (the first copy of each, like the stage);
    those movements, in key order."""
    fresh = {(int(r[0]), int(r[1])) for r in conn.execute(_KEYED_FRESH)}
    if not fresh:
        return []
    legs: list[tuple[int, int, int, str, str, int]] = []
    keyed: list[Movement] = []
    for m in movements:
        key = (m.partition, m.seq)
        if key in fresh:
            fresh.discard(key)
            legs.extend(keyed_legs(m))
            keyed.append(m)
    conn.executemany(queries.INSERT_LEDGER_LEG, legs)
    return sorted(keyed, key=lambda m: (m.partition, m.seq))


def _max_rows(conn: sqlite3.Connection) -> int:
    variables = conn.getlimit(sqlite3.SQLITE_LIMIT_VARIABLE_NUMBER)
    size = _MAX_ROWS
    while size > 1 and size * _WIDTH > variables:
        size //= 2
    return size


def _stage(conn: sqlite3.Connection, flat: list[int | str], max_rows: int) -> None:
    rows = len(flat) // _WIDTH
    start = 0
    size = max_rows
    while rows:
        while size > rows:
            size //= 2
        end = start + size * _WIDTH
        conn.execute(_STAGE_SQL[size], flat[start:end])
        start, rows = end, rows - size
