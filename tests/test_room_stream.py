"""The room's event stream once every event in it is older than the resume age."""

from __future__ import annotations

import time
from collections.abc import Callable

import redis

from tests.support import FAST, Api, ServerProc, join, token, wait_until


async def test_the_newest_event_outlives_the_age_trim_so_offsets_stay_meaningful(
        make_server: Callable[..., ServerProc], redis_url: str) -> None:
    """room_tick.lua trims the stream by age but keeps its newest event: a later joiner's welcome
    offset is that event's, not "0-0", and a resume from before the trimmed events is told it is
    too old instead of getting nothing."""
    env = {**FAST, "GIFTSTREAM_PRESENCE_INTERVAL_S": "0.2", "GIFTSTREAM_RESUME_MAX_AGE_S": "1"}
    server = make_server(redis_url=redis_url, env=env).start()
    host = Api(server, token("sh", "host"))
    room = await host.create_room()
    viewer = Api(server, token("sv"))
    assert (await viewer.recharge(coins=1000)).status_code == 201
    stream = f"gs:{{r:{room}}}:events"
    r = redis.Redis.from_url(redis_url)
    try:
        async with join(server, room, viewer.token) as sender:
            start, epoch = sender.welcome["offset"], sender.welcome["epoch"]
            # several stream nodes' worth: trimming by age drops whole nodes only
            acks = []
            for window in (range(150), range(150, 300)):  # at most 256 of a socket's gifts in flight
                for i in window:
                    await sender.gift(f"s{i}")
                acks += [await sender.reply(f"s{i}") for i in window]
            assert all(a["type"] == "ack" for a in acks)
            last_gift = acks[-1]["gift_id"]
            await sender.until(lambda: sender.count(gift_id=last_gift) > 0)
            newest = next(e["offset"] for e in sender.events if e.get("gift_id") == last_gift)
            # The presence tick (every 0.2 s, while a viewer is in the room) trims by age. Let
            # the newest event pass the 1 s age and a few more ticks run: the thing under test.
            newest_ms = int(newest.split("-")[0])
            await wait_until(lambda: time.time() * 1000 > newest_ms + 2000, timeout=10)
            assert 1 <= int(r.xlen(stream)) < 300
        assert r.xrevrange(stream, count=1)[0][0].decode() == newest
        async with join(server, room, token("sw")) as late:
            assert late.welcome["offset"] == newest
            await late.send({"type": "resume", "since": start, "epoch": epoch})
            await late.until(lambda: any(m["type"] == "resume_failed" for m in late.other))
            failed = next(m for m in late.other if m["type"] == "resume_failed")
            assert failed["reason"] == "too_old" and failed["offset"] == newest
    finally:
        r.close()
        await host.close()
        await viewer.close()
