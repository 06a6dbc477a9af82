"""PostgreSQL unreachable for 10 s mid-storm (a TCP proxy between `serve` and the shared
database is cut: the service itself is never stopped). Gifts keep being acknowledged from
Redis; the settler backs off and settles everything once the database is back."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.faults.harness import assert_nothing_lost, run_faults

pytestmark = pytest.mark.timeout(160)


def test_database_cut_for_10_s_mid_storm(tmp_path: Path, pg_database_url: str) -> None:
    report = run_faults(tmp_path, "--database-url", pg_database_url, "--faults", "database_cut", "--count", "1",
                        "--cut-s", "10", "--duration", "13")
    assert_nothing_lost(report, 1)
    # Acks went on through the cut: every whole second inside it has acks (t counts from the
    # storm's start; the first fault is due --lead-s, 1 s, after it).
    [fault] = report["faults"]["log"]
    cut_from = 1 + fault["at_s"]
    acks = {s["t"]: s["acks"] for s in report["series"]["acks"]}
    inside = range(int(cut_from) + 1, int(cut_from + 10))
    assert all(acks.get(t, 0) > 0 for t in inside), (fault, acks)
