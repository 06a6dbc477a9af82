"""The room socket: join, receive, resume, finish. Gifts go to server/gifts.py.

A reply error keeps the socket open; a close frame ends it (server/errors.py says which
and with what advice).

A socket comes in one of two ways: the fast door (rooms/door.py), which reads the handshake
below uvicorn and joins a room this node already knows with no Redis read but the batched
viewer count; or `room_socket`, through uvicorn and Starlette, for every request the door
does not take. Both end in the same `Session`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Sequence
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
from server.rooms.state import RoomState
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
    log_refusal(websocket.path_params.get("room_id"), code, refusal)
    await websocket.close(code, reason)


def log_refusal(room_id: str | None, code: int, refusal: Disconnect) -> None:
    log.info("socket refused: room %s, close %d %s", room_id, code, refusal.reason)


def _delivered(conn: Conn, offset: str) -> bool:
    """Was this event already sent live on this socket (after its welcome)?"""
    return offset_after(offset, conn.live_from) and not offset_after(offset, conn.last_offset)


class Session:
    """One joined room socket: what it receives, its resumes, its end."""

    __slots__ = ("node", "conn", "sender", "tasks", "joined", "taken_over", "room", "bad_frames", "_resuming",
                 "started", "resumes", "pings")

    def __init__(self, node: Node, conn: Conn, sender: Sender | None) -> None:
        self.node = node
        self.conn = conn
        # None until the room's host is known (the fast door reads the room after the handshake).
        self.sender = sender
        # Resumes running (made on first use: most sockets never resume).
        self.tasks: set[asyncio.Task[None]] | None = None
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
        seen = node.hub.events_seen(conn.room_id)
        state = await node.rooms.get(conn.room_id)
        if state is None or not state.live:
            await conn.close(errors.ROOM_NOT_FOUND)
            return False
        node.hub.remember(conn.room_id, state, offset, seen)  # the next joins may read nothing
        self.welcome(state, offset, viewers)
        return True

    def join_known(self, accepted: float) -> bool:
        """Join a room this node is subscribed to and has read (hub.join_known), with no Redis
        round trip when it can: the offset is the node's; the state is the one read last, unless
        an event (a gift moves the goal) came since; the viewers are this node's now plus the
        others' as the last count write answered. This node's count is written soon, once for
        the joins of the room meanwhile (server/coalesce.py); a state or count it lacks is read
        the same way, shared, and the welcome waits for it. False when the room is not known
        so: `join` then. Raises when the user is over a cap."""
        node, conn = self.node, self.conn
        room = node.hub.join_known(conn)
        if room is None:
            return False
        self.joined = True
        offset = room.known_offset() or "0-0"
        if self.sender is None:
            self.sender = node.gifts.sender(conn, room.state.host_id)
        counting = node.presence.announce_soon(conn.room_id)
        viewers = node.hub.viewers_now(room)
        if viewers is not None and room.state_fresh():
            self._joined(room.state, viewers, offset, accepted)  # nothing to wait for
            return True
        seen = room.events_seen
        both = asyncio.gather(counting, node.rooms.get_soon(conn.room_id), return_exceptions=True)
        both.add_done_callback(lambda done: self._read_joined(done.result(), seen, offset, accepted))
        return True

    def _read_joined(self, answers: Sequence[Any], seen: int, offset: str, accepted: float) -> None:
        conn = self.conn
        if conn.closed:
            return  # the peer left meanwhile; its finish has run or will run
        failed = next((a for a in answers if isinstance(a, BaseException)), None)
        if failed is not None:
            conn.close_now(errors.close_for(failed))
            return
        viewers, state = answers
        if state is None or not state.live:
            conn.close_now(errors.ROOM_NOT_FOUND)
            return
        self.node.hub.remember(conn.room_id, state, None, seen)
        self._joined(state, viewers, offset, accepted)

    def _joined(self, state: RoomState, viewers: int, offset: str, accepted: float) -> None:
        self.welcome(state, offset, viewers)
        metrics.JOIN_SECONDS.observe(time.perf_counter() - accepted)
        if self.room is not None:
            self.room.go_live()

    def welcome(self, state: RoomState, offset: str, viewers: int) -> None:
        """The `welcome`, then the events held since the join began: the socket is live."""
        conn = self.conn
        conn.send_message({
            "type": "welcome", "room": conn.room_id, "viewers": viewers, "offset": offset,
            "epoch": state.epoch, "host": {"id": state.host_id, "name": state.host_name},
            "you": {"id": conn.principal.user_id, "name": conn.principal.name, "role": conn.principal.role},
            # The room's LIVE goal as it is now (read with the state); its `goal` events follow.
            "goal": state.goal.to_json() if state.goal is not None else None,
        })
        conn.live_from = conn.last_offset = offset
        self.node.hub.release(conn, after=offset)

    def take_over(self) -> bool:
        """Hand the socket from uvicorn to a light protocol of our own (rooms/takeover.py)."""
        if not self.node.settings.takeover:
            return False
        room = self.conn.take_over(self.on_message, self._lost)
        if room is None:
            return False
        self.adopt(room)
        return True

    def adopt(self, room: RoomProtocol) -> None:
        """This socket's bytes come through `room` (taken over, or opened by the fast door)."""
        room.on_message = self.on_message
        room.on_lost = self._lost
        self.node.sockets.add(room)
        self.room = room
        self.taken_over = True

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
            assert self.sender is not None  # set before the socket is read (its join)
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
        if self.tasks is None:
            self.tasks = set()
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
