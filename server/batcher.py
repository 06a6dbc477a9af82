"""Group commit for Lua calls: calls made in the same loop tick go to Redis as one pipeline.

One round trip carries many gifts. At most `max_inflight` pipelines are out at once; calls
made while they are all out wait for the first to come back and leave together, so under
load the batches grow, not the number of round trips (a quiet server still sends each call
at once). A flush runs as its own task, so a caller that is cancelled (its socket closed)
never cancels the pipeline other callers wait on.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

import hiredis
from redis.asyncio import Redis
from redis.exceptions import ResponseError

from server.clusterpipe import pipe_like
from server.fastpipe import Pipe, is_noscript
from server.metrics import LUA_BATCH_CALLS, LUA_BATCH_SECONDS
from server.outage import Outage
from server.scripts import Scripts

log = logging.getLogger("giftstream.batcher")


class _Call:
    __slots__ = ("name", "keys", "args", "future")

    def __init__(self, name: str, keys: list[str], args: list[Any], future: asyncio.Future[Any]) -> None:
        self.name, self.keys, self.args, self.future = name, keys, args, future


class ScriptBatcher:
    def __init__(self, redis: Redis, scripts: Scripts, pipe: Pipe | None = None, max_batch: int = 2000,
                 max_inflight: int = 1) -> None:
        # redis-py only for its address; batches (and script reloads) go through the lean pipeline.
        self.redis = redis
        self.pipe = pipe or pipe_like(redis)
        self.scripts = scripts
        self.max_batch = max_batch
        self.max_inflight = max(1, max_inflight)
        self._queue: list[_Call] = []
        self._scheduled = False
        self._inflight: set[asyncio.Task[None]] = set()
        # Read by /metrics at scrape time: plain ints cost nothing per pipeline.
        self.batches = 0
        self.calls = 0
        # Pipelines failing (Redis unreachable): an outage is logged once, not per batch.
        self.outage = Outage(log, "Redis pipelines", "their calls fail until Redis is back")

    def call(self, name: str, keys: list[str], args: list[Any]) -> asyncio.Future[Any]:
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Any] = loop.create_future()
        self._queue.append(_Call(name, keys, args, future))
        if not self._scheduled and len(self._inflight) < self.max_inflight:
            self._scheduled = True
            loop.call_soon(self._flush)
        return future

    def _flush(self, force: bool = False) -> None:
        self._scheduled = False
        while self._queue and (force or len(self._inflight) < self.max_inflight):
            batch, self._queue = self._queue[: self.max_batch], self._queue[self.max_batch :]
            task = asyncio.get_running_loop().create_task(self._run(batch))
            self._inflight.add(task)
            task.add_done_callback(self._done)

    def _done(self, task: asyncio.Task[None]) -> None:
        self._inflight.discard(task)
        if self._queue and not self._scheduled:
            # Everything queued while the pipelines were out leaves now, as one pipeline.
            self._flush()

    async def _run(self, batch: list[_Call]) -> None:
        self.batches += 1
        self.calls += len(batch)
        LUA_BATCH_CALLS.observe(len(batch))
        pending = batch
        try:
            for _attempt in range(2):
                sent = time.perf_counter()
                results = await self.pipe.execute([self.scripts.command(c.name, c.keys, c.args) for c in pending])
                LUA_BATCH_SECONDS.observe(time.perf_counter() - sent)
                # A cluster node's calls lost (an exception among the replies) is that node's outage,
                # logged by the cluster pipeline; this one is of the pipeline as a whole.
                if not any(isinstance(r, Exception) and not isinstance(r, hiredis.ReplyError) for r in results):
                    self.outage.recovered()
                retry: list[_Call] = []
                for c, result in zip(pending, results, strict=True):
                    if is_noscript(result):
                        retry.append(c)  # not executed: safe to send again
                    elif isinstance(result, hiredis.ReplyError):
                        _settle(c.future, exc=ResponseError(str(result)))
                    elif isinstance(result, Exception):
                        # A cluster node's connection lost (clusterpipe.py): that node's calls only,
                        # outcome unknown; the others' replies stand.
                        _settle(c.future, exc=result)
                    else:
                        _settle(c.future, result=result)
                if not retry:
                    return
                # On every primary: after a failover the promoted replica has no scripts cached.
                await self.scripts.load_on(self.pipe)
                pending = retry
            for c in pending:
                _settle(c.future, exc=RuntimeError("scripts could not be loaded"))
        except BaseException as exc:
            if isinstance(exc, Exception):
                self.outage.failed(exc)
            for c in pending:
                _settle(c.future, exc=exc if isinstance(exc, Exception) else ConnectionError("cancelled"))
            if not isinstance(exc, Exception):
                raise

    async def drain(self) -> None:
        """Send what is queued and wait for every pipeline in flight, including those of calls made
        while waiting (a debit's reply queues its room publish)."""
        while self._queue or self._inflight:
            self._flush(force=True)
            await asyncio.gather(*list(self._inflight), return_exceptions=True)


def _settle(future: asyncio.Future[Any], result: Any = None, exc: BaseException | None = None) -> None:
    if future.done():
        return
    if exc is not None:
        future.set_exception(exc)
    else:
        future.set_result(result)
