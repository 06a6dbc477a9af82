"""The gift use case (`server/gifts.py`) in-process: a socket over a fake transport, the real
wallet and room scripts on the session valkey. validate -> admit -> debit -> ack -> publish."""

from __future__ import annotations

import dataclasses
import datetime as dt
from collections.abc import AsyncIterator
from typing import Any

import pytest
from redis.asyncio import Redis

from server import catalog as catalog_mod
from server.batcher import ScriptBatcher
from server.gifts import MAX_INFLIGHT_GIFTS, Gifts, Sender
from server.protocol import Gift
from server.rooms.hub import Hub
from server.rooms.state import Rooms
from server.scripts import Scripts
from server.settings import Settings
from server.wallet.service import Wallet
from tests.fakes import FakeTransport, taken_over_conn
from tests.support import wait_until

ROOM, HOST = "room-g", "host-g"


class Flow:
    """The parts a node wires for a gift, without the node."""

    def __init__(self, redis: Redis, redis_bin: Redis, batcher: ScriptBatcher, settings: Settings) -> None:
        self.redis, self.redis_bin, self.batcher = redis, redis_bin, batcher
        self.wallet = Wallet(redis, batcher, settings)
        self.rooms = Rooms(redis_bin, batcher, settings)
        self.hub = Hub(tick_ms=0)
        self.gifts = Gifts(settings, catalog_mod.load(), self.wallet, self.rooms, self.hub)

    async def viewer(self, user_id: str, coins: int = 100, birthdate: dt.date = dt.date(1990, 1, 1),
                     joined: bool = True) -> tuple[Sender, FakeTransport]:
        if coins:
            await self.wallet.credit(user_id, f"order-{user_id}", coins)
        conn, transport = taken_over_conn(ROOM, user_id=user_id, birthdate=birthdate)
        if joined:
            await self.hub.join(conn)
            self.hub.release(conn, after=None)
        return self.gifts.sender(conn, HOST), transport

    async def coins(self, user_id: str) -> int:
        return (await self.wallet.balance(user_id))["coins"]


async def _flow(redis_url: str, **settings: Any) -> AsyncIterator[Flow]:
    redis = Redis.from_url(redis_url, decode_responses=True)
    redis_bin = Redis.from_url(redis_url)
    scripts = Scripts()
    await scripts.load(redis)
    batcher = ScriptBatcher(redis, scripts)
    flow = Flow(redis, redis_bin, batcher, dataclasses.replace(Settings(), **settings))
    await flow.rooms.create(ROOM, HOST, "Host", "gifts")
    yield flow
    await flow.gifts.drain()
    await batcher.drain()
    await batcher.pipe.aclose()
    await redis.aclose()
    await redis_bin.aclose()


@pytest.fixture
async def flow(redis_url: str) -> AsyncIterator[Flow]:
    async for f in _flow(redis_url):
        yield f


async def _reply(transport: FakeTransport, gift_id: str) -> dict[str, Any]:
    def found() -> dict[str, Any] | None:
        return next((m for m in transport.messages() if m.get("id") == gift_id), None)

    await wait_until(lambda: found() is not None, timeout=5, interval=0.005)
    reply = found()
    assert reply is not None
    return reply


async def test_a_gift_is_acked_with_the_new_balance_then_published_to_its_room(flow: Flow) -> None:
    sender, transport = await flow.viewer("ada")
    flow.gifts.submit(sender, Gift("g1", "panda", 2))
    ack = await _reply(transport, "g1")
    assert ack["type"] == "ack" and ack["balance"] == 90 and ack["replayed"] is False
    assert await flow.coins("ada") == 90 and sender.in_flight == 0
    await wait_until(lambda: not flow.gifts.inflight, timeout=5, interval=0.005)
    events, _ = await flow.rooms.events_after(ROOM, "0-0", 10)
    [event] = [e for e in events if e["type"] == "gift"]
    assert (event["gift_id"], event["gift"], event["count"], event["coins"]) == (ack["gift_id"], "panda", 2, 10)
    assert event["from"] == {"id": "ada", "name": "ada"}


@pytest.mark.parametrize(("case", "code"), [
    ("unknown gift", "unknown_gift"), ("count 0", "bad_count"), ("too many", "bad_count"),
    ("host's own room", "not_allowed"), ("under 18", "age_restricted"), ("room not joined", "room_not_live"),
    ("node draining", "unavailable"), ("too expensive", "insufficient_funds"),
])
async def test_a_refused_gift_costs_nothing_and_says_why(flow: Flow, case: str, code: str) -> None:
    user = HOST if case == "host's own room" else "bo"
    sender, transport = await flow.viewer(
        user, birthdate=dt.date.today() - dt.timedelta(days=365 * 17) if case == "under 18" else dt.date(1990, 1, 1),
        joined=case != "room not joined")
    msg = {"unknown gift": Gift("g1", "unicorn", 1), "count 0": Gift("g1", "rose", 0),
           "too many": Gift("g1", "rose", 10_000), "too expensive": Gift("g1", "hat_and_mustache", 2)
           }.get(case, Gift("g1", "rose", 1))
    flow.gifts.draining = case == "node draining"
    flow.gifts.submit(sender, msg)
    reply = await _reply(transport, "g1")
    assert (reply["type"], reply["code"]) == ("error", code), reply
    assert await flow.coins(user) == 100 and sender.in_flight == 0
    flow.gifts.draining = False


async def test_a_socket_gets_its_burst_then_rate_limited(redis_url: str) -> None:
    async for flow in _flow(redis_url, gift_burst=3, gift_rate_per_s=0.001):
        sender, transport = await flow.viewer("cy")
        for i in range(5):
            flow.gifts.submit(sender, Gift(f"g{i}", "rose", 1))
        replies = [await _reply(transport, f"g{i}") for i in range(5)]
        assert [r["type"] for r in replies] == ["ack", "ack", "ack", "error", "error"]
        assert {r["code"] for r in replies[3:]} == {"rate_limited"}
        assert await flow.coins("cy") == 97


async def test_too_many_gifts_in_flight_are_refused_without_a_lookup(flow: Flow) -> None:
    sender, transport = await flow.viewer("di")
    sender.in_flight = MAX_INFLIGHT_GIFTS
    flow.gifts.submit(sender, Gift("g1", "rose", 1))
    reply = await _reply(transport, "g1")
    assert reply["code"] == "rate_limited" and "in flight" in reply["message"]
    assert sender.in_flight == MAX_INFLIGHT_GIFTS and not flow.gifts.inflight


async def test_a_retry_of_a_charged_gift_learns_its_result_even_when_it_would_be_refused_now(flow: Flow) -> None:
    sender, transport = await flow.viewer("ed")
    flow.gifts.submit(sender, Gift("g1", "panda", 1))
    first = await _reply(transport, "g1")
    flow.hub.rooms[ROOM].ended = True  # the host ended the room since
    transport.writes.clear()
    flow.gifts.submit(sender, Gift("g1", "panda", 1))  # the retry
    flow.gifts.submit(sender, Gift("g2", "panda", 1))  # a new gift
    again = await _reply(transport, "g1")
    assert (again["type"], again["gift_id"], again["balance"], again["replayed"]) == (
        "ack", first["gift_id"], 95, True)
    assert (await _reply(transport, "g2"))["code"] == "room_not_live"
    assert await flow.coins("ed") == 95 and sender.in_flight == 0


async def test_the_same_id_with_other_parameters_is_refused(flow: Flow) -> None:
    sender, transport = await flow.viewer("fa")
    flow.gifts.submit(sender, Gift("g1", "rose", 1))
    assert (await _reply(transport, "g1"))["type"] == "ack"
    transport.writes.clear()
    flow.gifts.submit(sender, Gift("g1", "rose", 3))
    reply = await _reply(transport, "g1")
    assert (reply["type"], reply["code"]) == ("error", "idempotency_conflict"), reply
    assert await flow.coins("fa") == 99
