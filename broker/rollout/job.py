"""The bake timer: a background job that, while it holds the "secrets.rollout" leader lease
(one replica or worker at a time, as the lease reaper), runs `RolloutService.tick` every
`interval` seconds: finishes steps a crash interrupted, runs due health checks, opens the next
stage, completes or rolls back. It keeps no state of its own: the rollouts are in storage and
their timers on the injected clock."""

from __future__ import annotations

import logging
import uuid

from broker.leadership import lead_rounds
from broker.rollout.service import RolloutService
from broker.storage.interface import LockRepository
from ca.clock import Clock

__all__ = ["LEADER_LEASE", "RolloutJob"]

log = logging.getLogger(__name__)

LEADER_LEASE = "secrets.rollout"


class RolloutJob:
    def __init__(
        self,
        service: RolloutService,
        locks: LockRepository,
        clock: Clock,
        *,
        interval: float = 2.0,
        owner: str | None = None,
    ) -> None:
        self._service = service
        # Every rollout service this job runs (the secrets' first; the app appends the static
        # roles' one), under the one leader lease.
        self.services: list[RolloutService] = [service]
        self._locks = locks
        self._clock = clock
        self.interval = interval
        self.owner = owner or f"rollout-{uuid.uuid4()}"

    async def tick(self) -> int | None:
        """One round: how many rollouts changed; None when another process leads."""
        ttl = max(self.interval * 5, 5.0)
        if not await self._locks.try_lease(LEADER_LEASE, self.owner, ttl, self._clock.now()):
            return None
        changed = []
        for service in self.services:
            changed += await service.tick()
        for record in changed:
            log.info("rollout %s of %s: %s", record.id, record.tenant, record.state)
        return len(changed)

    async def run(self) -> None:
        """Advance rollouts every `interval` seconds until cancelled."""
        await lead_rounds(
            self.tick,
            interval=self.interval,
            locks=self._locks,
            lease=LEADER_LEASE,
            owner=self.owner,
            what="rollout",
            log=log,
        )
