"""Every failure becomes an answer here, and nowhere else.

Three kinds of answer, one function each:
- a reply error on the socket (`reply_for`): the connection stays open;
- a close frame (`close_for`, or one of the `Disconnect` values below): the connection ends,
  and the close reason is data the client reads as JSON, `{"reason", "reconnect", "retry_ms"}`
  (the centrifuge way), never a sentence to re-parse;
- an HTTP error body (`http_response`): `{"code", "message"}` with the code's status.

A `GiftstreamError` carries its code and a message safe to show. Redis or the database
being unreachable is `unavailable` (a reply, 1013 on a join, 503 over HTTP): the request is
safe to repeat with the same id. Anything else is unexpected: it is logged here, and the
peer learns only `internal error` (a reply `unavailable` for a gift, whose outcome is then
unknown; 1011 for a socket; 500 over HTTP), never the exception's text.
"""

from __future__ import annotations

import json
import logging
import random
from dataclasses import dataclass
from typing import Any

from starlette.responses import JSONResponse

from server import metrics, protocol
from server.codes import HTTP_STATUS, Close, Err, GiftstreamError
from server.fastpipe import UNREACHABLE

log = logging.getLogger("giftstream.errors")

UNAVAILABLE_MESSAGE = "temporarily unavailable; retry"
GIFT_UNKNOWN_MESSAGE = "gift could not be confirmed; retry with the same id"
INTERNAL_MESSAGE = "internal error"


@dataclass(frozen=True, slots=True)
class Disconnect:
    """A close frame and the advice that goes with it. `retry_ms` is the base of the advised
    delay; `spread_ms` of jitter is added per socket, so a node's viewers do not all come back
    in the same instant."""

    code: int
    reason: str
    reconnect: bool
    retry_ms: int | None = None
    spread_ms: int = 0

    def advice(self) -> dict[str, Any]:
        out: dict[str, Any] = {"reason": self.reason, "reconnect": self.reconnect}
        if self.retry_ms is not None:
            out["retry_ms"] = self.retry_ms + (random.randrange(self.spread_ms) if self.spread_ms else 0)
        return out

    def close_reason(self) -> str:
        """The close frame's reason: the advice as compact JSON (RFC 6455 allows 123 bytes)."""
        text = json.dumps(self.advice(), separators=(",", ":"))
        assert len(text.encode()) <= 123, text
        return text

    def with_reason(self, reason: str) -> Disconnect:
        return Disconnect(self.code, reason[:60], self.reconnect, self.retry_ms, self.spread_ms)


# Every close the server sends, with its advice (docs/protocol.md, "Close codes").
GOING_AWAY = Disconnect(Close.GOING_AWAY, "server restarting", True, 1000, 4000)
TRY_AGAIN_LATER = Disconnect(Close.TRY_AGAIN_LATER, "service unavailable", True, 1000, 4000)
INTERNAL_ERROR = Disconnect(Close.INTERNAL_ERROR, INTERNAL_MESSAGE, True, 1000, 4000)
SLOW_CONSUMER = Disconnect(Close.SLOW_CONSUMER, "slow consumer", True, 200, 800)
PROTOCOL_VIOLATION = Disconnect(Close.PROTOCOL_VIOLATION, "too many malformed frames", False)
UNAUTHORIZED = Disconnect(Close.UNAUTHORIZED, "unauthorized", False)
ROOM_NOT_FOUND = Disconnect(Close.ROOM_NOT_FOUND, "room not found or not live", False)
ROOM_ENDED = Disconnect(Close.ROOM_ENDED, "room ended", False)
PING_TIMEOUT = Disconnect(Close.PING_TIMEOUT, "keepalive ping timeout", True, 0, 1000)
# Slow on purpose: the user's other sockets must close first (a reload's old tab, say).
TOO_MANY_CONNECTIONS = Disconnect(Close.TOO_MANY_CONNECTIONS, "too many connections", True, 5000, 5000)


def is_unreachable(exc: BaseException) -> bool:
    return isinstance(exc, UNREACHABLE)


def reply_for(exc: BaseException, msg_id: str | None = None, *, context: str = "request") -> dict[str, Any]:
    """The `error` message answering `exc` on a socket; the socket stays open."""
    if isinstance(exc, GiftstreamError):
        code, message = exc.code, exc.message
    elif is_unreachable(exc):
        # The outage is logged once by the part that keeps the connection (the batcher).
        code, message = Err.UNAVAILABLE, GIFT_UNKNOWN_MESSAGE if context == "gift" else UNAVAILABLE_MESSAGE
    else:
        log.error("%s %s failed", context, msg_id, exc_info=exc)
        # For a gift the outcome is unknown: retrying with the same id is safe.
        code, message = Err.UNAVAILABLE, GIFT_UNKNOWN_MESSAGE if context == "gift" else INTERNAL_MESSAGE
    return error_message(code, message, msg_id)


def error_message(code: Err, message: str, msg_id: str | None = None, **extra: Any) -> dict[str, Any]:
    metrics.REPLY_ERRORS.labels(code.value).inc()
    return protocol.error(code, message, msg_id, **extra)


def closing(d: Disconnect) -> tuple[int, str]:
    """(code, reason) for the close frame about to be sent, counted per close code."""
    metrics.CLOSES.labels(str(int(d.code))).inc()
    return int(d.code), d.close_reason()


def close_for(exc: BaseException) -> Disconnect:
    """The close frame for a failure that ends a socket."""
    if isinstance(exc, GiftstreamError) and exc.code is Err.UNAUTHORIZED:
        return UNAUTHORIZED.with_reason(exc.message)
    if isinstance(exc, GiftstreamError) and exc.code is Err.TOO_MANY_CONNECTIONS:
        return TOO_MANY_CONNECTIONS
    if is_unreachable(exc):
        return TRY_AGAIN_LATER
    log.error("room socket failed", exc_info=exc)
    return INTERNAL_ERROR


def http_status_and_body(exc: BaseException) -> tuple[int, dict[str, Any]]:
    if isinstance(exc, GiftstreamError):
        return exc.status, {"code": exc.code.value, "message": exc.message, **exc.details}
    if is_unreachable(exc):
        # Redis or the database did not answer in time: the request is safe to repeat as it was.
        return HTTP_STATUS[Err.UNAVAILABLE], {"code": Err.UNAVAILABLE.value, "message": UNAVAILABLE_MESSAGE}
    return HTTP_STATUS[Err.INTERNAL], {"code": Err.INTERNAL.value, "message": INTERNAL_MESSAGE}


def http_response(exc: BaseException) -> JSONResponse:
    """The one HTTP error body: {"code", "message"} with the code's status."""
    status, body = http_status_and_body(exc)
    if isinstance(exc, GiftstreamError) and exc.code is Err.BODY_TOO_LARGE:
        # The rest of the body is never read: the connection ends with this answer.
        return JSONResponse(body, status_code=status, headers={"connection": "close"})
    return JSONResponse(body, status_code=status)
