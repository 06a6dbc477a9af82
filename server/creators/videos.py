"""Gifts on videos: /v1/videos and /v1/videos/{video_id}/gifts (docs/protocol.md, "Gifts on videos").

The gift itself is creators/video_gifts.py; these handlers read the request and shape the answer.
"""

from __future__ import annotations

import secrets

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import BaseRoute, Route

from server import paging
from server.codes import Err, GiftstreamError
from server.creators.video_gifts import VIDEO_ID_PREFIX, could_be_video_id
from server.http_api import json_body, node_of, principal_of
from server.protocol import gift_of, plain
from server.store.models import now_ms
from server.store.videos import Video

MAX_TITLE = 200


def new_video_id() -> str:
    """"v-" and 12 URL-safe characters: the hyphen keeps it apart from every room id
    (rooms/state.py makes those without one), as both share the gifts table's room_id."""
    return VIDEO_ID_PREFIX + secrets.token_urlsafe(9)


def _video_json(video: Video) -> dict[str, object]:
    return {"video_id": video.id, "title": video.title, "owner": {"id": video.owner_id, "name": video.owner_name},
            "created_ms": video.created_ms}


async def create_video(request: Request) -> Response:
    """POST /v1/videos {title}: a host's new video, which viewers may gift."""
    p = principal_of(request)
    p.require("host", "admin")
    body = await json_body(request)
    title = body.get("title")
    if not isinstance(title, str) or not plain(title).strip() or len(title) > MAX_TITLE:
        raise GiftstreamError(Err.BAD_REQUEST, f"title must be a string of 1 to {MAX_TITLE} characters")
    node = node_of(request)
    video = Video(new_video_id(), p.user_id, p.name, plain(title), now_ms())
    await node.store.upsert_user(p.user_id, p.name)
    await node.store.create_video(video)
    return JSONResponse(_video_json(video), status_code=201)


async def get_video(request: Request) -> Response:
    """GET /v1/videos/{video_id}: the video and its settled gift totals."""
    node = node_of(request)
    video_id = request.path_params["video_id"]
    video = await node.store.get_video(video_id) if could_be_video_id(video_id) else None
    if video is None:
        raise GiftstreamError(Err.NOT_FOUND, "no such video")
    gifts, coins = await node.store.video_totals(video.id)
    return JSONResponse({**_video_json(video), "gifts_total": gifts, "coins_total": coins})


async def send_gift(request: Request) -> Response:
    """POST /v1/videos/{video_id}/gifts {id, gift, count}: charged as a room gift, once per id."""
    p = principal_of(request)
    msg = gift_of(await json_body(request))
    sent = await node_of(request).video_gifts.send(p, request.path_params["video_id"], msg)
    d = sent.debit
    return JSONResponse({"id": msg.id, "video_id": sent.video.id, "gift_id": d.gift_id, "balance": d.balance,
                         "replayed": d.replayed})


async def list_gifts(request: Request) -> Response:
    """GET /v1/videos/{video_id}/gifts?cursor=&limit=: its settled gifts, newest first."""
    node = node_of(request)
    limit, before = paging.limit(request.query_params), paging.cursor(request.query_params)
    video = await node.video_gifts.video(request.path_params["video_id"])
    rows = await node.store.video_gifts(video.id, before, limit + 1)
    page, after = paging.page(rows, limit, lambda g: (g.sent_ms, g.gift_id))
    return JSONResponse({
        "gifts": [{"gift_id": g.gift_id, "sender": {"id": g.sender_id, "name": g.sender_name}, "gift": g.gift,
                   "count": g.count, "coins": g.coins, "sent_ms": g.sent_ms} for g in page],
        "next_cursor": after,
    })


ROUTES: list[BaseRoute] = [
    Route("/v1/videos", create_video, methods=["POST"]),
    Route("/v1/videos/{video_id}", get_video),
    Route("/v1/videos/{video_id}/gifts", send_gift, methods=["POST"]),
    Route("/v1/videos/{video_id}/gifts", list_gifts, methods=["GET"]),
]
