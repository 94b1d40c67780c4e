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
from broker.api.client.base import BrokerClient, ClientCredentials
from broker.api.client.sdk import SecretRefused, SecretResolver, SecretUnavailable
from broker.api.client.secrets import BrokerSecretSource, SecretsClient
from broker.envelope import aad
from broker.secrets import reference_hash
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


# -- issue 20: findings 12, 13 (second half), 14 (parts) -----------------------------------------

JUSTIFIED = (("x-broker-justification", "INC-77 verify the webhook key"),)


async def test_refusals_do_not_reveal_whether_a_secret_exists(broker: BrokerHarness) -> None:
    await put(broker)
    web = stub(broker, broker.identity(OTHER_SERVICE))
    existing = await refused(web.Get(get(), metadata=cid("existing")))
    absent = await refused(web.Get(get("secret://payments/prod/nope"), metadata=cid("absent")))
    assert existing.code() == absent.code() == grpc.StatusCode.PERMISSION_DENIED
    assert existing.details() == absent.details()
    assert "payments" not in (existing.details() or "")
    # The ledger still tells the operators which rule refused the existing one.
    assert (await broker.event_for("existing"))["rule"] == "cross-service"


async def test_tampered_metadata_is_refused_over_grpc_and_audited(broker: BrokerHarness) -> None:
    """`UPDATE secrets SET owner = 'web'`: web does not get payments' secret, nobody is served
    the value, and the refusal is in the ledger."""
    value = await put(broker)
    async with broker.app.storage.backend.transaction(write=True) as tx:  # type: ignore[attr-defined]
        await tx.execute("UPDATE secrets SET owner = 'web', service = 'web' WHERE ref = ?", REF)
    web = stub(broker, broker.identity(OTHER_SERVICE))
    err = await refused(web.Get(get(), metadata=cid("tampered-web")))
    assert err.code() == grpc.StatusCode.PERMISSION_DENIED
    ops = await refused(stub(broker).Get(get(), metadata=(*cid("tampered-op"), *JUSTIFIED)))
    assert ops.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "integrity" in (ops.details() or "")
    event = await broker.event_for("tampered-op")
    assert event["outcome"] == "FAILED_PRECONDITION" and "integrity" in event["error"]
    assert event["details"]["integrity"] == "metadata MAC mismatch"
    text = await ledger_text(broker)
    assert value.decode() not in text


async def test_the_owner_must_be_the_namespace_service(broker: BrokerHarness) -> None:
    ops = stub(broker)
    request = secrets_pb2.PutSecretRequest(
        reference="secret://payments/prod/x",
        value=b"y" * 24,
        owner="web",
        classification="internal",
        rotation_period_seconds=86400,
    )
    err = await refused(ops.Put(request))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "does not match the secret's namespace 'payments'" in (err.details() or "")
    assert not await broker.app.secrets.repository.list_secrets(prefix="secret://payments/")
    # Without --owner the namespace service owns it, and only it reads it.
    request.owner = ""
    info = await ops.Put(request)
    assert info.metadata.owner == "payments"
    web = stub(broker, broker.identity(OTHER_SERVICE))
    assert (await refused(web.Get(get("secret://payments/prod/x")))).code() == (
        grpc.StatusCode.PERMISSION_DENIED
    )
    owner = stub(broker, broker.identity(OWNER))
    assert (await owner.Get(get("secret://payments/prod/x"))).value == b"y" * 24


async def test_a_mismatched_legacy_owner_serves_no_workload(broker: BrokerHarness) -> None:
    """A row stored before the rule with owner 'web' under secret://payments/: neither web (the
    namespace rule) nor payments (not the owner) reads it without a grant."""
    app = broker.app
    now = broker.clock.now()
    blob = await app.envelope.seal("default", b"legacy-value-456", aad("default", REF, 1))
    await app.secrets.repository.insert_secret(
        SecretRecord(
            "default", REF, "payments", "prod", "web", "internal", 86400, now, 1, "active", now
        ),
        VersionRecord(1, blob.kek_label, blob.to_bytes(), now),
    )
    web = stub(broker, broker.identity(OTHER_SERVICE))
    await refused(web.Get(get(), metadata=cid("legacy-web")))
    assert (await broker.event_for("legacy-web"))["rule"] == "namespace"
    payments = stub(broker, broker.identity(OWNER))
    err = await refused(payments.Get(get()))
    assert err.code() == grpc.StatusCode.PERMISSION_DENIED


async def test_people_justify_prod_and_pii_reads_workloads_declare_a_purpose(
    broker: BrokerHarness,
) -> None:
    value = await put(broker)  # prod
    ops = stub(broker)
    err = await refused(ops.Get(get(), metadata=cid("unjustified")))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "justification is required to read a prod secret" in (err.details() or "")
    assert (await broker.event_for("unjustified"))["outcome"] == "INVALID_ARGUMENT"
    read = await ops.Get(get(), metadata=(*cid("justified"), *JUSTIFIED))
    assert read.value == value
    assert (await broker.event_for("justified"))["why"] == JUSTIFIED[0][1]
    # A dev, internal secret needs none.
    dev = "secret://payments/dev/token"
    await put(broker, dev)
    await stub(broker).Show(secrets_pb2.ShowSecretRequest(reference=dev))
    assert (await ops.Get(get(dev))).value
    # A workload reads without a justification; its declared purpose is in the ledger.
    owner = stub(broker, broker.identity(OWNER))
    purpose = (("x-broker-purpose", "checkout: charge cards"),)
    assert (await owner.Get(get(), metadata=(*cid("purpose"), *purpose))).value == value
    assert (await broker.event_for("purpose"))["details"]["purpose"] == "checkout: charge cards"
    bad = await refused(owner.Get(get(), metadata=(("x-broker-purpose", "x" * 300),)))
    assert bad.code() == grpc.StatusCode.INVALID_ARGUMENT


async def test_a_wildcard_grant_covers_references_not_digests(broker: BrokerHarness) -> None:
    from broker.api._proto import access_pb2, access_pb2_grpc

    value = await put(broker)
    web = broker.identity(OTHER_SERVICE)
    access = access_pb2_grpc.AccessStub(broker.channel(broker.operator))

    async def grant(resource: str) -> None:
        await access.CreateGrant(
            access_pb2.CreateGrantRequest(
                grantee=OTHER_SERVICE,
                action="secrets.get",
                resource=resource,
                ttl_seconds=3600,
                justification="INC-5 migrate",
            )
        )

    await grant(reference_hash(REF)[:2] + "*")  # the attack: a prefix of the digest
    err = await refused(stub(broker, web).Get(get()))
    assert err.code() == grpc.StatusCode.PERMISSION_DENIED
    await grant("secret://payments/prod/*")  # the documented form
    assert (await stub(broker, web).Get(get(), metadata=cid("granted"))).value == value
    assert (await broker.event_for("granted"))["rule"] == "grant"
    star = await refused(
        access.CreateGrant(
            access_pb2.CreateGrantRequest(
                grantee=OTHER_SERVICE,
                action="*",
                resource=REF,
                ttl_seconds=3600,
                justification="everything",
            )
        )
    )
    assert star.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "'*' is refused" in (star.details() or "")


async def test_the_sdk_sends_the_workload_purpose(broker: BrokerHarness) -> None:
    value = await put(broker)
    owner = broker.identity(OWNER)
    client = BrokerClient(
        broker.address,
        ClientCredentials(owner.chain_pem, owner.key_pem, broker.bundle_pem),
        timeout=5,
    )
    source = BrokerSecretSource(SecretsClient(client), purpose="billing: nightly invoices")
    try:
        assert (await asyncio.to_thread(source.fetch, REF)).value == value
    finally:
        client.close()
    reads = [e for e in await broker.events() if e.get("what") == "secrets.get"]
    assert reads[-1]["details"]["purpose"] == "billing: nightly invoices"
    assert reads[-1]["decision"] == "allow"
