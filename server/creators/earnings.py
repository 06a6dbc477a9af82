"""A host's earnings and received gifts: GET /v1/me/earnings, GET /v1/me/gifts.

Both read settled figures only (SQL): a gift shows here once the settler has written it, normally
within a second of its ack. Diamonds are exact units of 1/10,000 diamond (`units` in the answer).
The whole-diamond figures add up as the units do, lifetime = available + held + reserved + paid
out: lifetime and available are rounded down (available is what a withdrawal may take, so a
negative one rounds away from 0), reserved and paid out are whole already (withdrawals are), and
held is what is left of lifetime, so its fraction and available's never lose a diamond between
them.
"""

from __future__ import annotations

import datetime as dt
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import BaseRoute, Route

from server import paging
from server.creators.video_gifts import VIDEO_ID_PREFIX
from server.http_api import node_of, principal_of
from server.store.earnings import HostEarnings, ReceivedGift
from server.store.models import UNITS_PER_DIAMOND, now_ms
from server.store.rows import DAY_MS

DEFAULT_DAYS = 30
# A year and a day: a leap year's every day, and the same day a year ago.
MAX_DAYS = 366
_EPOCH = dt.date(1970, 1, 1)


def _whole(units: int) -> int:
    return units // UNITS_PER_DIAMOND


def whole_diamonds(e: HostEarnings) -> dict[str, int]:
    """The four-way split in whole diamonds, adding up to lifetime as the units do (see above):
    rounding each figure down alone would lose a diamond whenever held and available both end
    in half a diamond."""
    lifetime, available = _whole(e.lifetime_units), _whole(e.available_units)
    reserved, paid = _whole(e.reserved_units), _whole(e.paid_units)
    return {"diamonds": available, "held": lifetime - available - reserved - paid, "reserved": reserved,
            "paid_out": paid, "lifetime": lifetime}


def day_text(day: int) -> str:
    """YYYY-MM-DD of a UTC day counted from 1970-01-01."""
    return (_EPOCH + dt.timedelta(days=day)).isoformat()


async def earnings(request: Request) -> Response:
    """GET /v1/me/earnings?days=: the caller's diamonds, split four ways, and per UTC day."""
    p = principal_of(request)
    p.require("host", "admin")
    days = paging.whole(request.query_params, "days", DEFAULT_DAYS, MAX_DAYS)
    store = node_of(request).store
    e = await store.host_earnings(p.user_id)
    today = now_ms() // DAY_MS
    by_day = await store.host_days(p.user_id, today - days + 1)
    available = e.available_units
    return JSONResponse({
        "host_id": p.user_id, **whole_diamonds(e),
        "gifts_received": e.gifts_received,
        "diamond_units": available, "units_per_diamond": UNITS_PER_DIAMOND,
        "units": {"available": available, "held": e.held_units, "reserved": e.reserved_units,
                  "paid_out": e.paid_units, "lifetime": e.lifetime_units},
        "by_day": [{"day": day_text(day), "diamonds": _whole(units), "diamond_units": units, "gifts": gifts}
                   for day, units, gifts in by_day],
    })


def gift_json(g: ReceivedGift) -> dict[str, Any]:
    where = "video_id" if g.room_id.startswith(VIDEO_ID_PREFIX) else "room_id"
    return {"gift_id": g.id, where: g.room_id, "sender": {"id": g.sender_id, "name": g.sender_name},
            "gift": g.gift, "count": g.count, "coins": g.coins, "diamonds": _whole(g.diamond_units),
            "diamond_units": g.diamond_units, "sent_ms": g.sent_ms}


async def gifts(request: Request) -> Response:
    """GET /v1/me/gifts?cursor=&limit=: the caller's received gifts, newest first.

    The cursor is the last listed gift's (sent_ms, id): a page holds the gifts strictly older, so
    gifts settling meanwhile (newer ones) never shift the pages after the first."""
    p = principal_of(request)
    p.require("host", "admin")
    limit, before = paging.limit(request.query_params), paging.cursor(request.query_params)
    found = await node_of(request).store.received_gifts(p.user_id, before, limit + 1)
    page, after = paging.page(found, limit, lambda g: (g.sent_ms, g.id))
    return JSONResponse({"gifts": [gift_json(g) for g in page], "next_cursor": after})


ROUTES: list[BaseRoute] = [
    Route("/v1/me/earnings", earnings),
    Route("/v1/me/gifts", gifts),
]
