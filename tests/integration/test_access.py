"""Policy as code over real mTLS, in process, with two operators: prod + pii secrets need the
owner or two people, approvals are single use and never self-approved, break-glass requests are
flagged in the ledger, grants expire on the fake clock, a broken Rego policy is refused and the
old one stays, and a burst of denials raises an anomaly event."""

from __future__ import annotations

import datetime as dt
import secrets as random
from typing import Any

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from broker.api._proto import access_pb2, access_pb2_grpc, ca_pb2, secrets_pb2, secrets_pb2_grpc
from broker.secrets import reference_hash

from .conftest import CORRELATION_HEADER, OPERATOR_ID, BrokerFactory, BrokerHarness, Identity

SECOND_OPERATOR = "spiffe://example.org/broker/operator/bob"
REF = "secret://payments/prod/card-vault"
OWNER = "spiffe://example.org/default/prod/payments"
OTHER_SERVICE = "spiffe://example.org/default/prod/web"


@pytest.fixture
async def broker(broker_factory: BrokerFactory) -> BrokerHarness:
    return await broker_factory(operators=(OPERATOR_ID, SECOND_OPERATOR))


def cid(name: str) -> tuple[tuple[str, str], ...]:
    # People reading prod/pii secrets give a justification (secrets.justification_required).
    return ((CORRELATION_HEADER, name), ("x-broker-justification", f"INC-42 {name}"))


def access(broker: BrokerHarness, identity: Identity | None = None) -> Any:
    return access_pb2_grpc.AccessStub(broker.channel(identity or broker.operator))


def secrets_stub(broker: BrokerHarness, identity: Identity | None = None) -> Any:
    return secrets_pb2_grpc.SecretsStub(broker.channel(identity or broker.operator))


async def refused(call: Any) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await call
    return info.value


async def put_pii(broker: BrokerHarness) -> bytes:
    value = random.token_hex(16).encode()
    await secrets_stub(broker).Put(
        secrets_pb2.PutSecretRequest(
            reference=REF,
            value=value,
            owner="payments",
            classification="pii",
            rotation_period_seconds=90 * 86400,
        )
    )
    return value


def get(ref: str = REF) -> Any:
    return secrets_pb2.GetSecretRequest(reference=ref)


async def test_prod_pii_needs_the_owner_or_two_operators(broker: BrokerHarness) -> None:
    value = await put_pii(broker)
    owner = broker.identity(OWNER)
    assert (await secrets_stub(broker, owner).Get(get())).value == value

    err = await refused(secrets_stub(broker).Get(get(), metadata=cid("op-alone")))
    assert err.code() == grpc.StatusCode.PERMISSION_DENIED
    assert "second operator" in (err.details() or "")
    event = await broker.event_for("op-alone")
    assert (event["decision"], event["rule"]) == ("deny", "two-person")
    assert event["resource"] == reference_hash(REF)

    request = await access(broker).RequestApproval(
        access_pb2.RequestApprovalRequest(
            action="secrets.get", resource=REF, justification="INC-42 card vault restore"
        )
    )
    assert request.state == "pending"
    self_approve = await refused(
        access(broker).Approve(access_pb2.ApproveRequest(id=request.id), metadata=cid("self"))
    )
    assert self_approve.code() == grpc.StatusCode.PERMISSION_DENIED
    listed = await access(broker).ListApprovals(access_pb2.ListApprovalsRequest())
    assert [(a.id, a.state) for a in listed.approvals] == [(request.id, "pending")]
    assert (await broker.event_for("self"))["outcome"] == "PERMISSION_DENIED"
    # a workload cannot approve either
    workload_approve = await refused(
        access(broker, owner).Approve(access_pb2.ApproveRequest(id=request.id))
    )
    assert workload_approve.code() == grpc.StatusCode.PERMISSION_DENIED

    bob = broker.identity(SECOND_OPERATOR)
    approved = await access(broker, bob).Approve(access_pb2.ApproveRequest(id=request.id))
    assert (approved.state, approved.approved_by) == ("approved", SECOND_OPERATOR)
    # Bob's approval is Alice's, not his own
    err = await refused(secrets_stub(broker, bob).Get(get(), metadata=cid("bob")))
    assert err.code() == grpc.StatusCode.PERMISSION_DENIED

    # Without a justification the read is refused before the decision: the approval is kept.
    unjustified = await refused(
        secrets_stub(broker).Get(get(), metadata=((CORRELATION_HEADER, "op-unjustified"),))
    )
    assert unjustified.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "justification is required" in (unjustified.details() or "")
    response = await secrets_stub(broker).Get(get(), metadata=cid("op-approved"))
    assert response.value == value
    event = await broker.event_for("op-approved")
    assert event["decision"] == "allow"
    assert event["flags"] == {"approval": request.id}

    again = await refused(secrets_stub(broker).Get(get(), metadata=cid("op-again")))
    assert again.code() == grpc.StatusCode.PERMISSION_DENIED
    assert (await broker.event_for("op-again"))["rule"] == "two-person"
    await broker.app.access.flush()
    listed = await access(broker).ListApprovals(access_pb2.ListApprovalsRequest(all=True))
    assert [a.state for a in listed.approvals] == ["used"]


def rotate(value: bytes) -> Any:
    return secrets_pb2.RotateSecretRequest(
        reference=REF,
        environment="prod",
        value=value,
        ticket="CHG-7",
        justification="suspected leak",
    )


async def current_version(broker: BrokerHarness) -> int:
    shown = await secrets_stub(broker).Show(secrets_pb2.ShowSecretRequest(reference=REF))
    return max(v.version for v in shown.versions if v.state == "current")


async def test_rotating_prod_pii_off_schedule_needs_a_second_operator(
    broker: BrokerHarness,
) -> None:
    value = await put_pii(broker)
    err = await refused(secrets_stub(broker).Rotate(rotate(b"new-1"), metadata=cid("rot-alone")))
    assert err.code() == grpc.StatusCode.PERMISSION_DENIED
    assert "second operator" in (err.details() or "")
    event = await broker.event_for("rot-alone")
    assert (event["decision"], event["rule"]) == ("deny", "two-person")
    assert event["details"]["on_schedule"] is False
    # nothing changed: still version 1, still the old value for the owner
    assert await current_version(broker) == 1
    owner = broker.identity(OWNER)
    assert (await secrets_stub(broker, owner).Get(get())).value == value

    request = await access(broker).RequestApproval(
        access_pb2.RequestApprovalRequest(
            action="secrets.rotate", resource=REF, justification="CHG-7 suspected leak"
        )
    )
    bob = broker.identity(SECOND_OPERATOR)
    await access(broker, bob).Approve(access_pb2.ApproveRequest(id=request.id))
    await secrets_stub(broker).Rotate(rotate(b"new-2"), metadata=cid("rot-approved"))
    event = await broker.event_for("rot-approved")
    assert event["flags"] == {"approval": request.id}
    assert await current_version(broker) == 2
    assert (await secrets_stub(broker, owner).Get(get())).value == b"new-2"


async def test_rotating_prod_pii_on_schedule_is_routine(broker: BrokerHarness) -> None:
    await put_pii(broker)
    broker.clock.advance(days=91)  # past the 90-day rotation period: due
    await secrets_stub(broker).Rotate(rotate(b"due-1"), metadata=cid("rot-due"))
    event = await broker.event_for("rot-due")
    assert (event["decision"], event["details"]["on_schedule"]) == ("allow", True)
    assert await current_version(broker) == 2


async def test_an_approval_used_by_another_worker_withholds_the_answer(
    broker: BrokerHarness,
) -> None:
    await put_pii(broker)
    request = await access(broker).RequestApproval(
        access_pb2.RequestApprovalRequest(action="secrets.get", resource=REF, justification="x")
    )
    bob = broker.identity(SECOND_OPERATOR)
    await access(broker, bob).Approve(access_pb2.ApproveRequest(id=request.id))
    # Another worker spends it (straight in storage: this one has not synced yet).
    other_worker = broker.app.storage.access()
    assert await other_worker.consume_approval(request.id, broker.clock.now())

    err = await refused(secrets_stub(broker).Get(get(), metadata=cid("raced")))
    assert err.code() == grpc.StatusCode.PERMISSION_DENIED
    assert "already used" in (err.details() or "")
    event = await broker.event_for("raced")
    assert event["outcome"] == "PERMISSION_DENIED"
    assert event["flags"] == {"approval": request.id}


async def test_breakglass_requests_are_flagged_and_the_credential_is_spent(
    broker: BrokerHarness,
) -> None:
    value = await put_pii(broker)
    request = await access(broker).RequestApproval(
        access_pb2.RequestApprovalRequest(
            action="secrets.get", resource=REF, justification="INC-43 outage, owner down"
        )
    )
    early = await refused(
        access(broker).IssueBreakGlass(access_pb2.IssueBreakGlassRequest(approval_id=request.id))
    )
    assert early.code() == grpc.StatusCode.FAILED_PRECONDITION
    bob = broker.identity(SECOND_OPERATOR)
    await access(broker, bob).Approve(access_pb2.ApproveRequest(id=request.id))
    too_long = await refused(
        access(broker).IssueBreakGlass(
            access_pb2.IssueBreakGlassRequest(approval_id=request.id, ttl_seconds=9 * 3600)
        )
    )
    assert too_long.code() == grpc.StatusCode.INVALID_ARGUMENT

    issued = await access(broker).IssueBreakGlass(
        access_pb2.IssueBreakGlassRequest(approval_id=request.id, ttl_seconds=3600),
        metadata=cid("issue"),
    )
    record = issued.record
    # every event of a break-glass request names the credential and whose it is
    flagged = {"breakglass": record.id, "breakglass_operator": record.operator}
    leaf = x509.load_der_x509_certificate(issued.cert_chain[0])
    lifetime = leaf.not_valid_after_utc - leaf.not_valid_before_utc
    assert lifetime <= dt.timedelta(hours=1, minutes=1)
    assert (await broker.event_for("issue"))["details"]["breakglass"] == record.id

    pem = serialization.Encoding.PEM
    chain = b"".join(x509.load_der_x509_certificate(c).public_bytes(pem) for c in issued.cert_chain)
    key = serialization.load_der_private_key(issued.private_key, None).private_bytes(
        pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    glass = Identity(record.spiffe_id, chain, key, leaf.serial_number)

    # outside its scope: refused, and flagged
    err = await refused(
        broker.ca(glass).MintX509SVID(
            ca_pb2.MintX509SVIDRequest(spiffe_id=record.spiffe_id), metadata=cid("bg-mint")
        )
    )
    assert err.code() == grpc.StatusCode.PERMISSION_DENIED
    event = await broker.event_for("bg-mint")
    assert event["flags"] == flagged and event["decision"] == "deny"

    response = await secrets_stub(broker, glass).Get(get(), metadata=cid("bg-use"))
    assert response.value == value
    event = await broker.event_for("bg-use")
    assert event["who"] == record.spiffe_id
    assert (event["decision"], event["rule"]) == ("allow", "break-glass")
    assert event["flags"] == flagged

    spent = await refused(secrets_stub(broker, glass).Get(get(), metadata=cid("bg-again")))
    assert spent.code() == grpc.StatusCode.PERMISSION_DENIED
    event = await broker.event_for("bg-again")
    assert (event["rule"], event["flags"]) == ("breakglass-spent", flagged)
    await broker.app.access.flush()
    listed = await access(broker).ListBreakGlass(access_pb2.ListBreakGlassRequest(all=True))
    assert [(b.id, b.state) for b in listed.records] == [(record.id, "used")]


async def test_grants_over_grpc_expire_on_the_clock(broker: BrokerHarness) -> None:
    await put_pii(broker)
    ref = "secret://payments/prod/webhook"
    await secrets_stub(broker).Put(
        secrets_pb2.PutSecretRequest(
            reference=ref,
            value=b"v-" + random.token_hex(8).encode(),
            owner="payments",
            classification="internal",
            rotation_period_seconds=90 * 86400,
        )
    )
    web = broker.identity(OTHER_SERVICE)
    err = await refused(secrets_stub(broker, web).Get(get(ref), metadata=cid("before")))
    assert err.code() == grpc.StatusCode.PERMISSION_DENIED
    assert (await broker.event_for("before"))["rule"] == "cross-service"

    create = access_pb2.CreateGrantRequest(
        grantee=OTHER_SERVICE,
        action="secrets.get",
        resource=ref,
        ttl_seconds=9 * 3600,
        justification="INC-44 migrate webhooks",
    )
    too_long = await refused(access(broker).CreateGrant(create))
    assert too_long.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "at most 8h" in (too_long.details() or "")
    by_workload = await refused(access(broker, web).CreateGrant(create))
    assert by_workload.code() == grpc.StatusCode.PERMISSION_DENIED
    assert (await access(broker).ListGrants(access_pb2.ListGrantsRequest(all=True))).grants == []

    create.ttl_seconds = 1800
    grant = await access(broker).CreateGrant(create)
    await secrets_stub(broker, web).Get(get(ref), metadata=cid("granted"))
    event = await broker.event_for("granted")
    assert (event["rule"], event["flags"]) == ("grant", {"grant": grant.id})
    # the grant does not reach the pii secret: the two-person rule still holds
    assert (await refused(secrets_stub(broker, web).Get(get()))).code() == (
        grpc.StatusCode.PERMISSION_DENIED
    )

    broker.clock.advance(minutes=30)
    err = await refused(secrets_stub(broker, web).Get(get(ref)))
    assert err.code() == grpc.StatusCode.PERMISSION_DENIED
    listed = await access(broker).ListGrants(access_pb2.ListGrantsRequest(all=True))
    assert [(g.id, g.state) for g in listed.grants] == [(grant.id, "expired")]


async def test_a_broken_policy_is_refused_over_grpc(broker: BrokerHarness) -> None:
    broken = {"broken.rego": "package broker.authz\nimport rego.v1\nallow contains x if {\n"}
    err = await refused(
        access(broker).SetRegoPolicy(
            access_pb2.SetRegoPolicyRequest(modules=broken), metadata=cid("broken")
        )
    )
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "broken.rego:3:" in (err.details() or "")
    current = await access(broker).GetRegoPolicy(access_pb2.GetRegoPolicyRequest())
    assert current.version == 0 and list(current.modules) == ["default.rego"]
    event = await broker.event_for("broken")
    assert event["what"] == "policy.set" and event["outcome"] == "INVALID_ARGUMENT"

    workload = broker.identity(OTHER_SERVICE)
    denied = await refused(
        access(broker, workload).GetRegoPolicy(access_pb2.GetRegoPolicyRequest())
    )
    assert denied.code() == grpc.StatusCode.PERMISSION_DENIED

    test = await access(broker).TestPolicy(
        access_pb2.TestPolicyRequest(
            input_json=(
                '{"caller": "' + OTHER_SERVICE + '", "action": "secrets.get", '
                '"resource": {"name": "h", "tenant": "default", "environment": "prod", '
                '"owner": "payments", "classification": "internal"}}'
            )
        )
    )
    assert (test.allowed, test.rule) == (False, "cross-service")
    assert '"service": "web"' in test.input_json


async def test_a_burst_of_denials_is_an_anomaly_in_the_ledger(broker: BrokerHarness) -> None:
    workload = broker.identity(OTHER_SERVICE)
    stub = broker.ca(workload)
    for i in range(25):
        with pytest.raises(grpc.aio.AioRpcError):
            await stub.Rotate(ca_pb2.RotateRequest(), metadata=cid(f"burst-{i}"))
    anomalies = [e for e in await broker.events() if e["what"] == "anomaly.detected"]
    assert len(anomalies) == 1
    assert anomalies[0]["who"] == OTHER_SERVICE
    assert anomalies[0]["rule"] == "denial-burst"
    assert anomalies[0]["details"]["denials"] == 20
    assert broker.app.anomalies.detected["denial-burst"] == 1
