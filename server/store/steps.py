"""A decision made in one transaction, written once for both backends as a generator of SQL.

The generator yields (sql, args) with `?` placeholders, is sent back each statement's rows as
tuples, and returns its result. Each backend runs it in its own transaction with its own driver:
SQLite's synchronous connection on its thread (`run`), or an asyncpg connection (`run_async`,
which numbers the placeholders). store/holds.py and store/withdrawals.py decide this way, so
both backends hold exactly the same rule.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Generator, Iterable
from typing import Any, TypeVar

R = TypeVar("R")
Row = tuple[Any, ...]
Step = tuple[str, tuple[Any, ...]]
Steps = Generator[Step, list[Row], R]


def run(steps: Steps[R], execute: Callable[[str, tuple[Any, ...]], Iterable[Any]]) -> R:
    """Drive `steps` to its result with a synchronous `execute(sql, args)` that gives rows."""
    try:
        sql, args = next(steps)
        while True:
            sql, args = steps.send([tuple(r) for r in execute(sql, args)])
    except StopIteration as done:
        return done.value  # type: ignore[no-any-return]


async def run_async(steps: Steps[R], fetch: Callable[[str, tuple[Any, ...]], Awaitable[Iterable[Any]]]) -> R:
    """The same with an awaited `fetch(sql, args)` (asyncpg's `conn.fetch`, its placeholders
    numbered by the caller)."""
    try:
        sql, args = next(steps)
        while True:
            sql, args = steps.send([tuple(r) for r in await fetch(sql, args)])
    except StopIteration as done:
        return done.value  # type: ignore[no-any-return]
