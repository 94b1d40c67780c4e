"""Storage: narrow repositories per kind of record, one SQL implementation, two dialects.

Every method is a coroutine and owns its own transaction unless it says otherwise. Failures of
the underlying database raise `broker.errors.StorageError`; a schema newer than the code raises
`broker.errors.SchemaTooNew` from `migrate()`. Short-lived SVIDs are never stored here: their
serial, ID, expiry and caller go into the audit event of the request that minted them.

Datetimes go in aware (naive ones are refused with ValueError) and come back as aware UTC
datetimes, to the microsecond; bytes come back exactly. Open a Storage with
`broker.storage.open_storage(dsn)` and call `migrate()` before anything else.

The CA journal, policy, audit, meta and lock records are methods of `Storage` itself; every
other feature has its own repository, built one way for all of them: `storage.<feature>()`
(`access()`, `identity()`, `database()`, `kms()`, `operators()`, `secrets(seal)`) returns the
feature's `XxxRepository` protocol (from `broker.storage.<feature>`), implemented by
`SqlXxxRepository` over the same connection. Each call builds a new repository; build each once
when wiring.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

from broker.storage.access import AccessRepository
from broker.storage.database import DatabaseRepository
from broker.storage.identity import IdentityRepository
from broker.storage.kms import KmsRepository
from broker.storage.operators import OperatorRepository
from broker.storage.rollouts import RolloutRepository
from broker.storage.secrets import MetadataSeal, SecretRepository
from broker.storage.static_rollouts import SqlStaticRolloutRepository

__all__ = [
    "AuditRecord",
    "AuditRepository",
    "AuthorityRecord",
    "AuthorityRepository",
    "HeadRecord",
    "LockRepository",
    "MetaRepository",
    "PolicyRepository",
    "PolicyVersion",
    "Sealer",
    "Storage",
    "TipGuard",
]


@dataclass(frozen=True)
class AuthorityRecord:
    """One CA in the CA journal: the root, or one generation of the issuing CA.

    `kind` is "root" or "issuing". `state` is a `ca.rotation.GenerationState`: "prepared",
    "active", "retired" (still published, no longer signing) or "expired" (dropped from the
    bundle); records read from storage carry the enum member, writers may pass its value. An
    issuing generation also owns a JWT signing key (`jwt_key_label`, `jwt_kid`); a root has
    neither. Private keys are only ever referenced by label in the key backend.
    """

    id: str
    kind: str
    generation: int
    state: str
    key_label: str
    cert_der: bytes
    jwt_key_label: str | None
    jwt_kid: str | None
    created_at: dt.datetime
    not_before: dt.datetime
    not_after: dt.datetime
    activated_at: dt.datetime | None = None
    retired_at: dt.datetime | None = None


class AuthorityRepository(Protocol):
    async def list_authorities(self) -> list[AuthorityRecord]:
        """All records, ordered by (kind, generation)."""
        ...

    async def insert_authority(self, record: AuthorityRecord) -> None:
        """Raises `broker.errors.AlreadyExists` if the id is taken (or the same kind already has
        this generation)."""
        ...

    async def transition_authority(
        self, authority_id: str, *, from_state: str, to_state: str, at: dt.datetime
    ) -> bool:
        """Compare-and-set the state (`GenerationState` values). Sets activated_at when moving
        to "active" and retired_at when moving to "retired". Returns False (and changes nothing)
        when the record is not in `from_state`, so two replicas cannot both apply the same
        transition."""
        ...


@dataclass(frozen=True)
class PolicyVersion:
    version: int
    document: str  # canonical JSON of the CA policy
    author: str  # SPIFFE ID of the operator who set it
    created_at: dt.datetime


class PolicyRepository(Protocol):
    async def current_policy(self, name: str) -> PolicyVersion | None:
        """Latest version of the named policy document ("ca" for CA policy), or None."""
        ...

    async def put_policy(
        self, name: str, document: str, author: str, at: dt.datetime
    ) -> PolicyVersion:
        """Append a new version (previous version + 1, starting at 1) and return it."""
        ...

    async def policy_history(self, name: str, limit: int = 50) -> list[PolicyVersion]:
        """Newest first."""
        ...


@dataclass(frozen=True)
class AuditRecord:
    seq: int  # 1, 2, 3, ... with no gaps
    event: str  # canonical JSON of the event (never contains secret values)
    prev_hash: bytes  # entry_hash of seq-1; 32 zero bytes for seq 1
    entry_hash: bytes
    mac: bytes


# Called inside the append transaction, once per event, in order:
# (seq, prev_hash, event_json) -> (entry_hash, mac)
Sealer = Callable[[int, bytes, str], tuple[bytes, bytes]]

# Called once, after the last event is sealed, with its seq: -> (meta key, value) to upsert in
# the same transaction (the audit ledger's MACed head record).
HeadRecord = Callable[[int], tuple[str, str]]


@dataclass(frozen=True)
class TipGuard:
    """Checked inside the append transaction, before anything is sealed or written:
    `check(newest record or None, value of the meta row `head_key` or None)` raises to refuse
    the append (nothing is written; the exception propagates unchanged). The audit ledger uses
    it to refuse to chain onto a tail that does not match its MACed head."""

    head_key: str
    check: Callable[[AuditRecord | None, str | None], None]


class AuditRepository(Protocol):
    async def append_audit(
        self,
        events: Sequence[str],
        seal: Sealer,
        head: HeadRecord | None = None,
        guard: TipGuard | None = None,
    ) -> list[int]:
        """Append events atomically to the end of the chain and return their seqs.

        Serialised across connections and processes (SQLite: BEGIN IMMEDIATE; PostgreSQL: a
        transaction-scoped advisory lock), so the chain never forks. Reads the current newest
        record (and, with `guard`, the meta row it names) and runs `guard.check`, then calls
        `seal` per event, inserts all rows, upserts the head record, commits. All or nothing: if
        `guard.check`, `seal` or `head` raises, nothing is appended and its exception propagates
        unchanged. No events: returns [] without checking anything.
        """
        ...

    async def read_audit(self, after_seq: int = 0, limit: int = 1000) -> list[AuditRecord]:
        """Records with seq > after_seq, ascending."""
        ...

    async def audit_tail(self, limit: int) -> list[AuditRecord]:
        """The last `limit` records, ascending."""
        ...


class MetaRepository(Protocol):
    async def get_meta(self, key: str) -> str | None: ...

    async def set_meta(self, key: str, value: str) -> None: ...

    async def increment_counter(self, name: str) -> int:
        """Atomically add one and return the new value (first call returns 1)."""
        ...


class LockRepository(Protocol):
    async def try_lease(self, name: str, owner: str, ttl_seconds: float, now: dt.datetime) -> bool:
        """Take or renew a named leader lease. True when `owner` holds it until now + ttl:
        it was free, expired (expires_at <= now), or already held by `owner` (renewal moves the
        expiry to now + ttl). Background jobs (CA rotation, lease reaper, retention) run only
        while they hold their lease. `now` comes from the caller's clock, so replicas need
        roughly synchronised clocks; ttl_seconds must be positive."""
        ...

    async def release_lease(self, name: str, owner: str) -> None:
        """Give the lease up; does nothing unless `owner` holds it."""
        ...


class Storage(
    AuthorityRepository,
    PolicyRepository,
    AuditRepository,
    MetaRepository,
    LockRepository,
    Protocol,
):
    @property
    def dialect(self) -> str:
        """ "sqlite" or "postgresql"."""
        ...

    async def migrate(self) -> int:
        """Apply pending migrations; return the schema version. Raises SchemaTooNew."""
        ...

    async def schema_version(self) -> int: ...

    async def close(self) -> None: ...

    # -- feature repositories over the same connection (see the module docstring)

    def access(self) -> AccessRepository:
        """Just-in-time grants, two-party approvals and break-glass credentials."""
        ...

    def identity(self) -> IdentityRepository:
        """Join tokens, JWT attestors, registration entries and the SVID denylist."""
        ...

    def database(self) -> DatabaseRepository:
        """Database connections, roles, leases and root-rotation recovery records."""
        ...

    def kms(self) -> KmsRepository:
        """KMS keys (their material stays in the key backend) and their versions."""
        ...

    def operators(self) -> OperatorRepository:
        """Operator login sessions and used ID tokens."""
        ...

    def secrets(self, seal: MetadataSeal) -> SecretRepository:
        """Wrapped static secrets, their rows MACed by `seal`."""
        ...

    def rollouts(self) -> RolloutRepository:
        """Staged rollouts of new secret versions and the consumers seen during them."""
        ...

    def static_rollouts(self) -> SqlStaticRolloutRepository:
        """Static database roles' user pairs and their rollouts' new passwords."""
        ...
