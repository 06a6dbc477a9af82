"""Outbox consumer: settles coin movements into the durable ledger.

Reads every partition's outbox with one consumer group, writes a batch in one SQL
transaction (idempotent on (partition, seq)), then XACKs and deletes the entries.
Delivery is at-least-once; effects are exactly-once because every write is keyed.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from operator import attrgetter
from typing import Any

from redis.asyncio import Redis
from redis.exceptions import ResponseError

from server import metrics
from server.clusterpipe import pipe_like
from server.fastpipe import Arg, Pipe
from server.keys import SETTLER_GROUP, outbox_key, quarantine_key
from server.movement import Movement, encode
from server.outage import Backoff, Outage
from server.settings import Settings
from server.settlement.consumer import Batch, GroupConsumer
from server.store.base import Store
from server.store.holds import DEFAULT_HOLD_WINDOW_MS
from server.store.models import SettleResult

log = logging.getLogger("giftstream.settler")

MIN_COUNT = 64
BACKOFF_MIN_S = 0.2
BACKOFF_MAX_S = 10.0


async def ensure_groups(redis: Redis, partitions: int) -> None:
    for p in range(partitions):
        try:
            await redis.xgroup_create(outbox_key(p), SETTLER_GROUP, id="0", mkstream=True)
        except ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise


def _halves(movements: list[Movement]) -> list[list[Movement]]:
    """Both halves of a failing batch, the first one last (settled first)."""
    if len(movements) < 2:
        return [movements]
    mid = len(movements) // 2
    return [movements[mid:], movements[:mid]]


_ts_ms = attrgetter("ts_ms")


class _Permanent(Exception):
    """The store refused the movements themselves (see Store.is_permanent)."""


class Settler:
    def __init__(self, redis: Redis, store: Store, *, partitions: int, consumer: str,
                 max_batch: int = 2000, claim_idle_ms: int = 30_000, commits: int = 2,
                 linger_ms: float = 150.0, pipe: Pipe | None = None,
                 hold_window_ms: int = DEFAULT_HOLD_WINDOW_MS) -> None:
        self.redis = redis
        self.store = store
        self.partitions = partitions
        self.consumer = consumer
        self.max_batch = max_batch
        self.claim_idle_ms = claim_idle_ms
        self.commits = max(1, commits)
        # After a read that came back short, wait this long before the next: in a steady storm
        # the outbox fills a batch meanwhile, so reads and commits go from thousands a second
        # to a few, for at most this much more settlement lag. A backlog reads back to back.
        self.linger_s = max(0.0, linger_ms / 1000)
        # A refund or dispute holds the diamonds of the gifts its coins paid for, sent this long
        # before it at most (store/holds.py).
        self.hold_window_ms = hold_window_ms
        self.streams = [outbox_key(p) for p in range(partitions)]
        # Reads and acks go through the lean pipeline (a read and every batch's ack can be in
        # flight at once); XAUTOCLAIM, rare, stays on redis-py.
        self._own_pipe = pipe is None
        self.pipe = pipe or pipe_like(redis, max_connections=1 + self.commits, encoding="utf-8")
        self._group = GroupConsumer(self.pipe, self.streams, consumer)
        # XREADGROUP's COUNT is per stream: the per-stream share of the batch budget.
        self._per_stream_max = max(MIN_COUNT, max_batch // partitions)
        self._count = max(MIN_COUNT // 4, self._per_stream_max // 4)
        self._stopping = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        # figures for /metrics and /healthz
        self.settled = 0
        self.duplicates = 0
        self.batches = 0
        self.failures = 0
        self.quarantined = 0
        self.last_error: str | None = None
        self.degraded = False
        self.last_batch_at = 0.0
        # The loop failing (Redis unreachable) and commits failing (the database away) are two
        # outages, each logged once with its end; each waits longer after every failure in a row.
        self._loop_outage = Outage(log, "settler loop", "retrying with backoff, the outbox keeps every movement")
        self._loop_backoff = Backoff(BACKOFF_MIN_S, BACKOFF_MAX_S)
        self._db_outage = Outage(log, "settlement commits", "retrying with backoff, the outbox keeps every movement")

    @classmethod
    def from_settings(cls, redis: Redis, store: Store, settings: Settings, *, consumer: str,
                      pipe: Pipe | None = None) -> Settler:
        """The settler `serve` and `settle` run: batch size, claim idle time and linger from settings."""
        return cls(redis, store, partitions=settings.partitions, consumer=consumer, max_batch=settings.settle_batch,
                   claim_idle_ms=settings.settle_claim_idle_ms, linger_ms=settings.settle_linger_ms, pipe=pipe,
                   hold_window_ms=settings.hold_window_s * 1000)

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self.run(), name="giftstream-settler")

    async def stop(self, flush: bool = True, timeout: float = 30.0) -> None:
        """Stop; with flush, first settle what the outbox holds now. Never raises: whatever is not
        settled (Redis or the database away) stays in the outbox for the next start."""
        self._stopping.set()
        if self._task is not None:
            try:
                await asyncio.wait_for(self._task, timeout)
            except TimeoutError:
                pass  # wait_for cancelled it; its batches were shielded
        if flush:
            try:
                await asyncio.wait_for(self._flush(), timeout)
            except Exception as exc:
                log.warning("settler stopped with the outbox not flushed (%s); it is settled on the next start",
                            type(exc).__name__)
        if self._own_pipe:
            await self.pipe.aclose()

    async def _flush(self) -> None:
        while await self.settle_once(block_ms=None) > 0:
            pass

    async def run(self) -> None:
        # Our own pending entries are settled first (from id 0): at start, for entries read before a
        # restart, and after every error: a read whose reply was lost left entries pending to us, an
        # ack that failed left a committed batch pending; unread, they would wait for XAUTOCLAIM.
        recover = True
        last_claim = 0.0
        # Batches commit while the next one is read and parsed; up to `commits` of them at once,
        # each in its own transaction (as separate settlers' batches are), so the database works
        # on one batch while this loop feeds it the next.
        committing: deque[asyncio.Task[None]] = deque()
        try:
            while not self._stopping.is_set():
                try:
                    if recover:
                        # Batches still committing hold some of our pending entries: let them end first.
                        await asyncio.gather(*committing, return_exceptions=True)
                        committing.clear()
                        await ensure_groups(self.redis, self.partitions)
                        await self._settle_backlog("0")
                        recover = False
                        self._loop_backoff.reset()
                        if self._loop_outage.recovered() is not None:
                            self.degraded = False
                    if time.monotonic() - last_claim > max(1.0, self.claim_idle_ms / 3000):
                        last_claim = time.monotonic()
                        while committing:  # claimed entries may be in a batch still committing
                            await committing.popleft()
                        await self.claim_abandoned()
                    batch = await self._read(start_id=">", block_ms=200)
                    while committing and (committing[0].done() or len(committing) >= self.commits):
                        await committing.popleft()
                    if batch.movements:
                        committing.append(asyncio.get_running_loop().create_task(self._settle(batch)))
                        if not batch.full and self.linger_s:
                            with contextlib.suppress(TimeoutError):
                                await asyncio.wait_for(self._stopping.wait(), self.linger_s)
                except asyncio.CancelledError:
                    raise
                except Exception as exc:  # Redis gone: retry, never die
                    recover = True
                    self._failed(exc)
                    self._loop_outage.failed(exc)
                    await self._loop_backoff.wait(self._stopping)
        finally:
            if committing:
                await asyncio.shield(asyncio.gather(*committing, return_exceptions=True))

    async def _settle_backlog(self, start: str) -> None:
        while True:
            batch = await self._read(start_id=start, block_ms=None)
            if not batch.movements:
                return
            await self._settle(batch)

    async def settle_once(self, block_ms: int | None) -> int:
        batch = await self._read(start_id=">", block_ms=block_ms)
        if batch.movements:
            await self._settle(batch)
        return len(batch.movements)

    async def claim_abandoned(self) -> int:
        """XAUTOCLAIM entries another settler took and never acknowledged (it died)."""
        claimed = 0
        for stream in self.streams:
            cursor = "0-0"
            while True:
                reply: Any = await self.redis.xautoclaim(stream, SETTLER_GROUP, self.consumer,
                                                    min_idle_time=self.claim_idle_ms,
                                                    start_id=cursor, count=self._count)
                cursor, messages = reply[0], reply[1]
                batch = Batch()
                for mid, fields in messages:
                    if fields:  # an entry deleted while still pending comes back without fields
                        batch.movements.append(Movement.from_fields(fields))
                        batch.ids.setdefault(stream, []).append(mid)
                if batch.movements:
                    await self._settle(batch)
                    claimed += len(batch.movements)
                if cursor in ("0-0", b"0-0"):
                    break
        return claimed

    async def _read(self, start_id: str, block_ms: int | None) -> Batch:
        batch = await self._group.read(start_id, self._count, block_ms)
        # Adapt batch size to the backlog: grow while reads come back full, shrink when idle.
        if batch.full:
            self._count = min(self._per_stream_max, self._count * 2)
        elif len(batch.movements) < self._count // 4:
            self._count = max(MIN_COUNT // 4, self._count // 2)
        return batch

    async def _settle(self, batch: Batch) -> None:
        started = time.perf_counter()
        try:
            result = await self._commit(batch.movements)
        except _Permanent:
            result = await self._set_aside(batch.movements)
        committed_ms = time.time() * 1000
        self.degraded = False
        # Acknowledge only after commit; a crash before this line re-delivers, and the keyed writes
        # make the re-delivery a no-op.
        await asyncio.shield(self._group.ack(batch.ids))
        metrics.SETTLE_BATCH_SECONDS.observe(time.perf_counter() - started)
        # Per batch, for its oldest movement: a histogram observation per movement would cost the
        # settler more than its SQL at tens of thousands of movements a second.
        metrics.SETTLE_LAG_SECONDS.observe(max(0.0, committed_ms - min(map(_ts_ms, batch.movements))) / 1000)
        self.settled += result.movements
        self.duplicates += result.duplicates
        self.batches += 1
        self.last_batch_at = time.time()

    async def _commit(self, movements: list[Movement]) -> SettleResult:
        """One transaction, retried while the database is away (the outbox keeps every movement
        meanwhile); _Permanent when it failed on the movements themselves."""
        backoff = Backoff(BACKOFF_MIN_S, BACKOFF_MAX_S)
        while True:
            try:
                result = await self.store.settle(movements, self.hold_window_ms)
            except Exception as exc:
                if self.store.is_permanent(exc):
                    raise _Permanent(exc) from exc
                self._failed(exc)
                self._db_outage.failed(exc)
                await backoff.wait()
            else:
                self._db_outage.recovered()
                return result

    async def _set_aside(self, movements: list[Movement]) -> SettleResult:
        """A batch failed on its data: settle it in halves, down to single movements, and put the
        ones that still fail in their partition's quarantine stream, with the error. One bad
        movement costs about log2(batch) transactions and holds nothing else back."""
        done: list[SettleResult] = []
        bad: list[tuple[Movement, _Permanent]] = []
        pending = _halves(movements)
        while pending:
            part = pending.pop()
            try:
                done.append(await self._commit(part))
            except _Permanent as exc:
                if len(part) > 1:
                    pending += _halves(part)
                else:
                    bad.append((part[0], exc))
        await self._quarantine(bad)
        return SettleResult(sum(r.movements for r in done), sum(r.gifts for r in done),
                            sum(r.credits for r in done), sum(r.duplicates for r in done))

    async def _quarantine(self, bad: list[tuple[Movement, _Permanent]]) -> None:
        if not bad:
            return
        now_ms = int(time.time() * 1000)
        commands: list[list[Arg]] = []
        for m, exc in bad:
            error = f"{type(exc.__cause__).__name__}: {exc.__cause__}"[:500]
            log.error("movement %s-%s (%s of %s) set aside: %s; `giftstream settle --requeue` retries it once "
                      "the cause is fixed", m.partition, m.seq, m.kind, m.user_id, error)
            fields = [x for kv in encode(m).items() for x in kv]
            commands.append(["XADD", quarantine_key(m.partition), "*", *fields, "error", error, "at", now_ms])
        for reply in await self.pipe.execute(commands):
            if isinstance(reply, Exception):
                raise reply
        self.quarantined += len(bad)

    def _failed(self, exc: Exception) -> None:
        self.failures += 1
        self.degraded = True
        self.last_error = type(exc).__name__


async def outbox_lag(redis: Redis, partitions: int) -> dict[str, float]:
    """Entries not yet settled and the age of the oldest, across partitions."""
    pipe = redis.pipeline(transaction=False)
    for p in range(partitions):
        pipe.xlen(outbox_key(p))
        pipe.xrange(outbox_key(p), count=1)
        pipe.xlen(quarantine_key(p))
    replies = await pipe.execute()
    backlog = quarantined = 0
    oldest_ms = 0.0
    now_ms = time.time() * 1000
    for i in range(partitions):
        backlog += int(replies[3 * i])
        quarantined += int(replies[3 * i + 2])
        first = replies[3 * i + 1]
        if first:
            mid = first[0][0]
            mid = mid.decode() if isinstance(mid, bytes) else mid
            oldest_ms = max(oldest_ms, now_ms - int(mid.split("-")[0]))
    return {"outbox_entries": backlog, "outbox_lag_ms": oldest_ms, "quarantined": quarantined}
