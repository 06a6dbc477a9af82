"""HS256 JWT issue and verification, roles and age."""

from __future__ import annotations

import datetime as dt
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
    try:
        claims = jwt.decode(token, secret, algorithms=[ALGORITHM], options={"require": ["sub", "exp"]})
    except jwt.ExpiredSignatureError:
        raise GiftstreamError(Err.UNAUTHORIZED, "token expired") from None
    except jwt.PyJWTError:
        raise GiftstreamError(Err.UNAUTHORIZED, "invalid token") from None
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
