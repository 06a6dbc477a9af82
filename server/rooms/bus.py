"""Room bus: Redis pub/sub between nodes, one channel per room, subscribed only while
this node has viewers in that room. After a bus outage each room catches up from its
event stream, so a reconnect of the bus never leaves a silent gap.

One message arrives per gift, so the subscriber reads its own connection with a hiredis
Reader (redis-py's PubSub cost tens of microseconds per message in storm profiles).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import Any

import hiredis
import msgpack

from server.fastpipe import pack, redis_address
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
    def __init__(self, url: str, sink: EventSink,
                 catch_up: Callable[[str], Awaitable[None]] | None = None) -> None:
        self.address = redis_address(url)
        self.sink = sink
        self.catch_up = catch_up
        self.channels: set[str] = set()
        self._writer: asyncio.StreamWriter | None = None
        self._connected = asyncio.Event()
        self._confirm: dict[str, list[asyncio.Future[None]]] = {}
        self._task: asyncio.Task[None] | None = None
        self.messages = 0
        self.reconnects = 0

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run(), name="giftstream-bus")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        if self._writer is not None:
            self._writer.close()

    async def subscribe(self, room_id: str) -> None:
        """Returns once Redis confirmed the subscription: no event after it can be missed."""
        channel = RoomKeys(room_id).channel
        self.channels.add(channel)
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._confirm.setdefault(channel, []).append(fut)
        await asyncio.wait_for(self._connected.wait(), 10)
        assert self._writer is not None
        self._writer.write(pack(["SUBSCRIBE", channel]))
        await asyncio.wait_for(fut, 10)

    async def unsubscribe(self, room_id: str) -> None:
        channel = RoomKeys(room_id).channel
        self.channels.discard(channel)
        if self._writer is not None and self._connected.is_set():
            self._writer.write(pack(["UNSUBSCRIBE", channel]))

    async def _run(self) -> None:
        delay = 0.1
        first = True
        while True:
            try:
                reader, self._writer = await asyncio.open_connection(self.address.host, self.address.port)
                parser = hiredis.Reader()
                if self.address.password is not None:
                    self._writer.write(pack(self.address.auth_command()))
                    parser.feed(await reader.read(1 << 16))
                    reply = parser.gets()
                    if isinstance(reply, hiredis.ReplyError):
                        raise ConnectionError(f"bus AUTH refused: {reply}")
                channels = list(self.channels)
                if channels:
                    self._writer.write(pack(["SUBSCRIBE", *channels]))
                self._connected.set()
                delay = 0.1
                if not first:
                    self.reconnects += 1
                    if self.catch_up is not None:
                        await self._catch_up_later(channels)
                first = False
                await self._read(reader, parser)
                raise ConnectionError("Redis closed the bus connection")
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                self._connected.clear()
                if self._writer is not None:
                    self._writer.close()
                log.warning("room bus lost its connection (%s); reconnecting", type(exc).__name__)
                await asyncio.sleep(delay)
                delay = min(5.0, delay * 2)

    async def _catch_up_later(self, channels: list[str]) -> None:
        """Fill what was published while the bus was away, once the resubscription is confirmed."""
        assert self.catch_up is not None
        catch_up = self.catch_up

        async def run() -> None:
            await asyncio.sleep(0.05)
            for channel in channels:
                try:
                    await catch_up(room_id_from_channel(channel))
                except Exception:
                    log.warning("catch-up of %s failed", channel, exc_info=True)

        asyncio.get_running_loop().create_task(run())

    async def _read(self, reader: asyncio.StreamReader, parser: Any) -> None:
        while True:
            data = await reader.read(1 << 18)
            if not data:
                return
            parser.feed(data)
            while (msg := parser.gets()) is not False:
                self._dispatch(msg)

    def _dispatch(self, msg: Any) -> None:
        if not isinstance(msg, list) or len(msg) < 3:
            return
        kind = msg[0]
        if kind == b"message":
            self.messages += 1
            channel = msg[1].decode()
            try:
                event = decode_published(msg[2])
            except Exception:
                log.error("undecodable room event on %s", channel)
                return
            self.sink(room_id_from_channel(channel), event)
        elif kind == b"subscribe":
            for fut in self._confirm.pop(msg[1].decode(), []):
                if not fut.done():
                    fut.set_result(None)
