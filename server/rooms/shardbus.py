"""Room bus on a cluster: sharded pub/sub, one connection per shard that owns a room we serve.

The `Bus` interface (rooms/bus.py) for cluster mode. room_publish.lua SPUBLISHes a room's
event in the room's slot (scripts.py), so it travels only to the shard that owns the room
and on to the nodes that SSUBSCRIBEd there; this node SSUBSCRIBEs each room it has viewers
in on the primary that owns the room's channel, one connection per such primary.

A subscription follows its slot: when a connection is lost (a primary killed, failed over)
or the server drops a channel (`sunsubscribe`: its slot moved), the slot map is read again
and the room is subscribed where it lives now; its events meanwhile are read from its
stream (catch-up) before the live ones that came with the new subscription are delivered,
as the single-server bus does after an outage.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable
from typing import Any

import hiredis

from server.cluster import SlotMap, open_connection, parse
from server.fastpipe import UNREACHABLE, Address, pack
from server.keys import RoomKeys, room_id_from_channel
from server.outage import Backoff, Outage
from server.rooms.bus import EventSink, decode_published

log = logging.getLogger("giftstream.bus")

# Redirections one subscription may follow before it fails (a slot moving more than this while we
# subscribe is a cluster in trouble: the join is answered `unavailable`).
MAX_REDIRECTS = 5


class Moved(Exception):
    def __init__(self, text: str) -> None:
        super().__init__(text)
        _kind, slot, where = text.split(" ", 2)
        host, _, port = where.rpartition(":")
        self.slot, self.host, self.port = int(slot), host, int(port)


class _Link:
    """One connection to one primary, subscribed to the rooms whose channels that primary owns."""

    def __init__(self, bus: ShardedBus, addr: Address) -> None:
        self.bus = bus
        self.addr = addr
        self.channels: set[str] = set()
        # Channels whose live messages wait until their catch-up is done.
        self.held: dict[str, list[bytes]] = {}
        self._pending: list[tuple[str, asyncio.Future[None]]] = []
        self._writer: asyncio.StreamWriter | None = None
        self._task: asyncio.Task[None] | None = None
        self.alive = False

    async def connect(self) -> None:
        reader, writer = await open_connection(self.addr, 5.0)
        parser = hiredis.Reader()
        try:
            hello = [pack(self.addr.auth_command())] if self.addr.password is not None else []
            writer.write(b"".join([*hello, pack(["PING"])]))
            for _ in range(len(hello) + 1):
                while (reply := parser.gets()) is False:
                    data = await asyncio.wait_for(reader.read(1 << 16), 5)
                    if not data:
                        raise ConnectionError("cluster node closed the bus connection")
                    parser.feed(data)
                if isinstance(reply, hiredis.ReplyError):
                    raise ConnectionError(f"bus connection refused: {reply}")
        except BaseException:
            writer.close()
            raise
        self._writer = writer
        self.alive = True
        self._task = asyncio.get_running_loop().create_task(self._read(reader, parser),
                                                            name=f"giftstream-bus-{self.addr.port}")

    async def ssubscribe(self, channel: str) -> None:
        """Returns once the node confirmed it; Moved when another node owns the channel's slot."""
        if not self.alive or self._writer is None:
            raise ConnectionError("bus connection lost")
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._pending.append((channel, fut))
        self._writer.write(pack(["SSUBSCRIBE", channel]))
        await asyncio.wait_for(fut, 10)

    def sunsubscribe(self, channel: str) -> None:
        self.channels.discard(channel)
        self.held.pop(channel, None)
        if self.alive and self._writer is not None:
            self._writer.write(pack(["SUNSUBSCRIBE", channel]))

    def release(self, channel: str) -> None:
        """The channel's catch-up is done: deliver what came live meanwhile, then go live."""
        for data in self.held.pop(channel, []):
            self.bus.deliver(channel, data)

    async def _read(self, reader: asyncio.StreamReader, parser: Any) -> None:
        try:
            while True:
                while (msg := parser.gets()) is not False:
                    self._on(msg)
                data = await reader.read(1 << 18)
                if not data:
                    raise ConnectionError("cluster node closed the bus connection")
                parser.feed(data)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            self._lost(exc)

    def _on(self, msg: Any) -> None:
        if isinstance(msg, hiredis.ReplyError):  # a subscription refused (MOVED): the oldest waiting
            if self._pending:
                _channel, fut = self._pending.pop(0)
                if not fut.done():
                    text = str(msg)
                    fut.set_exception(Moved(text) if text.startswith("MOVED ") else ConnectionError(text))
            return
        if not isinstance(msg, list) or len(msg) < 3:
            return
        kind, channel = msg[0], msg[1].decode()
        if kind == b"smessage":
            held = self.held.get(channel)
            if held is not None:
                held.append(msg[2])
            else:
                self.bus.deliver(channel, msg[2])
        elif kind == b"ssubscribe":
            for i, (waiting, fut) in enumerate(self._pending):
                if waiting == channel:
                    del self._pending[i]
                    if not fut.done():
                        fut.set_result(None)
                    break
        elif kind == b"sunsubscribe" and channel in self.channels and not any(c == channel for c, _ in self._pending):
            # Not asked by us: the channel's slot moved to another node. Subscribe it there.
            self.channels.discard(channel)
            self.bus.orphaned({channel})

    def _lost(self, exc: Exception) -> None:
        if not self.alive:
            return
        self.alive = False
        if self._writer is not None:
            self._writer.close()
        for _channel, fut in self._pending:
            if not fut.done():
                fut.set_exception(ConnectionError("bus connection lost"))
        self._pending.clear()
        self.bus.link_lost(self, exc)

    async def close(self) -> None:
        self.alive = False
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        if self._writer is not None:
            self._writer.close()


class ShardedBus:
    def __init__(self, url: str, sink: EventSink,
                 catch_up: Callable[[str], Awaitable[None]] | None = None) -> None:
        self.map = SlotMap(parse(url))
        self.sink = sink
        self.catch_up = catch_up
        self.channels: set[str] = set()
        self._links: dict[tuple[str, int], _Link] = {}
        self._connecting: dict[tuple[str, int], asyncio.Future[_Link]] = {}
        # Channels subscribed nowhere now (their connection lost, their slot moved): the repair task
        # subscribes them where their slot lives and catches their rooms up.
        self._orphans: set[str] = set()
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self.messages = 0
        # Read by /metrics at scrape time.
        self.reconnects = 0
        # Capped at 1 s, not 5 as one server's bus: a failover takes a few seconds, and the rooms
        # on the promoted replica should not wait up to 5 s more for their live events.
        self.backoff = Backoff(first=0.1, cap=1.0)
        self.outage = Outage(log, "room bus", "reconnecting")

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._repair(), name="giftstream-bus")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        for link in list(self._links.values()):
            await link.close()
        self._links.clear()

    async def subscribe(self, room_id: str) -> None:
        """Returns once the shard that owns the room confirmed: no event after it can be missed."""
        channel = RoomKeys(room_id).channel
        self.channels.add(channel)
        self._orphans.discard(channel)
        await self._route(channel, catch_up=False)

    async def unsubscribe(self, room_id: str) -> None:
        channel = RoomKeys(room_id).channel
        self.channels.discard(channel)
        self._orphans.discard(channel)
        for link in self._links.values():
            if channel in link.channels:
                link.sunsubscribe(channel)

    def deliver(self, channel: str, data: bytes) -> None:
        if channel not in self.channels:
            return  # left meanwhile
        self.messages += 1
        try:
            event = decode_published(data)
        except Exception:
            log.error("undecodable room event on %s", channel)
            return
        self.sink(room_id_from_channel(channel), event)

    async def _route(self, channel: str, catch_up: bool) -> None:
        """Subscribe the channel on the primary that owns its slot, following MOVED."""
        await self.map.ensure()
        for _ in range(MAX_REDIRECTS):
            link = await self._link(self.map.owner_of(channel))
            link.channels.add(channel)
            if catch_up:
                link.held.setdefault(channel, [])
            try:
                await link.ssubscribe(channel)
            except Moved as moved:
                link.channels.discard(channel)
                link.held.pop(channel, None)
                self.map.moved(moved.slot, moved.host, moved.port)
                with contextlib.suppress(*UNREACHABLE):
                    await self.map.refresh()
                continue
            except BaseException:
                link.channels.discard(channel)
                link.held.pop(channel, None)
                raise
            if catch_up:
                try:
                    await self._catch_up(room_id_from_channel(channel))
                except BaseException:
                    # Not caught up: live events must not pass the gap. Subscribed again (and
                    # caught up from the same offset) on the next try.
                    link.sunsubscribe(channel)
                    raise
                link.release(channel)
            if channel not in self.channels:  # its room emptied while this was under way
                link.sunsubscribe(channel)
            return
        raise ConnectionError(f"room channel {channel} kept moving between cluster nodes")

    async def _link(self, addr: Address) -> _Link:
        link = self._links.get(addr.key)
        if link is not None and link.alive:
            return link
        waiting = self._connecting.get(addr.key)
        if waiting is not None:
            return await asyncio.shield(waiting)
        fut: asyncio.Future[_Link] = asyncio.get_running_loop().create_future()
        self._connecting[addr.key] = fut
        try:
            link = _Link(self, addr)
            await link.connect()
            self._links[addr.key] = link
            fut.set_result(link)
            return link
        except BaseException as exc:
            fut.set_exception(exc if isinstance(exc, Exception) else ConnectionError("cancelled"))
            fut.exception()  # retrieved
            raise
        finally:
            self._connecting.pop(addr.key, None)

    def link_lost(self, link: _Link, exc: Exception) -> None:
        if self._links.get(link.addr.key) is link:
            del self._links[link.addr.key]
        if link.channels & self.channels:  # a connection with no room on it is no outage
            self.outage.failed(exc)
        self.orphaned(set(link.channels))
        link.channels.clear()

    def orphaned(self, channels: set[str]) -> None:
        self._orphans |= channels & self.channels
        self._wake.set()

    async def _repair(self) -> None:
        """Subscribe orphaned channels where their slots live now, catching their rooms up."""
        while True:
            await self._wake.wait()
            self._wake.clear()
            while self._orphans:
                with contextlib.suppress(*UNREACHABLE):
                    await self.map.refresh()
                failed: Exception | None = None
                for channel in list(self._orphans):
                    if channel not in self.channels:
                        self._orphans.discard(channel)
                        continue
                    try:
                        await self._route(channel, catch_up=True)
                        self._orphans.discard(channel)
                    except asyncio.CancelledError:
                        raise
                    except Exception as exc:
                        failed = exc
                if failed is not None:
                    self.outage.failed(failed)
                    await self.backoff.wait()
                    continue
                self.backoff.reset()
                self.reconnects += 1
            self.outage.recovered()  # nothing left to subscribe (or the rooms emptied meanwhile)

    async def _catch_up(self, room_id: str) -> None:
        if self.catch_up is None:
            return
        try:
            await self.catch_up(room_id)
        except UNREACHABLE:
            raise  # Redis away again: the channel stays orphaned, caught up from the same offset later
        except Exception:
            log.exception("catch-up of room %s failed", room_id)
