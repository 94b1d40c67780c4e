"""Revocation by person (issue 12): on a personnel change, end in one call everything tied to
an identity or to an owning service -- its database leases (users dropped), its access grants
(revoked), and the passwords of the static database roles it could read (rotated) -- with one
audit record per object.

What is tied to what:

- `--identity SPIFFE_ID`: the leases it holds, the grants made to it, and the static roles
  its service owns (the ID's last path segment, in its tenant and environment when the ID has
  them): an instance that could read a password makes the password known.
- `--owner SERVICE`: the static roles it owns, the leases of dynamic roles it owns and every
  lease held by an identity of that service, and the grants to identities of that service.

Each object is handled on its own: one that fails (a database away) is reported and audited
as failed, and the rest go on; running it again finishes the remainder (it is idempotent).
"""

from __future__ import annotations

import datetime as dt
import uuid
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Final

from broker.access import AccessControl
from broker.audit import AuditEvent
from broker.database.credentials import CredentialService
from broker.database.names import check_name
from broker.errors import BrokerError, InvalidArgument
from broker.policy import Caller
from ca.clock import Clock

__all__ = ["RevocationReport", "SubjectRevocation"]

_LEASE_SCAN: Final = 1_000_000
REASONS: Final = frozenset({"personnel-change", "compromise", "offboarding"})


@dataclass
class RevocationReport:
    subject: str
    leases: list[str] = field(default_factory=list)
    grants: list[str] = field(default_factory=list)
    static_roles: list[str] = field(default_factory=list)
    failed: list[tuple[str, str, str]] = field(default_factory=list)  # (kind, id, error)


def _segments(spiffe_id: str) -> list[str]:
    if not spiffe_id.startswith("spiffe://"):
        raise InvalidArgument("--identity must be a SPIFFE ID (spiffe://trust-domain/path)")
    path = spiffe_id[len("spiffe://") :].split("/", 1)
    if len(path) != 2 or not path[1]:
        raise InvalidArgument("--identity must name a workload path (spiffe://td/...)")
    return path[1].split("/")


def _service(spiffe_id: str) -> str:
    return spiffe_id.rstrip("/").rsplit("/", 1)[-1]


class SubjectRevocation:
    """Ends what is tied to an identity or owner, over the database service and access
    control; `audit` is the ledger's `record`."""

    def __init__(
        self,
        database: CredentialService,
        access: AccessControl,
        clock: Clock,
        audit: Callable[[Mapping[str, Any]], Awaitable[object]] | None = None,
    ) -> None:
        self._db = database
        self._access = access
        self._clock = clock
        self._audit = audit

    async def revoke(
        self,
        by: Caller,
        *,
        identity: str = "",
        owner: str = "",
        reason: str,
        ticket: str = "",
    ) -> RevocationReport:
        """Raises InvalidArgument for a bad subject or reason; per-object failures go in the
        report."""
        if bool(identity) == bool(owner):
            raise InvalidArgument("give exactly one of --identity or --owner")
        if reason not in REASONS:
            raise InvalidArgument(f"--reason must be one of {', '.join(sorted(REASONS))}")
        if identity:
            segments = _segments(identity)
            service = segments[-1]
            place = (segments[-3], segments[-2]) if len(segments) >= 3 else None
            subject = identity
        else:
            check_name(owner, "owner")
            service, place, subject = owner, None, owner
        correlation = f"revoke-{uuid.uuid4().hex[:16]}"
        report = RevocationReport(subject)
        why = f"{reason}" + (f" (ticket {ticket})" if ticket else "")

        async def record(kind: str, resource: str, error: str | None, **details: Any) -> None:
            if self._audit is None:
                return
            event = AuditEvent(
                when=self._clock.now(),
                who=by.spiffe_id,
                what=f"subject.revoke.{kind}",
                resource=resource,
                where="broker",
                correlation_id=correlation,
                rule="subject-revocation",
                decision="allow",
                reason=why[:200],
                outcome="failed" if error else "revoked",
                error=error,
                details={"subject": subject, **details},
            )
            await self._audit(event.to_dict())

        # Leases.
        dynamic_owner = {r.name: r.owner for r in await self._db.list_roles()}
        for lease in await self._db.list_leases("", _LEASE_SCAN):
            if identity:
                tied = lease.holder == identity
            else:
                tied = dynamic_owner.get(lease.role) == owner or _service(lease.holder) == owner
            if not tied:
                continue
            try:
                await self._db.leases.revoke_record(lease)
            except BrokerError as exc:
                report.failed.append(("lease", lease.id, str(exc)))
                await record("lease", lease.id, str(exc), holder=lease.holder)
                continue
            report.leases.append(lease.id)
            await record("lease", lease.id, None, holder=lease.holder, username=lease.username)

        # Grants.
        for grant in await self._access.list_grants():
            tied = grant.grantee == identity if identity else _service(grant.grantee) == owner
            if not tied:
                continue
            try:
                await self._access.revoke_grant(grant.id, by)
            except BrokerError as exc:
                report.failed.append(("grant", grant.id, str(exc)))
                await record("grant", grant.id, str(exc), grantee=grant.grantee)
                continue
            report.grants.append(grant.id)
            await record("grant", grant.id, None, grantee=grant.grantee, action=grant.action)

        # Static roles: rotate the passwords the subject could read.
        for role in await self._db.static.list_roles(service):
            if place is not None and (role.tenant, role.environment) != place:
                continue
            try:
                rotated = await self._db.static.rotate(
                    role.name, why, actor=by.spiffe_id, trigger="personnel"
                )
            except BrokerError as exc:
                report.failed.append(("static-role", role.name, str(exc)))
                await record("static-role", role.name, str(exc))
                continue
            report.static_roles.append(role.name)
            await record(
                "static-role",
                role.name,
                None,
                before_version=role.version,
                after_version=rotated.version,
            )
        return report

    def now(self) -> dt.datetime:
        return self._clock.now()
