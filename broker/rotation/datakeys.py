"""Scheduled renewal of the envelope's data keys (issue 12: "data keys every 90 days").

Every sealed value has its own AES-256 data key, made (from the key backend's random
generator) when the value is sealed; rotating a secret or a password makes a new one. A value
that is never rotated would keep its data key for ever, and a KEK rotation only rewraps it. So
every `period` (default 90 days, `rotation.data_key_period`) per tenant the replica holding the
"envelope.data-keys" lease opens each sealed value of the tenant and seals it again under a
fresh data key and the current KEK (compare-and-set: a value changed meanwhile is left to its
new blob), then drops every cached data key. Per tenant the time of the last renewal is kept in
the storage meta table (`envelope.data-keys-renewed.<tenant>`); a tenant first seen starts its
period then. A value that does not open (damaged, its KEK gone) stops the tenant's pass: it
is audited as failed, counted, and the tenant tried again after `retry_after` (1 h); values
already renewed keep their new blobs.

The stores: secret versions (`SecretDataKeys`) and the database's sealed passwords -- admin
passwords, root-rotation recovery records and static-role passwords (`DatabaseDataKeys`); a
static-role rotation intent is short-lived and skipped. Each renewal of a tenant is audited
(`envelope.data-keys.rotate`, with the number of values renewed) and counted in
`broker_rotation_total{kind="data-key",outcome}` / `broker_rotation_duration_seconds`.
"""

from __future__ import annotations

import datetime as dt
import logging
import time
import uuid
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Final, Protocol

from broker import metrics
from broker.audit import AuditEvent
from broker.database import connections, static
from broker.envelope import SYSTEM_TENANT, Envelope, KekTenants, SealedBlob, aad
from broker.storage.database import DatabaseRepository
from broker.storage.interface import LockRepository, MetaRepository
from broker.storage.secrets import SecretRepository
from ca.clock import Clock

__all__ = [
    "DEFAULT_DATA_KEY_PERIOD",
    "LEASE",
    "DataKeyRotationJob",
    "DataKeyRun",
    "DataKeyStore",
    "DatabaseDataKeys",
    "SecretDataKeys",
]

log = logging.getLogger(__name__)

LEASE: Final = "envelope.data-keys"
DEFAULT_DATA_KEY_PERIOD: Final = dt.timedelta(days=90)
_RENEWED: Final = "envelope.data-keys-renewed."

Auditor = Callable[[Mapping[str, Any]], Awaitable[object]]


async def renew(envelope: Envelope, tenant: str, blob: SealedBlob, associated: bytes) -> SealedBlob:
    """`blob`'s value sealed again: a fresh data key, the tenant's current KEK."""
    plaintext = await envelope.unseal(blob, associated)
    return await envelope.seal(tenant, plaintext, associated)


class DataKeyStore(Protocol):
    async def renew_data_keys(self, envelope: Envelope, tenant: str) -> int:
        """Seal every value of `tenant` again under a fresh data key; how many were."""
        ...


class SecretDataKeys:
    """Secret versions (their associated data: tenant, reference, version)."""

    def __init__(self, repository: SecretRepository) -> None:
        self._repo = repository

    async def renew_data_keys(self, envelope: Envelope, tenant: str) -> int:
        count = 0
        for row in await self._repo.sealed_not_under(tenant, ""):  # every sealed version
            associated = aad(tenant, row.ref, row.version)
            fresh = await renew(envelope, tenant, SealedBlob.from_bytes(row.sealed), associated)
            if await self._repo.replace_sealed(row, fresh.kek_label, fresh.to_bytes()):
                count += 1
        return count


class DatabaseDataKeys:
    """The database engines' sealed passwords (all in the `_system` tenant)."""

    def __init__(self, store: DatabaseRepository) -> None:
        self._store = store

    async def renew_data_keys(self, envelope: Envelope, tenant: str) -> int:
        if tenant != SYSTEM_TENANT:
            return 0
        count = 0
        for table, key, old in await self._store.sealed_blobs(""):
            associated = connections.sealed_password_aad(table, key) or static.sealed_password_aad(
                table, key
            )
            if associated is None:  # a rotation intent: gone within seconds
                continue
            fresh = await renew(envelope, tenant, SealedBlob.from_bytes(old), associated)
            if await self._store.replace_blob(table, key, old, fresh.to_bytes(), fresh.kek_label):
                count += 1
        return count


@dataclass
class DataKeyRun:
    renewed: dict[str, int] = field(default_factory=dict)  # tenant -> values sealed again
    failed: list[tuple[str, str]] = field(default_factory=list)  # tenant, error


class DataKeyRotationJob:
    def __init__(
        self,
        envelope: Envelope,
        stores: Sequence[DataKeyStore],
        tenants: KekTenants,
        locks: LockRepository,
        meta: MetaRepository,
        clock: Clock,
        *,
        period: dt.timedelta = DEFAULT_DATA_KEY_PERIOD,
        interval: dt.timedelta = dt.timedelta(minutes=1),
        retry_after: dt.timedelta = dt.timedelta(hours=1),
        audit: Auditor | None = None,
        owner: str | None = None,
    ) -> None:
        self._envelope = envelope
        self._stores = stores
        self._tenants = tenants
        self._locks = locks
        self._meta = meta
        self._clock = clock
        self.period = period
        self.interval = interval
        self.retry_after = retry_after
        self._failed_at: dict[str, dt.datetime] = {}
        self._audit = audit
        self.owner = owner or f"data-keys-{uuid.uuid4().hex}"
        self._next: dt.datetime | None = None

    async def tick(self) -> DataKeyRun | None:
        """One pass if due and this replica holds the lease; None when skipped."""
        now = self._clock.now()
        if self._next is not None and now < self._next:
            return None
        self._next = now + self.interval
        ttl = max(self.interval.total_seconds() * 2, 5.0)
        if not await self._locks.try_lease(LEASE, self.owner, ttl, now):
            return None
        run = DataKeyRun()
        for tenant in await self._tenants.kek_tenants():
            stamp = await self._meta.get_meta(_RENEWED + tenant)
            if stamp is None:
                await self._meta.set_meta(_RENEWED + tenant, now.isoformat())
                continue
            if now - dt.datetime.fromisoformat(stamp) < self.period:
                continue
            failed_at = self._failed_at.get(tenant)
            if failed_at is not None and now - failed_at < self.retry_after:
                continue
            await self._renew_tenant(tenant, now, run)
        return run

    async def _renew_tenant(self, tenant: str, now: dt.datetime, run: DataKeyRun) -> None:
        started = time.monotonic()
        count = 0
        try:
            for store in self._stores:
                count += await store.renew_data_keys(self._envelope, tenant)
        except Exception as exc:  # a value that does not open, the token away: try next pass
            metrics.record_rotation("data-key", "failure", time.monotonic() - started)
            run.failed.append((tenant, str(exc)))
            self._failed_at[tenant] = now
            log.warning("renewing the data keys of tenant %s failed: %s", tenant, exc)
            await self._record(tenant, "failed", count, str(exc))
            return
        # The data keys unwrapped before go from every process's memory now.
        await self._envelope.forget_data_keys()
        await self._meta.set_meta(_RENEWED + tenant, now.isoformat())
        self._failed_at.pop(tenant, None)
        metrics.record_rotation("data-key", "success", time.monotonic() - started)
        run.renewed[tenant] = count
        log.info("data keys of tenant %s renewed: %d value(s) sealed again", tenant, count)
        await self._record(tenant, "OK", count, None)

    async def _record(self, tenant: str, outcome: str, count: int, error: str | None) -> None:
        if self._audit is None:
            return
        event = AuditEvent(
            when=self._clock.now(),
            who="broker/data-key-rotation",
            what="envelope.data-keys.rotate",
            resource=tenant,
            decision="allow",
            outcome=outcome,
            where="broker",
            correlation_id=f"data-keys-{uuid.uuid4().hex[:16]}",
            rule="scheduled-rotation",
            reason=f"data key period of {int(self.period.total_seconds() // 86400)} d passed",
            error=error,
            details={"tenant": tenant, "renewed": count},
        )
        await self._audit(event.to_dict())
