"""Scheduled rotation of static database roles: a background job that, while it holds the
"db.static-rotation" leader lease (one replica or worker at a time, as the lease reaper),
rotates every static role whose `next_rotation_at` has passed and rolls forward any rotation
left in flight. It keeps no state of its own: a failed rotation stays due (its
`next_rotation_at` unchanged) and is tried again next round, after `retry_after`."""

from __future__ import annotations

import datetime as dt
import logging
import uuid
from dataclasses import dataclass, field

from broker.database.static import StaticRoles
from broker.errors import BrokerError
from broker.leadership import lead_rounds
from broker.storage.interface import LockRepository
from ca.clock import Clock

__all__ = ["LEADER_LEASE", "RotationRound", "StaticRotationJob"]

log = logging.getLogger(__name__)

LEADER_LEASE = "db.static-rotation"


@dataclass
class RotationRound:
    rotated: list[str] = field(default_factory=list)
    settled: list[str] = field(default_factory=list)
    failed: list[tuple[str, str]] = field(default_factory=list)


class StaticRotationJob:
    def __init__(
        self,
        roles: StaticRoles,
        locks: LockRepository,
        clock: Clock,
        *,
        interval: float = 10.0,
        batch: int = 100,
        retry_after: dt.timedelta = dt.timedelta(minutes=1),
        owner: str | None = None,
    ) -> None:
        self._roles = roles
        self._locks = locks
        self._clock = clock
        self.interval = interval
        self.batch = batch
        self.retry_after = retry_after
        self.owner = owner or f"static-rotation-{uuid.uuid4()}"
        self._failed_at: dict[str, dt.datetime] = {}

    async def tick(self) -> RotationRound | None:
        """One round: None when another process holds the leader lease."""
        now = self._clock.now()
        ttl = max(self.interval * 5, 5.0)
        if not await self._locks.try_lease(LEADER_LEASE, self.owner, ttl, now):
            return None
        result = RotationRound()
        for role in await self._roles.due(self.batch):
            failed_at = self._failed_at.get(role.name)
            if failed_at is not None and now - failed_at < self.retry_after:
                continue
            try:
                if role.next_rotation_at > now:  # only an intent in flight: roll it forward
                    if await self._roles.settle(role.name):
                        result.settled.append(role.name)
                    continue
                await self._roles.rotate(
                    role.name, "scheduled", actor="broker/static-rotation", trigger="schedule"
                )
                result.rotated.append(role.name)
                self._failed_at.pop(role.name, None)
            except BrokerError as exc:
                self._failed_at[role.name] = now
                result.failed.append((role.name, str(exc)))
                log.warning("scheduled rotation of static role %s failed: %s", role.name, exc)
        return result

    async def run(self) -> None:
        """Rotate what is due every `interval` seconds until cancelled."""
        await lead_rounds(
            self.tick,
            interval=self.interval,
            locks=self._locks,
            lease=LEADER_LEASE,
            owner=self.owner,
            what="static rotation",
            log=log,
        )
