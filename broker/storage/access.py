"""Storage for just-in-time grants, two-party approvals and break-glass credentials.

`SqlAccessRepository` runs over the same `Backend` as `SqlStorage` (SQLite or PostgreSQL;
`storage.access()` builds one), with the tables of migration 0005. Every write bumps the
`access` counter in the same transaction, so other workers and replicas notice the change by
polling `access_version()` and drop their cached decisions.

State changes are compare-and-set: `approve`, `consume_approval`, `use_breakglass` and the
revocations return False (and change nothing) when the row is absent or not in the expected
state, so two replicas can never both approve, use or consume the same record. Methods own
their transaction. Datetimes must be aware (naive ones raise ValueError).
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from typing import Any, Final, Protocol

from broker.errors import AlreadyExists
from broker.storage.backend import Backend, Row, Tx, require_aware

__all__ = [
    "ACCESS_COUNTER",
    "AccessRepository",
    "ApprovalRecord",
    "BreakGlassRecord",
    "GrantRecord",
    "SqlAccessRepository",
]

ACCESS_COUNTER: Final = "access"


@dataclass(frozen=True)
class GrantRecord:
    """A temporary permission: `grantee` may do `action` on `resource` until `expires_at`."""

    id: str
    grantee: str
    action: str
    resource: str
    justification: str
    created_by: str
    created_at: dt.datetime
    expires_at: dt.datetime
    revoked_at: dt.datetime | None = None
    revoked_by: str | None = None

    def in_force(self, now: dt.datetime) -> bool:
        return self.revoked_at is None and now < self.expires_at


@dataclass(frozen=True)
class ApprovalRecord:
    """A request by `requester` to do `action` on `resource`, approved (or not yet) by a
    second operator; usable once, before `expires_at`."""

    id: str
    requester: str
    action: str
    resource: str
    justification: str
    created_at: dt.datetime
    expires_at: dt.datetime
    approved_by: str | None = None
    approved_at: dt.datetime | None = None
    used_at: dt.datetime | None = None

    def state(self, now: dt.datetime) -> str:
        if self.used_at is not None:
            return "used"
        if now >= self.expires_at:
            return "expired"
        return "approved" if self.approved_by is not None else "pending"

    def in_force(self, now: dt.datetime) -> bool:
        return self.state(now) == "approved"


@dataclass(frozen=True)
class BreakGlassRecord:
    """An emergency credential (an X.509-SVID for `spiffe_id`) issued to `operator` after
    approval `approval_id`, good for one use of `action` on `resource` until `expires_at`."""

    id: str
    operator: str
    approval_id: str
    spiffe_id: str
    action: str
    resource: str
    issued_at: dt.datetime
    expires_at: dt.datetime
    used_at: dt.datetime | None = None
    revoked_at: dt.datetime | None = None

    def state(self, now: dt.datetime) -> str:
        if self.revoked_at is not None:
            return "revoked"
        if self.used_at is not None:
            return "used"
        return "expired" if now >= self.expires_at else "active"

    def in_force(self, now: dt.datetime) -> bool:
        return self.state(now) == "active"


class AccessRepository(Protocol):
    async def access_version(self) -> int:
        """The change counter (0 before any change); moves on every write below."""
        ...

    async def bump_access_version(self) -> int:
        """Move the counter without another change (e.g. a new Rego policy version)."""
        ...

    async def insert_grant(self, grant: GrantRecord) -> None:
        """Raises AlreadyExists when the id is taken."""
        ...

    async def get_grant(self, grant_id: str) -> GrantRecord | None: ...

    async def list_grants(self, active_at: dt.datetime | None = None) -> list[GrantRecord]:
        """All grants (oldest first), or only those in force at `active_at`."""
        ...

    async def revoke_grant(self, grant_id: str, by: str, at: dt.datetime) -> bool:
        """False when absent or already revoked."""
        ...

    async def insert_approval(self, approval: ApprovalRecord) -> None: ...

    async def get_approval(self, approval_id: str) -> ApprovalRecord | None: ...

    async def list_approvals(self, active_at: dt.datetime | None = None) -> list[ApprovalRecord]:
        """All approvals, or only the unused, unexpired ones (pending or approved)."""
        ...

    async def approve(self, approval_id: str, by: str, at: dt.datetime) -> bool:
        """Compare-and-set: only a pending, unexpired approval whose requester is not `by`."""
        ...

    async def consume_approval(self, approval_id: str, at: dt.datetime) -> bool:
        """Compare-and-set: only an approved, unused, unexpired approval; marks it used."""
        ...

    async def insert_breakglass(self, record: BreakGlassRecord) -> bool:
        """Consume the approval `record.approval_id` (approved, unused, unexpired, requested by
        `record.operator`) and insert the record, in one transaction. False (nothing written)
        when the approval cannot be consumed."""
        ...

    async def get_breakglass(self, breakglass_id: str) -> BreakGlassRecord | None: ...

    async def list_breakglass(
        self, active_at: dt.datetime | None = None
    ) -> list[BreakGlassRecord]: ...

    async def use_breakglass(self, breakglass_id: str, at: dt.datetime) -> bool:
        """Compare-and-set: only an active record; marks it used (so it is spent)."""
        ...

    async def revoke_breakglass(self, breakglass_id: str, at: dt.datetime) -> bool:
        """False when absent or already revoked."""
        ...


_GRANT_COLUMNS: Final = (
    "id, grantee, action, resource, justification, created_by, created_at, expires_at, "
    "revoked_at, revoked_by"
)
_APPROVAL_COLUMNS: Final = (
    "id, requester, action, resource, justification, created_at, expires_at, approved_by, "
    "approved_at, used_at"
)
_BREAKGLASS_COLUMNS: Final = (
    "id, operator, approval_id, spiffe_id, action, resource, issued_at, expires_at, used_at, "
    "revoked_at"
)
_BUMP: Final = (
    "INSERT INTO counters (name, value) VALUES (?, 1) "
    "ON CONFLICT (name) DO UPDATE SET value = counters.value + 1 RETURNING value"
)


class SqlAccessRepository:
    """`AccessRepository` over a `broker.storage.backend.Backend`; build it with
    `storage.access()`."""

    def __init__(self, backend: Backend) -> None:
        self._b = backend

    def _ts(self, value: dt.datetime) -> object:
        return self._b.encode_ts(require_aware(value))

    def _opt_ts(self, value: Any) -> dt.datetime | None:
        return None if value is None else self._b.decode_ts(value)

    @staticmethod
    async def _bump(tx: Tx) -> int:
        row = await tx.fetchrow(_BUMP, ACCESS_COUNTER)
        assert row is not None
        return int(row[0])

    # -- version

    async def access_version(self) -> int:
        async with self._b.transaction(write=False) as tx:
            row = await tx.fetchrow("SELECT value FROM counters WHERE name = ?", ACCESS_COUNTER)
        return 0 if row is None else int(row[0])

    async def bump_access_version(self) -> int:
        async with self._b.transaction(write=True) as tx:
            return await self._bump(tx)

    # -- grants

    async def insert_grant(self, grant: GrantRecord) -> None:
        values = (
            grant.id,
            grant.grantee,
            grant.action,
            grant.resource,
            grant.justification,
            grant.created_by,
            self._ts(grant.created_at),
            self._ts(grant.expires_at),
            None if grant.revoked_at is None else self._ts(grant.revoked_at),
            grant.revoked_by,
        )
        try:
            async with self._b.transaction(write=True) as tx:
                await tx.execute(
                    f"INSERT INTO access_grants ({_GRANT_COLUMNS}) "  # noqa: S608 (constant)
                    "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    *values,
                )
                await self._bump(tx)
        except AlreadyExists:
            raise AlreadyExists(f"grant {grant.id!r} already exists") from None

    async def get_grant(self, grant_id: str) -> GrantRecord | None:
        async with self._b.transaction(write=False) as tx:
            row = await tx.fetchrow(
                f"SELECT {_GRANT_COLUMNS} FROM access_grants WHERE id = ?",  # noqa: S608
                grant_id,
            )
        return None if row is None else self._grant(row)

    async def list_grants(self, active_at: dt.datetime | None = None) -> list[GrantRecord]:
        async with self._b.transaction(write=False) as tx:
            if active_at is None:
                rows = await tx.fetch(
                    f"SELECT {_GRANT_COLUMNS} FROM access_grants "  # noqa: S608 (constant)
                    "ORDER BY created_at, id"
                )
            else:
                rows = await tx.fetch(
                    f"SELECT {_GRANT_COLUMNS} FROM access_grants "  # noqa: S608 (constant)
                    "WHERE revoked_at IS NULL AND expires_at > ? ORDER BY created_at, id",
                    self._ts(active_at),
                )
        return [self._grant(r) for r in rows]

    async def revoke_grant(self, grant_id: str, by: str, at: dt.datetime) -> bool:
        async with self._b.transaction(write=True) as tx:
            row = await tx.fetchrow(
                "UPDATE access_grants SET revoked_at = ?, revoked_by = ? "
                "WHERE id = ? AND revoked_at IS NULL RETURNING id",
                self._ts(at),
                by,
                grant_id,
            )
            if row is not None:
                await self._bump(tx)
        return row is not None

    def _grant(self, r: Row) -> GrantRecord:
        ts = self._b.decode_ts
        return GrantRecord(
            r[0], r[1], r[2], r[3], r[4], r[5], ts(r[6]), ts(r[7]), self._opt_ts(r[8]), r[9]
        )

    # -- approvals

    async def insert_approval(self, approval: ApprovalRecord) -> None:
        values = (
            approval.id,
            approval.requester,
            approval.action,
            approval.resource,
            approval.justification,
            self._ts(approval.created_at),
            self._ts(approval.expires_at),
            approval.approved_by,
            None if approval.approved_at is None else self._ts(approval.approved_at),
            None if approval.used_at is None else self._ts(approval.used_at),
        )
        try:
            async with self._b.transaction(write=True) as tx:
                await tx.execute(
                    f"INSERT INTO access_approvals ({_APPROVAL_COLUMNS}) "  # noqa: S608
                    "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    *values,
                )
                await self._bump(tx)
        except AlreadyExists:
            raise AlreadyExists(f"approval {approval.id!r} already exists") from None

    async def get_approval(self, approval_id: str) -> ApprovalRecord | None:
        async with self._b.transaction(write=False) as tx:
            row = await tx.fetchrow(
                f"SELECT {_APPROVAL_COLUMNS} FROM access_approvals WHERE id = ?",  # noqa: S608
                approval_id,
            )
        return None if row is None else self._approval(row)

    async def list_approvals(self, active_at: dt.datetime | None = None) -> list[ApprovalRecord]:
        async with self._b.transaction(write=False) as tx:
            if active_at is None:
                rows = await tx.fetch(
                    f"SELECT {_APPROVAL_COLUMNS} FROM access_approvals "  # noqa: S608
                    "ORDER BY created_at, id"
                )
            else:
                rows = await tx.fetch(
                    f"SELECT {_APPROVAL_COLUMNS} FROM access_approvals "  # noqa: S608
                    "WHERE used_at IS NULL AND expires_at > ? ORDER BY created_at, id",
                    self._ts(active_at),
                )
        return [self._approval(r) for r in rows]

    async def approve(self, approval_id: str, by: str, at: dt.datetime) -> bool:
        async with self._b.transaction(write=True) as tx:
            row = await tx.fetchrow(
                "UPDATE access_approvals SET approved_by = ?, approved_at = ? "
                "WHERE id = ? AND approved_by IS NULL AND used_at IS NULL "
                "AND requester <> ? AND expires_at > ? RETURNING id",
                by,
                self._ts(at),
                approval_id,
                by,
                self._ts(at),
            )
            if row is not None:
                await self._bump(tx)
        return row is not None

    async def consume_approval(self, approval_id: str, at: dt.datetime) -> bool:
        async with self._b.transaction(write=True) as tx:
            ok = await self._consume(tx, approval_id, None, at)
            if ok:
                await self._bump(tx)
        return ok

    async def _consume(
        self, tx: Tx, approval_id: str, requester: str | None, at: dt.datetime
    ) -> bool:
        row = await tx.fetchrow(
            "UPDATE access_approvals SET used_at = ? "
            "WHERE id = ? AND approved_by IS NOT NULL AND used_at IS NULL AND expires_at > ? "
            "AND (? OR requester = ?) RETURNING id",
            self._ts(at),
            approval_id,
            self._ts(at),
            requester is None,
            requester or "",
        )
        return row is not None

    def _approval(self, r: Row) -> ApprovalRecord:
        ts = self._b.decode_ts
        return ApprovalRecord(
            r[0],
            r[1],
            r[2],
            r[3],
            r[4],
            ts(r[5]),
            ts(r[6]),
            r[7],
            self._opt_ts(r[8]),
            self._opt_ts(r[9]),
        )

    # -- break-glass

    async def insert_breakglass(self, record: BreakGlassRecord) -> bool:
        values = (
            record.id,
            record.operator,
            record.approval_id,
            record.spiffe_id,
            record.action,
            record.resource,
            self._ts(record.issued_at),
            self._ts(record.expires_at),
            None if record.used_at is None else self._ts(record.used_at),
            None if record.revoked_at is None else self._ts(record.revoked_at),
        )
        async with self._b.transaction(write=True) as tx:
            if not await self._consume(tx, record.approval_id, record.operator, record.issued_at):
                return False
            await tx.execute(
                f"INSERT INTO access_breakglass ({_BREAKGLASS_COLUMNS}) "  # noqa: S608
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                *values,
            )
            await self._bump(tx)
        return True

    async def get_breakglass(self, breakglass_id: str) -> BreakGlassRecord | None:
        async with self._b.transaction(write=False) as tx:
            row = await tx.fetchrow(
                f"SELECT {_BREAKGLASS_COLUMNS} FROM access_breakglass WHERE id = ?",  # noqa: S608
                breakglass_id,
            )
        return None if row is None else self._breakglass(row)

    async def list_breakglass(self, active_at: dt.datetime | None = None) -> list[BreakGlassRecord]:
        async with self._b.transaction(write=False) as tx:
            if active_at is None:
                rows = await tx.fetch(
                    f"SELECT {_BREAKGLASS_COLUMNS} FROM access_breakglass "  # noqa: S608
                    "ORDER BY issued_at, id"
                )
            else:
                rows = await tx.fetch(
                    f"SELECT {_BREAKGLASS_COLUMNS} FROM access_breakglass "  # noqa: S608
                    "WHERE used_at IS NULL AND revoked_at IS NULL AND expires_at > ? "
                    "ORDER BY issued_at, id",
                    self._ts(active_at),
                )
        return [self._breakglass(r) for r in rows]

    async def use_breakglass(self, breakglass_id: str, at: dt.datetime) -> bool:
        async with self._b.transaction(write=True) as tx:
            row = await tx.fetchrow(
                "UPDATE access_breakglass SET used_at = ? WHERE id = ? AND used_at IS NULL "
                "AND revoked_at IS NULL AND expires_at > ? RETURNING id",
                self._ts(at),
                breakglass_id,
                self._ts(at),
            )
            if row is not None:
                await self._bump(tx)
        return row is not None

    async def revoke_breakglass(self, breakglass_id: str, at: dt.datetime) -> bool:
        async with self._b.transaction(write=True) as tx:
            row = await tx.fetchrow(
                "UPDATE access_breakglass SET revoked_at = ? "
                "WHERE id = ? AND revoked_at IS NULL RETURNING id",
                self._ts(at),
                breakglass_id,
            )
            if row is not None:
                await self._bump(tx)
        return row is not None

    def _breakglass(self, r: Row) -> BreakGlassRecord:
        ts = self._b.decode_ts
        return BreakGlassRecord(
            r[0],
            r[1],
            r[2],
            r[3],
            r[4],
            r[5],
            ts(r[6]),
            ts(r[7]),
            self._opt_ts(r[8]),
            self._opt_ts(r[9]),
        )
