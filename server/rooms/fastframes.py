"""A fast path for what a room socket mostly receives: small, whole, masked data frames.

A gift is one client frame of well under 126 bytes. The websockets sans-I/O parser
(a generator per frame, a frame object, a check, an event list) cost about a tenth of
the gateway's CPU in a gift storm. `split_small_frames` takes the leading run of such
frames from a chunk of bytes and leaves everything else (control frames, fragments,
longer frames, a frame cut in two) to the full parser, which keeps the close handshake,
pings and every protocol error as they were.

Pure: bytes in, messages out, no socket.
"""

from __future__ import annotations

try:
    from websockets.speedups import apply_mask  # C, as the full parser uses
except ImportError:  # pragma: no cover - a websockets build without its C speedups
    from websockets.utils import apply_mask

# FIN set, RSV clear, opcode text (1) or binary (2).
_TEXT, _BINARY = 0x81, 0x82


def split_small_frames(data: bytes) -> tuple[list[tuple[bytes, bool]], int]:
    """The leading whole, masked, unfragmented data frames of under 126 payload bytes, as
    (payload, is_text), and how many bytes of `data` they took."""
    messages: list[tuple[bytes, bool]] = []
    pos = 0
    end = len(data)
    while pos + 6 <= end:
        head = data[pos]
        if head != _TEXT and head != _BINARY:
            break
        length = data[pos + 1] ^ 0x80  # the mask bit must be set: then this is the length
        if length >= 126:  # unmasked (protocol error) or an extended length: not ours
            break
        stop = pos + 6 + length
        if stop > end:
            break  # cut in two: the full parser waits for the rest
        messages.append((apply_mask(data[pos + 6 : stop], data[pos + 2 : pos + 6]), head == _TEXT))
        pos = stop
    return messages, pos


def wire_size(payload_length: int) -> int:
    """Bytes of a masked client frame with this payload, length encoded minimally."""
    if payload_length < 126:
        return 6 + payload_length
    if payload_length < 1 << 16:
        return 8 + payload_length
    return 14 + payload_length
