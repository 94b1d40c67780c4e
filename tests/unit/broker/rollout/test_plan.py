"""A rollout's plan: stage placement by the hash of the SPIFFE ID (deterministic, about the
asked share per stage), and the operator's health check (loopback http(s) URLs or a command;
anything else refused)."""

from __future__ import annotations

import datetime as dt

import pytest

from broker.errors import InvalidArgument
from broker.rollout.plan import HealthCheck, RolloutPlan, bucket, stage_of

REF = "secret://payments/prod/stripe/api-key"
WINDOW = dt.timedelta(hours=24)


def test_placement_is_deterministic_and_close_to_the_asked_shares() -> None:
    ids = [f"spiffe://example.org/acme/prod/payments/pod-{n}" for n in range(4000)]
    stages = (10, 50, 100)
    placed = [stage_of(stages, REF, i) for i in ids]
    assert placed == [stage_of(stages, REF, i) for i in ids]
    share = [placed.count(k) / len(ids) for k in range(3)]
    assert 0.08 < share[0] < 0.12 and 0.37 < share[1] < 0.43 and 0.47 < share[2] < 0.53
    # Another secret canaries other consumers (the reference is in the hash).
    other = [stage_of(stages, "secret://payments/prod/other", i) for i in ids]
    assert other != placed
    assert all(0 <= bucket(REF, i) < 100 for i in ids[:100])


@pytest.mark.parametrize(
    "url",
    [
        "http://127.0.0.1:8080/healthz",
        "https://localhost/healthz",
        "http://[::1]:9000/",
        "http://127.0.0.2/x",
    ],
)
def test_loopback_urls_are_accepted(url: str) -> None:
    check = HealthCheck.parse(url, loopback_only=True)
    assert check is not None and check.is_url


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("http://127.0.0.1.example.org/healthz", "not loopback"),
        ("http://127.0.0.1@example.org/healthz", "not loopback"),
        ("http://localhost.example.org/", "not loopback"),
        ("http://[::ffff:10.0.0.1]/", "not loopback"),
        ("ftp://127.0.0.1/", "not supported"),
        ("javascript://127.0.0.1/", "not supported"),
        ("http:///healthz", "no host"),
        ("check --arg 'open", "does not parse"),
        ("check\x00", "printable"),
        ("x" * 1025, "at most 1024"),
    ],
)
def test_bad_health_checks_are_refused(text: str, message: str) -> None:
    with pytest.raises(InvalidArgument, match=message):
        HealthCheck.parse(text, loopback_only=True)


def test_a_command_is_split_without_a_shell() -> None:
    check = HealthCheck.parse("curl -fsS 'http://svc/health; rm -rf /'", loopback_only=True)
    assert check is not None and not check.is_url
    assert check.argv == ["curl", "-fsS", "http://svc/health; rm -rf /"]


def test_plans_are_bounded() -> None:
    plan = RolloutPlan.build((1, 100), dt.timedelta(hours=12), 3, "", window=WINDOW,
                             loopback_only=True)  # fmt: skip
    assert plan.stages == (1, 100) and plan.health_check is None
    with pytest.raises(InvalidArgument, match="at most 10 stages"):
        RolloutPlan.build(tuple(range(10, 101, 9)), dt.timedelta(minutes=1), 0, "",
                          window=WINDOW, loopback_only=True)  # fmt: skip
    with pytest.raises(InvalidArgument, match="rollback window"):
        RolloutPlan.build((50, 100), dt.timedelta(hours=13), 0, "", window=WINDOW,
                          loopback_only=True)  # fmt: skip
    with pytest.raises(InvalidArgument, match="1% to 100%"):
        RolloutPlan.build((0, 100), dt.timedelta(minutes=1), 0, "", window=WINDOW,
                          loopback_only=True)  # fmt: skip
