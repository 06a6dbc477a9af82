"""Redis/Valkey Cluster mode: the redis+cluster:// URL, the redis-py client, and the slot map.

`--redis-url redis+cluster://host:port[,host:port...]` (rediss+cluster:// for TLS) selects
cluster mode; any reachable node of the list finds the rest. Every key a script touches
carries one hash tag (server/keys.py), so each call has one slot and goes to that slot's
primary: redis-py's RedisCluster for ordinary commands, and for the hot paths (the Lua
pipeline, the settler's reads, the room bus) a `SlotMap` of our own, refreshed after a
MOVED, a lost connection or a failover.
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
import time
from collections.abc import AsyncIterator, Callable
from typing import Any, cast
from urllib.parse import unquote

import hiredis
from redis.asyncio import Redis
from redis.asyncio.cluster import ClusterNode, RedisCluster
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialBackoff
from redis.crc import key_slot as _crc_slot

from server.fastpipe import UNREACHABLE, Address, pack

SCHEMES = ("redis+cluster", "rediss+cluster")
SLOTS = 16384


def is_cluster(url: str | None) -> bool:
    return bool(url) and str(url).split("://", 1)[0].lower() in SCHEMES


def parse(url: str) -> list[Address]:
    """The nodes of a redis+cluster:// URL, each with the URL's credentials and TLS flag.

    redis+cluster://[user:password@]host:port[,host:port...][/0]: a cluster has one database, 0.
    """
    scheme, _, rest = url.partition("://")
    if scheme.lower() not in SCHEMES:
        raise ValueError(f"not a cluster URL: {scheme}://")
    netloc, _, path = rest.partition("/")
    if path.split("?", 1)[0] not in ("", "0"):
        raise ValueError("a Redis Cluster has only database 0")
    auth, _, hosts = netloc.rpartition("@")
    username = password = None
    if auth:
        user, sep, pw = auth.partition(":")
        username, password = (unquote(user) or None, unquote(pw)) if sep else (None, unquote(user))
    tls = scheme.lower().startswith("rediss")
    nodes = []
    for item in filter(None, hosts.split(",")):
        host, _, port = item.rpartition(":")
        if not host or not port.isdigit():
            raise ValueError(f"cluster node {item!r} is not host:port")
        nodes.append(Address(host.strip("[]"), int(port), 0, username, password, tls=tls))
    if not nodes:
        raise ValueError("a cluster URL names at least one node")
    return nodes


def redis_client(url: str, *, decode: bool) -> Redis:
    """redis-py's cluster client for ordinary commands (reads, admin, settlement's claims).

    Typed as `Redis`: every command this project sends through it has a cluster form, with the
    keys of one slot per transaction (hash tags). It follows MOVED and ASK itself and rebuilds
    its slot map after a connection error; its six retries, 50 ms doubling to 1 s apart (~2.5 s),
    ride out most of a failover (2-4 s of an unreachable primary; past them, `unavailable`), and
    everything sent here is idempotent (node.py)."""
    nodes = parse(url)
    first = nodes[0]
    client = ClusterClient(
        startup_nodes=[ClusterNode(n.host, n.port) for n in nodes], decode_responses=decode,
        username=first.username, password=first.password, ssl=first.tls,
        # Per node; the cluster client refuses (MaxConnectionsError) rather than waits past it.
        max_connections=256, socket_keepalive=True, socket_connect_timeout=5, socket_timeout=10,
        retry=Retry(ExponentialBackoff(cap=1.0, base=0.05), 6),
        require_full_coverage=True)
    return cast(Redis, client)


@contextlib.asynccontextmanager
async def node_client(redis: Redis, key: str) -> AsyncIterator[Redis]:
    """A plain client on the primary serving `key`'s slot (`redis` itself when not a cluster), for
    MULTI/EXEC and WATCH on the keys of that slot: redis-py 8.1's async cluster transactions ran
    part of their I/O on another event loop and failed on the second partition. Rare admin reads
    and writes only (audit, rebuild, requeue): a client per use is cheap enough there."""
    if not isinstance(redis, RedisCluster):
        yield redis
        return
    await redis.initialize()  # its slot map (a no-op once it has one)
    node = redis.get_node_from_key(key)
    kw = redis.nodes_manager.connection_kwargs
    client = Redis(host=node.host, port=node.port, username=kw.get("username"), password=kw.get("password"),
                   decode_responses=bool(kw.get("decode_responses")), socket_timeout=10, socket_connect_timeout=5,
                   ssl="SSL" in getattr(kw.get("connection_class"), "__name__", ""))
    try:
        yield client
    finally:
        await client.aclose()


class ClusterClient(RedisCluster):
    """redis-py's cluster client, with MULTI/EXEC pipelines that work (see `node_client`)."""

    def pipeline(self, transaction: Any | None = None, shard_hint: Any | None = None) -> Any:
        if transaction:
            return _NodeTransaction(self)
        return super().pipeline(None, shard_hint)


class _NodeTransaction:
    """`pipeline(transaction=True)` on a cluster: the calls are noted, then sent as one MULTI/EXEC
    to the primary serving the first call's key (every key of a transaction shares its slot, as
    every key of a script does). Queued calls only (no WATCH: use `node_client` for that)."""

    def __init__(self, cluster: RedisCluster) -> None:
        self._cluster = cluster
        self._calls: list[tuple[str, tuple[Any, ...], dict[str, Any]]] = []

    def __getattr__(self, name: str) -> Callable[..., _NodeTransaction]:
        def note(*args: Any, **kwargs: Any) -> _NodeTransaction:
            self._calls.append((name, args, kwargs))
            return self

        return note

    async def execute(self, raise_on_error: bool = True) -> list[Any]:
        calls, self._calls = self._calls, []
        if not calls:
            return []
        async with node_client(cast(Redis, self._cluster), calls[0][1][0]) as node:
            pipe = node.pipeline(transaction=True)
            for name, args, kwargs in calls:
                getattr(pipe, name)(*args, **kwargs)
            return await pipe.execute(raise_on_error)

    async def __aenter__(self) -> _NodeTransaction:
        return self

    async def __aexit__(self, *exc: object) -> None:
        self._calls.clear()


def slot_of(key: str | bytes | int | float) -> int:
    return int(_crc_slot(key if isinstance(key, bytes) else str(key).encode()))


async def open_connection(addr: Address, timeout: float) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """A raw connection to one node (TLS when the URL said rediss+cluster://)."""
    context = ssl.create_default_context() if addr.tls else None
    return await asyncio.wait_for(asyncio.open_connection(addr.host, addr.port, ssl=context), timeout)


async def ask(addr: Address, command: list[Any], timeout: float = 5.0) -> Any:
    """One command on a fresh connection (after AUTH when the URL has credentials)."""
    reader, writer = await open_connection(addr, timeout)
    try:
        commands = ([addr.auth_command()] if addr.password is not None else []) + [command]
        writer.write(b"".join(pack(c) for c in commands))
        parser = hiredis.Reader()
        replies: list[Any] = []
        while len(replies) < len(commands):
            reply = parser.gets()
            if reply is False:
                data = await asyncio.wait_for(reader.read(1 << 16), timeout)
                if not data:
                    raise ConnectionError("cluster node closed the connection")
                parser.feed(data)
                continue
            if isinstance(reply, hiredis.ReplyError):
                raise ConnectionError(f"cluster node {addr.host}:{addr.port} refused {command[0]}: {reply}")
            replies.append(reply)
        return replies[-1]
    finally:
        writer.close()


class NoOwner(ConnectionError):
    """No reachable primary serves this slot now (a failover under way): `unavailable`."""


class SlotMap:
    """Which primary serves each of the 16,384 slots, as CLUSTER SLOTS of any reachable node says.

    Refreshed when a caller found it wrong (a MOVED, a connection to a primary lost, a slot
    nobody serves): one refresh at a time, and no more often than every `min_interval_s`, so a
    failover in progress is not asked about in a tight loop."""

    def __init__(self, seeds: list[Address], min_interval_s: float = 0.1) -> None:
        self.seeds = seeds
        self.min_interval = min_interval_s
        self._owner: list[Address | None] = []
        self.primaries: list[Address] = []
        # Replicas each primary has, as the map says (CLUSTER SLOTS lists the ones not failed).
        self.replicas: dict[tuple[str, int], int] = {}
        self.version = 0
        self.refreshes = 0
        self._lock: asyncio.Lock | None = None
        self._at = 0.0

    @property
    def loaded(self) -> bool:
        return bool(self._owner)

    @property
    def age(self) -> float:
        """Seconds since the map was last read."""
        return time.monotonic() - self._at

    def owner(self, slot: int) -> Address:
        addr = self._owner[slot] if self._owner else None
        if addr is None:
            raise NoOwner(f"no primary serves slot {slot} now")
        return addr

    def owner_of(self, key: str | bytes) -> Address:
        return self.owner(slot_of(key))

    def moved(self, slot: int, host: str, port: int) -> None:
        """A MOVED reply named the slot's owner: use it at once (a full refresh follows)."""
        if self._owner:
            self._owner[slot] = self.address(host, port)

    async def ensure(self) -> None:
        if not self._owner:
            await self.refresh()

    async def refresh(self, seen: int | None = None) -> None:
        """Read the map again, unless another caller did since `seen` (its version when it
        found the map wrong)."""
        if self._lock is None:
            self._lock = asyncio.Lock()
        async with self._lock:
            if seen is not None and seen != self.version:
                return
            wait = self._at + self.min_interval - time.monotonic()
            if wait > 0:
                await asyncio.sleep(wait)
            self._at = time.monotonic()
            reply = await self._read()
            owner: list[Address | None] = [None] * SLOTS
            primaries: dict[tuple[str, int], Address] = {}
            replicas: dict[tuple[str, int], int] = {}
            for entry in reply:
                first, last, primary = int(entry[0]), int(entry[1]), entry[2]
                host = primary[0].decode() if isinstance(primary[0], bytes) else str(primary[0])
                addr = primaries.setdefault((host, int(primary[1])), self.address(host, int(primary[1])))
                replicas[addr.key] = len(entry) - 3
                owner[first : last + 1] = [addr] * (last - first + 1)
            self._owner, self.primaries, self.replicas = owner, list(primaries.values()), replicas
            self.version += 1
            self.refreshes += 1

    async def _read(self) -> Any:
        # The primaries we know first (they answer with the newest view), then the URL's nodes.
        tried: set[tuple[str, int]] = set()
        last: Exception | None = None
        for addr in [*self.primaries, *self.seeds]:
            if (addr.host, addr.port) in tried:
                continue
            tried.add((addr.host, addr.port))
            try:
                reply = await ask(addr, ["CLUSTER", "SLOTS"], timeout=2.0)
            except UNREACHABLE as exc:
                last = exc
                continue
            if reply:
                return reply
        raise ConnectionError(f"no cluster node answered CLUSTER SLOTS ({type(last).__name__ if last else 'empty'})")

    def address(self, host: str, port: int) -> Address:
        seed = self.seeds[0]
        # A node that announces no address is reached at the address we asked it on.
        return Address(host or seed.host, port, 0, seed.username, seed.password, tls=seed.tls)
