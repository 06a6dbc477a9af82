"""Fixtures of the durable store's tests: a migrated store of each backend, and the real Lua
scripts on the session valkey. Load with `pytest_plugins = ["tests.ledger_fixtures"]`.

PostgreSQL runs when GIFTSTREAM_TEST_DATABASE_URL is set; each test gets a database of its
own, created on that server and dropped after.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import pytest
from redis.asyncio import Redis

from server.batcher import ScriptBatcher
from server.scripts import Scripts
from server.settings import Settings
from server.settlement.settler import ensure_groups
from server.store import open_store
from server.wallet.service import Wallet
from tests.conftest import PG_ENV
from tests.ledger import PARTITIONS, Backend


def _with_database(url: str, name: str) -> str:
    parts = urlsplit(url)
    return urlunsplit(parts._replace(path="/" + name))


@pytest.fixture
async def pg_database() -> AsyncIterator[str]:
    """A fresh, empty PostgreSQL database for this test, dropped after it."""
    admin_url = os.environ.get(PG_ENV)
    if not admin_url:
        pytest.skip(f"PostgreSQL tests need {PG_ENV} (e.g. postgresql://postgres@127.0.0.1:5432/test)")
    name = "gs_" + uuid.uuid4().hex[:16]
    admin = await asyncpg.connect(admin_url)
    try:
        await admin.execute(f'CREATE DATABASE "{name}"')
        yield _with_database(admin_url, name)
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        await admin.close()


@pytest.fixture(params=["sqlite", "postgres"])
def empty_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """The URL of an empty database of each backend."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'ledger.sqlite3'}"
    return str(request.getfixturevalue("pg_database"))


@pytest.fixture
async def backend(empty_url: str) -> AsyncIterator[Backend]:
    store = open_store(empty_url)
    await store.migrate()
    yield Backend(store, empty_url)
    await store.close()


@pytest.fixture
async def redis(redis_url: str) -> AsyncIterator[Redis]:
    client = Redis.from_url(redis_url, decode_responses=True)
    yield client
    await client.aclose()


@pytest.fixture
async def wallet(redis: Redis) -> Wallet:
    scripts = Scripts()
    await scripts.load(redis)
    await ensure_groups(redis, PARTITIONS)
    return Wallet(redis, ScriptBatcher(redis, scripts), Settings(partitions=PARTITIONS))
