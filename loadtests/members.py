"""Room members of a storm worker: what each socket received, and gifts awaiting their ack.

Every socket in a room gets the same pre-encoded `events` frame, so a worker decodes each
distinct frame once (`FrameTable`, keyed by the frame's bytes) and a member only appends the
frame's index and its receive time. Exactly-once checks and delivery latencies are computed
from those arrays after the storm, off the hot path.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from array import array
from collections import Counter
from typing import TYPE_CHECKING, Any

import msgpack

from loadtests.wsclient import WSClient, connect

if TYPE_CHECKING:
    from loadtests.worker import Worker

SUBPROTOCOL = "giftstream.msgpack"
# msgpack of {"type": "events", "events": [...]}: the server packs "type" first.
EVENTS_PREFIX = b"\x82\xa4type\xa6events"
# Reply errors worth retrying with the same id; any other is final.
RETRYABLE = {"rate_limited": 0.25, "unavailable": 0.5}
Key = tuple[int, int]


def offset_key(offset: str) -> Key:
    ms, _, seq = offset.partition("-")
    return int(ms), int(seq or 0)


class FrameTable:
    """Distinct `events` frames seen by this worker, decoded once each.

    Every socket of a room receives the same frame, each as its own bytes object, so a lookup
    by the whole payload hashed all of it once per socket: 6.1 us for a 20 KB frame of a busy
    room, against 2.5 us now (a micro-bench of 2,000 copies). A frame is found by its length
    and its tail (which holds the newest event's offset), then compared whole (a memcmp); only
    a frame seen for the first time is hashed whole.
    """

    def __init__(self) -> None:
        self.index: dict[bytes, int] = {}
        self.recent: dict[tuple[int, bytes], tuple[bytes, int]] = {}
        self.gifts: list[tuple[str, ...]] = []
        self.gift_keys: list[tuple[Key, ...]] = []
        self.first: list[Key | None] = []
        self.last: list[Key | None] = []
        self.last_offset: list[str | None] = []

    def lookup(self, payload: bytes) -> int:
        key = (len(payload), payload[-32:])
        hit = self.recent.get(key)
        if hit is not None and hit[0] == payload:
            return hit[1]
        idx = self.index.get(payload)
        if idx is None:
            idx = self.index[payload] = self._add(payload)
        self.recent[key] = (payload, idx)
        return idx

    def _add(self, payload: bytes) -> int:
        events = msgpack.unpackb(payload, raw=False)["events"]
        gifts: list[str] = []
        keys: list[Key] = []
        first = last = None
        last_offset = None
        for e in events:
            offset = e.get("offset")
            key = None
            if offset is not None:
                key = offset_key(offset)
                first = first or key
                last, last_offset = key, offset
            if e.get("type") == "gift" and key is not None:
                gifts.append(e["gift_id"])
                keys.append(key)
        self.gifts.append(tuple(gifts))
        self.gift_keys.append(tuple(keys))
        self.first.append(first)
        self.last.append(last)
        self.last_offset.append(last_offset)
        return len(self.gifts) - 1


class Member:
    """One socket in a room: a viewer, or a gifter (a viewer that also sends gifts)."""

    def __init__(self, worker: Worker, mid: str, room: str, token: str, gifter: bool, stall: bool) -> None:
        self.w = worker
        self.mid = mid
        self.room = room
        self.token = token
        self.gifter = gifter
        self.stall = stall
        self.proto: WSClient | None = None
        self.connected = False
        self.welcomed: asyncio.Future[dict[str, Any]] | None = None
        self.epoch: str | None = None
        self.last_key: Key | None = None
        self.last_offset: str | None = None
        # frames carrying gifts, by FrameTable index, and when each arrived
        self.frames = array("i")
        self.times = array("d")
        # (gift ids, time) of frames that overlapped what this member had (after a resume)
        self.extra: list[tuple[tuple[str, ...], float]] = []
        self.n_gifts = 0
        self.overlaps = 0
        self.dropped_by_offset = 0
        self.reconnects = 0
        self.close_codes: list[int | None] = []
        self.resumed = False
        self.resume_due = False
        # (last key before the drop, the reconnect's welcome offset key]: what the resume replays.
        # Replayed events may arrive after newer live ones, so they are kept by range, not by
        # "newer than the newest seen".
        self.gaps: list[tuple[Key | None, Key]] = []
        self.leaving = False
        # client id -> [first send time, attempts]
        self.pending: dict[str, list[float]] = {}

    # connection ------------------------------------------------------------------------------

    async def connect(self) -> None:
        w = self.w
        self.welcomed = asyncio.get_running_loop().create_future()
        path = f"/v1/rooms/{self.room}/ws?token={self.token}"
        self.proto = None
        self.proto = await connect(w.host, w.port, path, SUBPROTOCOL, self.on_message, self.on_close)
        async with asyncio.timeout(30):
            await self.welcomed
        self.connected = True
        if self.resume_due:
            self.resume_due = False
            self.proto.send(msgpack.packb({"type": "resume", "since": self.last_offset, "epoch": self.epoch}))
        now = time.time()
        for cid in list(self.pending):
            self.w.resend(self, cid, now)

    def on_close(self, code: int | None) -> None:
        was = self.connected
        self.connected = False
        self.close_codes.append(code)
        if self.welcomed is not None and not self.welcomed.done():
            self.welcomed.set_exception(ConnectionError(f"closed before welcome ({code})"))
            self.welcomed.exception()
        if was and not self.leaving and not self.stall and self.w.reconnecting:
            self.w.track(self.reconnect())

    async def reconnect(self) -> None:
        delay = 0.1
        while not self.leaving and self.w.reconnecting:
            await asyncio.sleep(delay)
            self.reconnects += 1
            with contextlib.suppress(Exception):
                await self.connect()
                return
            delay = min(2.0, delay * 2)

    def close(self) -> None:
        self.leaving = True
        if self.proto is not None:
            self.proto.resume()
            self.proto.close()

    # receiving -------------------------------------------------------------------------------

    def on_message(self, payload: bytes, now: float) -> None:
        if payload.startswith(EVENTS_PREFIX):
            self.on_events(payload, now)
            return
        msg = msgpack.unpackb(payload, raw=False)
        kind = msg.get("type")
        if kind == "ack":
            self.w.on_ack(self, msg, now)
        elif kind == "error":
            self.w.on_error(self, msg, now)
        elif kind == "welcome":
            self.on_welcome(msg)
        elif kind == "resume_failed":
            # Too far behind to replay: counted, and live from the offset it names.
            self.w.resume_failed += 1
            self.last_offset = msg.get("offset")
            self.last_key = offset_key(self.last_offset) if self.last_offset else None

    def on_welcome(self, msg: dict[str, Any]) -> None:
        # Handled here, not after the await: events may follow the welcome in the same read.
        first = self.epoch is None
        self.epoch = msg.get("epoch")
        if first or self.last_offset is None:
            self.last_offset = msg.get("offset")
            self.last_key = offset_key(self.last_offset) if self.last_offset else None
        else:
            # Reconnected: fill the gap from where this member left off (sent once connect() has
            # its new protocol object; live events arriving meanwhile are deduplicated by offset).
            self.resumed = True
            self.resume_due = True
            welcome = msg.get("offset")
            if welcome:
                self.gaps.append((self.last_key, offset_key(welcome)))
        if self.welcomed is not None and not self.welcomed.done():
            self.welcomed.set_result(msg)

    def on_events(self, payload: bytes, now: float) -> None:
        table = self.w.table
        idx = table.lookup(payload)
        self.w.frames_in += 1
        gifts = table.gifts[idx]
        first = table.first[idx]
        if first is None:
            return  # presence / leaderboard only
        if self.last_key is not None and first <= self.last_key:
            self._overlap(idx, now)
            return
        self.last_key = table.last[idx]
        self.last_offset = table.last_offset[idx]
        if gifts:
            self.frames.append(idx)
            self.times.append(now)
            self.n_gifts += len(gifts)

    def _overlap(self, idx: int, now: float) -> None:
        """Events at or before what this member already had: a resume overlap, or a server bug."""
        table = self.w.table
        self.overlaps += 1
        last = self.last_key
        assert last is not None
        if self.resumed:
            # After a resume: keep what is newer than anything seen, or inside a replayed gap
            # (the replay of a gap can come after the newer live events).
            keep = tuple(g for g, k in zip(table.gifts[idx], table.gift_keys[idx], strict=True)
                         if k > last or self._in_gap(k))
            self.dropped_by_offset += len(table.gifts[idx]) - len(keep)
        else:
            keep = table.gifts[idx]
        if table.last[idx] is not None and table.last[idx] > last:  # type: ignore[operator]
            self.last_key = table.last[idx]
            self.last_offset = table.last_offset[idx]
        if keep:
            self.extra.append((keep, now))
            self.n_gifts += len(keep)

    def _in_gap(self, key: Key) -> bool:
        return any((start is None or start < key) and key <= end for start, end in self.gaps)

    def received(self) -> Counter[str]:
        got: Counter[str] = Counter()
        gifts = self.w.table.gifts
        for idx in self.frames:
            got.update(gifts[idx])
        for ids, _ in self.extra:
            got.update(ids)
        return got
