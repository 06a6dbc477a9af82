"""Room lifecycle: one live room per host, the LIVE-now list, idle rooms ending, session summaries.

The routes of a room's life: open (POST /v1/rooms), end (POST /v1/rooms/{id}/end), the list of
rooms live now or ended lately (GET /v1/rooms), and a session's summary (GET
/v1/rooms/{id}/summary). What they do is server/rooms/lifecycle.py; the summary's money comes
from the settled ledger (store/sessions.py), the live figures from Redis.
"""

from __future__ import annotations

from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import BaseRoute, Route

from server import paging
from server.codes import Err, GiftstreamError
from server.http_api import hosted_room, json_body, node_of, principal_of
from server.keys import RoomKeys
from server.protocol import plain
from server.rooms.goals import GOAL_REACHED
from server.rooms.lifecycle import BY_ADMIN, BY_HOST
from server.store.models import UNITS_PER_DIAMOND, now_ms
from server.store.sessions import RoomRecord

# Top gifters a summary lists.
SUMMARY_TOP = 10
MAX_TITLE = 200


async def create_room(request: Request) -> Response:
    """POST /v1/rooms {"title"}: open the host's LIVE (one at a time: 409 already_live names it)."""
    p = principal_of(request)
    p.require("host", "admin")
    body = await json_body(request)
    title = body.get("title", f"{p.name}'s LIVE")
    if not isinstance(title, str) or len(title) > MAX_TITLE:
        raise GiftstreamError(Err.BAD_REQUEST, f"title must be a string of at most {MAX_TITLE} characters")
    title = plain(title)
    state = await node_of(request).lifecycle.open(p.user_id, p.name, title)
    return JSONResponse({"room_id": state.room_id, "epoch": state.epoch, "title": title,
                         "ws": f"/v1/rooms/{state.room_id}/ws"}, status_code=201)


async def end_room(request: Request) -> Response:
    """POST /v1/rooms/{room_id}/end: the host or an admin ends the LIVE (again: offset null)."""
    node, p, state = await hosted_room(request, "end it")
    offset = await node.lifecycle.end(state.room_id, BY_HOST if p.user_id == state.host_id else BY_ADMIN)
    return JSONResponse({"room_id": state.room_id, "live": False, "offset": offset})


async def list_rooms(request: Request) -> Response:
    """GET /v1/rooms?live=1&cursor=&limit=: rooms live now, newest first (live=0: ended lately)."""
    live = request.query_params.get("live", "1")
    if live not in ("0", "1"):
        raise GiftstreamError(Err.BAD_REQUEST, "live must be 1 (live now) or 0 (ended lately)")
    limit, before = paging.limit(request.query_params), paging.cursor(request.query_params)
    node = node_of(request)
    found = await node.store.rooms_page(live == "1", before, limit + 1)
    if live == "1":
        records, after = paging.page(found, limit, lambda r: (r.created_ms, r.id))
        items = await _live_items(request, records)
    else:
        records, after = paging.page(found, limit, lambda r: (r.ended_ms or 0, r.id))
        items = [_ended_item(r) for r in records]
    return JSONResponse({"items": items, "next_cursor": after})


async def room_summary(request: Request) -> Response:
    """GET /v1/rooms/{room_id}/summary: the session's figures, its money from the settled ledger."""
    node = node_of(request)
    room_id = request.path_params["room_id"]
    record = await node.store.room_record(room_id) if _valid_room_id(room_id) else None
    if record is None:
        raise GiftstreamError(Err.NOT_FOUND, "no such room")
    # Ledger first, then Redis: gifts acknowledged after the ledger was read can only make
    # `settled` false, never true too early.
    ledger = await node.store.room_ledger(room_id, SUMMARY_TOP)
    h = await node.redis.hmget(RoomKeys(room_id).state, "live", "peak_viewers", GOAL_REACHED, "gifts_total",
                               "coins_total")
    live = record.ended_ms is None and h[0] == "1"
    if record.ended_ms is None or record.acked_gifts is None:
        # Live (or ended before summaries were kept): the room state's running figures.
        peak, goal, acked_gifts, acked_coins = _n(h[1]), h[2] == "1", _n(h[3]), _n(h[4])
    else:
        peak, goal = record.peak_viewers or 0, bool(record.goal_reached)
        acked_gifts, acked_coins = record.acked_gifts, record.acked_coins or 0
    ended = record.ended_ms
    return JSONResponse({
        "room_id": record.id, "title": record.title, "host": {"id": record.host_id, "name": record.host_name},
        "live": live, "started_ms": record.created_ms, "ended_ms": ended, "end_reason": record.end_reason,
        "duration_s": max(0, ((ended if ended is not None else now_ms()) - record.created_ms) // 1000),
        "gifts": ledger.gifts, "coins": ledger.coins, "diamonds": ledger.diamond_units // UNITS_PER_DIAMOND,
        "diamond_units": ledger.diamond_units, "unique_gifters": ledger.unique_gifters,
        "top_gifters": [{"user_id": u, "name": n, "coins": c} for u, n, c in ledger.top],
        "peak_viewers": peak, "goal_reached": goal,
        "acknowledged": {"gifts": acked_gifts, "coins": acked_coins},
        # Every gift the room acknowledged is in the ledger: these figures are final (for an
        # ended room; a live one's still grow).
        "settled": ledger.gifts >= acked_gifts,
    })


async def _live_items(request: Request, records: list[RoomRecord]) -> list[dict[str, Any]]:
    """The page's rooms with their viewers and coins, read from Redis in one pipeline; a room
    whose row is live but whose Redis state has ended (its end finishing) is left out."""
    if not records:
        return []
    pipe = node_of(request).redis.pipeline(transaction=False)
    for r in records:
        k = RoomKeys(r.id)
        pipe.hmget(k.state, "live", "coins_total")
        pipe.hgetall(k.presence)
    replies = await pipe.execute()
    now = now_ms()
    items = []
    for i, r in enumerate(records):
        (live, coins), presence = replies[2 * i], replies[2 * i + 1]
        if live != "1":
            continue
        items.append({"room_id": r.id, "title": r.title, "host": {"id": r.host_id, "name": r.host_name},
                      "viewers": _viewers(presence, now), "coins": _n(coins), "started_ms": r.created_ms})
    return items


def _ended_item(r: RoomRecord) -> dict[str, Any]:
    ended = r.ended_ms or r.created_ms
    return {"room_id": r.id, "title": r.title, "host": {"id": r.host_id, "name": r.host_name},
            "started_ms": r.created_ms, "ended_ms": ended, "duration_s": max(0, (ended - r.created_ms) // 1000),
            "end_reason": r.end_reason, "peak_viewers": r.peak_viewers or 0, "coins": r.acked_coins or 0}


def _viewers(presence: dict[str, str], now: int) -> int:
    """The room's viewers from its presence hash, as room_tick.lua counts them: each node's
    "<count>:<expires ms>" entry that has not expired."""
    total = 0
    for entry in presence.values():
        count, _, expires = entry.partition(":")
        if count.isdigit() and expires.isdigit() and int(expires) >= now:
            total += int(count)
    return total


def _valid_room_id(room_id: str) -> bool:
    return 0 < len(room_id) <= 64 and "}" not in room_id and room_id.isprintable()


def _n(value: Any) -> int:
    try:
        return int(value)
    except (TypeError, ValueError):
        return 0


ROUTES: list[BaseRoute] = [
    Route("/v1/rooms", create_room, methods=["POST"]),
    Route("/v1/rooms", list_rooms, methods=["GET"]),
    Route("/v1/rooms/{room_id}/end", end_room, methods=["POST"]),
    Route("/v1/rooms/{room_id}/summary", room_summary, methods=["GET"]),
]
