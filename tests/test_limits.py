"""Limits an attacker meets (issue 15), each against a real `giftstream serve` over raw sockets:
HTTP bodies, request heads and idle connections, ping floods, resume and ping rates, sockets
per user and connections per address."""

from __future__ import annotations

import asyncio
import json
import os
import socket
import time
from collections.abc import Callable
from typing import Any

import httpx
import pytest
import websockets

from tests.support import FAST, Api, Client, ServerProc, join, raw_ws_connect, token, wait_until

pytestmark = pytest.mark.timeout(120)


def _rss_kb(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        lines = f.read().splitlines()
    for line in lines:
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


def _pid(server: ServerProc) -> int:
    assert server.proc is not None
    return server.proc.pid


async def _room(server: ServerProc, host_id: str = "lh") -> str:
    host = Api(server, token(host_id, "host"))
    room = await host.create_room()
    await host.close()
    return room


async def _http_head(reader: asyncio.StreamReader) -> tuple[int, dict[str, Any]]:
    """Status and JSON body of one HTTP answer (the one error body), or (0, {}) on a bare close."""
    try:
        head = await reader.readuntil(b"\r\n\r\n")
    except (asyncio.IncompleteReadError, ConnectionError):
        return 0, {}
    status = int(head.split(b" ", 2)[1])
    lengths = [int(line.split(b":")[1]) for line in head.split(b"\r\n") if line.lower().startswith(b"content-length")]
    length = lengths[0] if lengths else 0
    body = await reader.readexactly(length) if length else b""
    return status, json.loads(body) if body.startswith(b"{") else {}


async def _push(writer: asyncio.StreamWriter, answer: asyncio.Task[Any], chunk: bytes, limit: int) -> int:
    """Send `chunk` again and again until `limit` bytes, an answer, or the server cuts us off;
    the bytes sent."""
    sent = 0
    try:
        while sent < limit and not answer.done():
            writer.write(chunk)
            await asyncio.wait_for(writer.drain(), 10)
            sent += len(chunk)
    except (ConnectionError, TimeoutError):
        pass
    return sent


# --- HTTP bodies -------------------------------------------------------------------------------


async def test_a_chunked_body_past_the_limit_is_refused_unread(make_server: Callable[..., ServerProc],
                                                               redis_url: str) -> None:
    server = make_server(redis_url=redis_url).start()
    rss_before = _rss_kb(_pid(server))
    reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
    writer.write((f"POST /v1/recharges HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {token('big')}\r\n"
                  "Content-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n").encode())
    chunk = b"%x\r\n" % (64 * 1024) + b" " * (64 * 1024) + b"\r\n"
    answer = asyncio.create_task(_http_head(reader))
    sent = await _push(writer, answer, chunk, 100 * 1024 * 1024)
    status, body = await asyncio.wait_for(answer, 10)
    writer.close()
    assert status == 413, (status, body, sent)
    assert body["code"] == "body_too_large"
    assert sent < 20 * 1024 * 1024, "the server kept reading after refusing"
    assert _rss_kb(_pid(server)) - rss_before < 30_000


async def test_a_declared_body_past_the_limit_is_refused_before_it_is_sent(make_server: Callable[..., ServerProc],
                                                                            redis_url: str) -> None:
    server = make_server(redis_url=redis_url).start()
    async with httpx.AsyncClient(base_url=server.base) as client:
        r = await client.post("/v1/recharges", content=b"{" + b" " * 20_000 + b"}",
                              headers={"authorization": f"Bearer {token('big')}", "content-type": "application/json"})
    assert r.status_code == 413
    assert r.json() == {"code": "body_too_large", "message": "body larger than 16384 bytes"}


# --- Request heads and idle connections --------------------------------------------------------


async def test_an_8_mb_header_is_refused_with_431(make_server: Callable[..., ServerProc], redis_url: str) -> None:
    server = make_server(redis_url=redis_url).start()
    rss_before = _rss_kb(_pid(server))
    reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
    answer = asyncio.create_task(_http_head(reader))
    writer.write(b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Big: ")
    if await _push(writer, answer, b"a" * 65536, 8 * 1024 * 1024) >= 8 * 1024 * 1024:
        writer.write(b"\r\n\r\n")  # the whole 8 MB went in: end the head
    status, body = await asyncio.wait_for(answer, 10)
    writer.close()
    assert status == 431, (status, body)
    assert body["code"] == "headers_too_large"
    assert _rss_kb(_pid(server)) - rss_before < 30_000


async def test_silent_and_slowloris_connections_are_closed_after_the_head_timeout(
        make_server: Callable[..., ServerProc], redis_url: str) -> None:
    server = make_server(redis_url=redis_url, env={"GIFTSTREAM_HTTP_HEADER_TIMEOUT_S": "1"}).start()
    silent = [await asyncio.open_connection("127.0.0.1", server.port) for _ in range(300)]
    slow_reader, slow_writer = await asyncio.open_connection("127.0.0.1", server.port)
    slow_writer.write(b"GET /healthz HTTP/1.1\r\n")
    started = time.monotonic()

    async def slowloris() -> None:
        for _ in range(100):  # a header byte every 100 ms, never the end of the head
            if slow_writer.is_closing():
                return
            slow_writer.write(b"X")
            with_error = False
            try:
                await slow_writer.drain()
            except ConnectionError:
                with_error = True
            if with_error:
                return
            await asyncio.sleep(0.1)

    trickle = asyncio.create_task(slowloris())

    async def closed(reader: asyncio.StreamReader) -> bool:
        try:
            return await asyncio.wait_for(reader.read(), 10) == b""
        except ConnectionError:
            return True

    results = await asyncio.gather(*(closed(r) for r, _ in silent), closed(slow_reader))
    took = time.monotonic() - started
    trickle.cancel()
    for _, w in [*silent, (slow_reader, slow_writer)]:
        w.close()
    assert all(results)
    assert took < 8, took
    # The server still answers.
    async with httpx.AsyncClient(base_url=server.base) as client:
        assert (await client.get("/healthz")).status_code == 200


async def test_connections_per_address_are_capped(make_server: Callable[..., ServerProc], redis_url: str) -> None:
    server = make_server(redis_url=redis_url, env={"GIFTSTREAM_MAX_CONNECTIONS_PER_IP": "5",
                                                   "GIFTSTREAM_IP_CAP_LOOPBACK": "1"}).start()
    held = [await asyncio.open_connection("127.0.0.1", server.port) for _ in range(5)]
    await wait_until(lambda: _refused_one(server), timeout=10)
    reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
    writer.write(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
    status, body = await asyncio.wait_for(_http_head(reader), 10)
    writer.close()
    assert status == 429 and body["code"] == "too_many_connections", (status, body)
    for _, w in held:
        w.close()
    async with httpx.AsyncClient(base_url=server.base) as client:

        async def admitted() -> bool:
            return (await client.get("/healthz")).status_code == 200

        await wait_until(admitted, timeout=10)


async def _refused_one(server: ServerProc) -> bool:
    reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
    writer.write(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
    status, _ = await asyncio.wait_for(_http_head(reader), 10)
    writer.close()
    return status == 429


# --- WebSocket: ping floods, rates, sockets per user -------------------------------------------


def _ping_frame(payload: bytes) -> bytes:
    mask = os.urandom(4)
    return bytes([0x89, 0x80 | len(payload)]) + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(payload))


def _flood(sock: socket.socket, limit: int) -> int:
    """Pings until the server drops the socket; the bytes sent by then (or `limit`)."""
    batch = _ping_frame(b"p" * 125) * 500
    sock.settimeout(15)
    sent = 0
    try:
        while sent < limit:
            sock.sendall(batch)
            sent += len(batch)
    except (ConnectionResetError, BrokenPipeError, TimeoutError):
        return sent
    return sent


@pytest.mark.parametrize("takeover", ["1", "0"])
async def test_a_ping_flood_on_a_socket_that_never_reads_is_closed_as_slow(
        make_server: Callable[..., ServerProc], redis_url: str, takeover: str) -> None:
    server = make_server(redis_url=redis_url, env={"GIFTSTREAM_TAKEOVER": takeover,
                                                   "GIFTSTREAM_SEND_BUFFER_CAP": "65536",
                                                   "GIFTSTREAM_SOCKET_SNDBUF": "16384"}).start()
    room = await _room(server)
    rss_before = _rss_kb(_pid(server))
    sock = raw_ws_connect(server.port, f"/v1/rooms/{room}/ws?token={token('flooder')}")
    try:
        sent = await asyncio.to_thread(_flood, sock, 40 * 1024 * 1024)
    finally:
        sock.close()
    assert sent < 40 * 1024 * 1024, "the flood was never cut off"
    assert _rss_kb(_pid(server)) - rss_before < 30_000
    async with httpx.AsyncClient(base_url=server.base) as client:
        text = (await client.get("/metrics")).text
    assert 'giftstream_closes_total{code="4008"}' in text


async def _until_reply(client: Client, msg_id: str) -> list[dict[str, Any]]:
    """Every message up to the reply with this id (replies keep the order of the requests)."""
    seen: list[dict[str, Any]] = []
    while True:
        msg = await client.recv(10)
        seen.append(msg)
        if msg.get("id") == msg_id and msg["type"] == "error":
            return seen


async def test_resumes_over_the_rate_are_refused_and_not_run(make_server: Callable[..., ServerProc],
                                                             redis_url: str) -> None:
    server = make_server(redis_url=redis_url, env={"GIFTSTREAM_RESUME_BURST": "3",
                                                   "GIFTSTREAM_RESUME_RATE_PER_S": "0.01"}).start()
    room = await _room(server)
    async with join(server, room, token("res")) as c:
        since = c.welcome["offset"]
        for i in range(10):
            await c.send({"type": "resume", "since": since, "id": f"r{i}"})
        await c.send({"type": "resume", "since": "not-an-offset", "id": "end"})
        seen = await _until_reply(c, "end")
    limited = [m for m in seen if m["type"] == "error" and m["code"] == "rate_limited"]
    assert sorted(m["id"] for m in limited) == sorted(f"r{i}" for i in range(3, 10))
    assert limited[0]["message"] == "too many resumes; wait and resume once"


async def test_pings_over_the_rate_are_dropped(make_server: Callable[..., ServerProc], redis_url: str) -> None:
    server = make_server(redis_url=redis_url, env={"GIFTSTREAM_PING_BURST": "5",
                                                   "GIFTSTREAM_PING_RATE_PER_S": "0.01"}).start()
    room = await _room(server)
    async with join(server, room, token("pinger")) as c:
        for i in range(200):
            await c.send({"type": "ping", "id": f"p{i}"})
        await c.send({"type": "resume", "since": "not-an-offset", "id": "end"})
        seen = await _until_reply(c, "end")
    pongs = [m["id"] for m in seen if m["type"] == "pong"]
    assert pongs == [f"p{i}" for i in range(5)]


async def _closed_with(server: ServerProc, room: str, user: str) -> tuple[int, dict[str, Any]]:
    url = f"{server.ws_base}/v1/rooms/{room}/ws?token={token(user)}"
    async with websockets.connect(url, subprotocols=["giftstream.msgpack"]) as ws:  # type: ignore[list-item]
        with pytest.raises(websockets.ConnectionClosed) as closed:
            while True:
                await asyncio.wait_for(ws.recv(), 10)
    assert closed.value.rcvd is not None
    return closed.value.rcvd.code, json.loads(closed.value.rcvd.reason)


async def test_sockets_per_user_are_capped_and_a_user_is_one_viewer(make_server: Callable[..., ServerProc],
                                                                    redis_url: str) -> None:
    server = make_server(redis_url=redis_url, env={**FAST, "GIFTSTREAM_PRESENCE_INTERVAL_S": "0.2",
                                                   "GIFTSTREAM_MAX_SOCKETS_PER_USER_ROOM": "2",
                                                   "GIFTSTREAM_MAX_SOCKETS_PER_USER": "3"}).start()
    room_a, room_b, room_c = await _room(server, "ha"), await _room(server, "hb"), await _room(server, "hc")
    async with join(server, room_a, token("many")) as a1, join(server, room_a, token("many")) as a2:
        assert a2.welcome["viewers"] == 1, "one user with two sockets is one viewer"
        code, advice = await _closed_with(server, room_a, "many")
        assert code == 4429
        assert advice["reason"] == "too many connections" and advice["reconnect"] is True
        assert advice["retry_ms"] >= 5000
        async with join(server, room_a, token("other")) as o:
            assert o.welcome["viewers"] == 2
            async with join(server, room_b, token("many")):
                code, _ = await _closed_with(server, room_c, "many")  # three on this node already
                assert code == 4429
            info = Api(server, token("other"))

            async def two_viewers() -> bool:  # a node writes a room's count at most every 0.1 s
                return bool((await info.client.get(f"/v1/rooms/{room_a}")).json()["viewers"] == 2)

            await wait_until(two_viewers, timeout=10)
            await info.close()
        await a1.ws.close()

        async def admitted() -> bool:
            try:
                async with join(server, room_a, token("many")):
                    return True
            except (websockets.ConnectionClosed, AssertionError):
                return False

        await wait_until(admitted, timeout=10)


async def test_a_room_title_loses_its_bidi_overrides(make_server: Callable[..., ServerProc], redis_url: str) -> None:
    server = make_server(redis_url=redis_url).start()
    host = Api(server, token("bidi", "host"))
    r = await host.client.post("/v1/rooms", json={"title": "\u202eevil\u202c \u2066title\u2069\u200f"})
    assert r.status_code == 201
    assert r.json()["title"] == "evil title"
    assert (await host.client.get(f"/v1/rooms/{r.json()['room_id']}")).json()["title"] == "evil title"
    await host.close()
