"""Limits uvicorn does not keep, kept in its protocols: headers, idle sockets, peers, pongs.

uvicorn runs the httptools parser here, which takes a header of any size (an 8 MB one was
accepted whole) and has no deadline for a request's head: a silent connection or a slowloris
that sends a byte now and then was held open forever (its `timeout_keep_alive` only runs
between two requests). Its websockets protocol writes the pong of every ping straight to the
transport, outside any cap: pings from a peer that never reads grew the server by 80 MB.

`GuardedHttpProtocol` and `GuardedWebSocketProtocol` are uvicorn's own protocols with those
limits added (`serve` passes them as `http=` and `ws=`); a socket taken over after its join
(rooms/takeover.py) keeps the send-buffer cap in `RoomProtocol`. The limits are set once per
process from the settings (`configure`), as uvicorn builds its protocols itself.

A connection starts as a `FirstBytes`, which only waits for its first bytes: a plain room
socket request (rooms/handshake.py) goes through the node's fast door (rooms/door.py) from
there, past uvicorn's upgrade, websockets' second parse and the ASGI layers, and never builds
an HTTP protocol; anything else is handed to a `GuardedHttpProtocol` with those bytes, as if
it had been there from the start. The file and per-address caps and the head deadline are
kept from the first byte either way; the door is opened by the node of this process once it
runs (`open_door`).
"""

from __future__ import annotations

import asyncio
import functools
import ipaddress
import json
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol
from uvicorn.protocols.websockets.websockets_sansio_impl import WebSocketsSansIOProtocol

from server import errors
from server.codes import HTTP_STATUS, Err, GiftstreamError
from server.rooms.handshake import PREFIX, RoomUpgrade, head_end, parse
from server.settings import Settings

log = logging.getLogger("giftstream.guard")

# Seconds a socket refused as a slow consumer has to take its close frame before it is dropped.
CLOSE_GRACE_S = 2.0
# New connections between two sweeps of the per-address table (peers that left for good).
SWEEP_EVERY = 1024


@dataclass
class Limits:
    header_bytes: int = 64 * 1024
    header_timeout_s: float = 10.0
    per_ip: int = 0
    per_ip_loopback: bool = False
    send_buffer_cap: int = 1 << 20
    # A connection whose file descriptor is this number or more is refused (0: never): this
    # process is nearly out of open files (see `configure`).
    max_fd: int = 0


LIMITS = Limits()


def configure(settings: Settings) -> None:
    """The limits of this process's protocols (one per process: uvicorn makes the protocols)."""
    global LIMITS
    LIMITS = Limits(settings.http_max_header_bytes, settings.http_header_timeout_s,
                    settings.max_connections_per_ip, settings.ip_cap_loopback, settings.send_buffer_cap,
                    _max_fd(settings.files_reserved))


def _max_fd(reserved: int) -> int:
    """The highest descriptor a connection may have. The kernel hands out the lowest free one, so
    a connection's number is about how many files the process holds: past the soft limit less
    `reserved` (Redis, the ledger, logs) it is refused with 503, so that one process of
    `serve --workers N` that the shared accept queue gave more than its share never runs out of
    files for its Redis connections, and the client tries again (another worker, likely)."""
    import resource

    soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    if soft == resource.RLIM_INFINITY or reserved <= 0:
        return 0
    return max(1, soft - reserved)


class PeerTable:
    """Open connections per peer address, HTTP and WebSocket alike. A connection counts until
    its transport closes, whichever protocol then owns it (uvicorn's, or a taken-over room's)."""

    def __init__(self) -> None:
        self.by_ip: dict[str, set[asyncio.BaseTransport]] = {}
        self._since_sweep = 0

    def admit(self, ip: str, transport: asyncio.BaseTransport, cap: int) -> bool:
        self._since_sweep += 1
        if self._since_sweep >= SWEEP_EVERY:
            self._since_sweep = 0
            for key in list(self.by_ip):
                self._prune(key)
        live = self.by_ip.setdefault(ip, set())
        if len(live) >= cap:
            self._prune(ip)
            live = self.by_ip.setdefault(ip, set())
            if len(live) >= cap:
                return False
        live.add(transport)
        return True

    def _prune(self, ip: str) -> None:
        live = {t for t in self.by_ip.get(ip, ()) if not t.is_closing()}
        if live:
            self.by_ip[ip] = live
        else:
            self.by_ip.pop(ip, None)

    def count(self, ip: str) -> int:
        self._prune(ip)
        return len(self.by_ip.get(ip, ()))


PEERS = PeerTable()


def _fd_of(transport: asyncio.BaseTransport) -> int:
    sock = transport.get_extra_info("socket")
    try:
        return int(sock.fileno()) if sock is not None else -1
    except (OSError, ValueError):
        return -1

# The node's fast door for room sockets (rooms/door.py): it takes the connection, its plain
# upgrade request read, and the bytes the client sent after the request head.
Door = Callable[[asyncio.Transport, RoomUpgrade, bytes], None]
DOOR: Door | None = None


def open_door(door: Door | None) -> None:
    """Room sockets of this process go through `door` from now on (None: through uvicorn)."""
    global DOOR
    DOOR = door


@functools.lru_cache(maxsize=4096)
def _is_loopback(ip: str) -> bool:
    try:
        return ipaddress.ip_address(ip).is_loopback
    except ValueError:
        return False


def http_refusal(code: Err, message: str) -> bytes:
    """A whole HTTP/1.1 answer with the one error body, for refusals made below the app."""
    _, body = errors.http_status_and_body(GiftstreamError(code, message))
    raw = json.dumps(body, separators=(",", ":")).encode()
    status = HTTP_STATUS[code]
    reason = {413: "Content Too Large", 429: "Too Many Requests",
              431: "Request Header Fields Too Large"}.get(status, "Error")
    return (f"HTTP/1.1 {status} {reason}\r\ncontent-type: application/json\r\n"
            f"content-length: {len(raw)}\r\nconnection: close\r\n\r\n").encode() + raw


def _refusal_at_connect(transport: asyncio.Transport) -> tuple[Err, str] | None:
    """Why a new connection is refused: this process is near its file limit, or its peer
    address is at its connection cap (None: admitted, and counted against its address)."""
    limits = LIMITS
    if limits.max_fd and _fd_of(transport) >= limits.max_fd:
        return Err.UNAVAILABLE, "this server process is full; connect again"
    if limits.per_ip <= 0:
        return None
    peer = transport.get_extra_info("peername")
    ip = str(peer[0]) if isinstance(peer, (tuple, list)) and peer else ""
    if (limits.per_ip_loopback or not _is_loopback(ip)) and not PEERS.admit(ip, transport, limits.per_ip):
        return Err.TOO_MANY_CONNECTIONS, "too many connections from this address"
    return None


class FirstBytes(asyncio.Protocol):
    """A connection until its first bytes (`serve` passes this class as uvicorn's `http=`).

    A room socket's plain upgrade request goes to the fast door; anything else, and a refusal,
    to a GuardedHttpProtocol made then, which gets the connection and the bytes as uvicorn
    would have given them. A join storm so builds no HTTP protocol a socket: uvicorn's parser,
    flow control, address lookups and connection tracking were about a tenth of a join's
    gateway CPU. The head deadline runs from the connection's start either way."""

    __slots__ = ("_http", "deadline", "head_timer", "loop", "transport")

    def __init__(self, **http: Any) -> None:
        self._http = http  # what uvicorn makes its HTTP protocol with
        self.loop: asyncio.AbstractEventLoop = http.get("_loop") or asyncio.get_event_loop()
        self.transport: asyncio.Transport | None = None
        self.head_timer: asyncio.TimerHandle | None = None
        self.deadline: float | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        self.transport = transport
        refusal = _refusal_at_connect(transport)
        if refusal is not None:
            self._hand_over(b"", refusal)
            return
        if LIMITS.header_timeout_s > 0:
            self.deadline = self.loop.time() + LIMITS.header_timeout_s
            self.head_timer = self.loop.call_at(self.deadline, transport.close)

    def data_received(self, data: bytes) -> None:
        door = DOOR
        if door is not None and data.startswith(PREFIX) and self._through_door(door, data):
            return
        self._hand_over(data)

    def eof_received(self) -> bool | None:
        self._hand_over(b"")
        http = self.transport.get_protocol() if self.transport is not None else None
        return http.eof_received() if isinstance(http, asyncio.Protocol) else None

    def connection_lost(self, exc: Exception | None) -> None:
        self._stop()

    def _stop(self) -> None:
        if self.head_timer is not None:
            self.head_timer.cancel()
            self.head_timer = None

    def _through_door(self, door: Door, data: bytes) -> bool:
        """A plain room socket request, whole in the connection's first bytes: the door takes
        the connection. False: it goes the HTTP way."""
        transport = self.transport
        assert transport is not None
        end = head_end(data)
        if end < 0 or end > LIMITS.header_bytes or transport.is_closing():
            return False
        upgrade = parse(data[:end])
        if upgrade is None:
            return False
        self._stop()
        try:
            door(transport, upgrade, data[end:])
        except Exception:
            log.exception("room socket failed at the door")
            transport.abort()
        return True

    def _hand_over(self, data: bytes, refusal: tuple[Err, str] | None = None) -> None:
        """The connection is a GuardedHttpProtocol's from now on, as if from its start (which
        answers the refusal, if any)."""
        transport = self.transport
        assert transport is not None
        self._stop()
        http = GuardedHttpProtocol(**self._http)
        transport.set_protocol(http)
        http.connection_made(transport)
        if refusal is not None:
            http._refuse(*refusal)
            return
        # The head's time counts from the connection's start.
        http._start_head_timer(self.deadline)
        if data:
            http.data_received(data)


class GuardedHttpProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol, with a cap on a request head's size and time (made by
    FirstBytes, which admits the connection against the file and per-address caps)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        # Bytes of the current request's head so far; None once its headers are complete.
        self.head_bytes: int | None = 0
        self.head_timer: asyncio.TimerHandle | None = None
        # Refused (431, 429, 503): what the client still sends is read and dropped (_refuse).
        self.refused = False

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        # Admitted or refused by FirstBytes (_refusal_at_connect), which made this protocol.
        super().connection_made(transport)

    def connection_lost(self, exc: Exception | None) -> None:
        self._stop_head_timer()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self.refused:
            return
        if self.head_bytes is None:
            super().data_received(data)
            return
        if self.head_timer is None:
            self._start_head_timer()  # the first byte of the next request on a kept-alive connection
        room = LIMITS.header_bytes - self.head_bytes
        if len(data) <= room:
            self.head_bytes += len(data)
            super().data_received(data)
            return
        # Only as much as the limit allows is parsed: a head that is still not complete then is
        # refused, whatever else the client has sent.
        self.head_bytes += room
        super().data_received(data[:room])
        if self.head_bytes is not None:
            if not self.transport.is_closing():
                self._refuse(Err.HEADERS_TOO_LARGE, f"request head larger than {LIMITS.header_bytes} bytes")
            return
        rest = data[room:]
        owner = self.transport.get_protocol()
        if owner is self:
            super().data_received(rest)
        elif isinstance(owner, asyncio.Protocol):  # upgraded to a WebSocket within this read
            owner.data_received(rest)

    def on_headers_complete(self) -> None:
        self.head_bytes = None
        self._stop_head_timer()
        super().on_headers_complete()

    def on_message_complete(self) -> None:
        super().on_message_complete()
        self.head_bytes = 0  # what comes next is the head of the next request

    def _start_head_timer(self, deadline: float | None = None) -> None:
        """The request head must be whole by `deadline` (loop time; default: the limit from now)."""
        self._stop_head_timer()
        if deadline is not None:
            self.head_timer = self.loop.call_at(deadline, self._head_timeout)
        elif LIMITS.header_timeout_s > 0:
            self.head_timer = self.loop.call_later(LIMITS.header_timeout_s, self._head_timeout)

    def _stop_head_timer(self) -> None:
        if self.head_timer is not None:
            self.head_timer.cancel()
            self.head_timer = None

    def _head_timeout(self) -> None:
        """A request head not complete in time (a silent connection, a slowloris): dropped."""
        self.head_timer = None
        if self.head_bytes is not None and not self.transport.is_closing():
            self.transport.close()

    def _refuse(self, code: Err, message: str) -> None:
        self._stop_head_timer()
        self.head_bytes = None
        self.refused = True
        self.transport.write(http_refusal(code, message))
        # A lingering close, as web servers do: the client may still be sending (the rest of an
        # 8 MB head). Closed with its bytes unread, the socket sends a reset, and a reset makes
        # the client's kernel drop our answer before the client reads it (seen as a bare close
        # in a loaded test run). So our side ends here, what still comes is read and dropped,
        # and the connection closes when the client closes it, or after a grace period.
        if self.transport.can_write_eof():
            self.transport.write_eof()
            self.loop.call_later(CLOSE_GRACE_S, self._drop)
        else:
            self.transport.close()

    def _drop(self) -> None:
        if not self.transport.is_closing():
            self.transport.abort()


class GuardedWebSocketProtocol(WebSocketsSansIOProtocol):
    """uvicorn's websockets protocol whose pongs count against `send_buffer_cap` (a socket that
    stays with uvicorn: before its join is done, or with GIFTSTREAM_TAKEOVER=0)."""

    def handle_ping(self) -> None:
        if self.close_sent:
            self.conn.data_to_send()  # a pong after our close frame: nobody needs it
            return
        super().handle_ping()
        if self.transport.get_write_buffer_size() > LIMITS.send_buffer_cap:
            self.close_slow()

    def close_slow(self) -> None:
        """Close as a slow consumer (4008) and stop reading; dropped after a grace period."""
        code, reason = errors.closing(errors.SLOW_CONSUMER)
        self.conn.send_close(code, reason)
        self.transport.write(b"".join(self.conn.data_to_send()))
        self.close_sent = True
        self.queue.put_nowait({"type": "websocket.disconnect", "code": code, "reason": reason})
        self.transport.pause_reading()
        self.loop.call_later(CLOSE_GRACE_S, self.transport.abort)
