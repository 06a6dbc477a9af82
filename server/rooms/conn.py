"""One viewer's socket: non-blocking writes, a byte cap on what it has not yet taken.

Under uvicorn's `websockets-sansio` protocol a frame is written straight to the
socket's transport (what `websockets.broadcast()` does): a broadcast never awaits
any one viewer. Elsewhere (another ASGI server) a per-socket writer task drains a
queue capped in bytes. Either way a socket over `send_buffer_cap` is closed with
4008 (slow consumer) and everyone else is unaffected.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from collections import deque
from collections.abc import Callable
from typing import Any, ClassVar

from starlette.websockets import WebSocket

from server import errors
from server.auth import Principal
from server.errors import Disconnect
from server.rooms.frames import OutFrame
from server.rooms.takeover import RoomProtocol, take_over
from server.transport_probe import SCOPE_KEY

log = logging.getLogger("giftstream.conn")

CLOSE_GRACE_S = 2.0


def _uvicorn_protocol(websocket: WebSocket) -> Any | None:
    """The uvicorn websockets-sansio protocol behind this socket, if that is what runs us."""
    proto = websocket.scope.get(SCOPE_KEY)
    if proto is None or not hasattr(proto, "transport") or not hasattr(proto, "conn"):
        return None
    return proto


class _Raw(OutFrame):
    """Frames already encoded for this socket's subprotocol (corked replies)."""

    __slots__ = ("raw",)

    def __init__(self, raw: bytes) -> None:
        super().__init__({})
        self.raw = raw

    def for_subprotocol(self, subprotocol: str) -> tuple[bytes | str, bytes]:
        return self.raw, self.raw


class _Cork:
    """Sockets with corked replies, written out once per loop step."""

    dirty: ClassVar[list[Conn]] = []
    scheduled: ClassVar[bool] = False

    @classmethod
    def add(cls, conn: Conn) -> None:
        cls.dirty.append(conn)
        if not cls.scheduled:
            cls.scheduled = True
            asyncio.get_running_loop().call_soon(cls.flush)

    @classmethod
    def flush(cls) -> None:
        dirty, cls.dirty = cls.dirty, []
        cls.scheduled = False
        for conn in dirty:
            conn.uncork()


def flush_replies() -> None:
    """Write every corked reply now. A room's fan-out calls this before each slice, so an ack or
    an error made in this loop step never waits behind the next slice of a big room's frame."""
    if _Cork.dirty:
        _Cork.flush()


class Conn:
    __slots__ = ("ws", "subprotocol", "principal", "room_id", "cap", "_proto", "_transport", "_queue",
                 "_queued_bytes", "_wakeup", "_writer", "closed", "close_code", "ready", "held",
                 "last_offset", "live_from", "_corked", "__weakref__")

    def __init__(self, ws: WebSocket | None, subprotocol: str, principal: Principal, room_id: str, cap: int,
                 room: RoomProtocol | None = None) -> None:
        self.ws = ws
        self.subprotocol = subprotocol
        self.principal = principal
        self.room_id = room_id
        self.cap = cap
        # `room`: a socket opened by the fast door (rooms/door.py), ours from its first byte.
        self._proto: Any = room if room is not None else _uvicorn_protocol(ws) if ws is not None else None
        self._transport: Any = self._proto.transport if self._proto is not None else None
        if room is not None:
            room.cap = cap
        # The fallback writer's queue; direct sockets never need it (memory per idle viewer).
        self._queue: deque[tuple[bytes | str, int]] | None = None if self._transport is not None else deque()
        self._queued_bytes = 0
        self._wakeup: asyncio.Event | None = None if self._transport is not None else asyncio.Event()
        self._writer: asyncio.Task[None] | None = None
        self.closed = False
        self.close_code: int | None = None
        # False while joining or resuming: room events are held, then released in order.
        self.ready = False
        self.held: list[dict[str, Any]] = []
        # Events in (live_from, last_offset] were delivered on this socket: a resume skips them.
        self.live_from: str | None = None
        self.last_offset: str | None = None
        self._corked: list[bytes] | None = None

    def take_over(self, on_message: Callable[[bytes | str], None], on_lost: Callable[[], None]) -> RoomProtocol | None:
        """Move the socket from uvicorn to a light protocol of ours (see takeover.py), which hands
        each whole message to `on_message`; None when it stays with uvicorn (not its sans-I/O
        protocol, or caught mid-message). An idle viewer then costs only what it needs."""
        ws = self.ws
        proto = ws.scope.pop(SCOPE_KEY, None) if ws is not None else None
        room = take_over(proto, on_message, on_lost, self.cap) if proto is not None else None
        if room is not None:
            self.adopt(room)
        return room

    def adopt(self, room: RoomProtocol) -> None:
        """Write through `room` from now on, and let go of the ASGI objects."""
        self._proto = room
        self._transport = room.transport
        room.cap = self.cap  # the pongs it writes count against the same cap as our frames
        self.ws = None

    def preface(self, data: bytes) -> None:
        """Bytes that go out with this socket's first frame, in the same write: the handshake's
        answer before the welcome (one syscall, not two, a join)."""
        self._corked = [data, *(self._corked or ())]

    def set_kernel_sndbuf(self, size: int) -> None:
        sock = self._transport.get_extra_info("socket") if self._transport is not None else None
        if sock is not None:
            # ValueError: the peer hung up right after the upgrade, and uvloop's socket has no
            # file descriptor left (tests/test_fuzz_socket.py logged it 25 times in 40 examples).
            with contextlib.suppress(OSError, ValueError):
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, size)

    def start(self) -> None:
        if self._transport is None:
            self._writer = asyncio.get_running_loop().create_task(self._drain())

    def pending_bytes(self) -> int:
        if self._transport is not None:
            return int(self._transport.get_write_buffer_size())
        return self._queued_bytes

    def send(self, frame: OutFrame) -> bool:
        """Write one frame without waiting; False if the socket is gone or was just dropped as slow."""
        if self.closed:
            return False
        payload, raw = frame.for_subprotocol(self.subprotocol)
        if self._transport is not None:
            proto = self._proto
            if proto.close_sent or proto.disconnected or self._transport.is_closing():
                self.closed = True
                self._corked = None
                # A close that a stalled peer never reads would keep it (and its buffer) forever.
                if not self._transport.is_closing() or self._transport.get_write_buffer_size() > self.cap:
                    asyncio.get_running_loop().call_later(CLOSE_GRACE_S, self._transport.abort)
                return False
            if self._corked:
                raw = b"".join(self._corked) + raw  # corked replies first: order is kept
                self._corked = None
            self._transport.write(raw)
        else:
            assert self._queue is not None and self._wakeup is not None
            self._queue.append((payload, len(raw)))
            self._queued_bytes += len(raw)
            self._wakeup.set()
        if self.pending_bytes() > self.cap:
            self.close_now(errors.SLOW_CONSUMER)
            return False
        return True

    def send_message(self, message: dict[str, Any]) -> bool:
        return self.send(OutFrame(message))

    def reply(self, message: dict[str, Any]) -> None:
        """A reply to this socket alone (ack, error, pong), corked until the end of this loop
        step: the acks of one debit batch leave in one write, not one syscall each."""
        if self.closed:
            return
        if self._transport is None:
            self.send_message(message)
            return
        _, raw = OutFrame(message).for_subprotocol(self.subprotocol)
        if self._corked is None:
            self._corked = [raw]
            _Cork.add(self)
        else:
            self._corked.append(raw)

    def uncork(self) -> None:
        if self._corked and not self.closed:
            corked, self._corked = self._corked, None
            self.send(_Raw(b"".join(corked)))

    async def _drain(self) -> None:
        assert self._queue is not None and self._wakeup is not None
        try:
            while not self.closed:
                if not self._queue:
                    self._wakeup.clear()
                    await self._wakeup.wait()
                    continue
                payload, nbytes = self._queue.popleft()
                self._queued_bytes -= nbytes
                assert self.ws is not None
                if isinstance(payload, str):
                    await self.ws.send_text(payload)
                else:
                    await self.ws.send_bytes(payload)
        except Exception:
            self.closed = True

    def close_now(self, disconnect: Disconnect) -> None:
        """Close without waiting on the peer: used when its buffer is already full."""
        if self.closed:
            return
        self.uncork()  # replies already made go out before the close frame
        if self.closed:
            return
        self.closed = True
        code, reason = errors.closing(disconnect)
        self.close_code = code
        if isinstance(self._proto, RoomProtocol):
            self._proto.send_close(code, reason)
            asyncio.get_running_loop().call_later(CLOSE_GRACE_S, self._transport.abort)
        elif self._proto is not None:
            proto = self._proto
            with contextlib.suppress(Exception):
                if not proto.close_sent and not self._transport.is_closing():
                    proto.conn.send_close(code, reason)
                    self._transport.write(b"".join(proto.conn.data_to_send()))
                    proto.close_sent = True
                    # Tell the endpoint's receive loop, as uvicorn does for its own closes.
                    proto.queue.put_nowait({"type": "websocket.disconnect", "code": code, "reason": reason})
                loop = asyncio.get_running_loop()
                # A peer that reads nothing never answers the close: drop it after a grace period.
                loop.call_later(CLOSE_GRACE_S, self._transport.abort)
        else:
            if self._writer is not None:
                self._writer.cancel()
            asyncio.get_running_loop().create_task(self._close_fallback(code, reason))

    async def _close_fallback(self, code: int, reason: str) -> None:
        assert self.ws is not None
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self.ws.close(code, reason), CLOSE_GRACE_S)

    async def close(self, disconnect: Disconnect) -> None:
        """Close after what is already queued has been written."""
        if self.closed:
            return
        if self._transport is None and self._queue:  # fallback: let the writer finish
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(CLOSE_GRACE_S):
                    while self._queue and not self.closed:
                        await asyncio.sleep(0.01)
        self.close_now(disconnect)
