"""Videos and the gifts sent on them (issue 12).

`VideosStore` is what the rest of the server calls; `SQLiteVideos` and `PostgresVideos` are the
two backends' halves, mixed into SQLiteStore and PostgresStore (which give them `_run`, and
`_get_pool`/`_fetch`/`_fetchrow`/`_execute`).
"""

from __future__ import annotations

import sqlite3
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

if TYPE_CHECKING:
    import asyncpg

T = TypeVar("T")


class VideosStore(Protocol):
    pass


class SQLiteVideos:
    if TYPE_CHECKING:
        async def _run(self, fn: Callable[[sqlite3.Connection], T]) -> T: ...


class PostgresVideos:
    if TYPE_CHECKING:
        async def _get_pool(self) -> asyncpg.Pool: ...
        async def _fetch(self, sql: str, *args: Any) -> list[asyncpg.Record]: ...
        async def _fetchrow(self, sql: str, *args: Any) -> asyncpg.Record | None: ...
        async def _execute(self, sql: str, *args: Any) -> str: ...
