"""Gifts on videos: /v1/videos and /v1/videos/{video_id}/gifts."""

from __future__ import annotations

from starlette.routing import BaseRoute

ROUTES: list[BaseRoute] = []
