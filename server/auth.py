"""HS256 JWT issue and verification, roles and age."""

from __future__ import annotations

import datetime as dt
import time
from dataclasses import dataclass
from typing import Final

import jwt

from server.codes import Err, GiftstreamError
from server.protocol import plain

ROLES: Final = ("viewer", "host", "admin")
ADULT_AGE: Final = 18
ALGORITHM: Final = "HS256"


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
    sub, role, name = claims.get("sub"), claims.get("role", "viewer"), claims.get("name")
    if (not isinstance(sub, str) or not 0 < len(sub) <= 64 or ":" in sub or "{" in sub or "}" in sub
            or not sub.isprintable()):
        raise GiftstreamError(Err.UNAUTHORIZED, "invalid subject")
    if role not in ROLES:
        raise GiftstreamError(Err.UNAUTHORIZED, "invalid role")
    birthdate: dt.date | None = None
    raw_birth = claims.get("birthdate")
    if raw_birth is not None:
        try:
            birthdate = dt.date.fromisoformat(str(raw_birth))
        except ValueError:
            raise GiftstreamError(Err.UNAUTHORIZED, "invalid birthdate") from None
    display = plain(name) if isinstance(name, str) else ""
    display = display or sub
    return Principal(sub, display[:64], role, birthdate)


def bearer(header: str | None) -> str | None:
    if header and header[:7].lower() == "bearer ":
        return header[7:].strip()
    return None
