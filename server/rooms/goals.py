"""A live room's goal in Redis: its fields in the room state hash, set and cleared by one script.

The goal counts gifts published to the room after it was set: the count of one gift, or the
coins of every gift. room_publish.lua counts them and decides the `goal` events (at most one per
goal_event_interval_ms, the one that reaches the target at once), room_tick.lua sends a change
the interval held back, room_goal.lua (here) sets or clears it. The routes are in
server/creators/goals.py.
"""

from __future__ import annotations

import secrets
import time
from dataclasses import dataclass
from typing import Any

from server.batcher import ScriptBatcher
from server.codes import Err, GiftstreamError
from server.keys import RoomKeys
from server.settings import Settings

# The goal's fields in the room state hash (room_goal.lua clears the same list).
GOAL_FIELDS = ("goal_id", "goal_gift", "goal_target", "goal_progress", "goal_done", "goal_event_ms", "goal_sent")
# '1' once any goal of the room's life was reached (room_publish.lua sets it with goal_done): a
# goal set or cleared after it leaves it, so the session's summary still says a goal was reached.
GOAL_REACHED = "goal_reached"


@dataclass(frozen=True, slots=True)
class RoomGoal:
    # Names one goal of the room: a new goal (its progress back at 0) has a new id.
    goal_id: str
    # The catalog gift counted, or None for a coins goal (the coins of every gift).
    gift: str | None
    target: int
    progress: int
    done: bool

    def to_json(self) -> dict[str, Any]:
        """The goal as the HTTP answers, the welcome and room info show it (no `gift` for coins)."""
        out: dict[str, Any] = {"goal_id": self.goal_id}
        if self.gift is not None:
            out["gift"] = self.gift
        out.update(target=self.target, progress=self.progress, done=self.done)
        return out


def goal_from_state(h: dict[str, str]) -> RoomGoal | None:
    """The goal in a room state hash (decoded), or None when it has none."""
    target = h.get("goal_target")
    if not target:
        return None
    return RoomGoal(h.get("goal_id", ""), h.get("goal_gift") or None, int(target), int(h.get("goal_progress") or 0),
                    h.get("goal_done") == "1")


def _s(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


class Goals:
    def __init__(self, batcher: ScriptBatcher, settings: Settings) -> None:
        self.batcher = batcher
        self.settings = settings

    async def set(self, room_id: str, gift: str | None, target: int) -> RoomGoal:
        """Replace the room's goal with a new one at 0 (room_goal.lua); its `goal` event goes out."""
        return await self._call(room_id, ["set", secrets.token_hex(6), gift or "", target])

    async def clear(self, room_id: str) -> RoomGoal:
        """Remove the room's goal; the answer is the goal as it was. Its `goal` event says `cleared`."""
        return await self._call(room_id, ["clear"])

    async def _call(self, room_id: str, args: list[Any]) -> RoomGoal:
        k = RoomKeys(room_id)
        now = int(time.time() * 1000)
        reply = await self.batcher.call(
            "room_goal", [k.state, k.events], [args[0], now, self.settings.resume_max_events, k.channel, *args[1:]])
        status = _s(reply[0])
        if status == "no_room":
            raise GiftstreamError(Err.NOT_FOUND, "no such room")
        if status == "not_live":
            raise GiftstreamError(Err.ROOM_NOT_LIVE, "this room is not live")
        if status == "no_goal":
            raise GiftstreamError(Err.NOT_FOUND, "this room has no goal")
        goal_id, gift, target, progress, done = (_s(v) for v in reply[2:7])
        return RoomGoal(goal_id, gift or None, int(target), int(progress), done == "1")
