"""The scale-out benchmark's CPU accounting: what it divides by gifts must be each process's own
CPU over the gifting window, and its headline the highest rate that kept the bound."""

from __future__ import annotations

import subprocess
import sys
import time

from loadtests.scaleout import MACHINE, CpuClock, cpu_at, headline, marginal_fit, per_gift_us, window_cpu


def test_cpu_at_interpolates_between_samples_and_holds_at_the_ends() -> None:
    samples = [(10.0, 1.0), (11.0, 1.5), (12.0, 3.5)]
    assert cpu_at(samples, 9.0) == 1.0
    assert cpu_at(samples, 10.5) == 1.25
    assert cpu_at(samples, 11.5) == 2.5
    assert cpu_at(samples, 13.0) == 3.5
    assert cpu_at([], 1.0) == 0.0


def test_window_cpu_sums_the_generators_and_keeps_each_other_process() -> None:
    series = {
        "gateway1": [(0.0, 0.0), (10.0, 5.0)],
        "valkey:7000": [(0.0, 1.0), (10.0, 3.0)],
        "generator:11": [(0.0, 0.0), (10.0, 1.0)],
        "generator:12": [(5.0, 0.0), (10.0, 2.0)],  # started inside the window
        MACHINE: [(0.0, 0.0), (10.0, 15.0)],
    }
    cpu = window_cpu(series, 2.0, 8.0)
    assert cpu["gateway1"] == 3.0
    assert round(cpu["valkey:7000"], 6) == 1.2
    assert round(cpu["generator"], 6) == round(0.6 + 1.2, 6)
    per = per_gift_us(cpu, 1000)
    assert per["gateway1"] == 3000.0
    assert MACHINE not in per
    assert per["total"] == round((3.0 + 1.2 + 1.8) / 1000 * 1e6, 1)
    assert per_gift_us(cpu, 0) == {}


def test_marginal_fit_recovers_the_cost_of_one_more_gift_and_the_idle_floor() -> None:
    # 0.05 cores at rest, 60 us a gift.
    points = [(r, 0.05 + r * 60e-6) for r in (1000.0, 3000.0, 6000.0)]
    assert marginal_fit(points) == {"us_per_gift": 60.0, "cores_at_zero": 0.05}
    assert marginal_fit(points[:1]) is None


def test_headline_is_the_highest_rate_under_the_bound_with_an_ok_verdict() -> None:
    def row(rate: float, p99: float, verdict: str = "ok") -> dict[str, object]:
        return {"offered_per_s": rate, "acked_per_s": rate, "ack_p50_ms": 1.0, "ack_p99_ms": p99,
                "verdict": verdict, "cpu_us_per_gift": {"total": 100.0}}

    rows = [row(1000, 20), row(2000, 45), row(3000, 30, "fail"), row(4000, 80)]
    best = headline(rows, 50.0)  # type: ignore[arg-type]
    assert best is not None and best["offered_per_s"] == 2000
    assert headline([row(1000, 60)], 50.0) is None  # type: ignore[list-item]


def test_cpu_clock_reads_a_named_process_and_counts_unnamed_children_as_the_generator() -> None:
    spin = "import time\nt = time.process_time()\nwhile time.process_time() - t < 1.0: pass\n"
    named = subprocess.Popen([sys.executable, "-c", spin])
    other = subprocess.Popen([sys.executable, "-c", spin])
    try:
        start = time.time()
        with CpuClock({"busy": named.pid}) as clock:
            named.wait(30)
            other.wait(30)
        cpu = window_cpu(clock.series, start, time.time())
    finally:
        named.kill()
        other.kill()
    # Each child spins 1 s of CPU; the clock's first sample may see it late on a busy machine
    # (up to half of it), and neither is counted twice.
    assert 0.5 <= cpu["busy"] < 1.5
    assert 0.5 <= cpu["generator"] < 1.5
    assert cpu[MACHINE] >= cpu["busy"]
