"""Gifts on videos over HTTP: charged exactly as a room gift (the same script, idempotency, checks
and codes), settled to the video's owner, listed by a stable cursor, and audited with room gifts.

One server per backend (SQLite, PostgreSQL) on a valkey of its own serves every test of a backend;
each test has its own users and videos, so the figures it checks are its own, and the audit at the
end covers all of them together.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import httpx
import pytest

from tests.conftest import _fresh_pg_database
from tests.payments import audit
from tests.support import Api, ServerProc, TcpProxy, join, people_of, private_server, token, user_id, wait_until

pytestmark = pytest.mark.timeout(60)

# 1/10,000 diamond per coin at the default 50% share (docs/protocol.md, "Diamonds").
UNITS_PER_COIN = 5000


@pytest.fixture(scope="module", params=["sqlite", "postgres"])
def live(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProc]:
    """A server and a valkey of its own: the session valkey is flushed by other tests' fixtures."""
    pg = _fresh_pg_database() if request.param == "postgres" else None
    database_url = next(pg) if pg is not None else None
    try:
        with private_server(tmp_path_factory.mktemp(f"videos-{request.param}"), database_url=database_url) as server:
            yield server
    finally:
        if pg is not None:
            next(pg, None)


@pytest.fixture
async def users(live: ServerProc, request: pytest.FixtureRequest) -> AsyncIterator[Callable[..., Api]]:
    """API clients for this test's own users (their ids carry the test's name)."""
    async with people_of(live, request.node.name) as make:
        yield make


uid = user_id


async def new_video(host: Api, title: str = "My video") -> str:
    r = await host.client.post("/v1/videos", json={"title": title})
    assert r.status_code == 201, r.text
    return str(r.json()["video_id"])


async def fund(viewer: Api, coins: int) -> None:
    r = await viewer.recharge(coins=coins)
    assert r.status_code == 201, r.text


async def gift(viewer: Api, video: str, gid: str, name: str = "rose", count: int = 1) -> httpx.Response:
    return await viewer.client.post(f"/v1/videos/{video}/gifts", json={"id": gid, "gift": name, "count": count})


async def coins(viewer: Api) -> int:
    return int((await viewer.wallet())["coins"])


async def settled(host: Api, gifts: int) -> dict[str, Any]:
    """The host's earnings once `gifts` of their gifts are settled (about a second)."""
    out: dict[str, Any] = {}

    async def done() -> bool:
        out.update(await host.earnings())
        return bool(out["gifts_received"] >= gifts)

    await wait_until(done, timeout=20, message=lambda: f"not settled: {out}")
    return out


async def test_a_host_creates_a_video_anyone_reads_it(users: Callable[..., Api]) -> None:
    host, viewer = users("host", "host"), users("viewer")
    r = await host.client.post("/v1/videos", json={"title": "Cooking \u202eshow"})
    assert r.status_code == 201, r.text
    video = r.json()
    assert video["video_id"].startswith("v-") and "}" not in video["video_id"]
    assert video["title"] == "Cooking show"  # the bidi override is removed, as from a room title
    assert video["owner"] == {"id": uid(host), "name": "Host"} and isinstance(video["created_ms"], int)
    r = await viewer.client.get(f"/v1/videos/{video['video_id']}")
    assert r.status_code == 200, r.text
    assert r.json() == {**video, "gifts_total": 0, "coins_total": 0}

    r = await viewer.client.post("/v1/videos", json={"title": "not mine to make"})
    assert (r.status_code, r.json()["code"]) == (403, "forbidden")
    for body in ({}, {"title": ""}, {"title": 5}, {"title": "x" * 201}):
        r = await host.client.post("/v1/videos", json=body)
        assert (r.status_code, r.json()["code"]) == (400, "bad_request"), body
    # A NUL (which PostgreSQL text cannot hold) or an id too long to be ours: not_found, no error.
    for missing in ("v-nothing", "nothing", "v-" + "x" * 100, "v-%00nul"):
        r = await viewer.client.get(f"/v1/videos/{missing}")
        assert (r.status_code, r.json()["code"]) == (404, "not_found"), missing


async def test_a_gift_is_charged_once_per_id_and_credits_the_owner(
        live: ServerProc, users: Callable[..., Api]) -> None:
    host, viewer = users("host", "host"), users("viewer")
    video = await new_video(host)
    await fund(viewer, 30)

    first = await gift(viewer, video, "g-1", "rose", 3)
    assert first.status_code == 200, first.text
    body = first.json()
    assert body["balance"] == 27 and body["replayed"] is False and body["video_id"] == video and body["id"] == "g-1"
    again = (await gift(viewer, video, "g-1", "rose", 3)).json()
    assert (again["gift_id"], again["balance"], again["replayed"]) == (body["gift_id"], 27, True)

    # 20 retries of one id at once: one charge, one gift id, one balance.
    answers = await asyncio.gather(*(gift(viewer, video, "g-2", "panda") for _ in range(20)))
    assert {r.status_code for r in answers} == {200}, [r.text for r in answers]
    assert len({r.json()["gift_id"] for r in answers}) == 1
    assert {r.json()["balance"] for r in answers} == {22}
    assert sum(not r.json()["replayed"] for r in answers) == 1
    assert await coins(viewer) == 22

    # The same id with another gift, count or target is a conflict, and charges nothing.
    for name, count in (("rose", 4), ("panda", 3)):
        r = await gift(viewer, video, "g-1", name, count)
        assert (r.status_code, r.json()["code"]) == (409, "idempotency_conflict"), r.text
    other = await new_video(host, "another")
    r = await gift(viewer, other, "g-1", "rose", 3)
    assert (r.status_code, r.json()["code"]) == (409, "idempotency_conflict"), r.text
    room = await host.create_room()
    async with join(live, room, viewer.token) as sock:
        await sock.gift("g-1", "rose", 3)
        assert (await sock.reply("g-1"))["code"] == "idempotency_conflict"
    assert await coins(viewer) == 22

    # Settled: the owner's diamonds, and the video's totals.
    earned = await settled(host, 2)
    assert (earned["gifts_received"], earned["diamond_units"]) == (2, 8 * UNITS_PER_COIN)
    r = await viewer.client.get(f"/v1/videos/{video}")
    assert (r.json()["gifts_total"], r.json()["coins_total"]) == (2, 8)


async def test_refusals_have_the_sockets_codes_and_charge_nothing(users: Callable[..., Api]) -> None:
    host, viewer, admin = users("host", "host"), users("viewer"), users("admin", "admin")
    minor = users("minor", birthdate="2020-01-01")
    video = await new_video(host)
    await fund(viewer, 30)
    refusals: list[tuple[Api, str, dict[str, Any], int, str]] = [
        (viewer, video, {"id": "r-1", "gift": "no_such_gift"}, 400, "unknown_gift"),
        (viewer, video, {"id": "r-1", "gift": "rose", "count": 0}, 400, "bad_count"),
        (viewer, video, {"id": "r-1", "gift": "rose", "count": 10_000}, 400, "bad_count"),
        (viewer, video, {"gift": "rose"}, 400, "bad_request"),
        (viewer, video, {"id": "r-1", "gift": "rose", "count": "2"}, 400, "bad_request"),
        (viewer, "v-no-such-video", {"id": "r-1", "gift": "rose"}, 404, "not_found"),
        (viewer, "no-such-video", {"id": "r-1", "gift": "rose"}, 404, "not_found"),
        (viewer, "v-%00nul", {"id": "r-1", "gift": "rose"}, 404, "not_found"),
        (host, video, {"id": "r-1", "gift": "rose"}, 403, "not_allowed"),
        (minor, video, {"id": "r-1", "gift": "rose"}, 403, "age_restricted"),
        # 31 coins on a balance of 30: nothing is taken, not even part of it.
        (viewer, video, {"id": "r-1", "gift": "rose", "count": 31}, 402, "insufficient_funds"),
    ]
    for who, target, body, status, code in refusals:
        r = await who.client.post(f"/v1/videos/{target}/gifts", json=body)
        assert (r.status_code, r.json()["code"]) == (status, code), (body, r.text)
        assert set(r.json()) == {"code", "message"}
    assert (await viewer.client.post(f"/v1/videos/{video}/gifts")).status_code == 400
    assert (await viewer.client.post(f"/v1/videos/{video}/gifts", json={"id": "r-1", "gift": "rose"},
                                     headers={"authorization": ""})).status_code == 401
    assert await coins(viewer) == 30

    # A monthly cap (lowered at once) and an admin's restriction, both before any debit.
    r = await viewer.client.put("/v1/wallet/budget", json={"monthly_budget": 10})
    assert r.status_code == 200, r.text
    r = await gift(viewer, video, "r-1", "rose", 11)
    assert (r.status_code, r.json()["code"]) == (402, "budget_exceeded")
    r = await admin.client.post(f"/v1/admin/users/{uid(viewer)}/restrict", json={"reason": "review"})
    assert r.status_code == 200, r.text
    r = await gift(viewer, video, "r-1", "rose", 1)
    assert (r.status_code, r.json()["code"]) == (403, "account_restricted")
    assert (await admin.client.post(f"/v1/admin/users/{uid(viewer)}/unrestrict")).status_code == 200
    assert await coins(viewer) == 30

    # A refused id is unused: the same id now charges.
    r = await gift(viewer, video, "r-1", "rose", 1)
    assert r.status_code == 200 and r.json()["replayed"] is False and r.json()["balance"] == 29, r.text


async def test_concurrent_gifts_never_overdraw(users: Callable[..., Api]) -> None:
    """50 gifts of 5 coins at once on a balance of 30: six are charged, the rest refused whole."""
    host, viewer = users("host", "host"), users("viewer")
    video = await new_video(host)
    await fund(viewer, 30)
    answers = await asyncio.gather(*(gift(viewer, video, f"c-{i}", "panda") for i in range(50)))
    codes = [r.json().get("code", "ok") for r in answers]
    assert codes.count("ok") == 6 and codes.count("insufficient_funds") == 44, codes
    assert {r.status_code for r in answers} == {200, 402}
    charged = sorted(r.json()["balance"] for r in answers if r.status_code == 200)
    assert charged == [0, 5, 10, 15, 20, 25]
    assert await coins(viewer) == 0
    earned = await settled(host, 6)
    assert (earned["gifts_received"], earned["diamond_units"]) == (6, 30 * UNITS_PER_COIN)


async def test_over_the_users_rate_is_rate_limited_and_a_retry_still_learns_its_charge(
        users: Callable[..., Api]) -> None:
    """The user's bucket (gift_burst 50, gift_rate_per_s 20) spent at once: later gifts are
    rate_limited and charge nothing, but a retry of a charged id answers its first result."""
    host, viewer = users("host", "host"), users("viewer")
    video = await new_video(host)
    await fund(viewer, 500)
    answers: list[httpx.Response] = []
    # Bursts of 80 until one is refused: a slow machine may refill the bucket during a burst.
    for burst in range(5):
        answers += await asyncio.gather(*(gift(viewer, video, f"l-{burst}-{i}") for i in range(80)))
        if any(r.status_code == 429 for r in answers):
            break
    ok = [r.json() for r in answers if r.status_code == 200]
    limited = [r.json() for r in answers if r.status_code == 429]
    assert len(ok) + len(limited) == len(answers) and limited and len(ok) >= 50, [r.text for r in answers]
    assert {b["code"] for b in limited} == {"rate_limited"}
    assert await coins(viewer) == 500 - len(ok)
    retry = await gift(viewer, video, ok[0]["id"])
    assert retry.status_code == 200 and retry.json()["gift_id"] == ok[0]["gift_id"], retry.text


async def test_the_gift_list_pages_newest_first_by_a_stable_cursor(users: Callable[..., Api]) -> None:
    host, viewer, other = users("host", "host"), users("viewer"), users("other")
    video = await new_video(host)
    await fund(viewer, 100)
    await fund(other, 100)
    sent = []
    for i in range(7):
        r = await gift(viewer if i % 2 else other, video, f"p-{i}", "rose", i + 1)
        assert r.status_code == 200, r.text
        sent.append(r.json()["gift_id"])
    await settled(host, 7)

    async def page(cursor: str | None, limit: int = 3) -> dict[str, Any]:
        params: dict[str, Any] = {"limit": limit, **({"cursor": cursor} if cursor else {})}
        r = await viewer.client.get(f"/v1/videos/{video}/gifts", params=params)
        assert r.status_code == 200, r.text
        return r.json()  # type: ignore[no-any-return]

    first = await page(None)
    assert len(first["gifts"]) == 3 and first["next_cursor"]
    item = first["gifts"][0]
    assert item["gift_id"] == sent[6] and item["sender"] == {"id": uid(other), "name": "Other"}
    assert (item["gift"], item["count"], item["coins"]) == ("rose", 7, 7) and isinstance(item["sent_ms"], int)

    # Gifts settled after the first page sit above it: the cursor goes on from where it was.
    for i in (7, 8):
        assert (await gift(viewer, video, f"p-{i}")).status_code == 200
    await settled(host, 9)
    second = await page(first["next_cursor"])
    third = await page(second["next_cursor"])
    assert third["next_cursor"] is None
    listed = [g["gift_id"] for p in (first, second, third) for g in p["gifts"]]
    # Each gift once, newest first (two sent in one millisecond go by gift id).
    assert len(listed) == len(set(listed)) and set(listed) == set(sent), listed
    keys = [(g["sent_ms"], g["gift_id"]) for p in (first, second, third) for g in p["gifts"]]
    assert keys == sorted(keys, reverse=True)
    newest = await page(None, limit=100)
    assert len(newest["gifts"]) == 9 and newest["next_cursor"] is None

    for params in ({"cursor": "not-a-cursor"}, {"cursor": "bm9wZQ"}, {"limit": 0}, {"limit": 101},
                   {"limit": "x"}, {"cursor": "OTk5OTk5OTk5OTk5OTk5OTk5OTk5OTk5Omc"}):
        r = await viewer.client.get(f"/v1/videos/{video}/gifts", params=params)
        assert (r.status_code, r.json()["code"]) == (400, "bad_request"), (params, r.text)
    r = await viewer.client.get("/v1/videos/v-none/gifts")
    assert (r.status_code, r.json()["code"]) == (404, "not_found")


async def test_audit_passes_after_room_and_video_gifts(live: ServerProc, users: Callable[..., Api]) -> None:
    """Room gifts on a socket and video gifts over HTTP, from the same wallets to the same host:
    `giftstream audit` finds the ledger whole (it also covers every earlier test's gifts)."""
    host, viewers = users("host", "host"), [users(f"v{i}") for i in range(3)]
    video, room = await new_video(host), await host.create_room()
    for v in viewers:
        await fund(v, 100)

    async def room_gifts(v: Api) -> None:
        async with join(live, room, v.token) as sock:
            for i in range(5):
                await sock.gift(f"room-{i}", "panda")
            for i in range(5):
                assert (await sock.reply(f"room-{i}"))["type"] == "ack"

    async def video_gifts(v: Api) -> None:
        for i in range(5):
            assert (await gift(v, video, f"video-{i}", "finger_heart", 2)).status_code == 200

    await asyncio.gather(*(f(v) for v in viewers for f in (room_gifts, video_gifts)))
    earned = await settled(host, 30)
    assert earned["diamond_units"] == 3 * (5 * 5 + 5 * 10) * UNITS_PER_COIN
    for v in viewers:
        assert await coins(v) == 100 - 25 - 50

    async def quiet() -> bool:
        return bool((await host.client.get("/healthz")).json().get("outbox_entries") == 0)

    await wait_until(quiet, timeout=20)
    report = audit(live)
    assert report["ok"] is True, report


async def test_redis_away_is_503_unavailable(make_server: Callable[..., ServerProc], redis_url: str) -> None:
    """A gift whose debit cannot reach Redis: 503 unavailable; the same id charges once Redis is back."""
    proxy = TcpProxy("127.0.0.1", int(redis_url.rsplit(":", 1)[1].split("/")[0]))
    try:
        server = make_server(redis_url=f"redis://127.0.0.1:{proxy.port}/0").start()
        host, viewer = Api(server, token("away-host", "host")), Api(server, token("away-viewer"))
        video = await new_video(host)
        await fund(viewer, 30)
        proxy.cut()
        r = await gift(viewer, video, "a-1")
        assert (r.status_code, r.json()["code"]) == (503, "unavailable"), r.text
        proxy.restore()

        async def charged() -> bool:
            r = await gift(viewer, video, "a-1")
            return r.status_code == 200 and r.json()["balance"] == 29

        await wait_until(charged, timeout=20)
        assert await coins(viewer) == 29
        await host.close()
        await viewer.close()
    finally:
        proxy.close()
