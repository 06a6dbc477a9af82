"""PostgreSQL backend (asyncpg): the same behaviour as SQLite, for several nodes and settlers.

A batch settles in one transaction of a handful of statements, whatever its size: rows go
in by binary COPY, or, for movements when some were settled before, as binary array
parameters expanded by unnest() with ON CONFLICT telling which are new.
"""

from __future__ import annotations

import asyncio
import zlib
from dataclasses import replace
from typing import Any

import asyncpg

from server.movement import Kind, Movement
from server.store import holds, queries
from server.store import rows as rowbuild
from server.store.base import Planner
from server.store.earnings import PostgresEarnings
from server.store.holds import DEFAULT_HOLD_WINDOW_MS
from server.store.migrations import check_known, migrations, statements
from server.store.models import (
    ORDER_CREDITED,
    ORDER_PAID,
    ORDER_PENDING,
    Applied,
    Order,
    PartitionTotals,
    PaymentEvent,
    ReusedSequence,
    Room,
    SettleResult,
    Transition,
    in_order,
    now_ms,
)
from server.store.queries import numbered as _pg  # cached: one conversion a statement
from server.store.rows import kind_totals, movement_of
from server.store.sessions import PostgresSessions
from server.store.videos import PostgresVideos
from server.store.withdrawals import PostgresWithdrawals

POOL_MIN = 1
POOL_MAX = 8
# A statement stuck this long (network partition without a reset) fails, so the settler backs off
# and retries on a fresh connection instead of hanging forever.
COMMAND_TIMEOUT_S = 60.0
CONNECT_TIMEOUT_S = 10.0
# One key for every process migrating the same database; any constant works.
MIGRATE_LOCK = zlib.crc32(b"giftstream.migrate")



_MOVEMENT_COLUMNS = ["part", "seq", "kind", "user_id", "coins", "ref", "ts_ms", "points"]
# The keyed insert, for batches holding movements settled before.
_INSERT_MOVEMENTS = (
    "INSERT INTO movements (part, seq, kind, user_id, coins, ref, ts_ms, points)"
    " SELECT * FROM unnest($1::int[], $2::bigint[], $3::text[], $4::text[], $5::bigint[], $6::text[],"
    " $7::bigint[], $8::bigint[]) ON CONFLICT (part, seq) DO NOTHING RETURNING part, seq")
# A movement settled before, to tell a redelivery (the same row) from a reused number; every
# column compared is an integer or text.
_SETTLED_MOVEMENTS = (
    "SELECT m.part, m.seq, m.kind, m.user_id, m.coins, m.ref, m.ts_ms, m.points FROM movements m"
    " JOIN unnest($1::int[], $2::bigint[]) AS k(part, seq) ON m.part = k.part AND m.seq = k.seq")
# Gift and ledger rows go in by binary COPY (about 1.5x faster than unnest here). They are
# keyed by movements inserted just now, so no conflict is possible; if one happens the ledger
# is inconsistent, and COPY fails the batch loudly (as SQLite does) instead of skipping rows.
_GIFT_COLUMNS = ["id", "part", "seq", "sender_id", "sender_name", "host_id", "room_id", "gift", "count",
                 "coins", "share_bp", "diamond_units", "client_id", "sent_ms", "settled_ms"]
_LEDGER_COLUMNS = ["part", "seq", "leg", "account", "unit", "delta"]
_UPSERT_HOSTS = (
    "INSERT INTO host_earnings (host_id, diamond_units, gifts_received)"
    " SELECT * FROM unnest($1::text[], $2::bigint[], $3::bigint[])"
    " ON CONFLICT (host_id) DO UPDATE"
    " SET diamond_units = host_earnings.diamond_units + excluded.diamond_units,"
    " gifts_received = host_earnings.gifts_received + excluded.gifts_received")
_UPSERT_DAYS = (
    "INSERT INTO host_days (host_id, day, diamond_units, gifts)"
    " SELECT * FROM unnest($1::text[], $2::bigint[], $3::bigint[], $4::bigint[])"
    " ON CONFLICT (host_id, day) DO UPDATE"
    " SET diamond_units = host_days.diamond_units + excluded.diamond_units, gifts = host_days.gifts + excluded.gifts")
_CREDIT_ORDERS = (
    f"UPDATE orders SET status = '{ORDER_CREDITED}', updated_ms = $1 WHERE id = ANY($2::text[])"
    f" AND status IN ('{ORDER_PENDING}', '{ORDER_PAID}')")


def _order_row(o: Order) -> tuple[Any, ...]:
    """INSERT_ORDER's values: created_ms twice (created, updated)."""
    return (o.id, o.user_id, o.idempotency_key, o.package_id, o.coins, o.price_cents, o.currency, o.payment_method,
            o.status, o.created_ms, o.channel, o.payment_id, o.decline_reason, o.created_ms)


def _event_row(e: PaymentEvent) -> tuple[Any, ...]:
    return (e.id, e.provider, e.type, e.payment_id, e.order_id, "applied", e.received_ms, e.body)


def _affected(status: str) -> int:
    """Row count from a command tag such as 'UPDATE 1'."""
    return int(status.rsplit(" ", 1)[-1])


def _distinct(movements: list[Movement]) -> list[Movement]:
    """First delivery of each (partition, seq), sorted by key.

    A movement delivered twice in one batch counts once. Sorting gives every settler the
    same row-lock order, so two settlers with overlapping batches wait instead of deadlocking.
    """
    first: dict[tuple[int, int], Movement] = {}
    for m in movements:
        first.setdefault((m.partition, m.seq), m)
    return [first[k] for k in sorted(first)]


class PostgresStore(PostgresEarnings, PostgresWithdrawals, PostgresSessions, PostgresVideos):
    kind = "postgres"

    def is_permanent(self, exc: BaseException) -> bool:
        # Class 22 (data) and 23 (integrity), and values asyncpg cannot encode; connection
        # errors, timeouts and the server shutting down pass.
        return isinstance(exc, asyncpg.DataError | asyncpg.IntegrityConstraintViolationError | ValueError
                          | TypeError | OverflowError)

    def __init__(self, url: str, *, min_size: int = POOL_MIN, max_size: int = POOL_MAX) -> None:
        self.url = url
        self.min_size = min_size
        self.max_size = max_size
        self._pool: asyncpg.Pool | None = None
        self._pool_lock = asyncio.Lock()

    async def _get_pool(self) -> asyncpg.Pool:
        # Lazy: building a store never needs the database up. A failed creation is not kept, so
        # the next call tries again; once created, the pool replaces broken connections itself.
        if self._pool is None:
            async with self._pool_lock:
                if self._pool is None:
                    self._pool = await asyncpg.create_pool(
                        self.url, min_size=self.min_size, max_size=self.max_size,
                        command_timeout=COMMAND_TIMEOUT_S, timeout=CONNECT_TIMEOUT_S)
        return self._pool

    async def _fetch(self, sql: str, *args: Any) -> list[asyncpg.Record]:
        pool = await self._get_pool()
        rows: list[asyncpg.Record] = await pool.fetch(sql, *args)
        return rows

    async def _fetchrow(self, sql: str, *args: Any) -> asyncpg.Record | None:
        pool = await self._get_pool()
        return await pool.fetchrow(sql, *args)

    async def _execute(self, sql: str, *args: Any) -> str:
        pool = await self._get_pool()
        tag: str = await pool.execute(sql, *args)
        return tag

    async def close(self) -> None:
        if self._pool is not None:
            pool, self._pool = self._pool, None
            try:
                await asyncio.wait_for(pool.close(), 10)
            except TimeoutError:
                pool.terminate()

    async def ping(self) -> None:
        await self._fetchrow("SELECT 1")

    async def migrate(self) -> int:
        pool = await self._get_pool()
        async with pool.acquire() as conn, conn.transaction():
            # Held until commit: a second process migrating at once waits here, then sees
            # the version the first one wrote and applies nothing.
            await conn.execute("SELECT pg_advisory_xact_lock($1)", MIGRATE_LOCK)
            await conn.execute("CREATE TABLE IF NOT EXISTS schema_version (version INTEGER PRIMARY KEY)")
            current = int(await conn.fetchval("SELECT COALESCE(MAX(version), 0) FROM schema_version"))
            tables = {r[0] for r in await conn.fetch(
                "SELECT tablename FROM pg_tables WHERE schemaname = current_schema()")}
            check_known(current, tables)
            for version, script in migrations():
                if version > current:
                    for stmt in statements(script):
                        await conn.execute(stmt)
                    await conn.execute("INSERT INTO schema_version (version) VALUES ($1)", version)
                    current = version
            return current

    async def upsert_user(self, user_id: str, name: str) -> None:
        await self._execute(_pg(queries.UPSERT_USER), user_id, name, now_ms())

    async def create_order(self, order: Order) -> tuple[Order, bool]:
        pool = await self._get_pool()
        async with pool.acquire() as conn, conn.transaction():
            tag = await conn.execute(_pg(queries.INSERT_ORDER), *_order_row(order))
            if _affected(tag) == 1:
                await conn.execute(_pg(queries.INSERT_TRANSITION), order.id, order.status, order.created_ms, None, 0,
                                   order.created_ms)
                return order, True
            row = await conn.fetchrow(_pg(queries.ORDER_BY_KEY), order.user_id, order.idempotency_key)
        assert row is not None, "conflicting order vanished: orders are never deleted"
        return Order(*row), False

    async def order_by_payment(self, payment_id: str) -> Order | None:
        row = await self._fetchrow(_pg(queries.ORDER_BY_PAYMENT), payment_id)
        return Order(*row) if row else None

    async def user_orders(self, user_id: str, before: tuple[int, str] | None, limit: int) -> list[Order]:
        if before is None:
            rows = await self._fetch(_pg(queries.USER_ORDERS), user_id, limit)
        else:
            rows = await self._fetch(_pg(queries.USER_ORDERS_BEFORE), user_id, before[0], before[0], before[1], limit)
        return [Order(*r) for r in rows]

    async def order_transitions(self, order_id: str) -> list[Transition]:
        return in_order([Transition(*r) for r in await self._fetch(_pg(queries.ORDER_TRANSITIONS), order_id)])

    async def apply(self, order_id: str, event: PaymentEvent | None, plan: Planner) -> Applied:
        pool = await self._get_pool()
        async with pool.acquire() as conn, conn.transaction():
            if event is not None:
                # A second delivery of the same event waits here for the first one's commit,
                # then inserts nothing: a duplicate.
                fresh = await conn.fetchval(_pg(queries.INSERT_EVENT) + " RETURNING id", *_event_row(event))
                if fresh is None:
                    row = await conn.fetchrow(_pg(queries.ORDER_BY_ID), order_id)
                    assert row is not None
                    return Applied(Order(*row), (), duplicate=True)
            # Held to commit: outcomes of one order (other events, the expiry sweep) apply one at a
            # time, each reading the transitions the one before made.
            row = await conn.fetchrow(_pg(queries.ORDER_BY_ID) + " FOR UPDATE", order_id)
            assert row is not None, "orders are never deleted"
            order = Order(*row)
            reached = in_order([Transition(*r) for r in await conn.fetch(_pg(queries.ORDER_TRANSITIONS), order_id)])
            decided = plan(order, reached)
            now = now_ms()
            new = tuple(Transition(order_id, status, now, event.id if event else None, coins, None if coins else now)
                        for status, coins in decided.steps)
            for t in new:
                await conn.execute(_pg(queries.INSERT_TRANSITION), t.order_id, t.status, t.at_ms, t.event_id,
                                   t.coins, t.done_ms)
            if new:
                await conn.execute(_pg(queries.APPLY_ORDER), new[-1].status, decided.decline_reason, now, order_id)
                order = replace(order, status=new[-1].status,
                                decline_reason=decided.decline_reason or order.decline_reason)
            elif event is not None:
                await conn.execute(_pg(queries.SET_EVENT_OUTCOME), "ignored", event.id)
        return Applied(order, new)

    async def transitions_todo(self, limit: int = 1000) -> list[Transition]:
        return [Transition(*r) for r in await self._fetch(_pg(queries.TRANSITIONS_TODO), limit)]

    async def transition_done(self, order_id: str, status: str) -> None:
        await self._execute(_pg(queries.TRANSITION_DONE), now_ms(), order_id, status)

    async def pending_before(self, created_ms: int, limit: int = 1000) -> list[Order]:
        return [Order(*r) for r in await self._fetch(_pg(queries.PENDING_BEFORE), created_ms, limit)]

    async def payment_figures(self, limit: int) -> dict[str, Any]:
        pool = await self._get_pool()
        async with pool.acquire() as conn, conn.transaction(isolation="repeatable_read", readonly=True):
            events = await conn.fetchrow(_pg(queries.EVENT_FIGURES))
            assert events is not None
            return {
                "events": int(events[0]), "events_applied": int(events[1]),
                "transitions_without_event": int(await conn.fetchval(_pg(queries.TRANSITIONS_WITHOUT_EVENT))),
                "clawbacks_twice": [(str(r[0]), str(r[1]), int(r[2])) for r in
                                    await conn.fetch(_pg(queries.CLAWBACKS_TWICE), limit)],
                "events_without_transitions": int(await conn.fetchval(_pg(queries.EVENTS_WITHOUT_TRANSITIONS))),
                "paid_orders": [(str(r[0]), str(r[1]), int(r[2])) for r in await conn.fetch(_pg(queries.PAID_ORDERS))],
                "credits_of_unpaid_orders": [(str(r[0]), str(r[1])) for r in
                                             await conn.fetch(_pg(queries.CREDITS_OF_UNPAID_ORDERS), limit)],
                "credits_not_matching": [(str(r[0]), int(r[1]), int(r[2]), int(r[3])) for r in
                                         await conn.fetch(_pg(queries.CREDITS_PER_ORDER), limit)],
            }

    async def set_order_status(self, order_id: str, status: str, *, only_from: str | None = None) -> bool:
        if only_from is None:
            tag = await self._execute(_pg(queries.SET_ORDER_STATUS), status, now_ms(), order_id)
        else:
            tag = await self._execute(_pg(queries.SET_ORDER_STATUS_FROM), status, now_ms(), order_id, only_from)
        return _affected(tag) == 1

    async def get_order(self, order_id: str) -> Order | None:
        row = await self._fetchrow(_pg(queries.ORDER_BY_ID), order_id)
        return Order(*row) if row else None

    async def orders_with_status(self, status: str, limit: int = 1000) -> list[Order]:
        return [Order(*r) for r in await self._fetch(_pg(queries.ORDERS_WITH_STATUS), status, limit)]

    async def create_room(self, room: Room) -> None:
        await self._execute(_pg(queries.INSERT_ROOM), room.id, room.host_id, room.title, room.created_ms, room.ended_ms)

    async def end_room(self, room_id: str, ended_ms: int) -> None:
        await self._execute(_pg(queries.END_ROOM), ended_ms, room_id)

    async def get_room(self, room_id: str) -> Room | None:
        row = await self._fetchrow(_pg(queries.ROOM_BY_ID), room_id)
        return Room(*row) if row else None

    async def settle(self, movements: list[Movement], hold_window_ms: int = DEFAULT_HOLD_WINDOW_MS) -> SettleResult:
        distinct = _distinct(movements)
        pool = await self._get_pool()
        async with pool.acquire() as conn, conn.transaction():
            fresh = await self._insert_movements(conn, distinct)
            gifts = [m for m in fresh if m.kind is Kind.GIFT]
            await self._insert_rows(conn, fresh, gifts)
            keyed = [m for m in fresh if m.kind in holds.KINDS]
            if keyed:  # after the gifts and host credit they may hold
                await holds.settle_postgres(conn, keyed, hold_window_ms, now_ms())
        return SettleResult(len(fresh), len(gifts), len(fresh) - len(gifts), len(movements) - len(fresh))

    @staticmethod
    async def _insert_movements(conn: asyncpg.Connection, movements: list[Movement]) -> list[Movement]:
        """Insert every movement not settled before; those are returned."""
        if not movements:
            return movements
        # Fast path, the usual case: plain COPY, about twice as fast as the keyed insert below.
        # A movement settled before (a redelivery) fails it on the primary key; the savepoint
        # undoes the COPY alone and the keyed insert skips what is already there.
        try:
            async with conn.transaction():
                await conn.copy_records_to_table("movements", records=rowbuild.movement_rows(movements),
                                                 columns=_MOVEMENT_COLUMNS)
            return movements
        except asyncpg.UniqueViolationError:
            pass
        rows = list(rowbuild.movement_rows(movements))
        inserted = {(r[0], r[1]) for r in await conn.fetch(_INSERT_MOVEMENTS, *zip(*rows, strict=True))}
        again = [r for r in rows if (r[0], r[1]) not in inserted]
        if again:
            parts, seqs = [r[0] for r in again], [r[1] for r in again]
            settled = {(r[0], r[1]): tuple(r) for r in await conn.fetch(_SETTLED_MOVEMENTS, parts, seqs)}
            for row in again:
                if settled.get((row[0], row[1])) != row:
                    raise ReusedSequence(f"movement {row[0]}-{row[1]} is settled already with other content")
        return [m for m in movements if (m.partition, m.seq) in inserted]

    @staticmethod
    async def _insert_rows(conn: asyncpg.Connection, fresh: list[Movement], gifts: list[Movement]) -> None:
        """Gifts, ledger, host credit and credited orders for movements inserted just now."""
        if gifts:
            await conn.copy_records_to_table("gifts", records=rowbuild.gift_rows(gifts, now_ms()),
                                             columns=_GIFT_COLUMNS)
        if fresh:
            await conn.copy_records_to_table("ledger", records=rowbuild.ledger_rows(fresh), columns=_LEDGER_COLUMNS)
        credit = rowbuild.host_credit(gifts)
        if credit:
            hosts = sorted(credit)  # one lock order for every settler
            units, received = [credit[h][0] for h in hosts], [credit[h][1] for h in hosts]
            await conn.execute(_UPSERT_HOSTS, hosts, units, received)
            days = rowbuild.host_days(gifts)
            keys = sorted(days)
            await conn.execute(_UPSERT_DAYS, [k[0] for k in keys], [k[1] for k in keys],
                               [days[k][0] for k in keys], [days[k][1] for k in keys])
        orders = rowbuild.credited_orders(fresh)
        if orders:
            await conn.execute(_CREDIT_ORDERS, now_ms(), sorted(orders))

    async def earnings(self, host_id: str) -> tuple[int, int]:
        row = await self._fetchrow(_pg(queries.EARNINGS), host_id)
        return (int(row[0]), int(row[1])) if row else (0, 0)

    async def partition_totals(self, partition: int, max_seq: int) -> PartitionTotals:
        row = await self._fetchrow(_pg(queries.PARTITION_TOTALS), partition, max_seq)
        assert row is not None
        return PartitionTotals(int(row[0]), int(row[1]), int(row[2]))

    async def settled_seqs(self, partition: int, seqs: list[int]) -> set[int]:
        if not seqs:
            return set()
        rows = await self._fetch("SELECT seq FROM movements WHERE part = $1 AND seq = ANY($2::bigint[])",
                                 partition, seqs)
        return {int(r[0]) for r in rows}

    async def diamond_figures(self) -> dict[str, int]:
        pool = await self._get_pool()
        # One snapshot for all four figures, so a batch committing meanwhile cannot skew them.
        async with pool.acquire() as conn, conn.transaction(isolation="repeatable_read", readonly=True):
            gifts = await conn.fetchrow(_pg(queries.GIFT_DIAMONDS))
            hosts = await conn.fetchrow(_pg(queries.HOST_DIAMONDS))
            ledger = await conn.fetchval(_pg(queries.LEDGER_HOST_DIAMONDS))
            unbalanced = await conn.fetchval(_pg(queries.UNBALANCED_UNITS))
        assert gifts is not None and hosts is not None
        return {"gift_diamond_units": int(gifts[0]), "gifts": int(gifts[1]),
                "host_diamond_units": int(hosts[0]), "host_gifts_received": int(hosts[1]),
                "ledger_host_diamond_units": int(ledger), "unbalanced_units": int(unbalanced)}

    async def unbalanced_movements(self, limit: int) -> tuple[int, list[tuple[int, int, str, int]]]:
        rows = await self._fetch(_pg(queries.UNBALANCED_MOVEMENTS), limit)
        return (int(rows[0][4]) if rows else 0), [(int(r[0]), int(r[1]), str(r[2]), int(r[3])) for r in rows]

    async def wallet_totals(self) -> dict[str, tuple[int, int]]:
        return {r[0]: (int(r[1]), int(r[2])) for r in await self._fetch(_pg(queries.WALLET_TOTALS))}

    async def partition_kind_totals(self, partition: int, max_seq: int) -> dict[str, tuple[int, int]]:
        rows = await self._fetch(_pg(queries.PARTITION_KIND_TOTALS), partition, max_seq)
        return {r[0]: (int(r[1]), int(r[2])) for r in rows}

    async def wallet_kind_totals(self) -> dict[str, dict[str, tuple[int, int]]]:
        return kind_totals(await self._fetch(_pg(queries.WALLET_KIND_TOTALS)))

    async def user_movements(self, user_id: str, before_seq: int, limit: int) -> list[Movement]:
        rows = await self._fetch(_pg(queries.USER_MOVEMENTS), user_id, before_seq, limit)
        return [movement_of(user_id, r) for r in rows]
