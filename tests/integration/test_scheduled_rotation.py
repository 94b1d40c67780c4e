"""Scheduled rotation through the whole application on SoftHSM2 and a fake clock: a secret
put with `generate_length` over gRPC is remade by the application's leader-held job at its
rotation period (new value served by Get, old version kept for the window, the rotation in
the audit ledger with the versions before and after); one put with a value from outside is
reported due (ledger event that raises the `secret.due` notification, `secrets due`) and not
touched; after 90 days every data key is renewed and every value still reads the same."""

from __future__ import annotations

import pytest

from broker.api._proto import secrets_pb2, secrets_pb2_grpc
from broker.notifications import classify
from ca.keys import Pkcs11Backend

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
