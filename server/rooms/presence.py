"""Viewer counts across nodes and the session leaderboard, pushed at most once per interval.

Each node writes its own local count per room into the room's presence hash with an
expiry time, so a node that died stops counting once its entry expires; every node
sums the live entries and pushes `presence` / `leaderboard` events to its own sockets
when they changed.

A node counts distinct users, not sockets: one user's many tabs are one viewer. A user
with sockets on two nodes of the same room is counted by each (a set of users per room in
Redis would cost a write per join and leave; documented in docs/protocol.md).

A join or leave writes the node's count at once, but one write per room is in flight at a
time, and at most one leaves per COUNT_WRITE_SPACING_S: joins and leaves made meanwhile share
the next one (server/coalesce.py), so a join storm costs ten writes a second a room and node,
not one a socket, nor one a round trip.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

from redis.asyncio import Redis

from server.coalesce import Coalesced
from server.keys import RoomKeys
from server.outage import Outage
from server.rooms.hub import Hub
from server.rooms.lifecycle import host_seen_every_ms
from server.rooms.state import Rooms

log = logging.getLogger("giftstream.presence")

# Top gifters pushed in a `leaderboard` event.
LEADERBOARD_SIZE = 10
# A room's count writes on join and leave from one node leave at least this far apart.
COUNT_WRITE_SPACING_S = 0.1


def _s(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


class Presence:
    def __init__(self, redis: Redis, hub: Hub, rooms: Rooms, node_id: str, interval_s: float) -> None:
        self.redis = redis
        self.hub = hub
        self.rooms = rooms
        self.node_id = node_id
        self.interval = interval_s
        self._task: asyncio.Task[None] | None = None
        self._published: set[str] = set()
        # Joins and leaves of a room share a count write (rooms being joined by thousands).
        self._announcing: Coalesced[str, int] = Coalesced(self._write, COUNT_WRITE_SPACING_S)
        # Each room's host, for the idle end (rooms/lifecycle.py): read from the room state once per
        # room this node has sockets in, so a tick can say whether the host is here.
        self.hosts: dict[str, str] = {}
        # A failing tick is logged once, and its end once.
        self.outage = Outage(log, "presence ticks", "viewer counts and leaderboards wait")

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

    async def room_view(self, room_id: str) -> tuple[int, list[dict[str, Any]]]:
        """The room's viewers across nodes and its top gifters, read in one call, writing nothing."""
        k = RoomKeys(room_id)
        now_ms = int(time.time() * 1000)
        viewers, top = await self.rooms.batcher.call(
            "room_tick", [k.presence, k.leaderboard, k.names, k.events, *_minutes(k, now_ms)],
            ["", "", now_ms, LEADERBOARD_SIZE, 0, 0])
        return int(viewers), leaderboard_from(top)

    async def announce(self, room_id: str) -> int:
        """Write this node's count for one room now (on join/leave) and return the room total."""
        return await asyncio.shield(self.announce_soon(room_id))

    def announce_soon(self, room_id: str) -> asyncio.Future[int]:
        """The room total once this node's count as it is now was written: by the next write of
        the room, which leaves at once, or when the one in flight returns."""
        return self._announcing.soon(room_id)

    async def _write(self, room_id: str) -> int:
        local = self.hub.viewers(room_id)  # what _room_tick writes: no await in between
        viewers, _ = await self._room_tick(room_id, int(time.time() * 1000), top=0)
        self.hub.counted(room_id, int(viewers), local)
        return int(viewers)

    def _room_tick(self, room_id: str, now_ms: int, top: int) -> asyncio.Future[Any]:
        """Refresh this node's entry (or withdraw it when no local socket is left); the room's
        viewers and top gifters come back in the same call (room_tick.lua)."""
        count = self.hub.viewers(room_id)  # distinct users, not sockets
        if count:
            self._published.add(room_id)
        else:
            self._published.discard(room_id)
        k = RoomKeys(room_id)
        entry = f"{count}:{now_ms + int(self.interval * 3000)}" if count else ""
        settings = self.rooms.settings
        oldest_kept = now_ms - settings.resume_max_age_s * 1000
        return self.rooms.batcher.call(
            "room_tick", [k.presence, k.leaderboard, k.names, k.events, *_minutes(k, now_ms),
                          # LIVE goal: a progress the interval held back goes out from the tick.
                          k.state],
            [self.node_id, entry, now_ms, top, oldest_kept, settings.republish_window_s * 1000 + 120_000,
             k.channel, settings.resume_max_events, settings.goal_event_interval_ms,
             # Sessions: the host seen here (idle end); room_tick.lua keeps the peak viewers too.
             "1" if self._host_here(room_id) else "", host_seen_every_ms(settings)])

    def _host_here(self, room_id: str) -> bool:
        room = self.hub.rooms.get(room_id)
        host = self.hosts.get(room_id)
        return host is not None and room is not None and not room.ended and host in room.users

    async def _learn_hosts(self, room_ids: list[str]) -> None:
        """The hosts of rooms new to this node, in one pipeline; forget those of rooms it left."""
        for gone in [r for r in self.hosts if r not in self.hub.rooms]:
            del self.hosts[gone]
        unknown = [r for r in room_ids if r not in self.hosts]
        if not unknown:
            return
        pipe = self.redis.pipeline(transaction=False)
        for room_id in unknown:
            pipe.hget(RoomKeys(room_id).state, "host")
        for room_id, host in zip(unknown, await pipe.execute(), strict=True):
            if host is not None:
                self.hosts[room_id] = _s(host)

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
                self.outage.failed(exc)
            else:
                self.outage.recovered()

    async def tick(self) -> None:
        """One room_tick.lua per room, all in one pipeline: about 1 µs of Redis per room."""
        await self._learn_hosts([r.room_id for r in self.hub.rooms.values() if not r.ended])
        now = int(time.time() * 1000)
        rooms = [r for r in self.hub.rooms.values() if not r.ended]
        gone = self._published - {r.room_id for r in rooms}
        calls = [self._room_tick(room_id, now, top=0) for room_id in gone]
        locals_ = [self.hub.viewers(r.room_id) for r in rooms]  # what the calls below write
        calls += [self._room_tick(r.room_id, now, top=LEADERBOARD_SIZE) for r in rooms]
        replies = await asyncio.gather(*calls)
        for room, local, (viewers, top_raw) in zip(rooms, locals_, replies[len(gone):], strict=True):
            viewers = int(viewers)
            self.hub.counted(room.room_id, viewers, local)
            if viewers != room.presence_sent and self.hub.snapshot(room, {"type": "presence", "viewers": viewers}):
                room.presence_sent = viewers
            top = leaderboard_from(top_raw)
            key = [(e["id"], e["coins"], e["name"]) for e in top]
            if top and key != room.leaderboard_sent:
                room.leaderboard_sent = key
                self.hub.deliver(room.room_id, {"type": "leaderboard", "top": top})


def _minutes(k: RoomKeys, now_ms: int) -> tuple[str, str]:
    """This and the previous minute's published-gift records (room_tick.lua keeps their expiry)."""
    return k.published(now_ms), k.published(now_ms - 60_000)


def leaderboard_from(flat: list[Any]) -> list[dict[str, Any]]:
    """room_tick.lua's {user, coins, name, ...} as the `leaderboard` event's entries."""
    return [{"id": _s(flat[i]), "name": _s(flat[i + 2]), "coins": int(float(_s(flat[i + 1])))}
            for i in range(0, len(flat), 3)]
