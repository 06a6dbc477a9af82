"""The payments sweep: a background task of every node that expires orders left pending past
GIFTSTREAM_PAYMENT_EXPIRY_S and makes coin movements a crash or an outage left to do.

Durable: both questions are asked of the SQL ledger (an order's creation time, a transition's
done time), so an order pending across a restart still expires, on whichever node sweeps first.
Several nodes sweeping at once is safe: each outcome is applied in a transaction holding the
order, and each movement is a keyed script.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

from server.errors import is_unreachable
from server.outage import Backoff, Outage
from server.payments.recharges import Recharges

log = logging.getLogger("giftstream.payments")

# A movement to do is left this long to the request that wrote it before the sweep makes it too
# (both would be harmless; this just avoids the double Redis call).
SETTLE_GRACE_MS = 5_000


def interval_s(expiry_s: int) -> float:
    """How often to sweep: a tenth of the expiry (an order expires at most 10% late), at least
    every 5 s (movements left to do are made soon) and at most 10 times a second."""
    return min(5.0, max(0.1, expiry_s / 10))


class PaymentSweep:
    def __init__(self, recharges: Recharges, expiry_s: int) -> None:
        self.recharges = recharges
        self.expiry_s = expiry_s
        self.interval_s = interval_s(expiry_s)
        self._stop = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._outage = Outage(log, "payments sweep", "pending orders expire and left-over credits are made later")

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run(), name="payments-sweep")

    async def stop(self) -> None:
        self._stop.set()
        if self._task is not None:
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def once(self) -> tuple[int, int]:
        """(orders expired, movements made)."""
        expired = await self.recharges.expire_due(self.expiry_s)
        moved = await self.recharges.reconcile(older_than_ms=SETTLE_GRACE_MS)
        return expired, moved

    async def _run(self) -> None:
        backoff = Backoff(first=self.interval_s, cap=30.0)
        while not self._stop.is_set():
            try:
                expired, moved = await self.once()
            except Exception as exc:
                if is_unreachable(exc):
                    self._outage.failed(exc)
                else:
                    log.error("payments sweep failed", exc_info=exc)
                await backoff.wait(self._stop)
                continue
            self._outage.recovered()
            backoff.reset()
            if expired or moved:
                log.info("payments sweep: %d orders expired, %d coin movements made", expired, moved)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stop.wait(), self.interval_s)
