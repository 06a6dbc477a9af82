"""docs/protocol.md rendered to HTML for /docs.

The package holds the page as `server/web/protocol.md`, a link to docs/protocol.md in the
repository (a built wheel carries the file itself), so the page served is the one the tests
check (tests/test_protocol_doc.py). Raw HTML in the Markdown is not passed through.
"""

from __future__ import annotations

import functools
import html
import re
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from markdown_it.token import Token

SOURCE = Path(__file__).resolve().parent / "protocol.md"

_PAGE = """<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{title} · Giftstream</title>
<link rel="stylesheet" href="/static/site.css">
</head>
<body class="doc">
<header class="topbar"><a class="brand" href="/"><span class="brand-mark">◆</span> Giftstream</a>
<nav><a href="/demo">Live demo</a><a href="/docs" aria-current="page">Protocol</a>
<a href="/openapi.json">OpenAPI</a></nav></header>
<main class="prose">
{body}
</main>
</body>
</html>
"""


def slug(text: str) -> str:
    """A heading's anchor, as GitHub makes it, so the page's own `#links` work."""
    return re.sub(r"[^\w\- ]", "", text.strip().lower()).replace(" ", "-")


def _anchor_headings(tokens: list[Token]) -> None:
    seen: dict[str, int] = {}
    for i, tok in enumerate(tokens):
        if tok.type != "heading_open" or i + 1 >= len(tokens):
            continue
        text = "".join(c.content for c in tokens[i + 1].children or [] if c.type in ("text", "code_inline"))
        base = slug(text)
        n = seen.get(base, 0)
        seen[base] = n + 1
        tok.attrSet("id", base if n == 0 else f"{base}-{n}")


def render(markdown: str) -> tuple[str, str]:
    """(title, HTML body) of a Markdown page: CommonMark with tables, raw HTML escaped."""
    # Imported here, not at the top: a server without it still serves every other route.
    from markdown_it import MarkdownIt

    md = MarkdownIt("commonmark", {"html": False}).enable("table")
    env: dict[str, object] = {}
    tokens = md.parse(markdown, env)
    _anchor_headings(tokens)
    title = next((tokens[i + 1].content for i, t in enumerate(tokens) if t.type == "heading_open"), "Giftstream")
    return title, md.renderer.render(tokens, md.options, env)


@functools.cache
def protocol_html() -> str:
    title, body = render(SOURCE.read_text(encoding="utf-8"))
    return _PAGE.format(title=html.escape(title), body=body)
