"""Holds: the diamonds a refunded or disputed recharge's coins earned, set aside from the host.

A refund or a dispute claws a recharge order's coins back from the viewer (a REFUND or DISPUTE
movement whose `order_id` is the order). The gifts those coins paid for stay given, but the
diamonds they earned their hosts move from available to held: host_earnings.held_units, one
gift_holds row per gift, and ledger legs host:<id> -> host_held:<id> on that same movement, so
each movement's legs still sum to zero. A won dispute (a DISPUTE_REVERSAL movement of the order)
gives its dispute's holds back; a refund's holds stay. A hold never takes back a payout: if the
diamonds were paid out already, the host's available figure goes negative.

Which gifts did the order's coins pay for? Coins are spent oldest first. When the order was
credited the viewer held some balance B; the next B coins the viewer gave in gifts were those,
and the order's coins are the ones given after them. So walk the viewer's gifts after the
order's credit in sequence order, skip the first B coins (none if B was negative: a debt the
credit paid first, which leaves the order fewer coins to give), and give the next coins, up to
what was clawed back, to the order; a gift may be partly the order's. Each such gift sent within
`hold_window_ms` before the refund or dispute is held for its covered coins * share_bp units
(exact); older gifts still use up the order's coins but are not held. A gift's unreleased holds
never pass its coins, whichever orders they come from.

Settlement runs this in its transaction, for each new movement of those three kinds: they are
rare, so a few queries per movement are fine (never a query per gift of a batch). The rule is
written once, as a generator of SQL statements each backend's driver runs (on SQLite's thread,
or awaited on an asyncpg connection), so both backends hold exactly the same.
"""

from __future__ import annotations

import sqlite3
from dataclasses import dataclass
from typing import TYPE_CHECKING

from server.movement import COIN_KINDS, Kind, Movement
from server.store import queries
from server.store.models import DIAMOND_UNIT, host_account, host_held_account
from server.store.queries import numbered as _pg  # cached: one conversion a statement
from server.store.steps import Steps as StepsOf
from server.store.steps import run, run_async

if TYPE_CHECKING:
    import asyncpg

# settings.hold_window_s's default, for a store used without a settler (tests, tools); the
# settler passes the setting.
DEFAULT_HOLD_WINDOW_MS = 30 * 24 * 3600 * 1000
HOLDING = frozenset({Kind.REFUND, Kind.DISPUTE})
RELEASING = Kind.DISPUTE_REVERSAL
KINDS = HOLDING | {RELEASING}
# A keyed movement's own legs are 0-3 (rows.keyed_legs); its holds' or releases' legs follow,
# two per host.
FIRST_LEG = 4
# Gifts read per query while walking a viewer's spending.
PAGE = 500

Steps = StepsOf[None]

_OTHER_COIN_KINDS = ", ".join(f"'{k.value}'" for k in sorted(COIN_KINDS - {Kind.GIFT}))
# The order's credit, found on the viewer's movements (movements_user_seq, 0003_wallet.sql).
CREDIT_OF = ("SELECT seq FROM movements WHERE user_id = ? AND seq < ? AND kind = 'credit' AND ref = ?"
             " ORDER BY seq LIMIT 1")
# The viewer's coin balance just before a movement: the sum of every coin change before it.
BALANCE_BEFORE = (
    f"SELECT COALESCE(SUM(CASE WHEN kind = 'gift' THEN -coins WHEN kind IN ({_OTHER_COIN_KINDS}) THEN coins"
    " ELSE 0 END), 0) FROM movements WHERE user_id = ? AND seq < ?")
# The viewer's gifts between two movements, in the order they were spent: the user's movements
# by index, each joined to its gift by the gift's key (never a scan of gifts).
SPENDS = (
    "SELECT m.seq, g.id, g.host_id, g.coins, g.share_bp, g.sent_ms FROM movements m JOIN gifts g ON g.id = m.ref"
    " WHERE m.user_id = ? AND m.seq > ? AND m.seq < ? AND m.kind = 'gift' ORDER BY m.seq LIMIT ?")
HELD_OF_GIFT = "SELECT COALESCE(SUM(coins), 0) FROM gift_holds WHERE gift_id = ? AND released_ms IS NULL"
INSERT_HOLD = (
    "INSERT INTO gift_holds (gift_id, order_id, kind, host_id, user_id, part, seq, coins, diamond_units, held_ms)"
    " VALUES (?,?,?,?,?,?,?,?,?,?) ON CONFLICT (gift_id, order_id, kind) DO NOTHING RETURNING gift_id")
RELEASE = (
    "UPDATE gift_holds SET released_ms = ? WHERE order_id = ? AND kind = 'dispute' AND released_ms IS NULL"
    " RETURNING host_id, diamond_units")
ADD_HELD = "UPDATE host_earnings SET held_units = held_units + ? WHERE host_id = ?"


@dataclass(frozen=True, slots=True)
class Spend:
    """One gift of the viewer's, as the walk reads it."""

    seq: int
    gift_id: str
    host_id: str
    coins: int
    share_bp: int
    sent_ms: int


class Fifo:
    """The walk over a viewer's gifts after an order's credit: which coins were the order's."""

    def __init__(self, balance_before: int, clawed: int) -> None:
        # The balance held at the credit is spent first; a debt took part of the order's coins.
        self.skip = max(balance_before, 0)
        self.cover = clawed + min(balance_before, 0)
        self.covered: list[tuple[Spend, int]] = []

    @property
    def done(self) -> bool:
        return self.cover <= 0

    def feed(self, spends: list[Spend]) -> None:
        for spend in spends:
            if self.done:
                return
            earlier = min(spend.coins, self.skip)
            self.skip -= earlier
            mine = min(spend.coins - earlier, self.cover)
            if mine > 0:
                self.cover -= mine
                self.covered.append((spend, mine))


def steps(m: Movement, hold_window_ms: int, now_ms: int) -> Steps:
    """The statements settling `m`'s holds (a REFUND or DISPUTE) or releases (a DISPUTE_REVERSAL)."""
    if m.kind in HOLDING:
        yield from _hold(m, hold_window_ms, now_ms)
    elif m.kind is RELEASING:
        yield from _release(m, now_ms)


def _hold(m: Movement, hold_window_ms: int, now_ms: int) -> Steps:
    clawed = -m.coins
    if clawed <= 0:
        return
    credit = yield CREDIT_OF, (m.user_id, m.seq, m.order_id)
    if not credit:
        return  # an order whose credit the ledger does not hold: no coins of it were given
    credit_seq = int(credit[0][0])
    fifo = Fifo(int((yield BALANCE_BEFORE, (m.user_id, credit_seq))[0][0]), clawed)
    after = credit_seq
    while not fifo.done:
        page = yield SPENDS, (m.user_id, after, m.seq, PAGE)
        fifo.feed([Spend(int(r[0]), str(r[1]), str(r[2]), int(r[3]), int(r[4]), int(r[5])) for r in page])
        if len(page) < PAGE:
            break
        after = int(page[-1][0])
    since = m.ts_ms - hold_window_ms
    per_host: dict[str, int] = {}
    for spend, coins in fifo.covered:
        if spend.sent_ms < since:
            continue
        held = int((yield HELD_OF_GIFT, (spend.gift_id,))[0][0])
        coins = min(coins, spend.coins - held)
        if coins <= 0:
            continue
        units = coins * spend.share_bp
        made = yield INSERT_HOLD, (spend.gift_id, m.order_id, m.kind.value, spend.host_id, m.user_id, m.partition,
                                   m.seq, coins, units, now_ms)
        if made:
            per_host[spend.host_id] = per_host.get(spend.host_id, 0) + units
    yield from _move(m, per_host, held=True)


def _release(m: Movement, now_ms: int) -> Steps:
    per_host: dict[str, int] = {}
    for host_id, units in (yield RELEASE, (now_ms, m.order_id)):
        per_host[str(host_id)] = per_host.get(str(host_id), 0) + int(units)
    yield from _move(m, per_host, held=False)


def _move(m: Movement, per_host: dict[str, int], *, held: bool) -> Steps:
    """Each host's units between its account and its held account, in host order (one lock
    order for every settler), as held_units and as two ledger legs of the movement."""
    for i, host in enumerate(sorted(per_host)):
        units = per_host[host] if held else -per_host[host]
        if not units:
            continue
        leg = FIRST_LEG + 2 * i
        yield ADD_HELD, (units, host)
        yield queries.INSERT_LEDGER_LEG, (m.partition, m.seq, leg, host_account(host), DIAMOND_UNIT, -units)
        yield queries.INSERT_LEDGER_LEG, (m.partition, m.seq, leg + 1, host_held_account(host), DIAMOND_UNIT, units)


def settle_sqlite(conn: sqlite3.Connection, movements: list[Movement], hold_window_ms: int, now_ms: int) -> None:
    """Run the holds of a batch's new movements, inside the settlement's transaction."""
    for m in movements:
        if m.kind in KINDS:
            run(steps(m, hold_window_ms, now_ms), lambda sql, args: conn.execute(sql, args).fetchall())


async def settle_postgres(conn: asyncpg.Connection, movements: list[Movement], hold_window_ms: int,
                          now_ms: int) -> None:
    """The same on PostgreSQL, inside the settlement's transaction."""
    for m in movements:
        if m.kind in KINDS:
            await run_async(steps(m, hold_window_ms, now_ms), lambda sql, args: conn.fetch(_pg(sql), *args))


