"""Storage for staged rollouts of a new secret version (migration 0012): the rollout itself and
the consumers seen during it (who read which version, what they reported).

`RolloutRepository`; `SqlRolloutRepository` runs over the same `Backend` as `SqlStorage`
(`storage.rollouts()`). Methods own their transaction; datetimes must be aware. Changes of a
rollout are compare-and-set on (state, stage, failures), so two replicas (a report and the
leader's bake timer) never both act on the same step.
"""

from __future__ import annotations

import datetime as dt
import enum
from dataclasses import dataclass
from typing import Final, Protocol

from broker.storage.backend import Backend, Row, require_aware

__all__ = [
    "ACTIVE",
    "ConsumerRecord",
    "RolloutRecord",
    "RolloutRepository",
    "RolloutState",
    "SqlRolloutRepository",
]


class RolloutState(enum.StrEnum):
    PENDING = "pending"  # the rollout row is written, the new version not yet (crash-safe start)
    RUNNING = "running"
    COMPLETING = "completing"  # every stage baked healthy: everyone on the new version
    ROLLING_BACK = "rolling-back"  # a stage failed: everyone back on the old version
    ABORTING = "aborting"  # an operator aborted: everyone back on the old version
    COMPLETED = "completed"  # every stage baked healthy; the old version revoked
    ROLLED_BACK = "rolled-back"  # a stage failed: everyone back on the old version
    ABORTED = "aborted"  # an operator aborted: everyone back on the old version


ACTIVE: Final = (
    RolloutState.PENDING,
    RolloutState.RUNNING,
    RolloutState.COMPLETING,
    RolloutState.ROLLING_BACK,
    RolloutState.ABORTING,
)
_ACTIVE_SQL: Final = "('pending', 'running', 'completing', 'rolling-back', 'aborting')"

_COLUMNS: Final = (
    "id, tenant, ref, from_version, to_version, state, stages, stage, stage_opened_at, "
    "bake_seconds, max_failures, failures, health_check, check_passed, checked_at, "
    "check_detail, started_at, deadline, finished_at, reason, started_by, ticket, approver"
)
_CONSUMER_COLUMNS: Final = (
    "rollout_id, identity, stage, served_version, read_at, reported_version, healthy, "
    "detail, reported_at"
)


@dataclass(frozen=True)
class RolloutRecord:
    id: str
    tenant: str
    ref: str
    from_version: int
    to_version: int | None
    state: RolloutState
    stages: tuple[int, ...]  # cumulative percentages, ending at 100
    stage: int  # index of the open stage
    stage_opened_at: dt.datetime
    bake_seconds: int
    max_failures: int
    failures: int
    health_check: str
    check_passed: bool | None
    checked_at: dt.datetime | None
    check_detail: str
    started_at: dt.datetime
    deadline: dt.datetime  # the end of the old version's rollback window
    finished_at: dt.datetime | None
    reason: str
    started_by: str
    ticket: str
    approver: str = ""


@dataclass(frozen=True)
class ConsumerRecord:
    rollout_id: str
    identity: str
    stage: int
    served_version: int | None
    read_at: dt.datetime | None
    reported_version: int | None
    healthy: bool | None
    detail: str
    reported_at: dt.datetime | None


class RolloutRepository(Protocol):
    async def insert(self, record: RolloutRecord) -> bool:
        """False when the secret already has an unfinished rollout."""
        ...

    async def delete_pending(self, rollout_id: str) -> None:
        """Forget a rollout whose start was refused (only while it is pending)."""
        ...

    async def get(self, rollout_id: str) -> RolloutRecord | None: ...

    async def active(self, tenant: str, ref: str) -> RolloutRecord | None:
        """The unfinished rollout of a secret (any state in `ACTIVE`)."""
        ...

    async def latest(self, tenant: str, ref: str) -> RolloutRecord | None:
        """The most recent rollout of a secret, in any state."""
        ...

    async def unfinished(self) -> list[RolloutRecord]:
        """Every unfinished rollout, oldest first."""
        ...

    async def update(self, expected: RolloutRecord, new: RolloutRecord) -> bool:
        """Write `new` if the stored row still has `expected`'s state, stage and failures."""
        ...

    async def served(
        self, rollout_id: str, identity: str, stage: int, version: int, at: dt.datetime
    ) -> None:
        """Record that `identity` read `version`."""
        ...

    async def reported(
        self,
        rollout_id: str,
        identity: str,
        stage: int,
        version: int,
        healthy: bool,
        detail: str,
        at: dt.datetime,
    ) -> None:
        """Record `identity`'s latest report."""
        ...

    async def consumers(self, rollout_id: str) -> list[ConsumerRecord]: ...

    async def consumer(self, rollout_id: str, identity: str) -> ConsumerRecord | None: ...


def _flag(value: object) -> bool | None:
    return None if value is None else bool(value)


class SqlRolloutRepository:
    """`RolloutRepository` over a `broker.storage.backend.Backend`; build it with
    `storage.rollouts()`."""

    def __init__(self, backend: Backend) -> None:
        self._b = backend

    def _ts(self, value: dt.datetime | None) -> object:
        return None if value is None else self._b.encode_ts(require_aware(value))

    def _values(self, r: RolloutRecord) -> tuple[object, ...]:
        return (
            r.id,
            r.tenant,
            r.ref,
            r.from_version,
            r.to_version,
            str(r.state),
            ",".join(str(s) for s in r.stages),
            r.stage,
            self._ts(r.stage_opened_at),
            r.bake_seconds,
            r.max_failures,
            r.failures,
            r.health_check,
            None if r.check_passed is None else int(r.check_passed),
            self._ts(r.checked_at),
            r.check_detail,
            self._ts(r.started_at),
            self._ts(r.deadline),
            self._ts(r.finished_at),
            r.reason,
            r.started_by,
            r.ticket,
            r.approver,
        )

    async def insert(self, record: RolloutRecord) -> bool:
        async with self._b.transaction(write=True) as tx:
            row = await tx.fetchrow(
                f"INSERT INTO rollouts ({_COLUMNS}) "  # noqa: S608 (constant)
                f"VALUES ({', '.join('?' * 23)}) "
                "ON CONFLICT DO NOTHING RETURNING id",
                *self._values(record),
            )
        return row is not None

    async def delete_pending(self, rollout_id: str) -> None:
        async with self._b.transaction(write=True) as tx:
            await tx.execute(
                "DELETE FROM rollout_consumers WHERE rollout_id = ? AND rollout_id IN "
                "(SELECT id FROM rollouts WHERE id = ? AND state = 'pending')",
                rollout_id,
                rollout_id,
            )
            await tx.execute("DELETE FROM rollouts WHERE id = ? AND state = 'pending'", rollout_id)

    async def get(self, rollout_id: str) -> RolloutRecord | None:
        async with self._b.transaction(write=False) as tx:
            row = await tx.fetchrow(
                f"SELECT {_COLUMNS} FROM rollouts WHERE id = ?",  # noqa: S608 (constant)
                rollout_id,
            )
        return None if row is None else self._record(row)

    async def active(self, tenant: str, ref: str) -> RolloutRecord | None:
        async with self._b.transaction(write=False) as tx:
            row = await tx.fetchrow(
                f"SELECT {_COLUMNS} FROM rollouts "  # noqa: S608 (constant)
                f"WHERE tenant = ? AND ref = ? AND state IN {_ACTIVE_SQL}",
                tenant,
                ref,
            )
        return None if row is None else self._record(row)

    async def latest(self, tenant: str, ref: str) -> RolloutRecord | None:
        async with self._b.transaction(write=False) as tx:
            row = await tx.fetchrow(
                f"SELECT {_COLUMNS} FROM rollouts "  # noqa: S608 (constant)
                "WHERE tenant = ? AND ref = ? ORDER BY started_at DESC, id DESC LIMIT 1",
                tenant,
                ref,
            )
        return None if row is None else self._record(row)

    async def unfinished(self) -> list[RolloutRecord]:
        async with self._b.transaction(write=False) as tx:
            rows = await tx.fetch(
                f"SELECT {_COLUMNS} FROM rollouts "  # noqa: S608 (constant)
                f"WHERE state IN {_ACTIVE_SQL} ORDER BY started_at, id"
            )
        return [self._record(r) for r in rows]

    async def update(self, expected: RolloutRecord, new: RolloutRecord) -> bool:
        values = self._values(new)
        async with self._b.transaction(write=True) as tx:
            row = await tx.fetchrow(
                "UPDATE rollouts SET to_version = ?, state = ?, stage = ?, stage_opened_at = ?, "
                "failures = ?, check_passed = ?, checked_at = ?, check_detail = ?, "
                "finished_at = ?, reason = ?, approver = ? "
                "WHERE id = ? AND state = ? AND stage = ? AND failures = ? RETURNING id",
                values[4],
                values[5],
                values[7],
                values[8],
                values[11],
                values[13],
                values[14],
                values[15],
                values[18],
                values[19],
                values[22],
                expected.id,
                str(expected.state),
                expected.stage,
                expected.failures,
            )
        return row is not None

    async def served(
        self, rollout_id: str, identity: str, stage: int, version: int, at: dt.datetime
    ) -> None:
        async with self._b.transaction(write=True) as tx:
            await tx.execute(
                f"INSERT INTO rollout_consumers ({_CONSUMER_COLUMNS}) "  # noqa: S608 (constant)
                "VALUES (?, ?, ?, ?, ?, NULL, NULL, '', NULL) "
                "ON CONFLICT (rollout_id, identity) DO UPDATE SET "
                "stage = excluded.stage, served_version = excluded.served_version, "
                "read_at = excluded.read_at",
                rollout_id,
                identity,
                stage,
                version,
                self._ts(at),
            )

    async def reported(
        self,
        rollout_id: str,
        identity: str,
        stage: int,
        version: int,
        healthy: bool,
        detail: str,
        at: dt.datetime,
    ) -> None:
        async with self._b.transaction(write=True) as tx:
            await tx.execute(
                f"INSERT INTO rollout_consumers ({_CONSUMER_COLUMNS}) "  # noqa: S608 (constant)
                "VALUES (?, ?, ?, NULL, NULL, ?, ?, ?, ?) "
                "ON CONFLICT (rollout_id, identity) DO UPDATE SET "
                "stage = excluded.stage, reported_version = excluded.reported_version, "
                "healthy = excluded.healthy, detail = excluded.detail, "
                "reported_at = excluded.reported_at",
                rollout_id,
                identity,
                stage,
                version,
                int(healthy),
                detail,
                self._ts(at),
            )

    async def consumers(self, rollout_id: str) -> list[ConsumerRecord]:
        async with self._b.transaction(write=False) as tx:
            rows = await tx.fetch(
                f"SELECT {_CONSUMER_COLUMNS} FROM rollout_consumers "  # noqa: S608 (constant)
                "WHERE rollout_id = ? ORDER BY stage, identity",
                rollout_id,
            )
        return [self._consumer(r) for r in rows]

    async def consumer(self, rollout_id: str, identity: str) -> ConsumerRecord | None:
        async with self._b.transaction(write=False) as tx:
            row = await tx.fetchrow(
                f"SELECT {_CONSUMER_COLUMNS} FROM rollout_consumers "  # noqa: S608 (constant)
                "WHERE rollout_id = ? AND identity = ?",
                rollout_id,
                identity,
            )
        return None if row is None else self._consumer(row)

    def _consumer(self, r: Row) -> ConsumerRecord:
        ts = self._b.decode_ts
        return ConsumerRecord(
            r[0],
            r[1],
            r[2],
            r[3],
            None if r[4] is None else ts(r[4]),
            r[5],
            _flag(r[6]),
            r[7],
            None if r[8] is None else ts(r[8]),
        )

    def _record(self, r: Row) -> RolloutRecord:
        ts = self._b.decode_ts
        return RolloutRecord(
            id=r[0],
            tenant=r[1],
            ref=r[2],
            from_version=r[3],
            to_version=r[4],
            state=RolloutState(r[5]),
            stages=tuple(int(s) for s in r[6].split(",")),
            stage=r[7],
            stage_opened_at=ts(r[8]),
            bake_seconds=r[9],
            max_failures=r[10],
            failures=r[11],
            health_check=r[12],
            check_passed=_flag(r[13]),
            checked_at=None if r[14] is None else ts(r[14]),
            check_detail=r[15],
            started_at=ts(r[16]),
            deadline=ts(r[17]),
            finished_at=None if r[18] is None else ts(r[18]),
            reason=r[19],
            started_by=r[20],
            ticket=r[21],
            approver=r[22],
        )
