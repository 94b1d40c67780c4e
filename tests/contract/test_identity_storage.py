"""The workload-identity repository contract (join tokens, attestors, entries, denylist), run
against SQLite and PostgreSQL."""

from __future__ import annotations

import asyncio
import dataclasses
import datetime as dt
import hashlib
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from broker.errors import AlreadyExists
from broker.storage import open_storage
from broker.storage.identity import (
    AttestorRecord,
    DenyRecord,
    EntryRecord,
    IdentityRepository,
    JoinTokenRecord,
)
from broker.storage.sql import SqlStorage

T0 = dt.datetime(2026, 3, 1, 12, 0, 0, 123456, tzinfo=dt.UTC)
AGENT = "spiffe://example.org/agents/node1"


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
async def store(
    request: pytest.FixtureRequest, tmp_path: Path
) -> AsyncIterator[IdentityRepository]:
    if request.param == "sqlite":
        dsn = f"sqlite://{tmp_path / 'broker.db'}"
    else:
        dsn = request.getfixturevalue("pg_dsn")
    storage = await open_storage(dsn)
    assert isinstance(storage, SqlStorage)
    await storage.migrate()
    try:
        yield storage.identity()
    finally:
        await storage.close()


def _hash(text: str) -> bytes:
    return hashlib.sha256(text.encode()).digest()


async def test_a_join_token_is_consumed_exactly_once(store: IdentityRepository) -> None:
    await store.insert_join_token(
        JoinTokenRecord(_hash("t1"), AGENT, T0, T0 + dt.timedelta(minutes=10))
    )
    assert await store.consume_join_token(_hash("t1"), T0) == AGENT
    assert await store.consume_join_token(_hash("t1"), T0) is None


async def test_concurrent_consumers_of_one_token_get_it_once(store: IdentityRepository) -> None:
    await store.insert_join_token(
        JoinTokenRecord(_hash("race"), AGENT, T0, T0 + dt.timedelta(minutes=10))
    )
    results = await asyncio.gather(*(store.consume_join_token(_hash("race"), T0) for _ in range(8)))
    assert [r for r in results if r is not None] == [AGENT]


async def test_an_expired_or_unknown_token_is_refused(store: IdentityRepository) -> None:
    await store.insert_join_token(
        JoinTokenRecord(_hash("old"), AGENT, T0, T0 + dt.timedelta(minutes=10))
    )
    assert await store.consume_join_token(_hash("old"), T0 + dt.timedelta(minutes=10)) is None
    assert await store.consume_join_token(_hash("never"), T0) is None
    # The expired token was not marked used by the refused attempt; still refused later.
    assert await store.consume_join_token(_hash("old"), T0 + dt.timedelta(hours=1)) is None


async def test_duplicate_token_hash_is_refused(store: IdentityRepository) -> None:
    record = JoinTokenRecord(_hash("dup"), AGENT, T0, T0 + dt.timedelta(minutes=1))
    await store.insert_join_token(record)
    with pytest.raises(AlreadyExists):
        await store.insert_join_token(record)


def _entry(
    entry_id: str, parent: str = AGENT, spiffe_id: str = "spiffe://example.org/a/b/c"
) -> EntryRecord:
    return EntryRecord(
        id=entry_id,
        spiffe_id=spiffe_id,
        parent_id=parent,
        selectors=("unix:gid:10", "unix:uid:1000"),
        x509_ttl=600,
        jwt_ttl=0,
        dns_names=("web.example.org",),
        created_at=T0,
    )


async def test_entries_round_trip_and_filter_by_parent(store: IdentityRepository) -> None:
    await store.insert_entry(_entry("e1"))
    await store.insert_entry(_entry("e2", parent="spiffe://example.org/agents/node2"))
    assert await store.get_entry("e1") == _entry("e1")
    assert [e.id for e in await store.list_entries(AGENT)] == ["e1"]
    assert {e.id for e in await store.list_entries()} == {"e1", "e2"}
    with pytest.raises(AlreadyExists):
        await store.insert_entry(_entry("e1"))
    assert await store.delete_entry("e1") is True
    assert await store.delete_entry("e1") is False
    assert await store.get_entry("e1") is None


async def test_the_entries_version_moves_on_every_create_and_delete(
    store: IdentityRepository,
) -> None:
    """What another replica polls to wake its agents' sync streams (broker.syncfeed)."""
    empty = await store.entries_version()
    await store.insert_entry(_entry("e1"))
    one = await store.entries_version()
    assert one != empty and one[0] == 1
    later = dataclasses.replace(_entry("e2"), created_at=T0 + dt.timedelta(seconds=1))
    await store.insert_entry(later)
    assert await store.delete_entry("e1") is True
    swapped = await store.entries_version()  # same count, newer entry: still a change
    assert swapped[0] == 1 and swapped != one
    assert await store.delete_entry("e2") is True
    assert await store.entries_version() == empty


async def test_attestors_are_unique_by_name_and_issuer(store: IdentityRepository) -> None:
    record = AttestorRecord(
        "k8s", "https://issuer.example", "broker", '{"keys": []}', "spiffe://{td}/x", ("RS256",), T0
    )
    await store.insert_attestor(record)
    assert await store.attestor_for_issuer("https://issuer.example") == record
    assert await store.attestor_for_issuer("https://other.example") is None
    with pytest.raises(AlreadyExists):
        await store.insert_attestor(record)
    assert await store.list_attestors() == [record]
    assert await store.delete_attestor("k8s") is True
    assert await store.list_attestors() == []


async def test_denylist_by_id_and_by_serial_is_idempotent(store: IdentityRepository) -> None:
    assert not await store.is_denied(AGENT, "ab12")
    assert await store.deny(DenyRecord("spiffe_id", AGENT, T0)) is True
    assert await store.deny(DenyRecord("spiffe_id", AGENT, T0)) is False
    assert await store.is_denied(AGENT, None)
    other = "spiffe://example.org/agents/other"
    assert not await store.is_denied(other, "ab12")
    await store.deny(DenyRecord("serial", "ab12", T0))
    assert await store.is_denied(other, "ab12")
    assert not await store.is_denied(other, "ab13")
    listed = [(r.kind, r.value) for r in await store.list_denied()]
    assert listed == [("serial", "ab12"), ("spiffe_id", AGENT)]


async def test_an_attestation_jwt_is_used_once_even_concurrently(store: IdentityRepository) -> None:
    """Issue 20 finding 14: the jti replay cache is shared through storage, so two workers (or
    replicas) racing with one token get it once; other issuers' jtis are separate."""
    exp = T0 + dt.timedelta(minutes=5)
    results = await asyncio.gather(
        *(store.use_attestation_jwt("https://ci", "jti:a", exp, T0) for _ in range(8))
    )
    assert sorted(results) == [False] * 7 + [True]
    assert await store.use_attestation_jwt("https://ci", "jti:a", exp, T0) is False
    assert await store.use_attestation_jwt("https://other", "jti:a", exp, T0) is True
    assert await store.use_attestation_jwt("https://ci", "jti:b", exp, T0) is True


async def test_expired_attestation_jwt_records_are_pruned(store: IdentityRepository) -> None:
    short = T0 + dt.timedelta(minutes=1)
    assert await store.use_attestation_jwt("https://ci", "jti:old", short, T0) is True
    assert await store.use_attestation_jwt("https://ci", "jti:old", short, T0) is False
    # Once the token has expired (it can no longer verify) its record goes with the next use.
    later = short + dt.timedelta(seconds=1)
    assert await store.use_attestation_jwt(
        "https://ci", "jti:new", later + dt.timedelta(minutes=1), later
    )
    backend = store._b  # the table itself: the expired record is gone
    async with backend.transaction(write=False) as tx:
        rows = await tx.fetch("SELECT jti FROM attestation_jwt_uses ORDER BY jti")
    assert [r[0] for r in rows] == ["jti:new"]
