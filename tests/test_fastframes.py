"""The room socket's fast frame path, fed bytes alone: it must read exactly what the full
websockets parser reads, whatever the mix of frames and however the bytes are cut."""

from __future__ import annotations

import random

from websockets.frames import Close as CloseFrame
from websockets.frames import Frame, Opcode
from websockets.protocol import State

from server.rooms.fastframes import BINARY, PING, PONG, TEXT, split_small_frames, wire_size
from server.rooms.takeover import RoomProtocol
from tests.fakes import FakeTransport, room_socket


def _wire(opcode: Opcode, data: bytes, fin: bool = True) -> bytes:
    return Frame(opcode, data, fin).serialize(mask=True)


def test_takes_the_leading_small_data_and_ping_frames_and_stops_at_anything_else() -> None:
    small = (_wire(Opcode.TEXT, b'{"type":"gift"}') + _wire(Opcode.BINARY, b"\x81\xa1a\x01")
             + _wire(Opcode.PING, b"p") + _wire(Opcode.PONG, b""))
    messages, used = split_small_frames(small)
    assert messages == [(b'{"type":"gift"}', TEXT), (b"\x81\xa1a\x01", BINARY), (b"p", PING), (b"", PONG)]
    assert used == len(small)
    for rest in (_wire(Opcode.CLOSE, CloseFrame(1000, "").serialize()), _wire(Opcode.TEXT, b"x" * 126),
                 _wire(Opcode.TEXT, b"part", fin=False), b"\x09\x81\0\0\0\0p",  # a ping without FIN
                 Frame(Opcode.TEXT, b"unmasked").serialize(mask=False), _wire(Opcode.TEXT, b"cut")[:-1]):
        messages, used = split_small_frames(small + rest)
        assert len(messages) == 4 and used == len(small)


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
    room.data_received(_wire(Opcode.TEXT, b"c") + _wire(Opcode.PING, b"") + _wire(Opcode.BINARY, b"d" * 126))
    # only the long frame (8 bytes of header and mask, 126 of payload) went to the full parser
    assert got[-2:] == ["c", b"d" * 126] and [len(p) for p in parsed] == [134]


def test_a_socket_opened_by_the_door_reads_without_a_parser_until_one_is_needed() -> None:
    got: list[bytes | str] = []
    transport = FakeTransport()
    room = RoomProtocol(None, transport, got.append, lambda: None, joining=True)
    transport.set_protocol(room)
    room.data_received(_wire(Opcode.TEXT, b"early"))
    assert got == []  # held until the welcome is out
    room.go_live()
    room.data_received(_wire(Opcode.BINARY, b"b") + _wire(Opcode.PING, b"hi") + _wire(Opcode.PONG, b"gs"))
    room.ping()
    assert got == ["early", b"b"] and room.ws is None
    assert transport.data == b"\x8a\x02hi\x89\x02gs" and room.ping_sent_at > 0
    room.data_received(_wire(Opcode.PONG, b"gs"))
    assert room.ping_sent_at == 0.0 and room.ws is None
    room.data_received(_wire(Opcode.TEXT, b"part", fin=False) + _wire(Opcode.CONT, b"s"))
    assert got[-1] == "parts" and room.ws is not None and room.ws.state is State.OPEN


def test_a_close_from_a_socket_without_a_parser_is_answered() -> None:
    room = RoomProtocol(None, FakeTransport(), lambda data: None, lambda: None)
    transport = room.transport
    assert isinstance(transport, FakeTransport)
    transport.set_protocol(room)
    room.send_close(4410, "bye")
    assert transport.data.startswith(b"\x88") and room.ws is not None
    room.data_received(_wire(Opcode.CLOSE, CloseFrame(4410, "bye").serialize()))
    assert transport.closing
