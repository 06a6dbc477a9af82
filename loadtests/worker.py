"""One storm worker process: connects its share of members, drives its share of the gift rate,
retries until every gift is acked, then checks what each member received.

Talks to the coordinator over a multiprocessing pipe:
  -> ("ready", info)      <- ("go", t0, duration, stall_after)
  -> ("gifts", result)    <- ("verify", {room: {gift_id: (send_t, ack_t)}}, t0)
  -> ("verified", result) <- ("close",)
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import heapq
import os
import time
from collections import Counter
from multiprocessing.connection import Connection
from typing import Any

import msgpack

from loadtests.delivery import check_deliveries
from loadtests.members import RETRYABLE, FrameTable, Member

# Gifts a gifter socket has waiting for an ack before the scheduler skips it (the server
# refuses past 256 in flight per socket).
MAX_PENDING_PER_GIFTER = 200
CONNECT_CONCURRENCY = 200
DRAIN_TIMEOUT_S = 60.0


class Worker:
    def __init__(self, spec: dict[str, Any], pipe: Connection) -> None:
        self.pipe = pipe
        self.index: int = spec["index"]
        self.host: str = spec["host"]
        self.port: int = spec["port"]
        self.rate: float = spec["rate"]
        self.run_id: str = spec["run_id"]
        self.gift: str = spec.get("gift", "rose")
        self.table = FrameTable()
        self.members = [Member(self, *m) for m in spec["members"]]
        self.gifters = [m for m in self.members if m.gifter]
        self.reconnecting = True
        self.tasks: set[asyncio.Task[Any]] = set()
        self.frames_in = 0
        self.resume_failed = 0
        self.seq = 0
        self.retry: list[tuple[float, int, str, Member]] = []
        # ack columns, one row per client id acked
        self.ack_cid: list[str] = []
        self.ack_gift: list[str] = []
        self.ack_room: list[str] = []
        self.ack_send: list[float] = []
        self.ack_at: list[float] = []
        self.ack_replayed = 0
        self.acked: dict[str, str] = {}
        self.conflicts: list[str] = []
        self.duplicate_acks = 0
        self.sent = 0
        self.attempts = 0
        self.errors: Counter[str] = Counter()
        self.refused: Counter[str] = Counter()
        self.behind_max = 0
        self.loop_lag_max = 0.0

    def track(self, coro: Any) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    async def recv(self) -> Any:
        return await asyncio.get_running_loop().run_in_executor(None, self.pipe.recv)

    # phases ----------------------------------------------------------------------------------

    async def run(self) -> None:
        info = await self.connect_all()
        self.pipe.send(("ready", info))
        _, t0, duration, stall_after = await self.recv()
        # The generator must not put its own pauses into the latencies it measures, and a full
        # collection walks every record the storm has kept so far. A storm is bounded and nearly
        # all it allocates is freed by reference counting: collect afterwards.
        gc.freeze()
        gc.disable()
        try:
            await self.drive(t0, duration, stall_after)
            await self.drain()
        finally:
            gc.enable()
        self.pipe.send(("gifts", self.gift_result()))
        _, expected, t0 = await self.recv()
        self.pipe.send(("verified", await check_deliveries(self, expected, t0)))
        await self.recv()
        self.reconnecting = False
        for m in self.members:
            m.close()
        await asyncio.sleep(0.5)

    async def connect_all(self) -> dict[str, Any]:
        sem = asyncio.Semaphore(CONNECT_CONCURRENCY)
        failures: Counter[str] = Counter()

        async def one(m: Member) -> None:
            async with sem:
                for attempt in range(5):
                    try:
                        await m.connect()
                        return
                    except Exception as exc:
                        if attempt == 4:
                            failures[type(exc).__name__ + ": " + str(exc)[:80]] += 1
                        await asyncio.sleep(0.2 * (attempt + 1))

        started = time.time()
        await asyncio.gather(*(one(m) for m in self.members))
        return {"connected": sum(m.connected for m in self.members), "members": len(self.members),
                "failures": dict(failures), "connect_s": round(time.time() - started, 2), "pid": os.getpid()}

    async def drive(self, t0: float, duration: float, stall_after: float | None) -> None:
        while time.time() < t0:
            await asyncio.sleep(min(0.01, max(0.0, t0 - time.time())))
        end = t0 + duration
        total = int(self.rate * duration)
        stalled = False
        rr = 0
        n = len(self.gifters)
        last = time.time()
        while True:
            now = time.time()
            # The client's own health: a long gap between ticks means this process, not the
            # server, was the bottleneck for that moment.
            self.loop_lag_max = max(self.loop_lag_max, now - last)
            last = now
            if now >= end and (self.sent >= total or not n or now >= end + 5):
                break
            if stall_after is not None and not stalled and now >= t0 + stall_after:
                stalled = True
                for m in self.members:
                    if m.stall and m.proto is not None:
                        m.proto.pause()
            self.run_retries(now)
            due = min(total, int(self.rate * (now - t0))) - self.sent
            tried = 0
            while due > 0 and n and tried < n:
                m = self.gifters[rr % n]
                rr += 1
                if m.connected and len(m.pending) < MAX_PENDING_PER_GIFTER:
                    self.send_new(m, now)
                    due -= 1
                    tried = 0
                else:
                    tried += 1
            self.behind_max = max(self.behind_max, due)
            await asyncio.sleep(0.002)

    async def drain(self) -> None:
        deadline = time.time() + DRAIN_TIMEOUT_S
        while any(m.pending for m in self.gifters) and time.time() < deadline:
            self.run_retries(time.time())
            await asyncio.sleep(0.01)

    # gifts -----------------------------------------------------------------------------------

    def send_new(self, m: Member, now: float) -> None:
        self.seq += 1
        cid = f"{self.run_id}-{self.index}-{self.seq}"
        m.pending[cid] = [now, 0]
        self.sent += 1
        self.resend(m, cid, now)

    def resend(self, m: Member, cid: str, now: float) -> None:
        p = m.pending.get(cid)
        if p is None or m.proto is None:
            return
        if m.proto.send(msgpack.packb({"type": "gift", "id": cid, "gift": self.gift, "count": 1})):
            p[1] += 1
            self.attempts += 1

    def run_retries(self, now: float) -> None:
        retry = self.retry
        while retry and retry[0][0] <= now:
            _, _, cid, m = heapq.heappop(retry)
            if cid in m.pending and m.connected:
                self.resend(m, cid, now)

    def on_ack(self, m: Member, msg: dict[str, Any], now: float) -> None:
        cid, gift_id = str(msg.get("id")), str(msg.get("gift_id"))
        p = m.pending.pop(cid, None)
        before = self.acked.get(cid)
        if before is not None:
            self.duplicate_acks += 1
            if before != gift_id:
                self.conflicts.append(f"client id {cid} acked as {before} and as {gift_id}")
            return
        if p is None:
            self.conflicts.append(f"ack for unknown client id {cid}")
            return
        self.acked[cid] = gift_id
        self.ack_cid.append(cid)
        self.ack_gift.append(gift_id)
        self.ack_room.append(m.room)
        self.ack_send.append(p[0])
        self.ack_at.append(now)
        if msg.get("replayed"):
            self.ack_replayed += 1

    def on_error(self, m: Member, msg: dict[str, Any], now: float) -> None:
        cid, code = msg.get("id"), str(msg.get("code"))
        self.errors[code] += 1
        if cid not in m.pending:
            return
        delay = RETRYABLE.get(code)
        if delay is not None:
            heapq.heappush(self.retry, (now + delay, self.seq, cid, m))
        else:
            m.pending.pop(cid, None)
            self.refused[code] += 1

    def gift_result(self) -> dict[str, Any]:
        unacked = [cid for m in self.gifters for cid in m.pending]
        return {
            "sent": self.sent, "attempts": self.attempts, "acked": len(self.ack_cid),
            "replayed": self.ack_replayed, "errors": dict(self.errors), "refused": dict(self.refused),
            "unacked": unacked, "duplicate_acks": self.duplicate_acks, "conflicts": self.conflicts[:100],
            "conflict_count": len(self.conflicts), "behind_max": self.behind_max,
            "loop_lag_max_ms": round(self.loop_lag_max * 1000, 1),
            "cols": {"cid": self.ack_cid, "gift_id": self.ack_gift, "room": self.ack_room,
                     "send_t": self.ack_send, "ack_t": self.ack_at},
        }


def worker_main(spec: dict[str, Any], pipe: Connection) -> None:
    with contextlib.suppress(ImportError):
        import uvloop

        uvloop.install()
    asyncio.run(Worker(spec, pipe).run())
