"""The pages a person opens, over HTTP: the landing page, /demo, /docs and /openapi.json.

What the pages do in a browser is in tests/test_browser_demo.py.
"""

from __future__ import annotations

import re
from pathlib import Path

import httpx
import pytest
from starlette.routing import Mount, Route, WebSocketRoute

from server.app import create_app
from server.settings import Settings
from server.web import docs
from tests.support import SECRET, ServerProc

pytestmark = pytest.mark.timeout(60)


def get(server: ServerProc, path: str) -> httpx.Response:
    return httpx.get(server.base + path, timeout=10)


def test_landing_links_the_demo_the_docs_and_the_api(server: ServerProc) -> None:
    r = get(server, "/")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
    for link in ('href="/demo"', 'href="/docs"', 'href="/openapi.json"'):
        assert link in r.text
    assert "default-src 'self'" in r.headers["content-security-policy"]


def test_the_demo_page_and_everything_it_loads_come_from_the_server(server: ServerProc) -> None:
    r = get(server, "/demo?room=demo&token=x")
    assert r.status_code == 200
    for hook in ("token-input", "room-input", "join", "balance", "viewers", "feed", "leaderboard", "status"):
        assert f'data-testid="{hook}"' in r.text, hook
    assets = re.findall(r'(?:src|href)="([^"#]+)"', r.text)
    assert assets and all(a.startswith("/") and not a.startswith("//") for a in assets), assets
    for asset in assets:
        assert get(server, asset).status_code == 200, asset
    assert get(server, "/static/no-such-file.js").json()["code"] == "not_found"


def test_docs_is_protocol_md_rendered(server: ServerProc) -> None:
    r = get(server, "/docs")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
    # Headings carry the anchors the page's own contents links use.
    for anchor in re.findall(r"\]\(#([a-z0-9\-_]+)\)", docs.SOURCE.read_text()):
        assert f'id="{anchor}"' in r.text, anchor
    assert "<table>" in r.text and "<code>insufficient_funds</code>" in r.text


def test_docs_escape_raw_html() -> None:
    _, body = docs.render("# T\n\n<script>alert(1)</script> and `<b>`\n")
    assert "<script>" not in body and "&lt;script&gt;" in body and "<code>&lt;b&gt;</code>" in body


def test_openapi_lists_every_http_route(server: ServerProc, redis_url: str, tmp_path: Path) -> None:
    spec = get(server, "/openapi.json").json()
    assert spec["openapi"].startswith("3.")
    app = create_app(Settings(redis_url=redis_url, secret=SECRET, data_dir=tmp_path))
    expected: set[tuple[str, str]] = set()
    for route in app.routes:
        if isinstance(route, Route):
            expected |= {(route.path, m.lower()) for m in (route.methods or {"GET"}) - {"HEAD"}}
        elif isinstance(route, WebSocketRoute):
            expected.add((route.path, "get"))
        elif isinstance(route, Mount):
            expected.add((route.path + "/{path}", "get"))
    listed = {(path, method) for path, ops in spec["paths"].items() for method in ops}
    assert expected <= listed, expected - listed
    assert ("/v1/recharges", "post") in expected and ("/openapi.json", "get") in expected
    recharge = spec["paths"]["/v1/recharges"]["post"]
    assert recharge["security"] == [{"bearer": []}]
    assert {"201", "402", "409"} <= set(recharge["responses"])
    assert recharge["requestBody"]["content"]["application/json"]["example"]["package_id"]
    room = spec["paths"]["/v1/rooms/{room_id}"]["get"]
    assert room["parameters"][0]["name"] == "room_id" and "security" not in room
