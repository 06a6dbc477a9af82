"""SQLite backend: one connection on one dedicated thread, a whole batch per thread hop.

WAL mode lets `audit` and a second node read beside a running `serve`.
"""

from __future__ import annotations

import asyncio
import sqlite3
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path
from typing import Any, TypeVar

from server.movement import Movement
from server.store import queries as q
from server.store import sqlite_settle
from server.store.base import Planner
from server.store.earnings import SQLiteEarnings
from server.store.holds import DEFAULT_HOLD_WINDOW_MS
from server.store.migrations import check_known, migrations, statements
from server.store.models import (
    Applied,
    Order,
    PartitionTotals,
    PaymentEvent,
    Room,
    SettleResult,
    Transition,
    in_order,
    now_ms,
)
from server.store.rows import kind_totals, movement_of
from server.store.sessions import SQLiteSessions
from server.store.videos import SQLiteVideos
from server.store.withdrawals import SQLiteWithdrawals

T = TypeVar("T")
_CHUNK = 400  # host parameters per IN (...) query, under SQLite's limit


class SQLiteStore(SQLiteEarnings, SQLiteWithdrawals, SQLiteSessions, SQLiteVideos):
    kind = "sqlite"

    def is_permanent(self, exc: BaseException) -> bool:
        # OperationalError (locked, disk full, I/O) passes; the rest is about the rows themselves.
        return isinstance(exc, sqlite3.IntegrityError | sqlite3.DataError | sqlite3.InterfaceError
                          | sqlite3.ProgrammingError | ValueError | TypeError | OverflowError)

    def __init__(self, path: Path) -> None:
        self.path = path
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="giftstream-sqlite")
        self._conn: sqlite3.Connection | None = None

    def _connect(self) -> sqlite3.Connection:
        if self._conn is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False, timeout=30)
            _enable_wal(conn)
            # FULL: a committed settlement survives power loss, as the AOF does for wallets.
            conn.execute("PRAGMA synchronous=FULL")
            conn.execute("PRAGMA busy_timeout=30000")
            conn.execute("PRAGMA cache_size=-131072")  # 128 MiB of page cache: settlement batches
            conn.execute("PRAGMA temp_store=MEMORY")  # the settlement stage (a temp table) never touches disk
            self._conn = conn
        return self._conn

    async def _run(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, lambda: fn(self._connect()))

    async def close(self) -> None:
        def _close(conn: sqlite3.Connection) -> None:
            conn.close()
            self._conn = None

        if self._conn is not None:
            await self._run(_close)
        self._executor.shutdown(wait=True)

    async def ping(self) -> None:
        """On a connection of its own: a health check must not queue behind settlement batches."""

        def _ping() -> None:
            conn = sqlite3.connect(self.path, timeout=2)
            try:
                conn.execute("SELECT 1").fetchone()
            finally:
                conn.close()

        await asyncio.to_thread(_ping)

    async def migrate(self) -> int:
        def _migrate(conn: sqlite3.Connection) -> int:
            conn.execute("BEGIN IMMEDIATE")
            try:
                conn.execute("CREATE TABLE IF NOT EXISTS schema_version (version INTEGER PRIMARY KEY)")
                row = conn.execute("SELECT MAX(version) FROM schema_version").fetchone()
                current = row[0] or 0
                tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
                check_known(current, tables)
                for version, script in migrations():
                    if version > current:
                        for stmt in statements(script):
                            conn.execute(stmt)
                        conn.execute("INSERT INTO schema_version (version) VALUES (?)", (version,))
                        current = version
                conn.execute("COMMIT")
                return int(current)
            except BaseException:
                conn.execute("ROLLBACK")
                raise

        return await self._run(_migrate)

    async def upsert_user(self, user_id: str, name: str) -> None:
        await self._run(lambda c: c.execute(q.UPSERT_USER, (user_id, name, now_ms())))

    async def create_order(self, order: Order) -> tuple[Order, bool]:
        def _create(conn: sqlite3.Connection) -> tuple[Order, bool]:
            conn.execute("BEGIN IMMEDIATE")
            try:
                cur = conn.execute(q.INSERT_ORDER, _order_row(order))
                if cur.rowcount == 1:
                    conn.execute(q.INSERT_TRANSITION, (order.id, order.status, order.created_ms, None, 0,
                                                       order.created_ms))
                    result = order, True
                else:
                    row = conn.execute(q.ORDER_BY_KEY, (order.user_id, order.idempotency_key)).fetchone()
                    result = Order(*row), False
                conn.execute("COMMIT")
                return result
            except BaseException:
                conn.execute("ROLLBACK")
                raise

        return await self._run(_create)

    async def order_by_payment(self, payment_id: str) -> Order | None:
        row = await self._run(lambda c: c.execute(q.ORDER_BY_PAYMENT, (payment_id,)).fetchone())
        return Order(*row) if row else None

    async def user_orders(self, user_id: str, before: tuple[int, str] | None, limit: int) -> list[Order]:
        sql: str = q.USER_ORDERS
        args: tuple[Any, ...] = (user_id, limit)
        if before is not None:
            sql, args = q.USER_ORDERS_BEFORE, (user_id, before[0], before[0], before[1], limit)
        return [Order(*r) for r in await self._run(lambda c: c.execute(sql, args).fetchall())]

    async def order_transitions(self, order_id: str) -> list[Transition]:
        rows = await self._run(lambda c: c.execute(q.ORDER_TRANSITIONS, (order_id,)).fetchall())
        return in_order([Transition(*r) for r in rows])

    async def apply(self, order_id: str, event: PaymentEvent | None, plan: Planner) -> Applied:
        def _apply(conn: sqlite3.Connection) -> Applied:
            # IMMEDIATE: the write lock first, so the order read below is the one this transaction
            # changes (one connection per process; other processes wait on the lock).
            conn.execute("BEGIN IMMEDIATE")
            try:
                order = Order(*conn.execute(q.ORDER_BY_ID, (order_id,)).fetchone())
                if event is not None and conn.execute(q.INSERT_EVENT, _event_row(event)).rowcount == 0:
                    conn.execute("ROLLBACK")
                    return Applied(order, (), duplicate=True)
                reached = in_order([Transition(*r) for r in conn.execute(q.ORDER_TRANSITIONS, (order_id,))])
                decided = plan(order, reached)
                now = now_ms()
                new = tuple(Transition(order_id, status, now, event.id if event else None, coins,
                                       None if coins else now) for status, coins in decided.steps)
                for t in new:
                    conn.execute(q.INSERT_TRANSITION, (t.order_id, t.status, t.at_ms, t.event_id, t.coins, t.done_ms))
                if new:
                    conn.execute(q.APPLY_ORDER, (new[-1].status, decided.decline_reason, now, order_id))
                    order = replace(order, status=new[-1].status,
                                    decline_reason=decided.decline_reason or order.decline_reason)
                elif event is not None:
                    conn.execute(q.SET_EVENT_OUTCOME, ("ignored", event.id))
                conn.execute("COMMIT")
                return Applied(order, new)
            except BaseException:
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
                raise

        return await self._run(_apply)

    async def transitions_todo(self, limit: int = 1000) -> list[Transition]:
        rows = await self._run(lambda c: c.execute(q.TRANSITIONS_TODO, (limit,)).fetchall())
        return [Transition(*r) for r in rows]

    async def transition_done(self, order_id: str, status: str) -> None:
        await self._run(lambda c: c.execute(q.TRANSITION_DONE, (now_ms(), order_id, status)))

    async def pending_before(self, created_ms: int, limit: int = 1000) -> list[Order]:
        rows = await self._run(lambda c: c.execute(q.PENDING_BEFORE, (created_ms, limit)).fetchall())
        return [Order(*r) for r in rows]

    async def payment_figures(self, limit: int) -> dict[str, Any]:
        def _figures(conn: sqlite3.Connection) -> dict[str, Any]:
            conn.execute("BEGIN")  # one snapshot
            try:
                events, applied = conn.execute(q.EVENT_FIGURES).fetchone()
                return {
                    "events": int(events), "events_applied": int(applied),
                    "transitions_without_event": int(conn.execute(q.TRANSITIONS_WITHOUT_EVENT).fetchone()[0]),
                    "clawbacks_twice": [(str(r[0]), str(r[1]), int(r[2]))
                                        for r in conn.execute(q.CLAWBACKS_TWICE, (limit,))],
                    "events_without_transitions": int(conn.execute(q.EVENTS_WITHOUT_TRANSITIONS).fetchone()[0]),
                    "paid_orders": [(str(r[0]), str(r[1]), int(r[2])) for r in conn.execute(q.PAID_ORDERS)],
                    "credits_of_unpaid_orders": [(str(r[0]), str(r[1]))
                                                 for r in conn.execute(q.CREDITS_OF_UNPAID_ORDERS, (limit,))],
                    "credits_not_matching": [(str(r[0]), int(r[1]), int(r[2]), int(r[3]))
                                             for r in conn.execute(q.CREDITS_PER_ORDER, (limit,))],
                }
            finally:
                conn.execute("COMMIT")

        return await self._run(_figures)

    async def set_order_status(self, order_id: str, status: str, *, only_from: str | None = None) -> bool:
        sql: str = q.SET_ORDER_STATUS
        args: tuple[Any, ...] = (status, now_ms(), order_id)
        if only_from is not None:
            sql, args = q.SET_ORDER_STATUS_FROM, (*args, only_from)
        return await self._run(lambda c: c.execute(sql, args).rowcount == 1)

    async def get_order(self, order_id: str) -> Order | None:
        row = await self._run(lambda c: c.execute(q.ORDER_BY_ID, (order_id,)).fetchone())
        return Order(*row) if row else None

    async def orders_with_status(self, status: str, limit: int = 1000) -> list[Order]:
        rows = await self._run(lambda c: c.execute(q.ORDERS_WITH_STATUS, (status, limit)).fetchall())
        return [Order(*r) for r in rows]

    async def create_room(self, room: Room) -> None:
        await self._run(lambda c: c.execute(
            q.INSERT_ROOM, (room.id, room.host_id, room.title, room.created_ms, room.ended_ms)))

    async def end_room(self, room_id: str, ended_ms: int) -> None:
        await self._run(lambda c: c.execute(q.END_ROOM, (ended_ms, room_id)))

    async def get_room(self, room_id: str) -> Room | None:
        row = await self._run(lambda c: c.execute(q.ROOM_BY_ID, (room_id,)).fetchone())
        return Room(*row) if row else None

    async def settle(self, movements: list[Movement], hold_window_ms: int = DEFAULT_HOLD_WINDOW_MS) -> SettleResult:
        return await self._run(lambda c: sqlite_settle.settle(c, movements, hold_window_ms))

    async def earnings(self, host_id: str) -> tuple[int, int]:
        row = await self._run(lambda c: c.execute(q.EARNINGS, (host_id,)).fetchone())
        return (int(row[0]), int(row[1])) if row else (0, 0)

    async def partition_totals(self, partition: int, max_seq: int) -> PartitionTotals:
        row = await self._run(lambda c: c.execute(q.PARTITION_TOTALS, (partition, max_seq)).fetchone())
        return PartitionTotals(int(row[0]), int(row[1]), int(row[2]))

    async def settled_seqs(self, partition: int, seqs: list[int]) -> set[int]:
        def _seqs(conn: sqlite3.Connection) -> set[int]:
            found: set[int] = set()
            for i in range(0, len(seqs), _CHUNK):
                chunk = seqs[i : i + _CHUNK]
                marks = ",".join("?" * len(chunk))
                found.update(r[0] for r in conn.execute(
                    f"SELECT seq FROM movements WHERE part = ? AND seq IN ({marks})", (partition, *chunk)))
            return found

        return await self._run(_seqs)

    async def diamond_figures(self) -> dict[str, int]:
        def _figures(conn: sqlite3.Connection) -> dict[str, int]:
            conn.execute("BEGIN")  # one snapshot for all four figures
            try:
                gifts = conn.execute(q.GIFT_DIAMONDS).fetchone()
                hosts = conn.execute(q.HOST_DIAMONDS).fetchone()
                ledger = conn.execute(q.LEDGER_HOST_DIAMONDS).fetchone()
                unbalanced = conn.execute(q.UNBALANCED_UNITS).fetchone()
            finally:
                conn.execute("COMMIT")
            return {"gift_diamond_units": int(gifts[0]), "gifts": int(gifts[1]),
                    "host_diamond_units": int(hosts[0]), "host_gifts_received": int(hosts[1]),
                    "ledger_host_diamond_units": int(ledger[0]), "unbalanced_units": int(unbalanced[0])}

        return await self._run(_figures)

    async def unbalanced_movements(self, limit: int) -> tuple[int, list[tuple[int, int, str, int]]]:
        rows = await self._run(lambda c: c.execute(q.UNBALANCED_MOVEMENTS, (limit,)).fetchall())
        return (int(rows[0][4]) if rows else 0), [(int(r[0]), int(r[1]), str(r[2]), int(r[3])) for r in rows]

    async def wallet_totals(self) -> dict[str, tuple[int, int]]:
        rows = await self._run(lambda c: c.execute(q.WALLET_TOTALS).fetchall())
        return {r[0]: (int(r[1]), int(r[2])) for r in rows}

    async def partition_kind_totals(self, partition: int, max_seq: int) -> dict[str, tuple[int, int]]:
        rows = await self._run(lambda c: c.execute(q.PARTITION_KIND_TOTALS, (partition, max_seq)).fetchall())
        return {r[0]: (int(r[1]), int(r[2])) for r in rows}

    async def wallet_kind_totals(self) -> dict[str, dict[str, tuple[int, int]]]:
        return kind_totals(await self._run(lambda c: c.execute(q.WALLET_KIND_TOTALS).fetchall()))

    async def user_movements(self, user_id: str, before_seq: int, limit: int) -> list[Movement]:
        rows = await self._run(lambda c: c.execute(q.USER_MOVEMENTS, (user_id, before_seq, limit)).fetchall())
        return [movement_of(user_id, r) for r in rows]


def _order_row(o: Order) -> tuple[Any, ...]:
    """INSERT_ORDER's values: created_ms twice (created, updated)."""
    return (o.id, o.user_id, o.idempotency_key, o.package_id, o.coins, o.price_cents, o.currency, o.payment_method,
            o.status, o.created_ms, o.channel, o.payment_id, o.decline_reason, o.created_ms)


def _event_row(e: PaymentEvent) -> tuple[Any, ...]:
    return (e.id, e.provider, e.type, e.payment_id, e.order_id, "applied", e.received_ms, e.body)


def _enable_wal(conn: sqlite3.Connection, timeout_s: float = 30.0) -> None:
    """Switch to WAL; two processes opening a new file at once (serve --workers) race on it."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            conn.execute("PRAGMA journal_mode=WAL")
            return
        except sqlite3.OperationalError as exc:
            if "locked" not in str(exc) or time.monotonic() > deadline:
                raise
            time.sleep(0.05)
