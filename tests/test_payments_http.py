"""Recharges, orders, the signed webhook and the sandbox driver, over real HTTP against `serve`
(real valkey; SQLite, and PostgreSQL where the test takes `database_url`)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable

import httpx
import pytest

from tests.payments import ENV, WEBHOOK, Payer, audit, deliver, event, signed
from tests.support import ServerProc, join, wait_until

pytestmark = pytest.mark.timeout(120)


@pytest.fixture
def pay_server(make_server: Callable[..., ServerProc], redis_url: str) -> ServerProc:
    return make_server(redis_url=redis_url, env=ENV).start()


@pytest.fixture
async def users(pay_server: ServerProc) -> AsyncIterator[Callable[..., Payer]]:
    made: list[Payer] = []

    def make(user_id: str, role: str = "viewer") -> Payer:
        payer = Payer(pay_server, user_id, role)
        made.append(payer)
        return payer

    yield make
    for p in made:
        await p.close()


async def test_catalog_prices_by_channel_and_the_channel_rules(users: Callable[..., Payer]) -> None:
    alice = users("alice")
    catalog = (await alice.client.get("/v1/catalog")).json()
    first = catalog["packages"][0]
    assert first["prices"] == {"web": 99, "app_store": 129, "play_store": 129}
    assert catalog["custom"]["channels"] == ["web"]

    order = await alice.pending(method="app_store", package_id="coins_65")
    assert (order["channel"], order["price_cents"], order["currency"], order["coins"]) == ("app_store", 129, "USD", 65)
    assert order["payment_id"].startswith("pay_")
    web = await alice.pending(method="paypal", package_id="coins_65")
    assert (web["channel"], web["price_cents"]) == ("web", 99)
    for method, channel in (("app_store", "web"), ("paypal", "play_store"), ("play_store", "app_store")):
        r = await alice.recharge(method=method, channel=channel)
        assert r.status_code == 400, r.text
        assert r.json()["code"] == "unsupported_payment_method" and channel in r.json()["message"]
    r = await alice.recharge(method="app_store", package_id=None, coins=100)
    assert r.status_code == 400 and "web" in r.json()["message"], r.text
    r = await alice.recharge(method="card", channel="tv")
    assert r.status_code == 400 and r.json()["code"] == "bad_request", r.text
    r = await alice.recharge(method="paypal", card_number="4242424242424242")
    assert r.status_code == 400 and r.json()["code"] == "bad_request", r.text
    for method in ("bank_transfer", "mobile_wallet", "play_store"):
        assert (await alice.pending(method=method))["status"] == "pending"
    assert await alice.coins() == 0


async def test_declined_cards_credit_nothing_and_say_why(users: Callable[..., Payer]) -> None:
    bob = users("bob")
    for number, reason in (("4000000000000002", "card_declined"), ("4000 0000 0000 9995", "insufficient_funds")):
        for method in ("card", "sandbox_card"):
            key = f"{method}-{reason}"
            for _ in range(2):  # the same key stays declined
                r = await bob.recharge(method=method, card_number=number, key=key)
                assert r.status_code == 402, r.text
                body = r.json()
                assert body["code"] == "payment_declined" and body["decline_reason"] == reason
                assert body["message"].endswith(".") and " " in body["message"]
            order = await bob.order(body["order_id"])
            assert order["status"] == "declined" and order["decline_reason"] == reason
            assert order["decline_message"] == body["message"]
            assert [t["status"] for t in order["transitions"]] == ["pending", "declined"]
    assert "insufficient funds" in body["message"]
    assert await bob.coins() == 0
    # a card that goes through: sandbox_card pays at once, card goes pending
    r = await bob.recharge(method="sandbox_card", card_number="4242424242424242")
    assert r.status_code == 201 and r.json()["status"] == "credited", r.text
    assert (await bob.pending(method="card", card_number="4242424242424242"))["status"] == "pending"


async def test_five_concurrent_deliveries_credit_once(make_server: Callable[..., ServerProc], redis_url: str,
                                                      database_url: str) -> None:
    """On SQLite and PostgreSQL."""
    server = make_server(redis_url=redis_url, database_url=database_url, env=ENV).start()
    carol, admin = Payer(server, "carol"), Payer(server, "ops", "admin")
    try:
        orders = [await carol.pending(method="card", package_id="coins_330") for _ in range(3)]
        for order in orders:
            sent = await admin.drive(order["payment_id"], "succeeded", deliveries=5)
            answers = sent["deliveries"]
            assert [a["status"] for a in answers] == [200] * 5, answers
            assert sum(not a["body"]["duplicate"] for a in answers) == 1, answers
            assert sent["event"]["type"] == "payment.succeeded"
        assert await carol.coins() == 3 * 330
        # the same event again, later: a duplicate, nothing changes
        r = await deliver(carol.client, sent["event"])
        assert r.status_code == 200 and r.json() == {"duplicate": True}
        shown = await carol.order(orders[0]["order_id"])
        assert shown["status"] == "credited"
        assert [t["status"] for t in shown["transitions"]] == ["pending", "credited"]
        assert shown["transitions"][1]["at"] >= shown["created_at"]
        assert await carol.coins() == 3 * 330
        await wait_until(lambda: _settled(server))
        report = audit(server)
        assert report["payments"]["paid_orders"] == 3 and report["payments"]["events_applied"] == 3
    finally:
        await carol.close()
        await admin.close()


async def _settled(server: ServerProc) -> bool:
    async with httpx.AsyncClient(base_url=server.base) as c:
        return (await c.get("/healthz")).json().get("outbox_entries") == 0  # type: ignore[no-any-return]


async def test_webhook_refuses_bad_signatures_stale_times_unknown_payments_and_wrong_amounts(
        users: Callable[..., Payer]) -> None:
    dave = users("dave")
    order = await dave.pending()
    good = event(order["payment_id"], order["price_cents"])
    raw, headers = signed(good)
    c = dave.client
    refused = [
        await c.post(WEBHOOK, content=raw, headers={"content-type": "application/json"}),
        await c.post(WEBHOOK, content=raw, headers={**headers, "giftstream-signature": "t=1,v1=00"}),
        await c.post(WEBHOOK, content=raw + b" ", headers=headers),
        await deliver(c, good, secret="not-the-secret"),
        await deliver(c, good, t=int(time.time()) - 301),
        await deliver(c, good, t=int(time.time()) + 301),
    ]
    for r in refused:
        assert r.status_code == 400 and r.json()["code"] == "bad_signature", r.text
    r = await deliver(c, event("pay_nothing", 499))
    assert r.status_code == 404 and r.json()["code"] == "not_found", r.text
    for wrong in (event(order["payment_id"], 1), event(order["payment_id"], 499, currency="EUR")):
        r = await deliver(c, {**wrong, "id": good["id"]})
        assert r.status_code == 400 and r.json()["code"] == "amount_mismatch", r.text
    r = await deliver(c, {**good, "type": "payment.teleported"})
    assert r.status_code == 400 and r.json()["code"] == "bad_request", r.text
    assert (await dave.order(order["order_id"]))["status"] == "pending"
    assert await dave.coins() == 0
    # the same event, well signed, is then applied: the refusals recorded nothing
    r = await deliver(c, good)
    assert r.status_code == 200 and r.json()["duplicate"] is False and r.json()["status"] == "credited", r.text
    assert await dave.coins() == 330


async def test_a_success_after_expiry_is_credited_once(make_server: Callable[..., ServerProc], redis_url: str) -> None:
    server = make_server(redis_url=redis_url, env={**ENV, "GIFTSTREAM_PAYMENT_EXPIRY_S": "1"}).start()
    erin, admin = Payer(server, "erin"), Payer(server, "ops", "admin")
    try:
        order = await erin.pending(method="bank_transfer")
        await wait_until(lambda: _status(erin, order["order_id"], "expired"), timeout=30)
        assert await erin.coins() == 0
        sent = await admin.drive(order["payment_id"], "succeeded", deliveries=5)
        assert sum(not a["body"]["duplicate"] for a in sent["deliveries"]) == 1
        shown = await erin.order(order["order_id"])
        assert shown["status"] == "credited"
        assert [t["status"] for t in shown["transitions"]] == ["pending", "expired", "credited"]
        assert await erin.coins() == 330
        # a second success event (another id) is recorded and ignored
        again = await admin.drive(order["payment_id"], "succeeded")
        assert again["deliveries"][0]["body"] == {"duplicate": False, "applied": False,
                                                 "order_id": order["order_id"], "status": "credited"}
        assert await erin.coins() == 330
    finally:
        await erin.close()
        await admin.close()


async def _status(payer: Payer, order_id: str, status: str) -> bool:
    return bool((await payer.order(order_id))["status"] == status)


async def test_orders_are_listed_newest_first_and_private(users: Callable[..., Payer]) -> None:
    frank, grace, admin = users("frank"), users("grace"), users("ops", "admin")
    made = [(await frank.pending())["order_id"] for _ in range(5)]
    seen: list[str] = []
    cursor = ""
    while True:
        r = await frank.client.get("/v1/recharges", params={"limit": 2, "cursor": cursor})
        assert r.status_code == 200, r.text
        page = r.json()
        seen += [o["order_id"] for o in page["orders"]]
        if page["next_cursor"] is None:
            break
        cursor = page["next_cursor"]
    assert seen == made[::-1]
    assert (await grace.client.get(f"/v1/recharges/{made[0]}")).status_code == 404
    assert (await grace.client.get("/v1/recharges")).json() == {"orders": [], "next_cursor": None}
    assert (await grace.client.get("/v1/recharges", params={"user_id": "frank"})).status_code == 403
    assert (await admin.client.get(f"/v1/recharges/{made[0]}")).json()["user_id"] == "frank"
    listed = (await admin.client.get("/v1/recharges", params={"user_id": "frank", "limit": 100})).json()
    assert len(listed["orders"]) == 5
    assert (await frank.client.get("/v1/recharges", params={"cursor": "nonsense"})).status_code == 400
    # the sandbox driver is for admins
    r = await frank.client.post(f"/v1/sandbox/payments/{made[0]}", json={"outcome": "succeeded"})
    assert r.status_code == 403, r.text


async def test_refund_after_gifting_goes_negative_and_a_won_dispute_returns_coins_once(
        make_server: Callable[..., ServerProc], redis_url: str, database_url: str) -> None:
    """On SQLite and PostgreSQL."""
    pay_server = make_server(redis_url=redis_url, database_url=database_url, env=ENV).start()
    made = [Payer(pay_server, "heidi"), Payer(pay_server, "hhost", "host"), Payer(pay_server, "ops", "admin")]
    try:
        await _refund_then_dispute(pay_server, *made)
    finally:
        for p in made:
            await p.close()


async def _refund_then_dispute(pay_server: ServerProc, heidi: Payer, host: Payer, admin: Payer) -> None:
    first = await heidi.pending(package_id="coins_330")
    second = await heidi.pending(package_id="coins_65")
    await admin.drive(first["payment_id"], "succeeded")
    await admin.drive(second["payment_id"], "succeeded")
    assert await heidi.coins() == 395
    room = (await host.client.post("/v1/rooms", json={"title": "refunds"})).json()["room_id"]
    token = heidi.client.headers["authorization"].split()[1]
    async with join(pay_server, room, token) as sock:
        await sock.gift("g1", "confetti", 3)  # 300 coins
        assert (await sock.reply("g1"))["type"] == "ack"
        # the 330-coin order is refunded: 95 - 330 = -235, and gifts are refused
        sent = await admin.drive(first["payment_id"], "refunded", deliveries=3)
        assert sum(not a["body"]["duplicate"] for a in sent["deliveries"]) == 1
        assert await heidi.coins() == -235
        await sock.gift("g2", "rose", 1)
        assert (await sock.reply("g2"))["code"] == "account_restricted"
        # the 65-coin order is disputed, then the dispute is won: 65 taken, then given back once
        await admin.drive(second["payment_id"], "disputed", deliveries=2)
        assert await heidi.coins() == -300
        await admin.drive(second["payment_id"], "dispute_won", deliveries=5)
        await admin.drive(second["payment_id"], "dispute_won")
        assert await heidi.coins() == -235
        assert (await heidi.order(second["order_id"]))["status"] == "dispute_won"
        # a recharge back to zero or above lifts the restriction
        r = await heidi.recharge(method="sandbox_card", package_id="coins_330")
        assert r.status_code == 201, r.text
        assert await heidi.coins() == 95
        await sock.gift("g3", "rose", 1)
        assert (await sock.reply("g3"))["type"] == "ack"
    assert (await heidi.order(first["order_id"]))["status"] == "refunded"
    await wait_until(lambda: _settled(pay_server))
    audit(pay_server)


async def test_a_dispute_lost_keeps_the_coins_taken(users: Callable[..., Payer]) -> None:
    ivan, admin = users("ivan"), users("ops", "admin")
    order = await ivan.pending(package_id="coins_330")
    await asyncio.gather(admin.drive(order["payment_id"], "succeeded", deliveries=2),
                         admin.drive(order["payment_id"], "disputed", deliveries=2))
    assert await ivan.coins() == 0
    await admin.drive(order["payment_id"], "dispute_lost", deliveries=2)
    await admin.drive(order["payment_id"], "dispute_won")  # closed already: ignored
    assert await ivan.coins() == 0
    shown = await ivan.order(order["order_id"])
    assert shown["status"] == "dispute_lost"
    assert [t["status"] for t in shown["transitions"]] == ["pending", "credited", "disputed", "dispute_lost"]


async def test_sandbox_driver_is_off_with_sandbox_0(make_server: Callable[..., ServerProc], redis_url: str) -> None:
    server = make_server(redis_url=redis_url, env={**ENV, "GIFTSTREAM_SANDBOX": "0"}).start()
    judy, admin = Payer(server, "judy"), Payer(server, "ops", "admin")
    try:
        order = await judy.pending()
        r = await admin.client.post(f"/v1/sandbox/payments/{order['payment_id']}", json={"outcome": "succeeded"})
        assert r.status_code == 404, r.text
        # the webhook itself still works: real providers use it
        assert (await deliver(judy.client, event(order["payment_id"], 499))).status_code == 200
        assert await judy.coins() == 330
    finally:
        await judy.close()
        await admin.close()


