"""The wire layer with bytes alone: no server, no sockets."""

from __future__ import annotations

import json

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from server import protocol
from server.protocol import JSON, MSGPACK, Gift, Ping, ProtocolError, Resume
from server.rooms.frames import OutFrame, ws_frame


@pytest.mark.parametrize("sub", [MSGPACK, JSON])
def test_same_maps_on_both_subprotocols(sub: str) -> None:
    def enc(m: dict) -> bytes | str:  # type: ignore[type-arg]
        return msgpack.packb(m) if sub == MSGPACK else json.dumps(m)

    assert protocol.decode(enc({"type": "gift", "id": "a1", "gift": "rose", "count": 5}), sub) == Gift("a1", "rose", 5)
    assert protocol.decode(enc({"type": "gift", "id": "a1", "gift": "rose"}), sub) == Gift("a1", "rose", 1)
    assert protocol.decode(enc({"type": "resume", "since": "17-3", "epoch": "e"}), sub) == Resume("17-3", "e")
    assert protocol.decode(enc({"type": "ping", "id": "p"}), sub) == Ping("p")


@pytest.mark.parametrize("frame,why", [
    (b"\xc1", "not msgpack"), (msgpack.packb([1]), "not a map"), (msgpack.packb({"type": "x"}), "unknown type"),
    (msgpack.packb({"id": "a"}), "no type"),
    (msgpack.packb({"type": "gift", "id": "a", "gift": "rose", "count": 1.5}), "float count"),
    (msgpack.packb({"type": "gift", "id": "", "gift": "rose"}), "empty id"),
    (msgpack.packb({"type": "gift", "id": "a\x00b", "gift": "rose"}), "NUL in id"),
    (msgpack.packb({"type": "gift", "id": "a\nb", "gift": "rose"}), "newline in id"),
    (msgpack.packb({"type": "gift", "id": "a", "gift": "ro\x7fse"}), "DEL in gift"),
    (msgpack.packb({"type": "gift", "id": "a", "gift": b"rose"}), "bytes gift"),
    (msgpack.packb({"type": "resume", "since": "abc"}), "bad offset"),
    (msgpack.packb({"type": "resume", "since": "99999999999999999999-0"}), "offset beyond 64 bits"),
    (msgpack.packb({"type": "resume", "since": "1-2-3"}), "three parts"),
    ("text", "text on msgpack"),
])
def test_malformed_frames_are_protocol_errors(frame: bytes | str, why: str) -> None:
    with pytest.raises(ProtocolError):
        protocol.decode(frame, MSGPACK)


def test_error_keeps_the_id_when_it_can() -> None:
    with pytest.raises(ProtocolError) as exc:
        protocol.decode(msgpack.packb({"type": "gift", "id": "keep-me", "gift": "rose", "count": "2"}), MSGPACK)
    assert exc.value.msg_id == "keep-me"


@settings(max_examples=400)
@given(st.binary(max_size=300))
def test_arbitrary_bytes_never_raise_anything_else(data: bytes) -> None:
    try:
        protocol.decode(data, MSGPACK)
    except ProtocolError:
        pass


@settings(max_examples=300)
@given(st.recursive(st.none() | st.booleans() | st.integers(-(2**63), 2**64 - 1) | st.text(max_size=20) | st.floats(),
                    lambda c: st.lists(c, max_size=4) | st.dictionaries(st.text(max_size=8), c, max_size=4),
                    max_leaves=12))
def test_arbitrary_structures_never_raise_anything_else(obj: object) -> None:
    for sub, data in ((MSGPACK, msgpack.packb(obj)), (JSON, json.dumps(obj))):
        try:
            protocol.decode(data, sub)
        except ProtocolError:
            pass


@pytest.mark.parametrize("n", [0, 125, 126, 65535, 65536, 70000])
def test_ws_frame_lengths(n: int) -> None:
    frame = ws_frame(b"x" * n, 0x2)
    assert frame[0] == 0x82
    if n < 126:
        assert frame[1] == n and len(frame) == 2 + n
    elif n < 65536:
        assert frame[1] == 126 and int.from_bytes(frame[2:4], "big") == n
    else:
        assert frame[1] == 127 and int.from_bytes(frame[2:10], "big") == n


def test_out_frame_encodes_once_per_subprotocol() -> None:
    frame = OutFrame({"type": "events", "events": [{"type": "gift", "offset": "1-0"}]})
    a = frame.for_subprotocol(MSGPACK)
    assert frame.for_subprotocol(MSGPACK) is a
    payload, raw = frame.for_subprotocol(JSON)
    assert isinstance(payload, str) and raw[0] == 0x81 and raw.endswith(payload.encode())


def test_offsets_order_numerically() -> None:
    assert protocol.parse_offset("10-0") > protocol.parse_offset("9-99")
    assert protocol.parse_offset("5") == (5, 0)


def test_plain_drops_control_characters_and_format_characters_that_reorder_or_hide_text() -> None:
    assert protocol.plain("Zoë\x00 🌹\x07\x9b\u200b") == "Zoë 🌹"
    assert protocol.plain("plain") == "plain"
    # Bidi embeddings and overrides, isolates, marks: a name cannot reorder the text around it.
    for c in [*"\u202a\u202b\u202c\u202d\u202e", *"\u2066\u2067\u2068\u2069", "\u200e", "\u200f", "\u061c"]:
        assert protocol.plain(f"gift{c}tfig") == "gifttfig", hex(ord(c))
    # Other format characters with no use in a name: word joiner, BOM, invisible operators.
    assert protocol.plain("a\u2060b\ufeffc\u2062d\u00ade") == "abcde"
    # Those a name still needs stay: emoji joiners, ZWNJ in Persian, emoji tag sequences.
    family = "\U0001f468\u200d\U0001f469\u200d\U0001f467"
    assert protocol.plain(family) == family
    persian = "\u0645\u06cc\u200c\u062e\u0648\u0627\u0647\u0645"
    assert protocol.plain(persian) == persian
    england = "\U0001f3f4\U000e0067\U000e0062\U000e0065\U000e006e\U000e0067\U000e007f"
    assert protocol.plain(england) == england


def test_a_resume_carries_its_id_for_the_error_reply_about_it() -> None:
    assert protocol.decode('{"type":"resume","since":"5-1","id":"r1"}', JSON) == Resume("5-1", None, "r1")
    assert protocol.decode('{"type":"resume","since":"5-1","id":7}', JSON) == Resume("5-1", None, None)
