"""Anomaly detection over the audit stream: per-identity request and denial rates in a sliding
window, compared with that identity's own baseline.

`AnomalyDetector.observe(event)` sees every audited request event (the request pipeline calls
it after the event is written). Time is cut into buckets (window / buckets each); the window is
the last `buckets` buckets. The baseline is an exponentially weighted mean of the per-bucket
request count, fed by each bucket as it leaves the window (empty buckets count as zero), so an
identity's normal rate is learnt and an idle identity's baseline decays.

Two anomalies, each reported at most once per window per identity:
- "request-spike": requests in the window above max(min_requests, spike_factor x baseline
  requests per window); before an identity has a baseline (its first window), above
  spike_factor x min_requests;
- "denial-burst": at least `denial_burst` denials in the window and denials at least
  `denial_ratio` of its requests.
A detection returns an audit event (the pipeline writes it to the ledger) and counts
`broker_anomalies_total{kind}`. Not thread-safe: called from the event loop only.
"""

from __future__ import annotations

import datetime as dt
import math
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Final

from broker import metrics
from broker.audit import AuditEvent
from ca.clock import Clock

__all__ = ["AnomalyConfig", "AnomalyDetector"]

SPIKE: Final = "request-spike"
DENIALS: Final = "denial-burst"
_MAX_IDENTITIES: Final = 100_000


@dataclass(frozen=True)
class AnomalyConfig:
    window: dt.timedelta = dt.timedelta(seconds=60)
    buckets: int = 6
    alpha: float = 0.1  # weight of the newest bucket in the baseline
    spike_factor: float = 5.0
    min_requests: int = 300  # no spike below this many requests in a window
    denial_burst: int = 20
    denial_ratio: float = 0.5

    def __post_init__(self) -> None:
        if self.buckets < 1 or self.window <= dt.timedelta(0):
            raise ValueError("anomaly window and buckets must be positive")
        if not 0 < self.alpha <= 1:
            raise ValueError("alpha must be in (0, 1]")


@dataclass
class _Track:
    buckets: deque[list[int]] = field(default_factory=deque)  # [bucket, requests, denials]
    baseline: float = 0.0  # requests per bucket
    learnt: bool = False  # a first bucket has left the window
    last_reported: dict[str, int] = field(default_factory=dict)  # kind -> bucket
    seen_since: int = 0


class AnomalyDetector:
    def __init__(
        self,
        clock: Clock,
        config: AnomalyConfig | None = None,
        *,
        on_anomaly: Callable[[str, str], None] = lambda kind, who: metrics.record_anomaly(kind),
    ) -> None:
        self._clock = clock
        self.config = config or AnomalyConfig()
        self._bucket_seconds = self.config.window.total_seconds() / self.config.buckets
        self._tracks: dict[str, _Track] = {}
        self._on_anomaly = on_anomaly
        self.detected: dict[str, int] = {SPIKE: 0, DENIALS: 0}

    def _bucket(self) -> int:
        return math.floor(self._clock.monotonic() / self._bucket_seconds)

    def _roll(self, track: _Track, now: int) -> None:
        """Drop buckets that left the window, feeding them (and the empty ones between) into
        the baseline."""
        cfg = self.config
        oldest = now - cfg.buckets + 1
        while track.buckets and track.buckets[0][0] < oldest:
            bucket, requests, _ = track.buckets.popleft()
            following = track.buckets[0][0] if track.buckets else oldest
            if track.learnt:
                track.baseline = (1 - cfg.alpha) * track.baseline + cfg.alpha * requests
            else:
                track.baseline, track.learnt = float(requests), True
            empty = min(max(0, min(following, oldest) - bucket - 1), 10_000)
            track.baseline *= (1 - cfg.alpha) ** empty

    def observe(self, event: AuditEvent) -> AuditEvent | None:
        """Count one audited request; returns an anomaly audit event or None."""
        who = event.who
        if not who or event.what == "anomaly.detected":
            return None
        now = self._bucket()
        track = self._tracks.get(who)
        if track is None:
            if len(self._tracks) >= _MAX_IDENTITIES:
                self._tracks.clear()  # bounded memory under an identity flood
            track = self._tracks[who] = _Track(seen_since=now)
        self._roll(track, now)
        if not track.buckets or track.buckets[-1][0] != now:
            track.buckets.append([now, 0, 0])
        current = track.buckets[-1]
        current[1] += 1
        if event.decision == "deny":
            current[2] += 1
        requests = sum(b[1] for b in track.buckets)
        denials = sum(b[2] for b in track.buckets)
        cfg = self.config
        expected = track.baseline * cfg.buckets
        # Until a first window has passed there is no baseline: only a rate spike_factor times
        # min_requests counts as a spike.
        floor = cfg.min_requests if track.learnt else cfg.spike_factor * cfg.min_requests
        if requests > max(floor, cfg.spike_factor * expected):
            reason = (
                f"{requests} requests in {_span(cfg.window)}, baseline {expected:.1f} "
                f"(threshold x{cfg.spike_factor:g}, at least {cfg.min_requests})"
            )
            found = self._report(track, who, SPIKE, now, reason, requests, denials, event)
            if found is not None:
                return found
        if denials >= cfg.denial_burst and denials >= cfg.denial_ratio * requests:
            reason = (
                f"{denials} of {requests} requests denied in {_span(cfg.window)} "
                f"(threshold {cfg.denial_burst} and {cfg.denial_ratio:.0%})"
            )
            return self._report(track, who, DENIALS, now, reason, requests, denials, event)
        return None

    def _report(
        self,
        track: _Track,
        who: str,
        kind: str,
        now: int,
        reason: str,
        requests: int,
        denials: int,
        trigger: AuditEvent,
    ) -> AuditEvent | None:
        last = track.last_reported.get(kind)
        if last is not None and now - last < self.config.buckets:
            return None  # once per window
        track.last_reported[kind] = now
        self.detected[kind] += 1
        self._on_anomaly(kind, who)
        return AuditEvent(
            when=self._clock.now(),
            who=who,
            what="anomaly.detected",
            resource=who,
            where=trigger.where,
            correlation_id=trigger.correlation_id,
            decision="flag",
            reason=reason,
            rule=kind,
            outcome="ANOMALY",
            details={
                "kind": kind,
                "requests": requests,
                "denials": denials,
                "baseline_per_window": round(track.baseline * self.config.buckets, 3),
                "window_seconds": self.config.window.total_seconds(),
            },
        )


def _span(value: dt.timedelta) -> str:
    seconds = value.total_seconds()
    return f"{seconds:g}s"
