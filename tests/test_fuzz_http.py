"""Every HTTP route of the app (read from its route table, so a new route is fuzzed the day it is
added) fed random bodies, queries, path parameters, headers and tokens: never a 500, and every
refusal is the one error body {"code", "message"} with a documented code and no exception text."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from typing import Any
from urllib.parse import quote

import httpx
import pytest
from hypothesis import given
from hypothesis import strategies as st

from server.codes import Err
from tests.support import FAST, SECRET, ServerProc, fuzz_settings, http_routes, token

pytestmark = pytest.mark.timeout(240)

ERR_CODES = {e.value for e in Err}
# Fields an error body may carry beside code and message, per code (documented in protocol.md).
DETAILS = {"already_live": {"room_id"}}
# Exception text a response body must never hold.
LEAKS = ("Traceback", 'File "', "Expecting value", "line 1 column", "Exception", "Error:", "errors.py", "asyncpg",
         "sqlite3", "redis.exceptions")
PARAM = re.compile(r"{(\w+)(?::\w+)?}")


ROUTES = http_routes()

TEXT = st.one_of(st.text(max_size=40), st.sampled_from([
    "' OR '1'='1", "'; DROP TABLE gifts; --", "1 OR 1=1", "../../etc/passwd", "%00", "\u202egift", "🌹" * 30,
    "a" * 5000, "null", "-1", "1e309", "[]", "{}"]))
JSON_VALUE = st.recursive(st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats(allow_nan=False)
                          | TEXT, lambda c: st.lists(c, max_size=4) | st.dictionaries(TEXT, c, max_size=5),
                          max_leaves=15)
# Bodies shaped like the API's, with fields of any kind, or not JSON at all.
KNOWN_FIELDS = ["coins", "package_id", "payment_method", "idempotency_key", "title", "monthly_coins", "amount",
                "currency", "user_id", "order_id", "event_id"]
BODY = st.one_of(
    st.none(),
    st.binary(max_size=300),
    JSON_VALUE.map(lambda v: json.dumps(v).encode()),
    st.dictionaries(st.sampled_from(KNOWN_FIELDS), JSON_VALUE, max_size=6).map(lambda v: json.dumps(v).encode()),
)
AUTH = st.sampled_from(["none", "viewer", "host", "admin", "garbage", "minor"])


def auth_header(kind: str) -> dict[str, str]:
    if kind == "none":
        return {}
    if kind == "garbage":
        return {"authorization": "Bearer not.a.token"}
    if kind == "minor":
        return {"authorization": f"Bearer {token('fz-minor', birthdate='2015-01-01')}"}
    return {"authorization": f"Bearer {token('fz-' + kind, kind)}"}


@pytest.fixture(scope="module")
def live(tmp_path_factory: pytest.TempPathFactory, valkey: Any) -> Iterator[tuple[ServerProc, httpx.Client, str]]:
    import redis

    redis.Redis.from_url(valkey.url).flushall()
    server = ServerProc(tmp_path_factory.mktemp("fuzz-http") / "var", redis_url=valkey.url, env=FAST).start()
    try:
        with httpx.Client(base_url=server.base, timeout=30) as http:
            room = http.post("/v1/rooms", json={"title": "fuzz"}, headers=auth_header("host")).json()["room_id"]
            yield server, http, room
    finally:
        server.terminate()


def check(r: httpx.Response, what: str) -> None:
    assert r.status_code < 500 or (r.status_code == 503 and r.json()["code"] == "unavailable"), (what, r.text[:500])
    if r.status_code >= 400:  # (a 200 may be a page about the code: /docs names errors.py)
        for leak in LEAKS:
            assert leak not in r.text, (what, leak, r.text[:500])
        body = r.json()
        assert set(body) - {"code", "message"} <= DETAILS.get(body.get("code"), set()), (what, body)
        assert {"code", "message"} <= set(body), (what, body)
        assert body["code"] in ERR_CODES and isinstance(body["message"], str), (what, body)


@fuzz_settings(150)
@given(route=st.sampled_from(ROUTES), data=st.data())
def test_every_route_with_random_input(live: tuple[ServerProc, httpx.Client, str], route: tuple[str, str],
                                       data: st.DataObject) -> None:
    _, http, room = live
    method, template = route
    if data.draw(st.integers(0, 9)) == 0:
        method = data.draw(st.sampled_from(["GET", "POST", "PUT", "DELETE", "PATCH"]))

    def param(m: re.Match[str]) -> str:
        value = room if m.group(1) == "room_id" and data.draw(st.booleans()) else data.draw(TEXT)
        return quote(value, safe="") or "x"

    path = PARAM.sub(param, template)
    query = data.draw(st.dictionaries(TEXT, TEXT, max_size=4))
    headers = auth_header(data.draw(AUTH))
    body = data.draw(BODY)
    if body is not None:
        headers["content-type"] = data.draw(st.sampled_from(["application/json", "text/plain",
                                                            "application/x-www-form-urlencoded"]))
    r = http.request(method, path, params=query, content=body, headers=headers)
    check(r, f"{method} {path} {query} {body!r:.200}")


@pytest.mark.parametrize("method,template", ROUTES)
def test_every_route_with_a_body_past_the_limit(live: tuple[ServerProc, httpx.Client, str], method: str,
                                               template: str) -> None:
    _, http, room = live
    path = PARAM.sub(room, template)
    r = http.request(method, path, content=b"{" + b" " * (1 << 20) + b"}", headers=auth_header("viewer"))
    check(r, f"{method} {path} with 1 MiB")


def test_the_server_lived_through_it(live: tuple[ServerProc, httpx.Client, str]) -> None:
    server, http, _ = live
    assert server.running()
    assert http.get("/healthz").status_code == 200
    log = server.log.read_text()
    assert "Traceback" not in log, log[-5000:]
    assert SECRET not in log
