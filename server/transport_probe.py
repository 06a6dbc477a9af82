"""Expose the uvicorn websockets-sansio protocol object to room sockets.

Starlette wraps the ASGI `send` callable on its way to an endpoint, so the endpoint
cannot reach the transport behind it. This outermost ASGI layer sees uvicorn's own
`send`, a bound method of the protocol, and records the protocol in the scope. Room
fan-out then writes pre-encoded frames straight to each socket's transport (the
`websockets.broadcast()` technique); without it, sockets fall back to a writer task.
"""

from __future__ import annotations

from starlette.types import ASGIApp, Receive, Scope, Send

SCOPE_KEY = "giftstream.ws_protocol"


class TransportProbe:
    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "websocket":
            proto = getattr(send, "__self__", None)
            if proto is not None and any(c.__name__ == "WebSocketsSansIOProtocol" for c in type(proto).__mro__):
                scope[SCOPE_KEY] = proto
        await self.app(scope, receive, send)
