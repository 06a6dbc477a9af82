"""The coin economy end to end: real `giftstream serve` processes on the session valkey, real HTTP
and WebSocket clients. Restrictions, adjustments, budgets, rewards, the statement, the live
`wallet` event across nodes, and `giftstream audit` after a mixed run of all of them."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.support import Api, ServerProc, join, run_cli, token, wait_until

# empty_url: an empty database of each backend (PostgreSQL when GIFTSTREAM_TEST_DATABASE_URL is set)
pytest_plugins = ["tests.ledger_fixtures"]
pytestmark = pytest.mark.timeout(180)

ADMIN = token("support", "admin")


async def admin_post(server: ServerProc, path: str, body: dict[str, Any] | None = None) -> httpx.Response:
    async with httpx.AsyncClient(base_url=server.base, timeout=30,
                                 headers={"authorization": f"Bearer {ADMIN}"}) as client:
        return await client.post(path, json=body)


async def adjust(server: ServerProc, user: str, coins: int, key: str) -> httpx.Response:
    return await admin_post(server, f"/v1/admin/users/{user}/adjust",
                            {"coins": coins, "reason": "test", "idempotency_key": key})


async def statement(v: Api, limit: int = 200) -> list[dict[str, Any]]:
    """Every line of the user's statement, page after page."""
    lines: list[dict[str, Any]] = []
    cursor = ""
    while True:
        r = await v.client.get("/v1/wallet/transactions", params={"cursor": cursor, "limit": limit})
        assert r.status_code == 200, r.text
        page = r.json()
        lines += page["transactions"]
        if page["next_cursor"] is None:
            return lines
        cursor = page["next_cursor"]


async def settled(v: Api) -> bool:
    return all(line["settled"] for line in await statement(v))


async def test_a_negative_balance_refuses_gifts_until_a_recharge_brings_it_back(
        server: ServerProc, api: Callable[..., Api]) -> None:
    host, v = api("host-n", "host"), api("neg")
    assert (await v.recharge(coins=100)).status_code == 201
    room = await host.create_room()
    async with join(server, room, v.token) as sock:
        await sock.gift("g1", "panda", 10)  # 50 coins
        assert (await sock.reply("g1"))["type"] == "ack"
        # support takes back 80 (say, a refund of coins half spent): -30
        r = await adjust(server, "neg", -80, "refund-1")
        assert r.status_code == 200 and r.json()["coins"] == -30, r.text
        wallet = await v.wallet()
        assert wallet["coins"] == -30 and wallet["restricted"] is True and wallet["restricted_reason"]
        await sock.gift("g2")
        assert (await sock.reply("g2"))["code"] == "account_restricted"
        # still allowed: recharging. 65 coins: back to 35, and the restriction lifts by itself.
        assert (await v.recharge(package_id="coins_65")).status_code == 201
        wallet = await v.wallet()
        assert wallet["coins"] == 35 and wallet["restricted"] is False
        await sock.gift("g3")
        assert (await sock.reply("g3"))["type"] == "ack"


async def test_an_admin_restriction_refuses_gifts_before_the_balance_until_lifted(
        server: ServerProc, api: Callable[..., Api]) -> None:
    host, v = api("host-r", "host"), api("restricted-user")
    room = await host.create_room()
    r = await admin_post(server, "/v1/admin/users/restricted-user/restrict", {"reason": "payment review"})
    assert r.status_code == 200 and r.json()["restricted_reason"] == "payment review", r.text
    async with join(server, room, v.token) as sock:
        await sock.gift("broke")  # no coins at all: restriction is checked first
        assert (await sock.reply("broke"))["code"] == "account_restricted"
        assert (await v.recharge(coins=100)).status_code == 201  # recharging is allowed
        await sock.gift("still")
        assert (await sock.reply("still"))["code"] == "account_restricted"
        r = await admin_post(server, "/v1/admin/users/restricted-user/unrestrict")
        assert r.status_code == 200 and r.json()["restricted"] is False
        await sock.gift("free")
        assert (await sock.reply("free"))["type"] == "ack"
    r = await v.client.post("/v1/admin/users/restricted-user/restrict", json={"reason": "self"})
    assert r.status_code == 403 and r.json()["code"] == "forbidden"


async def test_an_adjustment_applies_once_per_key(server: ServerProc, api: Callable[..., Api]) -> None:
    v = api("adj")
    tries = await asyncio.gather(*(adjust(server, "adj", 25, "ticket-1") for _ in range(10)))
    assert {r.status_code for r in tries} == {200}
    assert sorted(r.json()["replayed"] for r in tries) == [False] + [True] * 9
    assert (await v.wallet())["coins"] == 25
    conflict = await adjust(server, "adj", 26, "ticket-1")
    assert conflict.status_code == 409 and conflict.json()["code"] == "idempotency_conflict"
    zero = await adjust(server, "adj", 0, "ticket-2")
    assert zero.status_code == 400 and zero.json()["code"] == "bad_amount"


async def test_fifty_concurrent_redemptions_over_http_are_atomic(server: ServerProc,
                                                                  api: Callable[..., Api]) -> None:
    v = api("redeemer")
    r = await admin_post(server, "/v1/admin/rewards",
                         {"user_id": "redeemer", "points": 1000, "reason": "contest", "idempotency_key": "c1"})
    assert r.status_code == 200 and r.json()["points"] == 1000, r.text
    rate = (await v.client.get("/v1/rewards")).json()["rate"]
    tries = await asyncio.gather(*(v.client.post("/v1/rewards/redeem",
                                                 json={"points": rate["points"], "idempotency_key": f"k{i}"})
                                   for i in range(50)))
    statuses = sorted(r.status_code for r in tries)
    won = 1000 // rate["points"]
    assert statuses == [200] * won + [402] * (50 - won)
    assert {r.json()["code"] for r in tries if r.status_code == 402} == {"insufficient_points"}
    wallet = await v.wallet()
    assert (wallet["points"], wallet["coins"]) == (0, won * rate["coins"])
    bad = await v.client.post("/v1/rewards/redeem", json={"points": rate["points"] + 1, "idempotency_key": "x"})
    assert bad.status_code == 400 and bad.json()["code"] == "bad_amount"


async def test_check_in_once_per_day_over_http(server: ServerProc, api: Callable[..., Api]) -> None:
    v = api("daily")
    assert (await v.client.get("/v1/rewards")).json()["checked_in_today"] is False
    tries = await asyncio.gather(*(v.client.post("/v1/rewards/check-in") for _ in range(10)))
    assert sorted(r.status_code for r in tries) == [200] + [409] * 9
    assert {r.json()["code"] for r in tries if r.status_code == 409} == {"already_checked_in"}
    [done] = [r.json() for r in tries if r.status_code == 200]
    rewards = (await v.client.get("/v1/rewards")).json()
    assert rewards["checked_in_today"] is True and rewards["points"] == done["points"] == done["earned"]


async def test_budget_lower_at_once_raise_later_exact_under_concurrent_gifts(
        make_server: Callable[..., ServerProc], redis_url: str, tmp_path: Path) -> None:
    server = make_server(redis_url=redis_url, env={"GIFTSTREAM_BUDGET_RAISE_DELAY_S": "5"}).start()
    host, v = Api(server, token("host-b", "host")), Api(server, token("budgeted"))
    try:
        await v.recharge(coins=1000)
        r = await v.client.put("/v1/wallet/budget", json={"monthly_budget": 40})
        assert r.status_code == 200 and r.json()["monthly_budget"] == 40 and r.json()["pending_budget"] is None
        r = await v.client.put("/v1/wallet/budget", json={"monthly_budget": 37})  # lower: at once
        assert r.json()["monthly_budget"] == 37 and r.json()["pending_from"] is None
        r = await v.client.put("/v1/wallet/budget", json={"monthly_budget": 57})  # raise: later
        raised = r.json()
        assert (raised["monthly_budget"], raised["pending_budget"]) == (37, 57) and raised["pending_from"]
        for body in ({}, {"monthly_budget": 5, "extra": 1}, {"monthly_cap": 5}, {"monthly_budget": "5"}):
            bad = await v.client.put("/v1/wallet/budget", json=body)
            assert bad.status_code == 400 and bad.json()["code"] == "bad_request", body
        room = await host.create_room()
        async with contextlib.AsyncExitStack() as stack:
            socks = [await stack.enter_async_context(join(server, room, v.token)) for _ in range(4)]
            await asyncio.gather(*(socks[i % 4].gift(f"a{i}", "panda") for i in range(40)))  # 5 coins each
            replies = [await socks[i % 4].reply(f"a{i}") for i in range(40)]
            assert len([r for r in replies if r["type"] == "ack"]) == 7  # 35 <= 37 < 40
            assert {r["code"] for r in replies if r["type"] == "error"} == {"budget_exceeded"}

            async def raised_now() -> bool:
                w = await v.wallet()
                return bool(w["monthly_budget"] == 57 and w["pending_budget"] is None)

            await wait_until(raised_now, timeout=20, message="the raise never applied")
            await asyncio.gather(*(socks[i % 4].gift(f"b{i}", "panda") for i in range(40)))
            replies = [await socks[i % 4].reply(f"b{i}") for i in range(40)]
            assert len([r for r in replies if r["type"] == "ack"]) == 4  # 35 + 20 = 55 <= 57 < 60
        wallet = await v.wallet()
        assert (wallet["coins"], wallet["month_spent"]) == (1000 - 55, 55)
        r = await v.client.put("/v1/wallet/budget", json={"monthly_budget": None})  # removal: later too
        assert r.json()["monthly_budget"] == 57 and r.json()["pending_from"] is not None
    finally:
        await v.close()
        await host.close()


async def test_the_statement_lists_every_movement_once_while_new_ones_arrive(
        server: ServerProc, api: Callable[..., Api]) -> None:
    host, v = api("host-s", "host"), api("stated")
    await v.recharge(coins=500)
    room = await host.create_room()
    async with join(server, room, v.token) as sock:
        for i in range(30):
            await sock.gift(f"s{i}")
        for i in range(30):
            assert (await sock.reply(f"s{i}"))["type"] == "ack"
        # right after the acks the gifts are listed (settled or not)
        first = await statement(v)
        assert [line["kind"] for line in first].count("gift") == 30
        # page through with a small limit while more gifts and adjustments are made
        seen: list[dict[str, Any]] = []
        cursor = ""
        more = 0
        while True:
            r = await v.client.get("/v1/wallet/transactions", params={"cursor": cursor, "limit": 4})
            page = r.json()
            seen += page["transactions"]
            await sock.gift(f"more{more}")
            await adjust(server, "stated", 1, f"adj-{more}")
            more += 1
            if page["next_cursor"] is None:
                break
            cursor = page["next_cursor"]
        for i in range(more):
            await sock.reply(f"more{i}")
    ids = [line["id"] for line in seen]
    assert len(ids) == len(set(ids)) == 31  # the 30 gifts and the recharge, each once, none of the new ones
    seqs = [int(i.split("-")[1]) for i in ids]
    assert seqs == sorted(seqs, reverse=True)
    await wait_until(lambda: settled(v), timeout=30, message="the statement never settled")
    lines = await statement(v, limit=7)
    assert sum(line["coins"] for line in lines) == (await v.wallet())["coins"]
    assert {line["kind"] for line in lines} == {"recharge", "gift", "adjustment"}
    assert len(lines) == 1 + 30 + 2 * more
    bad = await v.client.get("/v1/wallet/transactions", params={"cursor": "x"})
    assert bad.status_code == 400


async def test_the_wallet_event_reaches_the_user_on_another_node(
        make_server: Callable[..., ServerProc], redis_url: str, tmp_path: Path) -> None:
    a = make_server(tmp_path / "a", redis_url=redis_url).start()
    b = make_server(tmp_path / "b", redis_url=redis_url, args=["--no-settler"]).start()
    host, v, other = Api(a, token("host-w", "host")), Api(a, token("live")), Api(a, token("bystander"))
    try:
        await v.recharge(coins=100)
        await other.recharge(coins=100)
        room = await host.create_room()
        async with join(b, room, v.token) as mine, join(b, room, other.token) as theirs:
            await mine.gift("own")
            assert (await mine.reply("own"))["type"] == "ack"
            r = await adjust(a, "live", 7, "goodwill-1")
            assert r.status_code == 200
            await mine.until(lambda: any(m["type"] == "wallet" for m in mine.other))
            [event] = [m for m in mine.other if m["type"] == "wallet"]
            assert event == {"type": "wallet", "coins": 100 - 1 + 7, "change": 7, "reason": "adjustment",
                             "ref": "goodwill-1"}
            # a recharge too (a credit), and never the user's own gift
            await v.recharge(package_id="coins_65")
            await mine.until(lambda: sum(m["type"] == "wallet" for m in mine.other) == 2)
            assert [m["reason"] for m in mine.other if m["type"] == "wallet"] == ["adjustment", "recharge"]
            await theirs.drain(0.3)
            assert not [m for m in theirs.other if m["type"] == "wallet"]
    finally:
        for c in (host, v, other):
            await c.close()


async def test_audit_passes_after_a_mixed_run(make_server: Callable[..., ServerProc], redis_url: str,
                                              empty_url: str) -> None:
    """On SQLite and PostgreSQL: gifts, check-ins, grants, redemptions, adjustments (some taking
    balances below zero) and budgets at once, then `giftstream audit`."""
    server = make_server(redis_url=redis_url, database_url=empty_url).start()
    clients: list[Api] = []

    def api(user: str, role: str = "viewer") -> Api:
        clients.append(Api(server, token(user, role)))
        return clients[-1]

    try:
        await _mixed_run(server, api)
    finally:
        for c in clients:
            await c.close()
    result = run_cli("audit", "--json", "--redis-url", redis_url, "--database-url", empty_url,
                     "--data-dir", str(server.data_dir))
    report = json.loads(result.stdout)
    assert report["ok"], report["failures"]
    assert report["wallets"]["wallet_points"] > 0


async def _mixed_run(server: ServerProc, api: Callable[..., Api]) -> None:
    host = api("host-m", "host")
    users = [api(f"mixed-{i}") for i in range(5)]
    room = await host.create_room()
    await asyncio.gather(*(u.recharge(coins=200) for u in users))
    await asyncio.gather(*(admin_post(server, "/v1/admin/rewards", {"user_id": f"mixed-{i}", "points": 300,
                                                                     "reason": "r", "idempotency_key": "p"})
                           for i in range(5)))
    async with contextlib.AsyncExitStack() as stack:
        socks = [await stack.enter_async_context(join(server, room, u.token)) for u in users]
        await asyncio.gather(
            *(s.gift(f"m{i}-{n}", "panda") for i, s in enumerate(socks) for n in range(10)),
            *(u.client.post("/v1/rewards/check-in") for u in users),
            *(u.client.post("/v1/rewards/redeem", json={"points": 200, "idempotency_key": "r1"}) for u in users),
            *(adjust(server, f"mixed-{i}", -300 if i % 2 else 11, f"a{i}") for i in range(5)),
            *(u.client.put("/v1/wallet/budget", json={"monthly_budget": 30}) for u in users[:2]),
        )
        for i, s in enumerate(socks):
            for n in range(10):
                await s.reply(f"m{i}-{n}")

