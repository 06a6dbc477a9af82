"""Cash-out: two-factor enrolment, withdrawals and their refusals, payouts by signed webhook.

Against a real `serve` (real valkey; SQLite and PostgreSQL), hosts earning their diamonds from
real gifts of a recharged viewer, settled by the real settler; the concurrency of reservations
also at the store, where many connections race on one host. Codes come from pyotp as an
authenticator app makes them: the server takes each time step once, and the steps either side
of its own, so one host can use three codes in a test (the step before now, now, the next one)
without waiting for the clock.
"""

from __future__ import annotations

import asyncio
import json
import os
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pyotp
import pytest
import redis

from server.app import create_app
from server.creators.twofactor import STEP_S
from server.creators.withdrawals import whole_cents_step
from server.payments import signature
from server.settings import Settings
from server.store import open_store
from server.store.base import Store
from server.store.models import UNITS_PER_DIAMOND
from server.store.withdrawals import PENDING, Reservation, TwoFactor, Withdrawal
from tests.conftest import _fresh_pg_database
from tests.ledger import Backend, gift
from tests.payments import WEBHOOK_SECRET, audit
from tests.support import FAST, SECRET, ServerProc, ValkeyProc, join, token, wait_until

pytest_plugins = ["tests.ledger_fixtures"]
pytestmark = pytest.mark.timeout(120)

PAYOUT_WEBHOOK = "/v1/payouts/sandbox/webhook"
LION = 29_999  # coins: 14,999.5 diamonds to its host, enough for one withdrawal of the minimum
MIN = 10_000
DAILY_MAX = 1_000_000


@pytest.fixture(scope="module", params=["sqlite", "postgres"])
def live(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory,
         valkey: ValkeyProc) -> Iterator[tuple[ServerProc, Backend]]:
    """One server per backend for the module (each test has hosts of its own), and raw SQL on its
    ledger to check what it wrote."""
    pg: Iterator[str] | None = None
    url = None
    if request.param == "postgres":
        pg = _fresh_pg_database()
        url = next(pg)  # skips without GIFTSTREAM_TEST_DATABASE_URL
    redis.Redis.from_url(valkey.url).flushall()
    data = tmp_path_factory.mktemp("withdrawals") / "var"
    server = ServerProc(data, redis_url=valkey.url, database_url=url,
                        env={**FAST, "GIFTSTREAM_WEBHOOK_SECRET": WEBHOOK_SECRET}).start()
    ledger_url = url or f"sqlite:///{data / 'giftstream.sqlite3'}"
    try:
        yield server, Backend(open_store(ledger_url), ledger_url)
    finally:
        server.terminate()
        if pg is not None:
            next(pg, None)


class Authenticator:
    """A phone's authenticator app: the codes of one secret, per time step."""

    def __init__(self, secret: str) -> None:
        self.totp = pyotp.TOTP(secret)

    def code(self, step: int) -> str:
        return self.totp.at(step * STEP_S)

    def wrong(self, base: int) -> str:
        """A code of no step the server would take near `base`."""
        near = {self.code(base + d) for d in range(-2, 4)}
        return next(c for c in (f"{n:06d}" for n in range(10)) if c not in near)


async def base_step() -> int:
    """The time step now, once the clock is not in the last second of one: a code of the step
    before it stays good until the request that sends it arrives."""
    await wait_until(lambda: time.time() % STEP_S < STEP_S - 1, timeout=2, interval=0.05)
    return int(time.time() // STEP_S)


class Host:
    """A host's HTTP client, with the withdrawals API."""

    def __init__(self, server: ServerProc, user_id: str) -> None:
        self.user_id = user_id
        self.token = token(user_id, "host")
        self.client = httpx.AsyncClient(base_url=server.base, timeout=30,
                                        headers={"authorization": f"Bearer {self.token}"})
        self.app: Authenticator | None = None

    async def enrol(self, **body: Any) -> httpx.Response:
        r = await self.client.post("/v1/me/2fa", json=body)
        if r.status_code == 200:
            self.app = Authenticator(r.json()["secret"])
        return r

    async def confirm(self, code: str) -> httpx.Response:
        return await self.client.post("/v1/me/2fa/confirm", json={"code": code})

    async def two_factor(self, step: int) -> Authenticator:
        """Enrolled and confirmed with the code of `step`."""
        assert (await self.enrol()).status_code == 200
        assert self.app is not None
        r = await self.confirm(self.app.code(step))
        assert r.status_code == 200, r.text
        return self.app

    async def withdraw(self, diamonds: Any, totp: str | None = None, key: str | None = None) -> httpx.Response:
        body: dict[str, Any] = {"diamonds": diamonds, "idempotency_key": key or uuid.uuid4().hex}
        if totp is not None:
            body["totp"] = totp
        return await self.client.post("/v1/me/withdrawals", json=body)

    async def listed(self, **params: Any) -> dict[str, Any]:
        r = await self.client.get("/v1/me/withdrawals", params=params)
        assert r.status_code == 200, r.text
        return r.json()  # type: ignore[no-any-return]


@pytest.fixture
async def people(live: tuple[ServerProc, Backend]) -> AsyncIterator[Callable[..., Any]]:
    """Hosts and an admin on the module's server, closed after the test."""
    server, _ = live
    made: list[httpx.AsyncClient] = []

    def make(kind: str = "host") -> Any:
        name = f"{kind}-{uuid.uuid4().hex[:10]}"
        if kind == "host":
            host = Host(server, name)
            made.append(host.client)
            return host
        client = httpx.AsyncClient(base_url=server.base, timeout=60,
                                   headers={"authorization": f"Bearer {token(name, kind)}"})
        made.append(client)
        return client

    yield make
    for c in made:
        await c.aclose()


async def host_row(ledger: Backend, host_id: str) -> tuple[int, int, int, int]:
    """(lifetime, held, reserved, paid) units."""
    rows = await ledger.query("SELECT diamond_units, held_units, reserved_units, paid_units FROM host_earnings"
                              f" WHERE host_id = '{host_id}'")
    return tuple(int(v) for v in rows[0]) if rows else (0, 0, 0, 0)  # type: ignore[return-value]


async def fund(server: ServerProc, ledger: Backend, host: Host, gift_id: str = "lion", count: int = 1,
               payments: list[str] | None = None) -> int:
    """The host earns from real gifts: a new viewer recharges, sends them in the host's room, and
    the settler credits them. The host's lifetime units once settled; the recharge's payment id
    is added to `payments` when given."""
    price = {"lion": LION, "tiktok_universe": 44_999}[gift_id]
    viewer = f"patron-{uuid.uuid4().hex[:10]}"
    vtoken = token(viewer)
    async with httpx.AsyncClient(base_url=server.base, timeout=30) as http:
        r = await http.post("/v1/recharges", headers={"authorization": f"Bearer {vtoken}"},
                            json={"coins": price * count, "payment_method": "sandbox_card",
                                  "idempotency_key": "fund"})
        assert r.status_code == 201, r.text
        if payments is not None:
            payments.append(r.json()["payment_id"])
        # The host's room (a second fund finds it live already: 409 names it).
        room = (await host.client.post("/v1/rooms", json={"title": "cash"})).json()["room_id"]
    before = (await host_row(ledger, host.user_id))[0]
    async with join(server, room, vtoken) as c:
        await c.gift("g1", gift_id, count)
        assert (await c.reply("g1"))["type"] == "ack"
    units = before + price * count * 5000

    async def settled() -> bool:
        return (await host_row(ledger, host.user_id))[0] == units

    await wait_until(settled, timeout=20, interval=0.05, message="the gift was not settled")
    return units


def code_of(r: httpx.Response) -> tuple[int, str]:
    return r.status_code, r.json().get("code", "")


# -- two-factor ---------------------------------------------------------------------------------


async def test_enrol_confirm_and_replace_the_secret(people: Callable[..., Any]) -> None:
    host, viewer = people(), people("viewer")
    assert (await viewer.get("/v1/me/2fa")).status_code == 403
    assert (await host.client.get("/v1/me/2fa")).json() == {"active": False, "pending": False}
    first = (await host.enrol()).json()
    assert first["active"] is False
    assert first["otpauth_uri"].startswith(f"otpauth://totp/Giftstream:{host.user_id}?secret={first['secret']}")
    assert "issuer=Giftstream" in first["otpauth_uri"]
    old_app = host.app
    # Enrolling again before confirming replaces the pending secret: the first one's codes are over.
    second = (await host.enrol()).json()
    assert second["secret"] != first["secret"]
    assert (await host.client.get("/v1/me/2fa")).json() == {"active": False, "pending": True}
    base = await base_step()
    assert old_app is not None and host.app is not None
    assert code_of(await host.confirm(old_app.code(base))) == (403, "bad_2fa_code")
    assert (await host.confirm(host.app.code(base))).json() == {"active": True}
    assert code_of(await host.confirm(host.app.code(base + 1))) == (404, "not_found")
    assert (await host.client.get("/v1/me/2fa")).json() == {"active": True, "pending": False}

    # Active: a token alone cannot replace the secret; a code of the active one can.
    active = host.app
    assert code_of(await host.client.post("/v1/me/2fa", json={})) == (403, "bad_2fa_code")
    assert code_of(await host.enrol(code=active.code(base))) == (403, "bad_2fa_code")  # used by the confirm
    assert code_of(await host.enrol(code=active.wrong(base))) == (403, "bad_2fa_code")
    assert code_of(await host.client.post("/v1/me/2fa", json={"code": 123456})) == (400, "bad_request")
    r = await host.enrol(code=active.code(base + 1))
    assert r.status_code == 200 and r.json()["active"] is True, r.text
    # The new secret's code of the step just taken is not good either: a step is taken once per user.
    assert code_of(await host.confirm(host.app.code(base + 1))) == (403, "bad_2fa_code")


async def test_brute_force_of_codes_is_locked_out(people: Callable[..., Any]) -> None:
    """Guesses sent all at once are each counted: past totp_max_failures (5), every check,
    the right code's too, answers rate_limited."""
    host = people()
    base = await base_step()
    app = await host.two_factor(base)
    answers = await asyncio.gather(*(host.withdraw(MIN, f"{n:06d}") for n in range(100_000, 100_020)
                                     if f"{n:06d}" not in {app.code(base + d) for d in (-1, 0, 1)}))
    codes = sorted(code_of(r) for r in answers)
    assert codes.count((403, "bad_2fa_code")) == 5, codes
    assert codes.count((429, "rate_limited")) == len(codes) - 5, codes
    assert code_of(await host.withdraw(MIN, app.code(base + 1))) == (429, "rate_limited")
    assert code_of(await host.enrol(code=app.code(base + 1))) == (429, "rate_limited")


async def test_failed_checks_count_in_a_window(backend: Backend) -> None:
    """At the store: five checks in 15 minutes, then none until the window ends; a right code
    forgets them."""
    store, window, t0 = backend.store, 15 * 60_000, 1_795_300_000_000
    assert await store.totp_enrol("h", "SECRET", t0)
    assert [await store.totp_attempt("h", t0 + i, 5, window) for i in range(6)] == [True] * 5 + [False]
    assert not await store.totp_attempt("h", t0 + window - 1, 5, window)
    assert await store.totp_attempt("h", t0 + window, 5, window)  # a new window, its first check
    await store.totp_passed("h")
    assert all([await store.totp_attempt("h", t0 + window + 1, 5, window) for _ in range(5)])
    assert not await store.totp_attempt("h", t0 + window + 2, 5, window)


# -- cash-out -----------------------------------------------------------------------------------


async def test_cash_out_refusals_in_order(live: tuple[ServerProc, Backend], people: Callable[..., Any]) -> None:
    """Each refusal, with the ones after it in the order applying too; none uses the code."""
    server, ledger = live
    host = people()
    units = await fund(server, ledger, host, "tiktok_universe", 45)
    available = units // UNITS_PER_DIAMOND
    assert available > DAILY_MAX

    assert code_of(await host.withdraw(MIN - 1, "123456")) == (403, "2fa_required")
    base = await base_step()
    app = await host.two_factor(base - 1)
    assert code_of(await host.withdraw(MIN - 1, app.wrong(base))) == (403, "bad_2fa_code")
    assert code_of(await host.withdraw(MIN - 1, app.code(base - 1))) == (403, "bad_2fa_code")  # the confirm's
    assert code_of(await host.withdraw(MIN - 1)) == (403, "bad_2fa_code")  # none
    now = app.code(base)
    assert code_of(await host.withdraw(MIN - 1, now)) == (400, "below_minimum")
    # Half a cent a diamond: an odd number is worth no whole number of cents, and none is lost.
    odd = await host.withdraw(MIN + 1, now)
    assert code_of(odd) == (400, "bad_request") and "multiple of 2" in odd.json()["message"], odd.text
    over = available + 2 - available % 2  # even: worth whole cents
    assert code_of(await host.withdraw(over, now)) == (402, "insufficient_diamonds")  # and over the day's
    assert code_of(await host.withdraw(10**20, now)) == (402, "insufficient_diamonds")
    assert code_of(await host.withdraw(DAILY_MAX + 2, now)) == (400, "over_daily_limit")
    assert await host_row(ledger, host.user_id) == (units, 0, 0, 0)

    # The code refused five times is good still, once.
    first = await host.withdraw(DAILY_MAX - MIN, now)
    assert first.status_code == 202, first.text
    assert first.json() | {"withdrawal_id": None, "created_at": None, "updated_at": None} == {
        "withdrawal_id": None, "status": "pending", "diamonds": DAILY_MAX - MIN,
        "amount_cents": (DAILY_MAX - MIN) * 500 // 1000, "currency": "USD", "created_at": None, "updated_at": None}
    assert code_of(await host.withdraw(MIN, now)) == (403, "bad_2fa_code")
    reserved = (DAILY_MAX - MIN) * UNITS_PER_DIAMOND
    assert await host_row(ledger, host.user_id) == (units, 0, reserved, 0)

    # Pending withdrawals count toward the day; reserved and held diamonds are not available.
    later = app.code(base + 1)
    assert code_of(await host.withdraw(MIN + 2, later)) == (400, "over_daily_limit")
    # (held_units is what a refund or dispute holds; set here as one would leave it)
    held = units - reserved - (MIN - 1) * UNITS_PER_DIAMOND
    await ledger.query(f"UPDATE host_earnings SET held_units = {held} WHERE host_id = '{host.user_id}'")
    assert code_of(await host.withdraw(MIN, later)) == (402, "insufficient_diamonds")
    await ledger.query(f"UPDATE host_earnings SET held_units = 0 WHERE host_id = '{host.user_id}'")
    second = await host.withdraw(MIN, later)
    assert second.status_code == 202, second.text
    assert await host_row(ledger, host.user_id) == (units, 0, DAILY_MAX * UNITS_PER_DIAMOND, 0)

    # Newest first, a page at a time, each with its transitions.
    page = await host.listed(limit=1)
    assert [w["withdrawal_id"] for w in page["withdrawals"]] == [second.json()["withdrawal_id"]]
    rest = await host.listed(limit=1, cursor=page["next_cursor"])
    assert [w["withdrawal_id"] for w in rest["withdrawals"]] == [first.json()["withdrawal_id"]]
    assert rest["next_cursor"] is None
    assert [t["status"] for t in rest["withdrawals"][0]["transitions"]] == ["pending"]


@pytest.mark.parametrize(("millicents", "step"), [(500, 2), (1000, 1), (250, 4), (333, 1000), (1500, 2)])
def test_whole_cents_step(millicents: int, step: int) -> None:
    """The fewest diamonds worth whole cents, and every multiple of it is."""
    assert whole_cents_step(millicents) == step
    assert all(n * step * millicents % 1000 == 0 for n in range(1, 5))
    assert all(n * millicents % 1000 for n in range(1, step))


async def test_bad_requests(people: Callable[..., Any]) -> None:
    host = people()
    for diamonds in ("10000", 10000.0, True, 0, -5, None, [10000]):
        assert code_of(await host.withdraw(diamonds, "123456")) == (400, "bad_request"), diamonds
    for body in ({"diamonds": MIN}, {"diamonds": MIN, "idempotency_key": ""},
                 {"diamonds": MIN, "idempotency_key": "k" * 65}, {"diamonds": MIN, "idempotency_key": "k", "totp": 1}):
        assert code_of(await host.client.post("/v1/me/withdrawals", json=body)) == (400, "bad_request"), body
    for params in ({"limit": 0}, {"limit": 101}, {"limit": "x"}, {"cursor": "nope"}):
        r = await host.client.get("/v1/me/withdrawals", params=params)
        assert code_of(r) == (400, "bad_request"), params
    viewer = people("viewer")
    assert (await viewer.post("/v1/me/withdrawals", json={"diamonds": MIN, "idempotency_key": "k"})).status_code == 403


async def test_a_retry_answers_the_same_withdrawal(live: tuple[ServerProc, Backend],
                                                   people: Callable[..., Any]) -> None:
    server, ledger = live
    host = people()
    units = await fund(server, ledger, host)
    base = await base_step()
    app = await host.two_factor(base)
    first = await host.withdraw(MIN, app.code(base + 1), key="k1")
    assert first.status_code == 202, first.text
    # Twenty retries at once, with no code, the used one or a wrong one: the same withdrawal.
    retries = await asyncio.gather(*(host.withdraw(MIN, code, key="k1")
                                     for code in [None, app.code(base + 1), app.wrong(base)] * 7))
    assert {(r.status_code, r.json()["withdrawal_id"]) for r in retries} == {(202, first.json()["withdrawal_id"])}
    assert code_of(await host.withdraw(MIN + 1, key="k1")) == (409, "idempotency_conflict")
    assert await host_row(ledger, host.user_id) == (units, 0, MIN * UNITS_PER_DIAMOND, 0)
    assert len((await host.listed())["withdrawals"]) == 1


async def test_concurrent_withdrawals_never_reserve_more_than_available(backend: Backend) -> None:
    """Twenty withdrawals at once on one host, over several connections (SQLite: four stores on
    one file, as four processes; PostgreSQL: the pool's eight): at most what is available is
    reserved, and when any was refused for diamonds, every one that fitted was taken. (Each
    request's code is of a later time step than the one before it; one decided out of turn finds
    its step used, as a request racing a later code would.)"""
    stores: list[Store] = [backend.store]
    if backend.url.startswith("sqlite"):
        stores += [open_store(backend.url) for _ in range(3)]
    try:
        store = backend.store
        # 5.5 withdrawals' worth of diamonds (5 x 11,000), from settled gifts (of a partition no
        # server uses).
        await store.settle([gift(1000, seq, host="h", coins=22_000) for seq in range(1, 6)])
        assert await store.totp_enrol("h", "SECRET", 0)
        assert await store.totp_activate("h", "SECRET", 1, 0)

        async def one(i: int) -> Reservation:
            w = Withdrawal(uuid.uuid4().hex, "h", f"k{i}", MIN, MIN // 2, PENDING, 1000 + i, 1000 + i)
            return (await stores[i % len(stores)].reserve_withdrawal(w, "SECRET", 2 + i, 0, DAILY_MAX))[1]

        outcomes = await asyncio.gather(*(one(i) for i in range(20)))
        taken = outcomes.count(Reservation.CREATED)
        assert set(outcomes) <= {Reservation.CREATED, Reservation.INSUFFICIENT, Reservation.REUSED_CODE}, outcomes
        assert 1 <= taken <= 5, outcomes
        if Reservation.INSUFFICIENT in outcomes:
            assert taken == 5, outcomes
        reserved, count = (await backend.query("SELECT reserved_units, (SELECT COUNT(*) FROM withdrawals)"
                                               " FROM host_earnings WHERE host_id = 'h'"))[0]
        assert (reserved, count) == (taken * MIN * UNITS_PER_DIAMOND, taken)
        legs = await backend.query("SELECT account, SUM(delta) FROM ledger WHERE part = -1 GROUP BY account"
                                   " ORDER BY account")
        units = taken * MIN * UNITS_PER_DIAMOND
        assert legs == [("host:h", -units), ("host_reserved:h", units)]
        assert (await store.unbalanced_movements(5))[0] == 0
    finally:
        for s in stores[1:]:
            await s.close()


async def test_concurrent_requests_over_http_reserve_at_most_available(live: tuple[ServerProc, Backend],
                                                                       people: Callable[..., Any]) -> None:
    """Twenty withdrawals at once of a host who has 1.5 of them, with two good codes among them:
    one is taken, whichever; the others find the code used or the diamonds gone (or, past five
    used codes, the checks locked)."""
    server, ledger = live
    host = people()
    units = await fund(server, ledger, host)
    base = await base_step()
    app = await host.two_factor(base - 1)
    answers = await asyncio.gather(*(host.withdraw(MIN, app.code(base + i % 2)) for i in range(20)))
    codes = [code_of(r) if r.status_code != 202 else (202, "") for r in answers]
    assert codes.count((202, "")) == 1, codes
    refusals = {(403, "bad_2fa_code"), (402, "insufficient_diamonds"), (429, "rate_limited")}
    assert set(codes) - {(202, "")} <= refusals, codes
    assert await host_row(ledger, host.user_id) == (units, 0, MIN * UNITS_PER_DIAMOND, 0)


# -- payouts ------------------------------------------------------------------------------------


async def pending_withdrawal(live: tuple[ServerProc, Backend], people: Callable[..., Any]) -> tuple[Host, str, int]:
    """A funded host with one pending withdrawal of the minimum: (host, withdrawal id, lifetime units)."""
    server, ledger = live
    host = people()
    units = await fund(server, ledger, host)
    base = await base_step()
    app = await host.two_factor(base)
    r = await host.withdraw(MIN, app.code(base + 1))
    assert r.status_code == 202, r.text
    return host, r.json()["withdrawal_id"], units


async def drive(admin: httpx.AsyncClient, withdrawal_id: str, outcome: str, deliveries: int) -> list[dict[str, Any]]:
    r = await admin.post(f"/v1/sandbox/payouts/{withdrawal_id}", json={"outcome": outcome, "deliveries": deliveries})
    assert r.status_code == 200, r.text
    answers = r.json()["deliveries"]
    assert {a["status"] for a in answers} == {200}, answers
    return [a["body"] for a in answers]


def applied(bodies: list[dict[str, Any]]) -> list[bool]:
    return [b["applied"] for b in bodies if not b["duplicate"]]


async def pay_movements(ledger: Backend, host_id: str) -> list[tuple[str, int]]:
    """Each ledger movement (part -1) out of the host's reserved account: (where to, diamond units)."""
    return [(str(r[0]), int(r[1])) for r in await ledger.query(
        "SELECT b.account, b.delta FROM ledger a JOIN ledger b ON b.part = a.part AND b.seq = a.seq AND b.leg = 1"
        f" WHERE a.part = -1 AND a.leg = 0 AND a.account = 'host_reserved:{host_id}' ORDER BY a.seq")]


async def test_a_payout_delivered_five_times_at_once_pays_once(live: tuple[ServerProc, Backend],
                                                               people: Callable[..., Any]) -> None:
    _, ledger = live
    host, wid, units = await pending_withdrawal(live, people)
    admin = people("admin")
    assert applied(await drive(admin, wid, "paid", 5)) == [True]
    # Other paid events (new ids) and a late failure change nothing; the failure is kept as ignored.
    again = await asyncio.gather(drive(admin, wid, "paid", 2), drive(admin, wid, "failed", 5))
    assert applied(again[0]) == [False] and applied(again[1]) == [False]
    assert await host_row(ledger, host.user_id) == (units, 0, 0, MIN * UNITS_PER_DIAMOND)
    assert await pay_movements(ledger, host.user_id) == [("platform:payouts", MIN * UNITS_PER_DIAMOND)]
    outcomes = await ledger.query(f"SELECT type, outcome FROM payout_events WHERE withdrawal_id = '{wid}'"
                                  " ORDER BY type, outcome")
    assert outcomes == [("payout.failed", "ignored"), ("payout.paid", "applied"), ("payout.paid", "ignored")]
    listed = (await host.listed())["withdrawals"][0]
    assert listed["status"] == "paid"
    assert [t["status"] for t in listed["transitions"]] == ["pending", "paid"]


async def test_a_failed_payout_returns_the_diamonds_once(live: tuple[ServerProc, Backend],
                                                         people: Callable[..., Any]) -> None:
    _, ledger = live
    host, wid, units = await pending_withdrawal(live, people)
    admin = people("admin")
    assert applied(await drive(admin, wid, "failed", 5)) == [True]
    assert applied(await drive(admin, wid, "paid", 3)) == [False]  # late: changes nothing
    assert await host_row(ledger, host.user_id) == (units, 0, 0, 0)
    assert await pay_movements(ledger, host.user_id) == [(f"host:{host.user_id}", MIN * UNITS_PER_DIAMOND)]
    listed = (await host.listed())["withdrawals"][0]
    assert (listed["status"], listed["failure_reason"]) == ("failed", "account_closed")
    assert [t["status"] for t in listed["transitions"]] == ["pending", "failed"]

    # Paid and failed racing on one withdrawal: one of them, once, and the books say which.
    host2, wid2, units2 = await pending_withdrawal(live, people)
    paid, failed = await asyncio.gather(drive(admin, wid2, "paid", 5), drive(admin, wid2, "failed", 5))
    assert sorted(applied(paid) + applied(failed)) == [False, True]
    won = "paid" if applied(paid) == [True] else "failed"
    assert (await host2.listed())["withdrawals"][0]["status"] == won
    paid_units = MIN * UNITS_PER_DIAMOND if won == "paid" else 0
    assert await host_row(ledger, host2.user_id) == (units2, 0, 0, paid_units)
    assert len(await pay_movements(ledger, host2.user_id)) == 1


async def test_a_dispute_after_a_payout_holds_and_pays_nothing_twice(live: tuple[ServerProc, Backend],
                                                                    people: Callable[..., Any]) -> None:
    """The coins of a paid-out withdrawal's gifts are disputed: their diamonds are held, the
    host's available goes below zero and no withdrawal passes until new earnings repay it; the
    dispute won gives them back once. Paid out only ever grows by what was asked."""
    server, ledger = live
    host, admin = people(), people("admin")
    payments: list[str] = []
    units = await fund(server, ledger, host, payments=payments)  # 14,999.5 diamonds
    base = await base_step()
    app = await host.two_factor(base - 1)
    first = await host.withdraw(MIN, app.code(base))
    assert first.status_code == 202, first.text
    assert applied(await drive(admin, first.json()["withdrawal_id"], "paid", 2)) == [True]
    paid = MIN * UNITS_PER_DIAMOND
    assert await host_row(ledger, host.user_id) == (units, 0, 0, paid)

    async def row_is(want: tuple[int, int, int, int]) -> bool:
        return await host_row(ledger, host.user_id) == want

    r = await admin.post(f"/v1/sandbox/payments/{payments[0]}", json={"outcome": "disputed"})
    assert r.status_code == 200, r.text
    await wait_until(lambda: row_is((units, units, 0, paid)), timeout=20, interval=0.05)
    earnings = (await host.client.get("/v1/me/earnings")).json()
    assert (earnings["diamonds"], earnings["held"], earnings["paid_out"]) == (-MIN, units // UNITS_PER_DIAMOND, MIN)
    later = app.code(base + 1)
    assert code_of(await host.withdraw(MIN, later)) == (402, "insufficient_diamonds")

    r = await admin.post(f"/v1/sandbox/payments/{payments[0]}", json={"outcome": "dispute_won"})
    assert r.status_code == 200, r.text
    await wait_until(lambda: row_is((units, 0, 0, paid)), timeout=20, interval=0.05)
    assert code_of(await host.withdraw(MIN, later)) == (402, "insufficient_diamonds")  # 4,999.5 left
    units = await fund(server, ledger, host)
    second = await host.withdraw(MIN, later)  # the code the refusals left unused
    assert second.status_code == 202, second.text
    assert applied(await drive(admin, second.json()["withdrawal_id"], "paid", 3)) == [True]
    assert await host_row(ledger, host.user_id) == (units, 0, 0, 2 * paid)
    assert await pay_movements(ledger, host.user_id) == [("platform:payouts", paid)] * 2


def _signed(body: dict[str, Any], secret: str = WEBHOOK_SECRET, t: int | None = None) -> tuple[bytes, dict[str, str]]:
    raw = json.dumps(body).encode()
    return raw, {"content-type": "application/json",
                 "giftstream-signature": signature.sign(secret, raw, int(time.time()) if t is None else t)}


async def test_forged_stale_and_wrong_payout_events_change_nothing(live: tuple[ServerProc, Backend],
                                                                   people: Callable[..., Any]) -> None:
    server, ledger = live
    host, wid, units = await pending_withdrawal(live, people)

    def event(**data: Any) -> dict[str, Any]:
        return {"id": "evt_" + os.urandom(8).hex(), "type": "payout.paid", "created": int(time.time()),
                "data": {"withdrawal_id": wid, "amount_cents": MIN // 2, "currency": "USD", **data}}

    async with httpx.AsyncClient(base_url=server.base, timeout=30) as http:
        async def post(raw: bytes, headers: dict[str, str]) -> tuple[int, str]:
            return code_of(await http.post(PAYOUT_WEBHOOK, content=raw, headers=headers))

        assert await post(*_signed(event(), secret="not-the-secret")) == (400, "bad_signature")
        assert await post(*_signed(event(), t=int(time.time()) - 301)) == (400, "bad_signature")
        raw, headers = _signed(event())
        assert await post(raw.replace(b"payout.paid", b"payout.fail"), headers) == (400, "bad_signature")
        assert await post(raw, {"content-type": "application/json"}) == (400, "bad_signature")
        assert await post(*_signed(event(amount_cents=MIN))) == (400, "amount_mismatch")
        assert await post(*_signed(event(currency="EUR"))) == (400, "amount_mismatch")
        assert await post(*_signed(event(withdrawal_id="nope"))) == (404, "not_found")
        assert await post(*_signed({**event(), "type": "payout.maybe"})) == (400, "bad_request")
    assert await ledger.query(f"SELECT COUNT(*) FROM payout_events WHERE withdrawal_id = '{wid}'") == [(0,)]
    assert await host_row(ledger, host.user_id) == (units, 0, MIN * UNITS_PER_DIAMOND, 0)
    assert (await host.listed())["withdrawals"][0]["status"] == "pending"


async def test_the_sandbox_driver_is_for_admins_and_off_with_sandbox_0(live: tuple[ServerProc, Backend],
                                                                       people: Callable[..., Any],
                                                                       tmp_path: Path) -> None:
    host, admin = people(), people("admin")
    r = await host.client.post("/v1/sandbox/payouts/x", json={"outcome": "paid"})
    assert code_of(r) == (403, "forbidden")
    assert code_of(await admin.post("/v1/sandbox/payouts/x", json={"outcome": "paid"})) == (404, "not_found")
    for body in ({"outcome": "maybe"}, {"outcome": "paid", "deliveries": 6}, {"outcome": "paid", "deliveries": True}):
        assert code_of(await admin.post("/v1/sandbox/payouts/x", json=body)) == (400, "bad_request"), body
    # With GIFTSTREAM_SANDBOX=0 the route answers before it reads anything: the app itself, in
    # this process and never started (no Redis, no database), shows it in 40 ms, not a server's 4 s.
    app = create_app(Settings(redis_url="redis://127.0.0.1:1/0", secret=SECRET, data_dir=tmp_path, sandbox=False,
                              database_url=f"sqlite:///{tmp_path / 'off.sqlite3'}"))
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://off") as off:
        r = await off.post("/v1/sandbox/payouts/x", json={"outcome": "paid"},
                           headers={"authorization": f"Bearer {token('root', 'admin')}"})
    assert code_of(r) == (404, "not_found") and "GIFTSTREAM_SANDBOX=0" in r.json()["message"]


def test_the_secret_is_kept_out_of_reprs() -> None:
    assert "SECRET" not in repr(TwoFactor("h", "SECRET", "PENDINGSECRET", 1, 0, 0))


async def test_the_audit_balances_after_all_of_the_above(live: tuple[ServerProc, Backend]) -> None:
    """Last on each backend's server: `giftstream audit` finds each host's reserved and paid
    diamonds equal to its pending and paid withdrawals, and every ledger movement balanced, after
    every test above (one run: the audit is a process of its own, about 2 s)."""
    server, _ = live
    result = audit(server)
    assert result["ok"], result["failures"]
