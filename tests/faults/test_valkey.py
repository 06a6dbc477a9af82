"""Valkey killed (-9) mid-storm: the embedded one must be brought back by `serve` (it owns the
process); an external one is restarted from its AOF on its port. Clients retry with the same
ids: each gift is charged once, and nothing acknowledged is lost (appendfsync always)."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.faults.harness import assert_nothing_lost, run_faults

pytestmark = pytest.mark.timeout(160)


def test_embedded_valkey_kill9_mid_storm(tmp_path: Path) -> None:
    report = run_faults(tmp_path, "--faults", "valkey_kill9", "--count", "1", "--duration", "8")
    assert_nothing_lost(report, 1)
    [fault] = report["faults"]["log"]
    assert fault["new_pid"] != fault["pid"], fault


def test_external_valkey_kill9_restarted_from_its_aof(tmp_path: Path) -> None:
    report = run_faults(tmp_path, "--valkey", "external", "--faults", "valkey_kill9", "--count", "1",
                        "--duration", "6")
    assert_nothing_lost(report, 1)
    [fault] = report["faults"]["log"]
    assert fault["new_pid"] != fault["pid"], fault
