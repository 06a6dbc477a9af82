"""A room socket's upgrade request, read in one pass: bytes in, what the join needs out.

Through uvicorn a room socket's request was parsed by httptools, written out again and
parsed a second time by websockets, then went through Starlette's ASGI layers: about half
of a join's ~2 ms of CPU in a join storm. The request a client sends to
`/v1/rooms/{room_id}/ws` is small and always the same shape, so the gateway reads it here,
once, and answers the handshake itself (rooms/door.py).

Only the plain case is read here: a whole request head in the connection's first bytes,
ASCII, `GET` over HTTP/1.1, the room's path with no escapes, each handshake header once and
well formed, no body. Anything else is None, and goes the long way (uvicorn, websockets,
Starlette) with every check and answer it had before. The checks are those websockets'
`ServerProtocol.accept` makes with no extensions and no origins configured, as `serve`
runs it: `Upgrade: websocket`, `Connection` naming `upgrade`, version 13, a key of 16
bytes in base64, subprotocols that are tokens.

Pure: bytes in, a value out, no socket.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import re
from dataclasses import dataclass
from urllib.parse import parse_qsl

PREFIX = b"GET /v1/rooms/"
GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"  # RFC 6455 section 1.3
# An HTTP token (RFC 9110 5.6.2): a header name, or one item of the Connection header.
_TOKEN = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
# A room id as Starlette's `{room_id}` matches it (no slash), with nothing to unescape.
_ROOM_PATH = re.compile(r"/v1/rooms/([^/%?#]+)/ws")
# Headers that must come once: with two, the long way decides.
_ONCE = frozenset((b"upgrade", b"connection", b"sec-websocket-key", b"sec-websocket-version", b"origin"))
# A request with a body is not a plain upgrade.
_BODY = frozenset((b"content-length", b"transfer-encoding"))


@dataclass(frozen=True, slots=True)
class RoomUpgrade:
    room_id: str
    # The last `token` of the query string, as Starlette's query_params gives it.
    token: str | None
    # Every Sec-WebSocket-Protocol item offered, in order.
    offered: tuple[str, ...]
    # The Sec-WebSocket-Accept answer to the client's key.
    accept: str


def head_end(data: bytes) -> int:
    """Where the request head ends in `data` (just past its blank line), or -1."""
    end = data.find(b"\r\n\r\n")
    return end + 4 if end >= 0 else -1


def parse(head: bytes) -> RoomUpgrade | None:
    """A plain room socket upgrade (`head` is the whole request head, blank line included), or
    None for anything else."""
    if not head.startswith(PREFIX) or not head.endswith(b"\r\n\r\n") or not head.isascii():
        return None
    lines = head[:-4].split(b"\r\n")
    parts = lines[0].split(b" ")
    if len(parts) != 3 or parts[2] != b"HTTP/1.1":
        return None
    target = parts[1].decode()
    path, _, query = target.partition("?")
    room = _ROOM_PATH.fullmatch(path)
    if room is None or "#" in query:
        return None
    fields: dict[bytes, bytes] = {}
    offered: list[str] = []
    for line in lines[1:]:
        name, colon, value = line.partition(b":")
        if not colon or not _TOKEN.fullmatch(name.decode()):
            return None  # no colon, a space before it, or a folded line: not plain
        key = name.lower()
        if key in _BODY or (key in _ONCE and key in fields):
            return None
        value = value.strip(b" \t")
        if key == b"sec-websocket-protocol":
            offered += [item.strip() for item in value.decode().split(",")]
        fields[key] = value
    if fields.get(b"upgrade", b"").lower() != b"websocket" or fields.get(b"sec-websocket-version") != b"13":
        return None
    if not all(_TOKEN.fullmatch(item) for item in offered):
        return None  # websockets refuses a malformed subprotocol list (400): the long way says so
    connection = [item.strip() for item in fields.get(b"connection", b"").decode().split(",")]
    if not all(_TOKEN.fullmatch(item) for item in connection):
        return None
    if "upgrade" not in (item.lower() for item in connection):
        return None
    nonce = fields.get(b"sec-websocket-key", b"")
    try:
        if len(nonce) != 24 or len(base64.b64decode(nonce, validate=True)) != 16:
            return None
    except binascii.Error:
        return None
    token: str | None = None
    for param, given in parse_qsl(query, keep_blank_values=True):
        if param == "token":
            token = given
    return RoomUpgrade(room.group(1), token, tuple(offered), accept_for(nonce))


def accept_for(key: bytes) -> str:
    return base64.b64encode(hashlib.sha1(key + GUID).digest()).decode()


def switching(upgrade: RoomUpgrade, subprotocol: str | None) -> bytes:
    """The 101 answer (a 1xx response needs no Date, RFC 9110 6.6.1)."""
    chosen = f"Sec-WebSocket-Protocol: {subprotocol}\r\n" if subprotocol else ""
    return (f"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            f"Sec-WebSocket-Accept: {upgrade.accept}\r\n{chosen}\r\n").encode()
