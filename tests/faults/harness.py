"""One fault scenario: `python -m loadtests.faults` (a real server, a real storm, real faults) and
what its report must say for the scenario to pass."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

from tests.support import ROOT

# Small enough for CI on 2 cores: 2 rooms of 4 viewers, 3 gifters, 60 gifts/s for 5 s.
SMALL = ["--rooms", "2", "--viewers-per-room", "4", "--gifters", "3", "--rate", "60", "--duration", "5"]


def run_faults(tmp_path: Path, *args: str, timeout: float = 150) -> dict[str, Any]:
    """Runs one scenario and returns its report, with the run's stderr under `stderr`."""
    out = tmp_path / "faults.json"
    cmd = [sys.executable, "-m", "loadtests.faults", "--report", str(out), "--quiet", *SMALL, *args]
    run = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    assert out.exists(), run.stdout[-2000:] + run.stderr[-3000:]
    report: dict[str, Any] = json.loads(out.read_text())
    report["stderr"] = run.stderr[-3000:]
    report["exit"] = run.returncode
    return report


def assert_nothing_lost(report: dict[str, Any], injected: int) -> None:
    """The storm verdict, spelled out: every fault injected and recovered from; every gift acked,
    settled exactly once, under the id it was acked with; no refused gift charged; every socket
    saw every gift of its room once (directly or by resume); `giftstream audit` passed."""
    assert report["verdict"] == "ok" and report["exit"] == 0, (report["failures"], report["stderr"])
    faults = report["faults"]
    assert faults["injected"] == injected, faults["log"]
    assert not [f for f in faults["log"] if "error" in f], faults["log"]
    gifts = report["gifts"]
    assert gifts["acked"] == gifts["sent"] > 0 and not gifts["unacked"], gifts
    assert not gifts["conflict_count"], gifts["conflicts"]
    settlement = report["settlement"]
    assert settlement["checked"] and settlement["drained"], settlement
    assert settlement["missing"] == settlement["double_charged"] == settlement["client_mismatch"] == 0, settlement
    assert not settlement.get("settled_unacked"), settlement  # a refused gift was never charged
    counts = report["deliveries"]["counts"]
    assert counts["missing_events"] == 0 and counts.get("duplicate_events", 0) == 0, counts
    assert report["audit"]["ok"], report["audit"]
