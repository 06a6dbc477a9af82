"""A host's earnings and received gifts: GET /v1/me/earnings, GET /v1/me/gifts.

Both read settled figures only (SQL): a gift shows here once the settler has written it, normally
within a second of its ack. Diamonds are exact units of 1/10,000 diamond; each whole-diamond
figure is its units // 10,000 (rounded down, so a negative available figure rounds away from 0).
"""

from __future__ import annotations

import base64
import binascii
import datetime as dt
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import BaseRoute, Route

from server.codes import Err, GiftstreamError
from server.http_api import node_of, principal_of
from server.store.earnings import ReceivedGift
from server.store.models import UNITS_PER_DIAMOND, now_ms
from server.store.rows import DAY_MS

DEFAULT_DAYS = 30
# A year and a day: a leap year's every day, and the same day a year ago.
MAX_DAYS = 366
DEFAULT_LIMIT = 20
MAX_LIMIT = 100
# A video's id starts with this; a room's id never holds a hyphen.
VIDEO_PREFIX = "v-"
_EPOCH = dt.date(1970, 1, 1)


def _whole(units: int) -> int:
    return units // UNITS_PER_DIAMOND


def _bounded(request: Request, name: str, default: int, most: int) -> int:
    raw = request.query_params.get(name) or str(default)
    if not raw.isdigit() or not 1 <= int(raw) <= most:
        raise GiftstreamError(Err.BAD_REQUEST, f"{name} must be a whole number from 1 to {most}")
    return int(raw)


def day_text(day: int) -> str:
    """YYYY-MM-DD of a UTC day counted from 1970-01-01."""
    return (_EPOCH + dt.timedelta(days=day)).isoformat()


async def earnings(request: Request) -> Response:
    """GET /v1/me/earnings?days=: the caller's diamonds, split four ways, and per UTC day."""
    p = principal_of(request)
    p.require("host", "admin")
    days = _bounded(request, "days", DEFAULT_DAYS, MAX_DAYS)
    store = node_of(request).store
    e = await store.host_earnings(p.user_id)
    today = now_ms() // DAY_MS
    by_day = await store.host_days(p.user_id, today - days + 1)
    available = e.available_units
    return JSONResponse({
        "host_id": p.user_id,
        "diamonds": _whole(available), "held": _whole(e.held_units), "reserved": _whole(e.reserved_units),
        "paid_out": _whole(e.paid_units), "lifetime": _whole(e.lifetime_units),
        "gifts_received": e.gifts_received,
        "diamond_units": available, "units_per_diamond": UNITS_PER_DIAMOND,
        "units": {"available": available, "held": e.held_units, "reserved": e.reserved_units,
                  "paid_out": e.paid_units, "lifetime": e.lifetime_units},
        "by_day": [{"day": day_text(day), "diamonds": _whole(units), "diamond_units": units, "gifts": gifts}
                   for day, units, gifts in by_day],
    })


def _cursor_of(g: ReceivedGift) -> str:
    return base64.urlsafe_b64encode(f"{g.sent_ms}:{g.id}".encode()).decode().rstrip("=")


def _cursor(text: str) -> tuple[int, str]:
    """(sent_ms, gift id) of a next_cursor: the page after it starts strictly past that gift."""
    try:
        ms, sep, gift_id = base64.urlsafe_b64decode(text + "=" * (-len(text) % 4)).decode().partition(":")
    except (binascii.Error, UnicodeDecodeError, ValueError):
        ms, sep, gift_id = "", "", ""
    if len(text) > 200 or not sep or not ms.isdigit() or not gift_id:
        raise GiftstreamError(Err.BAD_REQUEST, "cursor must be a next_cursor this endpoint returned")
    return int(ms), gift_id


def gift_json(g: ReceivedGift) -> dict[str, Any]:
    where = "video_id" if g.room_id.startswith(VIDEO_PREFIX) else "room_id"
    return {"gift_id": g.id, where: g.room_id, "sender": {"id": g.sender_id, "name": g.sender_name},
            "gift": g.gift, "count": g.count, "coins": g.coins, "diamonds": _whole(g.diamond_units),
            "diamond_units": g.diamond_units, "sent_ms": g.sent_ms}


async def gifts(request: Request) -> Response:
    """GET /v1/me/gifts?cursor=&limit=: the caller's received gifts, newest first.

    The cursor is the last listed gift's (sent_ms, id): a page holds the gifts strictly older, so
    gifts settling meanwhile (newer ones) never shift the pages after the first."""
    p = principal_of(request)
    p.require("host", "admin")
    limit = _bounded(request, "limit", DEFAULT_LIMIT, MAX_LIMIT)
    raw = request.query_params.get("cursor")
    before = _cursor(raw) if raw else None
    found = await node_of(request).store.received_gifts(p.user_id, before, limit + 1)
    page = found[:limit]
    return JSONResponse({"gifts": [gift_json(g) for g in page],
                         "next_cursor": _cursor_of(page[-1]) if len(found) > limit else None})


ROUTES: list[BaseRoute] = [
    Route("/v1/me/earnings", earnings),
    Route("/v1/me/gifts", gifts),
]
