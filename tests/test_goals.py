"""LIVE goals: set by the host, counted in room_publish.lua, pushed as `goal` events at most once
per interval (the one that reaches the target at once, once), a held-back change sent by the tick."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis

from server.keys import RoomKeys
from server.protocol import parse_offset
from server.rooms.bus import decode_event
from tests.support import FAST, Api, Client, ServerProc, join, open_room, private_server, token, wait_until

INTERVAL_MS = 100
# Ticks every 0.2 s: a held-back progress goes out within about 0.3 s of the last gift.
GOAL_ENV = {**FAST, "GIFTSTREAM_PRESENCE_INTERVAL_S": "0.2", "GIFTSTREAM_GOAL_EVENT_INTERVAL_MS": str(INTERVAL_MS)}

pytestmark = pytest.mark.timeout(60)


@pytest.fixture(scope="module")
def goal_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProc]:
    """One server for the module, on a valkey of its own: each test has its own hosts and rooms."""
    with private_server(tmp_path_factory.mktemp("goals"), env=GOAL_ENV) as server:
        yield server


async def _put(server: ServerProc, room: str, body: Any, who: str | None) -> httpx.Response:
    """PUT the goal as `who` (a host; "admin" an admin; None without a token)."""
    headers = {"authorization": f"Bearer {token(who, 'admin' if who == 'admin' else 'host')}"} if who else {}
    async with httpx.AsyncClient(base_url=server.base, timeout=30) as client:
        return await client.put(f"/v1/rooms/{room}/goal", json=body, headers=headers)


async def _get(server: ServerProc, path: str) -> Any:
    async with httpx.AsyncClient(base_url=server.base, timeout=30) as client:
        return (await client.get(path)).json()


async def _gifts(client: Client, n: int, prefix: str, gift: str = "rose") -> None:
    """One at a time, each acknowledged before the next: a storm that lasts several intervals."""
    for i in range(n):
        await client.gift(f"{prefix}{i}", gift)
        assert (await client.reply(f"{prefix}{i}"))["type"] == "ack"


def goal_events(client: Client, goal_id: str) -> list[dict[str, Any]]:
    return [e for e in client.events if e["type"] == "goal" and e["goal_id"] == goal_id]


def assert_paced(events: list[dict[str, Any]]) -> None:
    """Consecutive goal events are at least an interval apart, except the one that is `done`."""
    for before, after in itertools.pairwise(events):
        if not after["done"]:
            assert after["ts"] - before["ts"] >= INTERVAL_MS, (before, after)
        assert after["ts"] >= before["ts"], (before, after)


async def test_a_gift_goal_and_a_coins_goal_progress_and_complete(goal_server: ServerProc) -> None:
    room = await open_room(goal_server, "gh", "ga")
    async with join(goal_server, room, token("ga")) as sender, join(goal_server, room, token("gw")) as watcher:
        assert watcher.welcome["goal"] is None
        r = await _put(goal_server, room, {"gift": "rose", "count": 10}, "gh")
        assert r.status_code == 200, r.text
        goal = r.json()
        assert goal == {"room_id": room, "goal_id": goal["goal_id"], "gift": "rose", "target": 10, "progress": 0,
                        "done": False}
        await watcher.until(lambda: len(goal_events(watcher, goal["goal_id"])) == 1)
        # Other gifts do not count toward a gift goal.
        await _gifts(sender, 3, "p", "panda")
        await _gifts(sender, 9, "r")
        await wait_until(lambda: _progress_is(goal_server, room, 9))
        async with join(goal_server, room, token("gw2")) as late:
            assert late.welcome["goal"] == {**{k: goal[k] for k in ("goal_id", "gift", "target")},
                                            "progress": 9, "done": False}
        await _gifts(sender, 3, "s")
        await watcher.until(lambda: any(e["done"] for e in goal_events(watcher, goal["goal_id"])))
        events = goal_events(watcher, goal["goal_id"])
        assert [e["done"] for e in events].count(True) == 1 and events[-1]["done"]
        assert events[-1]["progress"] == 10 and events[-1]["target"] == 10 and events[-1]["gift"] == "rose"
        assert_paced(events)
        # Done stays done: the gifts after it are not counted.
        got = await _get(goal_server, f"/v1/rooms/{room}/goal")
        assert got == {**goal, "progress": 10, "done": True}
        info = await _get(goal_server, f"/v1/rooms/{room}")
        assert info["goal"] == {k: v for k, v in got.items() if k != "room_id"}

        # A coins goal replaces it, from 0: 20 coins of any gift.
        r = await _put(goal_server, room, {"coins": 20}, "gh")
        coins_goal = r.json()
        assert r.status_code == 200 and coins_goal["goal_id"] != goal["goal_id"], r.text
        assert coins_goal == {"room_id": room, "goal_id": coins_goal["goal_id"], "target": 20, "progress": 0,
                              "done": False}
        await _gifts(sender, 2, "c", "panda")
        await _gifts(sender, 9, "d")
        await _gifts(sender, 1, "e", "finger_heart")
        await watcher.until(lambda: any(e["done"] for e in goal_events(watcher, coins_goal["goal_id"])))
        done = [e for e in goal_events(watcher, coins_goal["goal_id"]) if e["done"]]
        assert len(done) == 1 and done[0]["progress"] == 24 and "gift" not in done[0]
        # The last gift event before the done one is the gift that reached the target.
        gifts_before = [e for e in watcher.events
                        if e["type"] == "gift" and parse_offset(e["offset"]) < parse_offset(done[0]["offset"])]
        assert gifts_before[-1]["gift"] == "finger_heart"


async def _progress_is(server: ServerProc, room: str, progress: int) -> bool:
    return bool((await _get(server, f"/v1/rooms/{room}/goal")).get("progress") == progress)


async def test_storm_over_two_nodes_every_viewer_sees_done_once_and_the_last_progress(
        goal_server: ServerProc, make_server: Callable[..., ServerProc], tmp_path: Path) -> None:
    """5 senders x 50 gifts through sockets on two gateways, 4 viewers: goal events at most one an
    interval (by their ts), `done` once for everyone, and the progress after the last gift shown."""
    redis_url = str(goal_server.redis_url)
    node_a = goal_server
    node_b = make_server(tmp_path / "b", redis_url=redis_url, env=GOAL_ENV,
                         database_url=f"sqlite:///{node_a.data_dir / 'giftstream.sqlite3'}").start()
    senders = [f"ss{i}" for i in range(5)]
    room = await open_room(node_a, "sh", *senders)
    nodes = [node_a, node_b]
    async with contextlib.AsyncExitStack() as stack:
        viewers = [await stack.enter_async_context(join(nodes[i % 2], room, token(f"sv{i}"))) for i in range(4)]
        socks = [await stack.enter_async_context(join(nodes[i % 2], room, token(s))) for i, s in enumerate(senders)]

        async def storm(tag: str) -> None:
            await asyncio.gather(*(_gifts(s, 50, f"{tag}{i}-") for i, s in enumerate(socks)))

        async def everyone(condition: Callable[[Client], bool]) -> None:
            await asyncio.gather(*(v.until(lambda v=v: condition(v), timeout=20) for v in viewers))

        # A goal out of reach: the progress after the storm's last gift reaches every viewer, sent
        # by the tick when the interval held it back.
        far = (await _put(node_a, room, {"coins": 1_000_000}, "sh")).json()
        await storm("a")
        await everyone(lambda v: any(e["progress"] == 250 for e in goal_events(v, far["goal_id"])))
        for v in viewers:
            events = goal_events(v, far["goal_id"])
            assert_paced(events)
            assert not any(e["done"] for e in events)
            assert [e["progress"] for e in events] == sorted(e["progress"] for e in events)
            assert len(events) < 60, "a goal event per gift: the interval held nothing back"

        # A goal the storm passes: `done` once, for every viewer, and nothing for it after that.
        near = (await _put(node_b, room, {"gift": "rose", "count": 200}, "sh")).json()
        await storm("b")
        await everyone(lambda v: any(e["done"] for e in goal_events(v, near["goal_id"])))
        # Every sender's 100 coins on the leaderboard: the ticks ran after the last gift.
        await everyone(lambda v: any(e["type"] == "leaderboard" and len(e["top"]) == 5
                                     and all(t["coins"] == 100 for t in e["top"]) for e in v.events))
        for v in viewers:
            events = goal_events(v, near["goal_id"])
            assert [e["done"] for e in events].count(True) == 1 and events[-1]["done"], events
            assert events[-1]["progress"] >= 200
            assert_paced(events)

    # The room's stream agrees: one done event for the goal, and it is the goal's last.
    r = redis.Redis.from_url(redis_url)
    stored = [decode_event(mid.decode(), 0, f[b"e"]) for mid, f in r.xrange(RoomKeys(room).events)]
    near_events = [e for e in stored if e["type"] == "goal" and e["goal_id"] == near["goal_id"]]
    assert [e["done"] for e in near_events].count(True) == 1 and near_events[-1]["done"]
    assert r.hget(RoomKeys(room).state, "goal_progress") == b"200"


async def test_a_resume_replays_goal_events(goal_server: ServerProc) -> None:
    room = await open_room(goal_server, "rh", "ra")
    async with join(goal_server, room, token("rw")) as watcher:
        since, epoch = watcher.welcome["offset"], watcher.welcome["epoch"]
    goal = (await _put(goal_server, room, {"gift": "panda", "count": 2}, "rh")).json()
    async with join(goal_server, room, token("ra")) as sender:
        await _gifts(sender, 2, "x", "panda")
    async with join(goal_server, room, token("rw")) as again:
        assert again.welcome["goal"]["done"] is True
        await again.send({"type": "resume", "since": since, "epoch": epoch})
        await again.until(lambda: any(e["done"] for e in goal_events(again, goal["goal_id"])))
        replayed = goal_events(again, goal["goal_id"])
    assert replayed[0]["progress"] == 0 and replayed[-1] == {
        "type": "goal", "goal_id": goal["goal_id"], "gift": "panda", "target": 2, "progress": 2, "done": True,
        "ts": replayed[-1]["ts"], "offset": replayed[-1]["offset"]}

    # A goal reached stays reached for the session's summary, though the host sets another (not
    # reached) and then clears it: live, and as kept at the end.
    assert (await _put(goal_server, room, {"coins": 10**6}, "rh")).status_code == 200
    assert (await _get(goal_server, f"/v1/rooms/{room}/summary"))["goal_reached"] is True
    host = Api(goal_server, token("rh", "host"))
    try:
        assert (await host.client.delete(f"/v1/rooms/{room}/goal")).status_code == 200
        assert (await host.client.post(f"/v1/rooms/{room}/end")).status_code == 200
    finally:
        await host.close()
    ended = await _get(goal_server, f"/v1/rooms/{room}/summary")
    assert (ended["live"], ended["goal_reached"]) == (False, True)


async def test_only_the_host_or_an_admin_sets_or_clears_it(goal_server: ServerProc) -> None:
    room = await open_room(goal_server, "oh")
    body = {"coins": 100}
    assert (await _put(goal_server, room, body, None)).status_code == 401
    viewer = Api(goal_server, token("ov"))
    other_host = Api(goal_server, token("oh2", "host"))
    host = Api(goal_server, token("oh", "host"))
    for api in (viewer, other_host):
        r = await api.client.put(f"/v1/rooms/{room}/goal", json=body)
        assert r.status_code == 403 and r.json()["code"] == "forbidden", r.text
        assert (await api.client.delete(f"/v1/rooms/{room}/goal")).status_code == 403
    assert (await viewer.client.get(f"/v1/rooms/{room}/goal")).json()["code"] == "not_found"
    assert (await _put(goal_server, room, body, "admin")).status_code == 200
    assert (await viewer.client.get(f"/v1/rooms/{room}/goal")).json()["target"] == 100

    # Bad bodies, an unknown gift, a room that does not exist.
    for bad in ({}, {"coins": 0}, {"coins": "5"}, {"coins": True}, {"coins": 10**13}, {"gift": "rose"},
                {"gift": "rose", "count": 5, "coins": 5}, {"count": 5}, {"gift": 5, "count": 5}, [1]):
        r = await _put(goal_server, room, bad, "oh")
        assert r.status_code == 400 and r.json()["code"] == "bad_request", (bad, r.text)
    r = await _put(goal_server, room, {"gift": "unicorn", "count": 5}, "oh")
    assert r.status_code == 400 and r.json()["code"] == "unknown_gift", r.text
    assert (await _put(goal_server, "no-such-room", body, "oh")).status_code == 404

    # The host clears it: the answer is the goal as it was, viewers get a `cleared` event.
    async with join(goal_server, room, token("ov")) as watcher:
        goal = watcher.welcome["goal"]
        r = await host.client.delete(f"/v1/rooms/{room}/goal")
        assert r.status_code == 200 and r.json() == {"room_id": room, **goal}, r.text
        await watcher.until(lambda: any(e.get("cleared") for e in goal_events(watcher, goal["goal_id"])))
    assert watcher.welcome["goal"]["progress"] == 0
    assert (await viewer.client.get(f"/v1/rooms/{room}/goal")).status_code == 404
    assert (await host.client.delete(f"/v1/rooms/{room}/goal")).status_code == 404
    for api in (viewer, other_host, host):
        await api.close()


async def test_no_goal_on_an_ended_room(goal_server: ServerProc) -> None:
    room = await open_room(goal_server, "eh")
    host = Api(goal_server, token("eh", "host"))
    assert (await _put(goal_server, room, {"coins": 10}, "eh")).status_code == 200
    assert (await host.client.post(f"/v1/rooms/{room}/end")).status_code == 200
    r = await _put(goal_server, room, {"coins": 10}, "eh")
    assert r.status_code == 409 and r.json()["code"] == "room_not_live", r.text
    r = await host.client.delete(f"/v1/rooms/{room}/goal")
    assert r.status_code == 409 and r.json()["code"] == "room_not_live", r.text
    # The goal it ended with can still be read.
    assert (await host.client.get(f"/v1/rooms/{room}/goal")).json()["target"] == 10
    await host.close()


async def test_a_room_made_again_under_its_id_starts_without_a_goal(goal_server: ServerProc) -> None:
    """The demo room is made again at every start, with a new epoch: the last life's goal is gone."""
    from redis.asyncio import Redis

    from server.rooms.state import Rooms
    from server.settings import Settings

    room = await open_room(goal_server, "ah")
    assert (await _put(goal_server, room, {"coins": 10}, "ah")).status_code == 200
    client = Redis.from_url(str(goal_server.redis_url))
    try:
        await Rooms(client, None, Settings()).create(room, "ah", "Ah", "again")  # type: ignore[arg-type]
    finally:
        await client.aclose()
    assert (await _get(goal_server, f"/v1/rooms/{room}/goal"))["code"] == "not_found"
    assert (await _get(goal_server, f"/v1/rooms/{room}"))["goal"] is None
