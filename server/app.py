"""Starlette app factory: routes and lifespan wiring."""

from __future__ import annotations

import contextlib
import gc
import logging
from collections.abc import AsyncIterator

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route, WebSocketRoute

from server import errors, http_api, web
from server.codes import Err, GiftstreamError
from server.creators import routes as creators
from server.embedded import Embedded
from server.fastpipe import UNREACHABLE
from server.node import Node
from server.payments import http as payments_http
from server.settings import Settings, from_env
from server.transport_probe import TransportProbe
from server.wallet import http as wallet_http
from server.ws import room_socket

log = logging.getLogger("giftstream.app")


async def _http_error(request: Request, exc: Exception) -> Response:
    """Starlette's own refusals (no such route, method not allowed) in the one error body."""
    assert isinstance(exc, HTTPException)
    code = {404: Err.NOT_FOUND, 405: Err.METHOD_NOT_ALLOWED}.get(exc.status_code, Err.BAD_REQUEST)
    _, body = errors.http_status_and_body(GiftstreamError(code, str(exc.detail)))
    return JSONResponse(body, status_code=exc.status_code, headers=exc.headers)


async def _failure(request: Request, exc: Exception) -> Response:
    if not isinstance(exc, GiftstreamError) and not errors.is_unreachable(exc):
        log.exception("unhandled error on %s", request.url.path, exc_info=exc)
    return errors.http_response(exc)


def create_app(settings: Settings, embedded: Embedded | None = None) -> Starlette:
    node = Node(settings, embedded)

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        await node.start()
        # Everything made so far (modules, catalog, scripts) lives as long as the process:
        # keep it out of the collector's full passes, which otherwise scan it every time.
        gc.freeze()
        try:
            yield
        finally:
            await node.stop()

    routes = [
        Route("/healthz", http_api.healthz),
        Route("/metrics", http_api.metrics),
        Route("/v1/catalog", http_api.catalog),
        *wallet_http.ROUTES,
        *payments_http.routes(),
        Route("/v1/rooms/{room_id}", http_api.room_info),
        *creators.routes(),
        WebSocketRoute("/v1/rooms/{room_id}/ws", room_socket),
        *web.routes(),
    ]
    app = Starlette(
        routes=routes,
        lifespan=lifespan,
        middleware=[Middleware(TransportProbe)],
        exception_handlers={HTTPException: _http_error, GiftstreamError: _failure,
                            **dict.fromkeys(UNREACHABLE, _failure), Exception: _failure},
    )
    app.state.node = node
    return app


def create_app_from_env() -> Starlette:
    """Factory for `uvicorn --factory` worker processes: settings come from GIFTSTREAM_* env."""
    return create_app(from_env())
