"""Versioned schema migrations, shared by every backend: sql/NNNN_name.sql, applied in order."""

from __future__ import annotations

from importlib import resources


def migrations() -> list[tuple[int, str]]:
    folder = resources.files("server.store").joinpath("sql")
    out = []
    for entry in folder.iterdir():
        if entry.name.endswith(".sql"):
            out.append((int(entry.name.split("_", 1)[0]), entry.read_text()))
    if not out:
        raise RuntimeError("no schema migrations found in the package (server/store/sql/*.sql)")
    return sorted(out)


def statements(script: str) -> list[str]:
    """Split a migration into statements (no semicolons inside our statements)."""
    lines = [line for line in script.splitlines() if not line.strip().startswith("--")]
    return [s.strip() for s in "\n".join(lines).split(";") if s.strip()]


# 0.1.0 (pre-release) numbered its float-second migration 2 too: a ledger at version 2 or past it
# without this table (made by this code's migration 2) is that one, not ours.
MARK_TABLE = "order_transitions"


def check_known(current: int, tables: set[str] | None = None) -> None:
    """Refuse a database whose schema is past every migration this code has (one from newer
    code), or a pre-release ledger (0.1.0's migration 0002, float-second times), told by its
    version and the missing MARK_TABLE. Nothing is applied to it."""
    latest = max(version for version, _ in migrations())
    if current > latest or (current >= 2 and tables is not None and MARK_TABLE not in tables):
        raise RuntimeError(f"the database's schema is at version {current}, past this code's {latest} or not "
                           "its own: a pre-release ledger (start a new one) or one written by a newer giftstream")
