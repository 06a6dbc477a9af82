"""The room socket: join, receive, resume, finish. Gifts go to server/gifts.py.

A reply error keeps the socket open; a close frame ends it (server/errors.py says which
and with what advice).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from typing import Any

from redis.exceptions import ResponseError
from starlette.websockets import WebSocket

from server import auth, errors, metrics, protocol
from server.codes import Err, GiftstreamError
from server.errors import Disconnect
from server.gifts import Sender
from server.node import Node
from server.ratelimit import TokenBucket
from server.rooms.conn import Conn
from server.rooms.hub import offset_after
from server.rooms.takeover import RoomProtocol

log = logging.getLogger("giftstream.ws")

# Malformed frames in a row before the socket is closed with 4400.
MAX_BAD_FRAMES = 20


async def room_socket(websocket: WebSocket) -> None:
    """The handshake's answer: a joined socket, or a close frame saying why not."""
    accepted = time.perf_counter()
    node: Node = websocket.app.state.node
    room_id = websocket.path_params["room_id"]
    offered = websocket.scope.get("subprotocols") or []
    subprotocol = protocol.choose_subprotocol(offered)
    await websocket.accept(subprotocol=subprotocol if subprotocol in offered else None)
    try:
        principal = auth.verify(node.settings.secret or "", websocket.query_params.get("token"))
        refusal = errors.GOING_AWAY if node.draining else None
        state = None if refusal else await node.rooms.get(room_id)
        if refusal is None and (state is None or not state.live):
            refusal = errors.ROOM_NOT_FOUND
    except Exception as exc:
        refusal = errors.close_for(exc)
    if refusal is not None:
        await _refuse(websocket, refusal)
        return
    assert state is not None
    conn = Conn(websocket, subprotocol, principal, room_id, node.settings.send_buffer_cap)
    if node.settings.socket_sndbuf:
        conn.set_kernel_sndbuf(node.settings.socket_sndbuf)
    conn.start()
    session = Session(node, conn, node.gifts.sender(conn, state.host_id))
    try:
        if await session.join():
            metrics.JOIN_SECONDS.observe(time.perf_counter() - accepted)
            if session.take_over():
                return  # the socket now lives on without this coroutine (see rooms/takeover.py)
            await session.receive_loop()
    except Exception as exc:
        conn.close_now(errors.close_for(exc))
    finally:
        if not session.taken_over:
            await session.finish()


async def _refuse(websocket: WebSocket, refusal: Disconnect) -> None:
    code, reason = errors.closing(refusal)
    log.info("socket refused: room %s, close %d %s", websocket.path_params.get("room_id"), code, refusal.reason)
    await websocket.close(code, reason)


def _delivered(conn: Conn, offset: str) -> bool:
    """Was this event already sent live on this socket (after its welcome)?"""
    return offset_after(offset, conn.live_from) and not offset_after(offset, conn.last_offset)


class Session:
    """One joined room socket: what it receives, its resumes, its end."""

    def __init__(self, node: Node, conn: Conn, sender: Sender) -> None:
        self.node = node
        self.conn = conn
        self.sender = sender
        self.tasks: set[asyncio.Task[None]] = set()
        self.joined = False
        self.taken_over = False
        self.room: RoomProtocol | None = None
        self.bad_frames = 0
        self._resuming: asyncio.Task[None] | None = None
        self.started = time.monotonic()
        # A resume replays part of the room from Redis; a ping costs a reply: one socket gets a
        # few of each, so it cannot take the node's CPU from everyone else.
        settings = node.settings
        self.resumes = TokenBucket(settings.resume_rate_per_s, settings.resume_burst)
        self.pings = TokenBucket(settings.ping_rate_per_s, settings.ping_burst)

    async def join(self) -> bool:
        node, conn = self.node, self.conn
        await node.hub.join(conn)
        self.joined = True
        # Subscribed before reading the offset: nothing published after it can be missed.
        offset = await node.rooms.current_offset(conn.room_id)
        viewers = await node.presence.announce(conn.room_id)
        state = await node.rooms.get(conn.room_id)
        if state is None or not state.live:
            await conn.close(errors.ROOM_NOT_FOUND)
            return False
        conn.send_message({
            "type": "welcome", "room": conn.room_id, "viewers": viewers, "offset": offset,
            "epoch": state.epoch, "host": {"id": state.host_id, "name": state.host_name},
            "you": {"id": conn.principal.user_id, "name": conn.principal.name, "role": conn.principal.role},
            # The room's LIVE goal as it is now (read with the state); its `goal` events follow.
            "goal": state.goal.to_json() if state.goal is not None else None,
        })
        conn.live_from = conn.last_offset = offset
        node.hub.release(conn, after=offset)
        return True

    def take_over(self) -> bool:
        """Hand the socket from uvicorn to a light protocol of our own (rooms/takeover.py)."""
        if not self.node.settings.takeover:
            return False
        room = self.conn.take_over(self.on_message, self._lost)
        if room is None:
            return False
        self.node.sockets.add(room)
        self.room = room
        self.taken_over = True
        return True

    def _lost(self) -> None:
        if self.room is not None:
            self.node.sockets.discard(self.room)
        self.node.track(self.finish())

    async def receive_loop(self) -> None:
        """Messages through uvicorn's protocol (when the socket was not taken over)."""
        ws = self.conn.ws
        assert ws is not None
        while not self.conn.closed:
            message = await ws.receive()
            if message["type"] == "websocket.disconnect":
                return
            data = message.get("bytes")
            if data is None:
                data = message.get("text")
            if data is not None:
                self.on_message(data)

    def on_message(self, data: bytes | str) -> None:
        """One whole message from the peer; never blocks (gifts and resumes run on their own)."""
        try:
            msg = protocol.decode(data, self.conn.subprotocol)
        except protocol.ProtocolError as exc:
            self.bad_frames += 1
            self.conn.reply(errors.reply_for(exc, exc.msg_id))
            if self.bad_frames >= MAX_BAD_FRAMES:
                self.conn.close_now(errors.PROTOCOL_VIOLATION)
            return
        self.bad_frames = 0
        if isinstance(msg, protocol.Gift):
            self.node.gifts.submit(self.sender, msg)
        elif isinstance(msg, protocol.Resume):
            if not self.resumes.take():
                limited = GiftstreamError(Err.RATE_LIMITED, "too many resumes; wait and resume once")
                self.conn.reply(errors.reply_for(limited, msg.id))
                return
            # Resumes of one socket run one after another, in the order they came.
            self._resuming = self._spawn(self._resume_in_turn(msg, self._resuming))
        elif isinstance(msg, protocol.Ping) and self.pings.take():
            # Over the rate a ping is dropped: no answer costs the least.
            self.conn.reply({"type": "pong", "id": msg.id, "ts": int(time.time() * 1000)})

    def _spawn(self, coro: Any) -> asyncio.Task[None]:
        task = asyncio.get_running_loop().create_task(coro)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)
        return task

    async def _resume_in_turn(self, msg: protocol.Resume, previous: asyncio.Task[None] | None) -> None:
        if previous is not None:
            await asyncio.wait([previous])
        try:
            await self.resume(msg)
        except (ResponseError, ValueError):
            # An offset Redis will not take (e.g. beyond any id it could have made).
            self.conn.ready = True
            bad = GiftstreamError(Err.BAD_REQUEST, "'since' is not an offset of this room")
            self.conn.reply(errors.reply_for(bad, msg.id))
        except Exception as exc:
            self.conn.ready = True
            self.conn.close_now(errors.close_for(exc))

    async def resume(self, msg: protocol.Resume) -> None:
        node, conn = self.node, self.conn
        conn.ready = False  # hold live events while the gap is replayed
        try:
            state = await node.rooms.get(conn.room_id)
            epoch_ok = state is not None and (msg.epoch is None or msg.epoch == state.epoch)
            events: list[dict[str, Any]] = []
            complete = False
            if epoch_ok:
                events, complete = await node.rooms.events_after(
                    conn.room_id, msg.since, node.settings.resume_max_events)
            if not complete:
                offset = await node.rooms.current_offset(conn.room_id)
                viewers, top = await node.presence.room_view(conn.room_id)
                conn.send_message({
                    "type": "resume_failed", "reason": "epoch_changed" if not epoch_ok else "too_old",
                    "room": conn.room_id, "offset": offset, "epoch": state.epoch if state else None,
                    "viewers": viewers, "coins_total": state.coins_total if state else 0, "top_gifters": top,
                })
                node.hub.release(conn, after=offset)
                return
            events = [e for e in events if not _delivered(conn, e["offset"])]
            for i in range(0, len(events), 500):
                conn.send_message({"type": "events", "events": events[i : i + 500]})
            last = conn.last_offset
            if events and offset_after(events[-1]["offset"], last):
                last = events[-1]["offset"]
            if not offset_after(msg.since, conn.live_from):
                conn.live_from = msg.since
            conn.last_offset = last
            node.hub.release(conn, after=last)
        except BaseException:
            conn.ready = True
            raise

    async def finish(self) -> None:
        node, conn = self.node, self.conn
        if self.tasks:
            # Resumes still running; gifts need no wait: their callbacks publish the gift
            # whether or not this socket is still open.
            with contextlib.suppress(Exception):
                await asyncio.wait(list(self.tasks), timeout=10)
        conn.closed = True
        # The access line of a socket (uvicorn logs its handshake; its end is logged here).
        log.info("socket closed: room %s, user %s, %s after %.1fs", conn.room_id, conn.principal.user_id,
                 f"close {conn.close_code}" if conn.close_code is not None else "by the peer",
                 time.monotonic() - self.started)
        if self.joined:
            await node.hub.leave(conn)
            with contextlib.suppress(Exception):
                await node.presence.announce(conn.room_id)
