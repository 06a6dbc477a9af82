"""Room lifecycle and session summaries: one live room per host, the live list, summaries (issue 12).

`SessionsStore` is what the rest of the server calls; `SQLiteSessions` and `PostgresSessions` are the
two backends' halves, mixed into SQLiteStore and PostgresStore (which give them `_run`, and
`_get_pool`/`_fetch`/`_fetchrow`/`_execute`).

The rooms table holds a room from its start (`start_room`, refused while its host has a live
room: the partial unique index of sql/0007_sessions.sql) to its end (`finish_room`, which also
keeps what only Redis knew of the session). A summary's money figures are read from the settled
ledger (`room_ledger`, index gifts_room_sent), never from Redis, so they equal it exactly.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from server.store.halves import PostgresHalf, SQLiteHalf
from server.store.queries import numbered as _pg  # cached: one conversion a statement


@dataclass(frozen=True, slots=True)
class RoomEnd:
    """What a room's end writes: when and why, and the session's figures read from Redis."""

    room_id: str
    ended_ms: int
    # host | admin | idle (server/rooms/lifecycle.py), superseded (sql/0007_sessions.sql), lost
    reason: str
    peak_viewers: int
    goal_reached: bool
    # The gifts and coins the room acknowledged (room state gifts_total / coins_total).
    acked_gifts: int
    acked_coins: int


@dataclass(frozen=True, slots=True)
class RoomRecord:
    """A room's row, with its host's display name; the figures are None while it is live (and
    for rooms ended before sql/0007_sessions.sql)."""

    id: str
    host_id: str
    host_name: str
    title: str
    created_ms: int
    ended_ms: int | None
    end_reason: str | None
    peak_viewers: int | None
    goal_reached: bool | None
    acked_gifts: int | None
    acked_coins: int | None


@dataclass(frozen=True, slots=True)
class RoomLedger:
    """A room's settled gifts, summed: one snapshot of the ledger."""

    gifts: int
    coins: int
    diamond_units: int
    unique_gifters: int
    # (user id, name, coins), by coins, most first, then by user id.
    top: list[tuple[str, str, int]]


START_ROOM = ("INSERT INTO rooms (id, host_id, title, created_ms, ended_ms) VALUES (?, ?, ?, ?, NULL)"
              " ON CONFLICT DO NOTHING")
LIVE_ROOM_OF = "SELECT id FROM rooms WHERE host_id = ? AND ended_ms IS NULL"
# A room id used again (the demo room of `giftstream serve`): the ended row starts over, unless
# its host is live elsewhere.
REOPEN_ROOM = ("UPDATE rooms SET title = ?, created_ms = ?, ended_ms = NULL, end_reason = NULL, peak_viewers = NULL,"
               " goal_reached = NULL, acked_gifts = NULL, acked_coins = NULL WHERE id = ? AND ended_ms IS NOT NULL"
               " AND NOT EXISTS (SELECT 1 FROM rooms o WHERE o.host_id = rooms.host_id AND o.ended_ms IS NULL)")
LIVE_ROOM_OF_ROOMS_HOST = ("SELECT o.id FROM rooms r JOIN rooms o ON o.host_id = r.host_id AND o.ended_ms IS NULL"
                           " WHERE r.id = ?")
FINISH_ROOM = ("UPDATE rooms SET ended_ms = ?, end_reason = ?, peak_viewers = ?, goal_reached = ?, acked_gifts = ?,"
               " acked_coins = ? WHERE id = ? AND ended_ms IS NULL")
_RECORD = ("SELECT r.id, r.host_id, COALESCE(u.name, r.host_id), r.title, r.created_ms, r.ended_ms, r.end_reason,"
           " r.peak_viewers, r.goal_reached, r.acked_gifts, r.acked_coins"
           " FROM rooms r LEFT JOIN users u ON u.id = r.host_id")
ROOM_RECORD = _RECORD + " WHERE r.id = ?"
# Newest start first, from a cursor (created_ms, id) exclusive: index rooms_live.
LIVE_FIRST = _RECORD + " WHERE r.ended_ms IS NULL ORDER BY r.created_ms DESC, r.id DESC LIMIT ?"
LIVE_AFTER = (_RECORD + " WHERE r.ended_ms IS NULL AND (r.created_ms < ? OR (r.created_ms = ? AND r.id < ?))"
              " ORDER BY r.created_ms DESC, r.id DESC LIMIT ?")
# Newest end first, from a cursor (ended_ms, id) exclusive: index rooms_ended.
ENDED_FIRST = _RECORD + " WHERE r.ended_ms IS NOT NULL ORDER BY r.ended_ms DESC, r.id DESC LIMIT ?"
ENDED_AFTER = (_RECORD + " WHERE r.ended_ms IS NOT NULL AND (r.ended_ms < ? OR (r.ended_ms = ? AND r.id < ?))"
               " ORDER BY r.ended_ms DESC, r.id DESC LIMIT ?")
# The idle sweep: live rooms started before a time, oldest first, after a cursor (created_ms, id).
LIVE_STARTED_BEFORE = ("SELECT id, created_ms FROM rooms WHERE ended_ms IS NULL AND created_ms < ?"
                       " AND (created_ms > ? OR (created_ms = ? AND id > ?)) ORDER BY created_ms, id LIMIT ?")
# PostgreSQL sums BIGINT into NUMERIC: cast back.
ROOM_LEDGER = ("SELECT COUNT(*), CAST(COALESCE(SUM(coins), 0) AS BIGINT),"
               " CAST(COALESCE(SUM(diamond_units), 0) AS BIGINT), COUNT(DISTINCT sender_id)"
               " FROM gifts WHERE room_id = ?")
ROOM_TOP = ("SELECT sender_id, MAX(sender_name), CAST(SUM(coins) AS BIGINT) AS spent FROM gifts WHERE room_id = ?"
            " GROUP BY sender_id ORDER BY spent DESC, sender_id LIMIT ?")


def _record(row: Sequence[Any]) -> RoomRecord:
    return RoomRecord(row[0], row[1], row[2], row[3], int(row[4]), _int(row[5]), row[6], _int(row[7]),
                      None if row[8] is None else bool(row[8]), _int(row[9]), _int(row[10]))


def _int(value: Any) -> int | None:
    return None if value is None else int(value)


def _ledger(totals: Sequence[Any], top: Sequence[Sequence[Any]]) -> RoomLedger:
    return RoomLedger(int(totals[0]), int(totals[1]), int(totals[2]), int(totals[3]),
                      [(str(r[0]), str(r[1]), int(r[2])) for r in top])


def _finish_args(end: RoomEnd) -> tuple[Any, ...]:
    return (end.ended_ms, end.reason, end.peak_viewers, int(end.goal_reached), end.acked_gifts, end.acked_coins,
            end.room_id)


class SessionsStore(Protocol):
    async def start_room(self, room_id: str, host_id: str, title: str, created_ms: int) -> str | None:
        """Write a live room, unless its host has one: None when written, else the host's live
        room's id ("" when the conflict is gone by the time it is read: try again)."""
        ...

    async def reopen_room(self, room_id: str, title: str, created_ms: int) -> str | None:
        """Make an ended room live again (same answers as `start_room`)."""
        ...

    async def finish_room(self, end: RoomEnd) -> bool:
        """End a live room with its figures; False (nothing written) when it had ended already."""
        ...

    async def room_record(self, room_id: str) -> RoomRecord | None: ...

    async def rooms_page(self, live: bool, before: tuple[int, str] | None, limit: int) -> list[RoomRecord]:
        """Live rooms newest start first, or ended rooms newest end first, after a cursor
        (start or end ms, id) exclusive."""
        ...

    async def live_started_before(self, created_ms: int, after: tuple[int, str], limit: int) -> list[tuple[str, int]]:
        """(id, created ms) of live rooms started before `created_ms`, oldest first, past `after`."""
        ...

    async def room_ledger(self, room_id: str, top: int) -> RoomLedger: ...


class SQLiteSessions(SQLiteHalf):
    async def start_room(self, room_id: str, host_id: str, title: str, created_ms: int) -> str | None:
        def _start(c: sqlite3.Connection) -> str | None:
            if c.execute(START_ROOM, (room_id, host_id, title, created_ms)).rowcount == 1:
                return None
            row = c.execute(LIVE_ROOM_OF, (host_id,)).fetchone()
            return str(row[0]) if row else ""

        return await self._run(_start)

    async def reopen_room(self, room_id: str, title: str, created_ms: int) -> str | None:
        def _reopen(c: sqlite3.Connection) -> str | None:
            if c.execute(REOPEN_ROOM, (title, created_ms, room_id)).rowcount == 1:
                return None
            row = c.execute(LIVE_ROOM_OF_ROOMS_HOST, (room_id,)).fetchone()
            return str(row[0]) if row else ""

        return await self._run(_reopen)

    async def finish_room(self, end: RoomEnd) -> bool:
        return await self._run(lambda c: c.execute(FINISH_ROOM, _finish_args(end)).rowcount == 1)

    async def room_record(self, room_id: str) -> RoomRecord | None:
        row = await self._run(lambda c: c.execute(ROOM_RECORD, (room_id,)).fetchone())
        return _record(row) if row else None

    async def rooms_page(self, live: bool, before: tuple[int, str] | None, limit: int) -> list[RoomRecord]:
        sql, args = _page(live, before, limit)
        return [_record(r) for r in await self._run(lambda c: c.execute(sql, args).fetchall())]

    async def live_started_before(self, created_ms: int, after: tuple[int, str], limit: int) -> list[tuple[str, int]]:
        args = (created_ms, after[0], after[0], after[1], limit)
        rows = await self._run(lambda c: c.execute(LIVE_STARTED_BEFORE, args).fetchall())
        return [(str(r[0]), int(r[1])) for r in rows]

    async def room_ledger(self, room_id: str, top: int) -> RoomLedger:
        # One thread runs every statement of this connection, settlement's too: the two reads
        # see one state of the ledger.
        def _read(c: sqlite3.Connection) -> RoomLedger:
            totals = c.execute(ROOM_LEDGER, (room_id,)).fetchone()
            return _ledger(totals, c.execute(ROOM_TOP, (room_id, top)).fetchall())

        return await self._run(_read)


def _page(live: bool, before: tuple[int, str] | None, limit: int) -> tuple[str, tuple[Any, ...]]:
    if before is None:
        return (LIVE_FIRST if live else ENDED_FIRST), (limit,)
    return (LIVE_AFTER if live else ENDED_AFTER), (before[0], before[0], before[1], limit)


class PostgresSessions(PostgresHalf):
    async def start_room(self, room_id: str, host_id: str, title: str, created_ms: int) -> str | None:
        # A concurrent insert for the same host waits on the unique index for the first one's
        # commit, then does nothing: the read after it finds the winner.
        tag = await self._execute(_pg(START_ROOM), room_id, host_id, title, created_ms)
        if tag.endswith(" 1"):
            return None
        row = await self._fetchrow(_pg(LIVE_ROOM_OF), host_id)
        return str(row[0]) if row else ""

    async def reopen_room(self, room_id: str, title: str, created_ms: int) -> str | None:
        if (await self._execute(_pg(REOPEN_ROOM), title, created_ms, room_id)).endswith(" 1"):
            return None
        row = await self._fetchrow(_pg(LIVE_ROOM_OF_ROOMS_HOST), room_id)
        return str(row[0]) if row else ""

    async def finish_room(self, end: RoomEnd) -> bool:
        tag = await self._execute(_pg(FINISH_ROOM), *_finish_args(end))
        return tag.endswith(" 1")

    async def room_record(self, room_id: str) -> RoomRecord | None:
        row = await self._fetchrow(_pg(ROOM_RECORD), room_id)
        return _record(row) if row else None

    async def rooms_page(self, live: bool, before: tuple[int, str] | None, limit: int) -> list[RoomRecord]:
        sql, args = _page(live, before, limit)
        return [_record(r) for r in await self._fetch(_pg(sql), *args)]

    async def live_started_before(self, created_ms: int, after: tuple[int, str], limit: int) -> list[tuple[str, int]]:
        rows = await self._fetch(_pg(LIVE_STARTED_BEFORE), created_ms, after[0], after[0], after[1], limit)
        return [(str(r[0]), int(r[1])) for r in rows]

    async def room_ledger(self, room_id: str, top: int) -> RoomLedger:
        pool = await self._get_pool()
        # One snapshot for both reads: a batch settled between them cannot make the top gifters
        # disagree with the totals.
        async with pool.acquire() as conn, conn.transaction(isolation="repeatable_read", readonly=True):
            totals = await conn.fetchrow(_pg(ROOM_LEDGER), room_id)
            rows = await conn.fetch(_pg(ROOM_TOP), room_id, top)
        assert totals is not None
        return _ledger(totals, rows)
