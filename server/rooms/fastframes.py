"""A fast path for what a room socket mostly receives: small, whole, masked frames.

A gift is one client frame of well under 126 bytes. The websockets sans-I/O parser
(a generator per frame, a frame object, a check, an event list) cost about a tenth of
the gateway's CPU in a gift storm. `split_small_frames` takes the leading run of such
frames from a chunk of bytes: data frames, and pings and pongs (every idle viewer answers
the node's keepalive ping; a websockets client pings on its own), so most sockets never need
the full parser, nor its ~1.9 KB of state. Everything else (close frames, fragments, longer
frames, a frame cut in two) is left to the full parser, which keeps the close handshake and
every protocol error as they were.

Pure: bytes in, messages out, no socket.
"""

from __future__ import annotations

try:
    from websockets.speedups import apply_mask  # C, as the full parser uses
except ImportError:  # pragma: no cover - a websockets build without its C speedups
    from websockets.utils import apply_mask

# The first byte of a frame this path takes: FIN set, RSV clear, and its opcode.
TEXT, BINARY, PING, PONG = 0x81, 0x82, 0x89, 0x8A
_OURS = frozenset((TEXT, BINARY, PING, PONG))


def split_small_frames(data: bytes) -> tuple[list[tuple[bytes, int]], int]:
    """The leading whole, masked, unfragmented text, binary, ping and pong frames of under 126
    payload bytes, as (payload, first byte: TEXT, BINARY, PING or PONG), and how many bytes of
    `data` they took."""
    frames: list[tuple[bytes, int]] = []
    pos = 0
    end = len(data)
    while pos + 6 <= end:
        head = data[pos]
        if head not in _OURS:
            break
        length = data[pos + 1] ^ 0x80  # the mask bit must be set: then this is the length
        if length >= 126:  # unmasked (protocol error) or an extended length: not ours
            break
        stop = pos + 6 + length
        if stop > end:
            break  # cut in two: the full parser waits for the rest
        frames.append((apply_mask(data[pos + 6 : stop], data[pos + 2 : pos + 6]), head))
        pos = stop
    return frames, pos


def pong_frame(payload: bytes) -> bytes:
    """The server's (unmasked) pong answering a ping's payload (at most 125 bytes)."""
    return bytes((PONG, len(payload))) + payload


def ping_frame(payload: bytes) -> bytes:
    return bytes((PING, len(payload))) + payload


def wire_size(payload_length: int) -> int:
    """Bytes of a masked client frame with this payload, length encoded minimally."""
    if payload_length < 126:
        return 6 + payload_length
    if payload_length < 1 << 16:
        return 8 + payload_length
    return 14 + payload_length
