"""One SQL implementation of `broker.storage.interface.Storage` over a thin dialect seam.

`SqlStorage` holds the queries of the core records (CA journal, policies, audit, meta, leader
leases) and hands out the feature repositories (`access()`, `identity()`, `database()`, `kms()`,
`operators()`, `secrets(seal)`), each holding its own queries in `broker.storage.<feature>`. All
of them talk to a `Backend` (`backend.py`; SQLite in `sqlite.py`, PostgreSQL in `postgres.py`)
through a handful of operations on a transaction handle (`Tx`):

- queries are written once, with `?` placeholders; the PostgreSQL backend rewrites them to `$n`;
- upserts use `INSERT ... ON CONFLICT (...) DO UPDATE ... WHERE ... RETURNING`, which both
  dialects accept verbatim (SQLite >= 3.35);
- `Tx.lock(key)` serialises writers: a transaction-scoped advisory lock on PostgreSQL, a no-op on
  SQLite, whose write transactions are `BEGIN IMMEDIATE` and so already hold the database's single
  write lock (across processes sharing the file);
- values cross the seam through `Backend.encode_ts` / `decode_ts` (SQLite: integer microseconds
  since the Unix epoch, UTC; PostgreSQL: timestamptz) and `bytes()` (BLOB / bytea);
- `Tx.run_script` runs a migration file; DDL is transactional in both dialects.

Errors: a unique-key violation raises `AlreadyExists`, any other failure of the database or of the
connection raises `StorageError`. Exceptions raised by caller-supplied code (the audit `Sealer`)
pass through unchanged, after the transaction has been rolled back. Naive datetimes are refused
with `ValueError` (a naive value is a bug: whose local time would it be?).

Migrations are the files `migrations/NNNN_name.sql` (both dialects) or
`migrations/NNNN_name.<dialect>.sql` (one dialect); versions run 1, 2, 3, ... without gaps and
every version must exist for every dialect. Migration 0001 creates `schema_migrations`, which
records each applied version.
"""

from __future__ import annotations

import datetime as dt
import functools
import re
from collections.abc import Sequence
from dataclasses import dataclass
from functools import partial
from importlib import resources
from typing import Any, Final

from broker.errors import AlreadyExists, SchemaTooNew
from broker.storage.access import SqlAccessRepository
from broker.storage.backend import Backend, Row, Tx
from broker.storage.database import SqlDatabaseRepository
from broker.storage.identity import SqlIdentityRepository
from broker.storage.interface import (
    AuditRecord,
    AuthorityRecord,
    HeadRecord,
    PolicyVersion,
    Sealer,
    TipGuard,
)
from broker.storage.kms import SqlKmsRepository
from broker.storage.operators import SqlOperatorRepository
from broker.storage.rollouts import SqlRolloutRepository
from broker.storage.secrets import MetadataSeal, SqlSecretRepository
from broker.storage.static_rollouts import SqlStaticRolloutRepository
from ca.rotation import GenerationState

__all__ = [
    "AUDIT_LOCK_KEY",
    "DIALECTS",
    "MIGRATION_LOCK_KEY",
    "POLICY_LOCK_KEY",
    "ZERO_HASH",
    "Migration",
    "SqlStorage",
    "latest_version",
    "load_migrations",
]

DIALECTS: Final = ("sqlite", "postgresql")
ZERO_HASH: Final = bytes(32)
# 64-bit keys for PostgreSQL advisory locks: ASCII "broker" followed by a small number.
AUDIT_LOCK_KEY: Final = 0x62726F6B6572_0001
MIGRATION_LOCK_KEY: Final = 0x62726F6B6572_0002
POLICY_LOCK_KEY: Final = 0x62726F6B6572_0003

_AUTHORITY_KINDS: Final = frozenset({"root", "issuing"})
_AUTHORITY_STATES: Final = frozenset(s.value for s in GenerationState)


# --------------------------------------------------------------------------------- migrations


@dataclass(frozen=True)
class Migration:
    version: int
    name: str
    filename: str
    sql: str


_MIGRATION_FILE = re.compile(r"^(\d{4})_([a-z0-9_]+?)(?:\.(sqlite|postgresql))?\.sql$")


@functools.cache
def load_migrations(dialect: str) -> tuple[Migration, ...]:
    """The migrations for `dialect`, in version order. Raises RuntimeError if the shipped files
    are inconsistent (a gap, a version missing for this dialect, or two files for one version)."""
    if dialect not in DIALECTS:
        raise ValueError(f"unknown dialect {dialect!r}")
    directory = resources.files("broker.storage").joinpath("migrations")
    generic: dict[int, tuple[str, str]] = {}
    specific: dict[int, tuple[str, str]] = {}
    versions: set[int] = set()
    for entry in directory.iterdir():
        match = _MIGRATION_FILE.match(entry.name)
        if match is None:
            if entry.name.endswith(".sql"):
                raise RuntimeError(f"badly named migration file {entry.name!r}")
            continue
        version, name, file_dialect = int(match[1]), match[2], match[3]
        versions.add(version)
        if file_dialect is not None and file_dialect != dialect:
            continue
        target = generic if file_dialect is None else specific
        if version in target:
            raise RuntimeError(f"two migration files for version {version}: {entry.name!r}")
        target[version] = (entry.name, name)
    if versions and sorted(versions) != list(range(1, max(versions) + 1)):
        raise RuntimeError(f"migration versions must run 1, 2, 3, ... without gaps: {versions}")
    migrations = []
    for version in sorted(versions):
        if version in generic and version in specific:
            raise RuntimeError(f"migration {version} has both a generic and a {dialect} file")
        chosen = specific.get(version) or generic.get(version)
        if chosen is None:
            raise RuntimeError(f"migration {version} has no file for {dialect}")
        filename, name = chosen
        sql = directory.joinpath(filename).read_text(encoding="utf-8")
        migrations.append(Migration(version, name, filename, sql))
    return tuple(migrations)


def latest_version(dialect: str) -> int:
    """The newest schema version this code knows for `dialect`."""
    migrations = load_migrations(dialect)
    return migrations[-1].version if migrations else 0


# ------------------------------------------------------------------------------------ storage


class SqlStorage:
    """`broker.storage.interface.Storage` over a `Backend`. Build one with
    `broker.storage.open_storage(dsn)`; call `migrate()` before anything else."""

    def __init__(self, backend: Backend) -> None:
        self._b = backend
        # Audit appends as one synchronous transaction on the database thread, where the
        # backend offers it. Worth it when several processes share the database (see
        # append_audit); the daemon turns it on for --workers > 1.
        self.single_hop_writes = False

    def __repr__(self) -> str:
        return f"SqlStorage({self._b!r})"

    @property
    def dialect(self) -> str:
        return self._b.dialect

    @property
    def backend(self) -> Backend:
        return self._b

    async def close(self) -> None:
        await self._b.close()

    # -- feature repositories (see broker.storage.interface)

    def access(self) -> SqlAccessRepository:
        return SqlAccessRepository(self._b)

    def identity(self) -> SqlIdentityRepository:
        return SqlIdentityRepository(self._b)

    def database(self) -> SqlDatabaseRepository:
        return SqlDatabaseRepository(self._b)

    def kms(self) -> SqlKmsRepository:
        return SqlKmsRepository(self._b)

    def operators(self) -> SqlOperatorRepository:
        return SqlOperatorRepository(self._b)

    def secrets(self, seal: MetadataSeal) -> SqlSecretRepository:
        return SqlSecretRepository(self._b, seal)

    def rollouts(self) -> SqlRolloutRepository:
        return SqlRolloutRepository(self._b)

    def static_rollouts(self) -> SqlStaticRolloutRepository:
        return SqlStaticRolloutRepository(self._b)

    # -- schema

    async def migrate(self) -> int:
        migrations = load_migrations(self._b.dialect)
        known = migrations[-1].version if migrations else 0
        async with self._b.transaction(write=True) as tx:
            await tx.lock(MIGRATION_LOCK_KEY)
            current = await self._version(tx)
            if current > known:
                raise SchemaTooNew(
                    f"database schema is at version {current} but this broker knows only up to "
                    f"{known}; upgrade the broker"
                )
            for migration in migrations:
                if migration.version <= current:
                    continue
                await tx.run_script(migration.sql)
                await tx.execute(
                    "INSERT INTO schema_migrations (version, name, applied_at) VALUES (?, ?, ?)",
                    migration.version,
                    migration.name,
                    self._b.encode_ts(dt.datetime.now(dt.UTC)),
                )
        return max(current, known)

    async def schema_version(self) -> int:
        async with self._b.transaction(write=False) as tx:
            return await self._version(tx)

    @staticmethod
    async def _version(tx: Tx) -> int:
        if not await tx.table_exists("schema_migrations"):
            return 0
        row = await tx.fetchrow("SELECT MAX(version) FROM schema_migrations")
        return 0 if row is None or row[0] is None else int(row[0])

    # -- authorities

    _AUTHORITY_COLUMNS: Final = (
        "id, kind, generation, state, key_label, cert_der, jwt_key_label, jwt_kid, "
        "created_at, not_before, not_after, activated_at, retired_at"
    )

    async def list_authorities(self) -> list[AuthorityRecord]:
        async with self._b.transaction(write=False) as tx:
            rows = await tx.fetch(
                f"SELECT {self._AUTHORITY_COLUMNS} FROM authorities "  # noqa: S608 (constant)
                "ORDER BY kind, generation, id"
            )
        return [self._authority(row) for row in rows]

    async def insert_authority(self, record: AuthorityRecord) -> None:
        if record.kind not in _AUTHORITY_KINDS:
            raise ValueError(f"authority kind must be one of {sorted(_AUTHORITY_KINDS)}")
        if record.state not in _AUTHORITY_STATES:
            raise ValueError(f"authority state must be one of {sorted(_AUTHORITY_STATES)}")
        ts = self._b.encode_ts
        values = (
            record.id,
            record.kind,
            record.generation,
            GenerationState(record.state).value,
            record.key_label,
            bytes(record.cert_der),
            record.jwt_key_label,
            record.jwt_kid,
            ts(record.created_at),
            ts(record.not_before),
            ts(record.not_after),
            None if record.activated_at is None else ts(record.activated_at),
            None if record.retired_at is None else ts(record.retired_at),
        )
        try:
            async with self._b.transaction(write=True) as tx:
                await tx.execute(
                    f"INSERT INTO authorities ({self._AUTHORITY_COLUMNS}) "  # noqa: S608 (constant)
                    "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    *values,
                )
        except AlreadyExists:
            raise AlreadyExists(
                f"authority {record.id!r} (or {record.kind} generation {record.generation}) "
                "already exists"
            ) from None

    async def transition_authority(
        self, authority_id: str, *, from_state: str, to_state: str, at: dt.datetime
    ) -> bool:
        if to_state not in _AUTHORITY_STATES:
            raise ValueError(f"authority state must be one of {sorted(_AUTHORITY_STATES)}")
        stamp = self._b.encode_ts(at)
        async with self._b.transaction(write=True) as tx:
            row = await tx.fetchrow(
                "UPDATE authorities SET state = ?, "
                "activated_at = CASE WHEN ? THEN ? ELSE activated_at END, "
                "retired_at = CASE WHEN ? THEN ? ELSE retired_at END "
                "WHERE id = ? AND state = ? RETURNING id",
                GenerationState(to_state).value,
                to_state == GenerationState.ACTIVE,
                stamp,
                to_state == GenerationState.RETIRED,
                stamp,
                authority_id,
                str(from_state),
            )
        return row is not None

    def _authority(self, row: Row) -> AuthorityRecord:
        ts = self._b.decode_ts
        return AuthorityRecord(
            id=row[0],
            kind=row[1],
            generation=int(row[2]),
            state=GenerationState(row[3]),
            key_label=row[4],
            cert_der=bytes(row[5]),
            jwt_key_label=row[6],
            jwt_kid=row[7],
            created_at=ts(row[8]),
            not_before=ts(row[9]),
            not_after=ts(row[10]),
            activated_at=None if row[11] is None else ts(row[11]),
            retired_at=None if row[12] is None else ts(row[12]),
        )

    # -- policies

    async def current_policy(self, name: str) -> PolicyVersion | None:
        history = await self.policy_history(name, limit=1)
        return history[0] if history else None

    async def put_policy(
        self, name: str, document: str, author: str, at: dt.datetime
    ) -> PolicyVersion:
        stamp = self._b.encode_ts(at)
        async with self._b.transaction(write=True) as tx:
            # Serialise writers so two replicas cannot both pick the same next version.
            await tx.lock(POLICY_LOCK_KEY)
            row = await tx.fetchrow(
                "SELECT COALESCE(MAX(version), 0) + 1 FROM policies WHERE name = ?", name
            )
            assert row is not None
            version = int(row[0])
            await tx.execute(
                "INSERT INTO policies (name, version, document, author, created_at) "
                "VALUES (?, ?, ?, ?, ?)",
                name,
                version,
                document,
                author,
                stamp,
            )
        return PolicyVersion(version, document, author, self._b.decode_ts(stamp))

    async def policy_history(self, name: str, limit: int = 50) -> list[PolicyVersion]:
        _check_limit(limit)
        async with self._b.transaction(write=False) as tx:
            rows = await tx.fetch(
                "SELECT version, document, author, created_at FROM policies "
                "WHERE name = ? ORDER BY version DESC LIMIT ?",
                name,
                limit,
            )
        return [PolicyVersion(int(r[0]), r[1], r[2], self._b.decode_ts(r[3])) for r in rows]

    # -- audit

    async def append_audit(
        self,
        events: Sequence[str],
        seal: Sealer,
        head: HeadRecord | None = None,
        guard: TipGuard | None = None,
    ) -> list[int]:
        events = list(events)
        for event in events:
            if not isinstance(event, str):
                raise TypeError(f"audit events are JSON strings, got {type(event).__name__}")
        if not events:
            return []
        if self._b.supports_write_sync and self.single_hop_writes:
            # One hop to the database thread for the whole transaction: with several processes
            # on one SQLite file, every await inside an async transaction holds the shared
            # write lock while waiting for a busy event loop (measured, svid-csr at 32 clients,
            # two workers: p99 45 ms this way vs 102 ms async). With one process the async path
            # was faster (~1,300 vs ~1,120 req/s), hence the switch.
            return await self._b.run_write_sync(
                partial(_append_audit_sync, events, seal, head, guard)
            )
        async with self._b.transaction(write=True) as tx:
            await tx.lock(AUDIT_LOCK_KEY)
            # One round trip for the newest entry and the head (each await is a thread hop on
            # SQLite, and this runs once per committed group).
            row = await tx.fetchrow(_SELECT_TIP_AND_HEAD, "" if guard is None else guard.head_key)
            tip = _tip(row)
            if guard is not None:
                guard.check(tip, _meta_value(row))
            rows = _seal_rows(tip, events, seal)
            await tx.executemany(_INSERT_AUDIT, rows)
            if head is not None:
                await tx.execute(_UPSERT_META, *head(rows[-1][0]))
        return [r[0] for r in rows]

    async def read_audit(self, after_seq: int = 0, limit: int = 1000) -> list[AuditRecord]:
        _check_limit(limit)
        async with self._b.transaction(write=False) as tx:
            rows = await tx.fetch(
                "SELECT seq, event, prev_hash, entry_hash, mac FROM audit "
                "WHERE seq > ? ORDER BY seq LIMIT ?",
                after_seq,
                limit,
            )
        return [_audit(row) for row in rows]

    async def audit_tail(self, limit: int) -> list[AuditRecord]:
        _check_limit(limit)
        async with self._b.transaction(write=False) as tx:
            rows = await tx.fetch(
                "SELECT seq, event, prev_hash, entry_hash, mac FROM audit "
                "ORDER BY seq DESC LIMIT ?",
                limit,
            )
        return [_audit(row) for row in reversed(rows)]

    # -- meta and counters

    async def get_meta(self, key: str) -> str | None:
        async with self._b.transaction(write=False) as tx:
            row = await tx.fetchrow(_SELECT_META, key)
        return _meta_value(row)

    async def set_meta(self, key: str, value: str) -> None:
        async with self._b.transaction(write=True) as tx:
            await tx.execute(
                "INSERT INTO meta (key, value) VALUES (?, ?) "
                "ON CONFLICT (key) DO UPDATE SET value = excluded.value",
                key,
                value,
            )

    async def increment_counter(self, name: str) -> int:
        async with self._b.transaction(write=True) as tx:
            row = await tx.fetchrow(
                "INSERT INTO counters (name, value) VALUES (?, 1) "
                "ON CONFLICT (name) DO UPDATE SET value = counters.value + 1 RETURNING value",
                name,
            )
        assert row is not None
        return int(row[0])

    # -- leader leases

    async def try_lease(self, name: str, owner: str, ttl_seconds: float, now: dt.datetime) -> bool:
        if not ttl_seconds > 0:
            raise ValueError("ttl_seconds must be positive")
        stamp = self._b.encode_ts(now)
        until = self._b.encode_ts(now + dt.timedelta(seconds=ttl_seconds))
        # One statement: insert when free; otherwise update only if it is ours or has expired.
        async with self._b.transaction(write=True) as tx:
            row = await tx.fetchrow(
                "INSERT INTO leases_lock (name, owner, expires_at) VALUES (?, ?, ?) "
                "ON CONFLICT (name) DO UPDATE "
                "SET owner = excluded.owner, expires_at = excluded.expires_at "
                "WHERE leases_lock.owner = excluded.owner OR leases_lock.expires_at <= ? "
                "RETURNING owner",
                name,
                owner,
                until,
                stamp,
            )
        return row is not None

    async def release_lease(self, name: str, owner: str) -> None:
        async with self._b.transaction(write=True) as tx:
            await tx.execute("DELETE FROM leases_lock WHERE name = ? AND owner = ?", name, owner)


def _audit(row: Row) -> AuditRecord:
    return AuditRecord(int(row[0]), row[1], bytes(row[2]), bytes(row[3]), bytes(row[4]))


def _check_limit(limit: int) -> None:
    if limit < 0:
        raise ValueError("limit must not be negative")


def _meta_value(row: Row | None) -> str | None:
    """The first column (meta.value) of a row, or None."""
    return None if row is None or row[0] is None else str(row[0])


def _tip(row: Row | None) -> AuditRecord | None:
    """The newest entry from a `_SELECT_TIP_AND_HEAD` row (its event is not loaded: "")."""
    if row is None or row[1] is None:
        return None
    return AuditRecord(int(row[1]), "", bytes(row[2]), bytes(row[3]), bytes(row[4]))


# Always exactly one row: (head value or NULL, newest seq, prev_hash, entry_hash, mac or NULLs).
_SELECT_TIP_AND_HEAD = (
    "SELECT m.value, a.seq, a.prev_hash, a.entry_hash, a.mac FROM (SELECT 1 AS one) o "
    "LEFT JOIN (SELECT seq, prev_hash, entry_hash, mac FROM audit ORDER BY seq DESC LIMIT 1) a "
    "ON TRUE LEFT JOIN meta m ON m.key = ?"
)
_SELECT_META = "SELECT value FROM meta WHERE key = ?"
_INSERT_AUDIT = "INSERT INTO audit (seq, event, prev_hash, entry_hash, mac) VALUES (?, ?, ?, ?, ?)"
_UPSERT_META = (
    "INSERT INTO meta (key, value) VALUES (?, ?) "
    "ON CONFLICT (key) DO UPDATE SET value = excluded.value"
)


def _seal_rows(
    head: AuditRecord | None, events: Sequence[str], seal: Sealer
) -> list[tuple[int, str, bytes, bytes, bytes]]:
    """Chain `events` onto `head` (the newest entry, or None): (seq, event, prev, hash, mac)."""
    seq, prev = (0, ZERO_HASH) if head is None else (head.seq, head.entry_hash)
    rows: list[tuple[int, str, bytes, bytes, bytes]] = []
    for event in events:
        seq += 1
        entry_hash, mac = seal(seq, prev, event)
        if not isinstance(entry_hash, bytes | bytearray | memoryview) or not isinstance(
            mac, bytes | bytearray | memoryview
        ):
            raise TypeError("the audit sealer must return (entry_hash: bytes, mac: bytes)")
        rows.append((seq, event, prev, bytes(entry_hash), bytes(mac)))
        prev = bytes(entry_hash)
    return rows


def _append_audit_sync(
    events: Sequence[str],
    seal: Sealer,
    head: HeadRecord | None,
    guard: TipGuard | None,
    conn: Any,
) -> list[int]:
    """The whole append on a DB-API connection already inside a write transaction."""
    row = conn.execute(_SELECT_TIP_AND_HEAD, ("" if guard is None else guard.head_key,)).fetchone()
    tip = _tip(row)
    if guard is not None:
        guard.check(tip, _meta_value(row))
    rows = _seal_rows(tip, events, seal)
    conn.executemany(_INSERT_AUDIT, rows)
    if head is not None:
        conn.execute(_UPSERT_META, head(rows[-1][0]))
    return [r[0] for r in rows]
