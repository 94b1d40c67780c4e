"""The Kms service over real mTLS, in process, with every key operation on SoftHSM2 (in process
and through p11-kit remoting where the test names `hsm_broker`): keys as
named resources, envelope encryption with encryption contexts, rotation that keeps old data
readable, signing, the owner rule, and every bad input of issue 16 refused with nothing changed.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
from typing import Any

import grpc
import pytest
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa

from broker.api._proto import kms_pb2, kms_pb2_grpc
from broker.api.client.base import BrokerClient, ClientCredentials
from broker.api.client.kms import BrokerDataKeySource, KmsClient
from broker.kms import context_hash
from broker.kms.sdk import KmsEnvelope, LocalDataKeyCache
from ca.keys import Pkcs11Backend

from .conftest import CORRELATION_HEADER, BrokerFactory, BrokerHarness, Identity

OWNER = "spiffe://example.org/default/prod/orders"
OTHER_SERVICE = "spiffe://example.org/default/prod/web"
OTHER_TENANT = "spiffe://example.org/beta/prod/orders"
DAY = 86400


@pytest.fixture(params=["pkcs11", "pkcs11-remote"])
async def hsm_broker(
    request: pytest.FixtureRequest, broker_factory: BrokerFactory
) -> BrokerHarness:
    """A broker whose keys are in SoftHSM2: in process, or behind `p11-kit server` (the
    remote HSM path)."""
    if request.param == "pkcs11-remote":
        remote = request.getfixturevalue("p11kit_token")
        keys = Pkcs11Backend(remote.token_label, remote.pin, module_path=remote.module_path)
    else:
        keys = request.getfixturevalue("pkcs11_backend")
    return await broker_factory(keys=keys)


@pytest.fixture
async def softhsm_broker(
    broker_factory: BrokerFactory, pkcs11_backend: Pkcs11Backend
) -> BrokerHarness:
    return await broker_factory(keys=pkcs11_backend)


def cid(name: str) -> tuple[tuple[str, str], ...]:
    return ((CORRELATION_HEADER, name),)


def stub(broker: BrokerHarness, identity: Identity | None = None) -> Any:
    return kms_pb2_grpc.KmsStub(broker.channel(identity or broker.operator))


async def create(
    broker: BrokerHarness,
    name: str = "orders-dek",
    *,
    purpose: str = "encrypt",
    key_type: str = "aes-256",
    classification: str = "confidential",
    **kw: Any,
) -> Any:
    request = kms_pb2.CreateKeyRequest(
        name=name,
        purpose=purpose,
        key_type=key_type,
        owner="orders",
        environment="prod",
        classification=classification,
        rotation_period_seconds=90 * DAY,
        **kw,
    )
    return await stub(broker).CreateKey(request)


async def refused(call: Any) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await call
    return info.value


def sdk_client(broker: BrokerHarness, identity: Identity) -> BrokerClient:
    return BrokerClient(
        broker.address,
        ClientCredentials(
            cert_chain=identity.chain_pem,
            private_key=identity.key_pem,
            root_certificates=broker.bundle_pem,
        ),
    )


async def key_state(broker: BrokerHarness, name: str = "orders-dek") -> Any:
    return await stub(broker).ShowKey(kms_pb2.KeyRequest(name=name))


async def test_sdk_encrypts_rotates_twice_and_decrypts_all_three_generations(
    hsm_broker: BrokerHarness,
) -> None:
    broker = hsm_broker
    created = await create(broker)
    assert created.metadata.current_version == 1 and created.metadata.state == "enabled"
    # Generated inside the token, not extractable.
    keys = broker.app.keys
    assert isinstance(keys, Pkcs11Backend)
    owner = broker.identity(OWNER)

    def run_sdk() -> list[bytes]:
        with sdk_client(broker, owner) as client:
            kms = KmsClient(client)
            envelope = KmsEnvelope(
                BrokerDataKeySource(kms), "orders-dek", LocalDataKeyCache(max_uses=1)
            )
            return [envelope.encrypt(b"generation 1", {"order": "42"})]

    blobs = await asyncio.to_thread(run_sdk)
    await stub(broker).RotateKey(kms_pb2.KeyRequest(name="orders-dek"))
    blobs += await asyncio.to_thread(run_sdk)
    await stub(broker).RotateKey(kms_pb2.KeyRequest(name="orders-dek"))
    blobs += await asyncio.to_thread(run_sdk)
    shown = await key_state(broker)
    assert shown.metadata.current_version == 3
    assert [v.version for v in shown.versions] == [1, 2, 3]

    def read_all() -> list[bytes]:
        with sdk_client(broker, owner) as client:
            envelope = KmsEnvelope(BrokerDataKeySource(KmsClient(client)), "orders-dek")
            return [envelope.decrypt(b, {"order": "42"}) for b in blobs]

    assert await asyncio.to_thread(read_all) == [b"generation 1"] * 3
    # New data is encrypted under the current version; every version stays in the token.
    response = await stub(broker, owner).Encrypt(
        kms_pb2.EncryptRequest(key="orders-dek", plaintext=b"x")
    )
    assert response.key_version == 3
    versions = await broker.app.kms.repository.list_versions("default", "orders-dek")
    for v in versions:
        assert keys.has_key(v.label)


async def test_data_keys_and_payloads_round_trip_and_the_audit_names_only_the_context_hash(
    hsm_broker: BrokerHarness,
) -> None:
    broker = hsm_broker
    await create(broker)
    owner = stub(broker, broker.identity(OWNER))
    context = {"tenant-row": "customer-7", "table": "cards"}
    data_key = await owner.GenerateDataKey(
        kms_pb2.GenerateDataKeyRequest(key="orders-dek", context=context), metadata=cid("dk")
    )
    assert len(data_key.plaintext) == 32 and data_key.key_version == 1
    opened = await owner.Decrypt(
        kms_pb2.DecryptRequest(ciphertext=data_key.ciphertext, context=context),
        metadata=cid("open"),
    )
    assert opened.plaintext == data_key.plaintext and opened.key == "orders-dek"
    sealed = await owner.Encrypt(
        kms_pb2.EncryptRequest(key="orders-dek", plaintext=b"pan 4111", context=context)
    )
    assert (
        await owner.Decrypt(kms_pb2.DecryptRequest(ciphertext=sealed.ciphertext, context=context))
    ).plaintext == b"pan 4111"
    event = await broker.event_for("dk")
    assert event["decision"] == "allow" and event["rule"] == "owner"
    assert event["details"]["context_sha256"] == context_hash(context)
    text = json.dumps(await broker.events())
    assert "customer-7" not in text and data_key.plaintext.hex() not in text

    # ReEncrypt moves data to the current version without handing out the plaintext.
    await stub(broker).RotateKey(kms_pb2.KeyRequest(name="orders-dek"))
    moved = await owner.ReEncrypt(
        kms_pb2.ReEncryptRequest(ciphertext=sealed.ciphertext, context=context)
    )
    assert moved.key_version == 2 and not hasattr(moved, "plaintext")
    again = await owner.Decrypt(
        kms_pb2.DecryptRequest(ciphertext=moved.ciphertext, context=context)
    )
    assert again.plaintext == b"pan 4111" and again.key_version == 2


async def test_sign_verify_and_public_key_on_the_token(hsm_broker: BrokerHarness) -> None:
    broker = hsm_broker
    await create(broker, "orders-sign", purpose="sign", key_type="ec-p256")
    owner = stub(broker, broker.identity(OWNER))
    signed = await owner.Sign(kms_pb2.SignRequest(key="orders-sign", message=b"invoice 9"))
    pem = await owner.GetPublicKey(kms_pb2.GetPublicKeyRequest(key="orders-sign"))
    public = serialization.load_pem_public_key(pem.public_key_pem.encode())
    assert isinstance(public, ec.EllipticCurvePublicKey)
    public.verify(signed.signature, b"invoice 9", ec.ECDSA(hashes.SHA256()))
    digest = hashlib.sha256(b"invoice 9").digest()
    verified = await owner.Verify(
        kms_pb2.VerifyRequest(key="orders-sign", digest=digest, signature=signed.signature)
    )
    assert verified.valid
    forged = await owner.Verify(
        kms_pb2.VerifyRequest(key="orders-sign", message=b"invoice 10", signature=signed.signature)
    )
    assert not forged.valid
    # A version-1 signature still verifies after a rotation, by version.
    await stub(broker).RotateKey(kms_pb2.KeyRequest(name="orders-sign"))
    old = await owner.Verify(
        kms_pb2.VerifyRequest(
            key="orders-sign", key_version=1, message=b"invoice 9", signature=signed.signature
        )
    )
    assert old.valid and old.key_version == 1


#: What a verifier outside the broker uses for an rsa-3072 key (docs/kms.md): RSA-PSS, SHA-256,
#: MGF1-SHA-256, a 32-byte salt.
PSS = padding.PSS(mgf=padding.MGF1(hashes.SHA256()), salt_length=32)


def rsa_public(pem: Any) -> rsa.RSAPublicKey:
    assert pem.key_type == "rsa-3072"
    public = serialization.load_pem_public_key(pem.public_key_pem.encode())
    assert isinstance(public, rsa.RSAPublicKey)
    assert public.key_size == 3072 and public.public_numbers().e == 65537
    return public


async def test_rsa_3072_signs_with_pss_verified_outside_the_broker_across_two_rotations(
    hsm_broker: BrokerHarness,
) -> None:
    broker = hsm_broker
    created = await create(broker, "orders-rsa", purpose="sign", key_type="rsa-3072")
    assert created.metadata.key_type == "rsa-3072"
    owner = stub(broker, broker.identity(OWNER))
    message = b"invoice 9"
    signatures: dict[int, bytes] = {}
    for generation in (1, 2, 3):
        if generation > 1:
            await stub(broker).RotateKey(kms_pb2.KeyRequest(name="orders-rsa"))
        signed = await owner.Sign(kms_pb2.SignRequest(key="orders-rsa", message=message))
        assert signed.key_version == generation and len(signed.signature) == 384
        signatures[generation] = signed.signature
        # A raw SHA-256 digest gives a signature over the same message.
        by_digest = await owner.Sign(
            kms_pb2.SignRequest(key="orders-rsa", digest=hashlib.sha256(message).digest())
        )
        current = rsa_public(
            await owner.GetPublicKey(kms_pb2.GetPublicKeyRequest(key="orders-rsa"))
        )
        current.verify(by_digest.signature, message, PSS, hashes.SHA256())
    publics = {
        v: rsa_public(
            await owner.GetPublicKey(kms_pb2.GetPublicKeyRequest(key="orders-rsa", key_version=v))
        )
        for v in signatures
    }
    assert len({p.public_numbers().n for p in publics.values()}) == 3  # a new key each time
    for version, signature in signatures.items():
        # Outside the broker: each version's public key verifies that version's signature ...
        publics[version].verify(signature, message, PSS, hashes.SHA256())
        for other in set(publics) - {version}:  # ... and no other version's key does
            with pytest.raises(InvalidSignature):
                publics[other].verify(signature, message, PSS, hashes.SHA256())
        with pytest.raises(InvalidSignature):
            publics[version].verify(signature, b"invoice 10", PSS, hashes.SHA256())
        # Inside: Verify by version, by message or digest.
        old = await owner.Verify(
            kms_pb2.VerifyRequest(
                key="orders-rsa", key_version=version, message=message, signature=signature
            )
        )
        assert old.valid and old.key_version == version
        digest = hashlib.sha256(message).digest()
        by_digest = await owner.Verify(
            kms_pb2.VerifyRequest(
                key="orders-rsa", key_version=version, digest=digest, signature=signature
            )
        )
        assert by_digest.valid
    forged = await owner.Verify(
        kms_pb2.VerifyRequest(key="orders-rsa", message=b"invoice 10", signature=signatures[3])
    )
    assert not forged.valid
    stale = await owner.Verify(
        kms_pb2.VerifyRequest(key="orders-rsa", message=message, signature=signatures[1])
    )
    assert not stale.valid and stale.key_version == 3


async def test_an_rsa_sign_key_refuses_other_purposes_and_nothing_changes(
    softhsm_broker: BrokerHarness,
) -> None:
    broker = softhsm_broker
    await create(broker, "orders-rsa", purpose="sign", key_type="rsa-3072")
    owner = stub(broker, broker.identity(OWNER))
    before = await key_state(broker, "orders-rsa")
    events_before = len(await broker.events())
    for call in (
        owner.Encrypt(kms_pb2.EncryptRequest(key="orders-rsa", plaintext=b"data")),
        owner.GenerateDataKey(kms_pb2.GenerateDataKeyRequest(key="orders-rsa")),
        owner.Mac(kms_pb2.MacRequest(key="orders-rsa", message=b"data")),
    ):
        err = await refused(call)
        assert err.code() == grpc.StatusCode.FAILED_PRECONDITION, err.details()
        assert "sign key (rsa-3072)" in (err.details() or "")
    wrong_digest = await refused(
        owner.Sign(kms_pb2.SignRequest(key="orders-rsa", digest=b"d" * 48))
    )
    assert wrong_digest.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "digest is 32 bytes" in (wrong_digest.details() or "")
    assert await key_state(broker, "orders-rsa") == before
    assert len(await broker.events()) - events_before >= 4  # every refusal audited


@pytest.mark.parametrize(
    ("spiffe_id", "tenant", "reason"),
    [
        (OTHER_SERVICE, "", "reserved for the owning service"),
        (OTHER_TENANT, "default", "tenant"),
    ],
)
async def test_unauthorized_service_and_wrong_tenant_are_refused_and_audited(
    softhsm_broker: BrokerHarness, spiffe_id: str, tenant: str, reason: str
) -> None:
    broker = softhsm_broker
    await create(broker)
    owner = stub(broker, broker.identity(OWNER))
    sealed = await owner.Encrypt(kms_pb2.EncryptRequest(key="orders-dek", plaintext=b"secret"))
    before = await key_state(broker)
    intruder = stub(broker, broker.identity(spiffe_id))
    for name, call in (
        (
            "deny-decrypt",
            intruder.Decrypt(
                kms_pb2.DecryptRequest(tenant=tenant, ciphertext=sealed.ciphertext),
                metadata=cid("deny-decrypt"),
            ),
        ),
        (
            "deny-dk",
            intruder.GenerateDataKey(
                kms_pb2.GenerateDataKeyRequest(tenant=tenant, key="orders-dek"),
                metadata=cid("deny-dk"),
            ),
        ),
    ):
        err = await refused(call)
        assert err.code() == grpc.StatusCode.PERMISSION_DENIED, err.details()
        assert "secret" not in (err.details() or "")
        event = await broker.event_for(name)
        assert event["decision"] == "deny" and reason in event["reason"]
    assert await key_state(broker) == before
    # The owner still decrypts.
    opened = await owner.Decrypt(kms_pb2.DecryptRequest(ciphertext=sealed.ciphertext))
    assert opened.plaintext == b"secret"


async def test_a_wrong_encryption_context_is_refused_and_audited(
    softhsm_broker: BrokerHarness,
) -> None:
    broker = softhsm_broker
    await create(broker)
    owner = stub(broker, broker.identity(OWNER))
    sealed = await owner.Encrypt(
        kms_pb2.EncryptRequest(key="orders-dek", plaintext=b"pan", context={"order": "1"})
    )
    for context in ({"order": "2"}, {}, {"order": "1", "extra": "x"}):
        err = await refused(
            owner.Decrypt(
                kms_pb2.DecryptRequest(ciphertext=sealed.ciphertext, context=context),
                metadata=cid(f"ctx-{len(context)}-{context.get('order')}"),
            )
        )
        assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "encryption context" in (err.details() or "")
        event = await broker.event_for(f"ctx-{len(context)}-{context.get('order')}")
        assert event["outcome"] == "INVALID_ARGUMENT"
        assert event["details"]["context_sha256"] == context_hash(context)
    opened = await owner.Decrypt(
        kms_pb2.DecryptRequest(ciphertext=sealed.ciphertext, context={"order": "1"})
    )
    assert opened.plaintext == b"pan"


async def test_bad_input_is_refused_and_nothing_changes(softhsm_broker: BrokerHarness) -> None:
    broker = softhsm_broker
    await create(broker)
    await create(broker, "orders-sign", purpose="sign", key_type="ec-p256")
    await create(broker, "orders-dek-2")
    admin = stub(broker)
    owner = stub(broker, broker.identity(OWNER))
    sealed = (
        await owner.Encrypt(kms_pb2.EncryptRequest(key="orders-dek", plaintext=b"data"))
    ).ciphertext
    other_tenant_key = await admin.CreateKey(
        kms_pb2.CreateKeyRequest(
            tenant="beta",
            name="orders-dek",
            purpose="encrypt",
            key_type="aes-256",
            owner="orders",
            environment="prod",
            classification="internal",
            rotation_period_seconds=90 * DAY,
        )
    )
    assert other_tenant_key.metadata.tenant == "beta"
    beta_owner = stub(broker, broker.identity(OTHER_TENANT))
    beta_sealed = (
        await beta_owner.Encrypt(kms_pb2.EncryptRequest(key="orders-dek", plaintext=b"beta"))
    ).ciphertext
    before = [await key_state(broker, n) for n in ("orders-dek", "orders-sign", "orders-dek-2")]
    events_before = len(await broker.events())

    def bad_create(**kw: Any) -> Any:
        fields = {
            "name": "new-key",
            "purpose": "encrypt",
            "key_type": "aes-256",
            "owner": "orders",
            "environment": "prod",
            "classification": "internal",
            "rotation_period_seconds": 90 * DAY,
        } | kw
        return admin.CreateKey(kms_pb2.CreateKeyRequest(**fields))

    cases: list[tuple[Any, grpc.StatusCode, str]] = [
        (
            owner.Encrypt(kms_pb2.EncryptRequest(key="nope", plaintext=b"x")),
            grpc.StatusCode.PERMISSION_DENIED,
            "no such key",
        ),
        (admin.RotateKey(kms_pb2.KeyRequest(name="nope")), grpc.StatusCode.NOT_FOUND, "no key"),
        (
            owner.Sign(kms_pb2.SignRequest(key="orders-dek", message=b"x")),
            grpc.StatusCode.FAILED_PRECONDITION,
            "cannot be used to sign",
        ),
        (
            owner.Encrypt(kms_pb2.EncryptRequest(key="orders-sign", plaintext=b"x")),
            grpc.StatusCode.FAILED_PRECONDITION,
            "cannot be used to encrypt",
        ),
        (
            owner.Decrypt(kms_pb2.DecryptRequest(ciphertext=sealed[:-2])),
            grpc.StatusCode.INVALID_ARGUMENT,
            "did not verify",
        ),
        (
            owner.Decrypt(kms_pb2.DecryptRequest(ciphertext=sealed[:20])),
            grpc.StatusCode.INVALID_ARGUMENT,
            "malformed ciphertext",
        ),
        (
            owner.Decrypt(kms_pb2.DecryptRequest(ciphertext=b"garbage")),
            grpc.StatusCode.INVALID_ARGUMENT,
            "malformed ciphertext",
        ),
        (
            owner.Decrypt(kms_pb2.DecryptRequest(ciphertext=sealed[:-1] + bytes([sealed[-1] ^ 1]))),
            grpc.StatusCode.INVALID_ARGUMENT,
            "did not verify",
        ),
        (
            owner.Decrypt(kms_pb2.DecryptRequest(ciphertext=beta_sealed)),
            grpc.StatusCode.INVALID_ARGUMENT,
            "another tenant",
        ),
        (
            owner.Decrypt(kms_pb2.DecryptRequest(ciphertext=sealed, key="orders-dek-2")),
            grpc.StatusCode.INVALID_ARGUMENT,
            "another key",
        ),
        (
            owner.Encrypt(kms_pb2.EncryptRequest(key="orders-dek", plaintext=b"x" * 4097)),
            grpc.StatusCode.INVALID_ARGUMENT,
            "at most 4096",
        ),
        (
            owner.Encrypt(
                kms_pb2.EncryptRequest(key="orders-dek", plaintext=b"x", context={"k": "v" * 5000})
            ),
            grpc.StatusCode.INVALID_ARGUMENT,
            "encryption context is at most",
        ),
        (
            owner.Encrypt(
                kms_pb2.EncryptRequest(
                    key="orders-dek", plaintext=b"x", context={f"k{i}": "v" for i in range(40)}
                )
            ),
            grpc.StatusCode.INVALID_ARGUMENT,
            "at most 32 pairs",
        ),
        (
            owner.Sign(kms_pb2.SignRequest(key="orders-sign", digest=b"short")),
            grpc.StatusCode.INVALID_ARGUMENT,
            "digest is 32 bytes",
        ),
        (
            owner.Verify(kms_pb2.VerifyRequest(key="orders-sign", key_version=7, message=b"x")),
            grpc.StatusCode.NOT_FOUND,
            "no version 7",
        ),
        (bad_create(rotation_period_seconds=3600), grpc.StatusCode.INVALID_ARGUMENT, "1 day"),
        (
            bad_create(rotation_period_seconds=3651 * DAY),
            grpc.StatusCode.INVALID_ARGUMENT,
            "10 years",
        ),
        (bad_create(purpose="sign"), grpc.StatusCode.INVALID_ARGUMENT, "cannot sign"),
        (
            bad_create(key_type="rsa-3072", purpose="encrypt"),
            grpc.StatusCode.INVALID_ARGUMENT,
            "cannot encrypt",
        ),
        (
            bad_create(key_type="rsa-4096", purpose="sign"),
            grpc.StatusCode.INVALID_ARGUMENT,
            "is not one of",
        ),
        (bad_create(name="orders-dek"), grpc.StatusCode.ALREADY_EXISTS, "already exists"),
        (bad_create(name="Bad Name"), grpc.StatusCode.INVALID_ARGUMENT, "invalid"),
        (
            admin.ScheduleDestroy(
                kms_pb2.ScheduleDestroyRequest(name="orders-dek", after_seconds=30 * DAY)
            ),
            grpc.StatusCode.FAILED_PRECONDITION,
            "not disabled",
        ),
    ]
    for call, code, text in cases:
        err = await refused(call)
        assert err.code() == code, (text, err.details())
        assert text in (err.details() or ""), (text, err.details())
    after = [await key_state(broker, n) for n in ("orders-dek", "orders-sign", "orders-dek-2")]
    assert after == before
    assert await broker.app.kms.repository.get_key("default", "new-key") is None
    events = await broker.events()
    assert len(events) - events_before >= len(cases) - 1  # every refusal audited
    # Still works afterwards.
    assert (await owner.Decrypt(kms_pb2.DecryptRequest(ciphertext=sealed))).plaintext == b"data"


async def test_disabled_and_destroyed_keys_refuse_every_use(softhsm_broker: BrokerHarness) -> None:
    broker = softhsm_broker
    await create(broker)
    admin = stub(broker)
    owner = stub(broker, broker.identity(OWNER))
    sealed = (
        await owner.Encrypt(kms_pb2.EncryptRequest(key="orders-dek", plaintext=b"data"))
    ).ciphertext
    await admin.DisableKey(kms_pb2.KeyRequest(name="orders-dek"))
    err = await refused(owner.Decrypt(kms_pb2.DecryptRequest(ciphertext=sealed)))
    assert err.code() == grpc.StatusCode.FAILED_PRECONDITION and "disabled" in err.details()
    await admin.EnableKey(kms_pb2.KeyRequest(name="orders-dek"))
    assert (await owner.Decrypt(kms_pb2.DecryptRequest(ciphertext=sealed))).plaintext == b"data"
    await admin.DisableKey(kms_pb2.KeyRequest(name="orders-dek"))
    scheduled = await admin.ScheduleDestroy(
        kms_pb2.ScheduleDestroyRequest(name="orders-dek", after_seconds=30 * DAY)
    )
    assert scheduled.metadata.state == "pending-destroy"
    cancelled = await admin.CancelDestroy(kms_pb2.KeyRequest(name="orders-dek"))
    assert cancelled.metadata.state == "disabled"
    await admin.ScheduleDestroy(
        kms_pb2.ScheduleDestroyRequest(name="orders-dek", after_seconds=30 * DAY)
    )
    versions = await broker.app.kms.repository.list_versions("default", "orders-dek")
    broker.clock.advance(days=29)
    assert await broker.app.kms.destroy_due() == []
    assert broker.app.keys.has_key(versions[0].label)
    broker.clock.advance(days=2)
    assert await broker.app.kms.destroy_due() == [("default", "orders-dek")]
    assert not broker.app.keys.has_key(versions[0].label)
    shown = await key_state(broker)
    assert shown.metadata.state == "destroyed" and shown.versions[0].state == "destroyed"
    err = await refused(owner.Decrypt(kms_pb2.DecryptRequest(ciphertext=sealed)))
    assert err.code() == grpc.StatusCode.FAILED_PRECONDITION and "destroyed" in err.details()


async def test_administrative_changes_to_a_prod_pii_key_need_a_second_operator(
    softhsm_broker: BrokerHarness,
) -> None:
    broker = softhsm_broker
    await create(broker, "cards-kek", classification="pii")
    admin = stub(broker)
    before = await key_state(broker, "cards-kek")
    request = kms_pb2.KeyRequest(name="cards-kek")
    for name, method in (("pii-rotate", admin.RotateKey), ("pii-disable", admin.DisableKey)):
        err = await refused(method(request, metadata=cid(name)))
        assert err.code() == grpc.StatusCode.PERMISSION_DENIED
        assert "second operator" in (err.details() or "")
        event = await broker.event_for(name)
        assert event["decision"] == "deny" and event["rule"] == "two-person"
    assert await key_state(broker, "cards-kek") == before
    # The owning service still uses it.
    owner = stub(broker, broker.identity(OWNER))
    sealed = await owner.Encrypt(kms_pb2.EncryptRequest(key="cards-kek", plaintext=b"pan"))
    assert sealed.key_version == 1


async def test_keys_rotate_every_90_days_unless_told_otherwise(
    softhsm_broker: BrokerHarness,
) -> None:
    created = await stub(softhsm_broker).CreateKey(
        kms_pb2.CreateKeyRequest(
            name="default-period",
            purpose="mac",
            key_type="hmac-sha256",
            owner="orders",
            environment="prod",
            classification="internal",
        )
    )
    assert created.metadata.rotation_period_seconds == 90 * DAY
    owner = stub(softhsm_broker, softhsm_broker.identity(OWNER))
    tag = await owner.Mac(kms_pb2.MacRequest(key="default-period", message=b"m"))
    ok = await owner.VerifyMac(
        kms_pb2.VerifyMacRequest(key="default-period", message=b"m", mac=tag.mac)
    )
    bad = await owner.VerifyMac(
        kms_pb2.VerifyMacRequest(key="default-period", message=b"n", mac=tag.mac)
    )
    assert ok.valid and not bad.valid


async def test_a_key_row_altered_in_the_database_is_refused_and_nothing_changes(
    softhsm_broker: BrokerHarness,
) -> None:
    """The attack: someone with database write access (no key access) makes the key theirs
    (`UPDATE kms_keys SET owner = 'web'`) to decrypt the owner's data. Refused for everyone,
    audited, and the row and the token are left as they were."""
    broker = softhsm_broker
    await create(broker)
    owner = stub(broker, broker.identity(OWNER))
    sealed = await owner.Encrypt(kms_pb2.EncryptRequest(key="orders-dek", plaintext=b"card"))
    async with broker.app.storage.backend.transaction(write=True) as tx:
        await tx.execute(
            "UPDATE kms_keys SET owner = 'web' WHERE tenant = 'default' AND name = 'orders-dek'"
        )
    web = stub(broker, broker.identity(OTHER_SERVICE))
    err = await refused(
        web.Decrypt(kms_pb2.DecryptRequest(ciphertext=sealed.ciphertext), metadata=cid("tamper"))
    )
    assert err.code() == grpc.StatusCode.PERMISSION_DENIED
    assert "card" not in (err.details() or "")
    event = await broker.event_for("tamper")
    assert event["decision"] == "deny" and event["details"]["integrity"] == "metadata MAC mismatch"
    # The real owner and operators are refused too until the row is restored; nothing rotates.
    err = await refused(owner.Decrypt(kms_pb2.DecryptRequest(ciphertext=sealed.ciphertext)))
    assert err.code() == grpc.StatusCode.PERMISSION_DENIED
    err = await refused(stub(broker).RotateKey(kms_pb2.KeyRequest(name="orders-dek")))
    assert err.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "integrity check failed" in (err.details() or "")
    versions = await broker.app.kms.repository.list_versions("default", "orders-dek")
    assert [v.version for v in versions] == [1]
    broker.clock.advance(days=91)
    assert await broker.app.kms.due() == []  # the lifecycle job never rotates it either
    record = await broker.app.kms.repository.get_key("default", "orders-dek")
    assert record is not None and record.owner == "web" and record.current_version == 1
    # Restored: the owner decrypts again.
    async with broker.app.storage.backend.transaction(write=True) as tx:
        await tx.execute(
            "UPDATE kms_keys SET owner = 'orders' WHERE tenant = 'default' AND name = 'orders-dek'"
        )
    opened = await owner.Decrypt(kms_pb2.DecryptRequest(ciphertext=sealed.ciphertext))
    assert opened.plaintext == b"card"


async def test_an_unknown_key_and_a_refused_key_answer_the_same_to_a_workload(
    softhsm_broker: BrokerHarness,
) -> None:
    """Through the pipeline: the other service is refused with one message, the same code and
    the same text for the owner's key and for a name nobody has, both audited as refusals with
    the real reason; nothing is created or changed. An operator learns the absent one is absent."""
    broker = softhsm_broker
    await create(broker)
    before = await key_state(broker)
    intruder = stub(broker, broker.identity(OTHER_SERVICE))
    answers: dict[str, list[tuple[grpc.StatusCode, str]]] = {}
    for name in ("orders-dek", "no-such-key"):
        calls = (
            ("enc", intruder.Encrypt(kms_pb2.EncryptRequest(key=name, plaintext=b"x"),
                                     metadata=cid(f"enc-{name}"))),
            ("dk", intruder.GenerateDataKey(kms_pb2.GenerateDataKeyRequest(key=name),
                                            metadata=cid(f"dk-{name}"))),
            ("mac", intruder.Mac(kms_pb2.MacRequest(key=name, message=b"x"),
                                 metadata=cid(f"mac-{name}"))),
        )  # fmt: skip
        for label, call in calls:
            err = await refused(call)
            answers.setdefault(label, []).append((err.code(), err.details() or ""))
            event = await broker.event_for(f"{label}-{name}")
            assert event["decision"] == "deny" and event["reason"]
    for label, (existing, absent) in answers.items():
        assert existing == absent, label
        assert existing[0] == grpc.StatusCode.PERMISSION_DENIED
        assert "orders" not in existing[1] and "no-such-key" not in existing[1]
    assert await key_state(broker) == before
    listed = await stub(broker).ListKeys(kms_pb2.ListKeysRequest())
    assert [k.name for k in listed.keys] == ["orders-dek"]
    err = await refused(stub(broker).ShowKey(kms_pb2.KeyRequest(name="no-such-key")))
    assert err.code() == grpc.StatusCode.NOT_FOUND
