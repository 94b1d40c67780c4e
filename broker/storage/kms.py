"""Storage for KMS keys (issue 16): one row per named key (tenant, name) and one per version.

Key material is never here: a version row names the label of its key in the key backend. Runs
over the shared `Backend` (SQLite and PostgreSQL). Each method is its own transaction; datetimes
must be aware. Compare-and-set updates return False (and change nothing) when the row is not
in the expected state, so two replicas racing on one key cannot both win.
"""

from __future__ import annotations

import datetime as dt
import enum
from dataclasses import dataclass, field
from typing import Final, Protocol

from broker.storage.backend import Backend, Row, Tx, require_aware

__all__ = [
    "KeyRecord",
    "KeyState",
    "KeyVersionRecord",
    "KeyVersionState",
    "KmsRepository",
    "SqlKmsRepository",
]

_KEY_COLUMNS: Final = (
    "tenant, name, purpose, key_type, owner, environment, classification, rotation_period_s, "
    "state, current_version, created_at, last_rotated, destroy_after, mac"
)
_VERSION_COLUMNS: Final = "version, label, state, created_at, destroyed_at"


class KeyState(enum.StrEnum):
    """The states of a KMS key; the values are what the `state` column holds (and what the
    key row's MAC covers) and what JSON output shows."""

    ENABLED = "enabled"
    DISABLED = "disabled"  # every use refused until enabled again
    PENDING_DESTROY = "pending-destroy"  # disabled, destroyed once `destroy_after` has passed
    DESTROYED = "destroyed"  # every version gone from the key backend


class KeyVersionState(enum.StrEnum):
    """The states of one version of a KMS key (the `state` column of its row)."""

    ENABLED = "enabled"
    DESTROYED = "destroyed"


@dataclass(frozen=True)
class KeyRecord:
    tenant: str
    name: str
    purpose: str  # encrypt | sign | mac
    key_type: str  # aes-256 | ec-p256 | ec-p384 | hmac-sha256
    owner: str  # the owning service
    environment: str
    classification: str
    rotation_period_s: int
    state: str  # a KeyState; records read from storage carry the member
    current_version: int
    created_at: dt.datetime
    last_rotated: dt.datetime
    destroy_after: dt.datetime | None = None
    # The stored MAC over the fields above (`broker.kms.keys.KeyMac`); None when stripped.
    mac: bytes | None = field(default=None, compare=False, repr=False)


@dataclass(frozen=True)
class KeyVersionRecord:
    version: int
    label: str  # the key's label in the key backend
    state: str  # a KeyVersionState; records read from storage carry the member
    created_at: dt.datetime
    destroyed_at: dt.datetime | None = None


class KmsRepository(Protocol):
    """KMS key rows and their version rows (see the module docstring)."""

    async def insert_key(self, record: KeyRecord, first: KeyVersionRecord) -> None:
        """The key and its first version, atomically. Raises `AlreadyExists` when (tenant,
        name) is taken, whatever its state."""
        ...

    async def get_key(self, tenant: str, name: str) -> KeyRecord | None: ...

    async def get_key_version(
        self, tenant: str, name: str, version: int | None = None
    ) -> tuple[KeyRecord, KeyVersionRecord | None] | None:
        """The key and one of its versions (the current one when `version` is None) in one
        read; None when the key is absent, no version row when the version is."""
        ...

    async def get_version(
        self, tenant: str, name: str, version: int
    ) -> KeyVersionRecord | None: ...

    async def list_keys(self, tenant: str | None = None) -> list[KeyRecord]:
        """The keys of `tenant` (every tenant when None), by tenant and name."""
        ...

    async def list_versions(self, tenant: str, name: str) -> list[KeyVersionRecord]: ...

    async def add_version(
        self,
        tenant: str,
        name: str,
        expected_current: int,
        version: KeyVersionRecord,
        mac: bytes,
    ) -> bool:
        """Make `version` current if the key is enabled and still at `expected_current`;
        False (nothing changed) otherwise."""
        ...

    async def set_state(
        self,
        tenant: str,
        name: str,
        *,
        expected: str,
        state: str,
        mac: bytes,
        destroy_after: dt.datetime | None = None,
    ) -> bool:
        """Compare-and-set the key's state; False when it was not in `expected`."""
        ...

    async def destroy_versions(self, tenant: str, name: str, at: dt.datetime, mac: bytes) -> None:
        """Record every version and the key itself destroyed."""
        ...


class SqlKmsRepository:
    def __init__(self, backend: Backend) -> None:
        self._b = backend

    def _ts(self, value: dt.datetime | None) -> object:
        return None if value is None else self._b.encode_ts(require_aware(value))

    async def insert_key(self, record: KeyRecord, first: KeyVersionRecord) -> None:
        """The key and its first version, atomically. Raises `AlreadyExists` when (tenant,
        name) is taken, whatever its state."""
        async with self._b.transaction(write=True) as tx:
            await tx.execute(
                f"INSERT INTO kms_keys ({_KEY_COLUMNS}) "  # noqa: S608 (constant)
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                record.tenant,
                record.name,
                record.purpose,
                record.key_type,
                record.owner,
                record.environment,
                record.classification,
                record.rotation_period_s,
                KeyState(record.state).value,
                record.current_version,
                self._ts(record.created_at),
                self._ts(record.last_rotated),
                self._ts(record.destroy_after),
                record.mac,
            )
            await self._insert_version(tx, record.tenant, record.name, first)

    async def _insert_version(self, tx: Tx, tenant: str, name: str, v: KeyVersionRecord) -> None:
        await tx.execute(
            "INSERT INTO kms_key_versions (tenant, name, version, label, state, created_at, "
            "destroyed_at) VALUES (?, ?, ?, ?, ?, ?, ?)",
            tenant,
            name,
            v.version,
            v.label,
            KeyVersionState(v.state).value,
            self._ts(v.created_at),
            self._ts(v.destroyed_at),
        )

    async def get_key(self, tenant: str, name: str) -> KeyRecord | None:
        async with self._b.transaction(write=False) as tx:
            row = await tx.fetchrow(
                f"SELECT {_KEY_COLUMNS} FROM kms_keys "  # noqa: S608 (constant)
                "WHERE tenant = ? AND name = ?",
                tenant,
                name,
            )
        return None if row is None else self._key(row)

    async def get_key_version(
        self, tenant: str, name: str, version: int | None = None
    ) -> tuple[KeyRecord, KeyVersionRecord | None] | None:
        """The key and one of its versions (the current one when `version` is None) in one
        read, for the request path; None when the key is absent, no version row when the
        version is."""
        columns = ", ".join(f"k.{c.strip()}" for c in _KEY_COLUMNS.split(","))
        async with self._b.transaction(write=False) as tx:
            row = await tx.fetchrow(
                f"SELECT {columns}, v.version, v.label, v.state, v.created_at, v.destroyed_at "  # noqa: S608
                "FROM kms_keys k LEFT JOIN kms_key_versions v ON v.tenant = k.tenant "
                "AND v.name = k.name AND v.version = COALESCE(?, k.current_version) "
                "WHERE k.tenant = ? AND k.name = ?",
                version,
                tenant,
                name,
            )
        if row is None:
            return None
        return self._key(row), None if row[14] is None else self._version(row[14:])

    async def get_version(self, tenant: str, name: str, version: int) -> KeyVersionRecord | None:
        async with self._b.transaction(write=False) as tx:
            row = await tx.fetchrow(
                f"SELECT {_VERSION_COLUMNS} FROM kms_key_versions "  # noqa: S608 (constant)
                "WHERE tenant = ? AND name = ? AND version = ?",
                tenant,
                name,
                version,
            )
        return None if row is None else self._version(row)

    def _version(self, r: Row) -> KeyVersionRecord:
        ts = self._b.decode_ts
        return KeyVersionRecord(
            r[0], r[1], KeyVersionState(r[2]), ts(r[3]), None if r[4] is None else ts(r[4])
        )

    async def list_keys(self, tenant: str | None = None) -> list[KeyRecord]:
        """The keys of `tenant` (every tenant when None), by tenant and name."""
        async with self._b.transaction(write=False) as tx:
            if tenant is None:
                rows = await tx.fetch(
                    f"SELECT {_KEY_COLUMNS} FROM kms_keys ORDER BY tenant, name"  # noqa: S608
                )
            else:
                rows = await tx.fetch(
                    f"SELECT {_KEY_COLUMNS} FROM kms_keys "  # noqa: S608 (constant)
                    "WHERE tenant = ? ORDER BY name",
                    tenant,
                )
        return [self._key(r) for r in rows]

    async def list_versions(self, tenant: str, name: str) -> list[KeyVersionRecord]:
        async with self._b.transaction(write=False) as tx:
            rows = await tx.fetch(
                f"SELECT {_VERSION_COLUMNS} FROM kms_key_versions "  # noqa: S608 (constant)
                "WHERE tenant = ? AND name = ? ORDER BY version",
                tenant,
                name,
            )
        return [self._version(r) for r in rows]

    async def add_version(
        self,
        tenant: str,
        name: str,
        expected_current: int,
        version: KeyVersionRecord,
        mac: bytes,
    ) -> bool:
        """Make `version` current (the row's new MAC: `mac`) if the key is enabled and still
        at `expected_current`; False (nothing changed) otherwise."""
        async with self._b.transaction(write=True) as tx:
            row = await tx.fetchrow(
                "UPDATE kms_keys SET current_version = ?, last_rotated = ?, mac = ? "
                "WHERE tenant = ? AND name = ? AND current_version = ? AND state = 'enabled' "
                "RETURNING name",
                version.version,
                self._ts(version.created_at),
                mac,
                tenant,
                name,
                expected_current,
            )
            if row is None:
                return False
            await self._insert_version(tx, tenant, name, version)
        return True

    async def set_state(
        self,
        tenant: str,
        name: str,
        *,
        expected: str,
        state: str,
        mac: bytes,
        destroy_after: dt.datetime | None = None,
    ) -> bool:
        """Move the key from state `expected` to `state` (the row's new MAC: `mac`); False
        when it was not in `expected`."""
        async with self._b.transaction(write=True) as tx:
            row = await tx.fetchrow(
                "UPDATE kms_keys SET state = ?, destroy_after = ?, mac = ? "
                "WHERE tenant = ? AND name = ? AND state = ? RETURNING name",
                KeyState(state).value,
                self._ts(destroy_after),
                mac,
                tenant,
                name,
                KeyState(expected).value,
            )
        return row is not None

    async def destroy_versions(self, tenant: str, name: str, at: dt.datetime, mac: bytes) -> None:
        """Record every version of the key destroyed and the key itself destroyed (the row's
        new MAC: `mac`)."""
        async with self._b.transaction(write=True) as tx:
            await tx.execute(
                "UPDATE kms_key_versions SET state = 'destroyed', destroyed_at = ? "
                "WHERE tenant = ? AND name = ? AND state <> 'destroyed'",
                self._ts(at),
                tenant,
                name,
            )
            await tx.execute(
                "UPDATE kms_keys SET state = 'destroyed', mac = ? WHERE tenant = ? AND name = ?",
                mac,
                tenant,
                name,
            )

    def _key(self, r: Row) -> KeyRecord:
        ts = self._b.decode_ts
        return KeyRecord(
            r[0],
            r[1],
            r[2],
            r[3],
            r[4],
            r[5],
            r[6],
            int(r[7]),
            KeyState(r[8]),
            int(r[9]),
            ts(r[10]),
            ts(r[11]),
            None if r[12] is None else ts(r[12]),
            None if r[13] is None else bytes(r[13]),
        )
