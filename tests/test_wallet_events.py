"""The `wallet` socket event in-process (`server/rooms/wallet_events.py`): a published balance
change reaches that user's room sockets on this node, in every room, and no one else's."""

from __future__ import annotations

import pytest

from server.rooms.hub import Hub
from server.rooms.wallet_events import WalletEvents, deliver
from tests.fakes import taken_over_conn

pytestmark = pytest.mark.timeout(30)


async def test_a_wallet_event_goes_to_every_socket_of_its_user_and_only_those() -> None:
    hub = Hub(tick_ms=10)
    mine = [taken_over_conn("r1", user_id="ann"), taken_over_conn("r2", user_id="ann"),
            taken_over_conn("r2", user_id="ann", subprotocol="giftstream.json")]
    theirs = [taken_over_conn("r1", user_id="bob"), taken_over_conn("r2", user_id="annie")]
    for conn, _ in mine + theirs:
        await hub.join(conn)
    event = {"user_id": "ann", "coins": -30, "change": -100, "reason": "refund", "ref": "ord-1"}
    assert deliver(hub, event) == 3
    expected = {"type": "wallet", "coins": -30, "change": -100, "reason": "refund", "ref": "ord-1"}
    assert all(t.messages() == [expected] for _, t in mine)
    assert all(t.messages() == [] for _, t in theirs)


async def test_a_closed_socket_or_an_undecodable_message_is_skipped() -> None:
    hub = Hub(tick_ms=10)
    conn, transport = taken_over_conn("r1", user_id="cy")
    await hub.join(conn)
    events = WalletEvents("redis://127.0.0.1:1", hub)  # never started: no connection is made
    try:
        events._on_message({"type": "message", "data": "not json"})
        events._on_message({"type": "subscribe", "data": 1})
        assert transport.messages() == [] and events.delivered == 0
        events._on_message({"type": "message", "data": '{"user_id": "cy", "coins": 5, "change": 5,'
                                                       ' "reason": "reward", "ref": "k"}'})
        assert events.delivered == 1 and transport.messages()[0]["reason"] == "reward"
        conn.closed = True
        assert deliver(hub, {"user_id": "cy", "coins": 6, "change": 1, "reason": "reward", "ref": "k2"}) == 0
    finally:
        await events.stop()
