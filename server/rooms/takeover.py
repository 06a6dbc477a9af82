"""After the handshake, a room socket leaves uvicorn: a light protocol owns its bytes.

uvicorn keeps, per WebSocket, a protocol object, an ASGI task with its coroutine stack,
a receive queue and a scope; an idle viewer needs none of them. Once a viewer has joined,
its transport is handed to `RoomProtocol`, which feeds bytes to the same websockets
sans-I/O `ServerProtocol` uvicorn used for the handshake and hands whole messages to the
session with no task per socket. Keepalive pings come from one node-wide timer
(`Keepalive`), not one timer per socket.

A socket opened by the fast handshake (rooms/door.py) never was uvicorn's: it starts with
no `ServerProtocol` at all, and gets one only when a frame the fast path does not read
arrives (a close, a fragment, a long frame) or when it is closed from here. Small data
frames, pings and pongs are all most viewers ever send.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Iterable
from typing import Any

from websockets.frames import Opcode
from websockets.protocol import State
from websockets.server import ServerProtocol

from server import errors
from server.rooms.fastframes import PING, PONG, TEXT, ping_frame, pong_frame, split_small_frames, wire_size

log = logging.getLogger("giftstream.takeover")

# Seconds a socket closed as a slow consumer has to take its close frame before it is dropped.
CLOSE_GRACE_S = 2.0
# Bytes a joining socket may send before its welcome is out; past this it is read no more
# until then (as uvicorn paused a socket whose message was still queued).
HOLD_BYTES = 64 * 1024
# Slices the keepalive's interval is visited in (a slice of the sockets each).
KEEPALIVE_STEPS = 20

# A timer that never fires: uvicorn closes the transport when the ASGI app returns unless a
# close timer is pending; after a takeover the socket is no longer uvicorn's to close.
_NEVER: asyncio.TimerHandle | None = None


def _never(loop: asyncio.AbstractEventLoop) -> asyncio.TimerHandle:
    global _NEVER
    if _NEVER is None:
        _NEVER = loop.call_later(10**9, lambda: None)
    return _NEVER


class RoomProtocol(asyncio.Protocol):
    """The bytes of one taken-over room socket."""

    __slots__ = ("ws", "transport", "on_message", "on_lost", "close_sent", "disconnected",
                 "ping_sent_at", "last_seen", "_fragments", "_fragment_text", "_at_boundary", "_fed",
                 "_parsed", "cap", "max_size", "held")

    def __init__(self, ws: Any, transport: asyncio.Transport,
                 on_message: Callable[[bytes | str], None], on_lost: Callable[[], None],
                 cap: int = 1 << 20, max_size: int = 64 * 1024, joining: bool = False) -> None:
        # websockets.server.ServerProtocol, state OPEN; None until a frame needs it (see above).
        self.ws = ws
        self.max_size = max_size
        # What the peer sent while joining (`joining`), read once `go_live` is called.
        self.held: bytearray | None = bytearray() if joining else None
        self.transport = transport
        # send_buffer_cap: what this socket may hold unsent, pongs and close frames included.
        self.cap = cap
        self.on_message = on_message
        self.on_lost = on_lost
        self.close_sent = False
        self.disconnected = False
        self.ping_sent_at = 0.0
        self.last_seen = time.monotonic()
        self._fragments: list[bytes] | None = None
        self._fragment_text = False
        # The fast path (fastframes.py) may read only while the full parser sits between two
        # frames. That is known, not assumed: the bytes fed to the parser since it last did
        # must equal the wire size of the frames it returned, with nothing left in its buffer.
        # (A parser caught mid-frame by the takeover never matches, so it keeps the socket.)
        # A socket with no parser yet has read nothing: it sits between frames.
        self._at_boundary = ws is None
        self._fed = 0
        self._parsed = 0

    # The attributes `Conn` reads on uvicorn's protocol, for the same checks.
    @property
    def conn(self) -> Any:
        return self.ws

    def data_received(self, data: bytes) -> None:
        self.last_seen = time.monotonic()
        if self.held is not None:
            self.held += data
            if len(self.held) > HOLD_BYTES:
                self.transport.pause_reading()
            return
        self._read(data)

    def go_live(self) -> None:
        """The join is done (its welcome written): read what the peer sent meanwhile, and on."""
        held, self.held = self.held, None
        if held is None:
            return
        if len(held) > HOLD_BYTES and not self.transport.is_closing():
            self.transport.resume_reading()
        if held and not self.disconnected:
            self._read(bytes(held))

    def _full(self) -> Any:
        """The full websockets parser, made when first needed, in the state OPEN."""
        ws = self.ws
        if ws is None:
            ws = self.ws = ServerProtocol(state=State.OPEN, max_size=self.max_size, logger=log)
        return ws

    def _read(self, data: bytes) -> None:
        ws = self.ws
        if self._at_boundary and self._fragments is None and (ws is None or ws.state is State.OPEN):
            frames, used = split_small_frames(data)
            ponged = False
            for payload, kind in frames:
                if kind == PING:
                    if not self.close_sent:  # after our close frame nothing more is owed
                        self.transport.write(pong_frame(payload))
                        ponged = True
                elif kind == PONG:
                    self.ping_sent_at = 0.0
                else:
                    self._deliver(payload, kind == TEXT)
            if ponged and not self.close_sent and self.transport.get_write_buffer_size() > self.cap:
                self.close_slow()  # pings from a peer that reads nothing: pongs fill its buffer
                return
            if used == len(data):
                return
            data = data[used:]
        ws = self._full()
        self._at_boundary = False
        self._fed += len(data)
        ws.receive_data(data)
        for frame in ws.events_received():
            self._parsed += wire_size(len(frame.data))
            self._frame(frame)
        if self._parsed == self._fed and not self.ws.reader.buffer:
            self._at_boundary = True
            self._fed = self._parsed = 0
        self._flush()

    def _frame(self, frame: Any) -> None:
        op = frame.opcode
        if op is Opcode.TEXT or op is Opcode.BINARY:
            if not frame.fin:
                self._fragments, self._fragment_text = [bytes(frame.data)], op is Opcode.TEXT
                return
            self._deliver(bytes(frame.data), op is Opcode.TEXT)
        elif op is Opcode.CONT and self._fragments is not None:
            self._fragments.append(bytes(frame.data))
            if frame.fin:
                data, self._fragments = b"".join(self._fragments), None
                self._deliver(data, self._fragment_text)
        elif op is Opcode.PONG:
            self.ping_sent_at = 0.0
        # PING is answered and CLOSE is handled by the sans-I/O protocol itself.

    def _deliver(self, data: bytes, text: bool) -> None:
        if self.close_sent:
            return
        if text:
            try:
                self.on_message(data.decode())
            except UnicodeDecodeError:
                self.on_message(b"\xc1")  # undecodable: answered as a malformed frame
            return
        self.on_message(data)

    def _flush(self) -> None:
        """Write what the sans-I/O protocol made of the peer's frames (pongs, a close answer).
        A peer that sends pings and reads nothing fills its buffer with pongs: over the cap it
        is closed as a slow consumer, whether or not its room has anything to send."""
        out = self.ws.data_to_send()
        if out and not self.close_sent:  # after our close frame nothing more is owed (pongs)
            payload = b"".join(out)
            if payload:
                self.transport.write(payload)
        if self.ws.state is State.CLOSED or self.ws.close_expected():
            self.close_sent = True
            self.transport.close()
        elif not self.close_sent and self.transport.get_write_buffer_size() > self.cap:
            self.close_slow()

    def close_slow(self) -> None:
        """Close as a slow consumer (4008), read nothing more, and drop the socket (and its
        buffer) after a grace period to take the close frame."""
        self.send_close(*errors.closing(errors.SLOW_CONSUMER))
        self.transport.pause_reading()
        asyncio.get_running_loop().call_later(CLOSE_GRACE_S, self.transport.abort)

    def send_close(self, code: int, reason: str) -> None:
        if self.close_sent or self.transport.is_closing():
            return
        ws = self._full()  # it answers the peer's close frame, and closes the transport then
        ws.send_close(code, reason)
        self.close_sent = True
        out = ws.data_to_send()
        if out:
            self.transport.write(b"".join(out))
        if self.held is not None:
            self.go_live()  # closed while joining: the peer's close answer must be read

    def ping(self) -> None:
        if self.close_sent or self.transport.is_closing():
            return
        self.ping_sent_at = time.monotonic()
        if self.ws is None:
            self.transport.write(ping_frame(b"gs"))
            if self.transport.get_write_buffer_size() > self.cap:
                self.close_slow()
            return
        self.ws.send_ping(b"gs")
        self._flush()

    def eof_received(self) -> bool | None:
        return None  # the peer is gone: close our side too

    def connection_lost(self, exc: Exception | None) -> None:
        if self.disconnected:
            return
        self.disconnected = True
        self.on_lost()


def take_over(uvicorn_proto: Any, on_message: Callable[[bytes | str], None],
              on_lost: Callable[[], None], cap: int = 1 << 20) -> RoomProtocol | None:
    """Move a live socket from uvicorn to a RoomProtocol; None if it cannot be done safely."""
    transport = uvicorn_proto.transport
    if transport.is_closing() or uvicorn_proto.close_sent or uvicorn_proto.disconnected:
        return None
    ws = uvicorn_proto.conn
    if ws.state is not State.OPEN or uvicorn_proto.frames:  # mid-fragment: leave it to uvicorn
        return None
    # Messages the client sent before its welcome, already parsed into uvicorn's queue.
    early: list[dict[str, Any]] = []
    queue = uvicorn_proto.queue
    while not queue.empty():
        early.append(queue.get_nowait())
    if any(m.get("type") != "websocket.receive" for m in early):
        for m in early:  # a disconnect is waiting: let the ASGI path see it and clean up
            queue.put_nowait(m)
        return None
    room = RoomProtocol(ws, transport, on_message, on_lost, cap)
    uvicorn_proto.stop_keepalive()
    # uvicorn must neither close this transport when the ASGI app returns nor track it any longer.
    uvicorn_proto.close_timer = _never(asyncio.get_running_loop())
    uvicorn_proto.connections.discard(uvicorn_proto)
    transport.set_protocol(room)
    if uvicorn_proto.read_paused:
        transport.resume_reading()
    for m in early:
        data = m.get("bytes")
        on_message(data if data is not None else m.get("text") or b"")
    return room


class Keepalive:
    """Pings every taken-over socket once an interval and drops those that stopped answering.

    The sockets are visited in KEEPALIVE_STEPS slices spread over the interval, not all at
    once: a timer that pinged a worker's every socket in one loop step stalled a 100,000-socket
    join storm for a second every 20 s (eight workers' timers, started together, fired at the
    same moment, and 80,000 pongs came back at once)."""

    def __init__(self, sockets: Callable[[], Iterable[RoomProtocol]], interval_s: float, timeout_s: float) -> None:
        self.sockets = sockets
        self.interval = interval_s
        self.timeout = timeout_s
        self._task: asyncio.Task[None] | None = None
        self.dropped = 0

    def start(self) -> None:
        if self.interval > 0:
            self._task = asyncio.get_running_loop().create_task(self._loop(), name="giftstream-keepalive")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)

    async def _loop(self) -> None:
        step_s = self.interval / KEEPALIVE_STEPS
        while True:
            # The sockets of this round; one that joins meanwhile is visited from the next.
            sockets = list(self.sockets())
            n = len(sockets)
            for k in range(KEEPALIVE_STEPS):
                await asyncio.sleep(step_s)
                self.visit(sockets[k * n // KEEPALIVE_STEPS:(k + 1) * n // KEEPALIVE_STEPS], time.monotonic())

    def visit(self, sockets: Iterable[RoomProtocol], now: float) -> None:
        """Drop the sockets whose ping went unanswered too long; ping those quiet for half an
        interval."""
        for sock in sockets:
            if sock.held is not None or sock.disconnected:
                continue  # still joining (nothing, not even a ping, goes before its welcome), or gone
            if sock.ping_sent_at and now - sock.ping_sent_at > self.timeout:
                self.dropped += 1
                sock.send_close(*errors.closing(errors.PING_TIMEOUT))
                sock.transport.abort()
            elif now - sock.last_seen >= self.interval * 0.5 and not sock.ping_sent_at:
                sock.ping()
