"""The room socket: join, gifts, resume. Reply errors keep the socket; close codes end it."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from typing import Any

from redis.exceptions import ResponseError
from starlette.websockets import WebSocket

from server import auth, protocol
from server.codes import Close, Err, GiftstreamError, reconnect_reason
from server.fastpipe import UNREACHABLE
from server.node import Node
from server.ratelimit import TokenBucket
from server.rooms.conn import Conn
from server.rooms.hub import offset_after
from server.rooms.state import RoomState
from server.rooms.takeover import RoomProtocol, take_over
from server.transport_probe import SCOPE_KEY
from server.wallet.service import Debit, GiftOrder

log = logging.getLogger("giftstream.ws")

# Malformed frames in a row before the socket is closed with 4400.
MAX_BAD_FRAMES = 20
# Gifts of one socket waiting for their debit at once; more are refused with rate_limited.
MAX_INFLIGHT_GIFTS = 256


async def room_socket(websocket: WebSocket) -> None:
    node: Node = websocket.app.state.node
    room_id = websocket.path_params["room_id"]
    offered = websocket.scope.get("subprotocols") or []
    subprotocol = protocol.choose_subprotocol(offered)
    await websocket.accept(subprotocol=subprotocol if subprotocol in offered else None)
    try:
        principal = auth.verify(node.settings.secret or "", websocket.query_params.get("token"))
    except GiftstreamError as exc:
        await websocket.close(Close.UNAUTHORIZED, exc.message)
        return
    if node.draining:
        await websocket.close(Close.GOING_AWAY, reconnect_reason("server restarting, reconnect"))
        return
    try:
        state = await node.rooms.get(room_id)
    except UNREACHABLE:
        await websocket.close(Close.TRY_AGAIN_LATER, reconnect_reason("service unavailable, reconnect"))
        return
    if state is None or not state.live:
        await websocket.close(Close.ROOM_NOT_FOUND, "room not found or not live")
        return
    conn = Conn(websocket, subprotocol, principal, room_id, node.settings.send_buffer_cap)
    if node.settings.socket_sndbuf:
        conn.set_kernel_sndbuf(node.settings.socket_sndbuf)
    conn.bucket = TokenBucket(node.settings.gift_rate_per_s, node.settings.gift_burst)
    conn.start()
    session = Session(node, conn, state)
    try:
        if await session.join():
            if session.take_over():
                return  # the socket now lives on without this coroutine (see rooms/takeover.py)
            await session.receive_loop()
    except UNREACHABLE:
        # Redis went away while joining: the client comes back later and resumes.
        conn.close_now(Close.TRY_AGAIN_LATER, reconnect_reason("service unavailable, reconnect"))
    except Exception:
        # Unexpected: close with 1011 and never tell the peer why.
        log.exception("room socket failed")
        conn.close_now(Close.INTERNAL_ERROR, "internal error")
    finally:
        if not session.taken_over:
            await session.finish()


def _delivered(conn: Conn, offset: str) -> bool:
    """Was this event already sent live on this socket (after its welcome)?"""
    return offset_after(offset, conn.live_from) and not offset_after(offset, conn.last_offset)


class Session:
    def __init__(self, node: Node, conn: Conn, state: RoomState) -> None:
        self.node = node
        self.conn = conn
        self.state = state
        self.tasks: set[asyncio.Task[None]] = set()
        self.joined = False
        self.taken_over = False
        self.room: RoomProtocol | None = None
        self.bad_frames = 0
        self.gifts_in_flight = 0
        # The sender's display name goes to the room's leaderboard names with its first gift.
        self.name_recorded = False
        self._resuming: asyncio.Task[None] | None = None

    async def join(self) -> bool:
        node, conn = self.node, self.conn
        await node.hub.join(conn)
        self.joined = True
        # Subscribed before reading the offset: nothing published after it can be missed.
        offset = await node.rooms.current_offset(conn.room_id)
        viewers = await node.presence.announce(conn.room_id)
        state = await node.rooms.get(conn.room_id)
        if state is None or not state.live:
            await conn.close(Close.ROOM_NOT_FOUND, "room not found or not live")
            return False
        self.state = state
        conn.send_message({
            "type": "welcome", "room": conn.room_id, "viewers": viewers, "offset": offset,
            "epoch": state.epoch, "host": {"id": state.host_id, "name": state.host_name},
            "you": {"id": conn.principal.user_id, "name": conn.principal.name, "role": conn.principal.role},
        })
        conn.live_from = conn.last_offset = offset
        node.hub.release(conn, after=offset)
        return True

    def take_over(self) -> bool:
        ws = self.conn.ws
        proto = ws.scope.get(SCOPE_KEY) if ws is not None else None
        if proto is None or not self.node.settings.takeover:
            return False
        room = take_over(proto, self.on_message, self._lost)
        if room is None:
            return False
        ws.scope.pop(SCOPE_KEY, None)  # type: ignore[union-attr]
        self.conn.adopt(room)
        self.node.sockets.add(room)
        self.room = room
        self.taken_over = True
        return True

    def _lost(self) -> None:
        if self.room is not None:
            self.node.sockets.discard(self.room)
        self.node.track(self.finish())

    async def receive_loop(self) -> None:
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
        """One whole message from the peer; never blocks (gifts and resumes run as tasks)."""
        try:
            msg = protocol.decode(data, self.conn.subprotocol)
        except protocol.ProtocolError as exc:
            self.bad_frames += 1
            self.reply_error(exc.code, exc.message, exc.msg_id)
            if self.bad_frames >= MAX_BAD_FRAMES:
                self.conn.close_now(Close.PROTOCOL_VIOLATION, "too many malformed frames")
            return
        self.bad_frames = 0
        if isinstance(msg, protocol.Gift):
            if self.gifts_in_flight >= MAX_INFLIGHT_GIFTS:
                self.reply_error(Err.RATE_LIMITED, "too many gifts in flight; retry later", msg.id)
                return
            self.gift(msg)
        elif isinstance(msg, protocol.Resume):
            # Resumes of one socket run one after another, in the order they came.
            self._resuming = self._spawn(self._resume_in_turn(msg, self._resuming))
        elif isinstance(msg, protocol.Ping):
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
            self.reply_error(Err.BAD_REQUEST, "'since' is not an offset of this room", msg.since)
        except Exception:
            log.exception("resume failed")
            self.conn.ready = True
            self.conn.close_now(Close.INTERNAL_ERROR, "internal error")

    def reply_error(self, code: Err, message: str, msg_id: str | None) -> None:
        self.conn.reply(protocol.error(code, message, msg_id))

    def gift(self, msg: protocol.Gift) -> None:
        """Validate and queue the debit; no task per gift: the reply is sent from the debit's
        future callback, in the same loop step as the pipeline's reply."""
        node, conn, principal = self.node, self.conn, self.conn.principal
        try:
            item = node.catalog.gift(msg.gift)
            if not 1 <= msg.count <= node.settings.max_gift_count:
                raise GiftstreamError(Err.BAD_COUNT, f"count must be 1 to {node.settings.max_gift_count}")
        except GiftstreamError as exc:
            self.reply_error(exc.code, exc.message, msg.id)
            return
        order = GiftOrder(msg.id, principal.user_id, principal.name, self.state.host_id, conn.room_id,
                          item.id, msg.count, item.coins)
        try:
            self._admit()
        except GiftstreamError as refusal:
            # A retry of a gift that was already charged still learns its result, even when
            # the room has ended or the socket is over its rate since (rare: a task is fine).
            self.gifts_in_flight += 1
            self._spawn(self._refused(msg, order, refusal))
            return
        self.gifts_in_flight += 1
        node.wallet.debit(order).add_done_callback(lambda fut: self._debited(msg, order, fut))

    def _debited(self, msg: protocol.Gift, order: GiftOrder, fut: asyncio.Future[Any]) -> None:
        self.gifts_in_flight -= 1
        try:
            debit = self.node.wallet.debit_result(fut.result())
        except GiftstreamError as exc:
            self.reply_error(exc.code, exc.message, msg.id)
            return
        except Exception as exc:
            if not isinstance(exc, UNREACHABLE):  # the batcher logs an outage, once
                log.exception("gift %s failed", msg.id)
            # Unknown outcome: retrying with the same id is safe.
            self.reply_error(Err.UNAVAILABLE, "gift could not be confirmed; retry with the same id", msg.id)
            return
        self._acked(msg, order, debit)

    async def _refused(self, msg: protocol.Gift, order: GiftOrder, refusal: GiftstreamError) -> None:
        try:
            debit = await self.node.wallet.replay(order)
        except GiftstreamError as exc:
            refusal = exc
            debit = None
        except Exception:
            debit = None
        finally:
            self.gifts_in_flight -= 1
        if debit is None:
            self.reply_error(refusal.code, refusal.message, msg.id)
        else:
            self._acked(msg, order, debit)

    def _acked(self, msg: protocol.Gift, order: GiftOrder, debit: Debit) -> None:
        principal = self.conn.principal
        self.conn.reply({"type": "ack", "id": msg.id, "gift_id": debit.gift_id, "balance": debit.balance,
                         "replayed": debit.replayed})
        # A replayed debit is published too: the gateway that charged it may have died before
        # publishing it. room_publish.lua shows a gift once however often it is asked.
        if debit.debit_ms:
            event = {"type": "gift", "gift_id": debit.gift_id,
                     "from": {"id": principal.user_id, "name": principal.name},
                     "gift": order.gift, "count": order.count, "coins": order.coins, "ts": debit.debit_ms}
            self.node.publish_gift(self.conn.room_id, event, debit.debit_ms, record_name=not self.name_recorded)
            self.name_recorded = True

    def _admit(self) -> None:
        """Gateway checks before a debit; the sender's age comes before any balance check."""
        node, conn, principal = self.node, self.conn, self.conn.principal
        if node.draining:
            raise GiftstreamError(Err.UNAVAILABLE, "server restarting; retry with the same id")
        if not conn.bucket.take():
            raise GiftstreamError(Err.RATE_LIMITED, "too many gifts; retry later with the same id")
        local = node.hub.rooms.get(conn.room_id)
        if local is None or local.ended:
            raise GiftstreamError(Err.ROOM_NOT_LIVE, "this room is not live")
        if not principal.is_adult():
            raise GiftstreamError(Err.AGE_RESTRICTED, "you must be 18 or older to send gifts")
        if principal.user_id == self.state.host_id:
            raise GiftstreamError(Err.NOT_ALLOWED, "hosts cannot gift their own room")

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
            # Resumes and replay lookups still running; debits need no wait: their callbacks publish
            # the gift whether or not this socket is still open.
            with contextlib.suppress(Exception):
                await asyncio.wait(list(self.tasks), timeout=10)
        conn.closed = True
        if self.joined:
            await node.hub.leave(conn)
            with contextlib.suppress(Exception):
                await node.presence.announce(conn.room_id)
