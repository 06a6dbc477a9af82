"""Latency histograms with 1% resolution, mergeable across processes; numpy when present.

Bins are logarithmic from 10 us: bin b holds [10us * 1.01**b, 10us * 1.01**(b+1)). That keeps a
percentile within 1% of the truth at any scale while a histogram stays a short list of counts,
cheap to ship from a worker. Values at or below the floor (including small negative ones, when
two processes' reads race) land in bin 0.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from typing import Any

try:
    import numpy as np
except ImportError:  # the storm runs without numpy, only slower on big runs
    np = None  # type: ignore[assignment]

__all__ = ["NBINS", "Hist", "bin_of", "bins_of", "np", "percentile", "value_of"]

FLOOR_MS = 0.01
STEP = 1.01
NBINS = 2200  # up to about 10**7.5 ms
_LOG_STEP = math.log(STEP)


def bin_of(ms: float) -> int:
    if ms <= FLOOR_MS:
        return 0
    return min(NBINS - 1, int(math.log(ms / FLOOR_MS) / _LOG_STEP))


def bins_of(ms: Any) -> Any:
    """numpy array of ms -> array of bin indexes."""
    clipped = np.maximum(ms, FLOOR_MS)
    return np.minimum(NBINS - 1, (np.log(clipped / FLOOR_MS) / _LOG_STEP).astype(np.int64))


def value_of(b: int) -> float:
    """A representative value of bin b (its geometric middle)."""
    return 0.0 if b == 0 else FLOOR_MS * STEP ** (b + 0.5)


class Hist:
    __slots__ = ("counts", "n", "total", "max", "negative")

    def __init__(self) -> None:
        self.counts = [0] * NBINS
        self.n = 0
        self.total = 0.0
        self.max = 0.0
        self.negative = 0

    def add(self, ms: float, weight: int = 1) -> None:
        self.counts[bin_of(ms)] += weight
        self.n += weight
        self.total += ms * weight
        if ms > self.max:
            self.max = ms
        if ms < 0:
            self.negative += weight

    def add_many(self, values: Iterable[float] | Any) -> None:
        if np is not None and isinstance(values, np.ndarray):
            if not values.size:
                return
            counts = np.bincount(bins_of(values), minlength=NBINS)
            for b in np.nonzero(counts)[0]:
                self.counts[int(b)] += int(counts[b])
            self.n += int(values.size)
            self.total += float(values.sum())
            self.max = max(self.max, float(values.max()))
            self.negative += int((values < 0).sum())
            return
        for v in values:
            self.add(v)

    def merge(self, other: Hist) -> Hist:
        for b, c in enumerate(other.counts):
            if c:
                self.counts[b] += c
        self.n += other.n
        self.total += other.total
        self.max = max(self.max, other.max)
        self.negative += other.negative
        return self

    def percentile(self, q: float) -> float | None:
        if not self.n:
            return None
        rank = q / 100.0 * self.n
        seen = 0
        for b, c in enumerate(self.counts):
            seen += c
            if seen >= rank and c:
                return min(value_of(b), self.max) if b else 0.0
        return self.max

    def summary(self) -> dict[str, float | int | None]:
        def r(v: float | None) -> float | None:
            return None if v is None else round(v, 2)

        return {"n": self.n, "p50_ms": r(self.percentile(50)), "p95_ms": r(self.percentile(95)),
                "p99_ms": r(self.percentile(99)), "p999_ms": r(self.percentile(99.9)),
                "max_ms": r(self.max) if self.n else None,
                "mean_ms": r(self.total / self.n) if self.n else None, "negative": self.negative}

    # shipping between processes: sparse {bin: count}
    def dump(self) -> dict[str, Any]:
        return {"bins": {b: c for b, c in enumerate(self.counts) if c}, "n": self.n, "total": self.total,
                "max": self.max, "negative": self.negative}

    @classmethod
    def load(cls, raw: dict[str, Any]) -> Hist:
        h = cls()
        for b, c in raw["bins"].items():
            h.counts[int(b)] = c
        h.n, h.total, h.max, h.negative = raw["n"], raw["total"], raw["max"], raw["negative"]
        return h


def percentile(values: Sequence[float], q: float) -> float | None:
    """Exact percentile (nearest rank) of a small sample, e.g. settlement-lag polls."""
    if not values:
        return None
    ordered = sorted(values)
    k = max(0, min(len(ordered) - 1, math.ceil(q / 100.0 * len(ordered)) - 1))
    return ordered[k]
