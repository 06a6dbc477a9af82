"""Reply error codes and close codes, each listed once (documented in docs/protocol.md).

A reply error leaves the connection open; a close code ends it.
"""

from __future__ import annotations

from enum import IntEnum, StrEnum


class Err(StrEnum):
    BAD_REQUEST = "bad_request"
    UNAUTHORIZED = "unauthorized"
    FORBIDDEN = "forbidden"
    NOT_FOUND = "not_found"
    METHOD_NOT_ALLOWED = "method_not_allowed"
    BODY_TOO_LARGE = "body_too_large"
    HEADERS_TOO_LARGE = "headers_too_large"
    TOO_MANY_CONNECTIONS = "too_many_connections"
    INSUFFICIENT_FUNDS = "insufficient_funds"
    UNKNOWN_GIFT = "unknown_gift"
    UNKNOWN_PACKAGE = "unknown_package"
    BAD_COUNT = "bad_count"
    BAD_AMOUNT = "bad_amount"
    ROOM_NOT_LIVE = "room_not_live"
    AGE_RESTRICTED = "age_restricted"
    NOT_ALLOWED = "not_allowed"
    ACCOUNT_RESTRICTED = "account_restricted"
    BUDGET_EXCEEDED = "budget_exceeded"
    INSUFFICIENT_POINTS = "insufficient_points"
    ALREADY_CHECKED_IN = "already_checked_in"
    IDEMPOTENCY_CONFLICT = "idempotency_conflict"
    RATE_LIMITED = "rate_limited"
    PAYMENT_DECLINED = "payment_declined"
    # A payment webhook whose signature is missing, wrong or stale (docs/protocol.md, webhooks).
    BAD_SIGNATURE = "bad_signature"
    # A payment webhook whose amount or currency is not its order's: nothing is credited.
    AMOUNT_MISMATCH = "amount_mismatch"
    UNSUPPORTED_PAYMENT_METHOD = "unsupported_payment_method"
    # The creator side (docs/protocol.md, cash-out): refusals of a withdrawal, in the order checked.
    TWO_FA_REQUIRED = "2fa_required"
    BAD_2FA_CODE = "bad_2fa_code"
    BELOW_MINIMUM = "below_minimum"
    INSUFFICIENT_DIAMONDS = "insufficient_diamonds"
    OVER_DAILY_LIMIT = "over_daily_limit"
    # A host has at most one live room; the answer names it.
    ALREADY_LIVE = "already_live"
    UNAVAILABLE = "unavailable"
    INTERNAL = "internal"


HTTP_STATUS: dict[Err, int] = {
    Err.BAD_REQUEST: 400,
    Err.UNAUTHORIZED: 401,
    Err.FORBIDDEN: 403,
    Err.NOT_FOUND: 404,
    Err.METHOD_NOT_ALLOWED: 405,
    Err.BODY_TOO_LARGE: 413,
    Err.HEADERS_TOO_LARGE: 431,
    Err.TOO_MANY_CONNECTIONS: 429,
    Err.INSUFFICIENT_FUNDS: 402,
    Err.UNKNOWN_GIFT: 400,
    Err.UNKNOWN_PACKAGE: 400,
    Err.BAD_COUNT: 400,
    Err.BAD_AMOUNT: 400,
    Err.ROOM_NOT_LIVE: 409,
    Err.AGE_RESTRICTED: 403,
    Err.NOT_ALLOWED: 403,
    Err.ACCOUNT_RESTRICTED: 403,
    Err.BUDGET_EXCEEDED: 402,
    Err.INSUFFICIENT_POINTS: 402,
    Err.ALREADY_CHECKED_IN: 409,
    Err.IDEMPOTENCY_CONFLICT: 409,
    Err.RATE_LIMITED: 429,
    Err.PAYMENT_DECLINED: 402,
    Err.BAD_SIGNATURE: 400,
    Err.AMOUNT_MISMATCH: 400,
    Err.UNSUPPORTED_PAYMENT_METHOD: 400,
    Err.TWO_FA_REQUIRED: 403,
    Err.BAD_2FA_CODE: 403,
    Err.BELOW_MINIMUM: 400,
    Err.INSUFFICIENT_DIAMONDS: 402,
    Err.OVER_DAILY_LIMIT: 400,
    Err.ALREADY_LIVE: 409,
    Err.UNAVAILABLE: 503,
    Err.INTERNAL: 500,
}


class Close(IntEnum):
    NORMAL = 1000
    # Server shutting down (SIGTERM drain): reconnect to another node.
    GOING_AWAY = 1001
    # Frame larger than max_frame_bytes (sent by the WebSocket layer).
    MESSAGE_TOO_BIG = 1009
    # Unexpected server error; the text never reaches the peer.
    INTERNAL_ERROR = 1011
    # Redis unreachable while joining: reconnect after the advised delay, then resume.
    TRY_AGAIN_LATER = 1013
    # Unsent bytes passed send_buffer_cap: reconnect and resume from the last offset.
    SLOW_CONSUMER = 4008
    # Too many malformed frames in a row.
    PROTOCOL_VIOLATION = 4400
    UNAUTHORIZED = 4401
    FORBIDDEN = 4403
    # Room does not exist or is not live (late joiners).
    ROOM_NOT_FOUND = 4404
    # The host ended the room; the room_ended event came first.
    ROOM_ENDED = 4410
    # Keepalive pong did not arrive in time.
    PING_TIMEOUT = 4408
    # This user already has max_sockets_per_user_room sockets in this room on this node, or
    # max_sockets_per_user on this node: close one, or reconnect after the advised delay.
    TOO_MANY_CONNECTIONS = 4429


class GiftstreamError(Exception):
    """An error with a reply code; its message is safe to show to the client."""

    def __init__(self, code: Err, message: str | None = None, **details: object) -> None:
        self.code = code
        self.message = message or code.value.replace("_", " ")
        # Fields the answer carries beside code and message (a decline's `decline_reason`).
        self.details = details
        super().__init__(self.message)

    @property
    def status(self) -> int:
        return HTTP_STATUS[self.code]
