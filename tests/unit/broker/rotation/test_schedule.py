"""Scheduled rotation of secrets (fake clock, SQLite, software key backend): a secret made
with --generate is remade at its rotation period from the key backend's generator at the
same length, audited with the versions before and after and counted; one whose value came
from outside is reported as due -- gauge, one audit event (and so notification) per due date
-- and left unchanged; only the lease holder acts."""

from __future__ import annotations

import datetime as dt
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import REGISTRY

from broker.envelope import Envelope
from broker.notifications import classify
from broker.rotation.origins import ValueOrigins
from broker.rotation.schedule import LEASE, SecretRotationJob
from broker.secrets import MetadataMac, SecretService
from broker.storage import open_storage
from broker.storage.sql import SqlStorage
from ca.clock import FakeClock
from ca.keys import SoftwareBackend

T0 = dt.datetime(2026, 6, 1, 9, 0, tzinfo=dt.UTC)
GENERATED = "secret://payments/prod/db/password"
EXTERNAL = "secret://payments/prod/stripe/api-key"


@dataclass
class RecordingRandom:
    """The key backend's generator, remembering what it handed out."""

    keys: SoftwareBackend
    calls: int = 0

    def __call__(self, n: int) -> bytes:
        self.calls += 1
        return self.keys.random(n)


@dataclass
class World:
    clock: FakeClock
    storage: SqlStorage
    service: SecretService
    job: SecretRotationJob
    random: RecordingRandom
    events: list[Mapping[str, Any]] = field(default_factory=list)

    async def value(self, ref: str, version: int | None = None) -> bytes:
        loaded = await self.service.load("acme", ref, version)
        assert loaded is not None
        return (await self.service.reveal(*loaded)).value

    async def version(self, ref: str) -> int:
        return (await self.service.show("acme", ref)).record.current_version

    def events_of(self, what: str) -> list[Mapping[str, Any]]:
        return [e for e in self.events if e["what"] == what]


@pytest.fixture
async def world(tmp_path: Path) -> AsyncIterator[World]:
    storage = await open_storage(f"sqlite://{tmp_path / 'broker.db'}")
    assert isinstance(storage, SqlStorage)
    await storage.migrate()
    try:
        clock = FakeClock(T0)
        keys = SoftwareBackend()
        mac = MetadataMac(keys)
        random = RecordingRandom(keys)
        service = SecretService(storage.secrets(mac), Envelope(keys, storage), clock, random=random)
        await service.start(mac)
        origins = ValueOrigins(storage)
        service.value_origin = origins.remember
        world = World(clock, storage, service, None, random)  # type: ignore[arg-type]

        async def audit(event: Mapping[str, Any]) -> None:
            world.events.append(event)

        world.job = SecretRotationJob(
            service, origins, storage, storage, clock, audit=audit, owner="replica-a"
        )
        yield world
    finally:
        await storage.close()


async def _put(w: World, ref: str, **kw: Any) -> None:
    await w.service.put(
        "acme",
        ref,
        owner="payments",
        classification="confidential",
        rotation_period=dt.timedelta(hours=6),
        **kw,
    )


def _counted(outcome: str) -> float:
    value = REGISTRY.get_sample_value(
        "broker_rotation_total", {"kind": "secret", "outcome": outcome}
    )
    return value or 0.0


async def test_a_generated_secret_is_remade_at_its_rotation_period(world: World) -> None:
    await _put(world, GENERATED, generate_length=48)
    first = await world.value(GENERATED)
    before = _counted("success")

    run = await world.job.tick()
    assert run is not None and run.rotated == [] and run.due == []
    world.clock.advance(hours=6, seconds=-1)
    await world.job.tick()
    assert await world.version(GENERATED) == 1, "not before its period"

    world.clock.advance(seconds=61)
    calls = world.random.calls
    run = await world.job.tick()
    assert run is not None and run.rotated == [("acme", GENERATED, 1, 2)]
    second = await world.value(GENERATED)
    assert second != first and len(second) == 48
    assert world.random.calls > calls, "the new value comes from the key backend's generator"
    assert await world.value(GENERATED, 1) == first, "the old version stays for the window"
    assert _counted("success") == before + 1
    (event,) = world.events_of("secrets.rotate")
    assert event["who"] == "broker/secret-rotation" and event["outcome"] == "OK"
    assert event["details"]["before"] == 1 and event["details"]["after"] == 2
    assert GENERATED not in str(event), "the ledger names the reference by its hash"

    world.clock.advance(minutes=5)
    run = await world.job.tick()
    assert run is not None and run.rotated == [], "rotated once: due again only after 6 h"
    world.clock.advance(hours=6)
    run = await world.job.tick()
    assert run is not None and [r[3] for r in run.rotated] == [3]
    assert len(await world.value(GENERATED)) == 48


async def test_a_third_party_secret_is_reported_due_once_and_left_alone(world: World) -> None:
    await _put(world, EXTERNAL, value=b"sk_live_from_the_provider")
    world.clock.advance(hours=7)
    run = await world.job.tick()
    assert run is not None and run.due == [("acme", EXTERNAL)] and run.rotated == []
    assert run.reported == [("acme", EXTERNAL)]
    assert REGISTRY.get_sample_value("broker_secrets_due") == 1
    (event,) = world.events_of("secret.due")
    assert event["outcome"] == "OK" and event["details"]["version"] == 1
    assert event["details"]["overdue_seconds"] == 3600
    assert classify(event) == "secret.due", "the event raises the secret.due notification"

    world.clock.advance(minutes=2)
    run = await world.job.tick()
    assert run is not None and run.due == [("acme", EXTERNAL)] and run.reported == []
    assert len(world.events_of("secret.due")) == 1, "one notification per due date"
    assert await world.version(EXTERNAL) == 1
    assert await world.value(EXTERNAL) == b"sk_live_from_the_provider"

    # Rotated by hand with a new value from the provider: no longer due; due again later.
    await world.service.rotate(
        "acme", EXTERNAL, environment="prod", ticket="SEC-1", justification="new key",
        value=b"sk_live_second",
    )  # fmt: skip
    world.clock.advance(minutes=2)
    run = await world.job.tick()
    assert run is not None and run.due == []
    assert REGISTRY.get_sample_value("broker_secrets_due") == 0
    world.clock.advance(hours=6)
    run = await world.job.tick()
    assert run is not None and run.reported == [("acme", EXTERNAL)]
    assert await world.value(EXTERNAL) == b"sk_live_second"


async def test_rotating_with_a_value_or_generate_changes_what_the_schedule_may_do(
    world: World,
) -> None:
    await _put(world, GENERATED, generate_length=32)
    await world.service.rotate(
        "acme", GENERATED, environment="prod", ticket="SEC-2", justification="vendor value",
        value=b"now-from-outside",
    )  # fmt: skip
    world.clock.advance(hours=7)
    run = await world.job.tick()
    assert run is not None and run.rotated == [] and run.due == [("acme", GENERATED)]
    await world.service.rotate(
        "acme", GENERATED, environment="prod", ticket="SEC-3", justification="back to ours",
        generate_length=20,
    )  # fmt: skip
    world.clock.advance(hours=7)
    run = await world.job.tick()
    assert run is not None and [r[3] for r in run.rotated] == [4]
    assert len(await world.value(GENERATED)) == 20


async def test_only_the_lease_holder_rotates(world: World) -> None:
    await _put(world, GENERATED, generate_length=32)
    world.clock.advance(hours=7)
    assert await world.storage.try_lease(LEASE, "replica-b", 300, world.clock.now())
    assert await world.job.tick() is None
    assert await world.version(GENERATED) == 1
    assert world.events == []


async def test_a_failed_rotation_is_audited_counted_and_retried_later(world: World) -> None:
    await _put(world, GENERATED, generate_length=32)
    first = await world.value(GENERATED)
    # Someone changes the secret's row outside the broker: its MAC no longer verifies.
    async with world.storage.backend.transaction(write=True) as tx:
        await tx.fetch("UPDATE secrets SET owner = ? WHERE ref = ?", "mallory", GENERATED)
    failures = _counted("failure")
    world.clock.advance(hours=7)
    run = await world.job.tick()
    assert run is not None and run.rotated == [] and len(run.failed) == 1
    assert _counted("failure") == failures + 1
    (event,) = world.events_of("secrets.rotate")
    assert event["outcome"] == "failed" and event["error"] and event["details"]["before"] == 1

    world.clock.advance(minutes=2)
    run = await world.job.tick()
    assert run is not None and run.failed == [], "not retried before retry_after"
    async with world.storage.backend.transaction(write=True) as tx:
        await tx.fetch("UPDATE secrets SET owner = ? WHERE ref = ?", "payments", GENERATED)
    world.clock.advance(minutes=5)
    run = await world.job.tick()
    assert run is not None and [r[3] for r in run.rotated] == [2]
    assert await world.value(GENERATED) != first


class _BusyRouter:
    """A staged rollout of every secret is running (broker.rollout's ReadRouter, as seen here)."""

    def __init__(self) -> None:
        self.running = True

    async def route(self, tenant: str, ref: str, identity: str) -> None:
        return None

    async def served(self, route: Any, identity: str) -> None:
        return None

    async def busy(self, tenant: str, ref: str) -> bool:
        return self.running


async def test_a_secret_under_a_staged_rollout_waits_and_is_not_a_failure(world: World) -> None:
    await _put(world, GENERATED, generate_length=48)
    router = _BusyRouter()
    world.service.route_reads(router)
    failures = _counted("failure")
    world.clock.advance(hours=6, seconds=60)

    run = await world.job.tick()
    assert run is not None and run.rotated == [] and run.failed == []
    assert await world.version(GENERATED) == 1, "the rollout owns the secret while it runs"
    assert _counted("failure") == failures and world.events_of("secrets.rotate") == []

    router.running = False
    world.clock.advance(minutes=1)
    run = await world.job.tick()
    assert run is not None and [r[3] for r in run.rotated] == [2], "rotated once it ended"
