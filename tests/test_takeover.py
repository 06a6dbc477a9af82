"""A taken-over room socket (`server/rooms/takeover.py`) in-process: pings, closes, the
node-wide keepalive. (Its frame reading is tested with bytes in test_fastframes.py.)"""

from __future__ import annotations

import asyncio
import json

from websockets.frames import Frame, Opcode

from server.rooms.takeover import Keepalive
from tests.fakes import OP_PING, room_socket
from tests.support import wait_until


def _pong(data: bytes = b"gs") -> bytes:
    return Frame(Opcode.PONG, data).serialize(mask=True)


async def test_a_ping_waits_for_its_pong_and_a_close_is_sent_once() -> None:
    lost: list[bool] = []
    room, transport = room_socket(on_lost=lambda: lost.append(True))
    room.ping()
    assert transport.frames() == [(OP_PING, b"gs")] and room.ping_sent_at > 0
    room.data_received(_pong())
    assert room.ping_sent_at == 0.0
    room.send_close(4410, "bye")
    room.send_close(4410, "again")
    room.ping()  # nothing after a close
    assert transport.close_frame() == (4410, "bye") and len(transport.frames()) == 2
    transport.abort()
    await wait_until(lambda: bool(lost), timeout=2, interval=0.005)
    room.connection_lost(None)
    assert lost == [True]  # told once


async def test_keepalive_drops_a_silent_peer_with_4408_and_keeps_one_that_answers() -> None:
    answering, answering_t = room_socket()
    dropped_lost: list[bool] = []
    silent, silent_t = room_socket(on_lost=lambda: dropped_lost.append(True))
    keepalive = Keepalive(lambda: [answering, silent], interval_s=0.05, timeout_s=0.1)

    async def peer() -> None:  # answers every ping it is sent, as a browser does
        answered = 0
        while True:
            pings = sum(op == OP_PING for op, _ in answering_t.frames())
            for _ in range(pings - answered):
                answering.data_received(_pong())
            answered = pings
            await asyncio.sleep(0.01)  # the peer's own pace

    keepalive.start()
    answering_peer = asyncio.ensure_future(peer())
    try:
        await wait_until(lambda: silent_t.aborted, timeout=3, interval=0.01)
        code, reason = silent_t.close_frame() or (0, "")
        assert code == 4408 and json.loads(reason)["reason"] == "keepalive ping timeout"
        assert keepalive.dropped == 1
        await wait_until(lambda: bool(dropped_lost), timeout=2, interval=0.005)
        # the answering peer, pinged several times over, is still there
        await wait_until(lambda: sum(op == OP_PING for op, _ in answering_t.frames()) >= 3, timeout=3, interval=0.01)
        assert not answering_t.closing and answering_t.close_frame() is None and keepalive.dropped == 1
    finally:
        answering_peer.cancel()
        await asyncio.gather(answering_peer, return_exceptions=True)
        await keepalive.stop()


async def test_keepalive_spreads_a_round_of_pings_over_its_interval() -> None:
    sockets = [room_socket() for _ in range(60)]
    keepalive = Keepalive(lambda: [room for room, _ in sockets], interval_s=0.4, timeout_s=10)
    loop = asyncio.get_running_loop()
    first_ping: dict[int, float] = {}
    keepalive.start()
    try:
        started = loop.time()
        while len(first_ping) < len(sockets) and loop.time() - started < 5:
            for i, (_, transport) in enumerate(sockets):
                if i not in first_ping and transport.frames():
                    first_ping[i] = loop.time()
            await asyncio.sleep(0.005)
    finally:
        await keepalive.stop()
    assert len(first_ping) == len(sockets)
    # Each socket is visited once an interval, a slice of them at a time: their first pings came
    # over at least half an interval, not all in one loop step (a timer that pinged 80,000
    # sockets at once stalled a join storm for a second).
    assert max(first_ping.values()) - min(first_ping.values()) >= 0.2
    assert all(len(t.frames()) == 1 for _, t in sockets)  # unanswered, not yet timed out: pinged once
