"""A charged gift id's record (send_gift.lua, gift_replay.lua, Wallet.start): a retry inside its
lifetime gets the first result, one after it is a new gift, another gift under the same id is
refused, and records of the string-key layout before 2026-11-30 are honoured after an upgrade."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from typing import Any

import pytest
from redis.asyncio import Redis

from server.batcher import ScriptBatcher
from server.codes import Err, GiftstreamError
from server.keys import LEGACY_IDEMPOTENCY_UNTIL, UserKeys
from server.scripts import Scripts
from server.settings import Settings
from server.settlement.settler import ensure_groups
from server.wallet.service import LEGACY_IDEMPOTENCY_TTL_S, GiftOrder, Wallet
from tests.support import wait_until

PARTITIONS = 4


def order(client_id: str, user: str = "ada", count: int = 1, room: str = "room-1") -> GiftOrder:
    return GiftOrder(client_id, user, user.title(), "host-1", room, "rose", count, 10)


@pytest.fixture
async def redis(redis_url: str) -> AsyncIterator[Redis]:
    client = Redis.from_url(redis_url, decode_responses=True)
    yield client
    await client.aclose()


class Wallets:
    """Wallets on the session valkey (each one a node's), their pipelines closed after the test."""

    def __init__(self, redis: Redis) -> None:
        self.redis = redis
        self.made: list[Wallet] = []

    async def __call__(self, **settings: Any) -> Wallet:
        scripts = Scripts()
        await scripts.load(self.redis)
        await ensure_groups(self.redis, PARTITIONS)
        wallet = Wallet(self.redis, ScriptBatcher(self.redis, scripts), Settings(partitions=PARTITIONS, **settings))
        self.made.append(wallet)
        if len(self.made) == 1:
            await wallet.credit("ada", "order-ada", 100)
        return wallet


@pytest.fixture
async def wallets(redis: Redis) -> AsyncIterator[Wallets]:
    made = Wallets(redis)
    yield made
    for wallet in made.made:
        await wallet.batcher.drain()
        await wallet.batcher.pipe.aclose()


async def _coins(wallet: Wallet) -> int:
    return (await wallet.balance("ada"))["coins"]


async def test_a_retry_inside_the_lifetime_replays_and_one_after_it_is_a_new_gift(
        redis: Redis, wallets: Wallets) -> None:
    wallet = await wallets(idempotency_ttl_s=1)
    k = UserKeys("ada", PARTITIONS)
    first = await wallet.send_gift(order("g1"))
    assert (first.replayed, first.balance) == (False, 90)
    [ttl_ms] = await redis.hpttl(k.gift_ids, k.gift_id_field("g1"))
    assert 0 < ttl_ms <= 1000

    again = await wallet.send_gift(order("g1"))
    looked_up = await wallet.replay(order("g1"))
    assert again == looked_up
    assert (again.gift_id, again.balance, again.replayed, again.debit_ms) == (
        first.gift_id, 90, True, first.debit_ms)
    with pytest.raises(GiftstreamError) as refused:
        await wallet.send_gift(order("g1", count=2))
    assert refused.value.code is Err.IDEMPOTENCY_CONFLICT
    with pytest.raises(GiftstreamError) as refused:
        await wallet.replay(order("g1", room="room-2"))
    assert refused.value.code is Err.IDEMPOTENCY_CONFLICT
    assert await _coins(wallet) == 90

    # Past the lifetime the id is forgotten, as docs/protocol.md says: the same id is a new gift.
    await wait_until(lambda: _forgotten(redis, k, "g1"), timeout=5, interval=0.05)
    assert await wallet.replay(order("g1")) is None
    later = await wallet.send_gift(order("g1"))
    assert (later.replayed, later.balance) == (False, 80) and later.gift_id != first.gift_id
    assert await _coins(wallet) == 80


async def _forgotten(redis: Redis, k: UserKeys, client_id: str) -> bool:
    return not await redis.hexists(k.gift_ids, k.gift_id_field(client_id))


async def test_a_record_is_small_whatever_the_ids(redis: Redis, redis_url: str, wallets: Wallets) -> None:
    """The record holds digests, not the ids: a 128-character gift id costs what a short one does."""
    wallet = await wallets()
    long_id = "x" * 128
    debit = await wallet.send_gift(order(long_id, room="r" * 64))
    k = UserKeys("ada", PARTITIONS)
    raw = Redis.from_url(redis_url)
    try:
        [(field, value)] = (await raw.hgetall(k.gift_ids)).items()
    finally:
        await raw.aclose()
    seq = debit.gift_id.rsplit("-", 1)[1]
    assert field == k.gift_id_field(long_id) and len(field) == 16
    assert value == f"{seq}\n90\n{debit.debit_ms}\n".encode() + order(long_id, room="r" * 64).fingerprint_digest
    assert len(value) < 40
    # The one hash per partition carries the partition's tag: one slot with the wallet.
    assert k.gift_ids.startswith(f"gs:{k.tag}:")


async def test_records_of_the_string_key_layout_are_honoured_for_a_day_after_an_upgrade(
        redis: Redis, wallets: Wallets) -> None:
    # What send_gift.lua before 2026-11-30 left for a charged gift: a string key per id.
    k = UserKeys("ada", PARTITIONS)
    old = order("old-1")
    await redis.set(k.legacy_idempotency("old-1"), f"{old.fingerprint}\ng{k.partition}-7\n55\n1764460800000",
                    ex=LEGACY_IDEMPOTENCY_TTL_S)
    wallet = await wallets()
    before = int(time.time() * 1000)
    await wallet.start()
    assert 0 <= wallet.legacy_until_ms - before - LEGACY_IDEMPOTENCY_TTL_S * 1000 < 5000

    again = await wallet.send_gift(old)
    assert (again.gift_id, again.balance, again.replayed, again.debit_ms) == (
        f"g{k.partition}-7", 55, True, 1764460800000)
    assert await wallet.replay(old) == again
    with pytest.raises(GiftstreamError) as refused:
        await wallet.send_gift(order("old-1", count=3))
    assert refused.value.code is Err.IDEMPOTENCY_CONFLICT
    assert await _coins(wallet) == 100
    new = await wallet.send_gift(order("new-1"))
    assert not new.replayed and await redis.hlen(k.gift_ids) == 1

    # Every other node reads the first one's decision; once the day is over, nobody looks.
    second = await wallets()
    await second.start()
    assert second.legacy_until_ms == wallet.legacy_until_ms
    second.legacy_until_ms = int(time.time() * 1000) - 1
    fresh = await second.send_gift(old)
    assert not fresh.replayed and fresh.gift_id != again.gift_id


async def test_a_new_data_set_never_looks_for_old_records(redis: Redis, wallets: Wallets) -> None:
    wallet = await wallets()
    await wallet.start()
    assert wallet.legacy_until_ms == 0 and await redis.get(LEGACY_IDEMPOTENCY_UNTIL) == "0"
    # An old record written after the decision (by nothing of this release) is not looked for.
    k = UserKeys("ada", PARTITIONS)
    await redis.set(k.legacy_idempotency("g1"), f"{order('g1').fingerprint}\ng{k.partition}-7\n55\n1764460800000")
    assert not (await wallet.send_gift(order("g1"))).replayed
