"""A gateway killed (-9) or stopped (SIGTERM) mid-storm, then started again on its data dir:
nothing acknowledged is lost or doubled, and the viewers resume where they were."""

from __future__ import annotations

import signal
from pathlib import Path

import pytest

from tests.faults.harness import assert_nothing_lost, run_faults

pytestmark = pytest.mark.timeout(160)


def test_gateway_kill9_mid_storm(tmp_path: Path) -> None:
    report = run_faults(tmp_path, "--faults", "gateway_kill9", "--count", "1")
    assert_nothing_lost(report, 1)
    # Every socket was cut by the kill: the gifters' and the viewers' reconnects are the test.
    assert report["deliveries"]["reconnects"] >= report["connections"]["connected"], report["deliveries"]


def test_gateway_sigterm_drains_mid_storm(tmp_path: Path) -> None:
    report = run_faults(tmp_path, "--faults", "gateway_sigterm", "--count", "1")
    assert_nothing_lost(report, 1)
    [fault] = report["faults"]["log"]
    assert fault["exit"] in (0, -signal.SIGTERM), fault
    # The drain closes sockets with 1001 "server restarting"; the storm's members reconnected.
    assert report["deliveries"]["close_codes"].get("1001", 0) >= 1, report["deliveries"]["close_codes"]
