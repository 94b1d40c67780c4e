"""Storage for wrapped static secrets: one row of metadata per secret, one row per version
holding only its sealed blob (ciphertext + wrapped data key) and the label of the KEK that
wrapped it. One SQL implementation over the shared `Backend` (SQLite and PostgreSQL).

Each method is its own transaction. A duplicate reference raises `AlreadyExists`; a failing
database raises `StorageError` (from the backend). Compare-and-set updates return False (and
change nothing) when the row is not in the expected state, so two replicas racing on the same
secret cannot both win.

Every metadata row carries `meta_mac`, a MAC over all its columns, and every version row
`state_mac`, a MAC over its lifecycle (version, created, retire and revoke times), both made by
the `MetadataSeal` the repository is built with (an HMAC key in the key backend). Each write
checks the MACs of the rows it builds on before changing them, inside the same transaction,
and raises `ca.errors.IntegrityError` when one does not verify (so a row altered by someone
with database access is never re-sealed by a legitimate change); it then writes the new MACs.
Revoking is the exception: it only ever makes versions unreadable, so it seals every version
revoked whatever it held. Reads return the stored MACs in `SecretRecord.mac` and
`VersionRecord.mac`; the domain verifies them before using the records.
"""

from __future__ import annotations

import datetime as dt
import enum
import logging
from dataclasses import dataclass, field
from typing import Any, Protocol

from broker.storage.backend import Backend, Row
from ca.errors import IntegrityError

__all__ = [
    "MetadataSeal",
    "SealedRow",
    "SecretRecord",
    "SecretRepository",
    "SecretState",
    "SqlSecretRepository",
    "VersionRecord",
]


class SecretState(enum.StrEnum):
    """The states of a secret; the values are what the `state` column holds (and what the
    metadata MAC covers) and what JSON output shows."""

    ACTIVE = "active"
    REVOKED = "revoked"  # every version revoked; a rotation makes it active again
    DELETED = "deleted"  # soft-deleted; its sealed data is destroyed after the grace period
    DESTROYED = "destroyed"  # a tombstone: sealed data gone


@dataclass(frozen=True)
class SecretRecord:
    """Metadata of one secret. Metadata fields are None when missing (a record written by an
    import or an older broker); such a secret is never distributed."""

    tenant: str
    ref: str
    service: str | None
    environment: str | None
    owner: str | None
    classification: str | None
    rotation_period_s: int | None
    last_rotated: dt.datetime | None
    current_version: int
    state: SecretState
    created_at: dt.datetime
    revoked_at: dt.datetime | None = None
    deleted_at: dt.datetime | None = None
    # The stored MAC over the fields above (None: written before MACs, or stripped).
    mac: bytes | None = field(default=None, compare=False, repr=False)


class MetadataSeal(Protocol):
    """Makes and checks the MAC over a secret's metadata row (`broker.secrets.MetadataMac`)."""

    def seal(self, record: SecretRecord) -> bytes:
        """The MAC over every metadata field of `record` (not `record.mac`)."""
        ...

    def verify(self, record: SecretRecord) -> bool:
        """True when `record.mac` is the MAC of its fields."""
        ...

    def seal_version(self, tenant: str, ref: str, version: VersionRecord) -> bytes:
        """The MAC over the lifecycle fields of one version (not its sealed blob, which the
        AEAD binds, nor its KEK label, which a KEK rotation changes)."""
        ...

    def verify_version(self, tenant: str, ref: str, version: VersionRecord) -> bool:
        """True when `version.mac` is the MAC of its lifecycle fields, or of the same fields
        with `revoked_at` unset when it equals `retire_at` (the janitor's `retire_expired`,
        which only ever makes a version unreadable)."""
        ...


log = logging.getLogger(__name__)


@dataclass(frozen=True)
class VersionRecord:
    version: int
    kek_label: str | None  # None once destroyed
    sealed: bytes | None  # SealedBlob.to_bytes(); None once destroyed
    created_at: dt.datetime
    retire_at: dt.datetime | None = None  # end of the rollback window once superseded
    revoked_at: dt.datetime | None = None
    # The stored MAC over version, created_at, retire_at and revoked_at (None: see SecretRecord).
    mac: bytes | None = field(default=None, compare=False, repr=False)


@dataclass(frozen=True)
class SealedRow:
    tenant: str
    ref: str
    version: int
    kek_label: str
    sealed: bytes


class SecretRepository(Protocol):
    @property
    def seal(self) -> MetadataSeal:
        """What MACs the metadata rows (the domain verifies records with it)."""
        ...

    async def insert_secret(self, record: SecretRecord, first: VersionRecord) -> None:
        """The secret and its first version, atomically. Raises `AlreadyExists` if the
        (tenant, ref) is taken, whatever its state."""
        ...

    async def load(
        self, tenant: str, ref: str, version: int | None = None
    ) -> tuple[SecretRecord, VersionRecord | None] | None:
        """The secret and the requested version (the current one when `version` is None) in one
        indexed read; None when there is no such secret; (record, None) when the version does
        not exist."""
        ...

    async def versions(self, tenant: str, ref: str) -> list[VersionRecord]:
        """Every version, oldest first (sealed blobs included)."""
        ...

    async def unsealed(self) -> list[SecretRecord]:
        """Records without a MAC (written before MACs existed), for the one-time upgrade."""
        ...

    async def seal_unsealed(self, record: SecretRecord) -> bool:
        """Write the MAC of `record` if its row still has none and still holds exactly
        `record`'s fields; False otherwise."""
        ...

    async def unsealed_versions(self) -> list[tuple[str, str, VersionRecord]]:
        """(tenant, ref, version) of version rows without a MAC, for the one-time upgrade."""
        ...

    async def seal_unsealed_version(self, tenant: str, ref: str, version: VersionRecord) -> bool:
        """As `seal_unsealed`, for one version row."""
        ...

    async def list_secrets(self, tenant: str | None = None, prefix: str = "") -> list[SecretRecord]:
        """Secrets of `tenant` (every tenant when None) whose reference starts with `prefix`,
        ordered by (tenant, ref)."""
        ...

    async def add_version(
        self,
        tenant: str,
        ref: str,
        *,
        expected_current: int,
        new: VersionRecord,
        retire_previous_at: dt.datetime,
    ) -> bool:
        """Append `new` and make it current if the current version is still
        `expected_current` and the secret is active or revoked (a revoked secret becomes active
        again with its new version; old versions stay revoked). The previous current version
        gets `retire_at`. False when the compare-and-set lost."""
        ...

    async def rollback(
        self, tenant: str, ref: str, *, from_version: int, to_version: int, at: dt.datetime
    ) -> bool:
        """Make `to_version` current again (clearing its retire_at) and revoke `from_version`,
        if `from_version` is still current and the secret active. False otherwise."""
        ...

    async def revoke(self, tenant: str, ref: str, at: dt.datetime) -> bool:
        """Mark the secret and every version revoked. False when there is no active secret."""
        ...

    async def revoke_version(self, tenant: str, ref: str, version: int, at: dt.datetime) -> bool:
        """Revoke one version that is not the current one (a staged rollout's old version once
        the rollout completed). False when absent, current, or already revoked."""
        ...

    async def mark_deleted(self, tenant: str, ref: str, at: dt.datetime) -> bool:
        """Soft delete (active or revoked secrets). False when there is nothing to delete."""
        ...

    async def retire_expired(self, now: dt.datetime) -> int:
        """Revoke versions whose rollback window ended (retire_at <= now); how many."""
        ...

    async def destroy_deleted(self, deleted_before: dt.datetime) -> list[tuple[str, str]]:
        """Destroy the sealed data (wrapped keys and ciphertexts) of secrets deleted before
        the cutoff and tombstone them (state "destroyed"); the (tenant, ref)s destroyed."""
        ...

    async def sealed_not_under(self, tenant: str, label: str) -> list[SealedRow]:
        """Sealed versions of `tenant` whose data key is wrapped under another KEK."""
        ...

    async def replace_sealed(self, row: SealedRow, new_label: str, sealed: bytes) -> bool:
        """Compare-and-set one version's blob: only if it is still under `row.kek_label`."""
        ...

    async def kek_in_use(self, label: str) -> bool: ...

    async def kek_tenants(self) -> list[str]:
        """Tenants that have a KEK (from the `kek.current.<tenant>` meta keys), sorted."""
        ...


_RECORD_COLUMNS = (
    "s.tenant, s.ref, s.service, s.environment, s.owner, s.classification, "
    "s.rotation_period_s, s.last_rotated, s.current_version, s.state, s.created_at, "
    "s.revoked_at, s.deleted_at, s.meta_mac"
)
_RECORD_WIDTH = 14
_VERSION_COLUMNS = (
    "v.version, v.kek_label, v.sealed, v.created_at, v.retire_at, v.revoked_at, v.state_mac"
)


class SqlSecretRepository:
    """`SecretRepository` over a `broker.storage.backend.Backend`; build it with
    `storage.secrets(seal)`."""

    def __init__(self, backend: Backend, seal: MetadataSeal) -> None:
        self._b = backend
        self._seal = seal

    @property
    def seal(self) -> MetadataSeal:
        return self._seal

    def _ts(self, value: dt.datetime | None) -> object:
        return None if value is None else self._b.encode_ts(value)

    def _dt(self, value: Any) -> dt.datetime | None:
        return None if value is None else self._b.decode_ts(value)

    def _secret(self, row: Row) -> SecretRecord:
        ts = self._b.decode_ts
        return SecretRecord(
            tenant=row[0],
            ref=row[1],
            service=row[2],
            environment=row[3],
            owner=row[4],
            classification=row[5],
            rotation_period_s=None if row[6] is None else int(row[6]),
            last_rotated=self._dt(row[7]),
            current_version=int(row[8]),
            state=SecretState(row[9]),  # the column CHECKs its values
            created_at=ts(row[10]),
            revoked_at=self._dt(row[11]),
            deleted_at=self._dt(row[12]),
            mac=None if row[13] is None else bytes(row[13]),
        )

    async def _checked(self, tx: Any, tenant: str, ref: str) -> SecretRecord | None:
        """The row as stored, refusing (IntegrityError) one whose MAC does not verify; None
        when there is no such secret. Call first in every write transaction."""
        row = await tx.fetchrow(
            f"SELECT {_RECORD_COLUMNS} FROM secrets s "  # noqa: S608 (constant)
            "WHERE s.tenant = ? AND s.ref = ?",
            tenant,
            ref,
        )
        if row is None:
            return None
        record = self._secret(row)
        if not self._seal.verify(record):
            raise IntegrityError("secret metadata did not verify against its MAC")
        return record

    async def _reseal(self, tx: Any, tenant: str, ref: str) -> None:
        """Write the MAC of the row as it is now (after a change in this transaction)."""
        row = await tx.fetchrow(
            f"SELECT {_RECORD_COLUMNS} FROM secrets s "  # noqa: S608 (constant)
            "WHERE s.tenant = ? AND s.ref = ?",
            tenant,
            ref,
        )
        if row is not None:
            await tx.execute(
                "UPDATE secrets SET meta_mac = ? WHERE tenant = ? AND ref = ?",
                self._seal.seal(self._secret(row)),
                tenant,
                ref,
            )

    def _version(self, row: Row) -> VersionRecord:
        return VersionRecord(
            version=int(row[0]),
            kek_label=row[1],
            sealed=None if row[2] is None else bytes(row[2]),
            created_at=self._b.decode_ts(row[3]),
            retire_at=self._dt(row[4]),
            revoked_at=self._dt(row[5]),
            mac=None if row[6] is None else bytes(row[6]),
        )

    async def _version_row(self, tx: Any, tenant: str, ref: str, version: int) -> Row | None:
        row: Row | None = await tx.fetchrow(
            f"SELECT {_VERSION_COLUMNS} FROM secret_versions v "  # noqa: S608 (constant)
            "WHERE v.tenant = ? AND v.ref = ? AND v.version = ?",
            tenant,
            ref,
            version,
        )
        return row

    async def _checked_version(self, tx: Any, tenant: str, ref: str, version: int) -> None:
        """Refuse (IntegrityError) a version row whose MAC does not verify; absent is fine."""
        row = await self._version_row(tx, tenant, ref, version)
        if row is not None and not self._seal.verify_version(tenant, ref, self._version(row)):
            raise IntegrityError(f"version {version} did not verify against its MAC")

    async def _reseal_version(self, tx: Any, tenant: str, ref: str, version: int) -> None:
        row = await self._version_row(tx, tenant, ref, version)
        if row is not None:
            await tx.execute(
                "UPDATE secret_versions SET state_mac = ? "
                "WHERE tenant = ? AND ref = ? AND version = ?",
                self._seal.seal_version(tenant, ref, self._version(row)),
                tenant,
                ref,
                version,
            )

    async def insert_secret(self, record: SecretRecord, first: VersionRecord) -> None:
        async with self._b.transaction(write=True) as tx:
            await tx.execute(
                "INSERT INTO secrets (tenant, ref, service, environment, owner, classification, "
                "rotation_period_s, last_rotated, current_version, state, created_at, "
                "revoked_at, deleted_at, meta_mac) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                record.tenant,
                record.ref,
                record.service,
                record.environment,
                record.owner,
                record.classification,
                record.rotation_period_s,
                self._ts(record.last_rotated),
                record.current_version,
                SecretState(record.state).value,
                self._b.encode_ts(record.created_at),
                self._ts(record.revoked_at),
                self._ts(record.deleted_at),
                self._seal.seal(record),
            )
            await self._insert_version(tx, record.tenant, record.ref, first)

    async def _insert_version(self, tx: Any, tenant: str, ref: str, v: VersionRecord) -> None:
        await tx.execute(
            "INSERT INTO secret_versions (tenant, ref, version, kek_label, sealed, created_at, "
            "retire_at, revoked_at, state_mac) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
            tenant,
            ref,
            v.version,
            v.kek_label,
            None if v.sealed is None else bytes(v.sealed),
            self._b.encode_ts(v.created_at),
            self._ts(v.retire_at),
            self._ts(v.revoked_at),
            self._seal.seal_version(tenant, ref, v),
        )

    async def load(
        self, tenant: str, ref: str, version: int | None = None
    ) -> tuple[SecretRecord, VersionRecord | None] | None:
        join = "v.version = s.current_version" if version is None else "v.version = ?"
        args: list[object] = [] if version is None else [version]
        async with self._b.transaction(write=False) as tx:
            row = await tx.fetchrow(
                f"SELECT {_RECORD_COLUMNS}, {_VERSION_COLUMNS} FROM secrets s "  # noqa: S608
                "LEFT JOIN secret_versions v ON v.tenant = s.tenant AND v.ref = s.ref "
                f"AND {join} WHERE s.tenant = ? AND s.ref = ?",
                *args,
                tenant,
                ref,
            )
        if row is None:
            return None
        record = self._secret(row[:_RECORD_WIDTH])
        version_row = row[_RECORD_WIDTH:]
        return record, (None if version_row[0] is None else self._version(version_row))

    async def versions(self, tenant: str, ref: str) -> list[VersionRecord]:
        async with self._b.transaction(write=False) as tx:
            rows = await tx.fetch(
                f"SELECT {_VERSION_COLUMNS} FROM secret_versions v "  # noqa: S608 (constant)
                "WHERE v.tenant = ? AND v.ref = ? ORDER BY v.version",
                tenant,
                ref,
            )
        return [self._version(r) for r in rows]

    async def unsealed(self) -> list[SecretRecord]:
        async with self._b.transaction(write=False) as tx:
            rows = await tx.fetch(
                f"SELECT {_RECORD_COLUMNS} FROM secrets s "  # noqa: S608 (constant)
                "WHERE s.meta_mac IS NULL ORDER BY s.tenant, s.ref"
            )
        return [self._secret(r) for r in rows]

    async def seal_unsealed(self, record: SecretRecord) -> bool:
        async with self._b.transaction(write=True) as tx:
            row = await tx.fetchrow(
                f"SELECT {_RECORD_COLUMNS} FROM secrets s "  # noqa: S608 (constant)
                "WHERE s.tenant = ? AND s.ref = ? AND s.meta_mac IS NULL",
                record.tenant,
                record.ref,
            )
            if row is None or self._secret(row) != record:
                return False
            await tx.execute(
                "UPDATE secrets SET meta_mac = ? WHERE tenant = ? AND ref = ? AND meta_mac IS NULL",
                self._seal.seal(record),
                record.tenant,
                record.ref,
            )
        return True

    async def unsealed_versions(self) -> list[tuple[str, str, VersionRecord]]:
        async with self._b.transaction(write=False) as tx:
            rows = await tx.fetch(
                f"SELECT v.tenant, v.ref, {_VERSION_COLUMNS} FROM secret_versions v "  # noqa: S608
                "WHERE v.state_mac IS NULL ORDER BY v.tenant, v.ref, v.version"
            )
        return [(str(r[0]), str(r[1]), self._version(r[2:])) for r in rows]

    async def seal_unsealed_version(self, tenant: str, ref: str, version: VersionRecord) -> bool:
        async with self._b.transaction(write=True) as tx:
            row = await self._version_row(tx, tenant, ref, version.version)
            if row is None or row[6] is not None or self._version(row) != version:
                return False
            await tx.execute(
                "UPDATE secret_versions SET state_mac = ? "
                "WHERE tenant = ? AND ref = ? AND version = ? AND state_mac IS NULL",
                self._seal.seal_version(tenant, ref, version),
                tenant,
                ref,
                version.version,
            )
        return True

    async def list_secrets(self, tenant: str | None = None, prefix: str = "") -> list[SecretRecord]:
        where: list[str] = []
        args: list[object] = []
        if tenant is not None:
            where.append("s.tenant = ?")
            args.append(tenant)
        if prefix:
            # substr instead of LIKE: no wildcard escaping, same meaning in both dialects.
            where.append("substr(s.ref, 1, ?) = ?")
            args.extend([len(prefix), prefix])
        clause = f"WHERE {' AND '.join(where)} " if where else ""
        async with self._b.transaction(write=False) as tx:
            rows = await tx.fetch(
                f"SELECT {_RECORD_COLUMNS} FROM secrets s {clause}"  # noqa: S608 (constant)
                "ORDER BY s.tenant, s.ref",
                *args,
            )
        return [self._secret(r) for r in rows]

    async def add_version(
        self,
        tenant: str,
        ref: str,
        *,
        expected_current: int,
        new: VersionRecord,
        retire_previous_at: dt.datetime,
    ) -> bool:
        async with self._b.transaction(write=True) as tx:
            if await self._checked(tx, tenant, ref) is None:
                return False
            await self._checked_version(tx, tenant, ref, expected_current)
            row = await tx.fetchrow(
                "UPDATE secrets SET current_version = ?, last_rotated = ?, state = 'active', "
                "revoked_at = NULL WHERE tenant = ? AND ref = ? AND current_version = ? "
                "AND state IN ('active', 'revoked') RETURNING tenant",
                new.version,
                self._b.encode_ts(new.created_at),
                tenant,
                ref,
                expected_current,
            )
            if row is None:
                return False
            await tx.execute(
                "UPDATE secret_versions SET retire_at = ? "
                "WHERE tenant = ? AND ref = ? AND version = ? AND revoked_at IS NULL",
                self._b.encode_ts(retire_previous_at),
                tenant,
                ref,
                expected_current,
            )
            await self._insert_version(tx, tenant, ref, new)
            await self._reseal_version(tx, tenant, ref, expected_current)
            await self._reseal(tx, tenant, ref)
        return True

    async def rollback(
        self, tenant: str, ref: str, *, from_version: int, to_version: int, at: dt.datetime
    ) -> bool:
        stamp = self._b.encode_ts(at)
        async with self._b.transaction(write=True) as tx:
            if await self._checked(tx, tenant, ref) is None:
                return False
            await self._checked_version(tx, tenant, ref, from_version)
            await self._checked_version(tx, tenant, ref, to_version)
            target = await tx.fetchrow(
                "SELECT created_at FROM secret_versions WHERE tenant = ? AND ref = ? "
                "AND version = ? AND revoked_at IS NULL AND sealed IS NOT NULL",
                tenant,
                ref,
                to_version,
            )
            if target is None:
                return False
            row = await tx.fetchrow(
                "UPDATE secrets SET current_version = ?, last_rotated = ? "
                "WHERE tenant = ? AND ref = ? AND current_version = ? AND state = 'active' "
                "RETURNING tenant",
                to_version,
                target[0],
                tenant,
                ref,
                from_version,
            )
            if row is None:
                return False
            await tx.execute(
                "UPDATE secret_versions SET retire_at = NULL "
                "WHERE tenant = ? AND ref = ? AND version = ?",
                tenant,
                ref,
                to_version,
            )
            await tx.execute(
                "UPDATE secret_versions SET revoked_at = ? "
                "WHERE tenant = ? AND ref = ? AND version = ? AND revoked_at IS NULL",
                stamp,
                tenant,
                ref,
                from_version,
            )
            await self._reseal_version(tx, tenant, ref, from_version)
            await self._reseal_version(tx, tenant, ref, to_version)
            await self._reseal(tx, tenant, ref)
        return True

    async def revoke_version(self, tenant: str, ref: str, version: int, at: dt.datetime) -> bool:
        async with self._b.transaction(write=True) as tx:
            record = await self._checked(tx, tenant, ref)
            if record is None or record.current_version == version:
                return False
            await self._checked_version(tx, tenant, ref, version)
            row = await tx.fetchrow(
                "UPDATE secret_versions SET revoked_at = ? WHERE tenant = ? AND ref = ? "
                "AND version = ? AND revoked_at IS NULL RETURNING version",
                self._b.encode_ts(at),
                tenant,
                ref,
                version,
            )
            if row is None:
                return False
            await self._reseal_version(tx, tenant, ref, version)
        return True

    async def revoke(self, tenant: str, ref: str, at: dt.datetime) -> bool:
        stamp = self._b.encode_ts(at)
        async with self._b.transaction(write=True) as tx:
            if await self._checked(tx, tenant, ref) is None:
                return False
            row = await tx.fetchrow(
                "UPDATE secrets SET state = 'revoked', revoked_at = ? "
                "WHERE tenant = ? AND ref = ? AND state = 'active' RETURNING tenant",
                stamp,
                tenant,
                ref,
            )
            if row is None:
                return False
            await tx.execute(
                "UPDATE secret_versions SET revoked_at = ? "
                "WHERE tenant = ? AND ref = ? AND revoked_at IS NULL",
                stamp,
                tenant,
                ref,
            )
            # Every version is revoked now, whatever its row held: sealing it cannot make
            # anything readable again.
            for (number,) in await tx.fetch(
                "SELECT version FROM secret_versions WHERE tenant = ? AND ref = ?", tenant, ref
            ):
                await self._reseal_version(tx, tenant, ref, int(number))
            await self._reseal(tx, tenant, ref)
        return True

    async def mark_deleted(self, tenant: str, ref: str, at: dt.datetime) -> bool:
        async with self._b.transaction(write=True) as tx:
            if await self._checked(tx, tenant, ref) is None:
                return False
            row = await tx.fetchrow(
                "UPDATE secrets SET state = 'deleted', deleted_at = ? "
                "WHERE tenant = ? AND ref = ? AND state IN ('active', 'revoked') "
                "RETURNING tenant",
                self._b.encode_ts(at),
                tenant,
                ref,
            )
            if row is not None:
                await self._reseal(tx, tenant, ref)
        return row is not None

    async def retire_expired(self, now: dt.datetime) -> int:
        async with self._b.transaction(write=True) as tx:
            rows = await tx.fetch(
                "UPDATE secret_versions SET revoked_at = retire_at "
                "WHERE revoked_at IS NULL AND retire_at <= ? RETURNING version",
                self._b.encode_ts(now),
            )
        return len(rows)

    async def destroy_deleted(self, deleted_before: dt.datetime) -> list[tuple[str, str]]:
        async with self._b.transaction(write=True) as tx:
            candidates = await tx.fetch(
                f"SELECT {_RECORD_COLUMNS} FROM secrets s "  # noqa: S608 (constant)
                "WHERE s.state = 'deleted' AND s.deleted_at <= ?",
                self._b.encode_ts(deleted_before),
            )
            rows: list[tuple[str, str]] = []
            for candidate in candidates:
                record = self._secret(candidate)
                if not self._seal.verify(record):
                    # Marked deleted by someone who could write the database but not MAC:
                    # destroying its data would finish their attack. Keep it, loudly.
                    log.warning(
                        "not destroying a secret of tenant %r: its metadata did not verify "
                        "against its MAC (tampered with?)",
                        record.tenant,
                    )
                    continue
                rows.append((record.tenant, record.ref))
            for tenant, ref in rows:
                await tx.execute(
                    "UPDATE secrets SET state = 'destroyed' WHERE tenant = ? AND ref = ?",
                    tenant,
                    ref,
                )
                await self._reseal(tx, tenant, ref)
                await tx.execute(
                    "UPDATE secret_versions SET sealed = NULL, kek_label = NULL, "
                    "revoked_at = COALESCE(revoked_at, ?) WHERE tenant = ? AND ref = ?",
                    self._b.encode_ts(deleted_before),
                    tenant,
                    ref,
                )
        return sorted((str(t), str(r)) for t, r in rows)

    async def sealed_not_under(self, tenant: str, label: str) -> list[SealedRow]:
        async with self._b.transaction(write=False) as tx:
            rows = await tx.fetch(
                "SELECT tenant, ref, version, kek_label, sealed FROM secret_versions "
                "WHERE tenant = ? AND kek_label <> ? AND sealed IS NOT NULL "
                "ORDER BY ref, version",
                tenant,
                label,
            )
        return [SealedRow(r[0], r[1], int(r[2]), r[3], bytes(r[4])) for r in rows]

    async def replace_sealed(self, row: SealedRow, new_label: str, sealed: bytes) -> bool:
        async with self._b.transaction(write=True) as tx:
            done = await tx.fetchrow(
                "UPDATE secret_versions SET kek_label = ?, sealed = ? "
                "WHERE tenant = ? AND ref = ? AND version = ? AND kek_label = ? "
                "AND sealed IS NOT NULL RETURNING version",
                new_label,
                bytes(sealed),
                row.tenant,
                row.ref,
                row.version,
                row.kek_label,
            )
        return done is not None

    async def kek_in_use(self, label: str) -> bool:
        async with self._b.transaction(write=False) as tx:
            row = await tx.fetchrow(
                "SELECT 1 FROM secret_versions WHERE kek_label = ? LIMIT 1", label
            )
        return row is not None

    async def kek_tenants(self) -> list[str]:
        prefix = "kek.current."
        async with self._b.transaction(write=False) as tx:
            rows = await tx.fetch(
                "SELECT key FROM meta WHERE substr(key, 1, ?) = ?", len(prefix), prefix
            )
        return sorted(str(r[0])[len(prefix) :] for r in rows)
