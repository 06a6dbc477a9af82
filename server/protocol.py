"""Wire protocol, pure: bytes <-> typed messages, for both subprotocols.

No I/O and nothing of ours beyond `codes`, so tests feed it bytes alone.
Both subprotocols carry the same maps; only the encoding differs.
"""

from __future__ import annotations

import functools
import json
import unicodedata
from dataclasses import dataclass
from typing import Any, Final

import msgpack

from server.codes import Err, GiftstreamError

MSGPACK: Final = "giftstream.msgpack"
JSON: Final = "giftstream.json"
SUBPROTOCOLS: Final = (MSGPACK, JSON)

MAX_ID_LEN: Final = 128
MAX_NAME_LEN: Final = 64
MAX_OFFSET_LEN: Final = 64


@dataclass(frozen=True, slots=True)
class Gift:
    id: str
    gift: str
    count: int


@dataclass(frozen=True, slots=True)
class Resume:
    since: str
    epoch: str | None
    # Echoed in an error reply about this resume, when the client gave a string one.
    id: str | None = None


@dataclass(frozen=True, slots=True)
class Ping:
    id: str | None


ClientMessage = Gift | Resume | Ping


class ProtocolError(GiftstreamError):
    """A frame that cannot be understood; answered with `bad_request`."""

    def __init__(self, message: str, msg_id: str | None = None) -> None:
        super().__init__(Err.BAD_REQUEST, message)
        self.msg_id = msg_id


def choose_subprotocol(offered: list[str]) -> str:
    """First supported subprotocol the client offered; msgpack when it offered none we know."""
    for name in offered:
        if name in SUBPROTOCOLS:
            return name
    return MSGPACK


def _decode_raw(data: bytes | str, subprotocol: str) -> Any:
    try:
        if subprotocol == JSON:
            return json.loads(data)
        if isinstance(data, str):
            raise ProtocolError("text frame on the msgpack subprotocol")
        return msgpack.unpackb(data, raw=False, strict_map_key=True, max_bin_len=0, max_ext_len=0)
    except ProtocolError:
        raise
    except Exception as exc:  # any decoder failure is the client's malformed frame
        raise ProtocolError(f"frame is not valid {subprotocol.split('.')[1]}") from exc


def _str(obj: dict[str, Any], name: str, limit: int, msg_id: str | None, required: bool = True) -> str | None:
    value = obj.get(name)
    if value is None and not required:
        return None
    if not isinstance(value, str) or not value or len(value) > limit or not value.isprintable():
        raise ProtocolError(f"'{name}' must be a non-empty string of at most {limit} printable characters", msg_id)
    return value


# Format characters (category Cf) a name or title still needs: the zero-width joiner and
# non-joiner (emoji sequences, Persian and Indic scripts) and the tag characters of emoji flag
# sequences. Every other one goes: bidi embeddings, overrides, isolates and marks reorder the
# text shown around them (U+202E turns "gift" into "tfig"), others make a name invisible.
_FORMAT_KEPT = frozenset([0x200C, 0x200D, *range(0xE0020, 0xE0080)])


@functools.cache
def _stripped() -> dict[int, None]:
    """C0 controls, DEL, C1 controls and the format characters not kept. Built on first use:
    the scan of every code point takes about 0.2 s, too much for every CLI start."""
    return dict.fromkeys([
        *range(0x20), *range(0x7F, 0xA0),
        *(c for c in range(0x110000) if unicodedata.category(chr(c)) == "Cf" and c not in _FORMAT_KEPT),
    ])


def plain(text: str) -> str:
    """`text` without control characters or format characters that reorder or hide text. Display
    names and titles are stored in SQL (PostgreSQL text cannot hold NUL) and shown on every
    viewer's screen. (A printable string holds neither: that common case costs one scan.)"""
    return text if text.isprintable() else text.translate(_stripped())


def decode(data: bytes | str, subprotocol: str) -> ClientMessage:
    obj = _decode_raw(data, subprotocol)
    if not isinstance(obj, dict):
        raise ProtocolError("a message is a map with a 'type'")
    raw_id = obj.get("id")
    msg_id = raw_id if isinstance(raw_id, str) and 0 < len(raw_id) <= MAX_ID_LEN and raw_id.isprintable() else None
    kind = obj.get("type")
    if kind == "gift":
        return gift_of(obj)
    if kind == "resume":
        since = obj.get("since")
        if isinstance(since, int) and not isinstance(since, bool):
            since = str(since)
        if not isinstance(since, str) or not _valid_offset(since):
            raise ProtocolError("'since' must be an offset from an earlier event or welcome", msg_id)
        epoch = _str(obj, "epoch", MAX_OFFSET_LEN, msg_id, required=False)
        return Resume(since, epoch, msg_id)
    if kind == "ping":
        return Ping(msg_id)
    if kind is None:
        raise ProtocolError("missing 'type'", msg_id)
    # Only a string is shown back: the repr of a map nested 1,000 deep under `type` raised
    # RecursionError here (tests/test_fuzz_decoder.py), and of a huge one cost its whole size.
    shown = repr(kind[:40]) if isinstance(kind, str) else f"of kind {type(kind).__name__}"
    raise ProtocolError(f"unknown message type {shown}", msg_id)


def gift_of(obj: dict[str, Any]) -> Gift:
    """A gift's fields, from a socket frame or a video gift's HTTP body (the same rules)."""
    gid = _str(obj, "id", MAX_ID_LEN, None)
    assert gid is not None
    gift = _str(obj, "gift", MAX_NAME_LEN, gid)
    assert gift is not None
    count = obj.get("count", 1)
    if not isinstance(count, int) or isinstance(count, bool):
        raise ProtocolError("'count' must be an integer", gid)
    return Gift(gid, gift, count)


def encode(message: dict[str, Any], subprotocol: str) -> bytes | str:
    if subprotocol == JSON:
        return json.dumps(message, separators=(",", ":"), ensure_ascii=False)
    return msgpack.packb(message, use_bin_type=True)  # type: ignore[no-any-return]


def error(code: Err, message: str, msg_id: str | None = None, **extra: Any) -> dict[str, Any]:
    out: dict[str, Any] = {"type": "error", "id": msg_id, "code": code.value, "message": message}
    out.update(extra)
    return out


_U64 = 1 << 64


def _valid_offset(offset: str) -> bool:
    """'<ms>-<seq>' (or bare '<ms>'), each part a decimal 64-bit unsigned integer."""
    if not 0 < len(offset) <= MAX_OFFSET_LEN:
        return False
    ms, dash, seq = offset.partition("-")
    parts = [ms, seq] if dash else [ms]
    return all(p.isascii() and p.isdigit() and int(p) < _U64 for p in parts)


def parse_offset(offset: str) -> tuple[int, int]:
    """Stream offsets are '<ms>-<seq>'; ordering compares them as pairs."""
    ms, _, seq = offset.partition("-")
    try:
        return int(ms), int(seq or 0)
    except ValueError:
        raise ProtocolError("malformed offset") from None
