"""A host's earnings and received gifts: GET /v1/me/earnings, GET /v1/me/gifts."""

from __future__ import annotations

from starlette.routing import BaseRoute

ROUTES: list[BaseRoute] = []
