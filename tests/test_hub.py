"""The room hub (`server/rooms/hub.py`) in-process, its sockets over fake transports: joins and
leaves, one frame per tick, one encoding per subprotocol, held events, slices, room end, offsets."""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

import pytest

from server.rooms import hub as hub_module
from server.rooms.conn import Conn
from server.rooms.hub import Hub, catch_up_from
from tests.fakes import OP_BINARY, OP_TEXT, FakeTransport, taken_over_conn
from tests.support import wait_until


def _gift(offset: str) -> dict[str, Any]:
    return {"type": "gift", "gift_id": f"g{offset}", "offset": offset}


async def _viewers(hub: Hub, n: int, room_id: str = "r1", subprotocol: str = "giftstream.msgpack",
                   ready: bool = True) -> list[tuple[Conn, FakeTransport]]:
    out = []
    for i in range(n):
        conn, transport = taken_over_conn(room_id, subprotocol, user_id=f"v{i}")
        await hub.join(conn)
        if ready:
            hub.release(conn, after=None)
        out.append((conn, transport))
    return out


async def test_the_first_join_subscribes_the_room_and_the_last_leave_unsubscribes_it() -> None:
    hub = Hub(tick_ms=10)
    calls: list[tuple[str, str]] = []

    async def first(room_id: str) -> None:
        calls.append(("subscribe", room_id))

    async def last(room_id: str) -> None:
        calls.append(("unsubscribe", room_id))

    hub.on_first_join, hub.on_last_leave = first, last
    r1 = await _viewers(hub, 2, "r1")
    r2 = await _viewers(hub, 1, "r2")
    assert calls == [("subscribe", "r1"), ("subscribe", "r2")]
    assert hub.connections() == 3 and set(hub.rooms) == {"r1", "r2"}
    await hub.leave(r1[0][0])
    assert calls[2:] == [] and hub.connections() == 2
    await hub.leave(r1[1][0])
    await hub.leave(r2[0][0])
    assert calls[2:] == [("unsubscribe", "r1"), ("unsubscribe", "r2")] and hub.rooms == {}


async def test_a_join_whose_subscribe_failed_leaves_no_room_behind() -> None:
    hub = Hub(tick_ms=10)

    async def broken(room_id: str) -> None:
        raise ConnectionError("redis away")

    hub.on_first_join = broken
    conn, _ = taken_over_conn()
    with pytest.raises(ConnectionError):
        await hub.join(conn)
    assert hub.rooms == {}
    hub.on_first_join = None
    await hub.join(conn)  # the next join subscribes again
    assert hub.connections() == 1


async def test_a_quiet_room_sends_at_once_and_a_busy_one_once_per_tick() -> None:
    hub = Hub(tick_ms=50)
    [(_, t)] = await _viewers(hub, 1)
    hub.deliver("r1", _gift("1-1"))
    await asyncio.sleep(0)  # a loop step, no tick: a quiet room's event goes out at once
    assert [[e["offset"] for e in m["events"]] for m in t.messages()] == [["1-1"]]
    for i in range(2, 6):  # within the tick of the first: held for one frame
        hub.deliver("r1", _gift(f"1-{i}"))
    await asyncio.sleep(0)
    assert len(t.messages()) == 1
    await wait_until(lambda: len(t.messages()) == 2, timeout=2, interval=0.005)
    assert [e["offset"] for e in t.messages()[1]["events"]] == ["1-2", "1-3", "1-4", "1-5"]
    assert (hub.frames, hub.events, hub.deliveries) == (2, 5, 5)


async def test_each_frame_is_encoded_once_per_subprotocol_and_shared_by_its_sockets() -> None:
    hub = Hub(tick_ms=10)
    packed = await _viewers(hub, 3, subprotocol="giftstream.msgpack")
    texts = await _viewers(hub, 3, subprotocol="giftstream.json")
    hub.deliver("r1", _gift("1-1"))
    await wait_until(lambda: all(t.writes for _, t in packed + texts), timeout=2, interval=0.005)
    [first_packed] = packed[0][1].writes
    [first_text] = texts[0][1].writes
    # the very same bytes object on every socket of a subprotocol: encoded once, not per viewer
    assert all(t.writes == [first_packed] and t.writes[0] is first_packed for _, t in packed)
    assert all(t.writes == [first_text] and t.writes[0] is first_text for _, t in texts)
    assert packed[0][1].frames()[0][0] == OP_BINARY and texts[0][1].frames()[0][0] == OP_TEXT
    assert json.loads(texts[0][1].frames()[0][1]) == packed[0][1].messages()[0]


async def test_a_socket_not_ready_holds_events_and_gets_the_newer_ones_on_release() -> None:
    hub = Hub(tick_ms=0)
    [(live, live_t)] = await _viewers(hub, 1)
    [(joining, joining_t)] = await _viewers(hub, 1, ready=False)
    for offset in ("1-1", "1-2", "1-3"):
        hub.deliver("r1", _gift(offset))
        await asyncio.sleep(0)
    assert len(live_t.events()) == 3
    assert joining_t.writes == [] and [e["offset"] for e in joining.held] == ["1-1", "1-2", "1-3"]
    # Its welcome said offset 1-1: it gets what came after, in one frame, in order.
    hub.release(joining, after="1-1")
    assert joining.ready and joining.held == [] and joining.last_offset == "1-3"
    assert [[e["offset"] for e in m["events"]] for m in joining_t.messages()] == [["1-2", "1-3"]]
    hub.deliver("r1", _gift("1-4"))  # then it is live like the others
    await wait_until(lambda: len(joining_t.events()) == 3, timeout=2, interval=0.005)
    assert [e["offset"] for e in joining_t.events()] == ["1-2", "1-3", "1-4"]
    assert live.last_offset == joining.last_offset == "1-4"


async def test_a_frame_is_written_in_slices_of_pass_slice_sockets_one_loop_step_each() -> None:
    hub = Hub(tick_ms=0, pass_slice=2)
    viewers = await _viewers(hub, 5)
    hub.deliver("r1", _gift("1-1"))
    written = []
    for _ in range(4):
        await asyncio.sleep(0)  # one loop step: whatever else is ready runs between slices
        written.append(sum(bool(t.writes) for _, t in viewers))
    assert written == [2, 4, 5, 5]
    # Events that came during the pass go out in the next frame, once the pass is done.
    hub.deliver("r1", _gift("1-2"))
    await wait_until(lambda: all(len(t.messages()) == 2 for _, t in viewers), timeout=2, interval=0.005)
    assert all([e["offset"] for e in t.events()] == ["1-1", "1-2"] for _, t in viewers)


async def test_room_ended_goes_out_at_once_and_then_closes_every_socket_with_4410() -> None:
    hub = Hub(tick_ms=1000)
    viewers = await _viewers(hub, 3)
    hub.deliver("r1", _gift("1-1"))
    hub.deliver("r1", {"type": "room_ended", "offset": "1-2"})  # not held for the tick
    assert hub.rooms["r1"].ended
    await wait_until(lambda: all(c.closed for c, _ in viewers), timeout=2, interval=0.005)
    for _, t in viewers:
        assert [e["type"] for e in t.events()] == ["gift", "room_ended"]
        code, reason = t.close_frame() or (0, "")
        assert code == 4410 and json.loads(reason)["reconnect"] is False


async def test_events_already_delivered_are_not_sent_again() -> None:
    hub = Hub(tick_ms=0)
    [(early, early_t)] = await _viewers(hub, 1)
    hub.deliver("r1", _gift("1-5"))
    await asyncio.sleep(0)
    # A bus catch-up overlapping what came by pub/sub: the same and older offsets are dropped.
    hub.deliver("r1", _gift("1-5"))
    hub.deliver("r1", _gift("1-4"))
    assert hub.events == 1
    # A socket whose welcome came after 1-7 was published, but before the bus brought it here.
    [(late, late_t)] = await _viewers(hub, 1, ready=False)
    late.last_offset = "1-7"
    hub.release(late, after="1-7")
    for offset in ("1-6", "1-7", "1-8"):
        hub.deliver("r1", _gift(offset))
    await wait_until(lambda: bool(late_t.writes) and len(early_t.messages()) == 2, timeout=2, interval=0.005)
    assert [e["offset"] for e in early_t.events()] == ["1-5", "1-6", "1-7", "1-8"]
    assert [e["offset"] for e in late_t.events()] == ["1-8"]
    assert early.last_offset == late.last_offset == "1-8"


async def test_a_catch_up_starts_at_the_newest_event_seen_or_the_oldest_socket() -> None:
    hub = Hub(tick_ms=0)
    viewers = await _viewers(hub, 2, ready=False)
    room = hub.rooms["r1"]
    assert catch_up_from(room) is None
    viewers[0][0].last_offset, viewers[1][0].last_offset = "1-9", "1-3"
    assert catch_up_from(room) == "1-3"  # no event seen yet: the oldest socket's welcome
    hub.deliver("r1", _gift("1-10"))
    assert catch_up_from(room) == "1-10"


def _logged(transport: FakeTransport, name: str, log: list[tuple[str, float]], cost_s: float = 0.0) -> None:
    """Record each write to `transport` in one log shared by several; `cost_s`: each write takes
    that much CPU (a busy wait), as a real socket write does."""
    write = transport.write

    def logged(data: bytes | bytearray | memoryview) -> None:
        log.append((name, time.monotonic()))  # when the write began
        if cost_s:
            until = time.thread_time() + cost_s
            while time.thread_time() < until:
                pass
        write(data)

    transport.write = logged  # type: ignore[method-assign]


async def test_replies_made_during_a_pass_go_out_before_its_next_slice() -> None:
    hub = Hub(tick_ms=0, pass_slice=2)
    viewers = await _viewers(hub, 5)
    order: list[tuple[str, float]] = []
    conns = list(hub.rooms["r1"].conns)  # the order a pass writes them in
    for conn, t in viewers:
        _logged(t, f"v{conns.index(conn)}", order)
    gifter = conns[4]
    hub.deliver("r1", _gift("1-1"))
    await asyncio.sleep(0)
    assert [n for n, _ in order] == ["v0", "v1"]
    # An ack made between two slices (its debit's reply came meanwhile): it does not wait for
    # the slice to be written, nor for the rest of the pass.
    gifter.reply({"type": "ack", "id": "a1", "gift_id": "g1", "balance": 9})
    await asyncio.sleep(0)
    assert [n for n, _ in order] == ["v0", "v1", "v4", "v2", "v3"]
    await asyncio.sleep(0)
    gifter_t = next(t for c, t in viewers if c is gifter)
    assert [m["type"] for m in gifter_t.messages()] == ["ack", "events"]


async def test_a_slice_ends_when_its_time_is_up(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(hub_module, "CLOCK_EVERY", 1)
    hub = Hub(tick_ms=0, slice_ms=3)
    viewers = await _viewers(hub, 8)
    log: list[tuple[str, float]] = []
    for i, (_, t) in enumerate(viewers):
        _logged(t, f"v{i}", log, cost_s=0.002)
    hub.deliver("r1", _gift("1-1"))
    await asyncio.sleep(0)
    assert 1 <= len(log) <= 2  # 2 ms a socket: the 3 ms are up after the second at the latest
    await wait_until(lambda: len(log) == 8, timeout=2, interval=0.005)


async def test_a_room_whose_frame_costs_more_than_its_share_of_the_loop_lowers_its_frame_rate() -> None:
    hub = Hub(tick_ms=0, fanout_share=0.25)
    viewers = await _viewers(hub, 4)
    log: list[tuple[str, float]] = []
    for i, (_, t) in enumerate(viewers):
        _logged(t, f"v{i}", log, cost_s=0.005)  # a frame costs the loop about 20 ms
    hub.deliver("r1", _gift("1-1"))
    await wait_until(lambda: len(log) == 4, timeout=2, interval=0.001)
    first_frame = log[0][1]
    hub.deliver("r1", _gift("1-2"))  # tick 0: would go at once, but the room has used its share
    await wait_until(lambda: len(log) == 8, timeout=2, interval=0.001)
    assert log[4][1] - first_frame >= 0.075  # at least 20 ms / 0.25 after the first frame began
    assert all([e["offset"] for e in t.events()] == ["1-1", "1-2"] for _, t in viewers)


async def test_a_room_end_during_a_pass_goes_out_when_it_is_done_whatever_the_budget() -> None:
    hub = Hub(tick_ms=0, pass_slice=1, fanout_share=0.01)
    viewers = await _viewers(hub, 3)
    log: list[tuple[str, float]] = []
    for i, (_, t) in enumerate(viewers):
        _logged(t, f"v{i}", log, cost_s=0.005)  # the frame costs ~15 ms: 1.5 s of budget at 1%
    hub.deliver("r1", _gift("1-1"))
    await asyncio.sleep(0)  # the first of three slices is written
    hub.deliver("r1", {"type": "room_ended", "offset": "1-2"})
    await wait_until(lambda: all(c.closed for c, _ in viewers), timeout=0.5, interval=0.005)
    assert all([e["type"] for e in t.events()] == ["gift", "room_ended"] for _, t in viewers)


async def test_a_room_s_frame_rate_follows_its_size_within_the_node_s_write_budget() -> None:
    hub = Hub(tick_ms=10, writes_per_s=2_000)
    small = await _viewers(hub, 2, "small")
    big = await _viewers(hub, 100, "big")
    for room_id in ("small", "big"):
        hub.deliver(room_id, _gift("1-1"))
    await wait_until(lambda: all(t.frames() for _, t in small + big), timeout=2, interval=0.005)
    # 2,000 writes/s shared max-min: the small room asks 200/s (2 sockets a tick) and gets it, the
    # big one the other 1,800/s: a frame every 100 / 1,800 s, not every tick.
    rooms = hub.rooms
    assert rooms["small"].next_frame_at - rooms["small"].last_frame == pytest.approx(0.010)
    assert rooms["big"].next_frame_at - rooms["big"].last_frame == pytest.approx(100 / 1_800, rel=0.01)
    sent = hub.frames
    hub.deliver("big", _gift("1-2"))
    hub.deliver("big", _gift("1-3"))
    await asyncio.sleep(0.03)
    assert hub.frames == sent  # still waiting out its interval ...
    await wait_until(lambda: hub.frames == sent + 1, timeout=1, interval=0.005)
    transport = big[0][1]
    assert len(transport.frames()) == 2  # ... then both events in one frame
    assert [e["offset"] for e in transport.events()] == ["1-1", "1-2", "1-3"]


async def test_a_viewer_count_rides_on_a_waiting_frame_and_goes_alone_only_within_its_budget() -> None:
    hub = Hub(tick_ms=10, writes_per_s=2_000)
    viewers = await _viewers(hub, 100, "big")
    room = hub.rooms["big"]
    # On its own a count is a write to each of the 100 sockets: at most 5% of 2,000 writes/s, so
    # one a second (five frame intervals would allow one every 0.25 s).
    assert hub.snapshot_gap(room, time.monotonic()) == pytest.approx(100 / (0.05 * 2_000))
    assert hub.snapshot(room, {"type": "presence", "viewers": 100})
    await wait_until(lambda: all(t.events() for _, t in viewers), timeout=1, interval=0.005)
    assert not hub.snapshot(room, {"type": "presence", "viewers": 101})  # too soon, and nothing waits
    await asyncio.sleep(0.05)
    assert [e for _, t in viewers for e in t.events()] == [{"type": "presence", "viewers": 100}] * 100
    # A gift waiting for the room's next frame: the counts ride on it, the newest in the place
    # of the one before, at no write of their own.
    sent = hub.frames
    hub.deliver("big", _gift("1-1"))
    assert hub.snapshot(room, {"type": "presence", "viewers": 102})
    assert hub.snapshot(room, {"type": "presence", "viewers": 103})
    await wait_until(lambda: hub.frames == sent + 1 and not room.passing, timeout=1, interval=0.005)
    for _, transport in viewers:
        assert transport.events()[1:] == [_gift("1-1"), {"type": "presence", "viewers": 103}]
        assert len(transport.frames()) == 2
    assert not hub.snapshot(room, {"type": "presence", "viewers": 104})  # the ride counts as one


def test_the_write_budget_is_shared_max_min_fairly() -> None:
    from server.rooms.budget import fair_shares, frame_intervals

    assert fair_shares([10, 1_000, 5_000], 3_000) == [10, 1_000, 1_990]
    assert fair_shares([10, 20], 1_000) == [10, 20]
    # one room alone: 100,000 sockets at 100,000 writes/s is a frame a second; 1,000 sockets one a tick
    assert frame_intervals([100_000], 100_000, 0.02) == [1.0]
    assert frame_intervals([1_000], 100_000, 0.02) == [0.02]
    assert frame_intervals([5_000, 50], 0, 0.02) == [0.02, 0.02]
