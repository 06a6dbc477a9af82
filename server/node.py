"""One gateway node: every long-lived part, started and stopped in order."""

from __future__ import annotations

import asyncio
import logging
import os
import socket
from functools import partial
from typing import Any

from redis.asyncio import BlockingConnectionPool, Redis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

from server import catalog as catalog_mod
from server import cluster, errors, guard
from server.batcher import ScriptBatcher
from server.clusterpipe import ClusterPipe
from server.creators.video_gifts import VideoGifts
from server.embedded import Embedded
from server.fastpipe import FastPipe, Pipe
from server.gifts import Gifts
from server.payments.recharges import Recharges
from server.payments.sandbox import SandboxProvider
from server.payments.sweep import PaymentSweep
from server.payments.webhooks import Webhooks
from server.rooms import door
from server.rooms.bus import Bus
from server.rooms.hub import Hub, catch_up_from
from server.rooms.lifecycle import Lifecycle
from server.rooms.presence import Presence
from server.rooms.shardbus import ShardedBus
from server.rooms.state import Rooms
from server.rooms.takeover import Keepalive, RoomProtocol
from server.rooms.wallet_events import WalletEvents
from server.scripts import Scripts
from server.settings import Settings
from server.settlement.settler import Settler, ensure_groups
from server.store import open_store
from server.store.base import Store
from server.wallet.service import Wallet

log = logging.getLogger("giftstream.node")


def redis_client(url: str, *, decode: bool) -> Redis:
    if cluster.is_cluster(url):
        return cluster.redis_client(url, decode=decode)
    # A blocking pool: a burst of joins waits for a connection instead of failing.
    # One retry on a fresh connection: after an outage the pool still holds connections made
    # before it, and a request should not fail on one of those. Safe because everything this
    # client sends is idempotent (reads, HSET of given values, XGROUP CREATE, XAUTOCLAIM);
    # coin movements are Lua calls on the lean pipeline, never sent here.
    # Socket timeouts: a peer that went silent (half-open connection) fails a request, not hangs it.
    pool = BlockingConnectionPool.from_url(url, decode_responses=decode, health_check_interval=30,
                                           socket_keepalive=True, max_connections=64, timeout=20,
                                           socket_connect_timeout=10, socket_timeout=10,
                                           retry=Retry(NoBackoff(), 1))
    return Redis(connection_pool=pool)


class Node:
    def __init__(self, settings: Settings, embedded: Embedded | None = None) -> None:
        assert settings.redis_url, "resolve the Redis URL (embedded or given) before building a node"
        assert settings.secret
        self.settings = settings
        self.embedded = embedded
        self.redis = redis_client(settings.redis_url, decode=True)
        self.redis_bin = redis_client(settings.redis_url, decode=False)
        self.store: Store = open_store(settings.effective_database_url)
        guard.configure(settings)  # the limits of this process's HTTP and WebSocket protocols
        clustered = cluster.is_cluster(settings.redis_url)
        self.scripts = Scripts(sharded_pubsub=clustered)
        # On a cluster, each call to the primary of its slot (clusterpipe.py).
        self.fastpipe: Pipe = (ClusterPipe(settings.redis_url, replica_acks=settings.cluster_replica_acks,
                                           replica_wait_ms=settings.cluster_replica_wait_ms)
                               if clustered else FastPipe(settings.redis_url))
        self.batcher = ScriptBatcher(self.redis, self.scripts, self.fastpipe, max_inflight=settings.redis_inflight)
        self.catalog = catalog_mod.load()
        self.wallet = Wallet(self.redis, self.batcher, settings)
        self.rooms = Rooms(self.redis_bin, self.batcher, settings)
        self.hub = Hub(settings.tick_ms, settings.pass_slice, settings.fanout_slice_ms, settings.fanout_share,
                       per_user_room=settings.max_sockets_per_user_room, per_user=settings.max_sockets_per_user,
                       writes_per_s=settings.fanout_writes_per_s / max(1, settings.workers))
        # On a cluster, sharded pub/sub: a room's events reach only the nodes with viewers in it.
        self.bus: Bus | ShardedBus = (ShardedBus if clustered else Bus)(settings.redis_url, self.hub.deliver,
                                                                         catch_up=self.catch_up)
        self.wallet_events = WalletEvents(settings.redis_url, self.hub)
        self.presence = Presence(self.redis, self.hub, self.rooms, settings.node_id, settings.presence_interval_s)
        # Rooms open and end (one live room per host, the idle end, the session's figures) here.
        self.lifecycle = Lifecycle(self.redis, self.rooms, self.store, settings)
        self.gifts = Gifts(settings, self.catalog, self.wallet, self.rooms, self.hub)
        self.video_gifts = VideoGifts(settings, self.catalog, self.wallet, self.store)
        self.recharges = Recharges(self.store, self.wallet, self.catalog, SandboxProvider())
        self.webhooks = Webhooks(self.recharges, settings.webhook_secret)
        self.payment_sweep = PaymentSweep(self.recharges, settings.payment_expiry_s)
        self.hub.on_first_join = self.bus.subscribe
        self.hub.on_last_leave = self._room_emptied
        # Stable across restarts of a single process, so it finds its own pending entries at once;
        # worker processes of one port each need their own name.
        consumer = f"{socket.gethostname()}:{settings.port}"
        if settings.workers > 1:
            consumer += f":{os.getpid()}"
        self.settler = Settler.from_settings(self.redis, self.store, settings, consumer=consumer)
        # Room sockets taken over from uvicorn, for the node-wide keepalive.
        self.sockets: set[RoomProtocol] = set()
        self.keepalive = Keepalive(lambda: self.sockets, settings.ping_interval_s, settings.ping_timeout_s)
        self.draining = False
        self.inflight: set[asyncio.Task[Any]] = set()

    async def start(self) -> None:
        if self.settings.migrate_on_start:
            await self.store.migrate()
        await self.scripts.load(self.redis)
        await ensure_groups(self.redis, self.settings.partitions)
        await self.wallet.start()
        self.bus.start()
        self.wallet_events.start()
        self.presence.start()
        self.lifecycle.start()
        self.keepalive.start()
        if self.settings.fast_join and self.settings.takeover:
            guard.open_door(partial(door.enter, self))  # room sockets past uvicorn (rooms/door.py)
        await self.recharges.reconcile()
        self.payment_sweep.start()
        if self.settings.settler:
            self.settler.start()

    async def _room_emptied(self, room_id: str) -> None:
        await self.bus.unsubscribe(room_id)
        await self.presence.announce(room_id)

    async def catch_up(self, room_id: str) -> None:
        """After a bus outage: deliver what the room stream holds past the last event we saw (past
        the oldest point a local socket is live from, when no event came yet)."""
        room = self.hub.rooms.get(room_id)
        since = None if room is None else catch_up_from(room)
        if since is None:
            return
        events, _complete = await self.rooms.events_after(room_id, since, 10_000)
        for event in events:
            self.hub.deliver(room_id, event)

    def track(self, coro: Any) -> asyncio.Task[Any]:
        """Bookkeeping that must finish even if its socket goes away (a socket's leave)."""
        task = asyncio.get_running_loop().create_task(coro)
        self.inflight.add(task)
        task.add_done_callback(self._tracked_done)
        return task

    def _tracked_done(self, task: asyncio.Task[Any]) -> None:
        self.inflight.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("post-ack task failed", exc_info=task.exception())

    async def drain(self) -> None:
        """SIGTERM: stop taking gifts, finish in-flight debits and publishes, close sockets with 1001."""
        # No idle end starts on a node going away (one in progress finishes, Redis and SQL both).
        await self.lifecycle.stop()
        self.draining = self.gifts.draining = self.video_gifts.draining = True
        await self.batcher.drain()
        await self.gifts.drain()
        while self.inflight:
            await asyncio.gather(*list(self.inflight), return_exceptions=True)
        await self.batcher.drain()
        await self.hub.close_all(errors.GOING_AWAY)

    async def stop(self) -> None:
        await self.drain()
        guard.open_door(None)
        await self.keepalive.stop()
        await self.presence.stop()
        await self.bus.stop()
        await self.wallet_events.stop()
        await self.payment_sweep.stop()
        if self.settings.settler:
            await self.settler.stop(flush=True)
        await self.store.close()
        await self.fastpipe.aclose()
        await self.redis.aclose()
        await self.redis_bin.aclose()
        if self.embedded is not None:
            # Here, not after uvicorn returns: uvicorn re-raises SIGTERM once it has shut down.
            await asyncio.to_thread(self.embedded.stop)

    async def health(self) -> dict[str, Any]:
        from server.settlement.settler import outbox_lag

        out: dict[str, Any] = {"node": self.settings.node_id, "store": self.store.kind}
        ok = True
        try:
            await asyncio.wait_for(self.redis.ping(), 2)
            out["redis"] = "ok"
            out.update(await asyncio.wait_for(outbox_lag(self.redis, self.settings.partitions), 2))
        except Exception as exc:
            ok = False
            out["redis"] = f"unreachable ({type(exc).__name__})"
        try:
            await asyncio.wait_for(self.store.ping(), 2)
            out["database"] = "ok"
        except Exception as exc:
            ok = False
            out["database"] = f"unreachable ({type(exc).__name__})"
        if self.settings.settler:
            out["settler"] = {"degraded": self.settler.degraded, "last_error": self.settler.last_error,
                              "settled": self.settler.settled}
        out["status"] = "ok" if ok else "degraded"
        out["connections"] = self.hub.connections()
        return out
