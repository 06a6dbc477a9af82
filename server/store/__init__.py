"""Durable store: SQL ledger of users, orders, rooms, gifts, movements and host earnings."""

from __future__ import annotations

from pathlib import Path

from server.store.base import Store


def open_store(url: str) -> Store:
    """`sqlite:///path` or `postgresql://...`."""
    if url.startswith("sqlite:///"):
        from server.store.sqlite import SQLiteStore

        return SQLiteStore(Path(url[len("sqlite:///") :]))
    if url.startswith(("postgresql://", "postgres://")):
        from server.store.postgres import PostgresStore

        return PostgresStore(url)
    raise ValueError("database URL must start with sqlite:/// or postgresql://")
