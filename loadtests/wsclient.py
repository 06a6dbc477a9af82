"""A lean WebSocket client (RFC 6455) as an asyncio Protocol, for thousands of sockets per process.

A load generator that shares two cores with the server must cost as little as possible per
frame: no task per socket, no per-frame await, one `time.time()` per read. Server frames are
unmasked and unfragmented in practice; fragments are still reassembled. Pings are answered
(the server closes a socket that misses its pong).
"""

from __future__ import annotations

import asyncio
import base64
import os
import struct
import time
from collections.abc import Callable

OP_CONT, OP_TEXT, OP_BINARY, OP_CLOSE, OP_PING, OP_PONG = 0x0, 0x1, 0x2, 0x8, 0x9, 0xA

# payload, receive time (time.time() of the read that completed it)
OnMessage = Callable[[bytes, float], None]
# close code from the peer's close frame (None: the TCP connection just went away)
OnClose = Callable[[int | None], None]


def _mask(payload: bytes, key: bytes) -> bytes:
    n = len(payload)
    if not n:
        return payload
    k = (key * (n // 4 + 1))[:n]
    return (int.from_bytes(payload, "little") ^ int.from_bytes(k, "little")).to_bytes(n, "little")


def client_frame(payload: bytes, opcode: int = OP_BINARY) -> bytes:
    """A masked, final client frame."""
    n = len(payload)
    key = os.urandom(4)
    if n < 126:
        head = struct.pack("!BB", 0x80 | opcode, 0x80 | n)
    elif n < 1 << 16:
        head = struct.pack("!BBH", 0x80 | opcode, 0x80 | 126, n)
    else:
        head = struct.pack("!BBQ", 0x80 | opcode, 0x80 | 127, n)
    return head + key + _mask(payload, key)



def frame_head(data: bytes, pos: int) -> tuple[int, int] | None:
    """The frame that starts at `data[pos]`: its header's length (a mask's 4 bytes included)
    and its payload's, or None while its header is not all in."""
    n = len(data) - pos
    if n < 2:
        return None
    b1 = data[pos + 1]
    length, head = b1 & 0x7F, 2
    if length == 126:
        if n < 4:
            return None
        length, head = (data[pos + 2] << 8) | data[pos + 3], 4
    elif length == 127:
        if n < 10:
            return None
        length, head = struct.unpack_from("!Q", data, pos + 2)[0], 10
    return (head + 4 if b1 & 0x80 else head), length

class WSClient(asyncio.Protocol):
    def __init__(self, host: str, port: int, path: str, subprotocol: str,
                 on_message: OnMessage, on_close: OnClose) -> None:
        key = base64.b64encode(os.urandom(16)).decode()
        self.request = (
            f"GET {path} HTTP/1.1\r\nHost: {host}:{port}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n"
            f"Sec-WebSocket-Protocol: {subprotocol}\r\n\r\n"
        ).encode()
        self.on_message = on_message
        self.on_close = on_close
        self.transport: asyncio.Transport | None = None
        self.buf = b""
        self.open = False
        self.handshake: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.close_code: int | None = None
        self.closed = False
        self._fragments: list[bytes] | None = None
        self.bytes_in = 0

    # asyncio.Protocol ------------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # uvloop's is no asyncio.Transport subclass
        self.transport.write(self.request)  # type: ignore[union-attr]

    def data_received(self, data: bytes) -> None:
        now = time.time()
        self.bytes_in += len(data)
        if self.buf:
            data = self.buf + data
        if not self.open:
            end = data.find(b"\r\n\r\n")
            if end < 0:
                self.buf = data
                return
            status = data[: data.find(b"\r\n")]
            if b" 101 " not in status + b" ":
                self._fail(ConnectionError(status.decode(errors="replace")))
                return
            self.open = True
            if not self.handshake.done():
                self.handshake.set_result(None)
            data = data[end + 4 :]
        self.buf = self._frames(data, now)

    def connection_lost(self, exc: Exception | None) -> None:
        self._fail(exc or ConnectionError("closed during handshake"))
        if not self.closed:
            self.closed = True
            self.on_close(self.close_code)

    # frames ----------------------------------------------------------------------------------

    def _frames(self, data: bytes, now: float) -> bytes:
        pos, n = 0, len(data)
        on_message = self.on_message
        while (frame := frame_head(data, pos)) is not None:
            head, length = frame
            end = pos + head + length
            if end > n:
                break
            b0, masked = data[pos], data[pos + 1] & 0x80
            payload = data[pos + head : end]
            if masked:  # a masked server frame is a protocol error, but be lenient
                payload = _mask(payload, data[pos + head - 4 : pos + head])
            pos = end
            opcode = b0 & 0x0F
            if opcode in (OP_BINARY, OP_TEXT):
                if b0 & 0x80:
                    on_message(payload, now)
                else:
                    self._fragments = [payload]
            elif opcode == OP_CONT and self._fragments is not None:
                self._fragments.append(payload)
                if b0 & 0x80:
                    whole, self._fragments = b"".join(self._fragments), None
                    on_message(whole, now)
            elif opcode == OP_PING:
                self._write(client_frame(payload, OP_PONG))
            elif opcode == OP_CLOSE:
                self.close_code = struct.unpack("!H", payload[:2])[0] if len(payload) >= 2 else 1005
                self._write(client_frame(payload[:2], OP_CLOSE))
                if self.transport is not None:
                    self.transport.close()
        return data[pos:] if pos < n else b""

    def _write(self, raw: bytes) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(raw)

    def _fail(self, exc: BaseException) -> None:
        if not self.handshake.done():
            self.handshake.set_exception(exc)
            self.handshake.exception()  # retrieved: a failed connect is reported by its caller
        if self.transport is not None and not self.open:
            self.transport.close()

    # API -------------------------------------------------------------------------------------

    def send(self, payload: bytes) -> bool:
        if not self.open or self.closed or self.transport is None or self.transport.is_closing():
            return False
        self.transport.write(client_frame(payload))
        return True

    def close(self, code: int = 1000) -> None:
        if self.transport is None or self.transport.is_closing():
            return
        if self.open:
            self.transport.write(client_frame(struct.pack("!H", code), OP_CLOSE))
            asyncio.get_running_loop().call_later(1.0, self.transport.close)
        else:
            self.transport.close()

    def pause(self) -> None:
        """Stop reading: the stalled-viewer case."""
        if self.transport is not None:
            self.transport.pause_reading()

    def resume(self) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.resume_reading()


async def connect(host: str, port: int, path: str, subprotocol: str, on_message: OnMessage,
                  on_close: OnClose, timeout: float = 30.0) -> WSClient:
    loop = asyncio.get_running_loop()
    holder: list[WSClient] = []

    def factory() -> WSClient:
        proto = WSClient(host, port, path, subprotocol, on_message, on_close)
        holder.append(proto)
        return proto

    async with asyncio.timeout(timeout):
        await loop.create_connection(factory, host, port)
        proto = holder[0]
        await proto.handshake
    return proto
