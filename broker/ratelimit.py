"""Per-identity rate limiting: one token bucket per caller, on an injected clock."""

from __future__ import annotations

import threading
from dataclasses import dataclass

from broker.errors import RateLimited
from ca.clock import Clock

__all__ = ["RateLimiter", "RefusalSampler"]


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
        """Take one token for `key` or raise RateLimited saying when to retry."""
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
                raise RateLimited(
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


@dataclass
class _Window:
    start: float
    count: int


class RefusalSampler:
    """Which refusals of a flood reach the audit ledger: for each key (a caller, or a peer
    address for calls without an identity) the first refusal of every `interval` seconds is
    recorded, carrying how many refusals of that key the previous interval had; the rest are
    only counted (the `broker_refusals` metric counts every one). So a client hammering the
    broker costs at most one ledger row per interval, and the ledger still shows who, when
    and roughly how hard.

    A window whose key never comes back is not written: its refusals are in the metric only.
    At most `max_keys` windows are kept; beyond that, expired windows are forgotten first.
    """

    def __init__(self, clock: Clock, interval: float, max_keys: int = 100_000) -> None:
        self._clock = clock
        self._interval = interval
        self._max_keys = max_keys
        self._windows: dict[str, _Window] = {}
        self._lock = threading.Lock()

    @property
    def interval(self) -> float:
        return self._interval

    def admit(self, key: str) -> int | None:
        """Count one refusal for `key`. Returns None when it is not to be audited, else the
        number of refusals of `key` in its previous window (0 for the first window); an
        interval of 0 or less audits every refusal."""
        if self._interval <= 0:
            return 0
        now = self._clock.monotonic()
        with self._lock:
            window = self._windows.get(key)
            if window is not None and now - window.start < self._interval:
                window.count += 1
                return None
            previous = 0 if window is None else window.count
            if window is None and len(self._windows) >= self._max_keys:
                self._evict(now)
            self._windows[key] = _Window(now, 1)
            return previous

    def _evict(self, now: float) -> None:
        for key in [k for k, w in self._windows.items() if now - w.start >= self._interval]:
            del self._windows[key]
        if len(self._windows) >= self._max_keys:
            self._windows.clear()
