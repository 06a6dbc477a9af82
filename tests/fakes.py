"""A fake asyncio transport and the sockets built on it, for in-process tests of rooms/.

Only the transport is fake: the frames written to it are real WebSocket frames, the room
sockets above it (`Conn`, `RoomProtocol`, websockets' sans-I/O `ServerProtocol`) are the real
ones, and nothing here stands in for Redis or the database (hub and conn do no I/O).
"""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import struct
from typing import Any

import msgpack
from websockets.protocol import State
from websockets.server import ServerProtocol

from server.auth import Principal
from server.rooms.conn import Conn
from server.rooms.takeover import RoomProtocol
from server.transport_probe import SCOPE_KEY

OP_TEXT, OP_BINARY, OP_CLOSE, OP_PING, OP_PONG = 0x1, 0x2, 0x8, 0x9, 0xA


def read_frames(data: bytes) -> list[tuple[int, bytes]]:
    """Server-to-client frames (unmasked, RFC 6455 5.2) as (opcode, payload)."""
    frames: list[tuple[int, bytes]] = []
    pos = 0
    while pos < len(data):
        opcode, n = data[pos] & 0x0F, data[pos + 1] & 0x7F
        pos += 2
        if n == 126:
            (n,) = struct.unpack_from("!H", data, pos)
            pos += 2
        elif n == 127:
            (n,) = struct.unpack_from("!Q", data, pos)
            pos += 8
        frames.append((opcode, bytes(data[pos : pos + n])))
        pos += n
    return frames


class FakeTransport(asyncio.Transport):
    """Keeps what is written. `stalled`: the peer reads nothing, so writes stay in the
    write buffer (`get_write_buffer_size`) until `drain_peer()`."""

    def __init__(self, extra: dict[str, Any] | None = None) -> None:
        super().__init__(extra)
        self.writes: list[bytes] = []
        self.stalled = False
        self.buffered = 0
        self.closing = False
        self.aborted = False
        self.protocol: asyncio.BaseProtocol | None = None
        self.reading = True

    # -- asyncio.Transport --
    def write(self, data: bytes | bytearray | memoryview) -> None:
        if self.closing:
            return  # as asyncio: writes after close() or abort() are dropped
        self.writes.append(data)  # type: ignore[arg-type]  # the object itself: `is` shows sharing
        if self.stalled:
            self.buffered += len(data)

    def get_write_buffer_size(self) -> int:
        return self.buffered

    def is_closing(self) -> bool:
        return self.closing

    def close(self) -> None:
        self._lose(aborted=False)

    def abort(self) -> None:
        self._lose(aborted=True)

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return super().get_extra_info(name, default)

    def set_protocol(self, protocol: asyncio.BaseProtocol) -> None:
        self.protocol = protocol

    def get_protocol(self) -> asyncio.BaseProtocol:
        assert self.protocol is not None
        return self.protocol

    def pause_reading(self) -> None:
        self.reading = False

    def resume_reading(self) -> None:
        self.reading = True

    # -- for tests --
    def _lose(self, aborted: bool) -> None:
        self.aborted = self.aborted or aborted
        if self.closing:
            return
        self.closing = True
        if self.protocol is None:
            return
        try:  # as asyncio: connection_lost in a later loop step
            asyncio.get_running_loop().call_soon(self.protocol.connection_lost, None)
        except RuntimeError:  # no loop (a test of bytes alone): at once
            self.protocol.connection_lost(None)

    def drain_peer(self) -> None:
        self.buffered = 0

    @property
    def data(self) -> bytes:
        return b"".join(self.writes)

    def frames(self) -> list[tuple[int, bytes]]:
        return read_frames(self.data)

    def messages(self) -> list[dict[str, Any]]:
        """The data frames written, decoded (json text or msgpack binary)."""
        out: list[dict[str, Any]] = []
        for opcode, payload in self.frames():
            if opcode == OP_TEXT:
                out.append(json.loads(payload))
            elif opcode == OP_BINARY:
                out.append(msgpack.unpackb(payload))
        return out

    def events(self) -> list[dict[str, Any]]:
        return [e for m in self.messages() if m["type"] == "events" for e in m["events"]]

    def close_frame(self) -> tuple[int, str] | None:
        """(code, reason) of the close frame written, if any."""
        for opcode, payload in self.frames():
            if opcode == OP_CLOSE:
                return struct.unpack("!H", payload[:2])[0], payload[2:].decode()
        return None


def principal(user_id: str = "viewer", birthdate: dt.date = dt.date(1990, 1, 1)) -> Principal:
    return Principal(user_id, user_id, "viewer", birthdate)


def room_socket(on_message: Any = None, on_lost: Any = None) -> tuple[RoomProtocol, FakeTransport]:
    """A taken-over room socket (takeover on) over a fake transport, its handshake done."""
    transport = FakeTransport()
    ws = ServerProtocol(state=State.OPEN, max_size=64 * 1024)
    room = RoomProtocol(ws, transport, on_message or (lambda data: None), on_lost or (lambda: None))
    transport.set_protocol(room)
    return room, transport


def taken_over_conn(room_id: str = "r1", subprotocol: str = "giftstream.msgpack", cap: int = 1 << 20,
                    user_id: str = "viewer", birthdate: dt.date = dt.date(1990, 1, 1)) -> tuple[Conn, FakeTransport]:
    """A `Conn` writing through a `RoomProtocol`, as every room socket does with takeover on."""
    conn = Conn(None, subprotocol, principal(user_id, birthdate), room_id, cap)
    room, transport = room_socket()
    conn.adopt(room)
    return conn, transport


class FakeUvicornProtocol:
    """The attributes of uvicorn's websockets-sansio protocol that `Conn` reads: a socket
    that stays with uvicorn (GIFTSTREAM_TAKEOVER=0) is written through these."""

    def __init__(self, transport: FakeTransport) -> None:
        self.transport = transport
        self.conn = ServerProtocol(state=State.OPEN, max_size=64 * 1024)
        self.close_sent = False
        self.disconnected = False
        self.queue: asyncio.Queue[dict[str, Any]] = asyncio.Queue()


class FakeWebSocket:
    """What `Conn` reads of a starlette WebSocket: the scope, where the transport probe put
    uvicorn's protocol."""

    def __init__(self, proto: FakeUvicornProtocol) -> None:
        self.scope: dict[str, Any] = {SCOPE_KEY: proto}


def uvicorn_conn(room_id: str = "r1", subprotocol: str = "giftstream.msgpack", cap: int = 1 << 20,
                 user_id: str = "viewer") -> tuple[Conn, FakeUvicornProtocol]:
    """A `Conn` on a socket that stayed with uvicorn (takeover off): direct writes all the same."""
    transport = FakeTransport()
    proto = FakeUvicornProtocol(transport)
    conn = Conn(FakeWebSocket(proto), subprotocol, principal(user_id), room_id, cap)  # type: ignore[arg-type]
    return conn, proto
