"""Reading a partition's outbox consistently with its totals (for audit and rebuild)."""

from __future__ import annotations

from typing import Any

from redis.asyncio import Redis

from server.keys import outbox_key, totals_key
from server.store.models import Movement

PAGE = 5000


async def snapshot(redis: Redis, p: int) -> tuple[dict[str, str], list[Movement]]:
    """The partition's totals hash and every outbox movement up to the same instant.

    Totals and the outbox's last id are read in one transaction: every entry up to that id has a
    seq at or below the snapshot's, and the settler deletes entries only after they commit to SQL,
    so an entry missing from this read is already in the ledger.
    """
    pipe = redis.pipeline(transaction=True)
    pipe.hgetall(totals_key(p))
    pipe.xrevrange(outbox_key(p), count=1)
    replies: Any = await pipe.execute()
    totals, last = replies
    entries: list[Movement] = []
    if last:
        start, end = "-", last[0][0]
        while True:
            page: Any = await redis.xrange(outbox_key(p), min=start, max=end, count=PAGE) or []
            entries.extend(Movement.from_fields(f) for _mid, f in page if f)
            if len(page) < PAGE:
                break
            start = "(" + page[-1][0]
    return totals, entries
