"""Wire helpers for the demo client: socket URL, both subprotocols, close codes, readable lines.

Kept free of I/O so the CLI reads as the protocol's story, not its plumbing.
"""

from __future__ import annotations

import json
from collections import deque
from typing import Any, Final
from urllib.parse import quote, urlsplit, urlunsplit

import msgpack

MSGPACK: Final = "giftstream.msgpack"
JSON: Final = "giftstream.json"

# Close codes after which reconnecting cannot help (see docs/protocol.md, "Close codes").
STOP_CODES: Final = {
    1000: "closed normally",
    1009: "frame too big",
    4400: "protocol violation",
    4401: "unauthorized (bad or expired token)",
    4403: "forbidden",
    4404: "room not found or not live",
    4410: "room ended",
}


def socket_url(base: str, room_id: str, token: str) -> str:
    """http(s)://host:port -> ws(s)://host:port/v1/rooms/<room>/ws?token=..."""
    parts = urlsplit(base)
    scheme = {"http": "ws", "https": "wss"}.get(parts.scheme, parts.scheme)
    path = parts.path.rstrip("/") + f"/v1/rooms/{quote(room_id, safe='')}/ws"
    return urlunsplit((scheme, parts.netloc, path, "token=" + quote(token, safe=""), ""))


def encode(message: dict[str, Any], subprotocol: str) -> bytes | str:
    if subprotocol == JSON:
        return json.dumps(message, separators=(",", ":"))
    return msgpack.packb(message, use_bin_type=True)  # type: ignore[no-any-return]


def decode(data: bytes | str) -> dict[str, Any]:
    """Text frames are JSON, binary frames msgpack: the server sends one kind per subprotocol."""
    if isinstance(data, str):
        message = json.loads(data)
    else:
        message = msgpack.unpackb(data, raw=False)
    if not isinstance(message, dict):
        raise ValueError("a message is a map")
    return message


def offset_key(offset: str) -> tuple[int, int]:
    """Offsets are '<ms>-<seq>' stream ids; compare them as pairs, never as strings."""
    ms, _, seq = str(offset).partition("-")
    return int(ms or 0), int(seq or 0)


class SeenOffsets:
    """Recently printed offsets: a resume may replay events that already arrived live."""

    def __init__(self, size: int = 4096) -> None:
        self._order: deque[str] = deque()
        self._set: set[str] = set()
        self._size = size

    def add(self, offset: str) -> bool:
        """True the first time an offset is seen."""
        if offset in self._set:
            return False
        self._set.add(offset)
        self._order.append(offset)
        if len(self._order) > self._size:
            self._set.discard(self._order.popleft())
        return True


def describe_welcome(msg: dict[str, Any]) -> str:
    you, host = msg.get("you") or {}, msg.get("host") or {}
    return (f"joined room {msg.get('room')} hosted by {host.get('name')} as {you.get('name')} "
            f"({you.get('role')}); {msg.get('viewers')} watching, offset {msg.get('offset')}")


def describe_event(event: dict[str, Any], gift_names: dict[str, str]) -> str:
    kind = event.get("type")
    if kind == "gift":
        sender = (event.get("from") or {}).get("name", "?")
        gift = gift_names.get(event.get("gift", ""), event.get("gift", "?"))
        return (f"{sender} sent {gift} x{event.get('count')} (combo {event.get('combo', 1)})"
                f"  [{event.get('coins')} coins]")
    if kind == "presence":
        return f"viewers: {event.get('viewers')}"
    if kind == "leaderboard":
        top = event.get("top") or []
        ranks = "  ".join(f"{i}. {t.get('name')} {t.get('coins')}" for i, t in enumerate(top[:3], 1))
        return f"top gifters: {ranks or '(none)'}"
    if kind == "room_ended":
        # Why, when it was not its host: an admin, or the host away too long (reason "idle").
        why = {"admin": " by an admin", "idle": ": its host was away too long"}
        return "room ended" + why.get(event.get("reason", ""), "")
    return f"event {kind}: {event}"


def describe_resume_failed(msg: dict[str, Any]) -> str:
    top = msg.get("top_gifters") or []
    leader = f", top gifter {top[0].get('name')} {top[0].get('coins')}" if top else ""
    return (f"resume failed ({msg.get('reason')}): some events were missed; now "
            f"{msg.get('viewers')} watching, {msg.get('coins_total')} coins total{leader}")
