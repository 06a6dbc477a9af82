"""An attacker's tries as tests: bad tokens (forged, expired, `alg: none`, wrong key, wrong role,
claims of the wrong type) on HTTP and on the socket; other users' wallets, earnings, orders and
rooms; idempotency keys of two users that collide; SQL injection in every path and query
parameter; webhook forgery and replay. Each must be refused with the documented answer, and
`giftstream audit` must stay exact."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import re
import sqlite3
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import quote

import httpx
import jwt
import pytest
import websockets

from server.codes import Close
from tests.support import SECRET, Api, ServerProc, http_routes, join, run_cli, token, wait_until

pytestmark = pytest.mark.timeout(120)


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _claims(user: str = "mallory", **over: Any) -> dict[str, Any]:
    now = int(time.time())
    return {"sub": user, "name": user, "role": "viewer", "birthdate": "1990-01-01", "iat": now, "exp": now + 3600,
            **over}


def _alg_none(claims: dict[str, Any]) -> str:
    return f"{_b64(json.dumps({'alg': 'none', 'typ': 'JWT'}).encode())}.{_b64(json.dumps(claims).encode())}."


def _signed(header: dict[str, Any], claims: dict[str, Any], digest: Any) -> str:
    """A token signed by hand with the server's own secret (PyJWT warns on this key for HS512)."""
    signing = f"{_b64(json.dumps(header).encode())}.{_b64(json.dumps(claims).encode())}"
    return f"{signing}.{_b64(hmac.new(SECRET.encode(), signing.encode(), digest).digest())}"


def _tampered() -> str:
    """A real token for `mallory` with its payload swapped for the admin's: the signature no longer fits."""
    head, _, sig = token("mallory").split(".")
    return f"{head}.{_b64(json.dumps(_claims('victim', role='admin')).encode())}.{sig}"


BAD_TOKENS: dict[str, Callable[[], str]] = {
    "garbage": lambda: "not-a-token",
    "wrong key": lambda: jwt.encode(_claims(), "some-other-secret-0123456789abcdef", algorithm="HS256"),
    "alg none": lambda: _alg_none(_claims()),
    "alg none, admin": lambda: _alg_none(_claims(role="admin")),
    "tampered payload": _tampered,
    "expired": lambda: token("mallory", ttl_s=-60),
    "HS512 with the right key": lambda: _signed({"alg": "HS512", "typ": "JWT"}, _claims(), hashlib.sha512),
    "unknown role": lambda: jwt.encode(_claims(role="root"), SECRET, algorithm="HS256"),
    "no exp": lambda: jwt.encode({k: v for k, v in _claims().items() if k != "exp"}, SECRET, algorithm="HS256"),
    "exp as a numeric string": lambda: jwt.encode(_claims(exp=str(int(time.time()) + 3600)), SECRET,
                                                  algorithm="HS256"),
    "exp 10**30": lambda: jwt.encode(_claims(exp=10**30), SECRET, algorithm="HS256"),
    "birthdate as an integer": lambda: jwt.encode(_claims(birthdate=19900101), SECRET, algorithm="HS256"),
    "sub as an integer": lambda: jwt.encode(_claims(sub=42), SECRET, algorithm="HS256"),
    "sub with a hash tag": lambda: jwt.encode(_claims(sub="a}{p0"), SECRET, algorithm="HS256"),
}


@pytest.fixture(scope="module")
def gate(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProc]:
    """One server for every bad token (a refusal changes nothing a later one could see), on its
    own embedded valkey: the session valkey is flushed by the tests that follow."""
    server = ServerProc(tmp_path_factory.mktemp("security") / "var").start()
    yield server
    server.terminate()


@pytest.mark.parametrize("kind", sorted(BAD_TOKENS))
async def test_a_bad_token_is_refused_on_http(gate: ServerProc, kind: str) -> None:
    server = gate
    bad = BAD_TOKENS[kind]()
    async with httpx.AsyncClient(base_url=server.base, headers={"authorization": f"Bearer {bad}"}) as http:
        for method, path, body in (("GET", "/v1/wallet", None), ("GET", "/v1/me/earnings", None),
                                   ("POST", "/v1/recharges", {"coins": 100, "payment_method": "sandbox_card",
                                                              "idempotency_key": "k"}),
                                   ("POST", "/v1/rooms", {"title": "mine"})):
            r = await http.request(method, path, json=body)
            assert r.status_code == 401, (kind, path, r.status_code, r.text)
            assert r.json()["code"] == "unauthorized", (kind, r.text)


@pytest.mark.parametrize("kind", sorted(BAD_TOKENS))
async def test_a_bad_token_is_refused_on_the_socket(gate: ServerProc, kind: str) -> None:
    server = gate
    host = Api(server, token(f"sh-{kind}", "host"))  # one server for every kind: one live room per host
    room = await host.create_room()
    await host.close()
    with pytest.raises((websockets.ConnectionClosed, websockets.InvalidStatus)) as refused:
        async with join(server, room, quote(BAD_TOKENS[kind](), safe="")):
            pass
    exc = refused.value
    if isinstance(exc, websockets.InvalidStatus):
        assert exc.response.status_code in (401, 403), kind
    else:
        assert isinstance(exc, websockets.ConnectionClosed), exc
        assert exc.rcvd is not None and exc.rcvd.code == Close.UNAUTHORIZED, (kind, exc)


async def test_the_wrong_role_is_forbidden(server: ServerProc, api: Callable[..., Api]) -> None:
    viewer, host, other_host = api("rv"), api("rh", "host"), api("rh2", "host")
    r = await viewer.client.post("/v1/rooms", json={"title": "not mine to open"})
    assert (r.status_code, r.json()["code"]) == (403, "forbidden"), r.text
    room = await host.create_room()
    for who in (viewer, other_host):
        r = await who.client.post(f"/v1/rooms/{room}/end")
        assert (r.status_code, r.json()["code"]) == (403, "forbidden"), r.text
    assert (await viewer.client.get(f"/v1/rooms/{room}")).json()["live"] is True
    # A viewer's earnings are nobody's: a viewer asking is refused or sees an empty account.
    r = await viewer.client.get("/v1/me/earnings")
    assert r.status_code in (200, 403), r.text
    if r.status_code == 200:
        assert r.json()["diamond_units"] == 0


async def test_other_users_wallets_earnings_and_orders_are_out_of_reach(server: ServerProc,
                                                                        api: Callable[..., Api]) -> None:
    """Every route reads the user from the token alone: naming another user in the query or the
    body reaches nothing of theirs, and another user's order is not found."""
    victim, mallory, host = api("victim"), api("mallory"), api("vh", "host")
    assert (await victim.recharge(coins=500, key="v1")).status_code == 201
    room = await host.create_room()
    async with join(server, room, victim.token) as c:
        await c.gift("v-g1", "rose", 5)
        assert (await c.reply("v-g1"))["type"] == "ack"
    await wait_until(lambda: _received(host, 1), timeout=20)
    for path in ("/v1/wallet", "/v1/me/earnings"):
        for params in ({"user_id": "victim"}, {"sub": "victim"}, {"host_id": "vh"}, {"user": "vh"}):
            r = await mallory.client.get(path, params=params)
            assert r.status_code in (200, 400, 403), r.text  # a viewer has no earnings to read
            if r.status_code == 200:
                assert r.json() == (await mallory.client.get(path)).json(), (path, params)
    assert (await mallory.wallet())["coins"] == 0
    # A recharge naming the victim credits the caller, if anyone.
    r = await mallory.client.post("/v1/recharges", json={"coins": 100, "payment_method": "sandbox_card",
                                                        "idempotency_key": "m1", "user_id": "victim"})
    assert r.status_code in (201, 400), r.text
    assert (await victim.wallet())["coins"] == 495
    # Orders: the victim's order, asked for by its id, is the victim's alone.
    order = (await victim.recharge(coins=30, key="v2")).json()
    order_id = order.get("order_id") or order.get("id")
    routes = [p for p in _paths(server) if "{order_id}" in p]
    if not order_id or not routes:
        pytest.skip("no route reads an order by its id yet: nothing of another user's to reach")
    for template in routes:
        r = await mallory.client.get(template.replace("{order_id}", str(order_id)))
        assert r.status_code in (403, 404), (template, r.text)


async def _received(host: Api, n: int) -> bool:
    return int((await host.earnings())["gifts_received"]) >= n


def _paths(server: ServerProc) -> list[str]:
    return sorted({path for _, path in http_routes()})


async def test_idempotency_keys_are_scoped_per_user(server: ServerProc, api: Callable[..., Api]) -> None:
    """Two users with the same gift id and the same recharge key: two gifts, two recharges, each
    charged or credited once to its own user; a retry by either replays its own result."""
    a, b, host = api("idem-a"), api("idem-b"), api("idem-h", "host")
    for user in (a, b):
        for _ in range(2):
            assert (await user.recharge(coins=300, key="same-key")).status_code in (200, 201)
    assert (await a.wallet())["coins"] == (await b.wallet())["coins"] == 300
    room = await host.create_room()
    async with join(server, room, a.token) as ca, join(server, room, b.token) as cb:
        await ca.gift("same-id", "rose", 3)
        await cb.gift("same-id", "rose", 7)
        ack_a, ack_b = await ca.reply("same-id"), await cb.reply("same-id")
        assert ack_a["type"] == ack_b["type"] == "ack", (ack_a, ack_b)
        assert ack_a["gift_id"] != ack_b["gift_id"]
        for c, ack in ((ca, ack_a), (cb, ack_b)):
            c.replies.pop("same-id")
            await c.gift("same-id", "rose", 3 if c is ca else 7)
            again = await c.reply("same-id")
            assert (again["gift_id"], again["replayed"]) == (ack["gift_id"], True)
    assert (await a.wallet())["coins"] == 297 and (await b.wallet())["coins"] == 293
    await wait_until(lambda: _received(host, 2), timeout=20)
    assert (await host.earnings())["gifts_received"] == 2


INJECTIONS = ["' OR '1'='1", "'; DROP TABLE gifts; --", "1; DELETE FROM ledger", "\" OR \"\"=\"",
              "x' UNION SELECT id, sender_id FROM gifts --", "%27%20OR%201%3D1", "1)) OR ((1=1", "\\'; --",
              "'||(SELECT sqlite_version())||'", "$1", "?"]
QUERY_KEYS = ("room_id", "user_id", "since", "limit", "cursor", "id", "order_id")
# The money: what no request with injection text may change (a room created by a POST may).
TABLES = ("users", "orders", "movements", "gifts", "ledger", "host_earnings", "payment_events", "order_transitions")


def _ledger(db: Path) -> dict[str, Any]:
    """Every row of the money tables, as text, per table."""
    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    try:
        names = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        return {t: sorted(map(repr, conn.execute(f"SELECT * FROM {t}"))) for t in TABLES if t in names}
    finally:
        conn.close()


async def test_sql_injection_in_every_path_and_query_parameter(server: ServerProc, api: Callable[..., Api],
                                                               tmp_path: Path) -> None:
    viewer, host = api("inj-v"), api("inj-h", "host")
    assert (await viewer.recharge(coins=100, key="inj")).status_code == 201
    room = await host.create_room()
    # Injection text as a gift's id and a display name: stored as text, settled as any gift.
    named = Api(server, token("inj-n", name="Robert'); DROP TABLE users; --"))
    assert (await named.recharge(coins=50, key="'; DROP TABLE orders; --")).status_code == 201
    async with join(server, room, named.token) as c:
        await c.gift("'; DROP TABLE gifts; --", "rose", 1)
        assert (await c.reply("'; DROP TABLE gifts; --"))["type"] == "ack"
    await wait_until(lambda: _received(host, 1), timeout=20)
    await named.close()
    db = server.data_dir / "giftstream.sqlite3"
    before = _ledger(db)
    param = re.compile(r"{(\w+)(?::\w+)?}")
    for template in _paths(server):
        for bad in INJECTIONS:
            path = param.sub(quote(bad, safe=""), template)
            # GET everywhere; POST where the injection is in the path (a POST to a route with no
            # parameter, e.g. a check-in, is a legitimate request whatever its query holds).
            methods = ("GET", "POST") if param.search(template) else ("GET",)
            for who in (viewer, host):
                for method in methods:
                    r = await who.client.request(method, path, params=dict.fromkeys(QUERY_KEYS, bad))
                    assert r.status_code < 500, (method, path, r.status_code, r.text)
                    if r.status_code >= 400:
                        assert set(r.json()) == {"code", "message"}, (path, r.text)
    assert _ledger(db) == before, "a request with injection text changed the ledger"
    assert (await viewer.client.get(f"/v1/rooms/{room}")).json()["live"] is True
    result = run_cli("audit", "--json", "--data-dir", str(server.data_dir), "--redis-url", server.redis_url or "")
    assert result.returncode == 0, result.stdout + result.stderr
    assert json.loads(result.stdout)["ok"] is True


WEBHOOK = "/v1/payments/sandbox/webhook"


async def test_webhook_forgery_and_replay(server: ServerProc, api: Callable[..., Api]) -> None:
    """A webhook signed with the wrong key, stale (past the 5-minute tolerance), tampered after
    signing, or unsigned is `bad_signature` and credits nothing; a genuine one credits once, and
    its replay (same event, re-signed or as it was) credits nothing more."""
    if WEBHOOK not in _paths(server):
        pytest.skip(f"the payments webhook ({WEBHOOK}) does not exist yet")
    from server.payments.signature import sign

    secret = (server.data_dir / "webhook_secret").read_text().strip()
    viewer = api("wh-v")
    order = (await viewer.client.post("/v1/recharges", json={
        "package_id": "coins_330", "payment_method": "paypal", "idempotency_key": "wh-1"})).json()
    assert order["status"] == "pending", order
    event = {"id": "evt_sec_1", "type": "payment.succeeded", "created": int(time.time()),
             "data": {"payment_id": order["payment_id"], "amount_cents": order["price_cents"], "currency": "USD"}}
    body = json.dumps(event).encode()
    now = int(time.time())

    async def post(payload: bytes, signature: str | None) -> httpx.Response:
        headers = {"content-type": "application/json"} | ({"giftstream-signature": signature} if signature else {})
        return await viewer.client.post(WEBHOOK, content=payload, headers=headers)

    tampered = json.dumps({**event, "data": {**event["data"], "amount_cents": 10**6}}).encode()
    for payload, signature in ((body, None), (body, "garbage"), (body, sign("not-the-secret", body, now)),
                               (body, sign(secret, body, now - 3600)), (tampered, sign(secret, body, now))):
        r = await post(payload, signature)
        assert r.status_code in (400, 401, 403) and r.json()["code"] == "bad_signature", (signature, r.text)
        assert (await viewer.wallet())["coins"] == 0
    first = await post(body, sign(secret, body, now))
    assert first.status_code == 200 and first.json()["status"] == "credited", first.text
    for signature in (sign(secret, body, now), sign(secret, body, int(time.time()))):
        again = await post(body, signature)
        assert again.status_code == 200 and again.json()["duplicate"] is True, again.text
    assert (await viewer.wallet())["coins"] == 330
