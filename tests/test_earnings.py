"""A host's earnings: GET /v1/me/earnings and /v1/me/gifts, holds of refunded and disputed coins,
and the per-host audit, on SQLite and PostgreSQL (the store itself, and `serve` over HTTP)."""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import sqlite3
from collections.abc import Callable
from dataclasses import replace
from typing import Any

import asyncpg
import httpx
import pytest

from server.creators.earnings import whole_diamonds
from server.movement import Kind, Movement
from server.store.base import Store
from server.store.earnings import HostEarnings
from server.store.migrations import migrations, statements
from server.store.models import UNITS_PER_DIAMOND
from server.store.rows import DAY_MS
from tests.ledger import TS0, Backend, credit, gift, keyed
from tests.payments import ENV, Payer, audit
from tests.support import FAST, Client, ServerProc, join, run_cli, wait_until

# The fixtures: backend, redis, wallet, ...
pytest_plugins = ["tests.ledger_fixtures"]
pytestmark = pytest.mark.timeout(120)

HOUR_MS = 3_600_000


# --- the store: which gifts a refund's coins paid for -------------------------------------------


def spending() -> list[Movement]:
    """A viewer's movements: 100 coins bought and 30 spent, then the order `o-b` credited (200
    coins, the balance 70 before it), then gifts, a later 50-coin order, and more gifts.

    FIFO: the 50 and 45 coin gifts spend the 70 coins held before o-b first (45: 20 of them,
    then 25 of o-b's), then 101 and 74 of the 80 are o-b's (200 in all); the last 6 of the 80
    and the 10 are the later order's."""
    return [credit(0, 1, coins=100, order="o-a"), gift(0, 2, coins=30),
            credit(0, 3, coins=200, order="o-b"),
            gift(0, 4, coins=50), gift(0, 5, coins=45, host="host-2", bp=3333), gift(0, 6, coins=101),
            credit(0, 7, coins=50, order="o-c"),
            gift(0, 8, coins=80), gift(0, 9, coins=10)]


HELD_B = {"host-1": 101 * 5000 + 74 * 5000, "host-2": 25 * 3333}


async def holds(backend: Backend, order: str = "o-b") -> list[tuple[Any, ...]]:
    return sorted(tuple(r) for r in await backend.query(
        f"SELECT gift_id, kind, coins, diamond_units, released_ms IS NULL FROM gift_holds WHERE order_id = '{order}'"))


async def held(store: Store) -> dict[str, int]:
    return {h: (await store.host_earnings(h)).held_units for h in ("host-1", "host-2")}


async def test_a_refund_holds_the_gifts_its_coins_paid_for_oldest_coins_first(backend: Backend) -> None:
    store = backend.store
    await store.settle(spending())
    before = {h: await store.host_earnings(h) for h in ("host-1", "host-2")}
    assert before["host-1"].lifetime_units == (30 + 50 + 101 + 80 + 10) * 5000
    assert before["host-2"].lifetime_units == 45 * 3333
    refund = keyed(0, 10, Kind.REFUND, coins=-200, order="o-b")
    await store.settle([refund])
    assert await holds(backend) == [("g0-5", "refund", 25, 25 * 3333, True), ("g0-6", "refund", 101, 101 * 5000, True),
                                    ("g0-8", "refund", 74, 74 * 5000, True)]
    assert await held(store) == HELD_B
    after = await store.host_earnings("host-1")
    assert after.available_units == before["host-1"].lifetime_units - HELD_B["host-1"]
    assert after.lifetime_units == before["host-1"].lifetime_units

    # Delivered again (alone, or in a batch), or made again under another number: nothing twice.
    assert (await store.settle([refund, gift(1, 1, user="v2", coins=3)])).duplicates == 1
    await store.settle([replace(refund, seq=11)])
    assert await held(store) == HELD_B
    assert len(await holds(backend)) == 3
    figures = await store.host_figures(5)
    assert (figures["mismatched"], figures["held_units"]) == (0, sum(HELD_B.values()))
    assert (await store.unbalanced_movements(5)) == (0, [])
    diamonds = await store.diamond_figures()
    assert diamonds["gift_diamond_units"] == diamonds["host_diamond_units"] == diamonds["ledger_host_diamond_units"]


async def test_a_won_dispute_releases_its_holds_and_a_later_refund_holds_again(backend: Backend) -> None:
    store = backend.store
    await store.settle(spending())
    await store.settle([keyed(0, 10, Kind.DISPUTE, coins=-200, order="o-b")])
    assert await held(store) == HELD_B
    await store.settle([keyed(0, 11, Kind.DISPUTE_REVERSAL, coins=200, order="o-b")])
    assert await held(store) == {"host-1": 0, "host-2": 0}
    assert [r[4] for r in await holds(backend)] == [False, False, False]
    # Won disputes release once, whatever comes again.
    await store.settle([keyed(0, 11, Kind.DISPUTE_REVERSAL, coins=200, order="o-b")])
    assert await held(store) == {"host-1": 0, "host-2": 0}
    # The order is refunded after all: its gifts are held again, exactly once.
    await store.settle([keyed(0, 12, Kind.REFUND, coins=-200, order="o-b")])
    assert await held(store) == HELD_B
    assert len(await holds(backend)) == 6
    assert (await store.host_figures(5))["mismatched"] == 0
    assert (await store.unbalanced_movements(5)) == (0, [])


async def test_gifts_older_than_the_hold_window_are_not_held_but_spend_the_coins(backend: Backend) -> None:
    store = backend.store
    refund_at = TS0 + 100 * HOUR_MS
    old, recent = refund_at - 3 * HOUR_MS, refund_at - HOUR_MS
    await store.settle([credit(0, 1, coins=90, order="o-1"),
                        replace(gift(0, 2, coins=40), ts_ms=old), replace(gift(0, 3, coins=35), ts_ms=recent),
                        replace(gift(0, 4, coins=30), ts_ms=recent)])
    await store.settle([keyed(0, 5, Kind.REFUND, coins=-90, order="o-1", ts_ms=refund_at)],
                       hold_window_ms=2 * HOUR_MS)
    # 40 coins went on a gift too old to hold; the next 50 are held (the last gift in part).
    assert await holds(backend, "o-1") == [("g0-3", "refund", 35, 35 * 5000, True),
                                           ("g0-4", "refund", 15, 15 * 5000, True)]
    assert (await store.host_earnings("host-1")).held_units == 50 * 5000


async def test_a_debt_at_the_credit_takes_the_orders_coins_first_and_a_gift_is_held_once(backend: Backend) -> None:
    """A viewer 20 coins in debt (a refund after spending) buys 50: 30 are left to give. Two
    orders whose coins a gift is counted against never hold more than its coins."""
    store = backend.store
    await store.settle([credit(0, 1, coins=20, order="o-1"), gift(0, 2, coins=20, host="host-2")])
    await store.settle([keyed(0, 3, Kind.REFUND, coins=-20, order="o-1")])
    await store.settle([credit(0, 4, coins=50, order="o-2"), gift(0, 5, coins=30)])
    await store.settle([keyed(0, 6, Kind.DISPUTE, coins=-50, order="o-2")])
    assert await holds(backend, "o-2") == [("g0-5", "dispute", 30, 30 * 5000, True)]
    assert await held(store) == {"host-1": 30 * 5000, "host-2": 20 * 5000}
    # No credit in the ledger (an order credited elsewhere): nothing to attribute, nothing held.
    await store.settle([keyed(0, 7, Kind.REFUND, coins=-10, order="o-unknown")])
    assert await held(store) == {"host-1": 30 * 5000, "host-2": 20 * 5000}


async def test_days_are_kept_per_utc_day_and_rebuilt_from_gifts_by_the_migration(backend: Backend) -> None:
    store = backend.store
    day = TS0 // DAY_MS
    await store.settle([gift(0, 1, coins=3), replace(gift(0, 2, coins=7), ts_ms=TS0 + DAY_MS - 1),
                        replace(gift(0, 3, coins=1, bp=3333), ts_ms=TS0 + DAY_MS)])
    await store.settle([replace(gift(0, 4, coins=2), ts_ms=TS0 + 3 * DAY_MS)])
    expected = [(day + 3, 2 * 5000, 1), (day + 1, 3333, 1), (day, 10 * 5000, 2)]
    assert await store.host_days("host-1", day) == expected
    assert await store.host_days("host-1", day + 1) == expected[:2]
    assert await store.host_days("host-2", day) == []
    # A ledger from before 0005: the migration fills host_days from the settled gifts.
    [backfill] = [s for v, script in migrations() if v == 5 for s in statements(script)
                  if s.startswith("INSERT INTO host_days")]
    await backend.query("DELETE FROM host_days")
    await backend.query(backfill)
    assert await store.host_days("host-1", day) == expected


# --- over HTTP, against `serve` -----------------------------------------------------------------


async def ledger_sql(url: str, statement: str) -> None:
    if url.startswith("sqlite:///"):
        with contextlib.closing(sqlite3.connect(url[len("sqlite:///"):])) as db, db:
            db.execute(statement)
        return
    conn = await asyncpg.connect(url)
    try:
        await conn.execute(statement)
    finally:
        await conn.close()


async def settled(server: ServerProc) -> bool:
    async with httpx.AsyncClient(base_url=server.base) as c:
        return (await c.get("/healthz")).json().get("outbox_entries") == 0  # type: ignore[no-any-return]


async def send(sock: Client, gift_id: str, gift: str, count: int) -> str:
    await sock.gift(gift_id, gift, count)
    reply = await sock.reply(gift_id)
    assert reply["type"] == "ack", reply
    return str(reply["gift_id"])


def check_units(body: dict[str, Any], **units: int) -> None:
    """Each figure exact in units; its whole diamonds add up as the units do (held the rest)."""
    assert {k: body["units"][k] for k in units} == units
    u = body["units"]
    assert u["lifetime"] == u["available"] + u["held"] + u["reserved"] + u["paid_out"]
    assert {k: body[k] for k in ("diamonds", "held", "reserved", "paid_out", "lifetime")} == whole_diamonds(
        HostEarnings("x", u["lifetime"], u["held"], u["reserved"], u["paid_out"], 0))
    assert body["diamond_units"] == body["units"]["available"]


@pytest.mark.parametrize(("units", "whole"), [
    # lifetime 11,055, held 2,777.5, 10,001 paid: available -1,723.5 shows as -1,724 and held as
    # 2,778, so the four still add up to 11,055 (each rounded down alone: 11,054).
    ((110_550_000, 27_775_000, 0, 100_010_000), (-1_724, 2_778, 0, 10_001, 11_055)),
    # 186.5 in all, 153.5 held: 33 available, 153 held.
    ((1_865_000, 1_535_000, 0, 0), (33, 153, 0, 0, 186)),
    # Half a diamond available and half held, 10,000 reserved: 0 + 1 + 10,000.
    ((100_010_000, 5_000, 100_000_000, 0), (0, 1, 10_000, 0, 10_001)),
    ((0, 0, 0, 0), (0, 0, 0, 0, 0)),
])
def test_whole_diamonds_add_up_to_lifetime(units: tuple[int, int, int, int], whole: tuple[int, ...]) -> None:
    lifetime, held, reserved, paid = units
    got = whole_diamonds(HostEarnings("h", lifetime, held, reserved, paid, 0))
    assert tuple(got.values()) == whole
    assert got["lifetime"] == got["diamonds"] + got["held"] + got["reserved"] + got["paid_out"]
    # Available is what a withdrawal may take: never more than its units.
    assert got["diamonds"] * UNITS_PER_DIAMOND <= lifetime - held - reserved - paid


async def pages(client: httpx.AsyncClient, limit: int) -> list[list[dict[str, Any]]]:
    out, cursor = [], None
    while True:
        r = await client.get("/v1/me/gifts", params={"limit": limit, **({"cursor": cursor} if cursor else {})})
        assert r.status_code == 200, r.text
        out.append(r.json()["gifts"])
        cursor = r.json()["next_cursor"]
        if cursor is None:
            return out


async def test_earnings_gifts_holds_and_audit_over_http(make_server: Callable[..., ServerProc], redis_url: str,
                                                        database_url: str) -> None:
    server = make_server(redis_url=redis_url, database_url=database_url, env={**ENV, **FAST}).start()
    vic, wes, host, admin = (Payer(server, "vic"), Payer(server, "wes"), Payer(server, "hera", "host"),
                             Payer(server, "ops", "admin"))
    try:
        await _scenario(server, vic, wes, host, admin, database_url)
    finally:
        for p in (vic, wes, host, admin):
            await p.close()


async def _until_earnings(host: Payer, check: Callable[[dict[str, Any]], bool]) -> dict[str, Any]:
    body: dict[str, Any] = {}

    async def ok() -> bool:
        nonlocal body
        body = (await host.client.get("/v1/me/earnings")).json()
        return check(body)

    await wait_until(ok, message=lambda: f"earnings never matched: {body}")
    return body


async def _paid(admin: Payer, payer: Payer, package: str) -> dict[str, Any]:
    order = await payer.pending(package_id=package)
    await admin.drive(order["payment_id"], "succeeded")
    return order


async def _scenario(server: ServerProc, vic: Payer, wes: Payer, host: Payer, admin: Payer, url: str) -> None:
    room = (await host.client.post("/v1/rooms", json={"title": "earnings"})).json()["room_id"]
    order_a = await _paid(admin, vic, "coins_65")
    token = vic.client.headers["authorization"].split()[1]
    async with join(server, room, token) as sock:
        first = await send(sock, "e1", "rose", 3)  # 3 of order A's 65 coins
        order_b = await _paid(admin, vic, "coins_330")  # credited with 62 coins held
        # FIFO: 60 + 2 more of the 62 held before B, then 3 + 297 + 7 of B's
        ids = [first, await send(sock, "e2", "perfume", 3), await send(sock, "e3", "finger_heart", 1),
               await send(sock, "e4", "hat_and_mustache", 3), await send(sock, "e5", "rose", 7)]
    lifetime = (3 + 60 + 5 + 297 + 7) * 5000
    body = await _until_earnings(host, lambda b: b["gifts_received"] == 5)
    check_units(body, available=lifetime, held=0, reserved=0, paid_out=0, lifetime=lifetime)
    assert (body["host_id"], body["units_per_diamond"], body["diamonds"]) == ("hera", 10_000, 186)

    # Received gifts, newest first, two a page; the cursor holds while a new gift settles.
    listed = await pages(host.client, 2)
    assert [len(p) for p in listed] == [2, 2, 1]
    flat = [g for p in listed for g in p]
    assert sorted(g["gift_id"] for g in flat) == sorted(ids)
    assert [(g["sent_ms"], g["gift_id"]) for g in flat] == sorted(((g["sent_ms"], g["gift_id"]) for g in flat),
                                                                  reverse=True)
    hat = next(g for g in flat if g["gift_id"] == ids[3])
    assert hat == {"gift_id": ids[3], "room_id": room, "sender": {"id": "vic", "name": "vic"},
                   "gift": "hat_and_mustache", "count": 3, "coins": 297, "diamonds": 148,
                   "diamond_units": 297 * 5000, "sent_ms": hat["sent_ms"]}
    day = [{"day": _utc_day(flat[0]["sent_ms"]), "diamonds": 186, "diamond_units": lifetime, "gifts": 5}]
    assert body["by_day"] == day
    r = await host.client.get("/v1/me/gifts", params={"limit": 2})
    cursor = r.json()["next_cursor"]
    await _paid(admin, wes, "coins_65")
    async with join(server, room, wes.client.headers["authorization"].split()[1]) as sock:
        newest = await send(sock, "w1", "rose", 1)
    await wait_until(lambda: settled(server))
    after = (await host.client.get("/v1/me/gifts", params={"limit": 2, "cursor": cursor})).json()
    assert after["gifts"] == listed[1]
    assert (await host.client.get("/v1/me/gifts", params={"limit": 1})).json()["gifts"][0]["gift_id"] == newest
    lifetime += 5000

    # B refunded: 3 + 297 + 7 of its coins were given (the other 23 were not), and are held.
    await admin.drive(order_b["payment_id"], "refunded", deliveries=3)
    held_b = (3 + 297 + 7) * 5000
    body = await _until_earnings(host, lambda b: b["units"]["held"] > 0)
    check_units(body, available=lifetime - held_b, held=held_b, lifetime=lifetime)
    # A disputed: its 65 coins are the 3, 60 and 2 (of the 5, whose other 3 B holds) given first.
    await admin.drive(order_a["payment_id"], "disputed")
    held_a = 65 * 5000
    body = await _until_earnings(host, lambda b: b["units"]["held"] > held_b)
    check_units(body, available=lifetime - held_b - held_a, held=held_b + held_a, lifetime=lifetime)
    # ... and won: released exactly; B's refund holds stay.
    await admin.drive(order_a["payment_id"], "dispute_won", deliveries=2)
    body = await _until_earnings(host, lambda b: b["units"]["held"] == held_b)
    check_units(body, available=lifetime - held_b, held=held_b, lifetime=lifetime)
    assert body["diamonds"] == (lifetime - held_b) // 10_000 == 33 and body["held"] == 153

    await wait_until(lambda: settled(server))
    report = audit(server)
    assert report["hosts"]["mismatched"] == 0 and report["hosts"]["held_units"] == held_b
    # One column changed by hand: the audit fails and names the host.
    await ledger_sql(url, "UPDATE host_earnings SET held_units = held_units + 1 WHERE host_id = 'hera'")
    failed = _audit_failing(server)
    assert failed["hosts"]["mismatched"] == 1 and failed["hosts"]["first"][0]["host_id"] == "hera"
    assert any("hera: lifetime" in f for f in failed["failures"]), failed["failures"]


def _audit_failing(server: ServerProc) -> dict[str, Any]:
    args = ["audit", "--json", "--data-dir", str(server.data_dir), "--redis-url", str(server.redis_url),
            "--database-url", str(server.database_url)]
    result = run_cli(*args)
    assert result.returncode != 0, result.stdout
    return json.loads(result.stdout)  # type: ignore[no-any-return]


def _utc_day(ms: int) -> str:
    return dt.datetime.fromtimestamp(ms / 1000, dt.UTC).date().isoformat()


async def test_earnings_and_gifts_refuse_viewers_and_bad_parameters(server: ServerProc,
                                                                    api: Callable[..., Any]) -> None:
    viewer, host = api("val"), api("hank", "host")
    for path in ("/v1/me/earnings", "/v1/me/gifts"):
        assert (await viewer.client.get(path)).status_code == 403
    for params in ({"days": "0"}, {"days": "367"}, {"days": "x"}):
        r = await host.client.get("/v1/me/earnings", params=params)
        assert (r.status_code, r.json()["code"]) == (400, "bad_request"), r.text
    for params in ({"limit": "0"}, {"limit": "101"}, {"cursor": "nonsense"}, {"cursor": "MTIzNA"}):
        r = await host.client.get("/v1/me/gifts", params=params)
        assert (r.status_code, r.json()["code"]) == (400, "bad_request"), r.text
    body = (await host.client.get("/v1/me/earnings", params={"days": "366"})).json()
    check_units(body, available=0, held=0, reserved=0, paid_out=0, lifetime=0)
    assert (body["by_day"], body["gifts_received"]) == ([], 0)
    assert (await host.client.get("/v1/me/gifts")).json() == {"gifts": [], "next_cursor": None}

