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
], ids=["numeric-string", "float", "far-future", "bool", "list"])  # stable ids: pytest-xdist workers must agree
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


def _outcome(token: str) -> tuple[str, Any]:
    try:
        return "ok", auth.verify(SECRET, token)
    except GiftstreamError as exc:
        return "refused", exc.message


def test_the_plain_check_and_pyjwt_agree_on_every_kind_of_token(monkeypatch: pytest.MonkeyPatch) -> None:
    now = int(time.time())
    good = _token()
    tokens = [
        good, _token(name=None, birthdate=None), _token(nbf=now - 5), _token(nbf=now + 600), _token(iat=now + 600),
        _token(exp=now - 1), _token(exp=now + 1), _token(exp=float(now + 60)), _token(exp=True), _token(aud="x"),
        _token(jti="j1"), _token(sub=5), _token(sub=""), _token(sub="a:b"), _token(role="root"), _token(iat="1"),
        good[:-3] + "abc", good + "A", good.replace(".", ".x", 1), good + ".x", "a.b.c", "..",
        good.split(".")[0] + "..",
        jwt.encode({"sub": "u1", "exp": now + 60}, "another secret of enough length!", algorithm="HS256"),
        jwt.encode({"sub": "u1", "exp": now + 60}, "k" * 64, algorithm="HS384"),
        jwt.encode({"sub": "u1", "exp": now + 60}, SECRET, algorithm="HS256", headers={"kid": "k"}),
        jwt.encode({"sub": "u1", "exp": now + 60}, None, algorithm="none"),  # type: ignore[arg-type]
    ]
    pyjwt_only = []
    for token in tokens:
        auth._HEADERS.clear()  # every token goes through PyJWT
        pyjwt_only.append(_outcome(token))
    decoded: list[str] = []
    real = jwt.decode

    def counted(*args: Any, **kwargs: Any) -> Any:
        decoded.append(args[0])
        return real(*args, **kwargs)

    monkeypatch.setattr(jwt, "decode", counted)
    auth._HEADERS.clear()
    auth.verify(SECRET, good)  # PyJWT accepts the usual header once
    decoded.clear()
    assert [_outcome(t) for t in tokens] == pyjwt_only
    # the good ones of the usual shape never reached PyJWT again
    assert good not in decoded and _token(nbf=now - 5) not in decoded
