"""Envelope data keys: made by the key backend's random generator, and renewed on schedule
(fake clock): after the period every sealed value of a tenant -- secret versions, database
admin passwords, static-role passwords -- is sealed again under a fresh data key, opens to the
same value, the cached keys go, and the renewal is audited and counted."""

from __future__ import annotations

import datetime as dt
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import REGISTRY

from broker.database.connections import sealed_password_aad
from broker.database.static import sealed_password_aad as static_aad
from broker.envelope import SYSTEM_TENANT, DataKeyCache, Envelope, SealedBlob, aad
from broker.rotation.datakeys import DatabaseDataKeys, DataKeyRotationJob, SecretDataKeys
from broker.secrets import MetadataMac, SecretService
from broker.storage import open_storage
from broker.storage.database import ConnectionRecord, StaticRoleRecord
from broker.storage.sql import SqlStorage
from ca.clock import FakeClock
from ca.keys import SoftwareBackend

T0 = dt.datetime(2026, 6, 1, 9, 0, tzinfo=dt.UTC)
REF = "secret://payments/prod/stripe/api-key"


class RecordingKeys:
    """A software backend whose random generator and wraps are visible to the test."""

    def __init__(self) -> None:
        self._inner = SoftwareBackend()
        self.randoms: list[bytes] = []
        self.wrapped_keys: list[bytes] = []

    def random(self, n: int) -> bytes:
        value = self._inner.random(n)
        self.randoms.append(value)
        return value

    def wrap(self, label: str, data_key: bytes) -> bytes:
        self.wrapped_keys.append(data_key)
        return self._inner.wrap(label, data_key)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)


@dataclass
class World:
    clock: FakeClock
    storage: SqlStorage
    keys: RecordingKeys
    envelope: Envelope
    service: SecretService
    job: DataKeyRotationJob
    events: list[Mapping[str, Any]] = field(default_factory=list)


@pytest.fixture
async def world(tmp_path: Path) -> AsyncIterator[World]:
    storage = await open_storage(f"sqlite://{tmp_path / 'broker.db'}")
    assert isinstance(storage, SqlStorage)
    await storage.migrate()
    try:
        clock = FakeClock(T0)
        keys = RecordingKeys()
        mac = MetadataMac(keys._inner)
        envelope = Envelope(keys, storage, DataKeyCache(clock))  # type: ignore[arg-type]
        service = SecretService(storage.secrets(mac), envelope, clock)
        await service.start(mac)
        world = World(clock, storage, keys, envelope, service, None)  # type: ignore[arg-type]

        async def audit(event: Mapping[str, Any]) -> None:
            world.events.append(event)

        world.job = DataKeyRotationJob(
            envelope,
            [SecretDataKeys(service.repository), DatabaseDataKeys(storage.database())],
            service.repository,
            storage,
            storage,
            clock,
            audit=audit,
            owner="replica-a",
        )
        yield world
    finally:
        await storage.close()


async def test_data_keys_come_from_the_key_backends_generator(world: World) -> None:
    world.keys.randoms.clear()
    await world.envelope.seal("acme", b"value", aad("x"))
    (data_key,) = world.keys.wrapped_keys[-1:]
    assert len(data_key) == 32
    assert any(r[:32] == data_key for r in world.keys.randoms)


async def _versions(w: World) -> dict[int, bytes]:
    return {
        row.version: row.sealed for row in await w.service.repository.sealed_not_under("acme", "")
    }


async def test_every_value_gets_a_fresh_data_key_after_the_period(world: World) -> None:
    await world.service.put(
        "acme", REF, owner="payments", classification="pii",
        rotation_period=dt.timedelta(days=30), value=b"first",
    )  # fmt: skip
    await world.service.rotate(
        "acme", REF, environment="prod", ticket="SEC-1", justification="j", value=b"second"
    )
    admin_aad = sealed_password_aad("db_connections", "pg")
    assert admin_aad is not None
    sealed = await world.envelope.seal(SYSTEM_TENANT, b"admin-pw", admin_aad)
    database = world.storage.database()
    await database.insert_connection(
        ConnectionRecord("pg", "postgresql", "postgresql://a@h/db", sealed.to_bytes(),
                         sealed.kek_label, T0)
    )  # fmt: skip
    role_aad = static_aad("db_static_roles", "app")
    assert role_aad is not None
    role_blob = await world.envelope.seal(SYSTEM_TENANT, b"role-pw", role_aad)
    await database.insert_static_role(
        StaticRoleRecord("app", "pg", "app_user", "svc", "default", "dev", 86400, None,
                         role_blob.to_bytes(), role_blob.kek_label, 1, T0, T0, T0)
    )  # fmt: skip
    before = await _versions(world)
    counted = (
        REGISTRY.get_sample_value(
            "broker_rotation_total", {"kind": "data-key", "outcome": "success"}
        )
        or 0.0
    )

    run = await world.job.tick()  # first sight of the tenants: their period starts now
    assert run is not None and run.renewed == {}
    world.clock.advance(days=90, seconds=-1)
    run = await world.job.tick()
    assert run is not None and run.renewed == {} and await _versions(world) == before

    world.clock.advance(seconds=61)
    run = await world.job.tick()
    assert run is not None and run.renewed == {"acme": 2, SYSTEM_TENANT: 2}
    after = await _versions(world)
    assert set(after) == {1, 2}
    for version in (1, 2):
        old, new = SealedBlob.from_bytes(before[version]), SealedBlob.from_bytes(after[version])
        assert new.wrapped_key != old.wrapped_key and new.ciphertext != old.ciphertext
    for version, value in ((1, b"first"), (2, b"second")):
        blob = SealedBlob.from_bytes(after[version])
        assert world.envelope.open(blob, aad("acme", REF, version)) == value
    loaded = await world.service.load("acme", REF, None)
    assert loaded is not None and (await world.service.reveal(*loaded)).value == b"second"
    connection = await database.get_connection("pg")
    assert connection is not None and connection.sealed_password != sealed.to_bytes()
    assert (
        world.envelope.open(
            SealedBlob.from_bytes(connection.sealed_password),
            admin_aad,
        )
        == b"admin-pw"
    )
    role = await database.get_static_role("app")
    assert role is not None and role.sealed_password is not None
    assert role.sealed_password != role_blob.to_bytes()
    assert world.envelope.open(SealedBlob.from_bytes(role.sealed_password), role_aad) == b"role-pw"
    assert (
        REGISTRY.get_sample_value(
            "broker_rotation_total", {"kind": "data-key", "outcome": "success"}
        )
        == counted + 2
    )
    events = [e for e in world.events if e["what"] == "envelope.data-keys.rotate"]
    assert {(e["resource"], e["outcome"], e["details"]["renewed"]) for e in events} == {
        ("acme", "OK", 2),
        (SYSTEM_TENANT, "OK", 2),
    }

    world.clock.advance(days=1)
    run = await world.job.tick()
    assert run is not None and run.renewed == {}, "next renewal 90 days later"


async def test_only_the_lease_holder_renews(world: World) -> None:
    await world.service.put(
        "acme", REF, owner="payments", classification="pii",
        rotation_period=dt.timedelta(days=30), value=b"first",
    )  # fmt: skip
    await world.job.tick()
    before = await _versions(world)
    world.clock.advance(days=91)
    assert await world.storage.try_lease("envelope.data-keys", "replica-b", 300, world.clock.now())
    assert await world.job.tick() is None
    assert await _versions(world) == before


async def test_a_value_that_does_not_open_fails_the_pass_and_it_is_tried_again(
    world: World,
) -> None:
    await world.service.put(
        "acme", REF, owner="payments", classification="pii",
        rotation_period=dt.timedelta(days=30), value=b"first",
    )  # fmt: skip
    await world.job.tick()
    (row,) = await world.service.repository.sealed_not_under("acme", "")
    blob = SealedBlob.from_bytes(row.sealed)
    damaged = SealedBlob(blob.kek_label, blob.wrapped_key, blob.nonce, b"\x00" * 32)
    async with world.storage.backend.transaction(write=True) as tx:
        await tx.fetch(
            "UPDATE secret_versions SET sealed = ? WHERE ref = ?", damaged.to_bytes(), REF
        )
    world.clock.advance(days=91)
    run = await world.job.tick()
    assert run is not None and run.renewed.get("acme") is None
    assert [tenant for tenant, _ in run.failed] == ["acme"]
    assert [e["outcome"] for e in world.events if e["resource"] == "acme"] == ["failed"]
    assert (await _versions(world))[1] == damaged.to_bytes(), "nothing rewritten"

    async with world.storage.backend.transaction(write=True) as tx:
        await tx.fetch("UPDATE secret_versions SET sealed = ? WHERE ref = ?", row.sealed, REF)
    world.clock.advance(minutes=2)
    run = await world.job.tick()
    assert run is not None and run.renewed == {} and run.failed == [], "retried after 1 h"
    world.clock.advance(hours=1)
    run = await world.job.tick()
    assert run is not None and run.renewed == {"acme": 1}, "the period still counts as passed"
