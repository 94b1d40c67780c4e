"""The lease reaper: a background job that revokes due leases (expired, stuck pending, waiting
for a retry, or irrevocable and due for another try) every `interval` seconds, only while it
holds the "db.lease-reaper" leader lease, so one replica (or worker) reaps at a time. It keeps
no state of its own: after a restart it resumes from the leases in storage."""

from __future__ import annotations

import logging
import uuid

from broker import metrics
from broker.database.credentials import CredentialService, ReapResult
from broker.leadership import lead_rounds
from broker.storage.interface import LockRepository
from ca.clock import Clock

__all__ = ["LEADER_LEASE", "LeaseReaper"]

log = logging.getLogger(__name__)

LEADER_LEASE = "db.lease-reaper"


class LeaseReaper:
    def __init__(
        self,
        service: CredentialService,
        locks: LockRepository,
        clock: Clock,
        *,
        interval: float | None = None,
        owner: str | None = None,
    ) -> None:
        self._service = service
        self._locks = locks
        self._clock = clock
        self.interval = service.settings.reaper_interval if interval is None else interval
        self.owner = owner or f"reaper-{uuid.uuid4()}"

    async def tick(self) -> ReapResult | None:
        """One round: None when another process holds the leader lease."""
        ttl = max(self.interval * 5, 5.0)
        if not await self._locks.try_lease(LEADER_LEASE, self.owner, ttl, self._clock.now()):
            return None
        result = await self._service.reap_once()
        # A full batch: more may be due; go again at once rather than after `interval`.
        while len(result.revoked) + len(result.failed) >= self._service.settings.reap_batch:
            more = await self._service.reap_once()
            result = ReapResult(result.revoked + more.revoked, result.failed + more.failed)
            if not more.revoked:
                break
        count, oldest_due = await self._service.store.lease_stats(self._clock.now())
        metrics.set_active_leases("database", count)
        lag = 0.0 if oldest_due is None else (self._clock.now() - oldest_due).total_seconds()
        metrics.set_reaper_lag("database", lag)
        metrics.set_irrevocable_leases("database", await self._service.store.irrevocable_count())
        if result.revoked or result.failed:
            log.info("lease reaper: %d revoked, %d failed", len(result.revoked), len(result.failed))
        return result

    async def run(self) -> None:
        """Settle interrupted root rotations, then reap every `interval` seconds until
        cancelled. Errors are logged and retried next round."""
        try:
            await self._service.recover_all()
        except Exception:
            log.exception("root rotation recovery failed")
        await lead_rounds(
            self.tick,
            interval=self.interval,
            locks=self._locks,
            lease=LEADER_LEASE,
            owner=self.owner,
            what="lease reaper",
            log=log,
        )
