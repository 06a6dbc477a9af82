"""Room lifecycle: one live room per host, the LIVE-now list, idle rooms ending, session summaries."""

from __future__ import annotations

from starlette.routing import BaseRoute

ROUTES: list[BaseRoute] = []
