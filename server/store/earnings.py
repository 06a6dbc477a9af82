"""A host's diamonds: earnings, by day, received gifts, holds (issue 12).

`EarningsStore` is what the rest of the server calls; `SQLiteEarnings` and `PostgresEarnings` are the
two backends' halves, mixed into SQLiteStore and PostgresStore (which give them `_run`, and
`_get_pool`/`_fetch`/`_fetchrow`/`_execute`). Settlement writes what these read: host_earnings,
host_days (sqlite_settle.py, postgres.py) and gift_holds (holds.py).
"""

from __future__ import annotations

import sqlite3
from dataclasses import dataclass
from typing import Any, Protocol

from server.store.halves import PostgresHalf, SQLiteHalf
from server.store.host_ledger import HOST_RESERVED_PREFIX
from server.store.models import HOST_ACCOUNT_PREFIX, HOST_HELD_ACCOUNT_PREFIX, UNITS_PER_DIAMOND
from server.store.queries import numbered as _pg  # cached: one conversion a statement


@dataclass(frozen=True, slots=True)
class HostEarnings:
    """A host's diamonds in units (1/10,000 diamond): lifetime = available + held + reserved + paid."""

    host_id: str
    lifetime_units: int
    held_units: int
    reserved_units: int
    paid_units: int
    gifts_received: int

    @property
    def available_units(self) -> int:
        """What the host may cash out; negative when a hold took diamonds already paid out."""
        return self.lifetime_units - self.held_units - self.reserved_units - self.paid_units


@dataclass(frozen=True, slots=True)
class ReceivedGift:
    """A settled gift, as its host sees it. room_id is a video's id for a gift on a video."""

    id: str
    room_id: str
    sender_id: str
    sender_name: str
    gift: str
    count: int
    coins: int
    diamond_units: int
    sent_ms: int


class EarningsStore(Protocol):
    async def host_earnings(self, host_id: str) -> HostEarnings:
        """The host's diamonds (all zero for a host who never received a gift)."""
        ...

    async def host_days(self, host_id: str, since_day: int) -> list[tuple[int, int, int]]:
        """(UTC day as days since 1970-01-01, diamond units, gifts) of the host's days with gifts
        from `since_day` on, newest first."""
        ...

    async def received_gifts(self, host_id: str, before: tuple[int, str] | None, limit: int) -> list[ReceivedGift]:
        """The host's settled gifts newest first, older than `before` (sent_ms, gift id) when given."""
        ...

    async def host_figures(self, limit: int) -> dict[str, Any]:
        """For `giftstream audit`: hosts, their summed held/reserved/paid units, and the first `limit`
        hosts whose host_earnings row disagrees with its sources (gifts, gift_holds, the held
        ledger account, withdrawals; a ledger without a withdrawals table has none)."""
        ...


EARNINGS = ("SELECT diamond_units, held_units, reserved_units, paid_units, gifts_received FROM host_earnings"
            " WHERE host_id = ?")
DAYS = "SELECT day, diamond_units, gifts FROM host_days WHERE host_id = ? AND day >= ? ORDER BY day DESC"
_GIFT_SELECT = ("SELECT id, room_id, sender_id, sender_name, gift, count, coins, diamond_units, sent_ms FROM gifts"
                " WHERE host_id = ?")
# Newest first along gifts_host_sent (0004_creators.sql); a page starts strictly after the cursor.
GIFTS = _GIFT_SELECT + " ORDER BY sent_ms DESC, id DESC LIMIT ?"
GIFTS_BEFORE = (_GIFT_SELECT + " AND sent_ms <= ? AND (sent_ms < ? OR id < ?) ORDER BY sent_ms DESC, id DESC LIMIT ?")

HOST_TOTALS = ("SELECT COUNT(*), COALESCE(SUM(held_units), 0), COALESCE(SUM(reserved_units), 0),"
               " COALESCE(SUM(paid_units), 0) FROM host_earnings")
_NO_WITHDRAWALS = "SELECT NULL AS host_id, 0 AS reserved, 0 AS paid"
_WITHDRAWALS = (
    "SELECT host_id, SUM(CASE WHEN status = 'pending' THEN diamonds ELSE 0 END) AS reserved,"
    " SUM(CASE WHEN status = 'paid' THEN diamonds ELSE 0 END) AS paid FROM withdrawals GROUP BY host_id")
# Each host's row beside what it must equal: its settled gifts' units, its unreleased holds, its
# held ledger account, its pending and paid withdrawals (whole diamonds). {withdrawals} is one of
# the two above. The first offenders by host id, and how many there are in all.
_HOST_CHECK = (
    "SELECT * FROM (SELECT e.host_id, e.diamond_units, e.held_units, e.reserved_units, e.paid_units,"
    " COALESCE(g.units, 0) AS gift_units, COALESCE(h.units, 0) AS hold_units, COALESCE(l.units, 0) AS ledger_held,"
    " COALESCE(a.units, 0) AS ledger_available, COALESCE(r.units, 0) AS ledger_reserved,"
    f" COALESCE(w.reserved, 0) * {UNITS_PER_DIAMOND} AS pending_units,"
    f" COALESCE(w.paid, 0) * {UNITS_PER_DIAMOND} AS withdrawn_units"
    " FROM host_earnings e"
    " LEFT JOIN (SELECT host_id, SUM(diamond_units) AS units FROM gifts GROUP BY host_id) g ON g.host_id = e.host_id"
    " LEFT JOIN (SELECT host_id, SUM(diamond_units) AS units FROM gift_holds WHERE released_ms IS NULL"
    " GROUP BY host_id) h ON h.host_id = e.host_id"
    " LEFT JOIN (SELECT account, SUM(delta) AS units FROM ledger WHERE unit = 'diamond_unit'"
    f" AND account LIKE '{HOST_HELD_ACCOUNT_PREFIX}%' GROUP BY account) l"
    f" ON l.account = '{HOST_HELD_ACCOUNT_PREFIX}' || e.host_id"
    " LEFT JOIN (SELECT account, SUM(delta) AS units FROM ledger WHERE unit = 'diamond_unit'"
    f" AND account LIKE '{HOST_ACCOUNT_PREFIX}%' GROUP BY account) a"
    f" ON a.account = '{HOST_ACCOUNT_PREFIX}' || e.host_id"
    " LEFT JOIN (SELECT account, SUM(delta) AS units FROM ledger WHERE unit = 'diamond_unit'"
    f" AND account LIKE '{HOST_RESERVED_PREFIX}%' GROUP BY account) r"
    f" ON r.account = '{HOST_RESERVED_PREFIX}' || e.host_id"
    " LEFT JOIN ({withdrawals}) w ON w.host_id = e.host_id) AS c"
    " WHERE diamond_units <> gift_units OR held_units <> hold_units OR held_units <> ledger_held"
    " OR reserved_units <> pending_units OR paid_units <> withdrawn_units OR reserved_units <> ledger_reserved"
    " OR ledger_available <> diamond_units - held_units - reserved_units - paid_units"
    " OR held_units < 0 OR reserved_units < 0 OR paid_units < 0"
    " ORDER BY host_id")
_HOST_COLUMNS = ("host_id", "lifetime_units", "held_units", "reserved_units", "paid_units", "gift_units",
                 "hold_units", "ledger_held_units", "ledger_available_units", "ledger_reserved_units",
                 "pending_withdrawal_units", "paid_withdrawal_units")


def host_check(withdrawals: bool) -> str:
    return _HOST_CHECK.format(withdrawals=_WITHDRAWALS if withdrawals else _NO_WITHDRAWALS)


def _earnings(host_id: str, row: Any) -> HostEarnings:
    if row is None:
        return HostEarnings(host_id, 0, 0, 0, 0, 0)
    return HostEarnings(host_id, int(row[0]), int(row[1]), int(row[2]), int(row[3]), int(row[4]))


def _gift(r: Any) -> ReceivedGift:
    return ReceivedGift(str(r[0]), str(r[1]), str(r[2]), str(r[3]), str(r[4]), int(r[5]), int(r[6]), int(r[7]),
                        int(r[8]))


def _figures(totals: Any, rows: list[Any], limit: int, withdrawals: bool) -> dict[str, Any]:
    return {"hosts": int(totals[0]), "held_units": int(totals[1]), "reserved_units": int(totals[2]),
            "paid_units": int(totals[3]), "withdrawals_table": withdrawals, "mismatched": len(rows),
            "first": [{k: (v if k == "host_id" else int(v)) for k, v in zip(_HOST_COLUMNS, r, strict=True)}
                      for r in rows[:limit]]}


class SQLiteEarnings(SQLiteHalf):
    async def host_earnings(self, host_id: str) -> HostEarnings:
        return _earnings(host_id, await self._run(lambda c: c.execute(EARNINGS, (host_id,)).fetchone()))

    async def host_days(self, host_id: str, since_day: int) -> list[tuple[int, int, int]]:
        rows = await self._run(lambda c: c.execute(DAYS, (host_id, since_day)).fetchall())
        return [(int(r[0]), int(r[1]), int(r[2])) for r in rows]

    async def received_gifts(self, host_id: str, before: tuple[int, str] | None, limit: int) -> list[ReceivedGift]:
        sql, args = (GIFTS, (host_id, limit)) if before is None else (
            GIFTS_BEFORE, (host_id, before[0], before[0], before[1], limit))
        return [_gift(r) for r in await self._run(lambda c: c.execute(sql, args).fetchall())]

    async def host_figures(self, limit: int) -> dict[str, Any]:
        def _read(conn: sqlite3.Connection) -> dict[str, Any]:
            conn.execute("BEGIN")  # one snapshot
            try:
                withdrawals = conn.execute(
                    "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'withdrawals'").fetchone() is not None
                totals = conn.execute(HOST_TOTALS).fetchone()
                rows = conn.execute(host_check(withdrawals)).fetchall()
            finally:
                conn.execute("COMMIT")
            return _figures(totals, rows, limit, withdrawals)

        return await self._run(_read)


class PostgresEarnings(PostgresHalf):
    async def host_earnings(self, host_id: str) -> HostEarnings:
        return _earnings(host_id, await self._fetchrow(_pg(EARNINGS), host_id))

    async def host_days(self, host_id: str, since_day: int) -> list[tuple[int, int, int]]:
        return [(int(r[0]), int(r[1]), int(r[2])) for r in await self._fetch(_pg(DAYS), host_id, since_day)]

    async def received_gifts(self, host_id: str, before: tuple[int, str] | None, limit: int) -> list[ReceivedGift]:
        if before is None:
            rows = await self._fetch(_pg(GIFTS), host_id, limit)
        else:
            rows = await self._fetch(_pg(GIFTS_BEFORE), host_id, before[0], before[0], before[1], limit)
        return [_gift(r) for r in rows]

    async def host_figures(self, limit: int) -> dict[str, Any]:
        pool = await self._get_pool()
        async with pool.acquire() as conn, conn.transaction(isolation="repeatable_read", readonly=True):
            withdrawals = bool(await conn.fetchval("SELECT to_regclass('withdrawals') IS NOT NULL"))
            totals = await conn.fetchrow(HOST_TOTALS)
            rows = await conn.fetch(host_check(withdrawals))
        return _figures(totals, list(rows), limit, withdrawals)
