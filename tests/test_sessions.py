"""Room lifecycle: one live room per host, rooms idle without their host end by themselves, the
LIVE-now list, and the session summary, which equals the settled ledger.

Real servers (valkey, SQLite and PostgreSQL through `database_url`); the ledger is read back
with plain SQL to compare.
"""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import pytest
import websockets

from server.keys import RoomKeys
from server.store.migrations import migrations, statements
from server.store.models import UNITS_PER_DIAMOND
from tests.conftest import _fresh_pg_database
from tests.support import Api, ServerProc, join, people_of, private_server, start_all, token, user_id, wait_until

pytestmark = pytest.mark.timeout(90)

# An idle room ends after 2 s here; presence ticks 5 times a second, so a connected host is seen
# well inside that.
IDLE_S = 2
QUICK = {"GIFTSTREAM_ROOM_IDLE_END_S": str(IDLE_S), "GIFTSTREAM_PRESENCE_INTERVAL_S": "0.2"}


async def sql(url: str, query: str, *args: Any) -> list[tuple[Any, ...]]:
    """Plain SQL on the server's ledger (`?` placeholders)."""
    if url.startswith("sqlite:///"):
        with contextlib.closing(sqlite3.connect(url.removeprefix("sqlite:///"))) as db, db:
            return [tuple(r) for r in db.execute(query, args).fetchall()]
    from server.store.queries import numbered

    conn = await asyncpg.connect(url)
    try:
        return [tuple(r) for r in await conn.fetch(numbered(query), *args)]
    finally:
        await conn.close()


def host(server: ServerProc, user: str) -> Api:
    return Api(server, token(user, "host", name=user.title()))


@pytest.fixture(scope="module", params=["sqlite", "postgres"])
def gateway(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProc]:
    """Per backend, one gateway for the module, on a valkey of its own, with no settler: a summary
    is read before its gifts settle (a test starts a settler when it wants them settled). Each
    test's hosts are its own (`hosts`), so one test's live room never refuses another's."""
    pg = _fresh_pg_database() if request.param == "postgres" else None
    tmp = tmp_path_factory.mktemp(f"sessions-{request.param}")
    url = next(pg) if pg is not None else f"sqlite:///{tmp / 'ledger.sqlite3'}"
    try:
        with private_server(tmp, database_url=url, args=["--no-settler"]) as server:
            yield server
    finally:
        if pg is not None:
            next(pg, None)


@pytest.fixture
async def people(gateway: ServerProc, request: pytest.FixtureRequest) -> AsyncIterator[Callable[..., Api]]:
    """Clients on the gateway whose user ids carry the test's name: `people("hana")` is this
    test's host hana, `people("vic", "viewer")` a viewer."""
    async with people_of(gateway, request.node.name, "host") as make:
        yield make


uid = user_id


async def _peak_is(api: Api, room: str, viewers: int) -> bool:
    return bool((await summary(api, room))["peak_viewers"] == viewers)


async def summary(api: Api, room: str) -> dict[str, Any]:
    r = await api.client.get(f"/v1/rooms/{room}/summary")
    assert r.status_code == 200, r.text
    return r.json()  # type: ignore[no-any-return]


# -- one live room per host ------------------------------------------------------------------


async def test_one_live_room_per_host_under_concurrent_creates(gateway: ServerProc,
                                                               people: Callable[..., Api]) -> None:
    database_url = str(gateway.database_url)
    hana = people("hana")
    answers = await asyncio.gather(*(hana.client.post("/v1/rooms", json={"title": f"t{i}"}) for i in range(10)))
    created = [r for r in answers if r.status_code == 201]
    assert len(created) == 1, [r.text for r in answers]
    room = created[0].json()["room_id"]
    refused = [r.json() for r in answers if r.status_code != 201]
    assert [(r["code"], r["room_id"]) for r in refused] == [("already_live", room)] * 9
    assert await sql(database_url, "SELECT id FROM rooms WHERE host_id = ? AND ended_ms IS NULL", uid(hana)) \
        == [(room,)]

    # Ended, the host can open a new LIVE; another host never was in the way.
    assert (await hana.client.post(f"/v1/rooms/{room}/end")).status_code == 200
    again = await hana.client.post("/v1/rooms", json={})
    assert again.status_code == 201, again.text
    assert again.json()["room_id"] != room
    assert (await people("omar").client.post("/v1/rooms", json={})).status_code == 201
    rows = await sql(database_url, "SELECT id, end_reason FROM rooms WHERE host_id = ? ORDER BY created_ms",
                     uid(hana))
    assert rows == [(room, "host"), (again.json()["room_id"], None)]


async def test_a_room_ended_in_redis_but_not_in_sql_does_not_block_its_host(
        gateway: ServerProc, people: Callable[..., Api]) -> None:
    """An end cut between Redis and SQL (a crash) is finished by the host's next open."""
    import redis.asyncio as aioredis

    hana = people("hana")
    room = await hana.create_room()
    r = aioredis.Redis.from_url(str(gateway.redis_url))
    await r.hset(RoomKeys(room).state, mapping={"live": "0", "end_reason": "host"})
    await r.aclose()
    again = await hana.client.post("/v1/rooms", json={})
    assert again.status_code == 201, again.text
    assert (await summary(hana, room))["end_reason"] == "host"


async def test_migration_ends_a_hosts_older_live_rooms(database_url: str) -> None:
    """A ledger from before one-live-room-per-host: each host's newest live room stays live, its
    older ones end when the next one started."""
    from server.store import open_store

    version = 7
    before = [(v, s) for v, s in migrations() if v < version]
    await _apply(database_url, before)
    rooms = [("a1", "ann", 100, None), ("a2", "ann", 200, None), ("a3", "ann", 300, None),
             ("b1", "bob", 100, 150), ("b2", "bob", 400, None), ("c1", "cat", 500, None)]
    for room in rooms:
        await sql(database_url, "INSERT INTO rooms (id, host_id, title, created_ms, ended_ms) VALUES (?, ?, 't', ?, ?)",
                  room[0], room[1], room[2], room[3])
    store = open_store(database_url)
    try:
        await store.migrate()
    finally:
        await store.close()
    got = await sql(database_url, "SELECT id, ended_ms, end_reason FROM rooms ORDER BY id")
    assert got == [("a1", 200, "superseded"), ("a2", 300, "superseded"), ("a3", None, None),
                   ("b1", 150, None), ("b2", None, None), ("c1", None, None)]


async def _apply(url: str, scripts: list[tuple[int, str]]) -> None:
    await sql(url, "CREATE TABLE IF NOT EXISTS schema_version (version INTEGER PRIMARY KEY)")
    for version, script in scripts:
        for statement in statements(script):
            await sql(url, statement)
        await sql(url, "INSERT INTO schema_version (version) VALUES (?)", version)


# -- the idle end ----------------------------------------------------------------------------


async def test_a_room_without_its_host_ends_by_itself_and_one_with_its_host_does_not(
        make_server: Callable[..., ServerProc], redis_url: str, tmp_path: Path) -> None:
    """Two nodes on one Redis and ledger, both sweeping: a host is seen on the node it is on, and
    an idle room ends once."""
    from server.store import open_store

    db = f"sqlite:///{tmp_path / 'ledger.sqlite3'}"
    store = open_store(db)  # migrated once here, so the two nodes start side by side
    try:
        await store.migrate()
    finally:
        await store.close()
    server, other = start_all(*(make_server(data_dir=tmp_path / name, redis_url=redis_url, database_url=db,
                                            env=QUICK) for name in ("a", "b")))
    never, left, stays = host(server, "never"), host(server, "left"), host(server, "stays")
    viewer = token("vic", name="Vic")
    try:
        rooms = dict(zip(("never", "left", "stays"),
                         await asyncio.gather(never.create_room(), left.create_room(), stays.create_room()),
                         strict=True))
        opened = time.monotonic()
        started = {who: (await summary(never, room))["started_ms"] for who, room in rooms.items()}
        async with join(server, rooms["stays"], stays.token), join(server, rooms["never"], viewer) as watcher:
            async with join(other, rooms["left"], left.token):
                # Connected past the limit: its room stays live meanwhile.
                await wait_until(lambda: time.monotonic() - opened > IDLE_S + 1, timeout=10)
                assert (await summary(left, rooms["left"]))["live"] is True
            gone_ms = int(time.time() * 1000)

            # The room its host never joined ends as the host's end would: room_ended, then 4410.
            await watcher.until(lambda: watcher.count("room_ended") == 1, timeout=10)
            assert [e.get("reason") for e in watcher.events if e["type"] == "room_ended"] == ["idle"]
            with pytest.raises(websockets.ConnectionClosed) as closed:
                await watcher.until(lambda: False, timeout=10)
            assert closed.value.rcvd is not None and closed.value.rcvd.code == 4410
            assert watcher.count("room_ended") == 1  # two sweepers, one end
            # At the limit (and within a sweep, a quarter of it), not long after.
            s = await summary(never, rooms["never"])
            assert IDLE_S * 1000 <= s["ended_ms"] - started["never"] < (IDLE_S + 2) * 1000, s

            # The room whose host left ends the limit after the host's last socket went.
            async def ended(room: str) -> bool:
                return (await summary(left, room))["live"] is False

            await wait_until(lambda: ended(rooms["left"]), timeout=10, interval=0.05)
            # host_seen is rewritten every quarter limit, from ticks every 0.2 s: the end comes
            # between the limit less those after the host left, and the limit plus a sweep.
            away = (await summary(left, rooms["left"]))["ended_ms"] - gone_ms
            assert (IDLE_S - 1.2) * 1000 <= away < (IDLE_S + 2) * 1000, away

            # The host still connected, past twice the limit (and every sweep since): live.
            await wait_until(lambda: time.monotonic() - opened > 2 * IDLE_S + 1, timeout=10)
            assert (await summary(stays, rooms["stays"]))["live"] is True
        for who in ("never", "left"):
            s = await summary(never, rooms[who])
            assert (s["live"], s["end_reason"]) == (False, "idle"), s
        # An idle end is an end: the host can open again, and ending it again changes nothing.
        assert (await never.client.post("/v1/rooms", json={})).status_code == 201
        r = await never.client.post(f"/v1/rooms/{rooms['never']}/end")
        assert r.json()["offset"] is None
    finally:
        for api in (never, left, stays):
            await api.close()


# -- the session summary ---------------------------------------------------------------------


async def test_the_summary_equals_the_settled_ledger(gateway: ServerProc, people: Callable[..., Api],
                                                     make_server: Callable[..., ServerProc], tmp_path: Path) -> None:
    """Gifts from several viewers while no settler runs: the summary says `settled: false` and
    the ledger's figures so far; once a settler has run, `settled: true` and figures equal to a
    direct query of the gifts table, top gifters by coins then id."""
    database_url = str(gateway.database_url)
    hana = people("hana")
    names = ["uma", "bea", "abe", "cal"]
    viewers = {n: people(n, "viewer") for n in names}
    # coins per viewer (a rose is 1 coin, a panda 5): uma 13, abe and bea 10 each (the id breaks
    # the tie), cal nothing
    sends = {"uma": [("rose", 3), ("panda", 2)], "bea": [("panda", 1), ("rose", 5)],
             "abe": [("rose", 10)], "cal": []}
    room = await hana.create_room()
    for v in viewers.values():
        assert (await v.recharge(coins=100)).status_code == 201
    async with contextlib.AsyncExitStack() as stack:
        socks = {n: await stack.enter_async_context(join(gateway, room, v.token)) for n, v in viewers.items()}
        for n, gifts in sends.items():
            for i, (gift, count) in enumerate(gifts):
                await socks[n].gift(f"{n}-{i}", gift, count)
                assert (await socks[n].reply(f"{n}-{i}"))["type"] == "ack"
        # A node writes a room's count at most every 0.1 s (rooms/presence.py): the peak follows.
        await wait_until(lambda: _peak_is(hana, room, 4), timeout=10)
        live = await summary(hana, room)
    acked = sum(len(g) for g in sends.values())
    assert live["live"] is True and live["ended_ms"] is None
    assert live["peak_viewers"] == 4  # four users' sockets; the host never joined
    assert live["acknowledged"]["gifts"] == acked and live["settled"] is False and live["gifts"] == 0

    assert (await hana.client.post(f"/v1/rooms/{room}/end")).status_code == 200
    ended = await summary(hana, room)
    assert (ended["live"], ended["end_reason"], ended["settled"]) == (False, "host", False)
    assert ended["peak_viewers"] == 4 and ended["goal_reached"] is False
    assert ended["duration_s"] == (ended["ended_ms"] - ended["started_ms"]) // 1000

    # A settler on the same Redis and ledger settles what the room acknowledged.
    make_server(data_dir=tmp_path / "settler", redis_url=gateway.redis_url, database_url=database_url).start()

    async def settled() -> bool:
        return bool((await summary(hana, room))["settled"])

    await wait_until(settled, timeout=30)
    final = await summary(hana, room)

    [(count, coins, units, gifters)] = await sql(
        database_url, "SELECT COUNT(*), SUM(coins), SUM(diamond_units), COUNT(DISTINCT sender_id) FROM gifts"
        " WHERE room_id = ?", room)
    assert (final["gifts"], final["coins"], final["diamond_units"], final["unique_gifters"]) \
        == (count, coins, units, gifters) == (acked, 13 + 10 + 10, units, 3)
    assert final["diamonds"] == units // UNITS_PER_DIAMOND
    assert final["acknowledged"] == {"gifts": acked, "coins": coins}
    assert [(t["user_id"], t["name"], t["coins"]) for t in final["top_gifters"]] \
        == [(uid(viewers["uma"]), "Uma", 13), (uid(viewers["abe"]), "Abe", 10), (uid(viewers["bea"]), "Bea", 10)]
    assert final["host"] == {"id": uid(hana), "name": "Hana"}


async def test_a_summary_is_public_and_404_for_no_room(gateway: ServerProc, people: Callable[..., Any]) -> None:
    async with httpx.AsyncClient(base_url=gateway.base) as anyone:
        r = await anyone.get("/v1/rooms/no-such-room/summary")
        assert (r.status_code, r.json()["code"]) == (404, "not_found")
        room = await people("hana").create_room()
        r = await anyone.get(f"/v1/rooms/{room}/summary")
        assert r.status_code == 200 and r.json()["live"] is True and r.json()["settled"] is True
        # An admin may end anyone's room: the summary says who ended it.
        admin = people("support", "admin")
        assert (await admin.client.post(f"/v1/rooms/{room}/end")).status_code == 200
        r = await anyone.get(f"/v1/rooms/{room}/summary")
        assert (r.json()["live"], r.json()["end_reason"]) == (False, "admin")


# -- LIVE now --------------------------------------------------------------------------------


async def test_live_now_pages_newest_first_with_a_stable_cursor(gateway: ServerProc,
                                                                people: Callable[..., Api]) -> None:
    """The module's other tests leave rooms live too: this test's five are each listed once, in
    start order, among them."""
    hosts = [people(f"h{i}") for i in range(5)]
    gifter = people("gus", "viewer")
    anyone = httpx.AsyncClient(base_url=gateway.base)
    try:
        rooms = [await h.create_room() for h in hosts]  # one after the other: each starts later
        assert (await gifter.recharge(coins=100)).status_code == 201
        async with join(gateway, rooms[1], gifter.token) as g, join(gateway, rooms[1], token("x1")), \
                join(gateway, rooms[3], token("x2")):
            await g.gift("g1", "panda", 2)
            assert (await g.reply("g1"))["type"] == "ack"

            async def page(cursor: str | None, limit: int = 2) -> dict[str, Any]:
                params = {"live": "1", "limit": str(limit), **({"cursor": cursor} if cursor else {})}
                r = await anyone.get("/v1/rooms", params=params)
                assert r.status_code == 200, r.text
                return r.json()  # type: ignore[no-any-return]

            async def counted(room: str, viewers: int) -> bool:  # count writes are 0.1 s apart
                return bool((await anyone.get(f"/v1/rooms/{room}")).json()["viewers"] == viewers)

            await wait_until(lambda: counted(rooms[1], 2), timeout=10)
            pages = [await page(None)]
            # A room opened after the first page does not shift the pages after it.
            newest = await people("late").create_room()
            while pages[-1]["next_cursor"] is not None:
                pages.append(await page(pages[-1]["next_cursor"]))
            items = [i for p in pages for i in p["items"]]
            assert all(len(p["items"]) == 2 for p in pages[:-1]) and len(pages[-1]["items"]) in (1, 2)
            assert newest not in [i["room_id"] for i in items]
            assert len({i["room_id"] for i in items}) == len(items)
            assert [i["room_id"] for i in items if i["room_id"] in rooms] == rooms[::-1]
            assert items == sorted(items, key=lambda i: (i["started_ms"], i["room_id"]), reverse=True)
            assert (await page(None, 1))["items"][0]["room_id"] == newest
            by_id = {i["room_id"]: i for i in items}
            assert by_id[rooms[1]]["viewers"] == 2 and by_id[rooms[1]]["coins"] == 10
            assert by_id[rooms[3]]["viewers"] == 1 and by_id[rooms[3]]["coins"] == 0
            assert by_id[rooms[0]]["viewers"] == 0
            assert by_id[rooms[2]]["host"] == {"id": uid(hosts[2]), "name": "H2"}

        # An ended room leaves the list and heads the recently ended one.
        assert (await hosts[2].client.post(f"/v1/rooms/{rooms[2]}/end")).status_code == 200
        live = [i["room_id"] for i in (await anyone.get("/v1/rooms", params={"limit": "100"})).json()["items"]]
        assert rooms[2] not in live and {*rooms, newest} - {rooms[2]} <= set(live)
        ended = (await anyone.get("/v1/rooms", params={"live": "0"})).json()
        assert ended["items"][0]["room_id"] == rooms[2] and ended["items"][0]["end_reason"] == "host"

        for bad in ({"live": "2"}, {"limit": "101"}, {"limit": "0"}, {"cursor": "nonsense"}):
            r = await anyone.get("/v1/rooms", params=bad)
            assert (r.status_code, r.json()["code"]) == (400, "bad_request"), (bad, r.text)
    finally:
        await anyone.aclose()
