"""Room bus: Redis pub/sub between nodes, one channel per room, subscribed only while
this node has viewers in that room. After a bus outage each room catches up from its
event stream, so a reconnect of the bus never leaves a silent gap.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import Any

import msgpack
from redis.asyncio import Redis
from redis.asyncio.client import PubSub

from server.keys import RoomKeys, room_id_from_channel

log = logging.getLogger("giftstream.bus")

EventSink = Callable[[str, dict[str, Any]], None]


def decode_published(data: bytes) -> dict[str, Any]:
    """'<offset>|<combo>|<msgpack payload>' (room_publish.lua) -> event map."""
    offset, combo, payload = data.split(b"|", 2)
    return decode_event(offset.decode(), int(combo), payload)


def decode_event(offset: str, combo: int, payload: bytes) -> dict[str, Any]:
    event: dict[str, Any] = msgpack.unpackb(payload, raw=False)
    event["offset"] = offset
    if event.get("type") == "gift":
        event["combo"] = combo
    return event


class Bus:
    def __init__(self, redis: Redis, sink: EventSink,
                 catch_up: Callable[[str], Awaitable[None]] | None = None) -> None:
        self.redis = redis
        self.sink = sink
        self.catch_up = catch_up
        self.channels: set[str] = set()
        self._pubsub: PubSub | None = None
        self._confirm: dict[str, asyncio.Future[None]] = {}
        self._task: asyncio.Task[None] | None = None
        self._has_channels = asyncio.Event()
        self.messages = 0
        self.reconnects = 0

    def start(self) -> None:
        self._pubsub = self.redis.pubsub()
        self._task = asyncio.get_running_loop().create_task(self._listen(), name="giftstream-bus")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        if self._pubsub is not None:
            await self._pubsub.aclose()  # type: ignore[no-untyped-call]

    async def subscribe(self, room_id: str) -> None:
        """Returns once Redis confirmed the subscription: no event after it can be missed."""
        channel = RoomKeys(room_id).channel
        self.channels.add(channel)
        fut = asyncio.get_running_loop().create_future()
        self._confirm[channel] = fut
        assert self._pubsub is not None
        await self._pubsub.subscribe(channel)
        self._has_channels.set()
        await asyncio.wait_for(fut, 10)

    async def unsubscribe(self, room_id: str) -> None:
        channel = RoomKeys(room_id).channel
        self.channels.discard(channel)
        if self._pubsub is not None:
            await self._pubsub.unsubscribe(channel)

    async def _listen(self) -> None:
        delay = 0.1
        while True:
            try:
                if not self.channels:
                    self._has_channels.clear()
                    await self._has_channels.wait()
                assert self._pubsub is not None
                msg = await self._pubsub.get_message(ignore_subscribe_messages=False, timeout=1.0)
                delay = 0.1
                if msg is None:
                    continue
                self._dispatch(msg)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.warning("room bus lost its connection (%s); resubscribing", type(exc).__name__)
                await asyncio.sleep(delay)
                delay = min(5.0, delay * 2)
                await self._resubscribe()

    def _dispatch(self, msg: dict[str, Any]) -> None:
        channel = msg["channel"]
        channel = channel.decode() if isinstance(channel, bytes) else channel
        kind = msg["type"]
        if kind == "subscribe":
            fut = self._confirm.pop(channel, None)
            if fut is not None and not fut.done():
                fut.set_result(None)
            return
        if kind != "message":
            return
        self.messages += 1
        try:
            event = decode_published(msg["data"])
        except Exception:
            log.error("undecodable room event on %s", channel)
            return
        self.sink(room_id_from_channel(channel), event)

    async def _resubscribe(self) -> None:
        self.reconnects += 1
        try:
            if self._pubsub is not None:
                await self._pubsub.aclose()  # type: ignore[no-untyped-call]
        except Exception:
            pass
        self._pubsub = self.redis.pubsub()
        try:
            channels = list(self.channels)
            if channels:
                await self._pubsub.subscribe(*channels)
                # Read the confirmations, then fill what was published while we were away.
                for _ in channels:
                    msg = await self._pubsub.get_message(ignore_subscribe_messages=False, timeout=2.0)
                    if msg is not None:
                        self._dispatch(msg)
                if self.catch_up is not None:
                    for channel in channels:
                        await self.catch_up(room_id_from_channel(channel))
        except Exception as exc:
            log.warning("resubscribe failed (%s)", type(exc).__name__)
