"""A user's statement: every coin movement, newest first, settled or still in the outbox.

Right after a gift a user expects to see it, and a gift is settled into SQL up to a few hundred
ms later (more while the database is away). So a page is the union of the ledger and the user's
unsettled entries in their partition's outbox, each marked `settled`. The outbox is read first,
then SQL: an entry the settler moves between the two reads is in SQL by the second one, and one
still in the outbox was read from it, so none is missed (and one seen in both counts once).

A user's movements all share one partition, whose sequence number orders them: the cursor is
the last listed movement's number, and a page holds movements numbered below it. New movements
get higher numbers, so pages already handed out never shift while movements keep arriving.
"""

from __future__ import annotations

from typing import Any

from redis.asyncio import Redis

from server.codes import Err, GiftstreamError
from server.keys import UserKeys
from server.movement import COIN_KINDS, Kind, Movement
from server.store.base import Store

DEFAULT_LIMIT = 50
MAX_LIMIT = 200
# Outbox entries read per round trip, and at most (a partition's backlog while the database is
# away can be long; past this the page lists what SQL holds and says `complete: false`).
PAGE = 1000
MAX_SCAN = 20_000
# The kind names of the statement (a credit is a recharge).
NAMES = {Kind.CREDIT: "recharge"}
NEWEST = 2**62


def item(m: Movement, settled: bool) -> dict[str, Any]:
    """One line of the statement: what moved, by how much (signed), when, and what it refers to."""
    out: dict[str, Any] = {"id": f"{m.partition}-{m.seq}", "kind": NAMES.get(m.kind, m.kind.value),
                           "coins": m.signed_coins, "at": m.ts_ms, "settled": settled}
    if m.kind is Kind.GIFT:
        out["gift_id"] = m.gift_id
    elif m.kind in (Kind.CREDIT, Kind.REFUND, Kind.DISPUTE, Kind.DISPUTE_REVERSAL):
        out["order_id"] = m.order_id
    else:
        out["ref"] = m.order_id
    if m.points:
        out["points"] = m.points
    return out


async def _unsettled(redis: Redis, k: UserKeys, before: int, limit: int) -> tuple[list[Movement], bool]:
    """The user's coin movements in the outbox numbered below `before`, newest first (at most
    `limit`), and whether the outbox was read far enough to be sure none is missing."""
    found: list[Movement] = []
    end = "+"
    scanned = 0
    while scanned < MAX_SCAN:
        page: Any = await redis.xrevrange(k.outbox, max=end, min="-", count=PAGE)
        for entry_id, fields in page:
            m = Movement.from_fields(fields)
            if m.seq < before and m.user_id == k.user_id and m.kind in COIN_KINDS:
                found.append(m)
                if len(found) == limit:
                    return found, True
            end = "(" + entry_id
        scanned += len(page)
        if len(page) < PAGE:
            return found, True
    return found, False


async def transactions(redis: Redis, store: Store, partitions: int, user_id: str, cursor: str | None,
                       limit: int) -> dict[str, Any]:
    """GET /v1/wallet/transactions: {"transactions": [...], "next_cursor": str | null, "complete": bool}."""
    if cursor is not None and not cursor.isdigit():
        raise GiftstreamError(Err.BAD_REQUEST, "cursor must be a next_cursor this endpoint returned")
    before = int(cursor) if cursor is not None else NEWEST
    k = UserKeys(user_id, partitions)
    pending, complete = await _unsettled(redis, k, before, limit)
    settled = await store.user_movements(user_id, before, limit)
    lines = {m.seq: item(m, True) for m in settled}
    for m in pending:
        lines.setdefault(m.seq, item(m, False))
    page = [lines[seq] for seq in sorted(lines, reverse=True)[:limit]]
    last = page[-1]["id"].split("-")[1] if len(page) == limit else None
    return {"transactions": page, "next_cursor": last, "complete": complete}
