"""Token buckets: `rate` per second, bursts up to `burst`; one per connection (gifts, resumes,
pings), or one per user (`Buckets`: gifts on videos)."""

from __future__ import annotations

import time


class TokenBucket:
    __slots__ = ("rate", "burst", "tokens", "stamp")

    def __init__(self, rate: float, burst: int) -> None:
        self.rate = rate
        self.burst = float(burst)
        self.tokens = float(burst)
        self.stamp = time.monotonic()

    def take(self, n: float = 1.0) -> bool:
        now = time.monotonic()
        self.tokens = min(self.burst, self.tokens + (now - self.stamp) * self.rate)
        self.stamp = now
        if self.tokens >= n:
            self.tokens -= n
            return True
        return False


class Buckets:
    """A token bucket per key (a user, for gifts made over HTTP), made on first use.

    A bucket left alone for burst / rate seconds is full again, the same as a new one: such
    buckets are dropped when the map grows, so it holds only the keys that sent lately however
    many keys come and go."""

    __slots__ = ("rate", "burst", "buckets", "prune_at")

    def __init__(self, rate: float, burst: int, prune_at: int = 10_000) -> None:
        self.rate = rate
        self.burst = burst
        self.buckets: dict[str, TokenBucket] = {}
        self.prune_at = prune_at

    def take(self, key: str, n: float = 1.0) -> bool:
        bucket = self.buckets.get(key)
        if bucket is None:
            if len(self.buckets) >= self.prune_at:
                self._prune()
            bucket = self.buckets[key] = TokenBucket(self.rate, self.burst)
        return bucket.take(n)

    def _prune(self) -> None:
        refill_s = self.burst / self.rate if self.rate > 0 else float("inf")
        now = time.monotonic()
        self.buckets = {k: b for k, b in self.buckets.items() if now - b.stamp < refill_s}
        # Still many active keys: the next prune waits until the map has doubled (amortised).
        self.prune_at = max(self.prune_at, 2 * len(self.buckets))
