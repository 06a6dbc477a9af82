"""The room socket's fast frame path, fed bytes alone: it must read exactly what the full
websockets parser reads, whatever the mix of frames and however the bytes are cut."""

from __future__ import annotations

import random

from websockets.frames import Close as CloseFrame
from websockets.frames import Frame, Opcode
from websockets.protocol import State

from server.rooms.fastframes import split_small_frames, wire_size
from server.rooms.takeover import RoomProtocol
from tests.fakes import FakeTransport, room_socket


def _wire(opcode: Opcode, data: bytes, fin: bool = True) -> bytes:
    return Frame(opcode, data, fin).serialize(mask=True)


def test_takes_the_leading_small_data_frames_and_stops_at_anything_else() -> None:
    small = _wire(Opcode.TEXT, b'{"type":"gift"}') + _wire(Opcode.BINARY, b"\x81\xa1a\x01")
    messages, used = split_small_frames(small)
    assert messages == [(b'{"type":"gift"}', True), (b"\x81\xa1a\x01", False)] and used == len(small)
    for rest in (_wire(Opcode.PING, b"p"), _wire(Opcode.TEXT, b"x" * 126), _wire(Opcode.TEXT, b"part", fin=False),
                 Frame(Opcode.TEXT, b"unmasked").serialize(mask=False), _wire(Opcode.TEXT, b"cut")[:-1]):
        messages, used = split_small_frames(small + rest)
        assert len(messages) == 2 and used == len(small)


def test_wire_size_is_the_serialized_size() -> None:
    for n in (0, 1, 125, 126, 65535, 65536):
        assert wire_size(n) == len(_wire(Opcode.BINARY, b"\0" * n))


def _room(got: list[bytes | str]) -> tuple[RoomProtocol, FakeTransport]:
    return room_socket(got.append)


def test_any_mix_of_frames_cut_anywhere_reads_as_the_full_parser_would() -> None:
    rng = random.Random(7)
    for _ in range(200):
        wire = bytearray()
        want: list[bytes | str] = []
        pings = 0
        for _ in range(rng.randint(1, 30)):
            kind = rng.random()
            size = rng.choice([0, 5, 60, 125, 126, 300, 2000])
            payload = bytes(rng.getrandbits(8) for _ in range(size))
            if kind < 0.5:
                text = payload.hex()[:size]
                wire += _wire(Opcode.TEXT, text.encode())
                want.append(text)
            elif kind < 0.75:
                wire += _wire(Opcode.BINARY, payload)
                want.append(payload)
            elif kind < 0.9:  # a message in three fragments
                wire += _wire(Opcode.BINARY, payload[:2], fin=False) + _wire(Opcode.CONT, payload[2:4], fin=False)
                wire += _wire(Opcode.CONT, payload[4:])
                want.append(payload)
            else:
                wire += _wire(Opcode.PING, b"hi")
                pings += 1
        got: list[bytes | str] = []
        room, transport = _room(got)
        pos = 0
        while pos < len(wire):
            step = rng.choice([1, 2, 3, 7, 64, 500, len(wire)])
            room.data_received(bytes(wire[pos : pos + step]))
            pos += step
        assert got == want
        # every ping answered by the full parser, in the order received
        assert transport.data.count(b"\x8a\x02hi") == pings
        assert room.ws.state is State.OPEN


def test_a_close_frame_goes_to_the_full_parser_and_nothing_after_it_is_read() -> None:
    got: list[bytes | str] = []
    room, transport = _room(got)
    close = _wire(Opcode.CLOSE, CloseFrame(1000, "bye").serialize())
    room.data_received(_wire(Opcode.TEXT, b"a") + close + _wire(Opcode.TEXT, b"b"))
    room.data_received(_wire(Opcode.TEXT, b"c"))
    assert got == ["a"]
    assert room.ws.state is not State.OPEN and transport.data.startswith(b"\x88")


def test_a_protocol_error_closes_with_1002_and_reads_nothing_more() -> None:
    got: list[bytes | str] = []
    room, transport = _room(got)
    unmasked = Frame(Opcode.TEXT, b"x").serialize(mask=False)
    room.data_received(_wire(Opcode.TEXT, b"a") + unmasked + _wire(Opcode.TEXT, b"b"))
    room.data_received(_wire(Opcode.TEXT, b"c"))
    assert got == ["a"]
    assert transport.data[0] == 0x88 and transport.data[2:4] == b"\x03\xea"  # close frame, code 1002


def test_small_frames_skip_the_full_parser_once_it_is_known_to_sit_between_frames() -> None:
    got: list[bytes | str] = []
    room, _ = _room(got)
    room.data_received(_wire(Opcode.TEXT, b"first"))  # the full parser reads it, ending between frames
    parsed: list[bytes] = []
    full = room.ws.receive_data

    def counted(data: bytes) -> None:
        parsed.append(data)
        full(data)

    room.ws.receive_data = counted
    room.data_received(_wire(Opcode.TEXT, b"a") + _wire(Opcode.BINARY, b"b"))
    assert got == ["first", "a", b"b"] and parsed == []
    room.data_received(_wire(Opcode.TEXT, b"c") + _wire(Opcode.PING, b""))
    # only the ping (6 bytes: header and mask) went to the full parser
    assert got[-1] == "c" and [len(p) for p in parsed] == [6]
