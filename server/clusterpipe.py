"""The lean pipeline over a Redis/Valkey Cluster: each command to the primary of its key's slot.

`FastPipe`'s interface (server/fastpipe.py), so the Lua batcher and the settler run on a
cluster unchanged. A batch is split by owning primary, each part goes out on that node's own
FastPipe, all parts at once, and the replies come back in the caller's order. Redirections
are followed here, never surfaced:

- MOVED: the slot has a new owner (a resharding finished, a failover): the map learns it and
  the command is sent there. MOVED and ASK mean the command did not run: resending is safe.
- ASK: the slot is being migrated and this key is already on the target: ASKING + the
  command to the target, this once.
- TRYAGAIN: a multi-key command (every script) whose keys are split by a migration in
  progress: sent again after a short wait, for up to ~150 ms, then `unavailable` (the client
  retries with the same id). Not longer: the whole batch, every slot's calls, waits with it.
- A connection lost, CLUSTERDOWN, a slot without a primary: the commands of that node come
  back as a ConnectionError (the outcome is unknown: the client retries with the same id,
  which replays a debit that did run) and the slot map is read again before the next batch.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Sequence
from typing import Any

import hiredis

from server.cluster import NoOwner, SlotMap, parse, slot_of
from server.fastpipe import Address, Arg, FastPipe, Pipe
from server.outage import Outage

log = logging.getLogger("giftstream.cluster")

# Rounds of redirections (MOVED, ASK, TRYAGAIN) one batch may take before a command is answered
# `unavailable`; TRYAGAIN waits 10 ms doubling between rounds, at most TRYAGAIN_ROUNDS of them.
MAX_ROUNDS = 8
TRYAGAIN_FIRST_S = 0.01
TRYAGAIN_ROUNDS = 4
# The slot map is read again in the background when it is older than this, asked or not.
MAP_MAX_AGE_S = 5.0
# After a replica did not acknowledge a WAIT in time, its primary's batches do not wait this long.
NO_WAIT_AFTER_LAG_S = 1.0
# Error replies that mean "this node cannot serve it now", not "the command failed".
_UNAVAILABLE = ("CLUSTERDOWN", "MASTERDOWN", "LOADING")
# Commands whose first key is not their first argument.
_SCRIPT = {"EVALSHA", "EVAL", "EVALSHA_RO", "EVAL_RO", "FCALL", "FCALL_RO"}
_STREAMS = {"XREADGROUP", "XREAD"}


def command_key(command: Sequence[Arg]) -> Arg:
    """The key a command is routed by (its first; every key of a call shares its hash tag)."""
    name = _text(command[0]).upper()
    if name in _SCRIPT:
        if int(command[2]) < 1:
            raise ValueError(f"{name} without keys cannot be routed in a cluster")
        return command[3]
    if name in _STREAMS:
        i = next(i for i, a in enumerate(command) if _text(a).upper() == "STREAMS")
        return command[i + 1]
    return command[1]


def _text(arg: Arg) -> str:
    return arg.decode() if isinstance(arg, bytes) else str(arg)


class ClusterPipe:
    sharded = True

    def __init__(self, url: str | list[Address], max_connections: int = 8, timeout_s: float = 10.0,
                 encoding: str | None = None, replica_acks: int = 0, replica_wait_ms: int = 100) -> None:
        self.map = SlotMap(parse(url) if isinstance(url, str) else url)
        # WAIT for this many replicas (at most as many as the primary has) behind each node's part
        # of a batch, up to replica_wait_ms: see Settings.cluster_replica_acks.
        self.replica_acks = replica_acks
        self.replica_wait_ms = replica_wait_ms
        self.replica_lags = 0
        # A node whose replica did not acknowledge in time is not waited for until then (monotonic
        # s): a replica in a full resync (seconds) would otherwise stall every batch 100 ms.
        self._no_wait_until: dict[tuple[str, int], float] = {}
        # A node unreachable is logged once, and its return once (its calls fail meanwhile).
        self._outages: dict[tuple[str, int], Outage] = {}
        self.lagging = Outage(log, "cluster replication", "replies go out unconfirmed by a replica; a failover "
                              "now may lose the newest writes")
        self.max_connections = max_connections
        self.timeout = timeout_s
        self.encoding = encoding
        self._pipes: dict[tuple[str, int], FastPipe] = {}
        # The map's version when a caller found it wrong: the next batch reads it again first.
        self._stale: int | None = None
        self.redirects = 0
        self._reading: asyncio.Future[None] | None = None

    @classmethod
    def like(cls, client: Any, *, max_connections: int = 8, encoding: str | None = None) -> ClusterPipe:
        """A pipeline to the cluster of a redis-py RedisCluster client."""
        kw = client.nodes_manager.connection_kwargs
        tls = "SSL" in getattr(kw.get("connection_class"), "__name__", "")
        seeds = [Address(n.host, n.port, 0, kw.get("username"), kw.get("password"), tls=tls)
                 for n in client.nodes_manager.startup_nodes.values()]
        return cls(seeds, max_connections=max_connections, encoding=encoding)

    def _pipe(self, addr: Address) -> FastPipe:
        pipe = self._pipes.get(addr.key)
        if pipe is None:
            pipe = self._pipes[addr.key] = FastPipe(addr, self.max_connections, self.timeout, self.encoding)
        return pipe

    async def _fresh_map(self) -> None:
        if self._stale is not None:
            stale, self._stale = self._stale, None
            with contextlib.suppress(Exception):  # still failing over: its commands fail as unavailable
                await self.map.refresh(seen=stale)
        if not self.map.loaded:
            await self.map.refresh()
        elif self.map.age > MAP_MAX_AGE_S and self._reading is None:
            # In the background: a replica that joined (so its primary's batches WAIT for it again),
            # a slot that moved without this node asking for it yet.
            self._reading = asyncio.ensure_future(self._read_map())

    async def _read_map(self) -> None:
        try:
            with contextlib.suppress(Exception):
                await self.map.refresh(seen=self.map.version)
        finally:
            self._reading = None

    def _mark_stale(self) -> None:
        if self._stale is None:
            self._stale = self.map.version

    async def execute(self, commands: Sequence[Sequence[Arg]]) -> list[Any]:
        replies: list[Any] = [None] * len(commands)
        try:
            await self._fresh_map()
        except Exception as exc:
            return [exc] * len(commands)
        pending = list(range(len(commands)))
        asking: dict[int, Address] = {}
        wait = TRYAGAIN_FIRST_S
        waits = 0
        for _round in range(MAX_ROUNDS):
            groups: dict[tuple[str, int], tuple[Address, list[int]]] = {}
            for i in pending:
                try:
                    addr = asking.get(i) or self.map.owner(slot_of(command_key(commands[i])))
                except NoOwner as exc:
                    replies[i] = exc
                    self._mark_stale()
                    continue
                groups.setdefault(addr.key, (addr, []))[1].append(i)
            parts = list(groups.values())
            results = await asyncio.gather(*(self._send(addr, idx, commands, asking) for addr, idx in parts),
                                           return_exceptions=True)
            asking = {}
            again: list[int] = []
            try_again = refresh = False
            for (addr, idx), result in zip(parts, results, strict=True):
                if isinstance(result, BaseException):
                    if not isinstance(result, Exception):
                        raise result
                    for i in idx:
                        replies[i] = result
                    self._mark_stale()
                    self._outage(addr).failed(result)
                    continue
                self._outage(addr).recovered()
                for i, reply in zip(idx, result, strict=True):
                    if not isinstance(reply, hiredis.ReplyError):
                        replies[i] = reply
                        continue
                    text = str(reply)
                    if text.startswith(("MOVED ", "ASK ")):
                        kind, slot, where = text.split(" ", 2)
                        host, _, port = where.rpartition(":")
                        self.redirects += 1
                        if kind == "MOVED":
                            self.map.moved(int(slot), host, int(port))
                            refresh = True
                        else:
                            asking[i] = self.map.address(host, int(port))
                        again.append(i)
                    elif text.startswith("TRYAGAIN"):
                        if waits < TRYAGAIN_ROUNDS:
                            try_again = True
                            again.append(i)
                        else:
                            replies[i] = ConnectionError("cluster: the slot is being moved (TRYAGAIN); retry")
                    elif text.startswith(_UNAVAILABLE):
                        replies[i] = ConnectionError(f"cluster: {text}")
                        self._mark_stale()
                    else:
                        replies[i] = reply
            if not again:
                return replies
            if refresh:
                self._mark_stale()
            if try_again:
                await asyncio.sleep(wait)
                wait *= 2
                waits += 1
            pending = sorted(again)
        for i in pending:
            replies[i] = ConnectionError("cluster: the slot kept moving (TRYAGAIN/MOVED); retry")
        return replies

    def _outage(self, addr: Address) -> Outage:
        outage = self._outages.get(addr.key)
        if outage is None:
            outage = self._outages[addr.key] = Outage(log, f"cluster node {addr.host}:{addr.port}",
                                                      "its slots' calls are answered unavailable")
        return outage

    async def _send(self, addr: Address, idx: list[int], commands: Sequence[Sequence[Arg]],
                    asking: dict[int, Address]) -> list[Any]:
        acks = min(self.replica_acks, self.map.replicas.get(addr.key, 0))
        if acks and self._no_wait_until.get(addr.key, 0.0) > time.monotonic():
            acks = 0
        if not asking and not acks:
            return await self._pipe(addr).execute([commands[i] for i in idx])
        out: list[Sequence[Arg]] = []
        picks: list[int] = []
        for i in idx:
            if i in asking:
                out.append(["ASKING"])
            picks.append(len(out))
            out.append(commands[i])
        if acks:
            out.append(["WAIT", acks, self.replica_wait_ms])
        replies = await self._pipe(addr).execute(out)
        if acks:
            self._replicated(addr, replies[-1], acks)
        return [replies[p] for p in picks]

    def _replicated(self, addr: Address, reply: Any, acks: int) -> None:
        if isinstance(reply, int) and reply >= acks:
            self.lagging.recovered()
            return
        self.replica_lags += 1
        self._no_wait_until[addr.key] = time.monotonic() + NO_WAIT_AFTER_LAG_S
        self._mark_stale()  # a replica that failed leaves the map: then no wait for it
        self.lagging.failed(ConnectionError(f"{addr.host}:{addr.port}: {reply!r} of {acks} replicas acknowledged"))

    async def everywhere(self, commands: Sequence[Sequence[Arg]]) -> list[list[Any]]:
        await self._fresh_map()
        results = await asyncio.gather(*(self._pipe(a).execute(commands) for a in self.map.primaries),
                                       return_exceptions=True)
        for result in results:
            if isinstance(result, BaseException):
                self._mark_stale()
                raise result
        return [r for r in results if not isinstance(r, BaseException)]

    async def aclose(self) -> None:
        if self._reading is not None:
            self._reading.cancel()
            await asyncio.gather(self._reading, return_exceptions=True)
        for pipe in self._pipes.values():
            await pipe.aclose()


def pipe_like(client: Any, *, max_connections: int = 8, encoding: str | None = None) -> Pipe:
    """The hot paths' pipeline to wherever a redis-py client goes: a FastPipe to its server, or a
    ClusterPipe to the primaries of its cluster, each command to its key's slot."""
    from redis.asyncio.cluster import RedisCluster

    if isinstance(client, RedisCluster):
        return ClusterPipe.like(client, max_connections=max_connections, encoding=encoding)
    return FastPipe.like(client, max_connections=max_connections, encoding=encoding)
