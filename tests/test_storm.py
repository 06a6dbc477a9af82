"""A short gift storm against a real `giftstream serve`: the verdict, not the speed.

Two rooms of 20 viewers, a few gifters; every acked gift must be settled exactly once, every
socket must see every gift of its room exactly once, and `giftstream audit` must pass.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from loadtests.report import KEYS
from tests.support import ROOT, SECRET, ServerProc


@pytest.mark.timeout(90)
def test_storm_against_a_started_server(tmp_path: Path, make_server: object, redis_url: str) -> None:
    server: ServerProc = make_server(redis_url=redis_url).start()  # type: ignore[operator]
    assert server.proc is not None
    out = tmp_path / "storm.json"
    cmd = [sys.executable, "-m", "loadtests.storm", "--target", server.base, "--secret", SECRET,
           "--data-dir", str(server.data_dir), "--redis-url", redis_url, "--server-pid", str(server.proc.pid),
           "--rooms", "2", "--viewers-per-room", "20", "--gifters", "4", "--rate", "60", "--duration", "3",
           "--processes", "2", "--report", str(out), "--quiet"]
    run = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=80)
    assert out.exists(), run.stderr[-3000:]
    report = json.loads(out.read_text())
    assert set(KEYS) <= set(report)
    assert report["verdict"] == "ok", (report["failures"], run.stderr[-3000:])
    assert run.returncode == 0
    assert report["failures"] == []
    assert report["gifts"]["acked"] == report["gifts"]["sent"] > 0
    assert report["settlement"]["checked"] and report["settlement"]["missing"] == 0
    assert report["audit"]["ok"]
    # every one of the 44 sockets (40 viewers + 4 gifters) saw every gift of its room
    assert report["connections"]["connected"] == 44
    assert report["deliveries"]["counts"]["missing_events"] == 0
    assert report["deliveries"]["vs_ack"]["n"] == report["gifts"]["acked"] * 22
    assert report["ack_p99_ms"] is not None and report["rss_per_conn_kib"] is not None


@pytest.mark.timeout(90)
def test_storm_starts_its_own_server(tmp_path: Path) -> None:
    out = tmp_path / "storm.json"
    cmd = [sys.executable, "-m", "loadtests.storm", "--rooms", "2", "--viewers-per-room", "20", "--gifters", "3",
           "--rate", "40", "--duration", "2", "--stall-viewers", "1", "--stall-after", "0.5",
           "--report", str(out), "--quiet"]
    run = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=80)
    report = json.loads(out.read_text())
    assert report["verdict"] == "ok", (report["failures"], run.stderr[-3000:])
    assert run.returncode == 0
    # the stalled viewer is left out of the exactly-once check, and reported on its own
    assert len(report["deliveries"]["stalled"]) == 1
    assert report["deliveries"]["counts"]["members_checked"] == 42
    # what a gift cost each process of the machine while gifting, in microseconds of CPU
    per_gift = report["cpu_us_per_gift"]
    assert {"server", "valkey", "worker0", "total"} <= set(per_gift), per_gift
    assert all(v > 0 for v in per_gift.values()), per_gift
    assert per_gift["total"] == pytest.approx(sum(v for k, v in per_gift.items() if k != "total"), abs=0.5)
