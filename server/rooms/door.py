"""The fast way into a room: handshake, auth and join in one pass, below uvicorn.

A gateway restart makes all its viewers reconnect at once, so a join must be cheap. Through
uvicorn a join cost about 2 ms of CPU here (490-610 joins/s a core): uvicorn's upgrade and the
ASGI layers about half, the request parsed a second time by websockets a tenth, two to four
Redis round trips a fifth, JWT 7%. The door takes a room socket's request from the HTTP
protocol's first bytes (server/guard.py), reads it once (rooms/handshake.py), answers the
handshake, verifies the token, and hands the socket to a `RoomProtocol` at once. A room this
node is already subscribed to is joined with no Redis read but the viewer count, which the
joins of a room share (rooms/presence.py); only the first join of a room on a node reads the
room from Redis (Session.join).

Every answer is the one `ws.room_socket` gives: close codes, refusals, the welcome. A
request the door does not read goes to uvicorn as before.
"""

from __future__ import annotations

import asyncio
import time
from typing import TYPE_CHECKING, Any

from server import auth, errors, protocol
from server.errors import Disconnect
from server.rooms.conn import Conn
from server.rooms.handshake import RoomUpgrade, switching
from server.rooms.takeover import RoomProtocol

if TYPE_CHECKING:
    from server.node import Node


# Seconds a refused socket has to answer its close frame before the connection is closed
# (uvicorn's close timeout, which the long way keeps).
REFUSED_CLOSE_S = 10.0


def _nothing(*_: Any) -> None:
    return None


def enter(node: Node, transport: asyncio.Transport, upgrade: RoomUpgrade, early: bytes) -> None:
    """Take this connection as a room socket: its request was `upgrade`, and `early` is what
    the client sent after it (its first frames)."""
    from server.ws import Session

    accepted = time.perf_counter()
    settings = node.settings
    offered = list(upgrade.offered)
    subprotocol = protocol.choose_subprotocol(offered)
    room = RoomProtocol(None, transport, _nothing, _nothing, settings.send_buffer_cap, settings.max_frame_bytes,
                        joining=True)
    transport.set_protocol(room)
    answer = switching(upgrade, subprotocol if subprotocol in offered else None)
    try:
        principal = auth.verify(settings.secret or "", upgrade.token)
    except Exception as exc:
        transport.write(answer)
        _refuse(room, upgrade.room_id, errors.close_for(exc))
        return
    if node.draining:
        transport.write(answer)
        _refuse(room, upgrade.room_id, errors.GOING_AWAY)
        return
    conn = Conn(None, subprotocol, principal, upgrade.room_id, settings.send_buffer_cap, room=room)
    conn.preface(answer)  # the 101 goes out with the welcome (or before a close frame)
    if settings.socket_sndbuf:
        conn.set_kernel_sndbuf(settings.socket_sndbuf)
    session = Session(node, conn, None)
    session.adopt(room)
    if early:
        room.data_received(early)  # held until the welcome is out
    if not _joined_known(session, accepted):
        node.track(_join_unknown(node, session, accepted))


def _joined_known(session: Any, accepted: float) -> bool:
    """Join a room this node knows, at once; True when the join is over (welcomed, or closed on
    an error), False when the room must be read first."""
    try:
        return bool(session.join_known(accepted))
    except Exception as exc:
        session.conn.close_now(errors.close_for(exc))
        return True


async def _join_unknown(node: Node, session: Any, accepted: float) -> None:
    """The first join of a room on this node (or one whose end came): read it from Redis."""
    from server import metrics
    from server.ws import log_refusal

    conn, hub = session.conn, node.hub
    reading = hub.learning(conn.room_id)
    if reading is not None:  # another join is reading this room now: join once it knows it
        await asyncio.shield(reading)
        if _gone(session) or _joined_known(session, accepted):
            return
    learnt = hub.learn(conn.room_id) if reading is None else None
    try:
        state = await node.rooms.get(conn.room_id)
        if state is None or not state.live:
            log_refusal(conn.room_id, int(errors.ROOM_NOT_FOUND.code), errors.ROOM_NOT_FOUND)
            conn.close_now(errors.ROOM_NOT_FOUND)
            return
        session.sender = node.gifts.sender(conn, state.host_id)
        if _gone(session):
            return  # its finish ran already: joining now would leave it in the room for good
        if await session.join():
            metrics.JOIN_SECONDS.observe(time.perf_counter() - accepted)
            session.room.go_live()
    except Exception as exc:
        conn.close_now(errors.close_for(exc))
    finally:
        if learnt is not None:
            hub.learned(conn.room_id, learnt)


def _gone(session: Any) -> bool:
    """The peer left while the room was read (its finish ran, with nothing to leave)."""
    return bool(session.conn.closed or session.room.disconnected)


def _refuse(room: RoomProtocol, room_id: str, refusal: Disconnect) -> None:
    """A close frame saying why, after the handshake (as `ws.room_socket` answers); the peer's
    close answer ends the connection, or a grace period does."""
    from server.ws import log_refusal

    code, reason = errors.closing(refusal)
    log_refusal(room_id, code, refusal)
    room.send_close(code, reason)
    asyncio.get_running_loop().call_later(REFUSED_CLOSE_S, room.transport.close)
