"""A room's life: opened once per host, ended by its host, an admin or idleness, summed up at its end.

Opening writes the SQL row first, then the Redis room state. The row is the lock: a partial
unique index allows one live room per host (sql/0007_sessions.sql), so of ten concurrent opens
by one host, on any number of gateways, one makes a room and nine answer `already_live`.

Every end goes through `Lifecycle.end`, whatever its cause: the `room_ended` event and the 4410
close (room_publish.lua's 'ended' path, which acts once however many ask), then the SQL row's
end with the session's figures read from the room state (peak viewers, goal, the gifts and
coins the room acknowledged). An end interrupted between the two is finished by the next one
asked for that room, by the idle sweep, or by the host's next open.

Idleness: every node's presence tick writes `host_seen` into the room state while the host has
a socket in the room on that node (room_tick.lua). Each node sweeps: live rooms whose
max(created_at, host_seen) is older than `room_idle_end_s` end with the reason "idle". Several
nodes sweeping at once end a room once.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from typing import Any

from redis.asyncio import Redis

from server.codes import Err, GiftstreamError
from server.keys import RoomKeys
from server.outage import Outage
from server.rooms.goals import GOAL_REACHED
from server.rooms.state import Rooms, RoomState
from server.settings import Settings
from server.store.base import Store
from server.store.sessions import RoomEnd

log = logging.getLogger("giftstream.lifecycle")

# Why a room ended (rooms.end_reason, the room_ended event's `reason`).
BY_HOST = "host"
BY_ADMIN = "admin"
IDLE = "idle"
# Its Redis state was gone (Redis lost it, or the open failed after the row was written).
LOST = "lost"

# Live rooms read from SQL per step of a sweep.
SWEEP_PAGE = 500
# A room row whose Redis state is still missing this long after it was written is lost, not
# being opened (the open writes the state right after the row).
OPEN_GRACE_MS = 10_000
# Seconds a stopping node waits for a sweep in progress.
STOP_WAIT_S = 15.0
# The state field a room that never ends for idleness carries, set to "0" (the demo room).
NO_IDLE_END = "idle_end"


def now_ms() -> int:
    return int(time.time() * 1000)


def host_seen_every_ms(settings: Settings) -> int:
    """How stale `host_seen` may get before a presence tick writes it again: a write per room a
    second would be an AOF record per room a second; a quarter of the idle limit keeps the sweep
    exact to within that quarter."""
    return max(0, min(5_000, settings.room_idle_end_s * 250))


def sweep_interval_s(settings: Settings) -> float:
    return min(15.0, max(0.25, settings.room_idle_end_s / 4))


def _int(value: Any, default: int = 0) -> int:
    try:
        return int(value)
    except (TypeError, ValueError):
        return default


class Lifecycle:
    def __init__(self, redis: Redis, rooms: Rooms, store: Store, settings: Settings) -> None:
        # A client with decode_responses: every field read here is text.
        self.redis = redis
        self.rooms = rooms
        self.store = store
        self.settings = settings
        self._task: asyncio.Task[None] | None = None
        self._stopping = asyncio.Event()
        self.outage = Outage(log, "idle room sweeps", "idle rooms stay live")

    # -- open ---------------------------------------------------------------------------------

    async def open(self, host_id: str, host_name: str, title: str, *, room_id: str | None = None,
                   idle_end: bool = True) -> RoomState:
        """A new live room, or `already_live` naming the host's live room."""
        room_id = room_id or self.rooms.new_id()
        await self.store.upsert_user(host_id, host_name)
        for _ in range(3):
            live = await self.store.start_room(room_id, host_id, title, now_ms())
            if live is None:
                return await self._make_state(room_id, host_id, host_name, title, idle_end)
            await self._refuse_unless_over(host_id, live)
        raise RuntimeError(f"room {room_id} could not be written (its id is taken)")

    async def reopen(self, room_id: str, host_id: str, host_name: str, title: str) -> RoomState:
        """The demo room of `giftstream serve`: the same id at every start, live again, and never
        ended for idleness (a newcomer may open its link long after the banner). Its row starts
        over; its summary's ledger figures count every session it had."""
        state = await self.rooms.get(room_id)
        if state is not None and state.live:
            await self.redis.hset(RoomKeys(room_id).state, NO_IDLE_END, "0")
            return state
        record = await self.store.room_record(room_id)
        if record is None:
            return await self.open(host_id, host_name, title, room_id=room_id, idle_end=False)
        if record.ended_ms is None:
            await self.end(room_id, BY_HOST)  # its Redis state ended or went away: finish that end
        await self.store.upsert_user(host_id, host_name)
        for _ in range(3):
            live = await self.store.reopen_room(room_id, title, now_ms())
            if live is None:
                return await self._make_state(room_id, host_id, host_name, title, idle_end=False)
            if live:
                await self.end(live, BY_HOST)  # the demo host's other LIVE gives way to the demo room
        raise RuntimeError(f"room {room_id} could not be reopened")

    async def _refuse_unless_over(self, host_id: str, live: str) -> None:
        """The host's live row `live` stands in the way: refuse, unless that room is over (ended in
        Redis, or its state missing past the grace), whose end is then finished."""
        if not live:
            return  # the conflicting row ended meanwhile: try again
        state = await self.redis.hget(RoomKeys(live).state, "live")
        if state is None:
            record = await self.store.room_record(live)
            over = record is None or record.ended_ms is not None or record.created_ms < now_ms() - OPEN_GRACE_MS
        else:
            over = state != "1"
        if not over:
            raise GiftstreamError(Err.ALREADY_LIVE, "you are live already: end that room first", room_id=live)
        await self.end(live, LOST if state is None else BY_HOST)

    async def _make_state(self, room_id: str, host_id: str, host_name: str, title: str, idle_end: bool) -> RoomState:
        try:
            state = await self.rooms.create(room_id, host_id, host_name, title)
            if not idle_end:
                await self.redis.hset(RoomKeys(room_id).state, NO_IDLE_END, "0")
        except BaseException:
            # The row would keep the host from opening another room until the sweep: end it now.
            with contextlib.suppress(Exception):
                await self.store.finish_room(RoomEnd(room_id, now_ms(), LOST, 0, False, 0, 0))
            raise
        return state

    # -- end ----------------------------------------------------------------------------------

    async def end(self, room_id: str, reason: str) -> str | None:
        """End the room, however it is asked (its host, an admin, the idle sweep): the offset of
        its `room_ended` event, or None when it had ended already. The first reason given is its
        reason; asked again, this finishes an end that stopped halfway."""
        k = RoomKeys(room_id)
        offset = None
        if await self.redis.hexists(k.state, "host"):
            await self.redis.hsetnx(k.state, "end_reason", reason)
            offset = await self.rooms.end(room_id, reason)
        h = dict(zip(("ended_at", "end_reason", "peak_viewers", GOAL_REACHED, "gifts_total", "coins_total"),
                     await self.redis.hmget(k.state, "ended_at", "end_reason", "peak_viewers", GOAL_REACHED,
                                            "gifts_total", "coins_total"), strict=True))
        if h["end_reason"] is None:
            reason = LOST  # no Redis state: nothing to publish, nothing known of the session
        await self.store.finish_room(RoomEnd(
            room_id, _int(h["ended_at"], now_ms()), str(h["end_reason"] or reason), _int(h["peak_viewers"]),
            h[GOAL_REACHED] == "1", _int(h["gifts_total"]), _int(h["coins_total"])))
        return offset

    # -- the idle sweep -----------------------------------------------------------------------

    def start(self) -> None:
        self._stopping.clear()
        self._task = asyncio.get_running_loop().create_task(self._loop(), name="giftstream-idle-sweep")

    async def stop(self) -> None:
        """Let a sweep in progress finish its ends (never cut between Redis and SQL), then stop."""
        self._stopping.set()
        task, self._task = self._task, None
        if task is not None:
            # Bounded: a sweep stuck on an unreachable Redis or database is cut (the next end of
            # that room, or another node's sweep, finishes it).
            done, _ = await asyncio.wait([task], timeout=STOP_WAIT_S)
            if not done:
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)

    async def _loop(self) -> None:
        interval = sweep_interval_s(self.settings)
        while not self._stopping.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stopping.wait(), interval)
            if self._stopping.is_set():
                return
            try:
                await self.sweep()
            except Exception as exc:
                self.outage.failed(exc)
            else:
                self.outage.recovered()

    async def sweep(self) -> int:
        """End every live room idle past the limit; how many this node ended."""
        limit_ms = self.settings.room_idle_end_s * 1000
        now = now_ms()
        after: tuple[int, str] = (-1, "")
        ended = 0
        while not self._stopping.is_set():
            # Only rooms older than the limit can be idle that long: the index gives those alone.
            page = await self.store.live_started_before(now - limit_ms, after, SWEEP_PAGE)
            if not page:
                break
            pipe = self.redis.pipeline(transaction=False)
            for room_id, _ in page:
                pipe.hmget(RoomKeys(room_id).state, "live", "created_at", "host_seen", NO_IDLE_END)
            for (room_id, created_ms), (live, created_at, seen, idle_end) in zip(page, await pipe.execute(),
                                                                                   strict=True):
                if live == "1":
                    last = max(_int(created_at, created_ms), _int(seen))
                    if idle_end == "0" or now - last < limit_ms:
                        continue
                elif live is None and created_ms >= now - OPEN_GRACE_MS:
                    continue
                # Idle, or its end stopped halfway (ended in Redis), or its Redis state is gone.
                if await self.end(room_id, IDLE) is not None:
                    ended += 1
                    log.info("room %s ended: its host was away %d s", room_id, limit_ms // 1000)
            if len(page) < SWEEP_PAGE:
                break
            after = (page[-1][1], page[-1][0])
        return ended
