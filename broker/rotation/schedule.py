"""Scheduled rotation of secrets: every `interval` (by the injected clock) the replica that
holds the "secrets.rotation" leader lease walks the secrets past their rotation period
(`SecretService.due`) and

- remakes those the broker generated (`secrets put|rotate --generate`): a new version from the
  key backend's random generator, at the recorded length (`ValueOrigins`), through
  `SecretService.rotate` -- so the previous version stays readable for the rotation window as
  with a manual rotation;
- reports the others (their value comes from a third party) as due: the gauge
  `broker_secrets_due`, and once per secret and due date an audit event `secret.due` (which
  raises the `secret.due` notification).

Each scheduled rotation is audited (`secrets.rotate`, who `broker/secret-rotation`, with the
version before and after) and counted in `broker_rotation_total{kind="secret",outcome}` and
`broker_rotation_duration_seconds`. A rotation that fails stays due and is tried again after
`retry_after`.
"""

from __future__ import annotations

import datetime as dt
import logging
import time
import uuid
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Final

from broker import metrics
from broker.audit import AuditEvent
from broker.errors import BrokerError
from broker.rotation.origins import ValueOrigins
from broker.secrets import SecretInfo, SecretService, reference_hash
from broker.storage.interface import LockRepository, MetaRepository
from ca.clock import Clock

__all__ = ["ACTOR", "LEASE", "SecretRotationJob", "SecretRotationRound"]

log = logging.getLogger(__name__)

LEASE: Final = "secrets.rotation"
ACTOR: Final = "broker/secret-rotation"
TICKET: Final = "scheduled"
_NOTIFIED: Final = "secrets.due-reported."

Auditor = Callable[[Mapping[str, Any]], Awaitable[object]]


@dataclass
class SecretRotationRound:
    rotated: list[tuple[str, str, int, int]] = field(default_factory=list)  # tenant, ref, from, to
    due: list[tuple[str, str]] = field(default_factory=list)  # third-party values past due
    reported: list[tuple[str, str]] = field(default_factory=list)  # of `due`, newly notified
    failed: list[tuple[str, str, str]] = field(default_factory=list)  # tenant, ref, error


class SecretRotationJob:
    def __init__(
        self,
        secrets: SecretService,
        origins: ValueOrigins,
        locks: LockRepository,
        meta: MetaRepository,
        clock: Clock,
        *,
        audit: Auditor | None = None,
        owner: str | None = None,
        interval: dt.timedelta = dt.timedelta(minutes=1),
        retry_after: dt.timedelta = dt.timedelta(minutes=5),
    ) -> None:
        self._secrets = secrets
        self._origins = origins
        self._locks = locks
        self._meta = meta
        self._clock = clock
        self._audit = audit
        self.owner = owner or f"secret-rotation-{uuid.uuid4().hex}"
        self.interval = interval
        self.retry_after = retry_after
        self._next: dt.datetime | None = None
        self._failed_at: dict[tuple[str, str], dt.datetime] = {}

    async def tick(self) -> SecretRotationRound | None:
        """One round if due and this replica holds the lease; None when skipped."""
        now = self._clock.now()
        if self._next is not None and now < self._next:
            return None
        self._next = now + self.interval
        ttl = max(self.interval.total_seconds() * 2, 5.0)
        if not await self._locks.try_lease(LEASE, self.owner, ttl, now):
            return None
        result = SecretRotationRound()
        for info in await self._secrets.due():
            r = info.record
            key = (r.tenant, r.ref)
            length = await self._origins.generated_length(r.tenant, r.ref)
            if length is None:
                result.due.append(key)
                if await self._report_due(info, now):
                    result.reported.append(key)
                continue
            failed_at = self._failed_at.get(key)
            if failed_at is not None and now - failed_at < self.retry_after:
                continue
            if await self._secrets.rollout_running(r.tenant, r.ref):
                # A staged rollout is replacing the value: it owns the secret until it ends,
                # and the next round rotates it if it is still due (not a failure).
                continue
            await self._rotate(info, length, result, now)
        metrics.set_secrets_due(len(result.due))
        if result.rotated or result.failed or result.reported:
            log.info(
                "secret rotation: %d rotated, %d failed, %d due (value from outside), %d newly "
                "reported",
                len(result.rotated),
                len(result.failed),
                len(result.due),
                len(result.reported),
            )
        return result

    async def _rotate(
        self, info: SecretInfo, length: int, result: SecretRotationRound, now: dt.datetime
    ) -> None:
        r = info.record
        key = (r.tenant, r.ref)
        started = time.monotonic()
        try:
            _, before, after = await self._secrets.rotate(
                r.tenant,
                r.ref,
                environment=r.environment or "",
                ticket=TICKET,
                justification=f"scheduled: rotation period of {r.rotation_period_s} s passed",
                generate_length=length,
            )
        except BrokerError as exc:
            metrics.record_rotation("secret", "failure", time.monotonic() - started)
            self._failed_at[key] = now
            result.failed.append((r.tenant, r.ref, str(exc)))
            log.warning(
                "scheduled rotation of secret %s (tenant %s) failed: %s",
                reference_hash(r.ref)[:16],
                r.tenant,
                exc,
            )
            await self._record(
                info, "secrets.rotate", "failed", error=str(exc), before=r.current_version
            )
            return
        metrics.record_rotation("secret", "success", time.monotonic() - started)
        self._failed_at.pop(key, None)
        result.rotated.append((r.tenant, r.ref, before, after))
        await self._record(info, "secrets.rotate", "OK", before=before, after=after)

    async def _report_due(self, info: SecretInfo, now: dt.datetime) -> bool:
        """Audit (and so notify) a third-party secret past due once per due date."""
        r = info.record
        due = info.rotation_due
        stamp = "missing-metadata" if due is None else due.isoformat()
        key = f"{_NOTIFIED}{r.tenant}.{reference_hash(r.ref)}"
        if await self._meta.get_meta(key) == stamp:
            return False
        overdue = None if due is None else int((now - due).total_seconds())
        await self._record(
            info,
            "secret.due",
            "OK",
            version=r.current_version,
            due=None if due is None else due.isoformat(),
            overdue_seconds=overdue,
            owner=r.owner,
            service=r.service,
            environment=r.environment,
        )
        await self._meta.set_meta(key, stamp)
        return True

    async def _record(
        self, info: SecretInfo, what: str, outcome: str, *, error: str | None = None, **details: Any
    ) -> None:
        if self._audit is None:
            return
        r = info.record
        event = AuditEvent(
            when=self._clock.now(),
            who=ACTOR,
            what=what,
            resource=reference_hash(r.ref),
            decision="allow",
            outcome=outcome,
            where="broker",
            correlation_id=f"secret-rotation-{uuid.uuid4().hex[:16]}",
            rule="scheduled-rotation",
            reason="rotation period passed",
            error=error,
            details={"tenant": r.tenant, "kind": "secret", **details},
        )
        await self._audit(event.to_dict())
