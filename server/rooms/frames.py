"""Outgoing frames, encoded once per subprotocol and shared by every socket of a room."""

from __future__ import annotations

import struct
from typing import Any

from server import protocol

OP_TEXT = 0x1
OP_BINARY = 0x2


def ws_frame(payload: bytes, opcode: int) -> bytes:
    """A complete, unmasked, unfragmented server-to-client WebSocket frame (RFC 6455 5.2)."""
    n = len(payload)
    first = 0x80 | opcode
    if n < 126:
        return struct.pack("!BB", first, n) + payload
    if n < 1 << 16:
        return struct.pack("!BBH", first, 126, n) + payload
    return struct.pack("!BBQ", first, 127, n) + payload


class OutFrame:
    """One message, encoded lazily for each subprotocol that needs it, then reused."""

    __slots__ = ("message", "_encoded")

    def __init__(self, message: dict[str, Any]) -> None:
        self.message = message
        self._encoded: dict[str, tuple[bytes | str, bytes]] = {}

    def for_subprotocol(self, subprotocol: str) -> tuple[bytes | str, bytes]:
        """(payload for an ASGI send, raw frame for a direct transport write)."""
        enc = self._encoded.get(subprotocol)
        if enc is None:
            payload = protocol.encode(self.message, subprotocol)
            if isinstance(payload, str):
                raw = ws_frame(payload.encode(), OP_TEXT)
            else:
                raw = ws_frame(payload, OP_BINARY)
            enc = self._encoded[subprotocol] = (payload, raw)
        return enc
