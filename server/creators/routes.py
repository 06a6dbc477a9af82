"""Every creator-side route, in one list for the app."""

from __future__ import annotations

from starlette.routing import BaseRoute

from server.creators import earnings, goals, sessions, videos, withdrawals


def routes() -> list[BaseRoute]:
    return [*earnings.ROUTES, *withdrawals.ROUTES, *sessions.ROUTES, *goals.ROUTES, *videos.ROUTES]
