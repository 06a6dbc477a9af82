"""The fast way into a room (rooms/door.py) against a real server: the 101 and the welcome in one
write, the client's early frames read after its welcome, the same refusals as the long way, and
joins of a room the node knows reading nothing from Redis."""

from __future__ import annotations

import asyncio
import base64
import json
import math
import os
import time
from collections.abc import Callable
from typing import Any

import msgpack
import pytest
import redis
import websockets

from server.rooms.presence import COUNT_WRITE_SPACING_S
from tests.support import ServerProc, join, open_room, token

KEY = base64.b64encode(os.urandom(16)).decode()


@pytest.fixture
def door_server(make_server: Callable[..., ServerProc], redis_url: str) -> ServerProc:
    return make_server(redis_url=redis_url, env={"GIFTSTREAM_PRESENCE_INTERVAL_S": "0.2"}).start()


def _masked(payload: bytes) -> bytes:
    mask = os.urandom(4)
    return bytes((0x82, 0x80 | len(payload))) + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(payload))


def _frames(data: bytes) -> tuple[list[tuple[int, bytes]], bytes]:
    """Whole server frames (opcode, payload) from `data`, and what is left of it."""
    out = []
    while len(data) >= 2:
        n, head = data[1] & 0x7F, 2
        if n == 126:
            n, head = int.from_bytes(data[2:4], "big"), 4
        if len(data) < head + n:
            break
        out.append((data[0] & 0x0F, data[head : head + n]))
        data = data[head + n :]
    return out, data


async def _raw_join(server: ServerProc, path: str, early: bytes = b"") -> tuple[bytes, list[dict[str, Any]], Any]:
    """A handshake sent in one write with `early` behind it: the 101 head, then the messages."""
    reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
    writer.write((f"GET {path} HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                  f"Sec-WebSocket-Key: {KEY}\r\nSec-WebSocket-Version: 13\r\n"
                  "Sec-WebSocket-Protocol: giftstream.msgpack\r\n\r\n").encode() + early)
    first = await asyncio.wait_for(reader.read(65536), 10)
    head, _, rest = first.partition(b"\r\n\r\n")
    messages: list[dict[str, Any]] = []
    while True:
        frames, rest = _frames(rest)
        for op, payload in frames:
            messages.append({"close": int.from_bytes(payload[:2], "big")} if op == 8 else msgpack.unpackb(payload))
        if any("close" in m for m in messages) or len(messages) >= 2:
            break
        more = await asyncio.wait_for(reader.read(65536), 10)
        if not more:
            break
        rest += more
    writer.close()
    return head, messages, first


async def test_the_101_and_the_welcome_leave_in_one_write_and_early_frames_wait_for_it(
        door_server: ServerProc) -> None:
    room = await open_room(door_server, "dh", "early")
    async with join(door_server, room, token("first")):  # the node now knows the room
        early = _masked(msgpack.packb({"type": "ping", "id": "before-welcome"}))
        head, messages, first = await _raw_join(door_server, f"/v1/rooms/{room}/ws?token={token('early')}", early)
    assert head.startswith(b"HTTP/1.1 101") and b"Sec-WebSocket-Protocol: giftstream.msgpack" in head
    assert messages[0]["type"] == "welcome" and messages[0]["viewers"] == 2
    # the welcome came in the same read as the 101 (one write), the early ping's pong after it
    assert b"welcome" in first and messages[1] == {"type": "pong", "id": "before-welcome", "ts": messages[1]["ts"]}


async def test_refusals_are_the_long_way_s(door_server: ServerProc) -> None:
    room = await open_room(door_server, "rh")
    for path, code in ((f"/v1/rooms/{room}/ws?token=nonsense", 4401), (f"/v1/rooms/{room}/ws", 4401),
                       (f"/v1/rooms/no-such-room/ws?token={token('v')}", 4404)):
        head, messages, _ = await _raw_join(door_server, path)
        assert head.startswith(b"HTTP/1.1 101") and messages[-1] == {"close": code}, (path, messages)
    # a request the door leaves to uvicorn (an escape in the path) joins all the same
    escaped = room[:-1] + "%" + format(ord(room[-1]), "02X")
    async with websockets.connect(f"{door_server.ws_base}/v1/rooms/{escaped}/ws?token={token('esc')}",
                                  subprotocols=["giftstream.json"]) as ws:  # type: ignore[list-item]
        welcome = json.loads(await ws.recv())
    assert welcome["type"] == "welcome" and welcome["room"] == room


async def test_joins_of_a_known_room_read_nothing_from_redis(door_server: ServerProc, redis_url: str) -> None:
    room = await open_room(door_server, "kh")
    r = redis.Redis.from_url(redis_url)
    async with join(door_server, room, token("k0")):
        r.config_resetstat()
        started = time.monotonic()
        sockets = [await websockets.connect(f"{door_server.ws_base}/v1/rooms/{room}/ws?token={token(f'k{i}')}",
                                            subprotocols=["giftstream.msgpack"])  # type: ignore[list-item]
                   for i in range(1, 31)]
        try:
            welcomes = [msgpack.unpackb(await ws.recv()) for ws in sockets]
            await asyncio.sleep(COUNT_WRITE_SPACING_S * 2)  # the joins' count write, spaced, lands
            stats = r.info("commandstats")
            elapsed = time.monotonic() - started
        finally:
            for ws in sockets:
                await ws.close()
    assert [w["type"] for w in welcomes] == ["welcome"] * 30
    assert [w["viewers"] for w in welcomes] == list(range(2, 32))  # each counts itself, no write awaited
    # The joins' count writes (room_tick.lua) leave at most one per COUNT_WRITE_SPACING_S, however
    # many sockets join, and nothing reads the room's state (HGETALL) or offset (XREVRANGE) on its
    # own: those commands ran only inside the writes (the script reads the presence hash and the
    # stream's newest entry).
    def calls(name: str) -> int:
        return int(stats.get(f"cmdstat_{name}", {}).get("calls", 0))

    writes = calls("evalsha")
    # The node's presence tick (room_tick.lua, once a second a room) may run in the window too.
    assert 0 < writes <= 1 + elapsed / COUNT_WRITE_SPACING_S + math.ceil(elapsed) + 1, (writes, elapsed)
    assert calls("hgetall") <= writes and calls("xrevrange") <= writes, stats
