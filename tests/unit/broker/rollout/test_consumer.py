"""The consumer's side of a rollout: the agent's hook, health check and report after new secret
files (`ConsumerReports`, with real commands), and the SDK's `on_update` callback and reports
(`SecretResolver`)."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

from broker.api.client.sdk import FetchedSecret, SecretResolver
from broker.rollout.consumer import ConsumerReports, Synced, run_command
from ca.clock import FakeClock

REF = "secret://payments/prod/stripe/api-key"


class Reporter:
    def __init__(self, running: bool = True) -> None:
        self.running = running
        self.reports: list[tuple[str, int, bool, str]] = []

    def report(self, reference: str, version: int, healthy: bool, detail: str = "") -> bool:
        self.reports.append((reference, version, healthy, detail))
        return self.running


def test_written_files_run_the_hook_then_the_check_then_report(tmp_path: Path) -> None:
    log = tmp_path / "log"
    hook = f"sh -c 'echo hook $BROKER_SECRET_VERSION_API_KEY >> {log}'"
    check = f"sh -c 'echo check >> {log}; test $BROKER_SECRET_VERSION_API_KEY = 2'"
    reporter = Reporter()
    reports = ConsumerReports(reporter, on_rotate=hook, health_check=check)
    assert reports.after_sync([Synced("api-key", REF, True, 2)]) == {REF: True}
    assert log.read_text().split("\n")[:2] == ["hook 2", "check"]
    assert reporter.reports == [(REF, 2, True, "")]
    # While the rollout runs, the check is run and reported again on each refresh...
    assert reports.after_sync([Synced("api-key", REF, False, 2)]) == {REF: True}
    # ...and a version the check rejects is reported unhealthy with the reason.
    assert reports.after_sync([Synced("api-key", REF, True, 3)]) == {REF: False}
    assert reporter.reports[-1][:3] == (REF, 3, False)
    assert reporter.reports[-1][3].startswith("--health-check failed: exit 1")


def test_nothing_is_reported_for_unchanged_files_without_a_rollout() -> None:
    reporter = Reporter(running=False)
    reports = ConsumerReports(reporter)
    assert reports.after_sync([Synced("api-key", REF, True, 1)]) == {REF: True}
    assert reports.after_sync([Synced("api-key", REF, False, 1)]) == {}
    assert len(reporter.reports) == 1


def test_a_failing_hook_is_unhealthy_and_the_check_is_not_run(tmp_path: Path) -> None:
    marker = tmp_path / "checked"
    reporter = Reporter()
    reports = ConsumerReports(
        reporter, on_rotate="sh -c 'echo no >&2; exit 3'", health_check=f"touch {marker}"
    )
    assert reports.after_sync([Synced("api-key", REF, True, 2)]) == {REF: False}
    assert reporter.reports == [(REF, 2, False, "--on-rotate failed: exit 3: no")]
    assert not marker.exists()
    assert not run_command("/nonexistent/check", {}).ok


class Source:
    def __init__(self) -> None:
        self.version = 1

    def fetch(self, reference: str) -> FetchedSecret:
        return FetchedSecret(f"v{self.version}".encode(), self.version)


def test_the_sdk_calls_back_on_a_new_version_and_reports_what_it_returns() -> None:
    source, reporter, seen = Source(), Reporter(), []
    clock = FakeClock(dt.datetime(2026, 6, 1, tzinfo=dt.UTC))

    def on_update(reference: str, secret: FetchedSecret) -> bool:
        seen.append((reference, secret.version))
        return secret.value != b"v2"

    resolver = SecretResolver(
        source, clock=clock, ttl_seconds=10, on_update=on_update, reporter=reporter
    )
    assert resolver.get(REF) == b"v1"
    assert resolver.get(REF) == b"v1"  # cached: no callback
    source.version = 2
    clock.advance(9)
    assert resolver.get(REF) == b"v2"
    assert seen == [(REF, 1), (REF, 2)]
    assert reporter.reports == [
        (REF, 1, True, ""),
        (REF, 2, False, "on_update reported the new version unhealthy"),
    ]
    resolver.report(REF, True, "recovered")
    assert reporter.reports[-1] == (REF, 2, True, "recovered")
