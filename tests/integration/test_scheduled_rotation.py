"""Scheduled rotation through the whole application on SoftHSM2 and a fake clock: a secret
put with `generate_length` over gRPC is remade by the application's leader-held job at its
rotation period (new value served by Get, old version kept for the window, the rotation in
the audit ledger with the versions before and after); one put with a value from outside is
reported due (ledger event that raises the `secret.due` notification, `secrets due`) and not
touched; after 90 days every data key is renewed and every value still reads the same. The
`secret.due` notification reaches a real HTTPS receiver, signed, once per due date."""

from __future__ import annotations

import datetime as dt
import json
from pathlib import Path

import pytest

from broker.api._proto import secrets_pb2, secrets_pb2_grpc
from broker.audit import AuditLedger
from broker.config import NotifyChannel
from broker.envelope import Envelope
from broker.notifications import NOTIFY_KEY_LABEL, Notifier, classify
from broker.rotation.origins import ValueOrigins
from broker.rotation.schedule import SecretRotationJob
from broker.secrets import MetadataMac, SecretService
from broker.storage.factory import open_storage
from ca.clock import FakeClock
from ca.keys import Pkcs11Backend, SoftwareBackend, mac_signer
from tests.fixtures.webhook import WebhookReceiver

from .conftest import BrokerFactory, BrokerHarness

GENERATED = "secret://orders/dev/db-password"
EXTERNAL = "secret://orders/dev/psp-api-key"


@pytest.fixture
async def softhsm_broker(
    broker_factory: BrokerFactory, pkcs11_backend: Pkcs11Backend
) -> BrokerHarness:
    return await broker_factory(keys=pkcs11_backend)


async def test_generated_secrets_rotate_third_party_ones_are_due_data_keys_renew(
    softhsm_broker: BrokerHarness,
) -> None:
    broker = softhsm_broker
    app = broker.app
    stub = secrets_pb2_grpc.SecretsStub(broker.channel(broker.operator))
    for ref, source in ((GENERATED, {"generate_length": 40}), (EXTERNAL, {"value": b"psp-1"})):
        await stub.Put(
            secrets_pb2.PutSecretRequest(
                reference=ref,
                owner="orders",
                classification="internal",
                rotation_period_seconds=86400,
                **source,  # type: ignore[arg-type]
            )
        )
    first = await stub.Get(secrets_pb2.GetSecretRequest(reference=GENERATED))
    assert first.version == 1 and len(first.value) == 40
    assert await app.data_key_rotation.tick() is not None  # the tenants' period starts
    assert (await app.secret_rotation.tick()).rotated == []  # type: ignore[union-attr]

    broker.clock.advance(days=1, minutes=1)
    run = await app.secret_rotation.tick()
    assert run is not None
    assert [(r[1], r[2], r[3]) for r in run.rotated] == [(GENERATED, 1, 2)]
    assert [ref for _, ref in run.due] == [EXTERNAL]
    second = await stub.Get(secrets_pb2.GetSecretRequest(reference=GENERATED))
    assert second.version == 2 and len(second.value) == 40 and second.value != first.value
    old = await stub.Get(secrets_pb2.GetSecretRequest(reference=GENERATED, version=1))
    assert old.value == first.value
    external = await stub.Get(secrets_pb2.GetSecretRequest(reference=EXTERNAL))
    assert external.version == 1 and external.value == b"psp-1"

    events = await broker.events()
    (rotated,) = [
        e for e in events if e["what"] == "secrets.rotate" and e["who"].startswith("broker/")
    ]
    assert rotated["details"]["before"] == 1 and rotated["details"]["after"] == 2
    (due,) = [e for e in events if e["what"] == "secret.due"]
    assert classify(due) == "secret.due" and due["details"]["version"] == 1
    listed = await stub.Due(secrets_pb2.DueSecretsRequest())
    assert [s.reference for s in listed.secrets] == [EXTERNAL]

    broker.clock.advance(days=90)
    run_keys = await app.data_key_rotation.tick()
    assert run_keys is not None and run_keys.failed == []
    assert run_keys.renewed.get("default", 0) >= 3  # two versions + the third-party one
    for ref, version, value in ((GENERATED, 2, second.value), (EXTERNAL, 1, b"psp-1")):
        got = await stub.Get(secrets_pb2.GetSecretRequest(reference=ref, version=version))
        assert got.value == value
    assert any(e["what"] == "envelope.data-keys.rotate" for e in await broker.events())


async def test_a_due_third_party_secret_is_notified_signed_once(
    tmp_path: Path, webhook: WebhookReceiver
) -> None:
    storage = await open_storage(f"sqlite:///{tmp_path / 'broker.db'}")
    await storage.migrate()
    keys = SoftwareBackend()
    clock = FakeClock(dt.datetime(2026, 6, 1, tzinfo=dt.UTC))
    ledger = AuditLedger(storage, keys, clock=clock)
    await ledger.open()
    ledger.start()
    try:
        notifier = Notifier(
            [NotifyChannel("oncall", webhook.url, webhook.ca_file)], keys, clock, ledger.record
        )
        notifier.ensure_key()
        ledger.add_commit_hook(notifier.observe)
        mac = MetadataMac(keys)
        service = SecretService(storage.secrets(mac), Envelope(keys, storage), clock)
        await service.start(mac)
        origins = ValueOrigins(storage)
        service.value_origin = origins.remember
        job = SecretRotationJob(service, origins, storage, storage, clock, audit=ledger.record)
        await service.put(
            "acme", EXTERNAL, owner="orders", classification="internal",
            rotation_period=dt.timedelta(days=30), value=b"psp-1",
        )  # fmt: skip
        clock.advance(days=31)
        await job.tick()
        clock.advance(minutes=5)
        await job.tick()  # still due: not notified again
        await notifier.drain()
        assert len(webhook.requests) == 1
        headers, body = webhook.requests[0]
        note = json.loads(body)
        assert note["kind"] == "secret.due" and note["who"] == "broker/secret-rotation"
        assert note["details"]["tenant"] == "acme" and note["details"]["version"] == 1
        assert note["details"]["overdue_seconds"] == 86400
        assert b"psp-1" not in body
        expected = "sha256=" + mac_signer(keys).mac(NOTIFY_KEY_LABEL, body).hex()
        assert headers["X-Broker-Signature"] == expected
    finally:
        await ledger.stop()
        await storage.close()
