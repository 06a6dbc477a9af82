"""The gift, top to bottom: validate -> admit -> debit -> ack -> publish -> republish.

One `gift {id, gift, count}` frame from a viewer's socket goes through `Gifts.submit`:

1. validate: the gift is in the catalog and its count is within bounds;
2. admit, at the gateway, before any Redis work: the socket's gifts in flight, the node
   is not draining, the socket's rate, the room is live, the sender is 18+, the sender is
   not the room's host. A gift refused here may still be a retry of one charged before:
   its first result is looked up (read-only) and acknowledged instead of the refusal;
3. debit: `send_gift.lua` in the sender's partition, group-committed with every other Lua
   call of this tick (wallet/service.py); its checks (replay, restricted, funds, budget)
   come before its first write;
4. ack: the sender gets `ack {id, gift_id, balance, replayed}`, or the error reply;
5. publish: `room_publish.lua` appends the gift to the room's stream and publishes it,
   in the next pipeline. A replayed debit is published too: the gateway that charged it
   may have died before publishing it; the script shows a gift once however often asked;
6. republish: a publish that failed because Redis was away is tried again in the
   background, with backoff, until Redis answers, the republish window passes, or this
   node drains (then the sender's retry with the same id publishes it).

No task per gift on the common path: each step after the debit runs in the callback of
the pipeline's reply, so a storm's acks leave in the same loop step as the reply. The
order of these checks is the order documented in docs/protocol.md.
"""

from __future__ import annotations

import asyncio
import logging
import time
from functools import partial
from typing import Any

from server import errors, gift_rules, metrics
from server.auth import Principal
from server.catalog import Catalog
from server.codes import Err, GiftstreamError
from server.fastpipe import UNREACHABLE
from server.outage import Backoff
from server.protocol import Gift
from server.ratelimit import TokenBucket
from server.rooms.conn import Conn
from server.rooms.hub import Hub
from server.rooms.state import Rooms
from server.settings import Settings
from server.wallet.service import Debit, GiftOrder, Wallet

log = logging.getLogger("giftstream.gifts")

# Gifts of one socket waiting for their debit at once; more are refused with rate_limited.
MAX_INFLIGHT_GIFTS = 256
# A republish gives up this long before the window closes: room_publish.lua would refuse it.
REPUBLISH_MARGIN_MS = 5_000


class Backpressure(GiftstreamError):
    """Too many of the socket's gifts wait for their debit: refused without a replay lookup."""


class Sender:
    """What a gift needs of the socket it came from: who sends, to which room, and the
    socket's own limits. One per room socket, made at join."""

    __slots__ = ("conn", "host_id", "bucket", "in_flight", "name_recorded")

    def __init__(self, conn: Conn, host_id: str, bucket: TokenBucket) -> None:
        self.conn = conn
        self.host_id = host_id
        self.bucket = bucket
        self.in_flight = 0
        # The sender's display name goes to the room's leaderboard names with its first gift.
        self.name_recorded = False

    @property
    def principal(self) -> Principal:
        return self.conn.principal

    def reply(self, message: dict[str, Any], started: float) -> None:
        self.conn.reply(message)
        metrics.GIFT_ACK_SECONDS.observe(time.perf_counter() - started)


class Gifts:
    def __init__(self, settings: Settings, catalog: Catalog, wallet: Wallet, rooms: Rooms, hub: Hub) -> None:
        self.settings = settings
        self.catalog = catalog
        self.wallet = wallet
        self.rooms = rooms
        self.hub = hub
        self.draining = False
        # Replay lookups, publishes and republishes not finished yet: a drain waits for them.
        self.inflight: set[asyncio.Future[Any]] = set()

    def sender(self, conn: Conn, host_id: str) -> Sender:
        return Sender(conn, host_id, TokenBucket(self.settings.gift_rate_per_s, self.settings.gift_burst))

    # -- the flow ---------------------------------------------------------------------------

    def submit(self, sender: Sender, msg: Gift) -> None:
        """One gift frame, decoded. Never blocks: the reply is sent from the debit's callback."""
        started = time.perf_counter()
        try:
            order = self.validate(sender, msg)
        except GiftstreamError as exc:
            sender.reply(errors.reply_for(exc, msg.id), started)
            return
        try:
            self.admit(sender)
        except GiftstreamError as refusal:
            if isinstance(refusal, Backpressure):
                sender.reply(errors.reply_for(refusal, msg.id), started)
                return
            # A retry of a gift that was charged already still learns its result, even when
            # the room has ended or the socket is over its rate since (rare: a task is fine).
            sender.in_flight += 1
            self._track(asyncio.ensure_future(self._refused(sender, msg, order, refusal, started)))
            return
        sender.in_flight += 1
        self.wallet.debit(order).add_done_callback(partial(self._debited, sender, msg, order, started))

    def validate(self, sender: Sender, msg: Gift) -> GiftOrder:
        """Step 1: the gift exists and its count is within bounds (gift_rules.order, as a video's)."""
        return gift_rules.order(self.catalog, self.settings.max_gift_count, sender.principal, msg.id, msg.gift,
                                msg.count, sender.host_id, sender.conn.room_id)

    def admit(self, sender: Sender) -> None:
        """Step 2: the gateway's checks, cheapest first; the sender's age before any balance."""
        if sender.in_flight >= MAX_INFLIGHT_GIFTS:
            raise Backpressure(Err.RATE_LIMITED, "too many gifts in flight; retry later")
        if self.draining:
            raise GiftstreamError(Err.UNAVAILABLE, "server restarting; retry with the same id")
        if not sender.bucket.take():
            raise GiftstreamError(Err.RATE_LIMITED, "too many gifts; retry later with the same id")
        local = self.hub.rooms.get(sender.conn.room_id)
        if local is None or local.ended:
            raise GiftstreamError(Err.ROOM_NOT_LIVE, "this room is not live")
        gift_rules.check_sender(sender.principal, sender.host_id, gift_rules.OWN_ROOM)

    def _debited(self, sender: Sender, msg: Gift, order: GiftOrder, started: float,
                 fut: asyncio.Future[Any]) -> None:
        """Step 3 done: send_gift.lua answered (or its pipeline failed)."""
        sender.in_flight -= 1
        try:
            debit = self.wallet.debit_result(fut.result())
        except Exception as exc:
            # Refused by the script (a reply code), or the outcome is unknown (Redis away):
            # retrying with the same id is safe either way.
            sender.reply(errors.reply_for(exc, msg.id, context="gift"), started)
            return
        self.ack(sender, msg, order, debit, started)

    async def _refused(self, sender: Sender, msg: Gift, order: GiftOrder, refusal: GiftstreamError,
                       started: float) -> None:
        """Step 2 refused it: unless it was charged before (then ack that), the refusal stands."""
        try:
            debit = await self.wallet.replay(order)
        except GiftstreamError as exc:  # the same id with other parameters
            refusal, debit = exc, None
        except Exception:
            debit = None  # Redis away: the gateway's refusal is the answer
        finally:
            sender.in_flight -= 1
        if debit is None:
            sender.reply(errors.reply_for(refusal, msg.id), started)
        else:
            self.ack(sender, msg, order, debit, started)

    def ack(self, sender: Sender, msg: Gift, order: GiftOrder, debit: Debit, started: float) -> None:
        """Step 4, then step 5: the sender learns the result first, the room right after."""
        sender.reply({"type": "ack", "id": msg.id, "gift_id": debit.gift_id, "balance": debit.balance,
                      "replayed": debit.replayed}, started)
        p = sender.principal
        event = {"type": "gift", "gift_id": debit.gift_id, "from": {"id": p.user_id, "name": p.name},
                 "gift": order.gift, "count": order.count, "coins": order.coins, "ts": debit.debit_ms}
        self.publish(order.room_id, event, debit.debit_ms, record_name=not sender.name_recorded)
        sender.name_recorded = True

    def publish(self, room_id: str, event: dict[str, Any], debit_ms: int, record_name: bool = True) -> None:
        """Step 5: publish a charged gift to its room, in this tick's pipeline."""
        future = self.rooms.publish_gift_later(room_id, event, debit_ms, record_name)
        self.inflight.add(future)
        future.add_done_callback(partial(self._published, room_id, event, debit_ms))

    def _published(self, room_id: str, event: dict[str, Any], debit_ms: int, future: asyncio.Future[Any]) -> None:
        self.inflight.discard(future)
        exc = None if future.cancelled() else future.exception()
        if exc is None:
            return
        if not errors.is_unreachable(exc):
            log.error("gift %s not published", event["gift_id"], exc_info=exc)
            return
        self._track(asyncio.ensure_future(self.republish(room_id, event, debit_ms)))

    async def republish(self, room_id: str, event: dict[str, Any], debit_ms: int) -> None:
        """Step 6: publish again after a Redis error, until it gets through or cannot."""
        deadline_ms = debit_ms + self.settings.republish_window_s * 1000 - REPUBLISH_MARGIN_MS
        backoff = Backoff(first=0.2, cap=5.0, jitter=0.0)
        while not self.draining and time.time() * 1000 < deadline_ms:
            await backoff.wait()
            try:
                # With the name: the first publish, which would have written it, may not have run.
                await self.rooms.publish_gift_later(room_id, event, debit_ms)
                log.info("gift %s published after a Redis error", event["gift_id"])
                return
            except UNREACHABLE:
                continue
        log.warning("gift %s not published (Redis unreachable); the sender's retry publishes it", event["gift_id"])

    # -- bookkeeping --------------------------------------------------------------------------

    def _track(self, future: asyncio.Future[Any]) -> None:
        """Post-ack work that must finish even if its socket goes away."""
        self.inflight.add(future)
        future.add_done_callback(self._tracked_done)

    def _tracked_done(self, future: asyncio.Future[Any]) -> None:
        self.inflight.discard(future)
        if not future.cancelled() and future.exception() is not None:
            log.error("post-ack work failed", exc_info=future.exception())

    async def drain(self) -> None:
        """SIGTERM: refuse new gifts; wait for replays, publishes and republishes under way."""
        self.draining = True
        while self.inflight:
            await asyncio.gather(*list(self.inflight), return_exceptions=True)
