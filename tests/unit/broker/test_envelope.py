"""The data-key cache around unwrap: bounded in count and age (fake clock), dropped at once on
every change that must end a key's life in memory, here and on other workers after their
sync, never shown, logged or pickled, and never a way around a refusal."""

from __future__ import annotations

import datetime as dt
import logging
import pickle
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from broker.envelope import DataKeyCache, Envelope, KekRotator
from broker.errors import FailedPrecondition
from broker.secrets import MetadataMac, SecretService
from broker.storage import open_storage
from broker.storage.sql import SqlStorage
from ca.clock import FakeClock
from ca.keys import SoftwareBackend

T0 = dt.datetime(2026, 6, 1, 9, 0, tzinfo=dt.UTC)
REF = "secret://payments/prod/stripe/api-key"


class CountingKeys:
    """A software backend that counts unwraps (each one a token call on a real HSM)."""

    def __init__(self, inner: SoftwareBackend) -> None:
        self._inner = inner
        self.unwraps = 0
        self.unwrapped: list[bytes] = []

    def unwrap(self, label: str, wrapped: bytes) -> bytes:
        self.unwraps += 1
        key = self._inner.unwrap(label, wrapped)
        self.unwrapped.append(key)
        return key

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)


@dataclass
class Worker:
    keys: CountingKeys
    cache: DataKeyCache
    envelope: Envelope
    service: SecretService

    async def get(self, version: int | None = None) -> bytes:
        loaded = await self.service.load("acme", REF, version)
        assert loaded is not None
        return (await self.service.reveal(*loaded)).value


@dataclass
class World:
    clock: FakeClock
    a: Worker
    b: Worker  # another worker process over the same storage and token
    storage: SqlStorage


@pytest.fixture
async def world(tmp_path: Path) -> AsyncIterator[World]:
    storage = await open_storage(f"sqlite://{tmp_path / 'broker.db'}")
    assert isinstance(storage, SqlStorage)
    await storage.migrate()
    try:
        clock = FakeClock(T0)
        token = SoftwareBackend()
        # Metadata MACs on the shared token itself: the counts below are the envelope's calls.
        mac = MetadataMac(token)
        workers = []
        for _ in range(2):
            keys = CountingKeys(token)
            cache = DataKeyCache(clock)
            envelope = Envelope(keys, storage, cache)  # type: ignore[arg-type]
            service = SecretService(storage.secrets(mac), envelope, clock)
            await service.start(mac)
            workers.append(Worker(keys, cache, envelope, service))
        yield World(clock, workers[0], workers[1], storage)
    finally:
        await storage.close()


async def _put(w: World) -> None:
    await w.a.service.put(
        "acme",
        REF,
        owner="payments",
        classification="confidential",
        rotation_period=dt.timedelta(days=90),
        generate_length=32,
    )
    for worker in (w.a, w.b):
        await worker.envelope.sync()


async def test_reads_unwrap_once_then_come_from_memory(world: World) -> None:
    await _put(world)
    first = await world.a.get()
    assert await world.a.get() == first == await world.a.get()
    assert world.a.keys.unwraps == 1
    assert (world.a.cache.hits, world.a.cache.misses) == (2, 1)


async def test_cached_keys_live_at_most_five_minutes(world: World) -> None:
    await _put(world)
    await world.a.get()
    world.clock.advance(minutes=5, seconds=-1)
    await world.a.get()
    assert world.a.keys.unwraps == 1
    world.clock.advance(seconds=1)
    await world.a.get()
    assert world.a.keys.unwraps == 2


def test_the_cache_is_bounded_in_count_and_age() -> None:
    clock = FakeClock(T0)
    cache = DataKeyCache(clock, max_entries=2)
    for n in range(3):
        cache.put("kek.acme.1", bytes([n]) * 40, bytes([n]) * 32)
    assert len(cache) == 2
    assert cache.get("kek.acme.1", b"\x00" * 40) is None  # the least recently used went
    assert cache.get("kek.acme.1", b"\x02" * 40) == b"\x02" * 32
    with pytest.raises(ValueError, match="at most"):
        DataKeyCache(clock, max_age=dt.timedelta(minutes=5, seconds=1))


def test_a_key_unwrapped_before_a_clear_is_not_cached_after_it() -> None:
    cache = DataKeyCache(FakeClock(T0))
    generation = cache.generation  # a read starts, goes to the token...
    cache.clear()  # ...meanwhile the secret is revoked
    cache.put("kek.acme.1", b"w" * 40, b"k" * 32, generation=generation)
    assert len(cache) == 0


async def _rotate(w: World) -> None:
    await w.a.service.rotate(
        "acme", REF, environment="prod", ticket="SEC-1", justification="t", generate_length=32
    )


async def _rollback(w: World) -> None:
    await w.a.service.rollback("acme", REF)


async def _revoke(w: World) -> None:
    await w.a.service.revoke("acme", REF, "leaked")


async def _delete(w: World) -> None:
    await w.a.service.delete("acme", REF)


async def _kek_rotate(w: World) -> None:
    await KekRotator(w.a.envelope, [w.a.service], w.a.service.repository).rotate("acme")


@pytest.mark.parametrize(
    "change", [_rotate, _rollback, _revoke, _delete, _kek_rotate], ids=lambda f: f.__name__[1:]
)
async def test_changes_drop_cached_keys_here_at_once_and_on_other_workers_at_sync(
    world: World, change: Any
) -> None:
    await _put(world)
    if change is _rollback:
        await _rotate(world)  # something to roll back to
        for worker in (world.a, world.b):
            await worker.envelope.sync()
    await world.a.get()
    await world.b.get()
    assert len(world.a.cache) == len(world.b.cache) == 1

    await change(world)

    assert len(world.a.cache) == 0  # at once in the worker that made the change
    assert len(world.b.cache) == 1  # the other worker until its next sync (every 2 s)
    await world.b.envelope.sync()
    assert len(world.b.cache) == 0


async def test_another_worker_refuses_a_revoked_secret_even_with_its_key_cached(
    world: World,
) -> None:
    await _put(world)
    value = await world.b.get()
    await _revoke(world)  # through worker a; b has not synced yet
    assert len(world.b.cache) == 1
    with pytest.raises(FailedPrecondition, match="revoked"):
        await world.b.get()
    assert world.b.keys.unwraps == 1  # refused from storage state, before any key was used
    assert value  # nothing else to undo: the refusal changed nothing


async def test_tampered_ciphertext_is_refused_even_with_its_key_cached(world: World) -> None:
    await _put(world)
    value = await world.a.get()
    async with world.storage.backend.transaction(write=True) as tx:
        rows = await tx.fetch("SELECT sealed FROM secret_versions WHERE version = 1")
        original = bytes(rows[0][0])
        forged = original[:-1] + bytes([original[-1] ^ 1])
        await tx.execute("UPDATE secret_versions SET sealed = ? WHERE version = 1", forged)
    with pytest.raises(FailedPrecondition, match="did not verify"):
        await world.a.get()
    async with world.storage.backend.transaction(write=True) as tx:
        await tx.execute("UPDATE secret_versions SET sealed = ? WHERE version = 1", original)
    assert await world.a.get() == value


async def test_cached_keys_are_never_shown_logged_or_pickled(
    world: World, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    await _put(world)
    await world.a.get()
    await world.a.get()
    [data_key] = world.a.keys.unwrapped
    assert data_key.hex() not in repr(world.a.cache) and str(data_key) not in repr(world.a.cache)
    for record in caplog.records:
        text = record.getMessage()
        assert data_key.hex() not in text and str(data_key) not in text
    with pytest.raises(TypeError, match="never pickled"):
        pickle.dumps(world.a.cache)


def test_broker_components_refuse_a_backend_without_their_power_at_construction() -> None:
    """The envelope, the audit ledger and the metadata MAC ask for their power when built (at
    start-up), not on the first request that needs it."""
    from broker.audit import AuditLedger
    from ca.errors import CapabilityMissing
    from tests.unit.ca.keys.test_backend import SignOnly

    with pytest.raises(CapabilityMissing, match="cannot wrap data keys"):
        Envelope(SignOnly(), meta=None)  # type: ignore[arg-type]
    with pytest.raises(CapabilityMissing, match="cannot compute MACs"):
        AuditLedger(None, SignOnly())  # type: ignore[arg-type]
    with pytest.raises(CapabilityMissing, match="cannot compute MACs"):
        MetadataMac(SignOnly())
