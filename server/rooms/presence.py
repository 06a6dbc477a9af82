"""Viewer counts across nodes and the session leaderboard, pushed at most once per interval.

Each node writes its own local count per room into the room's presence hash with an
expiry time, so a node that died stops counting once its entry expires; every node
sums the live entries and pushes `presence` / `leaderboard` events to its own sockets
when they changed.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

from redis.asyncio import Redis

from server.keys import RoomKeys
from server.rooms.hub import Hub
from server.rooms.state import Rooms

log = logging.getLogger("giftstream.presence")


def _s(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def sum_presence(raw: dict[Any, Any], now_ms: int) -> int:
    total = 0
    for value in raw.values():
        count, _, expires = _s(value).partition(":")
        if expires and int(expires) >= now_ms:
            total += int(count)
    return total


class Presence:
    def __init__(self, redis: Redis, hub: Hub, rooms: Rooms, node_id: str, interval_s: float) -> None:
        self.redis = redis
        self.hub = hub
        self.rooms = rooms
        self.node_id = node_id
        self.interval = interval_s
        self._task: asyncio.Task[None] | None = None
        self._published: set[str] = set()

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._loop(), name="giftstream-presence")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        try:
            await self.withdraw_all()
        except Exception:
            pass

    async def viewers(self, room_id: str) -> int:
        raw = await self.redis.hgetall(RoomKeys(room_id).presence)
        return sum_presence(raw, int(time.time() * 1000))

    async def announce(self, room_id: str) -> int:
        """Write this node's count for one room now (on join/leave) and return the room total."""
        local = self.hub.rooms.get(room_id)
        count = len(local.conns) if local else 0
        k = RoomKeys(room_id)
        now = int(time.time() * 1000)
        pipe = self.redis.pipeline(transaction=False)
        if count:
            pipe.hset(k.presence, self.node_id, f"{count}:{now + int(self.interval * 3000)}")
            self._published.add(room_id)
        else:
            pipe.hdel(k.presence, self.node_id)
            self._published.discard(room_id)
        pipe.hgetall(k.presence)
        replies = await pipe.execute()
        return sum_presence(replies[-1], now)

    async def withdraw_all(self) -> None:
        pipe = self.redis.pipeline(transaction=False)
        for room_id in self._published:
            pipe.hdel(RoomKeys(room_id).presence, self.node_id)
        self._published.clear()
        await pipe.execute()

    async def _loop(self) -> None:
        while True:
            await asyncio.sleep(self.interval)
            try:
                await self.tick()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.warning("presence tick failed: %s", type(exc).__name__)

    async def tick(self) -> None:
        rooms = [r for r in self.hub.rooms.values() if not r.ended]
        gone = self._published - {r.room_id for r in rooms}
        now = int(time.time() * 1000)
        expires = now + int(self.interval * 3000)
        pipe = self.redis.pipeline(transaction=False)
        for room_id in gone:
            pipe.hdel(RoomKeys(room_id).presence, self.node_id)
        for room in rooms:
            k = RoomKeys(room.room_id)
            pipe.hset(k.presence, self.node_id, f"{len(room.conns)}:{expires}")
            pipe.hgetall(k.presence)
            pipe.zrevrange(k.leaderboard, 0, 9, withscores=True)
        replies = await pipe.execute()
        self._published = {r.room_id for r in rooms}
        replies = replies[len(gone):]
        for i, room in enumerate(rooms):
            viewers = sum_presence(replies[3 * i + 1], now)
            top_raw = replies[3 * i + 2]
            if viewers != room.presence_sent:
                room.presence_sent = viewers
                self.hub.deliver(room.room_id, {"type": "presence", "viewers": viewers})
            top_key = [(_s(m), int(s)) for m, s in top_raw]
            if top_key and top_key != room.leaderboard_sent:
                room.leaderboard_sent = top_key
                top = await self.rooms.leaderboard(room.room_id)
                self.hub.deliver(room.room_id, {"type": "leaderboard", "top": top})
