"""The scheduled key lifecycle (issue 16): a leader-held job that rotates KMS keys at their
rotation period, rotates the broker's own KEKs yearly (rewrapping every sealed store, then
destroying old KEKs that nothing references; those still referenced are reported), destroys
KMS keys whose scheduled destruction date has passed, and sets the metrics
`broker_key_age_seconds` and `broker_key_rotation_total{kind,outcome}`.

Time comes from the injected clock only, so tests drive it with a fake clock. A KEK's age is
counted from the moment this job first saw its tenant (`kms.kek-rotated.<tenant>` in the
storage meta table) or from its last scheduled rotation: generations made before the job
existed carry no creation time.
"""

from __future__ import annotations

import datetime as dt
import logging
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Final

from broker import metrics
from broker.envelope import KekRotator, KekTenants
from broker.kms.keys import KeyService
from broker.storage.interface import LockRepository, MetaRepository
from broker.storage.kms import KeyState
from ca.clock import Clock

__all__ = ["DEFAULT_KEK_PERIOD", "KeyLifecycleJob", "LifecycleRun"]

log = logging.getLogger(__name__)

DEFAULT_KEK_PERIOD: Final = dt.timedelta(days=365)
_KEK_ROTATED: Final = "kms.kek-rotated."


@dataclass
class LifecycleRun:
    rotated: list[tuple[str, str, int]] = field(default_factory=list)  # tenant, key, version
    failed: list[tuple[str, str]] = field(default_factory=list)
    destroyed: list[tuple[str, str]] = field(default_factory=list)
    keks_rotated: list[str] = field(default_factory=list)
    keks_kept: list[str] = field(default_factory=list)  # old KEKs still referenced


class KeyLifecycleJob:
    LEASE = "kms.lifecycle"

    def __init__(
        self,
        keys: KeyService,
        kek: KekRotator,
        kek_tenants: KekTenants,
        storage: LockRepository,
        meta: MetaRepository,
        clock: Clock,
        owner: str,
        *,
        interval: dt.timedelta = dt.timedelta(minutes=1),
        kek_period: dt.timedelta = DEFAULT_KEK_PERIOD,
    ) -> None:
        self._keys = keys
        self._kek = kek
        self._kek_tenants = kek_tenants
        self._locks = storage
        self._meta = meta
        self._clock = clock
        self._owner = owner
        self._interval = interval
        self._kek_period = kek_period
        self._next: dt.datetime | None = None

    async def tick(self) -> LifecycleRun | None:
        """Run once if due and this replica holds the leader lease; None when skipped. A key
        that fails to rotate is counted and logged, and the others still rotate."""
        now = self._clock.now()
        if self._next is not None and now < self._next:
            return None
        self._next = now + self._interval
        if not await self._locks.try_lease(
            self.LEASE, self._owner, self._interval.total_seconds() * 2, now
        ):
            return None
        run = LifecycleRun()
        for info in await self._keys.due():
            r = info.record
            try:
                _, _, version = await self._keys.rotate(r.tenant, r.name)
            except Exception as exc:
                log.warning("scheduled rotation of key %s/%s failed: %s", r.tenant, r.name, exc)
                metrics.record_key_rotation("kms", "failure")
                run.failed.append((r.tenant, r.name))
                continue
            metrics.record_key_rotation("kms", "success")
            run.rotated.append((r.tenant, r.name, version))
        run.destroyed = await self._keys.destroy_due()
        await self._rotate_keks(now, run)
        await self._ages(now)
        if run.rotated or run.failed or run.destroyed or run.keks_rotated:
            log.info(
                "key lifecycle: %d key(s) rotated, %d failed, %d destroyed, KEKs rotated: %s, "
                "old KEKs still referenced: %s",
                len(run.rotated),
                len(run.failed),
                len(run.destroyed),
                ", ".join(run.keks_rotated) or "none",
                ", ".join(run.keks_kept) or "none",
            )
        return run

    async def _rotate_keks(self, now: dt.datetime, run: LifecycleRun) -> None:
        for tenant in await self._kek_tenants.kek_tenants():
            stamp = await self._meta.get_meta(_KEK_ROTATED + tenant)
            if stamp is None:
                await self._meta.set_meta(_KEK_ROTATED + tenant, now.isoformat())
                continue
            if now - dt.datetime.fromisoformat(stamp) < self._kek_period:
                continue
            try:
                (rotation,) = await self._kek.rotate(tenant)
            except Exception as exc:
                log.warning("scheduled KEK rotation of tenant %s failed: %s", tenant, exc)
                metrics.record_key_rotation("kek", "failure")
                continue
            await self._meta.set_meta(_KEK_ROTATED + tenant, now.isoformat())
            metrics.record_key_rotation("kek", "success")
            run.keks_rotated.append(rotation.new_label)
            run.keks_kept.extend(rotation.kept)

    async def _ages(self, now: dt.datetime) -> None:
        oldest: dict[tuple[str, str], float] = defaultdict(float)
        for info in await self._keys.list_keys(None):
            r = info.record
            if r.state in (KeyState.ENABLED, KeyState.DISABLED):
                group = (r.purpose, r.classification)
                oldest[group] = max(oldest[group], (now - r.last_rotated).total_seconds())
        for (purpose, classification), age in oldest.items():
            metrics.set_key_age("kms", purpose, classification, age)
        kek_oldest = 0.0
        for tenant in await self._kek_tenants.kek_tenants():
            stamp = await self._meta.get_meta(_KEK_ROTATED + tenant)
            if stamp is not None:
                age = (now - dt.datetime.fromisoformat(stamp)).total_seconds()
                kek_oldest = max(kek_oldest, age)
        metrics.set_key_age("kek", "wrap", "-", kek_oldest)
