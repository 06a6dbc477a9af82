"""Fixtures: a session valkey from the wheel, servers per test, cleaned up after."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import TypedDict, Unpack

import pytest
import redis

from server.devcluster import LocalCluster
from tests.support import Api, ServerProc, ValkeyProc, token

# PostgreSQL tests read their URL from here and skip when it is unset (.ci/run sets it).
PG_ENV = "GIFTSTREAM_TEST_DATABASE_URL"


class TokenClaims(TypedDict, total=False):
    """The optional keywords of `tests.support.token`, so `api(...)` can pass them through typed."""

    name: str | None
    birthdate: str
    ttl_s: int


@pytest.fixture(scope="session")
def valkey(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ValkeyProc]:
    proc = ValkeyProc(tmp_path_factory.mktemp("valkey"))
    yield proc
    proc.stop()


@pytest.fixture(scope="session")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalCluster]:
    """A local Valkey Cluster for the session: 3 primaries with a replica each (server/devcluster.py,
    as `giftstream dev-cluster` runs it)."""
    from server import devcluster

    local = devcluster.start(tmp_path_factory.mktemp("cluster"), primaries=3, replicas=1)
    yield local
    local.stop()


@pytest.fixture
def redis_url(valkey: ValkeyProc) -> str:
    """The session valkey, flushed for this test."""
    redis.Redis.from_url(valkey.url).flushall()
    return valkey.url


@pytest.fixture
def pg_url() -> str:
    url = os.environ.get(PG_ENV)
    if not url:
        pytest.skip(f"PostgreSQL tests need {PG_ENV} (e.g. postgresql://postgres@127.0.0.1:5432/test)")
    return url


@pytest.fixture
def make_server(tmp_path: Path) -> Iterator[Callable[..., ServerProc]]:
    servers: list[ServerProc] = []

    def make(data_dir: Path | None = None, **kwargs: object) -> ServerProc:
        server = ServerProc(data_dir or tmp_path / "var", **kwargs)  # type: ignore[arg-type]
        servers.append(server)
        return server

    yield make
    for server in servers:
        if server.running():
            server.terminate()


@pytest.fixture
def server(make_server: Callable[..., ServerProc], redis_url: str) -> ServerProc:
    """One `giftstream serve` on the session valkey and a fresh SQLite file."""
    return make_server(redis_url=redis_url).start()


@pytest.fixture
async def api(server: ServerProc) -> AsyncIterator[Callable[..., Api]]:
    clients: list[Api] = []

    def make(user_id: str, role: str = "viewer", **kw: Unpack[TokenClaims]) -> Api:
        client = Api(server, token(user_id, role, **kw))
        clients.append(client)
        return client

    yield make
    for c in clients:
        await c.close()


@pytest.fixture(params=["sqlite", "postgres"])
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """A fresh, empty ledger database of each backend (PostgreSQL: a new database per test)."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'ledger.sqlite3'}"
        return
    yield from _fresh_pg_database()


@pytest.fixture
def pg_database_url() -> Iterator[str]:
    """A fresh, empty PostgreSQL database, for what only a server database can show (outages)."""
    yield from _fresh_pg_database()


def _fresh_pg_database() -> Iterator[str]:
    admin = os.environ.get(PG_ENV)
    if not admin:
        pytest.skip(f"PostgreSQL tests need {PG_ENV} (e.g. postgresql://postgres@127.0.0.1:5432/test)")
    import asyncio
    import uuid

    import asyncpg

    name = "gs_" + uuid.uuid4().hex[:12]

    async def admin_exec(sql: str) -> None:
        conn = await asyncpg.connect(admin)
        try:
            await conn.execute(sql)
        finally:
            await conn.close()

    asyncio.run(admin_exec(f"CREATE DATABASE {name}"))
    base, _, _ = admin.rpartition("/")
    yield f"{base}/{name}"
    asyncio.run(admin_exec(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
