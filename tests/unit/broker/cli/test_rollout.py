"""`broker secrets rotate --stages ...` and `broker rollout status|promote|abort` against a
fake client: what they send, their JSON and text, their refusals."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from broker.api.client.base import ClientError
from broker.api.client.rollout import RolloutConsumerView, RolloutReport, RolloutView
from tests.unit.broker.cli.fakes import T0, T1, Z0, Recorder, harness

REF = "secret://payments/prod/stripe/api-key"
WEB = "spiffe://example.org/acme/prod/payments/web-1"
VIEW = RolloutView(
    id="rollout-0123456789abcdef",
    tenant="acme",
    reference=REF,
    reference_sha256="ab" * 32,
    from_version=3,
    to_version=4,
    state="running",
    stages=(10, 50, 100),
    stage=1,
    stage_opened_at=T0,
    bake_ends=T1,
    bake_seconds=300,
    max_failures=0,
    failures=0,
    health_check="/usr/local/bin/check-stripe",
    check="passed",
    check_detail="exit 0",
    started_at=T0,
    finished_at=None,
    reason="",
    started_by="spiffe://example.org/broker/operator/alice",
    ticket="SEC-12",
    approver="",
    healthy=True,
    health_reason="healthy",
    consumers=(RolloutConsumerView(WEB, 1, 4, 4, "healthy", "", T0, T1),),
)
ROTATE = [
    "secrets", "rotate", REF, "--env", "prod", "--ticket", "SEC-12", "--justification", "q3",
]  # fmt: skip


def test_rotate_with_stages_starts_a_rollout(tmp_path: Path) -> None:
    rollouts, secrets = Recorder(start=VIEW), Recorder()
    h = harness(tmp_path, rollouts=rollouts, secrets=secrets)
    args = [*ROTATE, "--stages", "10%,50%,100%", "--bake", "5m", "--max-failures", "1"]
    result = h.invoke(*args, "--health-check", "/usr/local/bin/check-stripe")
    assert result.exit_code == 0, result.output
    assert result.stdout.startswith(
        f"rollout rollout-0123456789abcdef of {REF} started: v3 -> v4, stage 1 of 3 (10%) open"
    )
    assert rollouts.calls == [
        (
            "start",
            (REF,),
            {
                "environment": "prod",
                "ticket": "SEC-12",
                "justification": "q3",
                "stages": [10, 50, 100],
                "bake_seconds": 300,
                "max_failures": 1,
                "health_check": "/usr/local/bin/check-stripe",
                "tenant": "",
                "generate_length": 32,
            },
        )
    ]
    assert secrets.calls == []  # no plain rotation besides
    document = json.loads(h.invoke(*args, "--output", "json").stdout)
    assert document["state"] == "running" and document["stages"] == [10, 50, 100]
    assert document["consumers"][0]["identity"] == WEB
    assert document["started_at"] == Z0


def test_rollout_options_without_stages_and_bad_stages_send_nothing(tmp_path: Path) -> None:
    rollouts, secrets = Recorder(start=VIEW), Recorder()
    h = harness(tmp_path, rollouts=rollouts, secrets=secrets)
    for extra in (
        ["--bake", "5m"],
        ["--max-failures", "2"],
        ["--health-check", "http://127.0.0.1:8080/healthz"],
        ["--stages", "ten,100%"],
        ["--stages", "10%,1000%"],
    ):
        result = h.invoke(*ROTATE, *extra)
        assert result.exit_code == 2, (extra, result.output)
    assert rollouts.calls == [] and secrets.calls == []


def test_a_refusal_is_one_line(tmp_path: Path) -> None:
    refused = ClientError("INVALID_ARGUMENT", "the last stage is 50%: stages must end at 100%")
    h = harness(tmp_path, rollouts=Recorder(start=refused))
    result = h.invoke(*ROTATE, "--stages", "10%,50%")
    assert result.exit_code == 1
    assert result.stderr.startswith("broker: ")
    assert len(result.stderr.strip().splitlines()) == 1


def test_status_promote_abort(tmp_path: Path) -> None:
    aborted = RolloutView(**{**VIEW.__dict__, "state": "aborted", "bake_ends": None})
    rollouts = Recorder(status=VIEW, promote=VIEW, abort=aborted)
    h = harness(tmp_path, rollouts=rollouts)
    status = h.invoke("rollout", "status", REF)
    assert status.exit_code == 0, status.output
    lines = status.stdout.splitlines()
    assert lines[0] == f"rollout rollout-0123456789abcdef of {REF} (tenant acme): running"
    assert "  versions:  v3 -> v4" in lines
    assert any(line.startswith(WEB) and "healthy" in line for line in lines)
    assert h.invoke("rollout", "promote", REF).stdout.startswith("promoted: stage 1 (10%) open")
    abort = h.invoke("rollout", "abort", REF, "--tenant", "acme")
    assert abort.stdout.startswith("aborted: every consumer is back on v3")
    assert [c[0] for c in rollouts.calls] == ["status", "promote", "abort"]
    assert rollouts.calls[-1] == ("abort", (REF,), {"tenant": "acme"})
    finished = ClientError("FAILED_PRECONDITION", "the latest rollout of this secret is aborted")
    h2 = harness(tmp_path / "2", rollouts=Recorder(promote=finished))
    result = h2.invoke("rollout", "promote", REF)
    assert result.exit_code == 1 and result.stderr.startswith("broker: ")


STATIC_VIEW = dataclasses.replace(VIEW, reference="db:app", reference_sha256="", health_check="")


def test_static_role_rotate_with_stages_starts_a_rollout_of_db_role(tmp_path: Path) -> None:
    rollouts, roles = Recorder(start=STATIC_VIEW), Recorder()
    h = harness(tmp_path, rollouts=rollouts, static_roles=roles)
    args = ["db", "static-role", "rotate", "app", "--reason", "q3", "--ticket", "SEC-12"]
    result = h.invoke(*args, "--stages", "10%,50%,100%", "--bake", "10m")
    assert result.exit_code == 0, result.output
    assert result.stdout.startswith(
        "rollout rollout-0123456789abcdef of db:app started: v3 -> v4 on the role's second "
        "user, stage 1 of 3 (10%) open"
    )
    assert rollouts.calls == [
        (
            "start",
            ("db:app",),
            {
                "environment": "",
                "ticket": "SEC-12",
                "justification": "q3",
                "stages": [10, 50, 100],
                "bake_seconds": 600,
                "max_failures": 0,
                "health_check": "",
            },
        )
    ]
    assert roles.calls == []  # no plain rotation besides
    for bad in (["--bake", "5m"], ["--stages", "10%,x"]):
        assert h.invoke(*args, *bad).exit_code == 2, bad  # usage errors
    assert len(rollouts.calls) == 1 and roles.calls == []
    busy = ClientError("FAILED_PRECONDITION", "a rollout of static role 'app' is already running")
    h2 = harness(tmp_path / "2", rollouts=Recorder(start=busy), static_roles=Recorder())
    result = h2.invoke(*args, "--stages", "100%")
    assert result.exit_code == 1
    assert result.stderr.startswith("broker: ") and len(result.stderr.strip().splitlines()) == 1


def test_rollout_report_sends_the_consumers_report(tmp_path: Path) -> None:
    rollouts = Recorder(report=RolloutReport(True, "rollout-0123456789abcdef", "rolled-back"))
    h = harness(tmp_path, rollouts=rollouts)
    result = h.invoke(
        "rollout", "report", "db:app", "--version", "4", "--unhealthy", "--detail", "no login"
    )
    assert result.exit_code == 0, result.output
    assert result.stdout.strip() == "reported to rollout rollout-0123456789abcdef (rolled-back)"
    assert rollouts.calls == [
        (
            "report",
            ("db:app",),
            {"version": 4, "healthy": False, "detail": "no login", "tenant": ""},
        )
    ]
    assert h.invoke("rollout", "report", "db:app", "--version", "0").exit_code == 2
    assert len(rollouts.calls) == 1
