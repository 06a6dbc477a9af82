"""The decoder (server/protocol.py) fed what an attacker or a broken client sends: random bytes,
truncated msgpack, deep nesting, huge integers, wrong types. Every frame decodes to a message or
raises ProtocolError (the one failure the socket answers with a reply or a close), and the error
never carries the decoder's own exception text back to the peer."""

from __future__ import annotations

import json
from typing import Any

import msgpack
import pytest
from hypothesis import given
from hypothesis import strategies as st

from server import protocol
from server.protocol import JSON, MSGPACK, Gift, Ping, ProtocolError, Resume
from tests.support import fuzz_settings

VALID = [
    {"type": "gift", "id": "g-1", "gift": "rose", "count": 3},
    {"type": "resume", "since": "1700000000000-2", "epoch": "e1"},
    {"type": "ping", "id": "p-1"},
]
# What a peer may read in an error reply: our own sentences, never the decoder's.
LEAKS = ("Traceback", "Error", "Exception", "unpack", "Expecting", "line ", "column", "char ", "extra data",
         "object", "recursion", "stack", "int(", "codec", "decode")


def _decode(data: bytes | str, sub: str) -> protocol.ClientMessage | ProtocolError:
    try:
        return protocol.decode(data, sub)
    except ProtocolError as exc:
        for leak in LEAKS:
            assert leak.lower() not in exc.message.lower(), (exc.message, data[:80])
        assert len(exc.message) < 200, exc.message
        return exc


@fuzz_settings(300)
@given(st.binary(max_size=2000), st.sampled_from([MSGPACK, JSON]))
def test_random_bytes(data: bytes, sub: str) -> None:
    _decode(data, sub)


@fuzz_settings(200)
@given(st.text(max_size=500), st.sampled_from([MSGPACK, JSON]))
def test_random_text_frames(data: str, sub: str) -> None:
    result = _decode(data, sub)
    if sub == MSGPACK:
        assert isinstance(result, ProtocolError)


@fuzz_settings(200)
@given(st.sampled_from(VALID), st.data())
def test_truncated_msgpack_and_json(message: dict[str, Any], data: st.DataObject) -> None:
    for sub, raw in ((MSGPACK, msgpack.packb(message)), (JSON, json.dumps(message).encode())):
        cut = data.draw(st.integers(0, len(raw) - 1))
        assert isinstance(_decode(raw[:cut], sub), ProtocolError)


@fuzz_settings(100)
@given(st.sampled_from(VALID), st.binary(min_size=1, max_size=64))
def test_valid_message_with_trailing_garbage(message: dict[str, Any], tail: bytes) -> None:
    result = _decode(msgpack.packb(message) + tail, MSGPACK)
    assert isinstance(result, ProtocolError | Gift | Resume | Ping)


@pytest.mark.parametrize("depth", [100, 1_000, 100_000])
@pytest.mark.parametrize("sub", [MSGPACK, JSON])
def test_deep_nesting(depth: int, sub: str) -> None:
    """Arrays in arrays, and maps in maps under `type`: no RecursionError, no stack overflow."""
    if sub == MSGPACK:
        arrays = b"\x91" * depth + b"\xc0"
        maps = (b"\x81\xa4type" * depth) + b"\xa4gift"
    else:
        arrays = ("[" * depth + "]" * depth).encode()
        maps = ('{"type":' * depth + '"gift"' + "}" * depth).encode()
    assert isinstance(_decode(arrays, sub), ProtocolError)
    assert isinstance(_decode(maps, sub), ProtocolError)


HUGE = [2**63, 2**64, 2**64 + 1, -(2**63) - 1, 10**30, 10**4000]


@pytest.mark.parametrize("n", HUGE)
def test_huge_integers(n: int) -> None:
    """A count or an offset past 64 bits: refused with the message's id where it has one."""
    as_json = json.dumps({"type": "gift", "id": "h", "gift": "rose", "count": n})
    result = _decode(as_json, JSON)
    # JSON carries any integer: the decoder takes it, the gift's count bounds refuse it later.
    assert isinstance(result, Gift | ProtocolError)
    since = _decode(json.dumps({"type": "resume", "since": n}), JSON)
    assert isinstance(since, ProtocolError) or (isinstance(since, Resume) and since.since == str(n))
    as_offset = _decode(json.dumps({"type": "resume", "since": f"{n}-0"}), JSON)
    assert isinstance(as_offset, Resume) == (0 <= n < 2**64), as_offset  # each part is a 64-bit unsigned
    if -(2**63) <= n < 2**64:
        return
    # msgpack cannot carry it as an integer; a peer sends the raw 0xcf/0xd3 forms at most.
    for raw in (b"\x84\xa4type\xa4gift\xa2id\xa1h\xa4gift\xa4rose\xa5count\xcf" + b"\xff" * 8,
                b"\x84\xa4type\xa4gift\xa2id\xa1h\xa4gift\xa4rose\xa5count\xd3" + b"\x80" + b"\x00" * 7):
        assert isinstance(_decode(raw, MSGPACK), Gift)


WRONG = st.one_of(st.none(), st.booleans(), st.integers(-(2**70), 2**70), st.floats(), st.binary(max_size=20),
                  st.text(max_size=300), st.lists(st.integers(), max_size=3),
                  st.dictionaries(st.text(max_size=5), st.integers(), max_size=3))


@fuzz_settings(300)
@given(st.sampled_from(VALID), st.data())
def test_wrong_types_in_every_field(message: dict[str, Any], data: st.DataObject) -> None:
    field = data.draw(st.sampled_from(sorted(message)))
    value = data.draw(WRONG)
    bad = {**message, field: value}
    for sub in (MSGPACK, JSON):
        try:
            raw: bytes | str = msgpack.packb(bad) if sub == MSGPACK else json.dumps(bad)
        except (TypeError, ValueError, OverflowError):
            continue  # not expressible in this encoding
        result = _decode(raw, sub)
        if isinstance(result, Gift):
            # Accepted only with the documented types.
            assert isinstance(result.id, str) and isinstance(result.gift, str) and result.id.isprintable()
            assert isinstance(result.count, int) and not isinstance(result.count, bool)
        elif isinstance(result, Resume):
            assert protocol.parse_offset(result.since) >= (0, 0)
            assert result.epoch is None or isinstance(result.epoch, str)


@fuzz_settings(200)
@given(st.recursive(st.none() | st.booleans() | st.integers(-(2**63), 2**64 - 1) | st.floats() | st.text(max_size=10)
                    | st.binary(max_size=10),
                    lambda c: st.lists(c, max_size=4) | st.dictionaries(st.text(max_size=6) | st.integers(), c,
                                                                        max_size=4),
                    max_leaves=20))
def test_any_msgpack_structure(obj: Any) -> None:
    try:
        raw = msgpack.packb(obj)
    except (TypeError, ValueError, OverflowError):
        return
    _decode(raw, MSGPACK)
