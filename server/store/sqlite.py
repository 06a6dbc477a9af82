"""SQLite backend: one connection on one dedicated thread, a whole batch per thread hop.

WAL mode lets `audit` and a second node read beside a running `serve`.
"""

from __future__ import annotations

import asyncio
import sqlite3
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

from server.movement import Movement
from server.store import queries as q
from server.store import sqlite_settle
from server.store.migrations import check_known, migrations, statements
from server.store.models import Order, PartitionTotals, Room, SettleResult, now_ms

T = TypeVar("T")
_CHUNK = 400  # host parameters per IN (...) query, under SQLite's limit


class SQLiteStore:
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
                check_known(current)
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
            cur = conn.execute(q.INSERT_ORDER, (
                order.id, order.user_id, order.idempotency_key, order.package_id, order.coins, order.price_cents,
                order.currency, order.payment_method, order.status, order.created_ms, order.created_ms))
            if cur.rowcount == 1:
                return order, True
            return Order(*conn.execute(q.ORDER_BY_KEY, (order.user_id, order.idempotency_key)).fetchone()), False

        return await self._run(_create)

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

    async def settle(self, movements: list[Movement]) -> SettleResult:
        return await self._run(lambda c: sqlite_settle.settle(c, movements))

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
