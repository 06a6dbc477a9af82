"""Reading a partition's outbox consistently with its totals (for audit and rebuild), and its
quarantine: movements the settler set aside after a permanent SQL error."""

from __future__ import annotations

from typing import Any

from redis.asyncio import Redis

from server.cluster import node_client
from server.keys import outbox_key, quarantine_key, totals_key
from server.movement import Movement, encode

PAGE = 5000


async def snapshot(redis: Redis, p: int) -> tuple[dict[str, str], list[Movement]]:
    """The partition's totals hash and every outbox movement up to the same instant.

    Totals and the outbox's last id are read in one transaction: every entry up to that id has a
    seq at or below the snapshot's, and the settler deletes entries only after they commit to SQL,
    so an entry missing from this read is already in the ledger.
    """
    async with node_client(redis, totals_key(p)) as node:  # on a cluster: the partition's primary
        pipe = node.pipeline(transaction=True)
        pipe.hgetall(totals_key(p))
        pipe.xrevrange(outbox_key(p), count=1)
        replies: Any = await pipe.execute()
    totals, last = replies
    entries = await _read(redis, outbox_key(p), last[0][0]) if last else []
    return totals, entries


async def quarantined(redis: Redis, p: int) -> list[Movement]:
    """Every movement in the partition's quarantine. Read after `snapshot`: the settler writes an
    entry here before it deletes it from the outbox, so each is seen in one or both."""
    return await _read(redis, quarantine_key(p), "+")


async def _read(redis: Redis, stream: str, end: str) -> list[Movement]:
    """The stream's movements up to `end`, a page at a time."""
    out: list[Movement] = []
    start = "-"
    while True:
        page: Any = await redis.xrange(stream, min=start, max=end, count=PAGE) or []
        out.extend(Movement.from_fields(f) for _mid, f in page if f)
        if len(page) < PAGE:
            return out
        start = "(" + page[-1][0]


async def requeue(redis: Redis, partitions: int) -> int:
    """Move quarantined movements back to their outbox for the settler to try again (after the
    cause was fixed); each move is one transaction. Settling is keyed, so a movement already
    settled by then changes nothing."""
    moved = 0
    for p in range(partitions):
        while True:
            page: Any = await redis.xrange(quarantine_key(p), count=PAGE) or []
            for mid, fields in page:
                entry: Any = encode(Movement.from_fields(fields))  # without the error and time
                async with node_client(redis, outbox_key(p)) as node:
                    tx = node.pipeline(transaction=True)
                    tx.xadd(outbox_key(p), entry)
                    tx.xdel(quarantine_key(p), mid)
                    await tx.execute()
                moved += 1
            if len(page) < PAGE:
                break
    return moved
