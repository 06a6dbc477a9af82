"""A small join storm against a real `giftstream serve`: the counting, not the speed.

Viewers from two client processes, each on its own 127.0.0.x source address, join one room;
then a few gifts: every socket must report every acked gift exactly once.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.support import ROOT, SECRET, ServerProc


@pytest.mark.timeout(90)
def test_a_join_storm_counts_every_delivery(tmp_path: Path, make_server: Callable[..., ServerProc],
                                            redis_url: str) -> None:
    server = make_server(redis_url=redis_url).start()
    assert server.proc is not None
    out = tmp_path / "joins.json"
    cmd = [sys.executable, "-m", "loadtests.joinstorm", "--target", server.base, "--secret", SECRET,
           "--server-pid", str(server.proc.pid), "--viewers", "120", "--processes", "2", "--join-rate", "400",
           "--gift-rate", "10", "--duration", "1.5", "--report", str(out), "--quiet"]
    run = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=80)
    assert out.exists(), run.stderr[-3000:]
    report = json.loads(out.read_text())
    joins, gifts = report["joins"], report["gifts"]
    assert joins["joined"] == joins["requested"] == 120, joins
    assert joins["gateway_cpu_ms_per_join"] > 0 and joins["gateway_rss_mib_joined"] > 0
    assert gifts["acked"] == gifts["sent"] == 15
    assert gifts["sockets"] == gifts["sockets_exact"] == 120
    assert gifts["deliveries"] == gifts["expected_deliveries"] == 15 * 120
    assert gifts["delivery_latency"]["n"] == 15 * 120
    assert run.returncode == 0
