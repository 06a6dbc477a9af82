"""Keyed movements (wallet/move.lua): claw-backs, reversals, adjustments, points and redemptions,
through the real scripts, settled into the ledger of both backends."""

from __future__ import annotations

import asyncio

import pytest
from redis.asyncio import Redis

from server.codes import Err, GiftstreamError
from server.keys import UserKeys
from server.movement import Kind
from server.settlement.audit import run_audit
from server.settlement.settler import Settler
from server.wallet.service import GiftOrder, Wallet
from tests.ledger import PARTITIONS, Backend, drain

# The fixtures: backend, redis, wallet
pytest_plugins = ["tests.ledger_fixtures"]
pytestmark = pytest.mark.timeout(120)


def _gift(user: str, client_id: str, coins: int) -> GiftOrder:
    return GiftOrder(client_id=client_id, sender_id=user, sender_name=user, host_id="hal", room_id="r1",
                     gift="rose", count=1, unit_coins=coins)


async def _field(redis: Redis, user: str, name: str) -> int:
    return int(await redis.hget(UserKeys(user, PARTITIONS).wallet, name) or 0)


async def test_a_refund_after_gifting_goes_negative_and_refuses_gifts_until_a_recharge(wallet: Wallet,
                                                                                         redis: Redis) -> None:
    await wallet.credit("ann", "ord-1", 100)
    await wallet.send_gift(_gift("ann", "c1", 70))
    assert await wallet.claw_back("ann", "ord-1", 100, Kind.REFUND) == -70
    # exactly once per (kind, order): a redelivered refund changes nothing
    assert await wallet.claw_back("ann", "ord-1", 100, Kind.REFUND) == -70
    with pytest.raises(GiftstreamError) as refused:
        await wallet.send_gift(_gift("ann", "c2", 1))
    assert refused.value.code is Err.ACCOUNT_RESTRICTED
    assert (await wallet.view("ann"))["restricted"] is True
    await wallet.credit("ann", "ord-2", 69)  # still -1: still restricted
    with pytest.raises(GiftstreamError) as still:
        await wallet.send_gift(_gift("ann", "c3", 1))
    assert still.value.code is Err.ACCOUNT_RESTRICTED
    await wallet.credit("ann", "ord-3", 2)  # back at 1: the restriction lifts by itself
    assert (await wallet.view("ann"))["restricted"] is False
    assert (await wallet.send_gift(_gift("ann", "c4", 1))).balance == 0
    assert await _field(redis, "ann", "clawed") == 100


async def test_a_dispute_and_its_reversal_each_apply_once(wallet: Wallet) -> None:
    await wallet.credit("bo", "ord-9", 500)
    results = await asyncio.gather(*(wallet.claw_back("bo", "ord-9", 500, Kind.DISPUTE) for _ in range(10)))
    assert set(results) == {0}
    # a refund of the same order is another kind: its own exactly-once
    assert await wallet.claw_back("bo", "ord-9", 500, Kind.REFUND) == -500
    won = await asyncio.gather(*(wallet.reverse_claw_back("bo", "ord-9", 500) for _ in range(10)))
    assert set(won) == {0}
    assert (await wallet.view("bo"))["coins"] == 0


async def test_claw_back_refuses_what_is_not_a_claw_back(wallet: Wallet) -> None:
    with pytest.raises(ValueError):
        await wallet.claw_back("cy", "ord-1", 5, Kind.ADJUSTMENT)
    with pytest.raises(ValueError):
        await wallet.claw_back("cy", "ord-1", 0, Kind.REFUND)
    with pytest.raises(ValueError):
        await wallet.reverse_claw_back("cy", "ord-1", -5)


async def test_the_same_key_with_other_amounts_is_a_conflict(wallet: Wallet) -> None:
    await wallet.adjust("di", "support-1", 40, "goodwill")
    assert (await wallet.adjust("di", "support-1", 40, "goodwill")).replayed
    with pytest.raises(GiftstreamError) as conflict:
        await wallet.adjust("di", "support-1", 41, "goodwill")
    assert conflict.value.code is Err.IDEMPOTENCY_CONFLICT
    assert (await wallet.view("di"))["coins"] == 40


async def test_fifty_concurrent_redemptions_never_overdraw_points(wallet: Wallet, redis: Redis) -> None:
    rate = wallet.settings.reward_rate_points
    await wallet.grant_points("ed", "grant-1", 20 * rate, "launch")
    tries = await asyncio.gather(*(wallet.redeem("ed", f"key-{i}", rate) for i in range(50)),
                                 return_exceptions=True)
    won = [t for t in tries if not isinstance(t, BaseException)]
    lost = [t for t in tries if isinstance(t, BaseException)]
    assert len(won) == 20
    assert all(isinstance(t, GiftstreamError) and t.code is Err.INSUFFICIENT_POINTS for t in lost)
    view = await wallet.view("ed")
    assert (view["points"], view["coins"]) == (0, 20 * wallet.settings.reward_rate_coins)
    assert (await _field(redis, "ed", "points_earned"), await _field(redis, "ed", "points_redeemed")) == (
        20 * rate, 20 * rate)


async def test_a_redemption_off_the_rate_is_a_bad_amount(wallet: Wallet) -> None:
    with pytest.raises(GiftstreamError) as bad:
        await wallet.redeem("fay", "k", wallet.settings.reward_rate_points + 1)
    assert bad.value.code is Err.BAD_AMOUNT


async def test_check_in_once_per_utc_day(wallet: Wallet) -> None:
    day = 1_767_225_600.0  # 2026-01-01 00:00 UTC
    assert not await wallet.checked_in("gus", day)
    await wallet.check_in("gus", day + 5)
    assert await wallet.checked_in("gus", day + 86_399)
    with pytest.raises(GiftstreamError) as again:
        await wallet.check_in("gus", day + 86_399)
    assert again.value.code is Err.ALREADY_CHECKED_IN
    await wallet.check_in("gus", day + 86_400)  # the next UTC day
    assert (await wallet.view("gus"))["points"] == 2 * wallet.settings.check_in_points


async def test_every_kind_settles_into_balanced_legs_and_the_audit_passes(wallet: Wallet, redis: Redis,
                                                                          backend: Backend) -> None:
    rate = wallet.settings.reward_rate_points
    await wallet.credit("hal9", "ord-1", 300)
    await wallet.send_gift(_gift("hal9", "c1", 250))
    await wallet.claw_back("hal9", "ord-1", 300, Kind.DISPUTE)
    await wallet.reverse_claw_back("hal9", "ord-1", 300)
    await wallet.claw_back("hal9", "ord-1", 300, Kind.REFUND)
    await wallet.adjust("hal9", "adj-1", -7, "double credit")
    await wallet.grant_points("hal9", "g-1", 3 * rate, "contest")
    await wallet.check_in("hal9")
    await wallet.redeem("hal9", "r-1", 2 * rate)
    await drain(Settler(redis, backend.store, partitions=PARTITIONS, consumer="moves"), redis)
    part = UserKeys("hal9", PARTITIONS).partition
    ledger = await backend.query(
        f"SELECT seq, leg, account, unit, delta FROM ledger WHERE part = {part} ORDER BY seq, leg")
    movements = await backend.query(
        f"SELECT seq, kind, coins, points, ref FROM movements WHERE part = {part} ORDER BY seq")
    kinds = [r[1] for r in movements]
    assert kinds == ["credit", "gift", "dispute", "dispute_reversal", "refund", "adjustment", "points_grant",
                     "check_in", "reward"]
    coins = wallet.settings.reward_rate_coins
    seq = {r[1]: r[0] for r in movements}
    # The gift's share, held by the dispute, released when it is won, held again by the refund
    # (store/holds.py: legs 4 and 5 of the claw-back or reversal).
    share = 250 * wallet.settings.host_share_bp
    expected_keyed = [
        (seq["dispute"], 0, "platform:payments", "coin", 300), (seq["dispute"], 1, "user:hal9", "coin", -300),
        (seq["dispute"], 4, "host:hal", "diamond_unit", -share),
        (seq["dispute"], 5, "host_held:hal", "diamond_unit", share),
        (seq["dispute_reversal"], 0, "platform:payments", "coin", -300),
        (seq["dispute_reversal"], 1, "user:hal9", "coin", 300),
        (seq["dispute_reversal"], 4, "host:hal", "diamond_unit", share),
        (seq["dispute_reversal"], 5, "host_held:hal", "diamond_unit", -share),
        (seq["refund"], 0, "platform:payments", "coin", 300), (seq["refund"], 1, "user:hal9", "coin", -300),
        (seq["refund"], 4, "host:hal", "diamond_unit", -share),
        (seq["refund"], 5, "host_held:hal", "diamond_unit", share),
        (seq["adjustment"], 0, "platform:adjustments", "coin", 7), (seq["adjustment"], 1, "user:hal9", "coin", -7),
        (seq["points_grant"], 2, "platform:rewards", "point", -3 * rate),
        (seq["points_grant"], 3, "user:hal9", "point", 3 * rate),
        (seq["check_in"], 2, "platform:rewards", "point", -wallet.settings.check_in_points),
        (seq["check_in"], 3, "user:hal9", "point", wallet.settings.check_in_points),
        (seq["reward"], 0, "platform:rewards", "coin", -2 * coins), (seq["reward"], 1, "user:hal9", "coin", 2 * coins),
        (seq["reward"], 2, "platform:rewards", "point", 2 * rate), (seq["reward"], 3, "user:hal9", "point", -2 * rate),
    ]
    keyed = [tuple(r) for r in ledger if r[0] >= seq["dispute"]]
    assert keyed == expected_keyed
    assert [tuple(r) for r in movements if r[1] == "refund"] == [(seq["refund"], "refund", -300, 0, "ord-1")]
    user_coins = sum(int(r[4]) for r in ledger if r[2] == "user:hal9" and r[3] == "coin")
    user_points = sum(int(r[4]) for r in ledger if r[2] == "user:hal9" and r[3] == "point")
    view = await wallet.view("hal9")
    assert (user_coins, user_points) == (view["coins"], view["points"]) == (
        300 - 250 - 300 - 7 + 2 * coins, 3 * rate + wallet.settings.check_in_points - 2 * rate)
    report = await run_audit(redis, backend.store, PARTITIONS)
    assert report["ok"], report["failures"]
    # settled twice: nothing changes (a redelivery)
    again = await backend.store.settle([])
    assert again.movements == 0


async def test_rebuild_restores_every_figure_of_the_coin_economy(wallet: Wallet, redis: Redis,
                                                                 backend: Backend) -> None:
    from server.settlement.rebuild import rebuild_wallets

    rate = wallet.settings.reward_rate_points
    await wallet.credit("ivy", "ord-1", 100)
    await wallet.send_gift(_gift("ivy", "c1", 60))
    await wallet.claw_back("ivy", "ord-1", 100, Kind.REFUND)
    await wallet.grant_points("ivy", "g", 5 * rate, "x")
    await wallet.redeem("ivy", "r", 3 * rate)
    await drain(Settler(redis, backend.store, partitions=PARTITIONS, consumer="rb"), redis)
    await wallet.adjust("ivy", "a", 9, "unsettled yet")  # still in the outbox
    fields = ["coins", "points", "clawed", "rewarded", "adjusted", "points_earned", "points_redeemed"]
    key = UserKeys("ivy", PARTITIONS).wallet
    before = await redis.hmget(key, fields)
    await redis.hset(key, mapping=dict.fromkeys(fields, 777))
    assert not (await run_audit(redis, backend.store, PARTITIONS))["ok"]
    report = await rebuild_wallets(redis, backend.store, PARTITIONS)
    assert report["ok"] and report["changed"] == 1
    assert await redis.hmget(key, fields) == before
    assert before[:2] == [str(100 - 60 - 100 + 3 * wallet.settings.reward_rate_coins + 9), str(2 * rate)]
    assert (await run_audit(redis, backend.store, PARTITIONS))["ok"]


async def test_the_statement_joins_ledger_and_outbox_on_both_backends(wallet: Wallet, redis: Redis,
                                                                      backend: Backend) -> None:
    from server.wallet.history import transactions

    await wallet.credit("jo", "ord-1", 100)
    for i in range(5):
        await wallet.send_gift(_gift("jo", f"c{i}", 3))
    await wallet.claw_back("jo", "ord-1", 100, Kind.DISPUTE)
    await wallet.check_in("jo")  # points only: not a line of the coin statement
    await drain(Settler(redis, backend.store, partitions=PARTITIONS, consumer="st"), redis)
    await wallet.reverse_claw_back("jo", "ord-1", 100)  # still in the outbox
    lines: list[dict[str, object]] = []
    cursor = None
    while True:
        page = await transactions(redis, backend.store, PARTITIONS, "jo", cursor, 3)
        lines += page["transactions"]
        cursor = page["next_cursor"]
        if cursor is None:
            break
    kinds = [line["kind"] for line in lines]
    assert kinds == ["dispute_reversal", "dispute"] + ["gift"] * 5 + ["recharge"]
    assert [line["settled"] for line in lines] == [False] + [True] * 7
    assert lines[0]["order_id"] == lines[1]["order_id"] == "ord-1"
    assert sum(int(str(line["coins"])) for line in lines) == (await wallet.view("jo"))["coins"] == 85
