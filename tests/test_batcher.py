"""Group commit of Lua calls against a real valkey: batching, errors, lost script cache."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import pytest
from redis.asyncio import Redis
from redis.exceptions import ResponseError

from server.batcher import ScriptBatcher
from server.keys import UserKeys
from server.scripts import Scripts
from server.settings import Settings
from server.wallet.service import Wallet


@pytest.fixture
async def batcher(redis_url: str) -> AsyncIterator[ScriptBatcher]:
    redis = Redis.from_url(redis_url)
    scripts = Scripts()
    await scripts.load(redis)
    b = ScriptBatcher(redis, scripts, max_batch=500, max_inflight=1)
    yield b
    await b.drain()
    await b.pipe.aclose()
    await redis.aclose()


def _credit(b: ScriptBatcher, user: str, order: str, coins: int) -> asyncio.Future[Any]:
    return Wallet(b.redis, b, Settings(partitions=16)).credit_later(user, order, coins)


async def test_calls_of_one_tick_share_a_pipeline_and_each_gets_its_own_reply(batcher: ScriptBatcher) -> None:
    futures = [_credit(batcher, f"u{i % 7}", f"o{i}", i + 1) for i in range(1200)]
    replies = await asyncio.gather(*futures)
    # 1,200 calls, at most 500 per pipeline: three pipelines, not 1,200 round trips.
    assert batcher.batches == 3 and batcher.calls == 1200
    balances: dict[str, int] = {}
    for i, reply in enumerate(replies):
        user = f"u{i % 7}"
        balances[user] = balances.get(user, 0) + i + 1
        assert int(reply[1]) == balances[user]  # the running balance, in call order


async def test_calls_made_while_a_pipeline_is_out_leave_together_when_it_returns(batcher: ScriptBatcher) -> None:
    first = _credit(batcher, "a", "first", 1)
    await asyncio.sleep(0)  # the first pipeline is sent
    later: list[asyncio.Future[Any]] = []
    while not first.done():  # one call per loop step while it is out
        later.append(_credit(batcher, "b", f"later{len(later)}", 1))
        await asyncio.sleep(0)
    await asyncio.gather(*later)
    assert len(later) >= 2, "the round trip took less than two loop steps; nothing to group"
    # One pipeline for the first call, then one for everything queued meanwhile (maybe a
    # third for calls queued while that one was out); never one per call.
    assert batcher.batches <= 3 < len(later) + 1
    assert int(await batcher.redis.hget(UserKeys("b", 16).wallet, "coins")) == len(later)  # type: ignore[arg-type]


async def test_an_error_reply_fails_only_its_own_call(batcher: ScriptBatcher) -> None:
    good = _credit(batcher, "g", "o1", 5)
    bad = batcher.call("credit", ["only-one-key"], [])  # the script errors on missing arguments
    also_good = _credit(batcher, "g", "o2", 5)
    with pytest.raises(ResponseError):
        await bad
    assert int((await good)[1]) == 5
    assert int((await also_good)[1]) == 10


async def test_a_lost_script_cache_is_reloaded_and_nothing_runs_twice(batcher: ScriptBatcher) -> None:
    await batcher.redis.script_flush()
    replies = await asyncio.gather(*(_credit(batcher, "s", f"o{i}", 1) for i in range(50)))
    assert [int(r[1]) for r in replies] == list(range(1, 51))
    assert int(await batcher.redis.hget(UserKeys("s", 16).wallet, "coins")) == 50  # type: ignore[arg-type]


async def test_drain_sends_calls_made_while_it_waits(batcher: ScriptBatcher) -> None:
    follow_ups: list[asyncio.Future[Any]] = []

    def chain(_: asyncio.Future[Any]) -> None:  # as a debit's reply queues its room publish
        follow_ups.append(_credit(batcher, "d", "second", 2))

    _credit(batcher, "d", "first", 1).add_done_callback(chain)
    await batcher.drain()
    assert len(follow_ups) == 1 and follow_ups[0].done()
    assert int(await batcher.redis.hget(UserKeys("d", 16).wallet, "coins")) == 3  # type: ignore[arg-type]
