"""Live balance: the `wallet` socket event, on every node, to the user's own room sockets.

A balance that changes by anything but the user's own gift (a credit arriving late, a refund, a
reward, an adjustment) is published once on one channel (keys.WALLET_CHANNEL, by
wallet/service.py's `notify`); every node subscribes to it and writes the event to that user's
local room sockets only (the hub keeps each user's sockets). A few events a second at most,
so one channel for all costs less than a subscription per user would.
"""

from __future__ import annotations

import asyncio
import json
import logging
from typing import Any

from redis.asyncio import Redis

from server.cluster import is_cluster, parse
from server.keys import WALLET_CHANNEL
from server.outage import Backoff, Outage
from server.rooms.hub import Hub

log = logging.getLogger("giftstream.wallet_events")


def deliver(hub: Hub, event: dict[str, Any]) -> int:
    """Write a published wallet event to its user's local room sockets; how many got it."""
    user_id = event.get("user_id")
    message = {"type": "wallet", "coins": event.get("coins"), "change": event.get("change"),
               "reason": event.get("reason"), "ref": event.get("ref")}
    sent = 0
    for conn in hub.sockets_of(user_id) if isinstance(user_id, str) else ():
        if conn.send_message(message):
            sent += 1
    return sent


class WalletEvents:
    """The node's subscription to the wallet channel; reconnects through outages (a balance change
    missed meanwhile is in GET /v1/wallet)."""

    def __init__(self, url: str, hub: Hub) -> None:
        # On a cluster a plain PUBLISH reaches every node, so any one node will do: the URL's
        # nodes in turn, the next one after each failure.
        self._nodes = parse(url) if is_cluster(url) else []
        self._turn = 0
        self.url = url
        # A client of its own: a subscribed connection waits for messages without a read timeout.
        self.redis = self._client()
        self.hub = hub
        self.delivered = 0
        self.backoff = Backoff(first=0.1, cap=5.0)
        self.outage = Outage(log, "wallet events", "reconnecting")
        self._task: asyncio.Task[None] | None = None
        self.subscribed = asyncio.Event()

    def _client(self) -> Redis:
        if not self._nodes:
            return Redis.from_url(self.url, decode_responses=True)
        n = self._nodes[self._turn % len(self._nodes)]
        self._turn += 1
        return Redis(host=n.host, port=n.port, username=n.username, password=n.password, ssl=n.tls,
                     decode_responses=True)

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run(), name="giftstream-wallet-events")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        await self.redis.aclose()

    async def _run(self) -> None:
        while True:
            try:
                async with self.redis.pubsub(ignore_subscribe_messages=True) as pubsub:
                    await pubsub.subscribe(WALLET_CHANNEL)
                    self.subscribed.set()
                    self.outage.recovered()
                    self.backoff.reset()
                    async for msg in pubsub.listen():
                        self._on_message(msg)
                raise ConnectionError("the wallet events subscription ended")
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                self.subscribed.clear()
                self.outage.failed(exc)
                if self._nodes:  # that node may be gone for good (failed over): the next one
                    await self.redis.aclose()
                    self.redis = self._client()
                await self.backoff.wait()

    def _on_message(self, msg: dict[str, Any]) -> None:
        if msg.get("type") != "message":
            return
        try:
            event = json.loads(msg["data"])
        except (ValueError, TypeError):
            log.error("undecodable wallet event: %r", msg.get("data"))
            return
        self.delivered += deliver(self.hub, event)
