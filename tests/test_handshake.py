"""A room socket's upgrade request read in one pass (rooms/handshake.py), fed bytes alone: what
it reads is what websockets would accept, and anything less plain goes the long way (None)."""

from __future__ import annotations

import random

from websockets.http11 import Request
from websockets.server import ServerProtocol

from server.rooms.handshake import head_end, parse, switching

KEY = "dGhlIHNhbXBsZSBub25jZQ=="


def _request(target: str = "/v1/rooms/r1/ws?token=abc", headers: list[tuple[str, str]] | None = None,
             line: str | None = None) -> bytes:
    fields = headers if headers is not None else [
        ("Host", "127.0.0.1:8000"), ("Upgrade", "websocket"), ("Connection", "Upgrade"),
        ("Sec-WebSocket-Key", KEY), ("Sec-WebSocket-Version", "13"), ("Sec-WebSocket-Protocol", "giftstream.msgpack")]
    head = line if line is not None else f"GET {target} HTTP/1.1"
    return (head + "\r\n" + "".join(f"{k}: {v}\r\n" for k, v in fields) + "\r\n").encode()


def _websockets_answer(raw: bytes) -> tuple[int, str | None]:
    """What websockets' own server protocol answers this request with (status, accept key)."""
    proto = ServerProtocol()
    proto.receive_data(raw)
    events = proto.events_received()
    if not events or not isinstance(events[0], Request):
        return 400, None
    response = proto.accept(events[0])
    return response.status_code, response.headers.get("Sec-WebSocket-Accept")


def test_a_plain_request_is_read_whole() -> None:
    raw = _request("/v1/rooms/r1/ws?x=1&token=first&token=a%2Bb")
    up = parse(raw)
    assert up is not None
    assert up.room_id == "r1" and up.token == "a+b"  # the last one, unescaped, as Starlette reads it
    assert up.offered == ("giftstream.msgpack",)
    assert up.accept == "s3pPLMBiTxaQ9kYGzzhZRbK+xOo="  # RFC 6455's own example
    assert _websockets_answer(raw) == (101, up.accept)
    answer = switching(up, "giftstream.msgpack")
    assert answer.startswith(b"HTTP/1.1 101 Switching Protocols\r\n") and answer.endswith(b"\r\n\r\n")
    assert b"Sec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\n" in answer
    assert b"Sec-WebSocket-Protocol: giftstream.msgpack\r\n" in answer
    assert b"Sec-WebSocket-Protocol" not in switching(up, None)


def test_every_offered_subprotocol_and_no_token() -> None:
    headers = [("Upgrade", "WebSocket"), ("Connection", "keep-alive, Upgrade"), ("Sec-WebSocket-Key", KEY),
               ("Sec-WebSocket-Version", "13"), ("Sec-WebSocket-Protocol", "a, giftstream.json"),
               ("sec-websocket-protocol", "b"), ("Origin", "http://example.test"),
               ("Sec-WebSocket-Extensions", "permessage-deflate; client_max_window_bits")]
    up = parse(_request("/v1/rooms/r-2/ws", headers))
    assert up is not None and up.token is None and up.offered == ("a", "giftstream.json", "b")


def test_anything_less_plain_goes_the_long_way() -> None:
    plain = [("Upgrade", "websocket"), ("Connection", "Upgrade"), ("Sec-WebSocket-Key", KEY),
             ("Sec-WebSocket-Version", "13")]
    assert parse(_request(headers=plain)) is not None
    for raw in (
        _request(line="POST /v1/rooms/r1/ws HTTP/1.1", headers=plain),
        _request(line="GET /v1/rooms/r1/ws HTTP/1.0", headers=plain),
        _request(line="GET  /v1/rooms/r1/ws HTTP/1.1", headers=plain),
        _request("/v1/rooms/r%31/ws", plain), _request("/v1/rooms/r1/ws/", plain), _request("/v1/rooms//ws", plain),
        _request("/v1/rooms/a/b/ws", plain), _request("/v1/rooms/r1/wss", plain),
        _request(headers=[*plain, ("Upgrade", "websocket")]),
        _request(headers=[*plain, ("Sec-WebSocket-Key", KEY)]),
        _request(headers=[h for h in plain if h[0] != "Sec-WebSocket-Key"]),
        _request(headers=[*plain[:2], ("Sec-WebSocket-Key", "c2hvcnQ="), plain[3]]),
        _request(headers=[*plain[:2], ("Sec-WebSocket-Key", "!" * 24), plain[3]]),
        _request(headers=[*plain[:3], ("Sec-WebSocket-Version", "8")]),
        _request(headers=[plain[0], ("Connection", "keep-alive"), *plain[2:]]),
        _request(headers=[plain[0], ("Connection", "Upgrade,,x y"), *plain[2:]]),
        _request(headers=[("Upgrade", "websocket, h2c"), *plain[1:]]),
        _request(headers=[*plain, ("Content-Length", "0")]),
        _request(headers=[*plain, ("Transfer-Encoding", "chunked")]),
        _request(headers=[*plain, (" X-Folded", "yes")]),
        _request(headers=[*plain, ("X Bad", "yes")]),
        _request(headers=[*plain, ("X-Name", "Zoë")]),
        _request(headers=plain).replace(b"Upgrade: websocket", b"Upgrade websocket"),
        _request(headers=plain)[:-2],
    ):
        assert parse(raw) is None, raw


def test_whatever_it_reads_websockets_accepts_with_the_same_key() -> None:
    rng = random.Random(11)
    required = [("Upgrade", "websocket"), ("Connection", "Upgrade"), ("Sec-WebSocket-Key", KEY),
                ("Sec-WebSocket-Version", "13")]
    names = ["Host", "Origin", "User-Agent", "Cookie", "Sec-WebSocket-Protocol", "Upgrade", "Connection"]
    values = ["websocket", "Upgrade", "upgrade, keep-alive", KEY, "13", "12", "giftstream.msgpack", "", "x" * 40,
              "AQIDBAUGBwgJCgsMDQ4PEA==", "websocket2", "Keep-Alive", "a, b", "a b", "a=b"]
    read = 0
    for _ in range(3000):
        headers: list[tuple[str, str]] = []
        for name, value in required:
            roll = rng.random()
            if roll < 0.05:
                continue  # left out
            if roll < 0.1:
                value = rng.choice(values)
            headers.append((name if rng.random() < 0.8 else name.lower(), value))
            if rng.random() < 0.03:
                headers.append((name, rng.choice(values)))  # twice
        for _ in range(rng.randint(0, 3)):
            headers.insert(rng.randint(0, len(headers)), (rng.choice(names), rng.choice(values)))
        raw = _request(rng.choice(["/v1/rooms/r1/ws", "/v1/rooms/r1/ws?token=t"]), headers)
        up = parse(raw)
        if up is not None:
            read += 1
            assert _websockets_answer(raw) == (101, up.accept), raw
    assert read > 500  # the generator made plain requests too


def test_the_head_ends_after_its_blank_line() -> None:
    raw = _request()
    assert head_end(raw + b"\x81\x85frame") == len(raw)
    assert head_end(raw[:-2]) == -1
