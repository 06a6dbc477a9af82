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


def check_known(current: int) -> None:
    """Refuse a database whose schema is past every migration this code has: a pre-release ledger
    (0.1.0's migration 0002, float-second times) or one from newer code. Nothing is applied to it."""
    latest = max(version for version, _ in migrations())
    if current > latest:
        raise RuntimeError(f"the database's schema is at version {current}, past this code's {latest}: a "
                           "pre-release ledger (start a new one) or one written by a newer giftstream")
