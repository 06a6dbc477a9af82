"""Token claims of the wrong type are refused: only the documented types pass (docs/protocol.md, Auth)."""

from __future__ import annotations

import time
from typing import Any

import jwt
import pytest

from server import auth
from server.codes import Err, GiftstreamError
from tests.support import SECRET


def _token(**claims: Any) -> str:
    now = int(time.time())
    base: dict[str, Any] = {"sub": "u1", "name": "Zoë", "role": "viewer", "birthdate": "1990-01-01",
                            "iat": now, "exp": now + 3600}
    base.update(claims)
    return jwt.encode({k: v for k, v in base.items() if v is not None}, SECRET, algorithm=auth.ALGORITHM)


def _refused(token: str) -> str:
    with pytest.raises(GiftstreamError) as err:
        auth.verify(SECRET, token)
    assert err.value.code is Err.UNAUTHORIZED
    return err.value.message


def test_a_well_typed_token_passes() -> None:
    p = auth.verify(SECRET, _token())
    assert (p.user_id, p.name, p.role, str(p.birthdate)) == ("u1", "Zoë", "viewer", "1990-01-01")


@pytest.mark.parametrize("exp", [
    str(int(time.time()) + 3600),  # a numeric string
    float(int(time.time()) + 3600),  # a float
    10**30,  # never expires
    True,
    [int(time.time()) + 3600],
])
def test_exp_must_be_whole_seconds_in_a_sane_range(exp: Any) -> None:
    assert _refused(_token(exp=exp)) in ("invalid token", "invalid exp", "token expired")


def test_exp_is_required() -> None:
    _refused(_token(exp=None))


@pytest.mark.parametrize("iat", ["0", 10**30, 1.5])
def test_iat_when_given_must_be_whole_seconds(iat: Any) -> None:
    _refused(_token(iat=iat))


@pytest.mark.parametrize("birthdate", [19900101, "19900101", "1990-1-1", "1990-01-01T00:00", "1990-02-30",
                                       ["1990-01-01"], "\uff11\uff19\uff19\uff10-01-01"])
def test_birthdate_must_be_a_yyyy_mm_dd_string(birthdate: Any) -> None:
    assert _refused(_token(birthdate=birthdate)) == "invalid birthdate"


@pytest.mark.parametrize("sub", [1, 1.0, True, ["u1"], {"id": "u1"}])
def test_sub_must_be_a_string(sub: Any) -> None:
    assert _refused(_token(sub=sub)) in ("invalid token", "invalid subject")


@pytest.mark.parametrize("name", [1, ["Zoë"], {"n": 1}, False])
def test_name_must_be_a_string(name: Any) -> None:
    assert _refused(_token(name=name)) == "invalid name"


@pytest.mark.parametrize("role", [1, ["admin"], "ADMIN", "superuser", True])
def test_role_must_be_one_of_the_role_strings(role: Any) -> None:
    assert _refused(_token(role=role)) == "invalid role"


def test_a_name_loses_its_bidi_overrides() -> None:
    p = auth.verify(SECRET, _token(name="\u202eevil\u202c name"))
    assert p.name == "evil name"
