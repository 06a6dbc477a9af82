"""The core gift loop end to end, over real sockets, against real valkey and SQLite."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable

import msgpack
import pytest
import websockets

from server import auth
from tests.support import Api, ServerProc, join, run_cli, token, wait_until


async def test_round_trip_recharge_gift_fanout_settle(server: ServerProc, api: Callable[..., Api]) -> None:
    host, alice = api("host1", "host"), api("alice")
    r = await alice.recharge(package_id="coins_65", key="r1")
    assert r.status_code == 201 and r.json()["balance"] == 65
    room = await host.create_room()
    async with join(server, room, host.token, "giftstream.json") as h, \
            join(server, room, token("bob")) as bob, join(server, room, alice.token) as a:
        await a.gift("g-1", "rose", 5)
        ack = await a.reply("g-1")
        assert ack["type"] == "ack" and ack["balance"] == 60 and ack["gift_id"]
        for client in (h, bob, a):
            [event] = await client.wait_events(1)
            assert event["gift_id"] == ack["gift_id"]
            assert event["from"] == {"id": "alice", "name": "alice"}
            assert (event["gift"], event["count"], event["coins"]) == ("rose", 5, 5)
            assert event["offset"] > h.welcome["offset"]
    await wait_until(lambda: _gifts_received(host, 1), timeout=10)
    earnings = await host.earnings()
    assert earnings["diamond_units"] == 25_000 and earnings["diamonds"] == 2
    assert (await alice.wallet())["coins"] == 60
    info = (await host.client.get(f"/v1/rooms/{room}")).json()
    assert info["coins_total"] == 5 and info["top_gifters"][0]["id"] == "alice" and info["live"] is True


async def _gifts_received(host: Api, n: int) -> bool:
    received: int = (await host.earnings())["gifts_received"]
    return received >= n


async def test_no_overdraft_under_concurrency(server: ServerProc, api: Callable[..., Api]) -> None:
    host, payer = api("host2", "host"), api("payer")
    assert (await payer.recharge(coins=100)).status_code == 201
    room = await host.create_room()
    async with contextlib.AsyncExitStack() as stack:
        # 200 one-coin gifts from eight sockets of the same wallet (25 each, inside the
        # per-socket burst), all in flight at once.
        socks = [await stack.enter_async_context(join(server, room, payer.token)) for _ in range(8)]
        await asyncio.gather(*(socks[i % 8].gift(f"c-{i}") for i in range(200)))
        replies = [await socks[i % 8].reply(f"c-{i}") for i in range(200)]
    acks = [r for r in replies if r["type"] == "ack"]
    refused = [r for r in replies if r["type"] == "error"]
    assert len(acks) == 100
    assert {r["code"] for r in refused} == {"insufficient_funds"}
    assert len({r["gift_id"] for r in acks}) == 100
    assert (await payer.wallet())["coins"] == 0


async def test_same_id_charged_once_across_retries_and_reconnect(server: ServerProc, api: Callable[..., Api]) -> None:
    host, v = api("host3", "host"), api("retry")
    await v.recharge(coins=50)
    room = await host.create_room()
    gift_ids = set()
    async with join(server, room, v.token) as a:
        for _ in range(3):
            await a.gift("same", "panda", 2)
            gift_ids.add((await a.reply("same"))["gift_id"])
            a.replies.clear()
    async with join(server, room, v.token) as a:  # reconnect, same id again
        for _ in range(2):
            await a.gift("same", "panda", 2)
            reply = await a.reply("same")
            assert reply["type"] == "ack" and reply["replayed"] is True
            gift_ids.add(reply["gift_id"])
            a.replies.clear()
        await a.gift("same", "panda", 3)  # same id, different count: a conflict, not a replay
        assert (await a.reply("same"))["code"] == "idempotency_conflict"
    assert len(gift_ids) == 1
    assert (await v.wallet())["coins"] == 40


async def test_refusals_charge_nothing(server: ServerProc, api: Callable[..., Api]) -> None:
    host, v = api("host4", "host"), api("rich")
    await v.recharge(coins=1000)
    room = await host.create_room()
    teen = token("teen", birthdate="2015-06-01")
    async with join(server, room, v.token) as a, join(server, room, teen) as t, join(server, room, host.token) as h:
        await a.gift("u1", "unicorn_of_doom", 1)
        assert (await a.reply("u1"))["code"] == "unknown_gift"
        for i, count in enumerate([0, -1, 10_000]):
            await a.gift(f"b{i}", "rose", count)
            assert (await a.reply(f"b{i}"))["code"] == "bad_count"
        await a.gift("big", "tiktok_universe", 1)
        assert (await a.reply("big"))["code"] == "insufficient_funds"
        await t.gift("t1", "rose", 1)
        assert (await t.reply("t1"))["code"] == "age_restricted"
        await h.gift("h1", "rose", 1)
        assert (await h.reply("h1"))["code"] == "not_allowed"
        await a.send({"type": "dance"})
        assert (await a.recv())["code"] == "bad_request"
    assert (await v.wallet())["coins"] == 1000
    # teens cannot buy either
    r = await Api(server, teen).recharge(coins=100)
    assert r.status_code == 403 and r.json()["code"] == "age_restricted"


async def test_malformed_frames_never_crash(server: ServerProc, api: Callable[..., Api]) -> None:
    host, v = api("host5", "host"), api("fuzzy")
    await v.recharge(coins=100)
    room = await host.create_room()
    async with join(server, room, v.token) as other, join(server, room, v.token) as a:
        bad_frames: list[bytes | str] = [
            b"\xc1\xc1 not msgpack", msgpack.packb([1, 2, 3]), msgpack.packb({"type": "gift"}),
            msgpack.packb({"type": "gift", "id": 5, "gift": "rose", "count": 1}),
            msgpack.packb({"type": "gift", "id": "x", "gift": ["rose"], "count": 1}),
            msgpack.packb({"type": "gift", "id": "x", "gift": "rose", "count": "1"}),
            msgpack.packb({"type": "gift", "id": "x", "gift": "rose", "count": True}),
            msgpack.packb({"type": "gift", "id": "x" * 500, "gift": "rose", "count": 1}),
            msgpack.packb({"type": "resume", "since": {"a": 1}}), msgpack.packb({1: 2}),
            "text frame on the msgpack socket", b"",
        ]
        for frame in bad_frames:
            await a.ws.send(frame)
            reply = await a.recv()
            assert reply["type"] == "error" and reply["code"] == "bad_request", (frame, reply)
        # a 2 MB frame closes that socket with 1009; the other socket keeps working
        with pytest.raises(websockets.ConnectionClosed) as closed:
            # the server may close with 1009 while the frame is still being sent
            await a.ws.send(b"\x81" * (2 * 1024 * 1024))
            await a.recv()
        assert closed.value.rcvd is not None and closed.value.rcvd.code == 1009
        await other.gift("ok-1")
        assert (await other.reply("ok-1"))["type"] == "ack"
    r = await v.client.get("/v1/wallet")
    assert r.json()["coins"] == 99


async def test_auth_failures(server: ServerProc, api: Callable[..., Api]) -> None:
    host = api("host6", "host")
    room = await host.create_room()
    for bad in ["", "garbage", token("x", ttl_s=-10), auth.issue("another-secret-of-at-least-32-bytes!!", "x")]:
        with pytest.raises(websockets.ConnectionClosed) as closed:
            async with join(server, room, bad):
                pass
        assert closed.value.rcvd is not None and closed.value.rcvd.code == 4401
        bad_api = Api(server, bad or "none")
        r = await bad_api.client.get("/v1/wallet")
        await bad_api.close()
        assert r.status_code == 401 and r.json()["code"] == "unauthorized"
    viewer = api("plain")
    r = await viewer.client.post("/v1/rooms", json={})
    assert r.status_code == 403 and r.json()["code"] == "forbidden"
    r = await viewer.client.post(f"/v1/rooms/{room}/end")
    assert r.status_code == 403
    with pytest.raises(websockets.ConnectionClosed) as closed:
        async with join(server, "no-such-room", viewer.token):
            pass
    assert closed.value.rcvd is not None and closed.value.rcvd.code == 4404


async def test_recharge_idempotent_and_validated(server: ServerProc, api: Callable[..., Api]) -> None:
    v = api("buyer")
    first = await v.recharge(package_id="coins_330", key="same-key")
    again = await v.recharge(package_id="coins_330", key="same-key")
    assert first.status_code == again.status_code == 201
    assert first.json()["order_id"] == again.json()["order_id"]
    assert (await v.wallet())["coins"] == 330
    conflict = await v.recharge(package_id="coins_65", key="same-key")
    assert conflict.status_code == 409 and conflict.json()["code"] == "idempotency_conflict"
    custom = await v.recharge(coins=100)
    assert custom.json()["price_cents"] == 153  # 100 coins at 99c per 65, rounded up
    for body_coins in (29, 2_500_001):
        r = await v.recharge(coins=body_coins)
        assert r.status_code == 400 and r.json()["code"] == "bad_amount"
    r = await v.recharge(package_id="coins_1")
    assert r.status_code == 400 and r.json()["code"] == "unknown_package"
    r = await v.recharge(coins=100, method="sandbox_card_declined")
    assert r.status_code == 402 and r.json()["code"] == "payment_declined"
    r = await v.client.post("/v1/recharges", content=b"{not json")
    assert r.status_code == 400 and r.json()["code"] == "bad_request"
    assert (await v.wallet())["coins"] == 430


async def test_room_end_notifies_and_refuses_late_joiners(server: ServerProc, api: Callable[..., Api]) -> None:
    host, v = api("host7", "host"), api("late")
    room = await host.create_room()
    async with join(server, room, v.token) as a:
        r = await host.client.post(f"/v1/rooms/{room}/end")
        assert r.status_code == 200
        await a.wait_events(1, kind="room_ended")
        with pytest.raises(websockets.ConnectionClosed) as closed:
            for _ in range(10):
                await a.recv()
        assert closed.value.rcvd is not None and closed.value.rcvd.code == 4410
    with pytest.raises(websockets.ConnectionClosed) as closed:
        async with join(server, room, v.token):
            pass
    assert closed.value.rcvd is not None and closed.value.rcvd.code == 4404
    assert (await host.client.get(f"/v1/rooms/{room}")).json()["live"] is False


async def test_audit_passes_after_storm(server: ServerProc, api: Callable[..., Api], redis_url: str) -> None:
    host = api("host8", "host")
    room = await host.create_room()
    users = [api(f"s{i}") for i in range(8)]
    await asyncio.gather(*(u.recharge(coins=300) for u in users))
    async with join(server, room, host.token) as h:
        async def storm(u: Api) -> int:
            async with join(server, room, u.token) as c:
                for i in range(120):
                    await c.gift(f"{u.token[-6:]}-{i}", "rose" if i % 3 else "panda", 1 + i % 3)
                replies = [await c.reply(f"{u.token[-6:]}-{i}") for i in range(120)]
                return sum(1 for r in replies if r["type"] == "ack")

        acked = sum(await asyncio.gather(*(storm(u) for u in users)))
        await h.wait_events(acked, timeout=20)
    result = run_cli("audit", "--json", "--redis-url", redis_url, "--data-dir", str(server.data_dir))
    assert result.returncode == 0, result.stdout + result.stderr
    await wait_until(lambda: _gifts_received(host, acked), timeout=20)
    result = run_cli("audit", "--redis-url", redis_url, "--data-dir", str(server.data_dir))
    assert result.returncode == 0 and "audit ok" in result.stdout


async def test_healthz_and_catalog(server: ServerProc, api: Callable[..., Api]) -> None:
    v = api("cat")
    r = await v.client.get("/healthz")
    assert r.status_code == 200 and r.json()["status"] == "ok"
    cat = (await v.client.get("/v1/catalog")).json()
    gifts = {g["id"]: g["coins"] for g in cat["gifts"]}
    assert gifts["rose"] == 1 and gifts["tiktok_universe"] == 44_999 and gifts["lion"] == 29_999
    packages = {p["coins"]: p["price_cents"] for p in cat["packages"]}
    assert packages[65] == 99 and packages[6607] == 9999 and packages[16500] == 24999
    metrics = (await v.client.get("/metrics")).text
    assert "giftstream_outbox_entries" in metrics


async def test_script_cache_flush_is_survived(server: ServerProc, api: Callable[..., Api], redis_url: str) -> None:
    import redis as redis_sync

    host, v = api("host9", "host"), api("flushy")
    assert (await v.recharge(coins=30)).status_code == 201
    room = await host.create_room()
    async with join(server, room, v.token) as c:
        await c.gift("f1")
        assert (await c.reply("f1"))["type"] == "ack"
        redis_sync.Redis.from_url(redis_url).script_flush()  # e.g. a failover to a fresh replica
        await c.gift("f2")
        reply = await c.reply("f2")
        assert reply["type"] == "ack" and reply["balance"] == 28, reply
        await c.wait_events(2)


async def test_per_socket_rate_limit_admits_the_burst_exactly(server: ServerProc, api: Callable[..., Api]) -> None:
    host, v = api("host10", "host"), api("bursty")
    await v.recharge(coins=1000)
    room = await host.create_room()
    async with join(server, room, v.token) as c:
        for i in range(80):  # far faster than 20/s: only the burst of 50 (plus a trickle) gets in
            await c.gift(f"r{i}")
        replies = [await c.reply(f"r{i}") for i in range(80)]
        acked = [r for r in replies if r["type"] == "ack"]
        limited = [r for r in replies if r["type"] == "error"]
        assert 50 <= len(acked) <= 52 and all(r["code"] == "rate_limited" for r in limited)
        # refused gifts cost nothing, and their ids can be retried once tokens come back
        await asyncio.sleep(0.3)  # tokens come back with time (20/s): the refill is what is tested
        retry_id = limited[0]["id"]
        del c.replies[retry_id]
        await c.gift(retry_id)
        assert (await c.reply(retry_id))["type"] == "ack"
    assert (await v.wallet())["coins"] == 1000 - len(acked) - 1


async def test_concurrent_recharges_with_one_key_credit_once(server: ServerProc, api: Callable[..., Api]) -> None:
    v = api("racer")
    replies = await asyncio.gather(*(v.recharge(package_id="coins_330", key="one-key") for _ in range(20)))
    assert {r.status_code for r in replies} == {201}
    assert len({r.json()["order_id"] for r in replies}) == 1
    assert (await v.wallet())["coins"] == 330


async def test_monthly_budget_caps_spend_exactly_under_concurrency(server: ServerProc,
                                                                   api: Callable[..., Api]) -> None:
    host, v = api("host11", "host"), api("capped")
    await v.recharge(coins=1000)
    r = await v.client.put("/v1/wallet/budget", json={"monthly_budget": 37})
    assert r.status_code == 200 and r.json()["monthly_budget"] == 37
    room = await host.create_room()
    async with contextlib.AsyncExitStack() as stack:
        socks = [await stack.enter_async_context(join(server, room, v.token)) for _ in range(4)]
        await asyncio.gather(*(socks[i % 4].gift(f"b{i}", "panda") for i in range(40)))  # 5 coins each
        replies = [await socks[i % 4].reply(f"b{i}") for i in range(40)]
    acked = [r for r in replies if r["type"] == "ack"]
    assert len(acked) == 7  # 7 x 5 = 35 <= 37 < 40
    assert {r["code"] for r in replies if r["type"] == "error"} == {"budget_exceeded"}
    wallet = await v.wallet()
    assert wallet["coins"] == 1000 - 35 and wallet["month_spent"] == 35
