"""The Secrets service over real mTLS, in process: the owner rule (tenant + environment +
service), operator-only administration, refusals with the right status codes, and an audit
ledger that names secrets only by the hash of their reference and never holds a value."""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import secrets as random
from typing import Any

import grpc
import pytest

from broker.api._proto import secrets_pb2, secrets_pb2_grpc
from broker.api.client import BrokerClient, ClientCredentials
from broker.api.secrets_client import BrokerSecretSource, SecretsClient
from broker.envelope import aad
from broker.secrets import reference_hash
from broker.secrets_sdk import SecretRefused, SecretResolver, SecretUnavailable
from broker.storage.secrets import SecretRecord, VersionRecord

from .conftest import CORRELATION_HEADER, BrokerHarness, Identity

REF = "secret://payments/prod/stripe/api-key"
OWNER = "spiffe://example.org/default/prod/payments"
OTHER_SERVICE = "spiffe://example.org/default/prod/web"
DEV_OWNER = "spiffe://example.org/default/dev/payments"
OTHER_TENANT = "spiffe://example.org/beta/prod/payments"


def cid(name: str) -> tuple[tuple[str, str], ...]:
    return ((CORRELATION_HEADER, name),)


def stub(broker: BrokerHarness, identity: Identity | None = None) -> Any:
    return secrets_pb2_grpc.SecretsStub(broker.channel(identity or broker.operator))


async def put(broker: BrokerHarness, ref: str = REF, **kw: Any) -> bytes:
    value = f"whsec_{random.token_hex(16)}".encode()
    request = secrets_pb2.PutSecretRequest(
        reference=ref,
        value=value,
        owner="payments",
        classification="confidential",
        rotation_period_seconds=90 * 86400,
        **kw,
    )
    await stub(broker).Put(request)
    return value


async def refused(call: Any) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await call
    return info.value


def get(ref: str = REF, **kw: Any) -> Any:
    return secrets_pb2.GetSecretRequest(reference=ref, **kw)


async def ledger_text(broker: BrokerHarness) -> str:
    return "\n".join(json.dumps(e) for e in await broker.events())


async def test_the_owning_service_reads_its_secret_and_the_ledger_has_only_the_hash(
    broker: BrokerHarness,
) -> None:
    value = await put(broker)
    owner = broker.identity(OWNER)
    response = await stub(broker, owner).Get(get(), metadata=cid("owner-get"))
    assert response.value == value and response.version == 1
    assert response.metadata.owner == "payments" and response.metadata.tenant == "default"
    event = await broker.event_for("owner-get")
    assert event["decision"] == "allow" and event["rule"] == "owner"
    assert event["resource"] == reference_hash(REF)
    assert event["details"]["reference_sha256"] == reference_hash(REF)
    assert event["details"]["version"] == 1
    text = await ledger_text(broker)
    assert REF not in text and "stripe" not in text
    assert value.decode() not in text


@pytest.mark.parametrize(
    ("spiffe_id", "tenant", "reason"),
    [
        (OTHER_SERVICE, "", "reserved for the owning service"),
        (DEV_OWNER, "", "environment"),
        (OTHER_TENANT, "", "reserved for the owning service"),  # its own tenant has no such secret
        (OTHER_TENANT, "default", "tenant"),
    ],
)
async def test_other_identities_are_denied(
    broker: BrokerHarness, spiffe_id: str, tenant: str, reason: str
) -> None:
    value = await put(broker)
    err = await refused(
        stub(broker, broker.identity(spiffe_id)).Get(get(tenant=tenant), metadata=cid("deny"))
    )
    assert err.code() == grpc.StatusCode.PERMISSION_DENIED, err.details()
    assert value.decode() not in (err.details() or "")
    # The caller is told what it is told for an absent secret (issue 20, finding 14); the
    # ledger keeps the rule's reason.
    assert "payments" not in (err.details() or "")
    event = await broker.event_for("deny")
    assert reason in event["reason"]
    assert event["decision"] == "deny" and event["outcome"] == "PERMISSION_DENIED"
    assert event["resource"] == reference_hash(REF)
    # Nothing changed: the owner still reads the same value.
    owner = stub(broker, broker.identity(OWNER))
    assert (await owner.Get(get())).value == value


async def test_workloads_learn_nothing_about_absent_secrets(broker: BrokerHarness) -> None:
    owner = stub(broker, broker.identity(OWNER))
    err = await refused(owner.Get(get("secret://payments/prod/nope")))
    assert err.code() == grpc.StatusCode.PERMISSION_DENIED
    err = await refused(stub(broker).Get(get("secret://payments/prod/nope")))
    assert err.code() == grpc.StatusCode.NOT_FOUND  # operators are told


async def test_administration_is_reserved_to_operators(broker: BrokerHarness) -> None:
    value = await put(broker)
    owner = stub(broker, broker.identity(OWNER))
    calls = [
        owner.Put(
            secrets_pb2.PutSecretRequest(
                reference="secret://payments/prod/new",
                value=b"x" * 20,
                owner="payments",
                classification="internal",
                rotation_period_seconds=86400,
            )
        ),
        owner.Rotate(
            secrets_pb2.RotateSecretRequest(
                reference=REF,
                environment="prod",
                generate_length=32,
                ticket="SEC-1",
                justification="x",
            )
        ),
        owner.Revoke(secrets_pb2.RevokeSecretRequest(reference=REF, justification="x")),
        owner.Delete(secrets_pb2.DeleteSecretRequest(reference=REF)),
        owner.Show(secrets_pb2.ShowSecretRequest(reference=REF)),
        owner.List(secrets_pb2.ListSecretsRequest()),
        owner.RotateKEK(secrets_pb2.RotateKEKRequest()),
    ]
    for call in calls:
        err = await refused(call)
        assert err.code() == grpc.StatusCode.PERMISSION_DENIED, err.details()
    info = await stub(broker).Show(secrets_pb2.ShowSecretRequest(reference=REF))
    assert info.metadata.state == "active" and len(info.versions) == 1
    assert (await owner.Get(get())).value == value
    assert not await broker.app.secrets.repository.list_secrets(prefix="secret://payments/prod/n")


async def test_missing_metadata_is_failed_precondition(broker: BrokerHarness) -> None:
    app = broker.app
    now = broker.clock.now()
    blob = await app.envelope.seal("default", b"legacy-value-123", aad("default", REF, 1))
    await app.secrets.repository.insert_secret(
        SecretRecord(
            "default", REF, "payments", "prod", "payments", None, None, None, 1, "active", now
        ),
        VersionRecord(1, blob.kek_label, blob.to_bytes(), now),
    )
    owner = stub(broker, broker.identity(OWNER))
    err = await refused(owner.Get(get(), metadata=cid("missing")))
    assert err.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "data-classification, rotation-period, last-rotated" in (err.details() or "")
    assert (await broker.event_for("missing"))["outcome"] == "FAILED_PRECONDITION"


async def test_revoke_takes_effect_at_once_for_every_version(broker: BrokerHarness) -> None:
    await put(broker)
    ops = stub(broker)
    await ops.Rotate(
        secrets_pb2.RotateSecretRequest(
            reference=REF, environment="prod", generate_length=40, ticket="SEC-9", justification="x"
        ),
        metadata=cid("rotate"),
    )
    rotate_event = await broker.event_for("rotate")
    assert rotate_event["details"]["from_version"] == 1
    assert rotate_event["details"]["to_version"] == 2
    owner = stub(broker, broker.identity(OWNER))
    assert len((await owner.Get(get())).value) == 40
    await ops.Revoke(secrets_pb2.RevokeSecretRequest(reference=REF, justification="leaked"))
    for version in (0, 1, 2):
        err = await refused(owner.Get(get(version=version)))
        assert err.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert "revoked" in (err.details() or "")


async def test_sdk_over_grpc_serves_the_cache_while_the_broker_is_down(
    broker: BrokerHarness,
) -> None:
    value = await put(broker)
    owner = broker.identity(OWNER)
    client = BrokerClient(
        broker.address,
        ClientCredentials(owner.chain_pem, owner.key_pem, broker.bundle_pem),
        timeout=5,
    )
    clock = broker.clock
    sdk = SecretResolver(BrokerSecretSource(SecretsClient(client)), clock=clock, ttl_seconds=300)
    try:
        assert await asyncio.to_thread(sdk.get, REF) == value
        await broker.server.stop(grace=None)
        clock.advance(dt.timedelta(seconds=250).total_seconds())
        assert await asyncio.to_thread(sdk.get, REF) == value  # refresh failed: cached value
        clock.advance(60)
        with pytest.raises(SecretUnavailable):
            await asyncio.to_thread(sdk.get, REF)
    finally:
        client.close()


async def test_sdk_drops_a_revoked_secret_at_its_next_refresh(broker: BrokerHarness) -> None:
    await put(broker)
    owner = broker.identity(OWNER)
    client = BrokerClient(
        broker.address, ClientCredentials(owner.chain_pem, owner.key_pem, broker.bundle_pem)
    )
    sdk = SecretResolver(BrokerSecretSource(SecretsClient(client)), clock=broker.clock)
    try:
        await asyncio.to_thread(sdk.get, REF)
        await stub(broker).Revoke(secrets_pb2.RevokeSecretRequest(reference=REF, justification="x"))
        broker.clock.advance(241)
        with pytest.raises(SecretRefused) as info:
            await asyncio.to_thread(sdk.get, REF)
        assert info.value.code == "FAILED_PRECONDITION"
    finally:
        client.close()
