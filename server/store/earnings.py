"""A host's diamonds: earnings, by day, received gifts, holds (issue 12).

`EarningsStore` is what the rest of the server calls; `SQLiteEarnings` and `PostgresEarnings` are the
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


class EarningsStore(Protocol):
    pass


class SQLiteEarnings:
    if TYPE_CHECKING:
        async def _run(self, fn: Callable[[sqlite3.Connection], T]) -> T: ...


class PostgresEarnings:
    if TYPE_CHECKING:
        async def _get_pool(self) -> asyncpg.Pool: ...
        async def _fetch(self, sql: str, *args: Any) -> list[asyncpg.Record]: ...
        async def _fetchrow(self, sql: str, *args: Any) -> asyncpg.Record | None: ...
        async def _execute(self, sql: str, *args: Any) -> str: ...
