"""Per-identity rate limiting: one token bucket per caller, on an injected clock."""

from __future__ import annotations

import threading
from dataclasses import dataclass

from broker.errors import ResourceExhausted
from ca.clock import Clock

__all__ = ["RateLimiter"]


@dataclass
class _Bucket:
    tokens: float
    stamp: float


class RateLimiter:
    """Token buckets keyed by identity. `rate` tokens per second, at most `burst` saved up.

    `rate <= 0` disables limiting. Buckets idle long enough to be full are forgotten, so the
    table does not grow without bound.
    """

    def __init__(self, clock: Clock, rate: float, burst: float, max_keys: int = 100_000) -> None:
        self._clock = clock
        self._rate = rate
        self._burst = max(burst, 1.0)
        self._max_keys = max_keys
        self._buckets: dict[str, _Bucket] = {}
        self._lock = threading.Lock()

    def check(self, key: str) -> None:
        """Take one token for `key` or raise ResourceExhausted saying when to retry."""
        if self._rate <= 0:
            return
        now = self._clock.monotonic()
        with self._lock:
            bucket = self._buckets.get(key)
            if bucket is None:
                if len(self._buckets) >= self._max_keys:
                    self._evict(now)
                bucket = self._buckets[key] = _Bucket(self._burst, now)
            else:
                bucket.tokens = min(self._burst, bucket.tokens + (now - bucket.stamp) * self._rate)
                bucket.stamp = now
            if bucket.tokens < 1.0:
                wait = (1.0 - bucket.tokens) / self._rate
                raise ResourceExhausted(
                    f"rate limit of {self._rate:g} requests/s for {key} exceeded; "
                    f"retry in {wait:.3f}s"
                )
            bucket.tokens -= 1.0

    def _evict(self, now: float) -> None:
        full_after = self._burst / self._rate
        for key in [k for k, b in self._buckets.items() if now - b.stamp >= full_after]:
            del self._buckets[key]
        if len(self._buckets) >= self._max_keys:
            self._buckets.clear()
