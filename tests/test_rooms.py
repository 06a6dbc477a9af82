"""Room fan-out: resume, coalescing, combos, presence, slow consumers, two nodes."""

from __future__ import annotations

import asyncio
import contextlib
import json
import struct
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import msgpack
import pytest
import websockets

from server.keys import RoomKeys
from tests.support import FAST, Api, Client, ServerProc, join, open_room, raw_ws_connect, token, wait_until

# Slices of 2 sockets: every multi-socket room here is written in several steps per frame.
ROOM_ENV = {**FAST, "GIFTSTREAM_PRESENCE_INTERVAL_S": "0.2", "GIFTSTREAM_PASS_SLICE": "2"}


@pytest.fixture
def fast_server(make_server: Callable[..., ServerProc], redis_url: str) -> ServerProc:
    return make_server(redis_url=redis_url, env=ROOM_ENV).start()


@pytest.fixture(params=["takeover", "no_takeover"])
def socket_env(request: pytest.FixtureRequest) -> dict[str, str]:
    """The room socket path both ways: handed from uvicorn to RoomProtocol after the join (the
    default), or left with uvicorn (GIFTSTREAM_TAKEOVER=0: uvicorn's keepalive and receive loop)."""
    return {**ROOM_ENV, "GIFTSTREAM_TAKEOVER": "1" if request.param == "takeover" else "0"}


@pytest.fixture
def socket_server(make_server: Callable[..., ServerProc], redis_url: str, socket_env: dict[str, str]) -> ServerProc:
    """`fast_server`, with takeover on and off."""
    return make_server(redis_url=redis_url, env=socket_env).start()


async def _send_all(client: Client, ids: list[str], gift: str = "rose") -> list[dict[str, Any]]:
    """Send in windows of 200 (a socket may have 256 gifts in flight); all must be acked."""
    replies: list[dict[str, Any]] = []
    for i in range(0, len(ids), 200):
        window = ids[i : i + 200]
        for gid in window:
            await client.gift(gid, gift)
        replies += [await client.reply(gid) for gid in window]
    assert all(r["type"] == "ack" for r in replies), [r for r in replies if r["type"] != "ack"][:3]
    return replies


async def test_resume_returns_exactly_the_missed_events_in_order(socket_server: ServerProc) -> None:
    fast_server = socket_server
    room = await open_room(fast_server, "rh", "ra")
    async with join(fast_server, room, token("ra")) as sender, join(fast_server, room, token("rw")) as watcher:
        await _send_all(sender, [f"a{i}" for i in range(5)])
        seen = await watcher.wait_events(5)
        last = seen[-1]["offset"]
        epoch = watcher.welcome["epoch"]
    # the watcher is away while 30 more gifts happen
    async with join(fast_server, room, token("ra")) as sender:
        missed = await _send_all(sender, [f"b{i}" for i in range(30)])
    async with join(fast_server, room, token("rw")) as watcher:
        await watcher.send({"type": "resume", "since": last, "epoch": epoch})
        events = await watcher.wait_events(30)
        await watcher.drain(0.3)
        gifts = [e for e in watcher.events if e["type"] == "gift"]
    assert sorted(e["gift_id"] for e in gifts) == sorted(m["gift_id"] for m in missed)
    offsets = [e["offset"] for e in gifts]
    assert offsets == sorted(offsets, key=lambda o: tuple(map(int, o.split("-"))))
    assert len(set(offsets)) == 30 and events


async def test_events_older_than_the_resume_age_are_trimmed_while_viewers_watch(
        make_server: Callable[..., ServerProc], redis_url: str) -> None:
    """The room stream keeps about resume_max_age_s of events: room_tick.lua trims it by age once a
    presence tick, so a resume from before that fails as too old, and one from after it works."""
    server = make_server(redis_url=redis_url, env={**ROOM_ENV, "GIFTSTREAM_RESUME_MAX_AGE_S": "1"}).start()
    room = await open_room(server, "th", "ta")
    async with join(server, room, token("ta")) as sender:
        start, epoch = sender.welcome["offset"], sender.welcome["epoch"]
        # 600 events, several stream nodes (trimming by age drops whole nodes only)
        await _send_all(sender, [f"t{i}" for i in range(600)])
        redis = __import__("redis").Redis.from_url(redis_url)
        events = f"gs:{{r:{room}}}:events"
        assert redis.xlen(events) >= 600

        await wait_until(lambda: int(redis.xlen(events)) < 100, timeout=10, interval=0.2)
        redis.close()
        [late_ack] = await _send_all(sender, ["t-late"])
        await sender.until(lambda: sender.count(gift_id=late_ack["gift_id"]) > 0)
        late = next(e["offset"] for e in sender.events if e.get("gift_id") == late_ack["gift_id"])
        [after_ack] = await _send_all(sender, ["t-after"])
    async with join(server, room, token("tw")) as w:
        await w.send({"type": "resume", "since": start, "epoch": epoch})
        assert (await _next_of(w, "resume_failed"))["reason"] == "too_old"
    async with join(server, room, token("tw")) as w:
        await w.send({"type": "resume", "since": late, "epoch": epoch})
        await w.until(lambda: w.count(gift_id=after_ack["gift_id"]) > 0)
        assert [e["gift_id"] for e in w.events if e["type"] == "gift"] == [after_ack["gift_id"]]


async def test_resume_failed_when_epoch_changed_or_too_old(make_server: Callable[..., ServerProc],
                                                           redis_url: str) -> None:
    server = make_server(redis_url=redis_url, env={**ROOM_ENV, "GIFTSTREAM_RESUME_MAX_EVENTS": "20"}).start()
    room = await open_room(server, "oh", "oa")
    async with join(server, room, token("ow")) as w:
        start, epoch = w.welcome["offset"], w.welcome["epoch"]
        await w.send({"type": "resume", "since": start, "epoch": "not-the-epoch"})
        failed = await _next_of(w, "resume_failed")
        assert failed["reason"] == "epoch_changed" and failed["epoch"] == epoch
    async with join(server, room, token("oa")) as sender:
        # 400 events into a stream capped near 20: the start is long gone
        await _send_all(sender, [f"o{i}" for i in range(400)])
    info = Api(server, token("ow"))

    async def all_published() -> bool:
        coins_total: int = (await info.client.get(f"/v1/rooms/{room}")).json()["coins_total"]
        return coins_total == 400

    await wait_until(all_published)
    await info.close()
    async with join(server, room, token("ow")) as w:
        await w.send({"type": "resume", "since": start, "epoch": epoch})
        failed = await _next_of(w, "resume_failed")
        assert failed["reason"] == "too_old" and failed["coins_total"] == 400
        assert failed["top_gifters"][0]["id"] == "oa"
        assert failed["top_gifters"] == [{"id": "oa", "name": "oa", "coins": 400}]
        assert failed["viewers"] == 1  # the resuming socket itself, read with the leaderboard in one call
        # live events keep flowing after a failed resume
        async with join(server, room, token("oa")) as sender:
            await _send_all(sender, ["live-1"])
        [event] = await w.wait_events(1)
        assert event["offset"] > failed["offset"]


async def _next_of(client: Client, kind: str) -> dict[str, Any]:
    while True:
        msg = await client.recv()
        if msg["type"] == kind:
            return msg


async def test_coalesced_frames_carry_every_event_once_and_combos_count(socket_server: ServerProc) -> None:
    fast_server = socket_server
    room = await open_room(fast_server, "ch", "c1", "c2")
    async with join(fast_server, room, token("cw")) as w, join(fast_server, room, token("c1")) as a, \
            join(fast_server, room, token("c2")) as b:
        frames: list[int] = []
        orig = w.recv

        async def counting_recv(timeout: float = 10.0) -> dict:  # type: ignore[type-arg]
            msg = await orig(timeout)
            if msg["type"] == "events":
                frames.append(len(msg["events"]))
            return msg

        w.recv = counting_recv  # type: ignore[method-assign]
        ra, rb = await asyncio.gather(_send_all(a, [f"x{i}" for i in range(150)]),
                                      _send_all(b, [f"y{i}" for i in range(150)], "panda"))
        gifts = await w.wait_events(300)
        await w.drain(0.3)
    gifts = [e for e in w.events if e["type"] == "gift"]
    acked = {r["gift_id"] for r in ra + rb}
    assert len(gifts) == 300 and {e["gift_id"] for e in gifts} == acked
    assert max(frames) > 1, "a storm of 300 gifts must coalesce into multi-event frames"
    # combos: each sender's streak counts 1..150 in order
    for sender, gift in (("c1", "rose"), ("c2", "panda")):
        combos = [e["combo"] for e in gifts if e["from"]["id"] == sender]
        assert combos == list(range(1, 151)), (sender, combos[:10])
        assert all(e["gift"] == gift for e in gifts if e["from"]["id"] == sender)


async def test_combo_resets_after_window(make_server: Callable[..., ServerProc], redis_url: str) -> None:
    server = make_server(redis_url=redis_url, env={**ROOM_ENV, "GIFTSTREAM_COMBO_WINDOW_S": "0.3"}).start()
    room = await open_room(server, "wh", "wa")
    async with join(server, room, token("wa")) as a:
        await _send_all(a, ["w1", "w2"])
        await asyncio.sleep(0.6)  # the combo window (0.3 s) passes: what is tested
        await _send_all(a, ["w3"])
        await _send_all(a, ["w4"], gift="panda")
        gifts = await a.wait_events(4)
    assert [e["combo"] for e in gifts] == [1, 2, 1, 1]


async def test_presence_counts_across_two_nodes_and_gifts_cross_nodes(
        make_server: Callable[..., ServerProc], redis_url: str, tmp_path: Path) -> None:
    node_a = make_server(tmp_path / "a", redis_url=redis_url, env=ROOM_ENV).start()
    node_b = make_server(tmp_path / "b", redis_url=redis_url, env=ROOM_ENV,
                         database_url=f"sqlite:///{tmp_path / 'a' / 'giftstream.sqlite3'}").start()
    room = await open_room(node_a, "nh", "na")
    async with join(node_a, room, token("na")) as a, join(node_b, room, token("nb1")) as b1, \
            join(node_b, room, token("nb2")) as b2:
        await b1.until(lambda: b1.count("presence", viewers=3) > 0)
        info = (await Api(node_b, token("nb1")).client.get(f"/v1/rooms/{room}")).json()
        assert info["viewers"] == 3
        replies = await _send_all(a, [f"n{i}" for i in range(20)])
        for client in (b1, b2):
            gifts = await client.wait_events(20)
            assert sorted(g["gift_id"] for g in gifts) == sorted(r["gift_id"] for r in replies)
        # leaderboard pushed to node B's sockets too
        await b1.until(lambda: any(e["type"] == "leaderboard" and e["top"] and e["top"][0]["id"] == "na"
                                   for e in b1.events))
        last = [e for e in b1.events if e["type"] == "gift"][-1]["offset"]
        epoch = b1.welcome["epoch"]
        await b1.ws.close()
        # a gap made on node A, resumed on node B
        missed = await _send_all(a, [f"m{i}" for i in range(10)])
        async with join(node_b, room, token("nb1")) as again:
            await again.send({"type": "resume", "since": last, "epoch": epoch})
            got = await again.wait_events(10)
            await again.drain(0.3)
            got = [e for e in again.events if e["type"] == "gift"]
        assert sorted(e["gift_id"] for e in got) == sorted(r["gift_id"] for r in missed), (
            again.welcome["offset"], " ".join(e["offset"][-3:] for e in got))


async def test_leaderboard_ranks_gifters_by_coins_with_names(fast_server: ServerProc) -> None:
    room = await open_room(fast_server, "lh", "la", "lb")
    async with join(fast_server, room, token("la", name="Ada")) as a, \
            join(fast_server, room, token("lb", name="Bo")) as b:
        await _send_all(a, [f"a{i}" for i in range(3)], gift="perfume")  # 60 coins
        await _send_all(b, [f"b{i}" for i in range(7)], gift="finger_heart")  # 35 coins
        want = [{"id": "la", "name": "Ada", "coins": 60}, {"id": "lb", "name": "Bo", "coins": 35}]

        def pushed() -> bool:
            boards = [e["top"] for e in b.events if e["type"] == "leaderboard"]
            return bool(boards) and boards[-1] == want

        await b.until(pushed)
        info = (await Api(fast_server, token("lb")).client.get(f"/v1/rooms/{room}")).json()
        assert info["top_gifters"] == want
        # Pushed only when it changes: a quiet second adds no leaderboard event.
        count = sum(e["type"] == "leaderboard" for e in b.events)
        await b.drain(0.7)  # a quiet while: that nothing comes in it is what is tested
        assert sum(e["type"] == "leaderboard" for e in b.events) == count


async def test_slow_consumer_closed_with_4008_while_others_keep_receiving(
        make_server: Callable[..., ServerProc], redis_url: str, socket_env: dict[str, str]) -> None:
    server = make_server(redis_url=redis_url, env={**socket_env, "GIFTSTREAM_SEND_BUFFER_CAP": "131072",
                                                     "GIFTSTREAM_SOCKET_SNDBUF": "16384"}).start()
    room = await open_room(server, "sh", "sa", coins=100_000)
    stalled = raw_ws_connect(server.port, f"/v1/rooms/{room}/ws?token={token('stall')}")
    try:
        async with join(server, room, token("sw")) as w, join(server, room, token("sa")) as a:
            ids = [f"s{i}" for i in range(2000)]
            # the healthy watcher reads all along (it must never be the one dropped)
            watching = asyncio.create_task(w.wait_events(2000, timeout=60))
            await _send_all(a, ids)
            gifts = await watching
            assert len({g["gift_id"] for g in gifts}) == 2000
            # about 260 KB of events against a 16 KiB kernel send buffer and a 128 KiB cap
        # the stalled socket's data ends with a close frame carrying 4008
        stalled.settimeout(5)
        data = b""
        try:
            while True:
                chunk = stalled.recv(65536)
                if not chunk:
                    break
                data += chunk
        except (TimeoutError, ConnectionResetError):
            pass
        close_at = data.rfind(b"\x88")
        assert close_at >= 0, "no close frame"
        length = data[close_at + 1]
        code = struct.unpack("!H", data[close_at + 2 : close_at + 4])[0]
        reason = data[close_at + 4 : close_at + 2 + length]
        advice = json.loads(reason)
        assert code == 4008 and advice["reason"] == "slow consumer" and advice["reconnect"] is True, (code, reason)
        assert 200 <= advice["retry_ms"] < 1000
    finally:
        stalled.close()


async def test_keepalive_drops_dead_peers_and_keeps_live_ones(make_server: Callable[..., ServerProc],
                                                              redis_url: str, socket_env: dict[str, str]) -> None:
    server = make_server(redis_url=redis_url, env={**socket_env, "GIFTSTREAM_PING_INTERVAL_S": "0.5",
                                                   "GIFTSTREAM_PING_TIMEOUT_S": "0.5"}).start()
    room = await open_room(server, "kh")
    dead = raw_ws_connect(server.port, f"/v1/rooms/{room}/ws?token={token('dead')}")
    try:
        async with join(server, room, token("alive")) as alive:  # websockets answers pings itself
            info = Api(server, token("alive"))

            async def dead_dropped() -> bool:
                viewers: int = (await info.client.get(f"/v1/rooms/{room}")).json()["viewers"]
                return viewers == 1

            await wait_until(dead_dropped, timeout=15, interval=0.3)
            await info.close()
            await alive.send({"type": "ping", "id": "still-here"})
            while (await alive.recv())["type"] != "pong":
                pass
    finally:
        dead.close()


async def test_fragmented_messages_are_reassembled(socket_server: ServerProc) -> None:
    fast_server = socket_server
    room = await open_room(fast_server, "fh", "fa")
    async with join(fast_server, room, token("fa")) as a:
        payload = msgpack.packb({"type": "gift", "id": "frag-1", "gift": "rose", "count": 3})
        await a.ws.send([payload[:5], payload[5:11], payload[11:]])  # one message, three frames
        reply = await a.reply("frag-1")
        assert reply["type"] == "ack" and reply["balance"] == 4997


async def test_bus_reconnect_catches_up_without_gaps(fast_server: ServerProc, redis_url: str) -> None:
    import redis as redis_sync

    room = await open_room(fast_server, "bh", "ba")
    async with join(fast_server, room, token("bw")) as w, join(fast_server, room, token("ba")) as a:
        await _send_all(a, ["before"])
        await w.wait_events(1)
        # Cut the node's pub/sub connection; gifts published meanwhile never reach it by pub/sub.
        killed = redis_sync.Redis.from_url(redis_url).client_kill_filter(_type="pubsub")
        assert killed >= 1
        sent = await _send_all(a, [f"gap{i}" for i in range(30)])
        gifts = await w.wait_events(31, timeout=20)
        await w.drain(0.5)
    gifts = [e for e in w.events if e["type"] == "gift"]
    assert sorted(g["gift_id"] for g in gifts[1:]) == sorted(r["gift_id"] for r in sent)
    assert len({g["gift_id"] for g in gifts}) == len(gifts) == 31


async def test_workers_share_one_port_as_one_system(make_server: Callable[..., ServerProc], redis_url: str) -> None:
    server = make_server(redis_url=redis_url, env=ROOM_ENV, args=["--workers", "2"]).start()
    probe = Api(server, token("wp"))
    nodes = set()
    for _ in range(40):
        async with httpx.AsyncClient(base_url=server.base) as fresh:  # a new connection each time
            nodes.add((await fresh.get("/healthz")).json()["node"])
        if len(nodes) == 2:
            break
    assert len(nodes) == 2, "two worker processes answer on the one port"
    await probe.close()
    room = await open_room(server, "wh2", "wa2")
    async with contextlib.AsyncExitStack() as stack:
        viewers = [await stack.enter_async_context(join(server, room, token(f"wv{i}"))) for i in range(6)]
        sender = await stack.enter_async_context(join(server, room, token("wa2")))
        sent = await _send_all(sender, [f"w{i}" for i in range(20)])
        for v in viewers:
            got = await v.wait_events(20)
            assert sorted(g["gift_id"] for g in got) == sorted(r["gift_id"] for r in sent)


async def test_gifts_sent_before_the_welcome_are_not_lost(socket_server: ServerProc) -> None:
    fast_server = socket_server
    room = await open_room(fast_server, "eh", "ea")
    url = f"{fast_server.ws_base}/v1/rooms/{room}/ws?token={token('ea')}"
    async with websockets.connect(url, subprotocols=["giftstream.msgpack"]) as ws:  # type: ignore[list-item]
        # Pipelined right after the handshake, before the welcome can have arrived.
        for i in range(5):
            await ws.send(msgpack.packb({"type": "gift", "id": f"early{i}", "gift": "rose", "count": 1}))
        acks: set[str] = set()
        while len(acks) < 5:
            msg = msgpack.unpackb(await asyncio.wait_for(ws.recv(), 10))
            if msg["type"] == "ack":
                acks.add(msg["id"])
    assert acks == {f"early{i}" for i in range(5)}


async def test_a_published_gift_record_without_expiry_gets_one_from_the_presence_tick(
        fast_server: ServerProc, redis_url: str) -> None:
    """room_publish.lua's per-minute record of published gifts takes its expiry from the first
    gift a gateway publishes in that minute; a record left without one (Redis lost its data under
    a running gateway) gets it from the room's presence tick."""
    room = await open_room(fast_server, "xh")
    redis = __import__("redis").Redis.from_url(redis_url)
    async with join(fast_server, room, token("xv")):
        await wait_until(lambda: time.time() % 60 <= 55, timeout=10, interval=0.5)  # stay inside one minute
        key = RoomKeys(room).published(int(time.time() * 1000))
        redis.hset(key, "g0-0", "1")
        assert redis.pttl(key) == -1

        await wait_until(lambda: 0 < int(redis.pttl(key)) <= (120 + 120) * 1000, timeout=5)
    redis.close()
