"""One room socket (`server/rooms/conn.py`) in-process, over a fake transport: direct writes,
the byte cap, corked replies, closes. Both ways a socket is written: through the light
protocol it is handed to after joining (takeover on) and through uvicorn's (takeover off)."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from typing import Any

import pytest
from websockets.frames import Close as CloseFrame
from websockets.frames import Frame, Opcode

from server import errors
from server.rooms import conn as conn_module
from server.rooms.conn import Conn
from server.rooms.frames import OutFrame
from server.rooms.takeover import RoomProtocol
from tests.fakes import OP_BINARY, OP_CLOSE, OP_TEXT, FakeTransport, taken_over_conn, uvicorn_conn
from tests.support import wait_until

MakeConn = Callable[..., tuple[Conn, FakeTransport]]


def _taken_over(**kw: Any) -> tuple[Conn, FakeTransport]:
    return taken_over_conn(**kw)


def _uvicorn(**kw: Any) -> tuple[Conn, FakeTransport]:
    conn, proto = uvicorn_conn(**kw)
    return conn, proto.transport


@pytest.fixture(params=[_taken_over, _uvicorn], ids=["takeover", "no_takeover"])
def make_conn(request: pytest.FixtureRequest) -> MakeConn:
    return request.param  # type: ignore[no-any-return]


@pytest.fixture(autouse=True)
def short_grace(monkeypatch: pytest.MonkeyPatch) -> None:
    """A peer that never answers a close is dropped after the grace period: short here."""
    monkeypatch.setattr(conn_module, "CLOSE_GRACE_S", 0.01)


def _event(i: int, pad: int = 0) -> OutFrame:
    return OutFrame({"type": "events", "events": [{"type": "gift", "offset": f"1-{i}", "pad": "x" * pad}]})


def _size(frame: OutFrame, subprotocol: str = "giftstream.msgpack") -> int:
    return len(frame.for_subprotocol(subprotocol)[1])


async def test_a_frame_is_one_write_straight_to_the_transport(make_conn: MakeConn) -> None:
    for subprotocol, opcode in (("giftstream.msgpack", OP_BINARY), ("giftstream.json", OP_TEXT)):
        conn, transport = make_conn(subprotocol=subprotocol)
        frame = _event(1)
        assert conn.send(frame)
        assert transport.writes == [frame.for_subprotocol(subprotocol)[1]]
        assert [op for op, _ in transport.frames()] == [opcode]
        assert transport.messages() == [frame.message]


async def test_a_socket_over_its_byte_cap_is_closed_4008_and_dropped_after_the_grace(make_conn: MakeConn) -> None:
    frame = _event(1, pad=200)
    size = _size(frame)
    conn, transport = make_conn(cap=3 * size)
    transport.stalled = True  # the peer reads nothing: every byte stays unsent
    assert [conn.send(frame) for _ in range(3)] == [True, True, True]  # exactly at the cap: kept
    assert not conn.closed and transport.close_frame() is None
    assert conn.send(frame) is False  # one byte over: dropped as slow
    assert conn.closed and conn.close_code == 4008
    code, reason = transport.close_frame() or (0, "")
    advice = json.loads(reason)
    assert code == 4008 and advice["reason"] == "slow consumer" and advice["reconnect"] is True
    assert 200 <= advice["retry_ms"] < 1000
    # Nothing more is written to it, and a peer that never reads the close is dropped.
    before = len(transport.writes)
    assert conn.send(frame) is False and conn.send_message({"type": "x"}) is False
    conn.reply({"type": "ack", "id": "late"})
    await asyncio.sleep(0)  # a loop step: when a corked reply would have been written
    assert len(transport.writes) == before
    await wait_until(lambda: transport.aborted, timeout=2, interval=0.01)


async def test_a_peer_that_reads_keeps_its_socket_however_much_is_sent(make_conn: MakeConn) -> None:
    frame = _event(1, pad=200)
    conn, transport = make_conn(cap=2 * _size(frame))
    for _ in range(50):
        assert conn.send(frame)
        transport.drain_peer()  # taken by the peer: nothing waits in the buffer
    assert not conn.closed and len(transport.messages()) == 50


async def test_corked_replies_leave_in_one_write_per_loop_step_in_order(make_conn: MakeConn) -> None:
    conn, transport = make_conn()
    other, other_transport = make_conn()
    conn.reply({"type": "ack", "id": "a"})
    conn.reply({"type": "error", "id": "b", "code": "insufficient_funds"})
    other.reply({"type": "pong", "id": "p"})
    assert transport.writes == [] and other_transport.writes == []  # corked until the step ends
    await asyncio.sleep(0)  # one loop step: the thing under test
    assert len(transport.writes) == 1 and [m["id"] for m in transport.messages()] == ["a", "b"]
    assert len(other_transport.writes) == 1 and other_transport.messages()[0]["id"] == "p"
    await asyncio.sleep(0)
    assert len(transport.writes) == 1  # written once


async def test_corked_replies_go_before_a_frame_sent_in_the_same_step(make_conn: MakeConn) -> None:
    conn, transport = make_conn()
    conn.reply({"type": "ack", "id": "a"})
    conn.reply({"type": "ack", "id": "b"})
    assert conn.send(_event(7))
    assert len(transport.writes) == 1  # replies and frame in one write
    assert [m["type"] for m in transport.messages()] == ["ack", "ack", "events"]
    await asyncio.sleep(0)
    assert len(transport.writes) == 1  # the cork was emptied by the frame: nothing twice


async def test_close_now_writes_the_replies_already_made_then_the_close_frame(make_conn: MakeConn) -> None:
    conn, transport = make_conn()
    conn.reply({"type": "ack", "id": "a"})
    conn.close_now(errors.ROOM_ENDED)
    assert conn.closed and conn.close_code == 4410
    frames = transport.frames()
    assert [op for op, _ in frames] == [OP_BINARY, OP_CLOSE]
    assert transport.messages() == [{"type": "ack", "id": "a"}]
    code, reason = transport.close_frame() or (0, "")
    assert code == 4410 and json.loads(reason) == {"reason": "room ended", "reconnect": False}
    conn.close_now(errors.GOING_AWAY)  # once closed, a second close writes nothing
    assert conn.send(_event(2)) is False and len(transport.frames()) == 2
    await wait_until(lambda: transport.aborted, timeout=2, interval=0.01)


async def test_close_on_a_direct_socket_closes_at_once_with_its_advice(make_conn: MakeConn) -> None:
    conn, transport = make_conn()
    assert conn.send(_event(1))
    await conn.close(errors.GOING_AWAY)
    code, reason = transport.close_frame() or (0, "")
    advice = json.loads(reason)
    assert code == 1001 and advice["reconnect"] is True and 1000 <= advice["retry_ms"] < 5000
    assert transport.messages() == [_event(1).message]


async def test_no_takeover_close_tells_uvicorn_the_socket_is_closed() -> None:
    conn, proto = uvicorn_conn()
    conn.close_now(errors.SLOW_CONSUMER)
    assert proto.close_sent
    # uvicorn's receive loop learns of the close as from its own: the endpoint returns
    message = proto.queue.get_nowait()
    assert message["type"] == "websocket.disconnect" and message["code"] == 4008


async def test_a_socket_whose_peer_closed_takes_no_more_frames() -> None:
    conn, transport = taken_over_conn()
    room = transport.protocol
    assert isinstance(room, RoomProtocol)
    room.data_received(Frame(Opcode.CLOSE, CloseFrame(1000, "bye").serialize()).serialize(mask=True))
    assert transport.close_frame() == (1000, "bye")  # the close handshake, answered
    written = len(transport.writes)
    assert conn.send(_event(1)) is False and conn.closed
    assert len(transport.writes) == written
