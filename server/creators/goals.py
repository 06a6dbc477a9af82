"""LIVE goals: PUT, GET and DELETE /v1/rooms/{room_id}/goal; the room's `goal` events.

A host sets one goal for their live room, a count of one gift (`{"gift": "rose", "count": 1000}`)
or coins of any gifts (`{"coins": 5000}`). Setting one replaces the current goal and starts at 0;
DELETE removes it. The counting and the events are in Redis (server/rooms/goals.py).
"""

from __future__ import annotations

from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import BaseRoute, Route

from server.codes import Err, GiftstreamError
from server.http_api import hosted_room, json_body, path_room, whole_number
from server.node import Node
from server.rooms.goals import Goals, RoomGoal

# A target past this is no goal a room reaches; Lua's numbers stay exact far beyond it (2^53).
MAX_TARGET = 10**12


def _goals(node: Node) -> Goals:
    return Goals(node.batcher, node.settings)


def _answer(room_id: str, goal: RoomGoal) -> JSONResponse:
    return JSONResponse({"room_id": room_id, **goal.to_json()})


def parse_goal(body: dict[str, Any], node: Node) -> tuple[str | None, int]:
    """(gift, target) of a goal body: {"gift", "count"} or {"coins"}, nothing else."""
    if set(body) == {"gift", "count"}:
        gift = body["gift"]
        if not isinstance(gift, str):
            raise GiftstreamError(Err.BAD_REQUEST, "'gift' must be a gift id from the catalog")
        return node.catalog.gift(gift).id, whole_number(body, "count", MAX_TARGET)
    if set(body) == {"coins"}:
        return None, whole_number(body, "coins", MAX_TARGET)
    raise GiftstreamError(Err.BAD_REQUEST, 'a goal is {"gift": <gift id>, "count": <n>} or {"coins": <n>}')


async def _hosted(request: Request) -> tuple[Node, str]:
    """The node and room of a request by the room's host or an admin (404, 403 otherwise)."""
    node, _, state = await hosted_room(request, "change its goal")
    return node, state.room_id


async def set_goal(request: Request) -> Response:
    """Set the room's goal, replacing the current one; its progress starts at 0."""
    node, room_id = await _hosted(request)
    gift, target = parse_goal(await json_body(request), node)
    return _answer(room_id, await _goals(node).set(room_id, gift, target))


async def get_goal(request: Request) -> Response:
    """The room's goal and its progress."""
    _, state = await path_room(request)
    if state.goal is None:
        raise GiftstreamError(Err.NOT_FOUND, "this room has no goal")
    return _answer(state.room_id, state.goal)


async def clear_goal(request: Request) -> Response:
    """Remove the room's goal; the answer is the goal as it was."""
    node, room_id = await _hosted(request)
    return _answer(room_id, await _goals(node).clear(room_id))


ROUTES: list[BaseRoute] = [
    Route("/v1/rooms/{room_id}/goal", set_goal, methods=["PUT"]),
    Route("/v1/rooms/{room_id}/goal", get_goal, methods=["GET"]),
    Route("/v1/rooms/{room_id}/goal", clear_goal, methods=["DELETE"]),
]
