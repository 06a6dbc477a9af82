"""HS256 JWT issue and verification, roles and age."""

from __future__ import annotations

import base64
import binascii
import datetime as dt
import hashlib
import hmac
import json
import re
import time
from dataclasses import dataclass
from typing import Any, Final

import jwt

from server.codes import Err, GiftstreamError
from server.protocol import plain

ROLES: Final = ("viewer", "host", "admin")
ADULT_AGE: Final = 18
ALGORITHM: Final = "HS256"
# The latest `exp` a token may carry: ten years from now. Tokens live days (token_ttl_s).
MAX_TOKEN_LIFE_S: Final = 10 * 366 * 24 * 3600
# A birthdate claim is an ISO calendar date, nothing else (fromisoformat also takes "19900101").
BIRTHDATE: Final = re.compile(r"[0-9]{4}-[0-9]{2}-[0-9]{2}")


_today_cache: tuple[int, dt.date] = (-1, dt.date.min)


def _today() -> dt.date:
    """Today in UTC, memoised per second: the age check runs on every gift."""
    global _today_cache
    second = int(time.time())
    if _today_cache[0] != second:
        _today_cache = (second, dt.datetime.fromtimestamp(second, dt.UTC).date())
    return _today_cache[1]


@dataclass(frozen=True, slots=True)
class Principal:
    user_id: str
    name: str
    role: str
    birthdate: dt.date | None

    def is_adult(self, today: dt.date | None = None) -> bool:
        if self.birthdate is None:
            return False
        today = today or _today()
        b = self.birthdate
        age = today.year - b.year - ((today.month, today.day) < (b.month, b.day))
        return age >= ADULT_AGE

    def require(self, *roles: str) -> None:
        if self.role not in roles:
            raise GiftstreamError(Err.FORBIDDEN, f"this needs the role {' or '.join(roles)}")


def issue(
    secret: str,
    user_id: str,
    *,
    role: str = "viewer",
    name: str | None = None,
    birthdate: str = "1990-01-01",
    ttl_s: int = 7 * 24 * 3600,
) -> str:
    if role not in ROLES:
        raise ValueError(f"role must be one of {', '.join(ROLES)}")
    dt.date.fromisoformat(birthdate)
    now = int(time.time())
    claims = {"sub": user_id, "name": name or user_id, "role": role, "birthdate": birthdate,
              "iat": now, "exp": now + ttl_s}
    return jwt.encode(claims, secret, algorithm=ALGORITHM)


def verify(secret: str, token: str | None) -> Principal:
    if not token:
        raise GiftstreamError(Err.UNAUTHORIZED, "missing token")
    claims = _plain_claims(secret, token)
    if claims is None:
        try:
            claims = jwt.decode(token, secret, algorithms=[ALGORITHM], options={"require": ["sub", "exp"]})
        except jwt.ExpiredSignatureError:
            raise GiftstreamError(Err.UNAUTHORIZED, "token expired") from None
        except jwt.PyJWTError:
            raise GiftstreamError(Err.UNAUTHORIZED, "invalid token") from None
        _HEADERS.add(token.partition(".")[0])
    _check_times(claims)
    sub, role, name = claims.get("sub"), claims.get("role", "viewer"), claims.get("name")
    if (not isinstance(sub, str) or not 0 < len(sub) <= 64 or ":" in sub or "{" in sub or "}" in sub
            or not sub.isprintable()):
        raise GiftstreamError(Err.UNAUTHORIZED, "invalid subject")
    if not isinstance(role, str) or role not in ROLES:
        raise GiftstreamError(Err.UNAUTHORIZED, "invalid role")
    if name is not None and not isinstance(name, str):
        raise GiftstreamError(Err.UNAUTHORIZED, "invalid name")
    birthdate: dt.date | None = None
    raw_birth = claims.get("birthdate")
    if raw_birth is not None:
        if not isinstance(raw_birth, str) or not BIRTHDATE.fullmatch(raw_birth):
            raise GiftstreamError(Err.UNAUTHORIZED, "invalid birthdate")
        try:
            birthdate = dt.date.fromisoformat(raw_birth)
        except ValueError:
            raise GiftstreamError(Err.UNAUTHORIZED, "invalid birthdate") from None
    display = plain(name) if name is not None else ""
    display = display or sub
    return Principal(sub, display[:64], role, birthdate)


# PyJWT takes about 68 us to verify a token here, a join storm's largest single cost after the
# handshake; the same checks on a token of the usual shape take about 8. A token's header
# segment is taken as plain once PyJWT accepted a token with exactly that segment (every token
# this server issues has the same one).
_HEADERS: set[str] = set()
# Claims whose checks `_plain_claims` makes exactly as PyJWT (plus `verify`'s own) would.
_PLAIN_CLAIMS: Final = frozenset(("sub", "name", "role", "birthdate", "iat", "nbf", "exp"))
# An HMAC-SHA256 keyed with the secret, copied per token: the key is set up once.
_MACS: dict[str, hmac.HMAC] = {}


def _plain_claims(secret: str, token: str) -> dict[str, Any] | None:
    """The claims of a valid token of the usual shape, checked as PyJWT checks them, or None
    for PyJWT to decide (any other token, including every invalid or expired one, whose
    error PyJWT names)."""
    header, _, rest = token.partition(".")
    payload, _, signature = rest.partition(".")
    if header not in _HEADERS or not signature:
        return None
    keyed = _MACS.get(secret)
    if keyed is None:
        keyed = _MACS[secret] = hmac.new(secret.encode(), digestmod=hashlib.sha256)
    mac = keyed.copy()
    mac.update(token[: len(header) + 1 + len(payload)].encode())
    if not hmac.compare_digest(base64.urlsafe_b64encode(mac.digest()).rstrip(b"=").decode(), signature):
        return None
    try:
        claims = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
    except (ValueError, binascii.Error):
        return None
    if not isinstance(claims, dict) or not claims.keys() <= _PLAIN_CLAIMS or not isinstance(claims.get("sub"), str):
        return None
    now = time.time()
    times = (claims.get("exp"), claims.get("iat", 0), claims.get("nbf", 0))
    if not all(isinstance(t, int) and not isinstance(t, bool) for t in times):
        return None
    exp, iat, nbf = (int(t) for t in times)  # type: ignore[arg-type]
    if exp <= now or iat > now or nbf > now:
        return None
    return claims


def _check_times(claims: dict[str, Any]) -> None:
    """`exp` (and `iat`, `nbf` when given) are whole seconds, as RFC 7519 has them: PyJWT alone
    takes a numeric string, and any size of number (10**30 never expires)."""
    now = int(time.time())
    for name in ("exp", "iat", "nbf"):
        value = claims.get(name)
        if value is None and name != "exp":
            continue
        if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value <= now + MAX_TOKEN_LIFE_S:
            raise GiftstreamError(Err.UNAUTHORIZED, f"invalid {name}")


def bearer(header: str | None) -> str | None:
    if header and header[:7].lower() == "bearer ":
        return header[7:].strip()
    return None
