"""Room bus: Redis pub/sub between nodes, one channel per room, subscribed only while
this node has viewers in that room. After a bus outage each room catches up from its
event stream, so a reconnect of the bus never leaves a silent gap.

One message arrives per gift, so the subscriber reads its own connection with a hiredis
Reader (redis-py's PubSub cost tens of microseconds per message in storm profiles).
"""

from __future__ import annotations

import asyncio
import logging
import ssl
from collections.abc import Awaitable, Callable
from typing import Any

import hiredis
import msgpack

from server.fastpipe import UNREACHABLE, pack, redis_address
from server.keys import RoomKeys, room_id_from_channel
from server.outage import Backoff, Outage

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
        # Read by /metrics at scrape time.
        self.reconnects = 0
        # Reconnect after 0.1 s, then doubling up to 5 s; the outage is logged once, and its end
        # once, after the rooms caught up.
        self.backoff = Backoff(first=0.1, cap=5.0)
        self.outage = Outage(log, "room bus", "reconnecting")

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
        while True:
            try:
                context = ssl.create_default_context() if self.address.tls else None  # rediss://
                reader, self._writer = await asyncio.open_connection(self.address.host, self.address.port,
                                                                     ssl=context)
                parser = hiredis.Reader()
                if self.address.password is not None:
                    self._writer.write(pack(self.address.auth_command()))
                    parser.feed(await reader.read(1 << 16))
                    reply = parser.gets()
                    if isinstance(reply, hiredis.ReplyError):
                        raise ConnectionError(f"bus AUTH refused: {reply}")
                channels = list(self.channels)
                early = await self._resubscribe(reader, parser, channels)
                if self.outage.active:
                    # Live events wait in the socket until the room streams filled the gap: a room's
                    # last offset must not pass the gap before the catch-up reads from it.
                    for channel in channels:
                        await self._catch_up(room_id_from_channel(channel))
                    self.reconnects += 1
                    self.outage.recovered()
                for msg in early:
                    self._dispatch(msg)
                self._connected.set()
                self.backoff.reset()
                await self._read(reader, parser)
                raise ConnectionError("Redis closed the bus connection")
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                self._connected.clear()
                if self._writer is not None:
                    self._writer.close()
                self.outage.failed(exc)
                await self.backoff.wait()

    async def _resubscribe(self, reader: asyncio.StreamReader, parser: Any, channels: list[str]) -> list[Any]:
        """Subscribe to `channels` and wait for Redis to answer a PING behind them, so the connection
        is known to work; messages that arrived meanwhile come back undispatched."""
        assert self._writer is not None
        self._writer.write((pack(["SUBSCRIBE", *channels]) if channels else b"") + pack(["PING"]))
        early: list[Any] = []
        while True:
            data = await asyncio.wait_for(reader.read(1 << 18), 10)
            if not data:
                raise ConnectionError("Redis closed the bus connection")
            parser.feed(data)
            while (msg := parser.gets()) is not False:
                if isinstance(msg, hiredis.ReplyError):
                    raise ConnectionError(f"bus subscription refused: {msg}")
                # PONG, or ["pong", ""] once subscribed
                if msg == b"PONG" or (isinstance(msg, list) and msg and msg[0] == b"pong"):
                    return early
                if isinstance(msg, list) and msg and msg[0] == b"message":
                    early.append(msg)
                else:
                    self._dispatch(msg)  # subscription confirmations

    async def _catch_up(self, room_id: str) -> None:
        if self.catch_up is None:
            return
        try:
            await self.catch_up(room_id)
        except UNREACHABLE:
            raise  # Redis away again: reconnect, and catch up from the same offset then
        except Exception:
            log.exception("catch-up of room %s failed", room_id)

    async def _read(self, reader: asyncio.StreamReader, parser: Any) -> None:
        while True:
            while (msg := parser.gets()) is not False:  # the PING's reply may have come with messages
                self._dispatch(msg)
            data = await reader.read(1 << 18)
            if not data:
                return
            parser.feed(data)

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
