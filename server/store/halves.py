"""What a feature's store halves use of the backend they are mixed into.

A feature (earnings, withdrawals, sessions, videos) keeps its SQL beside a Protocol, in a SQLite
half and a PostgreSQL half; `SQLiteStore` and `PostgresStore` inherit the halves. The halves
call the backend's own connection helpers, declared here once for the type checker: at run time
these bases are empty.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, TypeVar

if TYPE_CHECKING:
    import asyncpg

T = TypeVar("T")


class SQLiteHalf:
    if TYPE_CHECKING:
        async def _run(self, fn: Callable[[sqlite3.Connection], T]) -> T: ...


class PostgresHalf:
    if TYPE_CHECKING:
        async def _get_pool(self) -> asyncpg.Pool: ...
        async def _fetch(self, sql: str, *args: Any) -> list[asyncpg.Record]: ...
        async def _fetchrow(self, sql: str, *args: Any) -> asyncpg.Record | None: ...
        async def _execute(self, sql: str, *args: Any) -> str: ...
