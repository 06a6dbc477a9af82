"""The movement codec (server/movement.py): pure round trips, and the entries the Lua scripts write."""

from __future__ import annotations

import time
from typing import Any

import pytest
from redis.asyncio import Redis

from server.keys import UserKeys, outbox_key
from server.movement import Kind, Movement, decode, encode, from_flat, gift_id
from server.settlement.outbox import snapshot
from server.wallet.service import GiftOrder, Wallet
from tests.ledger import PARTITIONS, credit, gift

# The fixtures: redis, wallet
pytest_plugins = ["tests.ledger_fixtures"]
pytestmark = pytest.mark.timeout(60)


def _flat(fields: dict[str, Any]) -> list[str]:
    """An entry's fields as a Redis reply gives them: [name, value, ...], every value text."""
    return [str(x) for kv in fields.items() for x in kv]


@pytest.mark.parametrize("m", [
    gift(3, 8, user="ann", host="hal", coins=123, bp=4321, room="r9"),
    credit(2, 1, user="bob", coins=500, order="ord-1"),
    Movement(1, 9, Kind.REFUND, "bob", -500, 1_767_225_600_009, "ord-1", reason="refund"),
    Movement(1, 10, Kind.REWARD, "bob", 3, 1_767_225_600_010, "key-1", points=-300, reason="points redeemed"),
    Movement(0, 2**40, Kind.GIFT, "zoë", 44_999, 1_767_225_600_123, gift_id=gift_id(0, 2**40),
             sender_name='Zoë 🌹 "quoted"\n\\', host_id="h|1", room_id="r,1", gift="universe", count=1,
             share_bp=10_000, client_id="c-ünï"),
], ids=["gift", "credit", "refund", "reward", "odd-text"])
def test_an_entry_reads_back_as_the_movement_it_was_made_from(m: Movement) -> None:
    fields = encode(m)
    assert list(fields) == ["k", "seq", "j"]
    text = {k: str(v) for k, v in fields.items()}
    assert Movement.from_fields(text) == m
    assert decode(text["k"], text["seq"], text["j"]) == m
    assert from_flat(_flat(fields)) == m
    # a quarantined entry carries the error and its time after the movement's own fields
    assert from_flat(_flat({**fields, "error": "IntegrityError: x", "at": 1})) == m


def test_kinds_have_one_code_each_and_the_ledger_name_as_value() -> None:
    assert [k.value for k in Kind] == ["gift", "credit", "refund", "dispute", "dispute_reversal", "reward",
                                       "adjustment", "check_in", "points_grant", "withdrawal"]
    assert len({k.code for k in Kind}) == len(Kind)
    assert (Kind.GIFT.code, Kind.CREDIT.code) == ("g", "c")


def test_a_kind_without_an_entry_layout_is_refused_both_ways() -> None:
    withdrawal = Movement(0, 1, Kind.WITHDRAWAL, "u", 5, 1)
    with pytest.raises(ValueError, match="withdrawal"):
        encode(withdrawal)
    with pytest.raises(ValueError, match="withdrawal"):
        decode(Kind.WITHDRAWAL.code, "1", "[]")


def test_the_pre_release_field_per_attribute_entry_is_not_read() -> None:
    """0.1.0 was never released: an entry of one field per attribute is no format of ours."""
    old = {"k": "g", "p": "0", "seq": "1", "uid": "zoe", "name": "Zoe", "host": "hal", "room": "r", "gift": "rose",
           "n": "1", "c": "1", "bp": "5000", "ts": "1", "cid": "c", "id": "g0-1"}
    with pytest.raises(KeyError):
        Movement.from_fields(old)


async def test_every_script_writes_k_seq_j_and_the_settler_reads_the_movement_back(
        redis: Redis, wallet: Wallet) -> None:
    """send_gift.lua and credit.lua write the same three fields; the JSON body is the codec's."""
    before = int(time.time() * 1000)
    await wallet.credit("zoe", "order-zoe", 50_000)
    order = GiftOrder(client_id="c-ünï", sender_id="zoe", sender_name="Zoë 🌹 \"quoted\"", host_id="hal",
                      room_id="r|1", gift="universe", count=1, unit_coins=44_999)
    debit = await wallet.send_gift(order)
    after = int(time.time() * 1000)
    part = UserKeys("zoe", PARTITIONS).partition
    raw: Any = await redis.xrange(outbox_key(part))
    assert [list(fields) for _id, fields in raw] == [["k", "seq", "j"], ["k", "seq", "j"]]
    _totals, movements = await snapshot(redis, part)
    c, g = movements
    assert before <= c.ts_ms <= g.ts_ms <= after
    assert c == Movement(part, 1, Kind.CREDIT, "zoe", 50_000, c.ts_ms, order_id="order-zoe", credit_kind="recharge")
    assert g == Movement(part, 2, Kind.GIFT, "zoe", 44_999, g.ts_ms, gift_id=debit.gift_id,
                         sender_name=order.sender_name, host_id="hal", room_id="r|1", gift="universe", count=1,
                         share_bp=5000, client_id="c-ünï")
    assert debit.gift_id == gift_id(part, 2) and debit.debit_ms == g.ts_ms
    assert [encode(m) for m in movements] == [
        {k: (int(v) if k == "seq" else v) for k, v in fields.items()} for _id, fields in raw]
    assert (await wallet.balance("zoe"))["coins"] == 50_000 - 44_999
    # A retry replays the first charge, with the first charge's time.
    again = await wallet.send_gift(order)
    assert again.replayed and (again.gift_id, again.debit_ms) == (debit.gift_id, debit.debit_ms)
    replay = await wallet.replay(order)
    assert replay is not None and (replay.gift_id, replay.debit_ms) == (debit.gift_id, debit.debit_ms)
