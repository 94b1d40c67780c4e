"""Storage for workload identity: join tokens (only their hashes), JWT attestors, registration
entries and the SVID denylist. One SQL implementation over the shared `Backend` (both dialects).

Each method is its own transaction. A duplicate key raises `AlreadyExists`; a failing database
raises `StorageError` (from the backend).
"""

from __future__ import annotations

import datetime as dt
import json
from dataclasses import dataclass
from typing import Protocol

from broker.storage.backend import Backend, Row, require_aware

__all__ = [
    "AttestorRecord",
    "DenyRecord",
    "EntryRecord",
    "IdentityRepository",
    "JoinTokenRecord",
    "SqlIdentityRepository",
]


@dataclass(frozen=True)
class JoinTokenRecord:
    token_hash: bytes
    spiffe_id: str
    created_at: dt.datetime
    expires_at: dt.datetime
    used_at: dt.datetime | None = None


@dataclass(frozen=True)
class AttestorRecord:
    name: str
    issuer: str
    audience: str
    jwks: str
    template: str
    algorithms: tuple[str, ...]
    created_at: dt.datetime


@dataclass(frozen=True)
class EntryRecord:
    id: str
    spiffe_id: str
    parent_id: str
    selectors: tuple[str, ...]
    x509_ttl: int  # seconds; 0 = CA policy default
    jwt_ttl: int
    dns_names: tuple[str, ...]
    created_at: dt.datetime


@dataclass(frozen=True)
class DenyRecord:
    kind: str  # "spiffe_id" or "serial"
    value: str
    created_at: dt.datetime


class IdentityRepository(Protocol):
    async def insert_join_token(self, record: JoinTokenRecord) -> None: ...

    async def consume_join_token(self, token_hash: bytes, now: dt.datetime) -> str | None:
        """Mark the token used and return its SPIFFE ID, atomically; None when it is unknown,
        expired or already used (a second consumer of the same token always gets None)."""
        ...

    async def use_attestation_jwt(
        self, issuer: str, jti: str, expires_at: dt.datetime, now: dt.datetime
    ) -> bool:
        """Record the first use of the attestation JWT (issuer, jti) until `expires_at`, and
        prune records of tokens expired by `now`, in one transaction. False (nothing written)
        when it was used before: a replay. Atomic across workers and replicas."""
        ...

    async def insert_attestor(self, record: AttestorRecord) -> None: ...

    async def list_attestors(self) -> list[AttestorRecord]: ...

    async def attestor_for_issuer(self, issuer: str) -> AttestorRecord | None: ...

    async def delete_attestor(self, name: str) -> bool: ...

    async def insert_entry(self, record: EntryRecord) -> None: ...

    async def get_entry(self, entry_id: str) -> EntryRecord | None: ...

    async def list_entries(self, parent_id: str | None = None) -> list[EntryRecord]: ...

    async def delete_entry(self, entry_id: str) -> bool: ...

    async def entries_version(self) -> tuple[int, str]:
        """A cheap fingerprint of all registration entries (count, newest creation): moves
        when one is created or deleted (`broker.syncfeed`)."""
        ...

    async def deny(self, record: DenyRecord) -> bool:
        """Add to the denylist; False when it was there already (idempotent)."""
        ...

    async def is_denied(self, spiffe_id: str, serial: str | None) -> bool: ...

    async def list_denied(self) -> list[DenyRecord]: ...


_ENTRY_COLUMNS = "id, spiffe_id, parent_id, selectors, x509_ttl, jwt_ttl, dns_names, created_at"
_ATTESTOR_COLUMNS = "name, issuer, audience, jwks, template, algorithms, created_at"


class SqlIdentityRepository:
    """`IdentityRepository` over a `broker.storage.backend.Backend`; build it with
    `storage.identity()`."""

    def __init__(self, backend: Backend) -> None:
        self._b = backend

    # -- join tokens

    async def insert_join_token(self, record: JoinTokenRecord) -> None:
        ts = self._b.encode_ts
        async with self._b.transaction(write=True) as tx:
            await tx.execute(
                "INSERT INTO join_tokens (token_hash, spiffe_id, created_at, expires_at) "
                "VALUES (?, ?, ?, ?)",
                bytes(record.token_hash),
                record.spiffe_id,
                ts(require_aware(record.created_at)),
                ts(require_aware(record.expires_at)),
            )

    async def consume_join_token(self, token_hash: bytes, now: dt.datetime) -> str | None:
        stamp = self._b.encode_ts(require_aware(now))
        async with self._b.transaction(write=True) as tx:
            row = await tx.fetchrow(
                "UPDATE join_tokens SET used_at = ? "
                "WHERE token_hash = ? AND used_at IS NULL AND expires_at > ? "
                "RETURNING spiffe_id",
                stamp,
                bytes(token_hash),
                stamp,
            )
        return None if row is None else str(row[0])

    async def use_attestation_jwt(
        self, issuer: str, jti: str, expires_at: dt.datetime, now: dt.datetime
    ) -> bool:
        ts = self._b.encode_ts
        stamp = ts(require_aware(now))
        async with self._b.transaction(write=True) as tx:
            await tx.execute("DELETE FROM attestation_jwt_uses WHERE expires_at <= ?", stamp)
            row = await tx.fetchrow(
                "INSERT INTO attestation_jwt_uses (issuer, jti, expires_at, used_at) "
                "VALUES (?, ?, ?, ?) ON CONFLICT (issuer, jti) DO NOTHING RETURNING jti",
                issuer,
                jti,
                ts(require_aware(expires_at)),
                stamp,
            )
        return row is not None

    # -- attestors

    async def insert_attestor(self, record: AttestorRecord) -> None:
        async with self._b.transaction(write=True) as tx:
            await tx.execute(
                f"INSERT INTO attestors ({_ATTESTOR_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?)",  # noqa: S608
                record.name,
                record.issuer,
                record.audience,
                record.jwks,
                record.template,
                json.dumps(list(record.algorithms)),
                self._b.encode_ts(require_aware(record.created_at)),
            )

    async def list_attestors(self) -> list[AttestorRecord]:
        async with self._b.transaction(write=False) as tx:
            rows = await tx.fetch(
                f"SELECT {_ATTESTOR_COLUMNS} FROM attestors ORDER BY name"  # noqa: S608
            )
        return [self._attestor(r) for r in rows]

    async def attestor_for_issuer(self, issuer: str) -> AttestorRecord | None:
        async with self._b.transaction(write=False) as tx:
            row = await tx.fetchrow(
                f"SELECT {_ATTESTOR_COLUMNS} FROM attestors WHERE issuer = ?",  # noqa: S608
                issuer,
            )
        return None if row is None else self._attestor(row)

    async def delete_attestor(self, name: str) -> bool:
        async with self._b.transaction(write=True) as tx:
            row = await tx.fetchrow("DELETE FROM attestors WHERE name = ? RETURNING name", name)
        return row is not None

    def _attestor(self, row: Row) -> AttestorRecord:
        return AttestorRecord(
            name=row[0],
            issuer=row[1],
            audience=row[2],
            jwks=row[3],
            template=row[4],
            algorithms=tuple(json.loads(row[5])),
            created_at=self._b.decode_ts(row[6]),
        )

    # -- registration entries

    async def insert_entry(self, record: EntryRecord) -> None:
        async with self._b.transaction(write=True) as tx:
            await tx.execute(
                f"INSERT INTO registration_entries ({_ENTRY_COLUMNS}) "  # noqa: S608
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                record.id,
                record.spiffe_id,
                record.parent_id,
                json.dumps(list(record.selectors)),
                record.x509_ttl,
                record.jwt_ttl,
                json.dumps(list(record.dns_names)),
                self._b.encode_ts(require_aware(record.created_at)),
            )

    async def get_entry(self, entry_id: str) -> EntryRecord | None:
        async with self._b.transaction(write=False) as tx:
            row = await tx.fetchrow(
                f"SELECT {_ENTRY_COLUMNS} FROM registration_entries WHERE id = ?",  # noqa: S608
                entry_id,
            )
        return None if row is None else self._entry(row)

    async def list_entries(self, parent_id: str | None = None) -> list[EntryRecord]:
        query = f"SELECT {_ENTRY_COLUMNS} FROM registration_entries"  # noqa: S608
        async with self._b.transaction(write=False) as tx:
            if parent_id is None:
                rows = await tx.fetch(query + " ORDER BY spiffe_id, id")
            else:
                rows = await tx.fetch(
                    query + " WHERE parent_id = ? ORDER BY spiffe_id, id", parent_id
                )
        return [self._entry(r) for r in rows]

    async def entries_version(self) -> tuple[int, str]:
        async with self._b.transaction(write=False) as tx:
            row = await tx.fetchrow("SELECT COUNT(*), MAX(created_at) FROM registration_entries")
        if row is None:
            return 0, ""
        return int(row[0]), str(row[1] or "")

    async def delete_entry(self, entry_id: str) -> bool:
        async with self._b.transaction(write=True) as tx:
            row = await tx.fetchrow(
                "DELETE FROM registration_entries WHERE id = ? RETURNING id", entry_id
            )
        return row is not None

    def _entry(self, row: Row) -> EntryRecord:
        return EntryRecord(
            id=row[0],
            spiffe_id=row[1],
            parent_id=row[2],
            selectors=tuple(json.loads(row[3])),
            x509_ttl=int(row[4]),
            jwt_ttl=int(row[5]),
            dns_names=tuple(json.loads(row[6])),
            created_at=self._b.decode_ts(row[7]),
        )

    # -- denylist

    async def deny(self, record: DenyRecord) -> bool:
        async with self._b.transaction(write=True) as tx:
            row = await tx.fetchrow(
                "INSERT INTO svid_denylist (kind, value, created_at) VALUES (?, ?, ?) "
                "ON CONFLICT (kind, value) DO NOTHING RETURNING value",
                record.kind,
                record.value,
                self._b.encode_ts(require_aware(record.created_at)),
            )
        return row is not None

    async def is_denied(self, spiffe_id: str, serial: str | None) -> bool:
        async with self._b.transaction(write=False) as tx:
            row = await tx.fetchrow(
                "SELECT 1 FROM svid_denylist WHERE (kind = 'spiffe_id' AND value = ?) "
                "OR (kind = 'serial' AND value = ?)",
                spiffe_id,
                serial or "",
            )
        return row is not None

    async def list_denied(self) -> list[DenyRecord]:
        async with self._b.transaction(write=False) as tx:
            rows = await tx.fetch(
                "SELECT kind, value, created_at FROM svid_denylist ORDER BY kind, value"
            )
        return [DenyRecord(r[0], r[1], self._b.decode_ts(r[2])) for r in rows]
