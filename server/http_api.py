"""HTTP API: catalog, a room's view, health, metrics (recharges: server/payments/http.py; rooms' lives:
server/creators/sessions.py; earnings: server/creators/).

Errors are JSON {"code", "message"} with the same codes as the socket.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from server import auth
from server.codes import Err, GiftstreamError
from server.metrics import Figure, exposition
from server.node import Node
from server.rooms.state import RoomState

# Every JSON body the API takes is a few hundred bytes.
MAX_BODY = 16 * 1024


def node_of(request: Request) -> Node:
    return request.app.state.node  # type: ignore[no-any-return]


def principal_of(request: Request) -> auth.Principal:
    return auth.verify(node_of(request).settings.secret or "", auth.bearer(request.headers.get("authorization")))


def whole_number(body: dict[str, Any], name: str, most: int | None = None, default: int | None = None) -> int:
    """`body[name]`: a JSON integer (a bool is not one) from 1 to `most` (no bound when None), or
    `default` when absent and one is given; 400 bad_request naming the field otherwise."""
    value = body.get(name, default)
    if not isinstance(value, int) or isinstance(value, bool) or value < 1 or (most is not None and value > most):
        bound = f"from 1 to {most}" if most is not None else "above zero"
        raise GiftstreamError(Err.BAD_REQUEST, f"{name} must be a whole number {bound}")
    return value


async def path_room(request: Request) -> tuple[Node, RoomState]:
    """The room `{room_id}` of the path, as Redis has it (404 for no such room)."""
    node = node_of(request)
    state = await node.rooms.get(request.path_params["room_id"])
    if state is None:
        raise GiftstreamError(Err.NOT_FOUND, "no such room")
    return node, state


async def hosted_room(request: Request, action: str) -> tuple[Node, auth.Principal, RoomState]:
    """The room `{room_id}` of the path, asked for by its host or an admin: 401 without a token,
    404 for no such room, 403 `only the room's host or an admin can <action>` for anyone else."""
    p = principal_of(request)
    node, state = await path_room(request)
    if p.role != "admin" and p.user_id != state.host_id:
        raise GiftstreamError(Err.FORBIDDEN, f"only the room's host or an admin can {action}")
    return node, p, state


async def read_body(request: Request, limit: int = MAX_BODY) -> bytes:
    """The request body, read as it comes and refused (413) past `limit` bytes: a 100 MB
    chunked body never sits in memory, and a too-large Content-Length is refused unread."""
    declared = request.headers.get("content-length")
    if declared is not None and (not declared.isdigit() or int(declared) > limit):
        raise GiftstreamError(Err.BODY_TOO_LARGE, f"body larger than {limit} bytes")
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise GiftstreamError(Err.BODY_TOO_LARGE, f"body larger than {limit} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


async def json_body(request: Request) -> dict[str, Any]:
    raw = await read_body(request)
    try:
        body = json.loads(raw or b"{}")
    except ValueError:
        raise GiftstreamError(Err.BAD_REQUEST, "body must be JSON") from None
    if not isinstance(body, dict):
        raise GiftstreamError(Err.BAD_REQUEST, "body must be a JSON object")
    return body


async def catalog(request: Request) -> Response:
    return JSONResponse(node_of(request).catalog.to_json())


async def room_info(request: Request) -> Response:
    node, state = await path_room(request)
    room_id = state.room_id
    viewers, top = await node.presence.room_view(room_id)
    return JSONResponse({
        "room_id": room_id, "title": state.title, "host": {"id": state.host_id, "name": state.host_name},
        "live": state.live, "viewers": viewers,
        "coins_total": state.coins_total, "gifts_total": state.gifts_total,
        "top_gifters": top, "epoch": state.epoch,
        "goal": state.goal.to_json() if state.goal is not None else None,
    })


async def healthz(request: Request) -> Response:
    health = await node_of(request).health()
    ok = health["redis"] == "ok" and health["database"] == "ok"
    return JSONResponse(health, status_code=200 if ok else 503)


async def metrics(request: Request) -> Response:
    """Prometheus text: the histograms and counters of server/metrics.py (summed over the workers
    under `serve --workers N`), the node's figures, and the outbox read from Redis now."""
    from server.settlement.settler import outbox_lag

    node = node_of(request)
    try:
        lag = await asyncio.wait_for(outbox_lag(node.redis, node.settings.partitions), 2)
    except Exception:
        now = [Figure("giftstream_redis_up", "Redis reachable", "gauge", 0)]
    else:
        now = [
            Figure("giftstream_redis_up", "Redis reachable", "gauge", 1),
            Figure("giftstream_outbox_entries", "Coin movements acknowledged but not yet settled", "gauge",
                   lag["outbox_entries"]),
            Figure("giftstream_outbox_lag_seconds", "Age of the oldest unsettled movement", "gauge",
                   lag["outbox_lag_ms"] / 1000),
            Figure("giftstream_quarantined", "Movements set aside after a permanent settlement error", "gauge",
                   lag["quarantined"]),
        ]
    return Response(exposition(node, now), media_type=CONTENT_TYPE_LATEST)
