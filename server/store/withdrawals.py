"""Two-factor secrets, withdrawals and payout events (issue 12).

`WithdrawalsStore` is what the rest of the server calls; `SQLiteWithdrawals` and `PostgresWithdrawals` are the
two backends' halves, mixed into SQLiteStore and PostgresStore (which give them `_run`, and
`_get_pool`/`_fetch`/`_fetchrow`/`_execute`).

Every method is written once, in `_Withdrawals`, as SQL with `?` placeholders. A decision made
inside a transaction (a withdrawal's reservation, a payout's outcome) is a generator of
statements, as store/holds.py does it: it yields (sql, args), is sent back the rows, and returns
(result, commit). Each backend drives it in its own transaction: SQLite by BEGIN IMMEDIATE on its
one connection (the write lock first, so what it reads is what it changes), PostgreSQL by taking
the host's host_earnings row FOR UPDATE first. Either way one host's withdrawals are decided one
at a time, so concurrent requests never reserve more than the host has.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Generator
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any, Protocol, TypeVar

from server.store import host_ledger, queries
from server.store.halves import PostgresHalf, SQLiteHalf
from server.store.models import UNITS_PER_DIAMOND
from server.store.steps import Row, Step, run, run_async
from server.store.steps import Steps as StepsOf

T = TypeVar("T")
# A transaction's decision (store/steps.py): statements out, rows back, (result, commit) at the end.
Steps = StepsOf[tuple[T, bool]]

# A withdrawal's statuses: pending until the payout provider says paid or failed, then never again.
PENDING, PAID, FAILED = "pending", "paid", "failed"


@dataclass(frozen=True, slots=True)
class TwoFactor:
    """A user's TOTP enrolment. The secrets are credentials: never in a repr, a log or an answer
    after the enrolment's own."""

    user_id: str
    secret: str | None = field(repr=False)
    pending_secret: str | None = field(repr=False)
    # The last time step whose code was accepted: only a later one is.
    last_step: int
    failures: int
    failures_since_ms: int

    @property
    def active(self) -> bool:
        return self.secret is not None


@dataclass(frozen=True, slots=True)
class Withdrawal:
    id: str
    host_id: str
    idempotency_key: str
    diamonds: int
    amount_cents: int
    status: str
    created_ms: int
    updated_ms: int
    failure_reason: str | None = None

    @property
    def units(self) -> int:
        return self.diamonds * UNITS_PER_DIAMOND


class Reservation(StrEnum):
    """What asking for a withdrawal came to."""

    CREATED = "created"
    EXISTING = "existing"  # the key named a withdrawal already: that one is the answer
    REUSED_CODE = "reused_code"  # another request took this code's time step (or a later one) first
    INSUFFICIENT = "insufficient"
    OVER_DAILY = "over_daily"


@dataclass(frozen=True, slots=True)
class PayoutEvent:
    """A payout provider's webhook event as received, keyed by its id."""

    id: str
    provider: str
    type: str
    withdrawal_id: str
    received_ms: int
    body: str


@dataclass(frozen=True, slots=True)
class PayoutApplied:
    withdrawal: Withdrawal
    applied: bool
    duplicate: bool = False


class WithdrawalsStore(Protocol):
    async def twofactor(self, user_id: str) -> TwoFactor | None: ...

    async def totp_enrol(self, user_id: str, secret: str, now_ms: int) -> bool:
        """Keep `secret` as the user's pending one (replacing any); False, and nothing kept, when
        a secret is active already (replacing it takes `totp_reenrol`)."""
        ...

    async def totp_reenrol(self, user_id: str, secret: str, active_secret: str, step: int, now_ms: int) -> bool:
        """Keep `secret` as pending and take time step `step` of the active secret, at once; False
        when the active secret is not `active_secret` or a step as late was taken already."""
        ...

    async def totp_activate(self, user_id: str, secret: str, step: int, now_ms: int) -> bool:
        """The pending `secret` becomes the active one, its code's `step` taken; False when it is
        not the pending one or a step as late was taken already."""
        ...

    async def totp_attempt(self, user_id: str, now_ms: int, max_failures: int, window_ms: int) -> bool:
        """Count a code check before it is made (so concurrent guesses are counted too); False,
        counting nothing, when `max_failures` were counted in the window already."""
        ...

    async def totp_passed(self, user_id: str) -> None:
        """A right code: the checks counted so far are forgotten."""
        ...

    async def withdrawal_by_key(self, host_id: str, idempotency_key: str) -> Withdrawal | None: ...
    async def get_withdrawal(self, withdrawal_id: str) -> Withdrawal | None: ...

    async def reserve_withdrawal(self, w: Withdrawal, secret: str, step: int, day_start_ms: int,
                                 daily_max_diamonds: int) -> tuple[Withdrawal, Reservation]:
        """In one transaction holding the host: the withdrawal already under w's key, or take
        time step `step` of the active `secret`, check the host's available diamonds and the UTC
        day's total (pending and paid withdrawals since `day_start_ms`), then write `w`, reserve
        its diamonds, its ledger movement and its first transition. A refusal changes nothing."""
        ...

    async def host_withdrawals(self, host_id: str, before: tuple[int, str] | None,
                               limit: int) -> list[tuple[Withdrawal, list[tuple[str, int]]]]:
        """A host's withdrawals newest first, older than `before` (created_ms, id) when given,
        each with its transitions (status, at_ms) in the order made."""
        ...

    async def apply_payout(self, event: PayoutEvent, status: str, reason: str | None) -> PayoutApplied:
        """In one transaction: record `event` (an id seen before changes nothing and says so),
        then move a pending withdrawal to `status` (paid: its reserved diamonds are paid out;
        failed: they are available again) with its transition and ledger movement. A withdrawal
        past pending changes nothing, and the event is recorded as ignored."""
        ...


# --- SQL --------------------------------------------------------------------------------------

_TWOFACTOR = ("SELECT user_id, secret, pending_secret, last_step, failures, failures_since_ms FROM twofactor"
              " WHERE user_id = ?")
# Never over an active secret: the conflict's WHERE leaves the row as it is, and nothing returns.
_ENROL = (
    "INSERT INTO twofactor (user_id, secret, pending_secret, created_ms, updated_ms) VALUES (?, NULL, ?, ?, ?)"
    " ON CONFLICT (user_id) DO UPDATE SET pending_secret = excluded.pending_secret,"
    " updated_ms = excluded.updated_ms WHERE twofactor.secret IS NULL RETURNING user_id")
# A step is taken by a conditional UPDATE: of two requests with codes of one step, one matches.
_REENROL = ("UPDATE twofactor SET pending_secret = ?, last_step = ?, updated_ms = ?"
            " WHERE user_id = ? AND secret = ? AND last_step < ? RETURNING user_id")
_ACTIVATE = ("UPDATE twofactor SET secret = pending_secret, pending_secret = NULL, last_step = ?, updated_ms = ?"
             " WHERE user_id = ? AND pending_secret = ? AND last_step < ? RETURNING user_id")
_TAKE_STEP = ("UPDATE twofactor SET last_step = ?, updated_ms = ?"
              " WHERE user_id = ? AND secret = ? AND last_step < ? RETURNING user_id")
# A fixed window from its first check: a check past the window starts a new one at 1.
_ATTEMPT = (
    "UPDATE twofactor SET failures = CASE WHEN failures_since_ms <= ? THEN 1 ELSE failures + 1 END,"
    " failures_since_ms = CASE WHEN failures_since_ms <= ? THEN ? ELSE failures_since_ms END"
    " WHERE user_id = ? AND (failures < ? OR failures_since_ms <= ?) RETURNING failures")
_PASSED = "UPDATE twofactor SET failures = 0 WHERE user_id = ? AND failures <> 0"

_COLUMNS = "id, host_id, idempotency_key, diamonds, amount_cents, status, created_ms, updated_ms, failure_reason"
_SELECT = f"SELECT {_COLUMNS} FROM withdrawals"
_BY_KEY = _SELECT + " WHERE host_id = ? AND idempotency_key = ?"
_BY_ID = _SELECT + " WHERE id = ?"
_PAGE = _SELECT + " WHERE host_id = ? ORDER BY created_ms DESC, id DESC LIMIT ?"
_PAGE_BEFORE = (_SELECT + " WHERE host_id = ? AND (created_ms < ? OR (created_ms = ? AND id < ?))"
                " ORDER BY created_ms DESC, id DESC LIMIT ?")
_TRANSITIONS = "SELECT status, at_ms FROM withdrawal_transitions WHERE withdrawal_id = ? ORDER BY at_ms, ledger_seq"
_INSERT = f"INSERT INTO withdrawals ({_COLUMNS}) VALUES (?,?,?,?,?,?,?,?,?)"
# PostgreSQL adds FOR UPDATE (_PG_ONLY): the lock that puts one host's withdrawals in a line.
_LOCK_HOST = "SELECT diamond_units, held_units, reserved_units, paid_units FROM host_earnings WHERE host_id = ?"
_DAY_TOTAL = ("SELECT COALESCE(SUM(diamonds), 0) FROM withdrawals"
              f" WHERE host_id = ? AND created_ms >= ? AND status IN ('{PENDING}', '{PAID}')")
_RESERVE = "UPDATE host_earnings SET reserved_units = reserved_units + ? WHERE host_id = ?"
_PAY = "UPDATE host_earnings SET reserved_units = reserved_units - ?, paid_units = paid_units + ? WHERE host_id = ?"
_RETURN = "UPDATE host_earnings SET reserved_units = reserved_units - ? WHERE host_id = ?"
_INSERT_TRANSITION = ("INSERT INTO withdrawal_transitions (withdrawal_id, status, at_ms, event_id, ledger_seq)"
                      " VALUES (?,?,?,?,?)")
# Only from pending: a paid withdrawal never fails afterwards, nor a failed one pays.
_CLOSE = (f"UPDATE withdrawals SET status = ?, updated_ms = ?, failure_reason = ? WHERE id = ? AND status = '{PENDING}'"
          f" RETURNING {_COLUMNS}")
_INSERT_EVENT = ("INSERT INTO payout_events (id, provider, type, withdrawal_id, outcome, received_ms, body)"
                 " VALUES (?,?,?,?,'applied',?,?) ON CONFLICT (id) DO NOTHING RETURNING id")
_EVENT_IGNORED = "UPDATE payout_events SET outcome = 'ignored' WHERE id = ?"

_PG_ONLY = {_LOCK_HOST: _LOCK_HOST + " FOR UPDATE"}


def _pg(sql: str) -> str:
    return queries.numbered(_PG_ONLY.get(sql, sql))


# --- decisions, each made in one transaction ----------------------------------------------------


def _reserve(w: Withdrawal, secret: str, step: int, day_start_ms: int,
             daily_max: int) -> Steps[tuple[Withdrawal, Reservation]]:
    # The lock first (PostgreSQL): everything below is read and written by one request at a time.
    host = yield _LOCK_HOST, (w.host_id,)
    existing = yield _BY_KEY, (w.host_id, w.idempotency_key)
    if existing:
        return (Withdrawal(*existing[0]), Reservation.EXISTING), False
    # Taken here, undone by the rollback of any refusal below: only an accepted withdrawal uses a code.
    if not (yield _TAKE_STEP, (step, w.created_ms, w.host_id, secret, step)):
        return (w, Reservation.REUSED_CODE), False
    lifetime, held, reserved, paid = (int(v) for v in host[0]) if host else (0, 0, 0, 0)
    if w.units > lifetime - held - reserved - paid:
        return (w, Reservation.INSUFFICIENT), False
    today = int((yield _DAY_TOTAL, (w.host_id, day_start_ms))[0][0])
    if today + w.diamonds > daily_max:
        return (w, Reservation.OVER_DAILY), False
    yield _INSERT, (w.id, w.host_id, w.idempotency_key, w.diamonds, w.amount_cents, w.status, w.created_ms,
                    w.updated_ms, w.failure_reason)
    yield _RESERVE, (w.units, w.host_id)
    yield from _transition(w, PENDING, None, host_ledger.host(w.host_id), host_ledger.reserved(w.host_id))
    return (w, Reservation.CREATED), True


def _payout(event: PayoutEvent, status: str, reason: str | None) -> Steps[PayoutApplied]:
    # A second delivery of one event waits here for the first one's commit (PostgreSQL), then
    # inserts nothing: a duplicate.
    if not (yield _INSERT_EVENT, (event.id, event.provider, event.type, event.withdrawal_id, event.received_ms,
                                  event.body)):
        rows = yield _BY_ID, (event.withdrawal_id,)
        return PayoutApplied(Withdrawal(*rows[0]), applied=False, duplicate=True), False
    closed = yield _CLOSE, (status, event.received_ms, reason, event.withdrawal_id)
    if not closed:
        rows = yield _BY_ID, (event.withdrawal_id,)
        if not rows:
            raise LookupError(f"no withdrawal {event.withdrawal_id}")  # the webhook found it first
        yield _EVENT_IGNORED, (event.id,)
        return PayoutApplied(Withdrawal(*rows[0]), applied=False), True
    w = Withdrawal(*closed[0])
    source = host_ledger.reserved(w.host_id)
    if status == PAID:
        yield _PAY, (w.units, w.units, w.host_id)
        yield from _transition(w, PAID, event.id, source, host_ledger.PAYOUTS_ACCOUNT)
    else:
        yield _RETURN, (w.units, w.host_id)
        yield from _transition(w, FAILED, event.id, source, host_ledger.host(w.host_id))
    return PayoutApplied(w, applied=True), True


def _transition(w: Withdrawal, status: str, event_id: str | None, source: str,
                target: str) -> Generator[Step, list[Row], None]:
    """The status reached, keyed (withdrawal, status), and its diamonds' ledger movement (part -1)."""
    seq = int((yield host_ledger.NEXT_SEQ, ())[0][0])
    for leg in host_ledger.legs(seq, source, target, w.diamonds):
        yield queries.INSERT_LEDGER_LEG, leg
    yield _INSERT_TRANSITION, (w.id, status, w.updated_ms, event_id, seq)


# --- the methods, once for both backends --------------------------------------------------------


class _Withdrawals:
    """Each backend gives `_wd_rows` (one statement, its rows) and `_wd_steps` (a decision in a
    transaction)."""

    async def _wd_rows(self, sql: str, *args: Any) -> list[Row]:
        raise NotImplementedError

    async def _wd_steps(self, steps: Steps[T]) -> T:
        raise NotImplementedError

    async def twofactor(self, user_id: str) -> TwoFactor | None:
        rows = await self._wd_rows(_TWOFACTOR, user_id)
        return TwoFactor(*rows[0]) if rows else None

    async def totp_enrol(self, user_id: str, secret: str, now_ms: int) -> bool:
        return bool(await self._wd_rows(_ENROL, user_id, secret, now_ms, now_ms))

    async def totp_reenrol(self, user_id: str, secret: str, active_secret: str, step: int, now_ms: int) -> bool:
        return bool(await self._wd_rows(_REENROL, secret, step, now_ms, user_id, active_secret, step))

    async def totp_activate(self, user_id: str, secret: str, step: int, now_ms: int) -> bool:
        return bool(await self._wd_rows(_ACTIVATE, step, now_ms, user_id, secret, step))

    async def totp_attempt(self, user_id: str, now_ms: int, max_failures: int, window_ms: int) -> bool:
        cutoff = now_ms - window_ms
        return bool(await self._wd_rows(_ATTEMPT, cutoff, cutoff, now_ms, user_id, max_failures, cutoff))

    async def totp_passed(self, user_id: str) -> None:
        await self._wd_rows(_PASSED, user_id)

    async def withdrawal_by_key(self, host_id: str, idempotency_key: str) -> Withdrawal | None:
        rows = await self._wd_rows(_BY_KEY, host_id, idempotency_key)
        return Withdrawal(*rows[0]) if rows else None

    async def get_withdrawal(self, withdrawal_id: str) -> Withdrawal | None:
        rows = await self._wd_rows(_BY_ID, withdrawal_id)
        return Withdrawal(*rows[0]) if rows else None

    async def reserve_withdrawal(self, w: Withdrawal, secret: str, step: int, day_start_ms: int,
                                 daily_max_diamonds: int) -> tuple[Withdrawal, Reservation]:
        return await self._wd_steps(_reserve(w, secret, step, day_start_ms, daily_max_diamonds))

    async def host_withdrawals(self, host_id: str, before: tuple[int, str] | None,
                               limit: int) -> list[tuple[Withdrawal, list[tuple[str, int]]]]:
        if before is None:
            rows = await self._wd_rows(_PAGE, host_id, limit)
        else:
            rows = await self._wd_rows(_PAGE_BEFORE, host_id, before[0], before[0], before[1], limit)
        out = []
        for r in rows:
            w = Withdrawal(*r)
            out.append((w, [(str(s), int(at)) for s, at in await self._wd_rows(_TRANSITIONS, w.id)]))
        return out

    async def apply_payout(self, event: PayoutEvent, status: str, reason: str | None) -> PayoutApplied:
        return await self._wd_steps(_payout(event, status, reason))


class SQLiteWithdrawals(_Withdrawals, SQLiteHalf):
    async def _wd_rows(self, sql: str, *args: Any) -> list[Row]:
        return await self._run(lambda c: [tuple(r) for r in c.execute(sql, args).fetchall()])

    async def _wd_steps(self, steps: Steps[T]) -> T:
        def decide(conn: sqlite3.Connection) -> T:
            # IMMEDIATE: the write lock before the first read (one connection per process; other
            # processes on the file wait for it).
            conn.execute("BEGIN IMMEDIATE")
            try:
                result, commit = run(steps, lambda sql, args: conn.execute(sql, args).fetchall())
                conn.execute("COMMIT" if commit else "ROLLBACK")
                return result
            except BaseException:
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
                raise

        return await self._run(decide)


class PostgresWithdrawals(_Withdrawals, PostgresHalf):
    async def _wd_rows(self, sql: str, *args: Any) -> list[Row]:
        return [tuple(r) for r in await self._fetch(_pg(sql), *args)]

    async def _wd_steps(self, steps: Steps[T]) -> T:
        pool = await self._get_pool()
        async with pool.acquire() as conn:
            tx = conn.transaction()
            await tx.start()
            try:
                result, commit = await run_async(steps, lambda sql, args: conn.fetch(_pg(sql), *args))
            except BaseException:
                await tx.rollback()
                raise
            # A refusal rolls back what its decision wrote before refusing (the code's time step).
            await (tx.commit() if commit else tx.rollback())
        return result
