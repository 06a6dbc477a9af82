"""The ledger schema: versioned migrations, applied once however many processes migrate."""

from __future__ import annotations

import asyncio

import pytest

from server.store import open_store
from server.store.migrations import migrations
from server.store.sqlite import SQLiteStore
from tests.ledger import Backend

# The fixtures: backend, redis, wallet, ...
pytest_plugins = ["tests.ledger_fixtures"]
pytestmark = pytest.mark.timeout(120)


async def test_migrate_is_idempotent_and_versioned(backend: Backend) -> None:
    latest = max(v for v, _ in migrations())
    assert await backend.store.migrate() == latest  # the fixture migrated once already
    assert await backend.store.migrate() == latest
    versions = [r[0] for r in await backend.query("SELECT version FROM schema_version ORDER BY version")]
    assert versions == [v for v, _ in migrations()]
    assert (await backend.query("SELECT COUNT(*) FROM movements"))[0][0] == 0


async def test_two_processes_migrating_at_once(empty_url: str) -> None:
    """Two stores (as two processes would have) migrate one empty database at once:
    the schema is applied once and both report the latest version."""
    stores = [open_store(empty_url), open_store(empty_url)]
    try:
        # Connect one after the other: SQLite's first-connection switch to WAL can fail with
        # "database is locked" when two connections open a new file at the same instant (a
        # separate bug in sqlite.py `_connect`); this test is about the migrations themselves.
        for s in stores:
            await s.ping()
        results = await asyncio.gather(*(s.migrate() for s in stores))
        latest = max(v for v, _ in migrations())
        assert results == [latest, latest]
        check = Backend(stores[0], empty_url)
        versions = [r[0] for r in await check.query("SELECT version FROM schema_version ORDER BY version")]
        assert versions == [v for v, _ in migrations()]
    finally:
        for s in stores:
            await s.close()


TIME_COLUMNS = {("users", "created_ms"), ("orders", "created_ms"), ("orders", "updated_ms"), ("rooms", "created_ms"),
                ("rooms", "ended_ms"), ("movements", "ts_ms"), ("gifts", "sent_ms"), ("gifts", "settled_ms"),
                ("payment_events", "received_ms"), ("order_transitions", "at_ms"), ("order_transitions", "done_ms"),
                ("gift_holds", "held_ms"), ("gift_holds", "released_ms"), ("videos", "created_ms"),
                ("twofactor", "created_ms"), ("twofactor", "updated_ms"), ("twofactor", "failures_since_ms"),
                ("withdrawals", "created_ms"), ("withdrawals", "updated_ms"), ("withdrawal_transitions", "at_ms"),
                ("payout_events", "received_ms")}


async def test_every_time_is_integer_milliseconds_and_settled_tables_have_no_secondary_index(
        backend: Backend) -> None:
    if isinstance(backend.store, SQLiteStore):
        tables = [r[0] for r in await backend.query("SELECT name FROM sqlite_master WHERE type = 'table'")]
        columns = {(t, str(c[1]), str(c[2]).lower()) for t in tables
                   for c in await backend.query(f"PRAGMA table_info({t})")}
        indexes = {(r[0], r[1]) for r in await backend.query(
            "SELECT name, tbl_name FROM sqlite_master WHERE type = 'index' AND sql IS NOT NULL")}
    else:
        columns = {(str(r[0]), str(r[1]), str(r[2])) for r in await backend.query(
            "SELECT table_name, column_name, data_type FROM information_schema.columns"
            " WHERE table_schema = 'public'")}
        indexes = {(r[0], r[1]) for r in await backend.query(
            "SELECT indexname, tablename FROM pg_indexes WHERE schemaname = 'public' AND indexname NOT LIKE '%_pkey'"
            " AND indexname NOT LIKE '%_key'")}
    times = {(t, c): kind for t, c, kind in columns if c.endswith(("_ms", "_at"))}
    # Every time column, whichever migration added it, is integer ms; the first ones are named.
    assert set(times) >= TIME_COLUMNS
    assert {c: kind for c, kind in times.items() if kind != "bigint"} == {}
    # Settlement writes movements, gifts and ledger rows by the hundred thousand: no index but
    # their keys (the comment in sql/0001_init.sql gives the figures), and the one a user's
    # statement reads (GET /v1/wallet/transactions, sql/0003_wallet.sql), a host's received gifts
    # and a room's summary read (sql/0004_creators.sql: both grow at the right edge of their key).
    # host_days, upserted per (host, day) by every batch, has its key alone (sql/0005_earnings.sql).
    settled = {name for name, table in indexes
               if table in ("movements", "gifts", "ledger", "host_earnings", "host_days")}
    assert settled == {"movements_user_seq", "gifts_host_sent", "gifts_room_sent"}
    assert {("orders_status", "orders"), ("rooms_host", "rooms"), ("gift_holds_order", "gift_holds")} <= indexes
    # A host's withdrawals by time: the list and the UTC day's total (sql/0006_withdrawals.sql).
    assert ("withdrawals_host_created", "withdrawals") in indexes
    # One live room per host, the LIVE-now list and sweep, the recently ended (sql/0007_sessions.sql).
    assert {("rooms_one_live", "rooms"), ("rooms_live", "rooms"), ("rooms_ended", "rooms")} <= indexes


async def test_a_schema_past_every_migration_is_refused_not_used(backend: Backend) -> None:
    """A ledger from newer code is not taken for this one."""
    latest = max(v for v, _ in migrations())
    await backend.query(f"INSERT INTO schema_version (version) VALUES ({latest + 1})")
    with pytest.raises(RuntimeError, match=f"version {latest + 1}"):
        await backend.store.migrate()


async def test_a_pre_release_ledger_is_refused_not_used(empty_url: str) -> None:
    """0.1.0's ledger is at schema version 2 too (float-second times), without this code's
    payments tables: refused, and nothing applied to it."""
    store = open_store(empty_url)
    try:
        check = Backend(store, empty_url)
        await check.query("CREATE TABLE schema_version (version INTEGER PRIMARY KEY)")
        await check.query("INSERT INTO schema_version (version) VALUES (1)")
        await check.query("INSERT INTO schema_version (version) VALUES (2)")
        with pytest.raises(RuntimeError, match="version 2"):
            await store.migrate()
        assert [r[0] for r in await check.query("SELECT version FROM schema_version ORDER BY version")] == [1, 2]
    finally:
        await store.close()
