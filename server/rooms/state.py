"""Room state in Redis: create, end, look up, publish events, read the event stream."""

from __future__ import annotations

import asyncio
import secrets
import time
from dataclasses import dataclass
from typing import Any

import msgpack
from redis.asyncio import Redis
from redis.exceptions import ResponseError

from server.batcher import ScriptBatcher
from server.coalesce import Coalesced
from server.keys import RoomKeys
from server.protocol import parse_offset
from server.rooms.bus import decode_event
from server.rooms.goals import GOAL_FIELDS, GOAL_REACHED, RoomGoal, goal_from_state
from server.settings import Settings


@dataclass(frozen=True, slots=True)
class RoomState:
    room_id: str
    host_id: str
    host_name: str
    title: str
    live: bool
    epoch: str
    coins_total: int
    gifts_total: int
    # The room's LIVE goal (rooms/goals.py), read with the rest of the state: None when it has none.
    goal: RoomGoal | None = None


def _s(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


class Rooms:
    def __init__(self, redis: Redis, batcher: ScriptBatcher, settings: Settings) -> None:
        # A client without decode_responses: event payloads are msgpack bytes.
        self.redis = redis
        self.batcher = batcher
        self.settings = settings
        self._reads: Coalesced[str, RoomState | None] = Coalesced(self.get)

    @staticmethod
    def new_id() -> str:
        return secrets.token_urlsafe(8).replace("-", "x").replace("_", "y")

    async def create(self, room_id: str, host_id: str, host_name: str, title: str) -> RoomState:
        k = RoomKeys(room_id)
        epoch = secrets.token_hex(6)
        pipe = self.redis.pipeline(transaction=True)
        # A new life of a room starts without the last one's goal (the demo room reopens at every start).
        pipe.hdel(k.state, *GOAL_FIELDS, GOAL_REACHED)
        pipe.hset(k.state, mapping={
            "host": host_id, "host_name": host_name, "title": title, "live": "1", "epoch": epoch,
            "coins_total": 0, "gifts_total": 0, "created_at": int(time.time() * 1000)})
        await pipe.execute()
        return RoomState(room_id, host_id, host_name, title, True, epoch, 0, 0)

    def get_soon(self, room_id: str) -> asyncio.Future[RoomState | None]:
        """The room as `get` reads it, read after this call; the joins of a room that come while
        a read is out share the next one (server/coalesce.py): a read per round trip, not per join."""
        return self._reads.soon(room_id)

    async def get(self, room_id: str) -> RoomState | None:
        if not room_id or len(room_id) > 64 or "}" in room_id:
            return None
        raw = await self.redis.hgetall(RoomKeys(room_id).state)
        if not raw:
            return None
        h = {_s(k): _s(v) for k, v in raw.items()}
        return RoomState(room_id, h["host"], h.get("host_name", h["host"]), h.get("title", ""),
                         h.get("live") == "1", h.get("epoch", ""), int(h.get("coins_total", 0)),
                         int(h.get("gifts_total", 0)), goal_from_state(h))

    def publish_gift_later(self, room_id: str, event: dict[str, Any], debit_ms: int,
                           record_name: bool = True) -> asyncio.Future[Any]:
        """Queue the publish in this tick's pipeline (room_publish.lua's raw reply). A gift is
        published once: asked again, it writes nothing. `record_name`: write the sender's display
        name for the leaderboard (once per socket is enough)."""
        k = RoomKeys(room_id)
        now = int(time.time() * 1000)
        sender = event["from"]["id"]
        keys = [k.state, k.events, k.leaderboard, k.combos, k.names, k.published(debit_ms)]
        args = ["gift", msgpack.packb(event), now, self.settings.resume_max_events, k.channel,
                f"{sender}:{event['gift']}", int(self.settings.combo_window_s * 1000), sender, event["coins"],
                event["from"]["name"] if record_name else "", event["gift_id"], debit_ms,
                self.settings.republish_window_s * 1000,
                event["gift"], event["count"], self.settings.goal_event_interval_ms]
        return self.batcher.call("room_publish", keys, args)

    async def end(self, room_id: str, reason: str | None = None) -> str | None:
        """Publish the room's end (once: None when it had ended). Call rooms/lifecycle.py's
        `Lifecycle.end`, which also ends the room's SQL row; `reason` says why (host, admin, idle)."""
        k = RoomKeys(room_id)
        now = int(time.time() * 1000)
        event: dict[str, Any] = {"type": "room_ended", "room": room_id, "ts": now}
        if reason is not None:
            event["reason"] = reason
        keys = [k.state, k.events, k.leaderboard, k.combos, k.names, k.published(now)]
        args = ["ended", msgpack.packb(event), now, self.settings.resume_max_events, k.channel]
        offset, _combo, _again = await self.batcher.call("room_publish", keys, args)
        return _s(offset) if offset else None

    async def current_offset(self, room_id: str) -> str:
        last = await self.redis.xrevrange(RoomKeys(room_id).events, count=1)
        return _s(last[0][0]) if last else "0-0"

    async def events_after(self, room_id: str, since: str, limit: int) -> tuple[list[dict[str, Any]], bool]:
        """Events after `since` (exclusive), oldest first; False when some were already trimmed."""
        k = RoomKeys(room_id)
        try:
            info = await self.redis.xinfo_stream(k.events)
        except ResponseError:  # no event yet: nothing was missed
            return [], True
        # Trimming does not move max-deleted-entry-id, so: if anything was ever trimmed and `since`
        # is older than the first entry kept, events after `since` may be gone. Conservative: at
        # worst a client whose `since` was the very last trimmed entry is told to start over.
        first = _s(info.get("recorded-first-entry-id") or "0-0")
        trimmed = int(info.get("entries-added", 0)) > int(info.get("length", 0))
        if trimmed and int(info.get("length", 0)) == 0:
            # Everything was trimmed (room_tick.lua keeps the newest event, so only by hand):
            # complete only for a `since` at or past the last event ever added.
            if parse_offset(since) < parse_offset(_s(info.get("last-generated-id") or "0-0")):
                return [], False
            return [], True
        if trimmed and parse_offset(since) < parse_offset(first):
            return [], False
        out: list[dict[str, Any]] = []
        start = "(" + since
        # One more than the limit: exactly `limit` missed events is still a complete resume.
        while len(out) <= limit:
            page: Any = await self.redis.xrange(k.events, min=start, max="+", count=min(1000, limit + 1 - len(out)))
            if not page:
                break
            for mid, fields in page:
                f = {_s(a): b for a, b in fields.items()}
                out.append(decode_event(_s(mid), int(f.get("c", 0)), f["e"]))
            start = "(" + _s(page[-1][0])
        return out, len(out) <= limit

