"""The pure parts of payments: the order state machine, webhook signatures, channel prices."""

from __future__ import annotations

import itertools

import pytest

from server.catalog import in_app_price, load
from server.codes import GiftstreamError
from server.payments import signature
from server.payments.orders import Outcome, plan
from server.store.models import ORDER_PENDING, Order, Transition

pytestmark = pytest.mark.timeout(30)

COINS = 330


def order() -> Order:
    return Order("o1", "u1", "k1", "coins_330", COINS, 499, "USD", "card", ORDER_PENDING, 1, "web", "pay_1")


def run(outcomes: list[Outcome]) -> tuple[list[str], int]:
    """Apply outcomes in turn as the store does: (statuses reached in order, coins moved)."""
    reached = [Transition("o1", ORDER_PENDING, 0, None, 0, 0)]
    for i, outcome in enumerate(outcomes, 1):
        decided = plan(order(), reached, outcome, "card_declined")
        reached += [Transition("o1", status, i, f"e{i}", coins, None) for status, coins in decided.steps]
    return [t.status for t in reached], sum(t.coins for t in reached)


def test_each_outcome_from_pending() -> None:
    assert run([Outcome.SUCCEEDED]) == (["pending", "credited"], COINS)
    assert run([Outcome.DECLINED]) == (["pending", "declined"], 0)
    assert run([Outcome.EXPIRED]) == (["pending", "expired"], 0)


def test_a_success_after_expiry_or_decline_is_credited_once() -> None:
    assert run([Outcome.EXPIRED, Outcome.SUCCEEDED, Outcome.SUCCEEDED]) == (["pending", "expired", "credited"], COINS)
    assert run([Outcome.DECLINED, Outcome.SUCCEEDED]) == (["pending", "declined", "credited"], COINS)
    # the other way round, the late decline or expiry changes nothing
    assert run([Outcome.SUCCEEDED, Outcome.DECLINED, Outcome.EXPIRED]) == (["pending", "credited"], COINS)


def test_refund_and_dispute_take_the_coins_back_once() -> None:
    assert run([Outcome.SUCCEEDED, Outcome.REFUNDED, Outcome.REFUNDED]) == (["pending", "credited", "refunded"], 0)
    assert run([Outcome.SUCCEEDED, Outcome.DISPUTED, Outcome.DISPUTE_WON]) == (
        ["pending", "credited", "disputed", "dispute_won"], COINS)
    assert run([Outcome.SUCCEEDED, Outcome.DISPUTED, Outcome.DISPUTE_LOST, Outcome.DISPUTE_WON]) == (
        ["pending", "credited", "disputed", "dispute_lost"], 0)
    # refunded and disputed: the coins are taken once, and a won dispute gives back only what it took
    assert run([Outcome.SUCCEEDED, Outcome.REFUNDED, Outcome.DISPUTED, Outcome.DISPUTE_WON])[1] == 0
    assert run([Outcome.SUCCEEDED, Outcome.DISPUTED, Outcome.REFUNDED, Outcome.DISPUTE_WON])[1] == 0
    assert run([Outcome.SUCCEEDED, Outcome.DISPUTED, Outcome.DISPUTE_WON, Outcome.REFUNDED])[1] == 0


def test_an_outcome_delivered_before_the_one_it_follows_makes_that_one_first() -> None:
    assert run([Outcome.DISPUTE_WON]) == (["pending", "credited", "disputed", "dispute_won"], COINS)
    assert run([Outcome.REFUNDED, Outcome.SUCCEEDED]) == (["pending", "credited", "refunded"], 0)


@pytest.mark.parametrize("outcomes", [
    [Outcome.SUCCEEDED, Outcome.REFUNDED],
    [Outcome.SUCCEEDED, Outcome.DISPUTED, Outcome.DISPUTE_WON],
    [Outcome.SUCCEEDED, Outcome.DISPUTED, Outcome.DISPUTE_LOST],
    [Outcome.SUCCEEDED, Outcome.EXPIRED, Outcome.DECLINED],
    [Outcome.SUCCEEDED, Outcome.REFUNDED, Outcome.DISPUTED, Outcome.DISPUTE_WON],
])
def test_any_order_and_any_redelivery_ends_the_same(outcomes: list[Outcome]) -> None:
    """Whatever order the events arrive in, each delivered any number of times, the same coins
    move and the same money statuses are reached (whether an order showed `expired` before its
    late success is history, and may differ)."""
    money = {"credited", "refunded", "disputed", "dispute_won", "dispute_lost"}
    want_statuses, want_coins = run(outcomes)
    for perm in itertools.permutations(outcomes):
        statuses, coins = run([o for o in perm for _ in range(2)])
        assert coins == want_coins, perm
        assert set(statuses) & money == set(want_statuses) & money, perm
        assert len(statuses) == len(set(statuses)), perm  # each status at most once


def test_signature_round_trip_and_every_refusal() -> None:
    body = b'{"id":"evt_1"}'
    header = signature.sign("s3cret", body, 1_000_000)
    assert signature.verify("s3cret", header, body, now=1_000_000) == 1_000_000
    assert signature.verify("s3cret", header, body, now=1_000_300) == 1_000_000  # 300 s is still in
    refusals = {
        "missing": (None, body, 1_000_000),
        "other body": (header, body + b" ", 1_000_000),
        "other secret": (signature.sign("other", body, 1_000_000), body, 1_000_000),
        "too old": (header, body, 1_000_301),
        "from the future": (header, body, 999_699),
        "no v1": ("t=1000000", body, 1_000_000),
        "junk": ("nonsense", body, 1_000_000),
        "bad t": ("t=abc,v1=00", body, 1_000_000),
    }
    for name, (h, b, now) in refusals.items():
        with pytest.raises(signature.BadSignature):
            signature.verify("s3cret", h, b, now=now)
            pytest.fail(name)
    # a provider rolling its secret sends two v1 values; one matching is enough
    rolled = header + ",v1=" + "0" * 64
    assert signature.verify("s3cret", rolled, body, now=1_000_000)


def test_channel_prices() -> None:
    catalog = load()
    assert catalog.package("coins_65").prices == {"web": 99, "app_store": 129, "play_store": 129}
    for pkg in catalog.packages.values():
        assert pkg.prices["web"] == pkg.price_cents
        if pkg.id == "coins_65":
            continue  # the data file sets the stores' $1.29 tier for it
        for channel in ("app_store", "play_store"):
            # the store keeps 30%: what is left is at least the web price
            assert pkg.prices[channel] * 7000 // 10000 >= pkg.price_cents * 0.99
    assert catalog.package("coins_330").prices["app_store"] == in_app_price(499, 3000) == 799
    assert in_app_price(9999, 3000) % 100 == 99
    assert catalog.custom(100).prices == {"web": 153}
    with pytest.raises(GiftstreamError) as info:
        catalog.custom(100, "app_store")
    assert "web" in info.value.message
