"""The scheduled key lifecycle on a fake clock: KMS keys rotate at their period (old data
still decrypts), the broker's KEKs rotate yearly with every sealed store rewrapped, scheduled
destructions happen on their date, only the replica holding the leader lease acts, and the
metrics `broker_key_age_seconds` / `broker_key_rotation_total` follow."""

from __future__ import annotations

import uuid
from typing import Any

import pytest
from prometheus_client import REGISTRY

from broker.api._proto import kms_pb2, secrets_pb2, secrets_pb2_grpc
from broker.kms import KeyService
from broker.kms.lifecycle import KeyLifecycleJob
from ca.errors import KeyBackendError
from ca.keys import Pkcs11Backend

from .conftest import BrokerFactory, BrokerHarness
from .test_kms_api import OWNER, create, key_state, stub

REF = "secret://orders/prod/api"


@pytest.fixture
async def softhsm_broker(
    broker_factory: BrokerFactory, pkcs11_backend: Pkcs11Backend
) -> BrokerHarness:
    return await broker_factory(keys=pkcs11_backend)


def rotations(kind: str, outcome: str) -> float:
    value = REGISTRY.get_sample_value(
        "broker_key_rotation_total", {"kind": kind, "outcome": outcome}
    )
    return value or 0.0


async def test_keys_rotate_on_schedule_and_keks_yearly(softhsm_broker: BrokerHarness) -> None:
    broker = softhsm_broker
    app = broker.app
    await create(broker)  # 90 days
    await secrets_pb2_grpc.SecretsStub(broker.channel(broker.operator)).Put(
        secrets_pb2.PutSecretRequest(
            reference=REF,
            value=b"v1",
            owner="orders",
            classification="internal",
            rotation_period_seconds=3650 * 86400,
        )
    )
    owner_id = broker.identity(OWNER)  # minted now: the fake clock moves a year below
    owner = stub(broker, owner_id)
    secrets = secrets_pb2_grpc.SecretsStub(broker.channel(owner_id))
    old = await owner.Encrypt(kms_pb2.EncryptRequest(key="orders-dek", plaintext=b"day 0"))
    kms_before, kek_before = rotations("kms", "success"), rotations("kek", "success")

    first = await app.kms_lifecycle.tick()
    assert first is not None and first.rotated == [] and first.keks_rotated == []
    # Another replica does nothing while this one holds the lease.
    other = KeyLifecycleJob(
        app.kms,
        app.kek_rotator,
        app.secrets.repository,
        app.storage,
        app.storage,
        app.clock,
        f"kms-{uuid.uuid4().hex}",
    )
    broker.clock.advance(days=89)
    assert (await app.kms_lifecycle.tick()).rotated == []  # type: ignore[union-attr]
    assert await other.tick() is None
    assert (await key_state(broker)).metadata.current_version == 1

    broker.clock.advance(days=2)
    run = await app.kms_lifecycle.tick()
    assert run is not None and run.rotated == [("default", "orders-dek", 2)]
    assert (await key_state(broker)).metadata.current_version == 2
    assert rotations("kms", "success") == kms_before + 1
    age = REGISTRY.get_sample_value(
        "broker_key_age_seconds",
        {"kind": "kms", "purpose": "encrypt", "classification": "confidential"},
    )
    assert age == 0.0
    opened = await owner.Decrypt(kms_pb2.DecryptRequest(ciphertext=old.ciphertext))
    assert opened.plaintext == b"day 0" and opened.key_version == 1

    # A year after the job first saw the tenant's KEK: new generation, store rewrapped, old
    # KEK destroyed, the secret still reads.
    kek_before_label = await app.envelope.current_kek("default")
    broker.clock.advance(days=275)
    run = await app.kms_lifecycle.tick()
    assert run is not None and run.keks_rotated == ["kek.default.2"], run
    assert run.keks_kept == []
    assert not app.keys.has_key(kek_before_label)
    assert rotations("kek", "success") == kek_before + 1
    read = await secrets.Get(secrets_pb2.GetSecretRequest(reference=REF))
    assert read.value == b"v1"


async def test_scheduled_destruction_happens_on_its_date(softhsm_broker: BrokerHarness) -> None:
    broker = softhsm_broker
    app = broker.app
    await create(broker)
    admin = stub(broker)
    await admin.DisableKey(kms_pb2.KeyRequest(name="orders-dek"))
    await admin.ScheduleDestroy(
        kms_pb2.ScheduleDestroyRequest(name="orders-dek", after_seconds=7 * 86400)
    )
    assert (await app.kms_lifecycle.tick()).destroyed == []  # type: ignore[union-attr]
    broker.clock.advance(days=7, seconds=1)
    run = await app.kms_lifecycle.tick()
    assert run is not None and run.destroyed == [("default", "orders-dek")]
    assert (await key_state(broker)).metadata.state == "destroyed"


class FailingCreate:
    """The broker's key backend, except that creating a key whose label names `name` fails."""

    def __init__(self, inner: Any, name: str) -> None:
        self._inner = inner
        self._name = name

    def create_key(self, label: str, kind: Any) -> None:
        if f".{self._name}." in label:
            raise KeyBackendError("token is full (injected by the test)")
        self._inner.create_key(label, kind)

    def __getattr__(self, attribute: str) -> Any:
        return getattr(self._inner, attribute)


async def test_a_failed_rotation_is_counted_and_the_others_still_rotate(
    softhsm_broker: BrokerHarness,
) -> None:
    broker = softhsm_broker
    app = broker.app
    await create(broker, "first-dek")
    await create(broker, "second-dek")
    keys = KeyService(app.kms.repository, FailingCreate(app.keys, "first-dek"), app.clock)
    job = KeyLifecycleJob(
        keys,
        app.kek_rotator,
        app.secrets.repository,
        app.storage,
        app.storage,
        app.clock,
        f"kms-{uuid.uuid4().hex}",
    )
    failures = rotations("kms", "failure")
    broker.clock.advance(days=91)
    run = await job.tick()
    assert run is not None
    assert run.failed == [("default", "first-dek")]
    assert run.rotated == [("default", "second-dek", 2)]
    assert rotations("kms", "failure") == failures + 1
    assert (await key_state(broker, "first-dek")).metadata.current_version == 1
