"""LIVE goals: PUT /v1/rooms/{room_id}/goal and the room's goal events."""

from __future__ import annotations

from starlette.routing import BaseRoute

ROUTES: list[BaseRoute] = []
