"""Storage for dynamic database credentials: connections (admin password only sealed), roles,
leases and root-rotation recovery records. One SQL implementation over the shared `Backend`.

Each method is its own transaction. A duplicate key raises `AlreadyExists`; a failing database
raises `StorageError` (from the backend). Lease state changes are compare-and-set: they return
False (or None) and change nothing when the lease is not in the expected state, so the reaper
and a request acting on the same lease cannot both win.

Lease states: "pending" (written before the user exists; `due_at` is the creation deadline),
"active" (`due_at` = `expires_at`), "revoking" (`due_at` = the next attempt) and "irrevocable"
(failed repeatedly: alerted, and still retried at `due_at` with capped backoff until the user
is gone). A revoked lease is deleted.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import enum
from dataclasses import dataclass
from typing import Final, Protocol

from broker.dsn import password_in_dsn
from broker.errors import AlreadyExists, FailedPrecondition, InvalidArgument
from broker.storage.backend import Backend, Row, Tx, require_aware

__all__ = [
    "ConnectionRecord",
    "DatabaseRepository",
    "LeaseRecord",
    "LeaseState",
    "RecoveryRecord",
    "RoleRecord",
    "SqlDatabaseRepository",
    "StaticIntentRecord",
    "StaticRoleRecord",
]


class LeaseState(enum.StrEnum):
    """The states of a lease (see the module docstring); the values are what the `state`
    column holds and what JSON output shows."""

    PENDING = "pending"
    ACTIVE = "active"
    REVOKING = "revoking"
    IRREVOCABLE = "irrevocable"


LEASE_STATES: Final = frozenset(s.value for s in LeaseState)


def _lease_states(states: tuple[str, ...]) -> list[LeaseState]:
    try:
        return [LeaseState(s) for s in states]
    except ValueError:
        raise ValueError(f"lease states must be among {sorted(LEASE_STATES)}") from None


@dataclass(frozen=True)
class ConnectionRecord:
    name: str
    plugin: str
    dsn: str  # never carries a password
    sealed_password: bytes  # SealedBlob.to_bytes()
    kek_label: str
    created_at: dt.datetime
    rotated_at: dt.datetime | None = None


@dataclass(frozen=True)
class RoleRecord:
    name: str
    connection: str
    owner: str
    tenant: str
    environment: str
    creation: str
    revocation: str | None
    rollback: str | None
    default_ttl: int  # seconds
    max_ttl: int
    username_template: str
    password_length: int
    password_charset: str
    created_at: dt.datetime
    classification: str = ""  # public, internal, confidential, pii ("" before issue 12)
    rotation_period: int | None = None  # seconds, metadata as for secrets


@dataclass(frozen=True)
class LeaseRecord:
    id: str
    role: str
    connection: str
    plugin: str
    username: str
    holder: str  # SPIFFE ID of the caller it was issued to
    state: LeaseState
    revocation: str | None
    created_at: dt.datetime
    expires_at: dt.datetime
    max_expires_at: dt.datetime
    due_at: dt.datetime
    attempts: int = 0
    last_error: str | None = None


@dataclass(frozen=True)
class RecoveryRecord:
    connection: str
    sealed_password: bytes  # the NEW admin password, sealed
    kek_label: str
    started_at: dt.datetime


@dataclass(frozen=True)
class StaticRoleRecord:
    """A user that already exists on a target database, whose password the broker rotates."""

    name: str
    connection: str
    username: str
    owner: str
    tenant: str
    environment: str
    rotation_period: int  # seconds
    rotation_statements: str | None
    sealed_password: bytes | None  # the current password, sealed; None before the first
    kek_label: str | None
    version: int  # 0 before the first rotation
    rotated_at: dt.datetime | None
    next_rotation_at: dt.datetime
    created_at: dt.datetime


@dataclass(frozen=True)
class StaticIntentRecord:
    """A static-role rotation in flight: written before the database is touched."""

    role: str
    sealed_password: bytes  # the NEW password, sealed
    kek_label: str
    version: int  # the version it becomes
    reason: str
    started_at: dt.datetime


class DatabaseRepository(Protocol):
    async def insert_connection(self, record: ConnectionRecord) -> None: ...
    async def get_connection(self, name: str) -> ConnectionRecord | None: ...
    async def replace_dsn(self, name: str, old: str, new: str) -> bool:
        """Compare-and-set a connection's DSN; False when it is absent or changed."""
        ...

    async def list_connections(self) -> list[ConnectionRecord]: ...
    async def delete_connection(self, name: str) -> bool:
        """False when absent; FailedPrecondition while roles or leases use it."""
        ...

    async def put_recovery(self, record: RecoveryRecord) -> None:
        """Write (or replace) the recovery record of a root rotation."""
        ...

    async def get_recovery(self, connection: str) -> RecoveryRecord | None: ...
    async def delete_recovery(self, connection: str) -> None: ...
    async def finish_rotation(
        self, connection: str, sealed_password: bytes, kek_label: str, at: dt.datetime
    ) -> None:
        """Store the new admin password and drop the recovery record, in one transaction."""
        ...

    async def sealed_blobs(self, not_label: str) -> list[tuple[str, str, bytes]]:
        """(table, key, blob) of every sealed password (connections and recovery records) not
        wrapped under `not_label`, for KEK rotation."""
        ...

    async def replace_blob(
        self, table: str, key: str, old: bytes, new: bytes, new_label: str
    ) -> bool:
        """Compare-and-set one sealed password from `sealed_blobs` (only if it is still
        `old`); False when it changed meanwhile."""
        ...

    async def label_in_use(self, label: str) -> bool:
        """Whether any sealed password is wrapped under the KEK `label`."""
        ...

    async def insert_role(self, record: RoleRecord) -> None: ...
    async def get_role(self, name: str) -> RoleRecord | None: ...
    async def list_roles(self) -> list[RoleRecord]: ...
    async def delete_role(self, name: str) -> bool: ...

    async def insert_static_role(self, record: StaticRoleRecord) -> None:
        """AlreadyExists for a taken name or (connection, username); FailedPrecondition for an
        unknown connection."""
        ...

    async def get_static_role(self, name: str) -> StaticRoleRecord | None: ...
    async def list_static_roles(self, owner: str | None = None) -> list[StaticRoleRecord]: ...
    async def delete_static_role(self, name: str) -> bool:
        """The role and any intent of it; False when absent."""
        ...

    async def due_static_roles(self, now: dt.datetime, limit: int) -> list[StaticRoleRecord]:
        """Roles whose `next_rotation_at` has passed, or with an intent in flight."""
        ...

    async def put_static_intent(self, record: StaticIntentRecord) -> bool:
        """Write the intent of a rotation; False (nothing written) when one is already in
        flight for that role or the role is gone."""
        ...

    async def get_static_intent(self, role: str) -> StaticIntentRecord | None: ...
    async def delete_static_intent(self, role: str, version: int) -> None: ...
    async def finish_static_rotation(
        self,
        role: str,
        version: int,
        sealed_password: bytes,
        kek_label: str,
        at: dt.datetime,
        next_rotation_at: dt.datetime,
    ) -> bool:
        """Store the new password as `version` and drop the intent of that version, in one
        transaction; False when that intent is no longer there (finished elsewhere)."""
        ...

    async def insert_lease(self, record: LeaseRecord) -> None: ...
    async def get_lease(self, lease_id: str) -> LeaseRecord | None: ...
    async def list_leases(self, prefix: str = "", limit: int = 1000) -> list[LeaseRecord]: ...
    async def activate_lease(self, lease_id: str) -> bool:
        """pending -> active (due at its expiry)."""
        ...

    async def extend_lease(self, lease_id: str, expires_at: dt.datetime) -> bool:
        """Move an active lease's expiry."""
        ...

    async def begin_revocation(
        self,
        lease_id: str,
        due_at: dt.datetime,
        *,
        from_states: tuple[LeaseState, ...],
        due_before: dt.datetime | None = None,
    ) -> LeaseRecord | None:
        """Move the lease to "revoking" (due at `due_at`, the retry time should this attempt
        fail) when it is in one of `from_states` (and, with `due_before`, due by then); the
        claimed record, or None."""
        ...

    async def revocation_failed(
        self, lease_id: str, due_at: dt.datetime, error: str, *, give_up: bool
    ) -> None:
        """Count a failed attempt; "irrevocable" when `give_up`."""
        ...

    async def delete_lease(self, lease_id: str) -> bool: ...
    async def lease_stats(self, now: dt.datetime) -> tuple[int, dt.datetime | None]:
        """(leases in storage, the oldest `due_at` at or before `now` of a lease the reaper
        still has to handle (irrevocable ones left out), or None)."""
        ...

    async def irrevocable_count(self) -> int: ...
    async def due_leases(self, now: dt.datetime, limit: int) -> list[LeaseRecord]:
        """Leases whose `due_at` has passed (irrevocable ones included: they are retried),
        oldest first."""
        ...


class _GroupCommit:
    """Single-row writes from concurrent requests, committed together: while one transaction
    runs, the writes that arrive queue up and go in the next one (one commit, one fsync, for
    all of them). A failing batch is retried one write at a time, so each caller gets its own
    result or error. Each caller returns only once its write is committed."""

    def __init__(self, backend: Backend) -> None:
        self._b = backend
        self._queue: list[tuple[str, tuple[object, ...], asyncio.Future[Row | None]]] = []
        self._task: asyncio.Task[None] | None = None

    async def fetchrow(self, sql: str, *args: object) -> Row | None:
        future: asyncio.Future[Row | None] = asyncio.get_running_loop().create_future()
        self._queue.append((sql, args, future))
        if self._task is None or self._task.done():
            self._task = asyncio.create_task(self._drain())
        return await future

    async def _drain(self) -> None:
        while self._queue:
            batch, self._queue = self._queue, []
            try:
                async with self._b.transaction(write=True) as tx:
                    rows = [await tx.fetchrow(sql, *args) for sql, args, _ in batch]
            except Exception as exc:
                if len(batch) == 1:
                    _settle(batch[0][2], exc=exc)
                    continue
                for sql, args, future in batch:
                    try:
                        async with self._b.transaction(write=True) as tx:
                            row = await tx.fetchrow(sql, *args)
                    except Exception as one:
                        _settle(future, exc=one)
                    else:
                        _settle(future, row)
                continue
            for (_, _, future), row in zip(batch, rows, strict=True):
                _settle(future, row)


def _settle(
    future: asyncio.Future[Row | None], row: Row | None = None, exc: Exception | None = None
) -> None:
    if future.done():  # the caller gave up (cancelled); the write stands or not, as it went
        return
    if exc is not None:
        future.set_exception(exc)
    else:
        future.set_result(row)


class SqlDatabaseRepository:
    """`DatabaseRepository` over a `broker.storage.backend.Backend`; build it with
    `storage.database()`. Lease inserts and activations, the two
    writes on the path of every credential, are group-committed (`_GroupCommit`)."""

    def __init__(self, backend: Backend) -> None:
        self._b = backend
        self._group = _GroupCommit(backend)

    def _ts(self, value: dt.datetime) -> object:
        return self._b.encode_ts(require_aware(value))

    # -- connections

    async def insert_connection(self, record: ConnectionRecord) -> None:
        """Raises InvalidArgument for a DSN carrying a password (never stored, not even here)."""
        if password_in_dsn(record.dsn) is not None:
            raise InvalidArgument("refusing to store a connection DSN that carries a password")
        async with self._b.transaction(write=True) as tx:
            await tx.execute(
                "INSERT INTO db_connections (name, plugin, dsn, sealed_password, kek_label, "
                "created_at, rotated_at) VALUES (?, ?, ?, ?, ?, ?, ?)",
                record.name,
                record.plugin,
                record.dsn,
                bytes(record.sealed_password),
                record.kek_label,
                self._ts(record.created_at),
                None if record.rotated_at is None else self._ts(record.rotated_at),
            )

    async def replace_dsn(self, name: str, old: str, new: str) -> bool:
        if password_in_dsn(new) is not None:
            raise InvalidArgument("refusing to store a connection DSN that carries a password")
        async with self._b.transaction(write=True) as tx:
            row = await tx.fetchrow(
                "UPDATE db_connections SET dsn = ? WHERE name = ? AND dsn = ? RETURNING name",
                new,
                name,
                old,
            )
        return row is not None

    _CONNECTION = "name, plugin, dsn, sealed_password, kek_label, created_at, rotated_at"

    def _connection(self, row: Row) -> ConnectionRecord:
        ts = self._b.decode_ts
        return ConnectionRecord(
            row[0],
            row[1],
            row[2],
            bytes(row[3]),
            row[4],
            ts(row[5]),
            None if row[6] is None else ts(row[6]),
        )

    async def get_connection(self, name: str) -> ConnectionRecord | None:
        async with self._b.transaction(write=False) as tx:
            row = await tx.fetchrow(
                f"SELECT {self._CONNECTION} FROM db_connections WHERE name = ?",  # noqa: S608
                name,
            )
        return None if row is None else self._connection(row)

    async def list_connections(self) -> list[ConnectionRecord]:
        async with self._b.transaction(write=False) as tx:
            rows = await tx.fetch(
                f"SELECT {self._CONNECTION} FROM db_connections ORDER BY name"  # noqa: S608
            )
        return [self._connection(r) for r in rows]

    async def delete_connection(self, name: str) -> bool:
        async with self._b.transaction(write=True) as tx:
            roles = await tx.fetch("SELECT name FROM db_roles WHERE connection = ?", name)
            if roles:
                raise FailedPrecondition(
                    f"connection {name!r} is used by roles "
                    f"{', '.join(sorted(str(r[0]) for r in roles)[:10])}: remove them first"
                )
            statics = await tx.fetch("SELECT name FROM db_static_roles WHERE connection = ?", name)
            if statics:
                raise FailedPrecondition(
                    f"connection {name!r} is used by static roles "
                    f"{', '.join(sorted(str(r[0]) for r in statics)[:10])}: remove them first"
                )
            leases = await tx.fetchrow("SELECT COUNT(*) FROM db_leases WHERE connection = ?", name)
            if leases is not None and int(leases[0]):
                raise FailedPrecondition(
                    f"connection {name!r} still has {int(leases[0])} lease(s): revoke them first"
                )
            await tx.execute("DELETE FROM db_root_recovery WHERE connection = ?", name)
            row = await tx.fetchrow(
                "DELETE FROM db_connections WHERE name = ? RETURNING name", name
            )
        return row is not None

    # -- root rotation recovery

    async def put_recovery(self, record: RecoveryRecord) -> None:
        async with self._b.transaction(write=True) as tx:
            await tx.execute(
                "INSERT INTO db_root_recovery (connection, sealed_password, kek_label, "
                "started_at) VALUES (?, ?, ?, ?) ON CONFLICT (connection) DO UPDATE SET "
                "sealed_password = excluded.sealed_password, kek_label = excluded.kek_label, "
                "started_at = excluded.started_at",
                record.connection,
                bytes(record.sealed_password),
                record.kek_label,
                self._ts(record.started_at),
            )

    async def get_recovery(self, connection: str) -> RecoveryRecord | None:
        async with self._b.transaction(write=False) as tx:
            row = await tx.fetchrow(
                "SELECT connection, sealed_password, kek_label, started_at "
                "FROM db_root_recovery WHERE connection = ?",
                connection,
            )
        if row is None:
            return None
        return RecoveryRecord(row[0], bytes(row[1]), row[2], self._b.decode_ts(row[3]))

    async def delete_recovery(self, connection: str) -> None:
        async with self._b.transaction(write=True) as tx:
            await tx.execute("DELETE FROM db_root_recovery WHERE connection = ?", connection)

    async def finish_rotation(
        self, connection: str, sealed_password: bytes, kek_label: str, at: dt.datetime
    ) -> None:
        async with self._b.transaction(write=True) as tx:
            await tx.execute(
                "UPDATE db_connections SET sealed_password = ?, kek_label = ?, rotated_at = ? "
                "WHERE name = ?",
                bytes(sealed_password),
                kek_label,
                self._ts(at),
                connection,
            )
            await tx.execute("DELETE FROM db_root_recovery WHERE connection = ?", connection)

    # -- sealed blobs (KEK rotation)

    async def sealed_blobs(self, not_label: str) -> list[tuple[str, str, bytes]]:
        """(table, key, blob) of every sealed password not wrapped under `not_label`."""
        async with self._b.transaction(write=False) as tx:
            rows = await tx.fetch(
                "SELECT 'db_connections', name, sealed_password FROM db_connections "
                "WHERE kek_label <> ? UNION ALL "
                "SELECT 'db_root_recovery', connection, sealed_password FROM db_root_recovery "
                "WHERE kek_label <> ? UNION ALL "
                "SELECT 'db_static_roles', name, sealed_password FROM db_static_roles "
                "WHERE sealed_password IS NOT NULL AND kek_label <> ? UNION ALL "
                "SELECT 'db_static_intents', role, sealed_password FROM db_static_intents "
                "WHERE kek_label <> ?",
                not_label,
                not_label,
                not_label,
                not_label,
            )
        return [(r[0], r[1], bytes(r[2])) for r in rows]

    async def replace_blob(
        self, table: str, key: str, old: bytes, new: bytes, new_label: str
    ) -> bool:
        """Compare-and-set one sealed password (only if it is still `old`)."""
        column = {
            "db_connections": "name",
            "db_root_recovery": "connection",
            "db_static_roles": "name",
            "db_static_intents": "role",
        }[table]
        async with self._b.transaction(write=True) as tx:
            row = await tx.fetchrow(
                f"UPDATE {table} SET sealed_password = ?, kek_label = ? "  # noqa: S608
                f"WHERE {column} = ? AND sealed_password = ? RETURNING {column}",
                bytes(new),
                new_label,
                key,
                bytes(old),
            )
        return row is not None

    async def label_in_use(self, label: str) -> bool:
        async with self._b.transaction(write=False) as tx:
            row = await tx.fetchrow(
                "SELECT 1 FROM db_connections WHERE kek_label = ? UNION ALL "
                "SELECT 1 FROM db_root_recovery WHERE kek_label = ? UNION ALL "
                "SELECT 1 FROM db_static_roles WHERE kek_label = ? UNION ALL "
                "SELECT 1 FROM db_static_intents WHERE kek_label = ?",
                label,
                label,
                label,
                label,
            )
        return row is not None

    # -- roles

    _ROLE = (
        "name, connection, owner, tenant, environment, creation, revocation, rollback, "
        "default_ttl, max_ttl, username_template, password_length, password_charset, created_at, "
        "classification, rotation_period"
    )

    async def insert_role(self, record: RoleRecord) -> None:
        async with self._b.transaction(write=True) as tx:
            if (
                await tx.fetchrow("SELECT 1 FROM db_connections WHERE name = ?", record.connection)
                is None
            ):
                raise FailedPrecondition(f"no connection named {record.connection!r}")
            await tx.execute(
                f"INSERT INTO db_roles ({self._ROLE}) "  # noqa: S608 (constant)
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                record.name,
                record.connection,
                record.owner,
                record.tenant,
                record.environment,
                record.creation,
                record.revocation,
                record.rollback,
                record.default_ttl,
                record.max_ttl,
                record.username_template,
                record.password_length,
                record.password_charset,
                self._ts(record.created_at),
                record.classification,
                record.rotation_period,
            )

    def _role(self, row: Row) -> RoleRecord:
        return RoleRecord(
            row[0],
            row[1],
            row[2],
            row[3],
            row[4],
            row[5],
            row[6],
            row[7],
            int(row[8]),
            int(row[9]),
            row[10],
            int(row[11]),
            row[12],
            self._b.decode_ts(row[13]),
            row[14] or "",
            None if row[15] is None else int(row[15]),
        )

    async def get_role(self, name: str) -> RoleRecord | None:
        async with self._b.transaction(write=False) as tx:
            row = await tx.fetchrow(
                f"SELECT {self._ROLE} FROM db_roles WHERE name = ?",  # noqa: S608
                name,
            )
        return None if row is None else self._role(row)

    async def list_roles(self) -> list[RoleRecord]:
        async with self._b.transaction(write=False) as tx:
            rows = await tx.fetch(f"SELECT {self._ROLE} FROM db_roles ORDER BY name")  # noqa: S608
        return [self._role(r) for r in rows]

    async def delete_role(self, name: str) -> bool:
        async with self._b.transaction(write=True) as tx:
            row = await tx.fetchrow("DELETE FROM db_roles WHERE name = ? RETURNING name", name)
        return row is not None

    # -- static roles

    _STATIC = (
        "name, connection, username, owner, tenant, environment, rotation_period, "
        "rotation_statements, sealed_password, kek_label, version, rotated_at, "
        "next_rotation_at, created_at"
    )

    async def insert_static_role(self, record: StaticRoleRecord) -> None:
        async with self._b.transaction(write=True) as tx:
            if (
                await tx.fetchrow("SELECT 1 FROM db_connections WHERE name = ?", record.connection)
                is None
            ):
                raise FailedPrecondition(f"no connection named {record.connection!r}")
            taken = await tx.fetchrow(
                "SELECT name FROM db_static_roles WHERE connection = ? AND username = ?",
                record.connection,
                record.username,
            )
            if taken is not None:
                raise AlreadyExists(
                    f"user {record.username!r} of connection {record.connection!r} is already "
                    f"static role {taken[0]!r}"
                )
            await tx.execute(
                f"INSERT INTO db_static_roles ({self._STATIC}) "  # noqa: S608 (constant)
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                record.name,
                record.connection,
                record.username,
                record.owner,
                record.tenant,
                record.environment,
                record.rotation_period,
                record.rotation_statements,
                None if record.sealed_password is None else bytes(record.sealed_password),
                record.kek_label,
                record.version,
                None if record.rotated_at is None else self._ts(record.rotated_at),
                self._ts(record.next_rotation_at),
                self._ts(record.created_at),
            )

    def _static(self, row: Row) -> StaticRoleRecord:
        ts = self._b.decode_ts
        return StaticRoleRecord(
            row[0],
            row[1],
            row[2],
            row[3],
            row[4],
            row[5],
            int(row[6]),
            row[7],
            None if row[8] is None else bytes(row[8]),
            row[9],
            int(row[10]),
            None if row[11] is None else ts(row[11]),
            ts(row[12]),
            ts(row[13]),
        )

    async def get_static_role(self, name: str) -> StaticRoleRecord | None:
        async with self._b.transaction(write=False) as tx:
            row = await tx.fetchrow(
                f"SELECT {self._STATIC} FROM db_static_roles WHERE name = ?",  # noqa: S608
                name,
            )
        return None if row is None else self._static(row)

    async def list_static_roles(self, owner: str | None = None) -> list[StaticRoleRecord]:
        async with self._b.transaction(write=False) as tx:
            if owner is None:
                rows = await tx.fetch(
                    f"SELECT {self._STATIC} FROM db_static_roles ORDER BY name"  # noqa: S608
                )
            else:
                rows = await tx.fetch(
                    f"SELECT {self._STATIC} FROM db_static_roles "  # noqa: S608
                    "WHERE owner = ? ORDER BY name",
                    owner,
                )
        return [self._static(r) for r in rows]

    async def delete_static_role(self, name: str) -> bool:
        async with self._b.transaction(write=True) as tx:
            await tx.execute("DELETE FROM db_static_intents WHERE role = ?", name)
            row = await tx.fetchrow(
                "DELETE FROM db_static_roles WHERE name = ? RETURNING name", name
            )
        return row is not None

    async def due_static_roles(self, now: dt.datetime, limit: int) -> list[StaticRoleRecord]:
        async with self._b.transaction(write=False) as tx:
            rows = await tx.fetch(
                f"SELECT {self._STATIC} FROM db_static_roles "  # noqa: S608 (constant)
                "WHERE next_rotation_at <= ? OR name IN (SELECT role FROM db_static_intents) "
                "ORDER BY next_rotation_at LIMIT ?",
                self._ts(now),
                limit,
            )
        return [self._static(r) for r in rows]

    async def put_static_intent(self, record: StaticIntentRecord) -> bool:
        async with self._b.transaction(write=True) as tx:
            if (
                await tx.fetchrow("SELECT 1 FROM db_static_roles WHERE name = ?", record.role)
                is None
            ):
                return False
            if (
                await tx.fetchrow("SELECT 1 FROM db_static_intents WHERE role = ?", record.role)
                is not None
            ):
                return False
            await tx.execute(
                "INSERT INTO db_static_intents (role, sealed_password, kek_label, version, "
                "reason, started_at) VALUES (?, ?, ?, ?, ?, ?)",
                record.role,
                bytes(record.sealed_password),
                record.kek_label,
                record.version,
                record.reason,
                self._ts(record.started_at),
            )
        return True

    async def get_static_intent(self, role: str) -> StaticIntentRecord | None:
        async with self._b.transaction(write=False) as tx:
            row = await tx.fetchrow(
                "SELECT role, sealed_password, kek_label, version, reason, started_at "
                "FROM db_static_intents WHERE role = ?",
                role,
            )
        if row is None:
            return None
        return StaticIntentRecord(
            row[0], bytes(row[1]), row[2], int(row[3]), row[4], self._b.decode_ts(row[5])
        )

    async def delete_static_intent(self, role: str, version: int) -> None:
        async with self._b.transaction(write=True) as tx:
            await tx.execute(
                "DELETE FROM db_static_intents WHERE role = ? AND version = ?", role, version
            )

    async def finish_static_rotation(
        self,
        role: str,
        version: int,
        sealed_password: bytes,
        kek_label: str,
        at: dt.datetime,
        next_rotation_at: dt.datetime,
    ) -> bool:
        async with self._b.transaction(write=True) as tx:
            gone = await tx.fetchrow(
                "DELETE FROM db_static_intents WHERE role = ? AND version = ? RETURNING role",
                role,
                version,
            )
            if gone is None:
                return False
            await tx.execute(
                "UPDATE db_static_roles SET sealed_password = ?, kek_label = ?, version = ?, "
                "rotated_at = ?, next_rotation_at = ? WHERE name = ?",
                bytes(sealed_password),
                kek_label,
                version,
                self._ts(at),
                self._ts(next_rotation_at),
                role,
            )
        return True

    # -- leases

    _LEASE = (
        "id, role, connection, plugin, username, holder, state, revocation, created_at, "
        "expires_at, max_expires_at, due_at, attempts, last_error"
    )

    async def insert_lease(self, record: LeaseRecord) -> None:
        if record.state not in LEASE_STATES:
            raise ValueError(f"lease state must be one of {sorted(LEASE_STATES)}")
        state = LeaseState(record.state)
        await self._group.fetchrow(
            f"INSERT INTO db_leases ({self._LEASE}) "  # noqa: S608 (constant)
            "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            record.id,
            record.role,
            record.connection,
            record.plugin,
            record.username,
            record.holder,
            state.value,
            record.revocation,
            self._ts(record.created_at),
            self._ts(record.expires_at),
            self._ts(record.max_expires_at),
            self._ts(record.due_at),
            record.attempts,
            record.last_error,
        )

    def _lease(self, row: Row) -> LeaseRecord:
        ts = self._b.decode_ts
        return LeaseRecord(
            row[0],
            row[1],
            row[2],
            row[3],
            row[4],
            row[5],
            LeaseState(row[6]),
            row[7],
            ts(row[8]),
            ts(row[9]),
            ts(row[10]),
            ts(row[11]),
            int(row[12]),
            row[13],
        )

    async def get_lease(self, lease_id: str) -> LeaseRecord | None:
        async with self._b.transaction(write=False) as tx:
            row = await self._get_lease(tx, lease_id)
        return None if row is None else self._lease(row)

    async def _get_lease(self, tx: Tx, lease_id: str) -> Row | None:
        return await tx.fetchrow(
            f"SELECT {self._LEASE} FROM db_leases WHERE id = ?",  # noqa: S608 (constant)
            lease_id,
        )

    async def list_leases(self, prefix: str = "", limit: int = 1000) -> list[LeaseRecord]:
        async with self._b.transaction(write=False) as tx:
            rows = await tx.fetch(
                f"SELECT {self._LEASE} FROM db_leases "  # noqa: S608 (constant)
                "WHERE substr(id, 1, ?) = ? ORDER BY created_at, id LIMIT ?",
                len(prefix),
                prefix,
                limit,
            )
        return [self._lease(r) for r in rows]

    async def activate_lease(self, lease_id: str) -> bool:
        row = await self._group.fetchrow(
            "UPDATE db_leases SET state = 'active', due_at = expires_at "
            "WHERE id = ? AND state = 'pending' RETURNING id",
            lease_id,
        )
        return row is not None

    async def extend_lease(self, lease_id: str, expires_at: dt.datetime) -> bool:
        stamp = self._ts(expires_at)
        async with self._b.transaction(write=True) as tx:
            row = await tx.fetchrow(
                "UPDATE db_leases SET expires_at = ?, due_at = ? "
                "WHERE id = ? AND state = 'active' RETURNING id",
                stamp,
                stamp,
                lease_id,
            )
        return row is not None

    async def begin_revocation(
        self,
        lease_id: str,
        due_at: dt.datetime,
        *,
        from_states: tuple[LeaseState, ...],
        due_before: dt.datetime | None = None,
    ) -> LeaseRecord | None:
        wanted = _lease_states(from_states)
        if not wanted:
            raise ValueError(f"lease states must be among {sorted(LEASE_STATES)}")
        states = ", ".join("?" for _ in wanted)
        args: list[object] = [self._ts(due_at), lease_id, *(s.value for s in wanted)]
        condition = ""
        if due_before is not None:
            condition = " AND due_at <= ?"
            args.append(self._ts(due_before))
        # One statement, so two revokers (a request and the reaper) cannot both claim it.
        async with self._b.transaction(write=True) as tx:
            row = await tx.fetchrow(
                # An irrevocable lease stays irrevocable (alerted) while it is retried.
                "UPDATE db_leases SET due_at = ?, "  # noqa: S608 (placeholders)
                "state = CASE WHEN state = 'irrevocable' THEN state ELSE 'revoking' END "
                f"WHERE id = ? AND state IN ({states}){condition} RETURNING {self._LEASE}",
                *args,
            )
        return None if row is None else self._lease(row)

    async def revocation_failed(
        self, lease_id: str, due_at: dt.datetime, error: str, *, give_up: bool
    ) -> None:
        async with self._b.transaction(write=True) as tx:
            await tx.execute(
                "UPDATE db_leases SET attempts = attempts + 1, due_at = ?, last_error = ?, "
                "state = ? WHERE id = ?",
                self._ts(due_at),
                error[:1000],
                (LeaseState.IRREVOCABLE if give_up else LeaseState.REVOKING).value,
                lease_id,
            )

    async def delete_lease(self, lease_id: str) -> bool:
        async with self._b.transaction(write=True) as tx:
            row = await tx.fetchrow("DELETE FROM db_leases WHERE id = ? RETURNING id", lease_id)
        return row is not None

    async def lease_stats(self, now: dt.datetime) -> tuple[int, dt.datetime | None]:
        """(leases in storage, the oldest `due_at` at or before `now` of a lease the reaper
        still has to handle, or None)."""
        # Two queries, so the oldest-due one walks the due_at index (migration 0009) instead
        # of every row; the count is the only figure that reads the whole table.
        async with self._b.transaction(write=False) as tx:
            count = await tx.fetchrow("SELECT COUNT(*) FROM db_leases")
            oldest = await tx.fetchrow(
                "SELECT MIN(due_at) FROM db_leases WHERE due_at <= ? AND state <> 'irrevocable'",
                self._ts(now),
            )
        assert count is not None and oldest is not None
        return int(count[0]), None if oldest[0] is None else self._b.decode_ts(oldest[0])

    async def irrevocable_count(self) -> int:
        async with self._b.transaction(write=False) as tx:
            row = await tx.fetchrow("SELECT COUNT(*) FROM db_leases WHERE state = 'irrevocable'")
        assert row is not None
        return int(row[0])

    async def due_leases(self, now: dt.datetime, limit: int) -> list[LeaseRecord]:
        async with self._b.transaction(write=False) as tx:
            rows = await tx.fetch(
                f"SELECT {self._LEASE} FROM db_leases "  # noqa: S608 (constant)
                "WHERE due_at <= ? ORDER BY due_at LIMIT ?",
                self._ts(now),
                limit,
            )
        return [self._lease(r) for r in rows]
