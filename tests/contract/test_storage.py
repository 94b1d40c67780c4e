"""The storage contract: one suite, run against every backend (SQLite file, PostgreSQL)."""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import hashlib
import hmac
import sqlite3
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import asyncpg
import pytest
from opentelemetry.sdk.trace import TracerProvider

from broker.errors import AlreadyExists, SchemaTooNew, StorageError
from broker.storage import open_storage
from broker.storage.backend import Tx
from broker.storage.interface import AuditRecord, AuthorityRecord, Storage
from broker.storage.sql import SqlStorage, latest_version
from broker.tracing.storage import TracedBackend
from ca.rotation import GenerationState

ZERO = bytes(32)
T0 = dt.datetime(2026, 3, 1, 12, 0, 0, 123456, tzinfo=dt.UTC)
MAC_KEY = b"contract-test-mac-key"


@dataclass
class Backing:
    """The database behind a Storage, plus a raw side door that bypasses the code under test."""

    kind: str
    dsn: str
    path: Path | None = None
    opened: list[Storage] = field(default_factory=list)
    single_hop_writes: bool = False  # SQLite: audit appends in one hop to the DB thread
    traced: bool = False  # behind broker.tracing's backend wrapper, each call in a request span

    async def open(self) -> Storage:
        storage = await open_storage(self.dsn)
        if self.single_hop_writes:
            assert isinstance(storage, SqlStorage)
            storage.single_hop_writes = True
        if self.traced:
            assert isinstance(storage, SqlStorage)
            storage = SqlStorage(_InRequest(storage.backend, TracerProvider().get_tracer("t")))
        self.opened.append(storage)
        return storage

    async def raw(self, sql: str) -> list[tuple[Any, ...]]:
        """Run one statement on a separate connection and commit."""
        if self.kind == "sqlite":
            assert self.path is not None
            path = self.path

            def run() -> list[tuple[Any, ...]]:
                with contextlib.closing(sqlite3.connect(path)) as conn:
                    rows = conn.execute(sql).fetchall()
                    conn.commit()
                    return rows

            return await asyncio.to_thread(run)
        conn = await asyncpg.connect(self.dsn)
        try:
            return [tuple(r) for r in await conn.fetch(sql)]
        finally:
            await conn.close()

    async def tables(self) -> set[str]:
        if self.kind == "sqlite":
            rows = await self.raw("SELECT name FROM sqlite_master WHERE type = 'table'")
        else:
            rows = await self.raw(
                "SELECT tablename FROM pg_tables WHERE schemaname = current_schema()"
            )
        return {r[0] for r in rows}


_T = TypeVar("_T")


class _InRequest(TracedBackend):
    """The tracing wrapper on its traced path: every transaction as inside a request."""

    @contextlib.asynccontextmanager
    async def transaction(self, *, write: bool) -> AsyncIterator[Tx]:
        with self._tracer.start_as_current_span("request"):
            async with super().transaction(write=write) as tx:
                yield tx

    async def run_write_sync(self, fn: Callable[[Any], _T]) -> _T:
        with self._tracer.start_as_current_span("request"):
            return await super().run_write_sync(fn)


@pytest.fixture(
    params=[
        "sqlite",
        "sqlite-single-hop",
        "sqlite-traced",
        pytest.param("postgresql", marks=pytest.mark.postgres),
    ]
)
async def backing(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Backing]:
    if request.param.startswith("sqlite"):
        path = tmp_path / "broker.db"
        b = Backing("sqlite", f"sqlite://{path}", path, single_hop_writes="single" in request.param)
        b.traced = "traced" in request.param
    else:
        b = Backing("postgresql", request.getfixturevalue("pg_dsn"))
    yield b
    for storage in b.opened:
        await storage.close()


@pytest.fixture
async def storage(backing: Backing) -> Storage:
    storage = await backing.open()
    await storage.migrate()
    return storage


def make_authority(
    id: str = "issuing-1", kind: str = "issuing", generation: int = 1, **kw: Any
) -> AuthorityRecord:
    fields: dict[str, Any] = dict(
        id=id,
        kind=kind,
        generation=generation,
        state="prepared",
        key_label=f"key-{id}",
        cert_der=bytes(range(256)) + id.encode(),
        jwt_key_label=None if kind == "root" else f"jwt-{id}",
        jwt_kid=None if kind == "root" else f"kid-{id}",
        created_at=T0,
        not_before=T0,
        not_after=T0 + dt.timedelta(days=30),
    )
    fields.update(kw)
    return AuthorityRecord(**fields)


class Sealer:
    """A real hash chain: entry_hash = sha256(seq || prev_hash || event), mac = HMAC over it."""

    def __init__(self, fail_at_call: int | None = None) -> None:
        self.calls: list[tuple[int, bytes, str]] = []
        self.fail_at_call = fail_at_call

    @staticmethod
    def entry_hash(seq: int, prev: bytes, event: str) -> bytes:
        return hashlib.sha256(seq.to_bytes(8, "big") + prev + event.encode()).digest()

    def __call__(self, seq: int, prev: bytes, event: str) -> tuple[bytes, bytes]:
        self.calls.append((seq, prev, event))
        if self.fail_at_call is not None and len(self.calls) == self.fail_at_call:
            raise SealFailed("the HSM went away")
        h = self.entry_hash(seq, prev, event)
        return h, hmac.new(MAC_KEY, h, "sha256").digest()


class SealFailed(Exception):
    pass


def assert_valid_chain(records: Sequence[AuditRecord]) -> None:
    assert [r.seq for r in records] == list(range(1, len(records) + 1))
    prev = ZERO
    for r in records:
        assert r.prev_hash == prev, f"fork or gap at seq {r.seq}"
        assert r.entry_hash == Sealer.entry_hash(r.seq, r.prev_hash, r.event)
        assert r.mac == hmac.new(MAC_KEY, r.entry_hash, "sha256").digest()
        prev = r.entry_hash


# ----------------------------------------------------------------------------------- schema


async def test_dialect_names_the_backend(backing: Backing) -> None:
    storage = await backing.open()
    assert storage.dialect == backing.kind


async def test_migrate_is_idempotent_and_returns_the_version(backing: Backing) -> None:
    storage = await backing.open()
    latest = latest_version(backing.kind)
    assert latest >= 1
    assert await storage.schema_version() == 0
    assert await storage.migrate() == latest
    assert await storage.schema_version() == latest
    tables = await backing.tables()
    assert {"authorities", "policies", "audit", "meta", "counters", "leases_lock"} <= tables
    assert await storage.migrate() == latest
    second = await backing.open()
    assert await second.migrate() == latest
    rows = await backing.raw("SELECT version FROM schema_migrations ORDER BY version")
    assert [r[0] for r in rows] == list(range(1, latest + 1))


async def test_concurrent_migrations_apply_once(backing: Backing) -> None:
    storages = [await backing.open() for _ in range(3)]
    results = await asyncio.gather(*(s.migrate() for s in storages))
    assert set(results) == {latest_version(backing.kind)}
    rows = await backing.raw("SELECT COUNT(*) FROM schema_migrations")
    assert rows[0][0] == latest_version(backing.kind)


async def test_schema_too_new_is_refused_and_nothing_changes(
    backing: Backing, storage: Storage
) -> None:
    latest = latest_version(backing.kind)
    await storage.set_meta("k", "v")
    await backing.raw(
        "INSERT INTO schema_migrations (version, name, applied_at) "
        f"SELECT {latest + 5}, 'from_the_future', applied_at FROM schema_migrations "
        "WHERE version = 1"
    )
    before = await backing.raw("SELECT version, name FROM schema_migrations ORDER BY version")
    tables_before = await backing.tables()
    with pytest.raises(SchemaTooNew) as info:
        await storage.migrate()
    assert str(info.value) == (
        f"database schema is at version {latest + 5} but this broker knows only up to "
        f"{latest}; upgrade the broker"
    )
    assert await storage.schema_version() == latest + 5
    assert await backing.raw("SELECT version, name FROM schema_migrations ORDER BY version") == (
        before
    )
    assert await backing.tables() == tables_before
    assert await storage.get_meta("k") == "v"


async def test_schema_too_new_on_a_bare_database_creates_no_tables(backing: Backing) -> None:
    await backing.raw(
        "CREATE TABLE schema_migrations "
        "(version INTEGER PRIMARY KEY, name TEXT NOT NULL, applied_at INTEGER NOT NULL)"
    )
    await backing.raw("INSERT INTO schema_migrations VALUES (99, 'future', 0)")
    storage = await backing.open()
    with pytest.raises(SchemaTooNew, match="at version 99 "):
        await storage.migrate()
    assert await backing.tables() == {"schema_migrations"}


# ------------------------------------------------------------------------------ authorities


async def test_authorities_insert_list_and_order(storage: Storage) -> None:
    assert await storage.list_authorities() == []
    records = [
        make_authority("issuing-2", "issuing", 2),
        make_authority("root-1", "root", 1),
        make_authority("issuing-1", "issuing", 1),
    ]
    for record in records:
        await storage.insert_authority(record)
    listed = await storage.list_authorities()
    assert [r.id for r in listed] == ["issuing-1", "issuing-2", "root-1"]
    assert listed == sorted(records, key=lambda r: (r.kind, r.generation))


async def test_authority_id_taken_raises_already_exists(storage: Storage) -> None:
    await storage.insert_authority(make_authority("issuing-1"))
    with pytest.raises(AlreadyExists, match="issuing-1"):
        await storage.insert_authority(make_authority("issuing-1", generation=7))
    with pytest.raises(AlreadyExists):
        await storage.insert_authority(make_authority("other-id", generation=1))
    assert [r.id for r in await storage.list_authorities()] == ["issuing-1"]


async def test_authority_transition_is_compare_and_set(storage: Storage) -> None:
    await storage.insert_authority(make_authority("issuing-1"))
    at = T0 + dt.timedelta(hours=1)
    assert await storage.transition_authority(
        "issuing-1", from_state="prepared", to_state="active", at=at
    )
    # The same transition again (a second replica) loses and changes nothing.
    assert not await storage.transition_authority(
        "issuing-1", from_state="prepared", to_state="active", at=at + dt.timedelta(hours=1)
    )
    (record,) = await storage.list_authorities()
    assert record.state == "active"
    assert record.activated_at == at
    assert record.retired_at is None

    later = at + dt.timedelta(days=2)
    assert await storage.transition_authority(
        "issuing-1", from_state="active", to_state="retired", at=later
    )
    (record,) = await storage.list_authorities()
    assert (record.state, record.activated_at, record.retired_at) == ("retired", at, later)
    assert not await storage.transition_authority(
        "no-such-id", from_state="prepared", to_state="active", at=at
    )


async def test_authority_states_come_back_as_generation_states(storage: Storage) -> None:
    """Stored as the same strings as before, read back as `GenerationState` members; writers
    may pass members or their values."""
    await storage.insert_authority(make_authority("issuing-1", state=GenerationState.PREPARED))
    assert await storage.transition_authority(
        "issuing-1", from_state=GenerationState.PREPARED, to_state=GenerationState.ACTIVE, at=T0
    )
    (record,) = await storage.list_authorities()
    assert type(record.state) is GenerationState
    assert record.state == GenerationState.ACTIVE == "active"
    assert record.activated_at == T0
    with pytest.raises(ValueError, match="authority state"):
        await storage.transition_authority(
            "issuing-1", from_state="active", to_state="bogus", at=T0
        )


async def test_feature_repositories_come_from_the_storage(storage: Storage) -> None:
    """One way to build each feature's repository, all over the storage's own connection: a
    change through one repository is seen through another built later."""
    assert await storage.access().bump_access_version() == 1
    assert await storage.access().access_version() == 1
    assert await storage.identity().list_entries() == []
    assert await storage.database().list_leases() == []
    assert await storage.operators().list_sessions() == []
    assert await storage.secrets(_NoSeal()).kek_tenants() == []
    assert await storage.kms().list_keys() == []


class _NoSeal:
    """A MetadataSeal for a read that never seals (kek_tenants reads meta keys only)."""

    def seal(self, record: object) -> bytes:
        raise AssertionError("nothing is sealed here")

    def verify(self, record: object) -> bool:
        raise AssertionError("nothing is verified here")

    def seal_version(self, tenant: str, ref: str, version: object) -> bytes:
        raise AssertionError("nothing is sealed here")

    def verify_version(self, tenant: str, ref: str, version: object) -> bool:
        raise AssertionError("nothing is verified here")


async def test_concurrent_identical_transitions_only_one_wins(
    backing: Backing, storage: Storage
) -> None:
    other = await backing.open()
    await storage.insert_authority(make_authority("issuing-1"))
    results = await asyncio.gather(
        *(
            s.transition_authority("issuing-1", from_state="prepared", to_state="active", at=T0)
            for s in [storage, other] * 5
        )
    )
    assert sorted(results) == [False] * 9 + [True]


# --------------------------------------------------------------------------------- policies


async def test_policy_versions_increment_per_name(storage: Storage) -> None:
    assert await storage.current_policy("ca") is None
    assert await storage.policy_history("ca") == []
    v1 = await storage.put_policy("ca", '{"v":1}', "spiffe://x/op/a", T0)
    other = await storage.put_policy("other", '{"o":1}', "spiffe://x/op/b", T0)
    v2 = await storage.put_policy("ca", '{"v":2}', "spiffe://x/op/b", T0 + dt.timedelta(1))
    v3 = await storage.put_policy("ca", '{"v":3}', "spiffe://x/op/a", T0 + dt.timedelta(2))
    assert (v1.version, v2.version, v3.version, other.version) == (1, 2, 3, 1)
    assert v2.document == '{"v":2}' and v2.author == "spiffe://x/op/b"
    assert v2.created_at == T0 + dt.timedelta(1)
    assert await storage.current_policy("ca") == v3
    assert await storage.current_policy("other") == other
    assert await storage.policy_history("ca") == [v3, v2, v1]
    assert await storage.policy_history("ca", limit=2) == [v3, v2]


async def test_concurrent_policy_puts_get_distinct_versions(
    backing: Backing, storage: Storage
) -> None:
    other = await backing.open()
    puts = [
        s.put_policy("ca", f'{{"n":{i}}}', "op", T0) for i, s in enumerate([storage, other] * 6)
    ]
    versions = await asyncio.gather(*puts)
    assert sorted(v.version for v in versions) == list(range(1, 13))
    assert [v.version for v in await storage.policy_history("ca")] == list(range(12, 0, -1))


# ------------------------------------------------------------------------------------ audit


async def test_audit_append_chains_and_numbers_events(storage: Storage) -> None:
    seal = Sealer()
    assert await storage.append_audit(["e1", "e2", "e3"], seal) == [1, 2, 3]
    assert await storage.append_audit(["e4"], seal) == [4]
    batch = [f'{{"i":{i}}}' for i in range(32)]
    assert await storage.append_audit(batch, seal) == list(range(5, 37))
    assert [c[0] for c in seal.calls] == list(range(1, 37))
    assert seal.calls[0][1] == ZERO
    records = await storage.read_audit()
    assert_valid_chain(records)
    assert [c[1] for c in seal.calls] == [r.prev_hash for r in records]
    assert [r.event for r in records] == ["e1", "e2", "e3", "e4", *batch]


async def test_audit_rows_cannot_be_changed_or_deleted(backing: Backing, storage: Storage) -> None:
    await storage.append_audit(["kept"], Sealer())
    for sql in ("UPDATE audit SET event = 'forged' WHERE seq = 1", "DELETE FROM audit"):
        with pytest.raises((sqlite3.DatabaseError, asyncpg.PostgresError), match="append-only"):
            await backing.raw(sql)
    assert [r.event for r in await storage.read_audit()] == ["kept"]


async def test_audit_append_nothing_is_a_no_op(storage: Storage) -> None:
    seal = Sealer()
    assert await storage.append_audit([], seal) == []
    assert seal.calls == []
    assert await storage.read_audit() == []


async def test_read_audit_and_tail(storage: Storage) -> None:
    assert await storage.audit_tail(5) == []
    await storage.append_audit([f"e{i}" for i in range(1, 11)], Sealer())
    assert [r.seq for r in await storage.read_audit(after_seq=7)] == [8, 9, 10]
    assert [r.seq for r in await storage.read_audit(after_seq=2, limit=3)] == [3, 4, 5]
    assert await storage.read_audit(after_seq=10) == []
    tail = await storage.audit_tail(3)
    assert [r.seq for r in tail] == [8, 9, 10]
    assert [r.event for r in tail] == ["e8", "e9", "e10"]
    assert [r.seq for r in await storage.audit_tail(100)] == list(range(1, 11))
    assert await storage.audit_tail(0) == []
    with pytest.raises(ValueError):
        await storage.read_audit(limit=-1)


async def test_failing_sealer_appends_nothing(storage: Storage) -> None:
    await storage.append_audit(["before"], Sealer())
    failing = Sealer(fail_at_call=2)
    with pytest.raises(SealFailed):
        await storage.append_audit(["a", "b", "c"], failing)
    assert len(failing.calls) == 2
    assert [r.event for r in await storage.read_audit()] == ["before"]
    # The chain continues where it was.
    assert await storage.append_audit(["after"], Sealer()) == [2]
    assert_valid_chain(await storage.read_audit())


async def test_head_record_is_written_in_the_same_transaction(storage: Storage) -> None:
    seen: list[int] = []

    def head(seq: int) -> tuple[str, str]:
        seen.append(seq)
        return "audit_head", f"head-{seq}"

    assert await storage.append_audit(["a", "b", "c"], Sealer(), head) == [1, 2, 3]
    assert seen == [3]  # once, with the last seq of the group
    assert await storage.get_meta("audit_head") == "head-3"
    # a failed append writes neither the events nor the head
    with pytest.raises(SealFailed):
        await storage.append_audit(["d", "e"], Sealer(fail_at_call=2), head)
    assert await storage.get_meta("audit_head") == "head-3"
    assert [r.seq for r in await storage.read_audit()] == [1, 2, 3]


async def test_failing_head_record_appends_nothing(storage: Storage) -> None:
    def head(seq: int) -> tuple[str, str]:
        raise SealFailed("the HSM went away while MACing the head")

    with pytest.raises(SealFailed):
        await storage.append_audit(["a"], Sealer(), head)
    assert await storage.read_audit() == []
    assert await storage.get_meta("audit_head") is None


@pytest.mark.parametrize("single_hop", [False, True])
async def test_tip_guard_sees_the_tip_and_head_and_can_refuse(
    storage: Storage, single_hop: bool
) -> None:
    from broker.storage.interface import TipGuard

    storage.single_hop_writes = single_hop  # type: ignore[attr-defined]
    seen: list[tuple[int | None, str | None]] = []

    def check(tip: AuditRecord | None, head: str | None) -> None:
        seen.append((None if tip is None else tip.seq, head))
        if tip is not None and tip.seq >= 2:
            raise SealFailed("the tail does not match the head")

    def head(seq: int) -> tuple[str, str]:
        return "audit_head", f"head-{seq}"

    guard = TipGuard("audit_head", check)
    assert await storage.append_audit(["a"], Sealer(), head, guard) == [1]
    assert await storage.append_audit(["b"], Sealer(), head, guard) == [2]
    with pytest.raises(SealFailed):
        await storage.append_audit(["c", "d"], Sealer(), head, guard)
    assert seen == [(None, None), (1, "head-1"), (2, "head-2")]
    assert [r.event for r in await storage.read_audit()] == ["a", "b"]
    assert await storage.get_meta("audit_head") == "head-2"


async def _drop_audit_guards(backing: Backing) -> None:
    """What anyone with write access to the database can do first."""
    if backing.kind == "sqlite":
        for (name,) in await backing.raw("SELECT name FROM sqlite_master WHERE type = 'trigger'"):
            await backing.raw(f'DROP TRIGGER "{name}"')
    else:
        await backing.raw("ALTER TABLE audit DISABLE TRIGGER USER")


async def test_ledger_refuses_to_chain_onto_a_cut_off_tail(
    backing: Backing, storage: Storage
) -> None:
    """Issue 20 finding 1 on every backend: cut the last entry, then the head too; later
    requests are refused, nothing is written, and verify keeps saying so."""
    from broker.audit import AuditLedger
    from broker.errors import AuditIntegrityError
    from ca.keys import SoftwareBackend

    ledger = AuditLedger(storage, SoftwareBackend())
    await ledger.open()
    ledger.start()
    try:
        for i in range(4):
            await ledger.record({"who": f"w{i}", "what": "svid.mint"})
        await _drop_audit_guards(backing)
        await backing.raw("DELETE FROM audit WHERE seq = 5")
        for attack in ("cut", "cut and head deleted"):
            if attack != "cut":
                await backing.raw("DELETE FROM meta WHERE key = 'audit_head'")
            rows = await storage.read_audit()
            with pytest.raises(AuditIntegrityError):
                await ledger.record({"who": "unauthenticated", "what": "Attest"})
            assert await storage.read_audit() == rows
            for _ in range(2):
                result = await ledger.verify()
                assert (result.intact, result.entries) == (False, 4), attack
        await backing.raw("DELETE FROM audit")
        with pytest.raises(AuditIntegrityError):
            await ledger.record({"who": "unauthenticated", "what": "Attest"})
        assert await storage.read_audit() == []
        assert not (await ledger.verify()).intact
    finally:
        await ledger.stop()


async def test_concurrent_appends_never_fork_the_chain(backing: Backing, storage: Storage) -> None:
    # A second Storage on the same file / database: another broker process or replica.
    other = await backing.open()

    async def append(i: int) -> list[int]:
        target = storage if i % 2 else other
        events = [f'{{"task":{i},"n":{n}}}' for n in range(1 + i % 3)]
        return await target.append_audit(events, Sealer())

    results = await asyncio.gather(*(append(i) for i in range(20)))
    total = sum(1 + i % 3 for i in range(20))
    for seqs in results:
        assert seqs == list(range(seqs[0], seqs[0] + len(seqs)))  # each batch contiguous
    assert sorted(s for seqs in results for s in seqs) == list(range(1, total + 1))
    records = await other.read_audit()
    assert len(records) == total
    assert_valid_chain(records)


# ------------------------------------------------------------------------- meta and counters


async def test_meta_get_set_overwrite(storage: Storage) -> None:
    assert await storage.get_meta("ca.bundle_version") is None
    await storage.set_meta("ca.bundle_version", "1")
    await storage.set_meta("other", "x")
    assert await storage.get_meta("ca.bundle_version") == "1"
    await storage.set_meta("ca.bundle_version", "2")
    assert await storage.get_meta("ca.bundle_version") == "2"
    assert await storage.get_meta("other") == "x"
    await storage.set_meta("empty", "")
    assert await storage.get_meta("empty") == ""


async def test_counters_start_at_one_and_count(storage: Storage) -> None:
    assert await storage.increment_counter("serial") == 1
    assert await storage.increment_counter("serial") == 2
    assert await storage.increment_counter("other") == 1
    assert await storage.increment_counter("serial") == 3


async def test_counters_are_atomic_under_concurrency(backing: Backing, storage: Storage) -> None:
    other = await backing.open()
    results = await asyncio.gather(*(s.increment_counter("c") for s in [storage, other] * 15))
    assert sorted(results) == list(range(1, 31))


# ----------------------------------------------------------------------------------- leases


async def test_leader_lease_lifecycle(storage: Storage) -> None:
    s = dt.timedelta(seconds=1)
    assert await storage.try_lease("rotation", "a", 30, T0)  # free: taken
    assert not await storage.try_lease("rotation", "b", 30, T0 + 10 * s)  # held by a
    assert await storage.try_lease("reaper", "b", 30, T0 + 10 * s)  # other names independent
    assert await storage.try_lease("rotation", "a", 30, T0 + 20 * s)  # renewed until T0+50
    assert not await storage.try_lease("rotation", "b", 30, T0 + 40 * s)  # renewal counted
    assert await storage.try_lease("rotation", "b", 30, T0 + 50 * s)  # expired: taken over
    assert not await storage.try_lease("rotation", "a", 30, T0 + 51 * s)
    await storage.release_lease("rotation", "a")  # not the owner: no effect
    assert not await storage.try_lease("rotation", "a", 30, T0 + 52 * s)
    await storage.release_lease("rotation", "b")
    assert await storage.try_lease("rotation", "a", 30, T0 + 53 * s)


async def test_lease_race_has_one_winner(backing: Backing, storage: Storage) -> None:
    other = await backing.open()
    results = await asyncio.gather(
        *(s.try_lease("job", f"owner-{i}", 30, T0) for i, s in enumerate([storage, other] * 5))
    )
    assert sorted(results) == [False] * 9 + [True]


# ---------------------------------------------------------------------- values round-trip


async def test_datetimes_round_trip_as_aware_utc(storage: Storage) -> None:
    ist = dt.timezone(dt.timedelta(hours=5, minutes=30))
    created = dt.datetime(2026, 7, 4, 23, 59, 59, 999999, tzinfo=ist)
    record = make_authority(
        created_at=created,
        not_before=dt.datetime(1999, 12, 31, 23, 0, tzinfo=dt.timezone(-dt.timedelta(hours=8))),
        not_after=dt.datetime(9999, 12, 31, 23, 59, 59, 999999, tzinfo=dt.UTC),
        activated_at=dt.datetime(1970, 1, 1, tzinfo=dt.UTC) - dt.timedelta(microseconds=1),
    )
    await storage.insert_authority(record)
    (back,) = await storage.list_authorities()
    for name in ("created_at", "not_before", "not_after", "activated_at"):
        value = getattr(back, name)
        assert value == getattr(record, name), name
        assert value.tzinfo is not None and value.utcoffset() == dt.timedelta(0), name
    assert back.created_at.hour == 18 and back.created_at.minute == 29  # converted to UTC
    policy = await storage.put_policy("ca", "{}", "op", created)
    assert policy.created_at == created and policy.created_at.utcoffset() == dt.timedelta(0)
    current = await storage.current_policy("ca")
    assert current is not None and current.created_at.tzinfo is not None


async def test_naive_datetimes_are_refused(storage: Storage) -> None:
    with pytest.raises(ValueError, match="naive"):
        await storage.insert_authority(make_authority(created_at=dt.datetime(2026, 1, 1)))
    with pytest.raises(ValueError, match="naive"):
        await storage.try_lease("job", "a", 30, dt.datetime(2026, 1, 1))
    assert await storage.list_authorities() == []


async def test_bytes_and_text_round_trip_exactly(storage: Storage) -> None:
    blob = bytes(range(256)) * 4 + b"\x00"
    await storage.insert_authority(make_authority(cert_der=blob))
    (back,) = await storage.list_authorities()
    assert back.cert_der == blob and type(back.cert_der) is bytes

    def seal(seq: int, prev: bytes, event: str) -> tuple[bytes, bytes]:
        return b"\x00" * 31 + b"\xff", b""

    event = '{"who":"spiffe://x/ünïcødé ✓","nul":"\\u0000"}'
    await storage.append_audit([event], seal)
    (record,) = await storage.read_audit()
    assert record == AuditRecord(1, event, ZERO, b"\x00" * 31 + b"\xff", b"")
    await storage.set_meta("unicode", "ünïcødé ✓ 🔐")
    assert await storage.get_meta("unicode") == "ünïcødé ✓ 🔐"


async def test_closed_storage_raises_storage_error(backing: Backing) -> None:
    storage = await backing.open()
    await storage.migrate()
    await storage.close()
    with pytest.raises(StorageError):
        await storage.get_meta("k")
    with pytest.raises(StorageError):
        await storage.append_audit(["e"], Sealer())
    await storage.close()  # idempotent
