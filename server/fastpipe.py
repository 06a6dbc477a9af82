"""A lean Redis pipeline for the hot path: pre-packed RESP out, hiredis replies in.

Profiles of a gift storm put about a quarter of the gateway's CPU in redis-py's pipeline
(command packing and per-command bookkeeping). The group-committed Lua calls need none
of its features, so they go through this: one write of every command's RESP bytes, one
hiredis Reader for the replies, a small pool of connections so several batches can be in
flight. Everything else (pub/sub, admin, settlement) stays on redis-py.
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
from collections.abc import Sequence
from typing import Any, Protocol
from urllib.parse import quote, unquote, urlsplit

import hiredis
from redis.exceptions import ClusterDownError, SlotNotCoveredError, TryAgainError
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

Arg = bytes | str | int | float

# What Redis being unreachable or silent raises: the builtin errors of this pipeline and of the
# room bus's connection, and redis-py's own; with a cluster, also a slot without a primary (a
# failover under way) and a slot being moved (TRYAGAIN past redis-py's retries). Callers answer
# `unavailable`, never a 500: a retry with the same id is safe.
UNREACHABLE: tuple[type[Exception], ...] = (ConnectionError, TimeoutError, RedisConnectionError, RedisTimeoutError,
                                            ClusterDownError, TryAgainError, SlotNotCoveredError)


def pack(command: Sequence[Arg]) -> bytes:
    """One command in RESP, packed by hiredis in C (ints and floats as their decimal text)."""
    packed: bytes = hiredis.pack_command(tuple(command))  # type: ignore[arg-type]  # stub wants a 1-tuple
    return packed


class Address:
    __slots__ = ("db", "host", "password", "port", "tls", "username")

    def __init__(self, host: str, port: int, db: int, username: str | None, password: str | None,
                 tls: bool = False) -> None:
        self.host, self.port, self.db, self.username, self.password = host, port, db, username, password
        self.tls = tls

    @property
    def key(self) -> tuple[str, int]:
        return (self.host, self.port)

    def auth_command(self) -> list[Arg]:
        assert self.password is not None
        return ["AUTH", self.username, self.password] if self.username else ["AUTH", self.password]


def redis_address(url: str) -> Address:
    parts = urlsplit(url)
    if parts.scheme not in ("redis", "rediss", ""):
        raise ValueError(f"the lean Redis paths speak redis:// and rediss://, not {parts.scheme}://")
    return Address(parts.hostname or "127.0.0.1", parts.port or 6379, int(parts.path.lstrip("/") or 0),
                   unquote(parts.username) if parts.username else None,
                   unquote(parts.password) if parts.password else None, tls=parts.scheme == "rediss")


class _Conn:
    __slots__ = ("reader", "writer", "parser")

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                 encoding: str | None = None) -> None:
        self.reader, self.writer = reader, writer
        # With an encoding, bulk strings come back decoded (in C) instead of as bytes.
        self.parser = hiredis.Reader(encoding=encoding) if encoding else hiredis.Reader()

    async def roundtrip(self, payload: bytes, n: int) -> list[Any]:
        self.writer.write(payload)
        replies: list[Any] = []
        while len(replies) < n:
            reply = self.parser.gets()
            if reply is False:
                data = await self.reader.read(1 << 16)
                if not data:
                    raise ConnectionError("Redis closed the connection")
                self.parser.feed(data)
                continue
            replies.append(reply)
        return replies

    def close(self) -> None:
        self.writer.close()


class Pipe(Protocol):
    """What the hot paths send through: `FastPipe` to one server, `ClusterPipe` (clusterpipe.py)
    to the primaries of a cluster, each command to its key's slot."""

    async def execute(self, commands: Sequence[Sequence[Arg]]) -> list[Any]:
        """Replies in order. An error reply comes back as a hiredis.ReplyError; a command whose
        outcome is unknown (its connection was lost) raises, or with a cluster comes back as the
        exception, so the other nodes' replies still count."""
        ...

    async def everywhere(self, commands: Sequence[Sequence[Arg]]) -> list[list[Any]]:
        """The same commands on every primary (SCRIPT LOAD): one reply list per primary."""
        ...

    async def aclose(self) -> None: ...

    # True when commands go to several servers by slot: a command may not span slots (CROSSSLOT).
    sharded: bool


class FastPipe:
    sharded = False

    def __init__(self, url: str | Address, max_connections: int = 8, timeout_s: float = 10.0,
                 encoding: str | None = None) -> None:
        addr = url if isinstance(url, Address) else redis_address(url)
        self.host, self.port, self.db = addr.host, addr.port, addr.db
        self.username, self.password = addr.username, addr.password
        self.tls = addr.tls
        self.timeout = timeout_s
        self.encoding = encoding
        self._idle: list[_Conn] = []
        self._slots = asyncio.Semaphore(max_connections)

    @classmethod
    def like(cls, client: Any, *, max_connections: int = 8, encoding: str | None = None) -> FastPipe:
        """A pipeline to the same server as a (single-server) redis-py client; `clusterpipe.pipe_like`
        picks this or a ClusterPipe for any client."""
        kw = client.connection_pool.connection_kwargs
        auth = ""
        if kw.get("password"):
            auth = f"{quote(kw.get('username') or '', safe='')}:{quote(kw['password'], safe='')}@"
        return cls(f"redis://{auth}{kw.get('host', '127.0.0.1')}:{kw.get('port', 6379)}/{kw.get('db', 0)}",
                   max_connections=max_connections, encoding=encoding)

    async def _connect(self) -> _Conn:
        context = ssl.create_default_context() if self.tls else None
        reader, writer = await asyncio.wait_for(asyncio.open_connection(self.host, self.port, ssl=context),
                                                self.timeout)
        conn = _Conn(reader, writer, self.encoding)
        hello: list[list[Arg]] = []
        if self.password is not None:
            hello.append(["AUTH", self.username, self.password] if self.username else ["AUTH", self.password])
        if self.db:
            hello.append(["SELECT", self.db])
        if hello:
            for reply in await conn.roundtrip(b"".join(pack(c) for c in hello), len(hello)):
                if isinstance(reply, hiredis.ReplyError):
                    conn.close()
                    raise ConnectionError(f"Redis refused the connection setup: {reply}")
        return conn

    async def execute(self, commands: Sequence[Sequence[Arg]]) -> list[Any]:
        """Replies in order; an error reply comes back as a hiredis.ReplyError, not raised."""
        async with self._slots:
            conn = self._idle.pop() if self._idle else await self._connect()
            try:
                replies = await asyncio.wait_for(
                    conn.roundtrip(b"".join(pack(c) for c in commands), len(commands)), self.timeout)
            except BaseException:
                # Unknown state (partial replies, cancelled mid-read): never reuse this connection.
                conn.close()
                raise
            self._idle.append(conn)
            return replies

    async def everywhere(self, commands: Sequence[Sequence[Arg]]) -> list[list[Any]]:
        return [await self.execute(commands)]

    async def aclose(self) -> None:
        while self._idle:
            conn = self._idle.pop()
            with contextlib.suppress(Exception):
                conn.close()
                await conn.writer.wait_closed()


def is_noscript(reply: Any) -> bool:
    return isinstance(reply, hiredis.ReplyError) and str(reply).startswith("NOSCRIPT")
