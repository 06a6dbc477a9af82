"""One call per key in flight (server/coalesce.py): callers meanwhile share the next one."""

from __future__ import annotations

import asyncio

import pytest

from server.coalesce import Coalesced


async def test_callers_while_a_call_is_out_share_the_next_and_each_answer_is_read_after_its_ask() -> None:
    value = {"r": 0}
    started: list[int] = []
    gates: list[asyncio.Future[None]] = []

    async def read(key: str) -> int:
        started.append(value["r"])
        gate = asyncio.get_running_loop().create_future()
        gates.append(gate)
        await gate
        return value["r"]

    c: Coalesced[str, int] = Coalesced(read)
    first = c.soon("a")
    await asyncio.sleep(0)
    value["r"] = 1  # changes after the first call left: its callers must not be told 0 ...
    later = [c.soon("a") for _ in range(50)]
    other = c.soon("b")
    await asyncio.sleep(0)
    assert c.calls == 2 and len(gates) == 2  # one out per key; the 50 wait for the next one
    gates[0].set_result(None)
    assert await first == 1
    await asyncio.sleep(0)
    assert len(gates) == 3 and started[-1] == 1  # ... the next call left when the first returned
    gates[2].set_result(None)
    assert {await f for f in later} == {1} and c.calls == 3
    gates[1].set_result(None)
    assert await other == 1
    assert c._slots == {}


async def test_a_failure_reaches_its_callers_and_the_next_call_is_made() -> None:
    calls = 0

    async def read(key: str) -> int:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise ConnectionError("down")
        return 7

    c: Coalesced[str, int] = Coalesced(read)
    failing = c.soon("k")
    following = c.soon("k")  # asked while the failing call was out: the next call answers it
    with pytest.raises(ConnectionError):
        await failing
    assert await following == 7 and calls == 2
    calls = 0  # the next call fails again
    unheard = c.soon("k")  # a failure nobody waits for is no "never retrieved" warning (warnings are errors)
    await asyncio.sleep(0.01)
    assert unheard.done() and calls == 1


async def test_with_spacing_a_key_s_calls_leave_that_far_apart_and_callers_meanwhile_share_one() -> None:
    loop = asyncio.get_running_loop()
    left: list[float] = []

    async def write(key: str) -> int:
        left.append(loop.time())
        return len(left)

    c: Coalesced[str, int] = Coalesced(write, spacing_s=0.2)
    assert await c.soon("room") == 1
    # Asked right after the first returned: the second waits out the 0.2 s, and every caller
    # meanwhile gets its answer, read after they asked.
    waiting = [c.soon("room") for _ in range(30)]
    await asyncio.sleep(0.05)
    assert len(left) == 1 and not any(f.done() for f in waiting)
    waiting.append(c.soon("room"))
    assert {await f for f in waiting} == {2}
    assert left[1] - left[0] >= 0.2 - 0.005 and c.calls == 2
    assert await c.soon("other") == 3  # another key does not wait for this one's spacing
    assert left[2] - left[1] < 0.1
