"""Anomaly detection on a fake clock: a baseline is learnt, a synthetic burst fires once per
window, normal traffic never does, a burst of denials fires on its own."""

from __future__ import annotations

import datetime as dt
from typing import Any

from broker.anomaly import AnomalyConfig, AnomalyDetector
from broker.audit import AuditEvent
from ca.clock import FakeClock

WEB = "spiffe://example.org/acme/prod/web"
DB = "spiffe://example.org/acme/prod/db"
T0 = dt.datetime(2026, 1, 1, tzinfo=dt.UTC)
CONFIG = AnomalyConfig(
    window=dt.timedelta(seconds=60),
    buckets=6,
    alpha=0.2,
    spike_factor=4.0,
    min_requests=50,
    denial_burst=10,
    denial_ratio=0.5,
)


def event(who: str, decision: str = "allow", n: int = 0) -> AuditEvent:
    return AuditEvent(
        when=T0,
        who=who,
        what="secrets.get",
        resource="",
        decision=decision,
        outcome="OK",
        correlation_id=f"c{n}",
    )


def observe(detector: AnomalyDetector, event: AuditEvent) -> dict[str, Any] | None:
    """The detector's anomaly event as the ledger stores it."""
    out = detector.observe(event)
    return None if out is None else out.to_dict()


class Recorder:
    def __init__(self) -> None:
        self.calls: list[tuple[str, str]] = []

    def __call__(self, kind: str, who: str) -> None:
        self.calls.append((kind, who))


def steady(detector: AnomalyDetector, clock: FakeClock, who: str, per_second: int, seconds: int):
    found = []
    for _ in range(seconds):
        for i in range(per_second):
            out = observe(detector, event(who, n=i))
            if out is not None:
                found.append(out)
        clock.advance(1)
    return found


def test_normal_traffic_is_quiet_and_a_burst_fires_once() -> None:
    clock = FakeClock()
    recorder = Recorder()
    detector = AnomalyDetector(clock, CONFIG, on_anomaly=recorder)
    # Ten minutes at 2 requests/s: 120 per window, well above min_requests; the baseline
    # learns it, so it never counts as a spike.
    assert steady(detector, clock, WEB, 2, 600) == []
    assert recorder.calls == []

    # A burst: 10x the usual rate for 30 s.
    found = steady(detector, clock, WEB, 20, 30)
    assert len(found) == 1, found
    anomaly = found[0]
    assert anomaly["what"] == "anomaly.detected"
    assert anomaly["who"] == WEB and anomaly["rule"] == "request-spike"
    assert anomaly["details"]["requests"] > 4 * 120
    assert 100 <= anomaly["details"]["baseline_per_window"] <= 140
    assert recorder.calls == [("request-spike", WEB)]
    assert detector.detected["request-spike"] == 1

    # Once per window: the rest of the burst is not reported again. A rate that lasts becomes
    # the new baseline (exponentially weighted), so it stops counting as a spike.
    assert steady(detector, clock, WEB, 20, 600) == []
    assert recorder.calls == [("request-spike", WEB)]


def test_a_new_identity_needs_a_baseline_before_a_moderate_rate_counts() -> None:
    clock = FakeClock()
    detector = AnomalyDetector(clock, CONFIG, on_anomaly=Recorder())
    assert steady(detector, clock, DB, 3, 60) == []  # 180 in its first window: < 4 x 50


def test_identities_are_tracked_separately() -> None:
    clock = FakeClock()
    recorder = Recorder()
    detector = AnomalyDetector(clock, CONFIG, on_anomaly=recorder)

    def both(web_rate: int, seconds: int) -> list[dict[str, Any]]:
        found = []
        for _ in range(seconds):
            for who, rate in ((WEB, web_rate), (DB, 2)):
                for i in range(rate):
                    out = observe(detector, event(who, n=i))
                    if out is not None:
                        found.append(out)
            clock.advance(1)
        return found

    assert both(2, 600) == []
    found = both(20, 30)  # WEB bursts, DB carries on as before
    assert [(a["who"], a["rule"]) for a in found] == [(WEB, "request-spike")]
    assert recorder.calls == [("request-spike", WEB)]


def test_a_burst_of_denials_fires() -> None:
    clock = FakeClock()
    recorder = Recorder()
    detector = AnomalyDetector(clock, CONFIG, on_anomaly=recorder)
    found = []
    for i in range(12):
        out = observe(detector, event(WEB, "deny", i))
        if out is not None:
            found.append(out)
    assert [a["rule"] for a in found] == ["denial-burst"]
    assert found[0]["details"]["denials"] == 10
    assert "10 of 10 requests denied" in found[0]["reason"]
    assert recorder.calls == [("denial-burst", WEB)]


def test_denials_among_many_allows_are_not_a_burst() -> None:
    clock = FakeClock()
    detector = AnomalyDetector(clock, CONFIG, on_anomaly=Recorder())
    found = []
    for i in range(40):
        for decision in ("allow", "allow", "allow", "deny"):
            out = observe(detector, event(WEB, decision, i))
            if out is not None:
                found.append(out)
        clock.advance(1)
    assert found == []  # 10 denials of 40 in any window: 25% < 50%


def test_anomaly_events_are_not_counted_again() -> None:
    clock = FakeClock()
    detector = AnomalyDetector(clock, CONFIG, on_anomaly=Recorder())
    anomaly = AuditEvent(
        when=T0, who=WEB, what="anomaly.detected", resource=WEB, decision="flag", outcome="ANOMALY"
    )
    assert detector.observe(anomaly) is None
