"""Riding out an outage: capped, jittered backoff, and an outage logged once with its end.

Every part that keeps a connection (debit batcher, room bus, presence, settler, the
gift republisher) retries through Redis or database outages the same way: wait longer
after each failure in a row, up to a cap, with jitter so a fleet does not come back in
step; log the outage when it starts and when it ends, never once per retry.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time


class Backoff:
    """Delays that double after each failure in a row, from `first` up to `cap` seconds.

    `jitter` spreads each delay over [1 - jitter/2, 1 + jitter/2] of itself, so processes
    that failed together do not retry together."""

    __slots__ = ("first", "cap", "jitter", "_next")

    def __init__(self, first: float = 0.2, cap: float = 10.0, jitter: float = 1.0) -> None:
        self.first = first
        self.cap = cap
        self.jitter = jitter
        self._next = first

    def next(self) -> float:
        """The delay before the next attempt (and the one after it doubles)."""
        base, self._next = self._next, min(self.cap, self._next * 2)
        return base * (1 - self.jitter / 2 + self.jitter * random.random())

    def reset(self) -> None:
        self._next = self.first

    async def wait(self, stop: asyncio.Event | None = None) -> None:
        """Sleep the next delay; returns early when `stop` is set."""
        delay = self.next()
        if stop is None:
            await asyncio.sleep(delay)
            return
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), delay)


class Outage:
    """Logs the start of an outage once (warning) and its end once (info, with its length)."""

    __slots__ = ("log", "what", "consequence", "since")

    def __init__(self, log: logging.Logger, what: str, consequence: str = "") -> None:
        self.log = log
        self.what = what
        self.consequence = consequence
        self.since: float | None = None

    @property
    def active(self) -> bool:
        return self.since is not None

    def failed(self, exc: BaseException) -> bool:
        """A failure; True (and logged) when it starts an outage, False while one goes on."""
        if self.since is not None:
            return False
        self.since = time.monotonic()
        tail = f"; {self.consequence}" if self.consequence else ""
        self.log.warning("%s failing (%s)%s", self.what, type(exc).__name__, tail)
        return True

    def recovered(self) -> float | None:
        """A success; the outage's length in seconds (logged) when one just ended, else None."""
        if self.since is None:
            return None
        lasted, self.since = time.monotonic() - self.since, None
        self.log.info("%s working again after %.1fs", self.what, lasted)
        return lasted
