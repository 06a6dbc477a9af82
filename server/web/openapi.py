"""The OpenAPI description of the HTTP API, generated from the app's route table.

Every route of the app is listed, so a route added to server/app.py shows up by itself. What a
route table cannot say comes from docs/protocol.md, the page the tests hold to the server: the
auth and success columns of its route table, and its examples (the first request body, and the
first response of each status, per route).
"""

from __future__ import annotations

import functools
import inspect
import itertools
import json
import re
import textwrap
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from starlette.routing import BaseRoute, Mount, Route, WebSocketRoute

from server.web.docs import SOURCE

PARAM = re.compile(r"{(\w+)(?::\w+)?}")
REQUEST = re.compile(r"^(GET|POST|PUT|DELETE|PATCH) (/\S*)$")
RESPONSE = re.compile(r"^HTTP (\d{3})$")
STATUS = re.compile(r"\b([1-5]\d\d)\b")


@dataclass
class Documented:
    """What protocol.md says about one method and path."""

    auth: str = ""
    success: str = ""
    request: Any = None
    responses: dict[int, Any] = field(default_factory=dict)


def spec(routes: Sequence[BaseRoute]) -> dict[str, Any]:
    paths: dict[str, dict[str, Any]] = {}
    for method, path, summary, upgrade in _operations(routes):
        paths.setdefault(path, {})[method.lower()] = _operation(method, path, summary, upgrade)
    return {
        "openapi": "3.1.0",
        "info": {"title": "Giftstream", "version": "1",
                 "description": "Live-stream gifting: coins, live rooms over WebSocket, virtual gifts. "
                                "Every route, message and code: /docs."},
        "paths": paths,
        "components": {
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer", "bearerFormat": "JWT"}},
            "schemas": {"Error": {"type": "object", "required": ["code", "message"],
                                  "properties": {"code": {"type": "string"}, "message": {"type": "string"}}}},
        },
    }


def _operations(routes: Sequence[BaseRoute], prefix: str = "") -> Iterator[tuple[str, str, str, bool]]:
    """(method, path, summary, is a WebSocket upgrade) for every HTTP route, in table order."""
    for route in routes:
        if isinstance(route, Route):
            for method in sorted((route.methods or {"GET"}) - {"HEAD"}):
                yield method, prefix + route.path, _summary(route.endpoint), False
        elif isinstance(route, WebSocketRoute):
            yield "GET", prefix + route.path, _summary(route.endpoint), True
        elif isinstance(route, Mount):
            if route.routes:
                yield from _operations(route.routes, prefix + route.path)
            else:
                yield "GET", prefix + route.path + "/{path}", "Static files of the pages", False


def _summary(endpoint: Any) -> str:
    """The first line of the endpoint's docstring."""
    text = inspect.getdoc(endpoint) if inspect.isroutine(endpoint) else None
    return (text or "").split("\n", 1)[0].rstrip(".")


def _operation(method: str, path: str, summary: str, upgrade: bool) -> dict[str, Any]:
    doc = _documented(method, path)
    op: dict[str, Any] = {"summary": summary or f"{method} {path}"}
    notes = [f"Auth: {_plain(doc.auth)}." if doc.auth else "",
             f"Success: {_plain(doc.success)}." if doc.success else ""]
    if upgrade:
        notes.insert(0, "WebSocket upgrade (subprotocol giftstream.msgpack or giftstream.json); "
                        "the messages are in /docs.")
    if any(notes):
        op["description"] = " ".join(n for n in notes if n)
    params = [{"name": name, "in": "path", "required": True, "schema": {"type": "string"}}
              for name in PARAM.findall(path)]
    if upgrade:
        params.append({"name": "token", "in": "query", "required": True, "schema": {"type": "string"}})
    if params:
        op["parameters"] = params
    if "Bearer" in doc.auth:
        op["security"] = [{"bearer": []}]
    if method in ("POST", "PUT", "PATCH"):
        body: dict[str, Any] = {"schema": {"type": "object"}}
        if isinstance(doc.request, dict):
            body["example"] = doc.request
        op["requestBody"] = {"required": False, "content": {"application/json": body}}
    op["responses"] = _responses(doc, upgrade)
    return op


def _responses(doc: Documented, upgrade: bool) -> dict[str, Any]:
    out: dict[str, Any] = {}
    if upgrade:
        out["101"] = {"description": "Switching Protocols: the room socket"}
    for part in doc.success.split(","):
        if m := STATUS.search(part):
            out[m.group(1)] = {"description": part.replace(m.group(1), "", 1).strip() or "OK"}
    for status, example in sorted(doc.responses.items()):
        entry = out.setdefault(str(status), {"description": _describe(status, example)})
        if isinstance(example, str):
            entry["content"] = {"text/plain": {"example": example}}
        elif status >= 400:
            entry["content"] = {"application/json": {"schema": {"$ref": "#/components/schemas/Error"},
                                                     "example": example}}
        else:
            entry["content"] = {"application/json": {"example": example}}
    if not out:
        out["200"] = {"description": "OK"}
    out["default"] = {"description": "An error: {code, message} (codes in /docs)",
                      "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}}
    return out


def _plain(markdown: str) -> str:
    """A table cell without its Markdown: links become their text, code its content."""
    return re.sub(r"\[([^\]]+)\]\([^)]*\)", r"\1", markdown).replace("`", "")


def _describe(status: int, example: Any) -> str:
    if isinstance(example, dict) and isinstance(example.get("code"), str):
        return str(example["code"])
    return "OK" if status < 300 else "see /docs"


def _documented(method: str, path: str) -> Documented:
    for (m, pattern), doc in _protocol().items():
        if m == method and pattern == path:
            return doc
    found = Documented()
    matcher = re.compile("^" + PARAM.sub("[^/]+", re.escape(path).replace(r"\{", "{").replace(r"\}", "}")) + "$")
    for (m, example_path), doc in _protocol().items():
        if m == method and matcher.match(example_path):
            found.auth = found.auth or doc.auth
            found.success = found.success or doc.success
            found.request = found.request if found.request is not None else doc.request
            for status, body in doc.responses.items():
                found.responses.setdefault(status, body)
    return found


@functools.cache
def _protocol() -> dict[tuple[str, str], Documented]:
    """protocol.md by (method, path as written there): table rows and examples."""
    text = SOURCE.read_text(encoding="utf-8")
    out: dict[tuple[str, str], Documented] = {}
    for line in text.split("\n"):
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 4 and re.match(r"^(GET|POST|PUT|DELETE|PATCH)\b", cells[0]):
            path = cells[1].strip("`").split("?", 1)[0]
            doc = out.setdefault((cells[0].split()[0], path), Documented())
            doc.auth, doc.success = cells[2], cells[3]
    blocks = _blocks(text)
    for request, response in itertools.pairwise(blocks):
        m, r = REQUEST.match(request.split("\n", 1)[0]), RESPONSE.match(response.split("\n", 1)[0])
        if not (m and r):
            continue
        doc = out.setdefault((m.group(1), m.group(2)), Documented())
        _, _, body = request.partition("\n\n")
        if doc.request is None and isinstance(example := _json_or_text(body), dict):
            doc.request = example
        doc.responses.setdefault(int(r.group(1)), _json_or_text(response.partition("\n")[2]))
    return out


def _json_or_text(text: str) -> Any:
    try:
        return json.loads(text)
    except ValueError:
        return text.strip()


def _blocks(text: str) -> list[str]:
    """The page's fenced blocks, dedented (those in list items are indented)."""
    return [textwrap.dedent(b).strip() for b in re.findall(r"^[ \t]*```[^\n]*\n(.*?)^[ \t]*```[ \t]*$",
                                                           text, flags=re.M | re.S)]
