"""Pages of a list route: `?limit=`, `?cursor=` and the `next_cursor` a page hands out.

Every list the API serves newest first (received gifts, a video's gifts, withdrawals, rooms,
orders) pages the same way, so a client writes its paging once: `limit` a whole number from 1 to
the route's most, `next_cursor` null on the last page and otherwise passed back as `cursor`, and
the same 400 `bad_request` for a bad one of either.

A cursor is the last listed row's sort key, (milliseconds, id), as URL-safe base64 without
padding: a page starts strictly after that row, so rows added meanwhile (newer ones) never shift
the pages after the first. It is opaque to clients; decoding checks only what the store needs
(digits a BIGINT holds, an id PostgreSQL text can hold).
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Callable, Mapping, Sequence
from typing import TypeVar

from server.codes import Err, GiftstreamError

T = TypeVar("T")

DEFAULT_LIMIT = 20
MAX_LIMIT = 100
BAD_CURSOR = "cursor must be a next_cursor this endpoint returned"
# "<ms>:<id>" of any row of ours fits: 18 digits (a BIGINT) and an id of up to 128 characters.
MAX_CURSOR = 200


def whole(params: Mapping[str, str], name: str, default: int, most: int) -> int:
    """The query parameter `name`, a whole number from 1 to `most` (`default` when absent), or 400."""
    raw = params.get(name) or str(default)
    if not (raw.isascii() and raw.isdigit()) or not 1 <= int(raw) <= most:
        raise GiftstreamError(Err.BAD_REQUEST, f"{name} must be a whole number from 1 to {most}")
    return int(raw)


def limit(params: Mapping[str, str], most: int = MAX_LIMIT) -> int:
    return whole(params, "limit", DEFAULT_LIMIT, most)


def cursor(params: Mapping[str, str]) -> tuple[int, str] | None:
    """The (ms, id) of the `cursor` parameter, None when absent, 400 when it is none of ours."""
    text = params.get("cursor")
    if not text:
        return None
    try:
        ms, sep, key = base64.urlsafe_b64decode(text + "=" * (-len(text) % 4)).decode().partition(":")
    except (binascii.Error, UnicodeDecodeError, ValueError):
        ms, sep, key = "", "", ""
    if (len(text) > MAX_CURSOR or not sep or not (ms.isascii() and ms.isdigit()) or len(ms) > 18 or not key
            or not key.isprintable()):
        raise GiftstreamError(Err.BAD_REQUEST, BAD_CURSOR)
    return int(ms), key


def encode(ms: int, key: str) -> str:
    return base64.urlsafe_b64encode(f"{ms}:{key}".encode()).decode().rstrip("=")


def page(rows: Sequence[T], size: int, key: Callable[[T], tuple[int, str]]) -> tuple[list[T], str | None]:
    """The first `size` of `rows` (read as `size` + 1, so whether more follow costs no query) and
    the cursor of the page after them, None when none follows."""
    shown = list(rows[:size])
    return shown, (encode(*key(shown[-1])) if len(rows) > size and shown else None)
