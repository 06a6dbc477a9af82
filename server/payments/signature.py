"""Webhook signatures, pure: `Giftstream-Signature: t=<unix s>,v1=<hex HMAC-SHA256>`.

The HMAC is over "<t>.<raw body>" keyed with the webhook secret, as Stripe signs its events:
the timestamp is inside what is signed, so an old delivery cannot be replayed with a new `t`,
and a `t` more than TOLERANCE_S from now is refused (a captured request is good for minutes,
not forever). The body is verified as the bytes received, before any parsing.
"""

from __future__ import annotations

import hashlib
import hmac

HEADER = "giftstream-signature"
# How far `t` may be from the receiver's clock, either way.
TOLERANCE_S = 300


class BadSignature(ValueError):
    """The signature header is missing, malformed, stale or does not match; the text says which."""


def digest(secret: str, t: int, body: bytes) -> str:
    return hmac.new(secret.encode(), str(t).encode() + b"." + body, hashlib.sha256).hexdigest()


def sign(secret: str, body: bytes, t: int) -> str:
    """The header value for `body` sent at unix time `t`."""
    return f"t={t},v1={digest(secret, t, body)}"


def verify(secret: str, header: str | None, body: bytes, now: float, tolerance_s: int = TOLERANCE_S) -> int:
    """The signed time `t` when `header` signs `body`; BadSignature otherwise. Several `v1`
    values may be given (a provider rolling its secret signs with both); one must match."""
    if not header:
        raise BadSignature("missing Giftstream-Signature header")
    t: int | None = None
    candidates: list[str] = []
    for part in header.split(","):
        name, sep, value = part.strip().partition("=")
        if not sep:
            raise BadSignature("malformed Giftstream-Signature header")
        if name == "t":
            if not value.isdigit() or len(value) > 12:
                raise BadSignature("malformed Giftstream-Signature timestamp")
            t = int(value)
        elif name == "v1":
            candidates.append(value)
    if t is None or not candidates:
        raise BadSignature("Giftstream-Signature needs t= and v1=")
    if abs(now - t) > tolerance_s:
        raise BadSignature(f"Giftstream-Signature timestamp is more than {tolerance_s} s from now")
    expected = digest(secret, t, body)
    if not any(hmac.compare_digest(expected, c) for c in candidates):
        raise BadSignature("Giftstream-Signature does not match the body")
    return t
