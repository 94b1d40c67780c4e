"""The Rollouts service over real mTLS, in process: an operator starts a staged rollout, the
owning service's workloads read the version of their stage and report, a failing report rolls
every consumer back; other services may neither report nor steer; every step is audited with
its before and after versions, and the ledger names the secret only by its hash."""

from __future__ import annotations

import datetime as dt
import json
import secrets as random
from typing import Any

import grpc
import pytest

from broker.api._proto import (
    access_pb2,
    access_pb2_grpc,
    rollout_pb2,
    rollout_pb2_grpc,
    secrets_pb2,
    secrets_pb2_grpc,
)
from broker.rollout.plan import stage_of
from broker.secrets import reference_hash

from .conftest import CORRELATION_HEADER, OPERATOR_ID, BrokerFactory, BrokerHarness, Identity

REF = "secret://payments/prod/stripe/api-key"
STAGES = [10, 50, 100]
OTHER_SERVICE = "spiffe://example.org/default/prod/web"
SECOND_OPERATOR = "spiffe://example.org/broker/operator/bob"


def pods() -> dict[int, str]:
    """One payments workload identity per stage (placed by the hash)."""
    out: dict[int, str] = {}
    n = 0
    while len(out) < 3:
        spiffe_id = f"spiffe://example.org/default/prod/payments/pod-{n}"
        out.setdefault(stage_of(STAGES, REF, spiffe_id), spiffe_id)
        n += 1
    return out


def rollouts(broker: BrokerHarness, identity: Identity | None = None) -> Any:
    return rollout_pb2_grpc.RolloutsStub(broker.channel(identity or broker.operator))


def secrets(broker: BrokerHarness, identity: Identity | None = None) -> Any:
    return secrets_pb2_grpc.SecretsStub(broker.channel(identity or broker.operator))


async def put(broker: BrokerHarness) -> bytes:
    value = f"whsec_{random.token_hex(16)}".encode()
    await secrets(broker).Put(
        secrets_pb2.PutSecretRequest(
            reference=REF,
            value=value,
            owner="payments",
            classification="confidential",
            rotation_period_seconds=90 * 86400,
        )
    )
    return value


def start(**kw: Any) -> rollout_pb2.StartRolloutRequest:
    base: dict[str, Any] = {
        "reference": REF,
        "environment": "prod",
        "ticket": "SEC-12",
        "justification": "quarterly",
        "stages": STAGES,
        "bake_seconds": 300,
        "generate_length": 40,
    }
    return rollout_pb2.StartRolloutRequest(**(base | kw))


async def refused(call: Any) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await call
    return info.value


def cid(name: str) -> tuple[tuple[str, str], ...]:
    return ((CORRELATION_HEADER, name),)


async def test_a_canary_fails_and_every_consumer_is_back_on_the_old_version(
    broker: BrokerHarness,
) -> None:
    old = await put(broker)
    status = await rollouts(broker).Start(start(), metadata=cid("start"))
    assert (status.state, status.from_version, status.to_version) == ("running", 1, 2)
    ids = pods()
    reads = {}
    for stage, spiffe_id in ids.items():
        read = await secrets(broker, broker.identity(spiffe_id)).Get(
            secrets_pb2.GetSecretRequest(reference=REF)
        )
        reads[stage] = (read.version, read.value)
    assert reads[0][0] == 2 and reads[0][1] != old
    assert reads[1] == (1, old) and reads[2] == (1, old)
    # Another service may not report on the secret, nor steer the rollout; nothing changes.
    other = broker.identity(OTHER_SERVICE)
    report = rollout_pb2.ReportRolloutRequest(reference=REF, version=2, healthy=False)
    err = await refused(rollouts(broker, other).Report(report))
    assert err.code() == grpc.StatusCode.PERMISSION_DENIED
    err = await refused(rollouts(broker, other).Abort(rollout_pb2.RolloutRequest(reference=REF)))
    assert err.code() == grpc.StatusCode.PERMISSION_DENIED
    assert (await rollouts(broker).Status(rollout_pb2.RolloutRequest(reference=REF))).state == (
        "running"
    )
    # The canary reports its health check failing: rolled back at once.
    canary = broker.identity(ids[0])
    answer = await rollouts(broker, canary).Report(
        rollout_pb2.ReportRolloutRequest(
            reference=REF, version=2, healthy=False, detail="stripe: 401"
        ),
        metadata=cid("report"),
    )
    assert answer.tracked and answer.state == "rolled-back"
    for spiffe_id in ids.values():
        read = await secrets(broker, broker.identity(spiffe_id)).Get(
            secrets_pb2.GetSecretRequest(reference=REF)
        )
        assert (read.version, read.value) == (1, old)
    status = await rollouts(broker).Status(rollout_pb2.RolloutRequest(reference=REF))
    assert status.state == "rolled-back" and "stripe: 401" in status.reason
    assert {c.identity for c in status.consumers} == set(ids.values())
    # Finished: promote and abort are refused with FAILED_PRECONDITION.
    for call in (rollouts(broker).Promote, rollouts(broker).Abort):
        err = await refused(call(rollout_pb2.RolloutRequest(reference=REF)))
        assert err.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert "rolled-back" in (err.details() or "")
    events = await broker.events()
    steps = [e for e in events if e["what"].startswith("rollout.")]
    assert [e["what"] for e in steps] == ["rollout.start", "rollout.report", "rollout.rolled-back"]
    for e in steps:
        assert e["resource"] == reference_hash(REF)
        assert (e["details"]["from_version"], e["details"]["to_version"]) == (1, 2)
    assert steps[1]["details"]["health"] == {"passed": False, "detail": "stripe: 401"}
    start_call = await broker.event_for("start")
    assert start_call["what"] == "secrets.rotate" and start_call["details"]["stages"] == STAGES
    text = "\n".join(json.dumps(e) for e in events)
    assert REF not in text and old.decode() not in text
    assert reads[0][1].decode() not in text


async def test_bad_input_is_refused_with_invalid_argument_and_nothing_changes(
    broker: BrokerHarness,
) -> None:
    await put(broker)
    for kw, message in (
        ({"stages": [10, 50]}, "end at 100%"),
        ({"stages": [50, 10, 100]}, "backwards"),
        ({"bake_seconds": 0}, "longer than 0"),
        ({"bake_seconds": 25 * 3600}, "at most 24h"),
        ({"health_check": "http://192.0.2.1/healthz"}, "not loopback"),
        ({"health_check": "gopher://127.0.0.1/"}, "not supported"),
    ):
        err = await refused(rollouts(broker).Start(start(**kw)))
        assert err.code() == grpc.StatusCode.INVALID_ARGUMENT, err.details()
        assert message in (err.details() or "")
    err = await refused(rollouts(broker).Start(start(reference="secret://payments/prod/nope")))
    assert err.code() == grpc.StatusCode.NOT_FOUND
    err = await refused(rollouts(broker).Status(rollout_pb2.RolloutRequest(reference=REF)))
    assert err.code() == grpc.StatusCode.NOT_FOUND
    show = await secrets(broker).Show(secrets_pb2.ShowSecretRequest(reference=REF))
    assert [v.version for v in show.versions] == [1]
    await rollouts(broker).Start(start())
    err = await refused(rollouts(broker).Start(start()))
    assert err.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "already running" in (err.details() or "")
    err = await refused(
        secrets(broker).Rotate(
            secrets_pb2.RotateSecretRequest(
                reference=REF, environment="prod", ticket="T-2", justification="x"
            )
        )
    )
    assert err.code() == grpc.StatusCode.FAILED_PRECONDITION


async def test_promote_and_the_bake_timer_complete_a_healthy_rollout(
    broker: BrokerHarness,
) -> None:
    await put(broker)
    await rollouts(broker).Start(start())
    promoted = await rollouts(broker).Promote(rollout_pb2.RolloutRequest(reference=REF))
    assert promoted.stage == 2
    await rollouts(broker).Promote(rollout_pb2.RolloutRequest(reference=REF))
    broker.clock.advance(dt.timedelta(minutes=5).total_seconds())
    assert await broker.app.rollout_job.tick() == 1
    status = await rollouts(broker).Status(rollout_pb2.RolloutRequest(reference=REF))
    assert status.state == "completed"
    show = await secrets(broker).Show(secrets_pb2.ShowSecretRequest(reference=REF))
    assert [(v.version, v.state) for v in show.versions] == [(1, "revoked"), (2, "current")]


async def test_a_prod_pii_rollout_needs_a_second_operator_and_names_the_approval(
    broker_factory: BrokerFactory,
) -> None:
    """Starting a rollout is a rotation: off schedule, a prod + pii secret needs a second
    operator's approval. Refused alone (nothing changed: no rollout, no new version); with the
    approval it starts, and the rollout's events name it."""
    broker = await broker_factory(operators=(OPERATOR_ID, SECOND_OPERATOR))
    pii = "secret://payments/prod/card-vault"
    await secrets(broker).Put(
        secrets_pb2.PutSecretRequest(
            reference=pii,
            value=random.token_hex(16).encode(),
            owner="payments",
            classification="pii",
            rotation_period_seconds=90 * 86400,
        )
    )
    err = await refused(rollouts(broker).Start(start(reference=pii)))
    assert err.code() == grpc.StatusCode.PERMISSION_DENIED
    assert "second operator" in (err.details() or "")
    err = await refused(rollouts(broker).Status(rollout_pb2.RolloutRequest(reference=pii)))
    assert err.code() == grpc.StatusCode.NOT_FOUND
    show = await secrets(broker).Show(secrets_pb2.ShowSecretRequest(reference=pii))
    assert [v.version for v in show.versions] == [1]
    access = access_pb2_grpc.AccessStub(broker.channel(broker.operator))
    request = await access.RequestApproval(
        access_pb2.RequestApprovalRequest(
            action="secrets.rotate", resource=pii, justification="CHG-9 staged rotation"
        )
    )
    bob = broker.identity(SECOND_OPERATOR)
    await access_pb2_grpc.AccessStub(broker.channel(bob)).Approve(
        access_pb2.ApproveRequest(id=request.id)
    )
    status = await rollouts(broker).Start(start(reference=pii))
    assert status.state == "running" and status.approver == f"approval {request.id}"
    events = [e for e in await broker.events() if e["what"] == "rollout.start"]
    assert events[-1]["details"]["approver"] == f"approval {request.id}"
