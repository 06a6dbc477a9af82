"""The pages a person opens: the landing page, the live room at /demo, the protocol at /docs,
and the OpenAPI description of the HTTP API at /openapi.json.

Everything a page loads comes from this server (static/, no build step, no CDN), and the pages
forbid anything else with their Content-Security-Policy. The demo page puts every text the
server sends into the DOM as text: names and titles are user input.
"""

from __future__ import annotations

from pathlib import Path

from starlette.requests import Request
from starlette.responses import FileResponse, HTMLResponse, JSONResponse, Response
from starlette.routing import BaseRoute, Mount, Route
from starlette.staticfiles import StaticFiles

from server.web import docs, openapi

STATIC = Path(__file__).resolve().parent / "static"


def page_headers(request: Request) -> dict[str, str]:
    """Only this origin's scripts, styles and sockets; a token in the address bar goes nowhere."""
    host = request.headers.get("host", "")
    sockets = f" ws://{host} wss://{host}" if host else ""
    return {
        "content-security-policy": (
            "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
            f"connect-src 'self'{sockets}; object-src 'none'; base-uri 'none'; frame-ancestors 'none'"),
        "referrer-policy": "no-referrer",
        "x-content-type-options": "nosniff",
        "cache-control": "no-cache",
    }


async def landing(request: Request) -> Response:
    """The landing page: links to the live demo, the protocol and the OpenAPI description."""
    return FileResponse(STATIC / "index.html", headers=page_headers(request))


async def demo(request: Request) -> Response:
    """The live room in a browser (`/demo?room=<room_id>&token=<jwt>` opens that room)."""
    return FileResponse(STATIC / "demo.html", headers=page_headers(request))


async def protocol_page(request: Request) -> Response:
    """docs/protocol.md as HTML."""
    return HTMLResponse(docs.protocol_html(), headers=page_headers(request))


async def openapi_json(request: Request) -> Response:
    """The OpenAPI 3.1 description of every HTTP route of this app."""
    return JSONResponse(openapi.spec(request.app.routes))


def routes() -> list[BaseRoute]:
    return [
        Route("/", landing),
        Route("/demo", demo),
        Route("/docs", protocol_page),
        Route("/openapi.json", openapi_json),
        Mount("/static", StaticFiles(directory=STATIC), name="static"),
    ]
