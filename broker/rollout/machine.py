"""The rollout state machine, without I/O: which version a consumer gets, whether a stage is
healthy, and what the next step is. `broker.rollout.service` applies the steps (storage, the
secret's versions, audit); `rollout.pml` next to this file is its Promela model, checked by
spin (docs/rotation.md says how the two correspond).

    pending --(new version written)--> running --(last stage baked healthy)--> completing
       |                                  |   \\--(bake ended unhealthy, or failures >
       |                                  |       max)--> rolling-back --> rolled-back
       |                                  \\--(operator abort)--> aborting --> aborted
       \\--(start interrupted before the new version)--> aborted
    completing --(old version revoked)--> completed

Routing: in `running`, a consumer whose stage is open (its index <= the open stage) gets the
new version, every other the old; in `pending`, `rolling-back` and `aborting` everyone gets the
old version; in `completing` everyone gets the new one. The old version is revoked only in
`completing`, which is entered only after the final stage baked with every consumer seen since
it opened on the new version; the new version is revoked only in `rolling-back`/`aborting`,
after which no read is routed to it.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import enum
from collections.abc import Sequence
from dataclasses import dataclass

from broker.errors import FailedPrecondition
from broker.storage.rollouts import ConsumerRecord, RolloutRecord, RolloutState

__all__ = [
    "Step",
    "StepKind",
    "abort",
    "bake_ends",
    "consumer_version",
    "count_failure",
    "health",
    "on_timer",
    "promote",
    "routed_version",
]

TERMINAL = (RolloutState.COMPLETED, RolloutState.ROLLED_BACK, RolloutState.ABORTED)


class StepKind(enum.StrEnum):
    ADVANCE = "advance"  # open the next stage
    COMPLETE = "complete"  # every stage baked healthy
    ROLLBACK = "rollback"  # a stage failed
    ABORT = "abort"  # an operator aborted


@dataclass(frozen=True)
class Step:
    kind: StepKind
    reason: str


def routed_version(record: RolloutRecord, stage: int) -> int:
    """The version a consumer of stage `stage` gets now (only for unfinished rollouts)."""
    if record.state == RolloutState.COMPLETING and record.to_version is not None:
        return record.to_version
    if (
        record.state == RolloutState.RUNNING
        and record.to_version is not None
        and stage <= record.stage
    ):
        return record.to_version
    return record.from_version


def bake_ends(record: RolloutRecord) -> dt.datetime:
    return record.stage_opened_at + dt.timedelta(seconds=record.bake_seconds)


def consumer_version(consumer: ConsumerRecord) -> int | None:
    """The version a consumer uses as far as the broker knows: its report if it reported after
    it last read, else what it was served."""
    if consumer.reported_at is not None and (
        consumer.read_at is None or consumer.reported_at >= consumer.read_at
    ):
        return consumer.reported_version
    return consumer.served_version


@dataclass(frozen=True)
class Health:
    healthy: bool
    failing: tuple[str, ...]  # identities failing or not on the new version
    reason: str


def health(record: RolloutRecord, consumers: Sequence[ConsumerRecord]) -> Health:
    """Is the open stage healthy now? Consumers of the open stages seen since the stage opened
    (a read or a report) must be on the new version and, if they reported, healthy; together
    they may fail at most `max_failures` times. A configured operator check must have passed on
    its last run since the stage opened."""
    failing = []
    for c in consumers:
        if c.stage > record.stage:
            continue
        seen = max((t for t in (c.read_at, c.reported_at) if t is not None), default=None)
        if seen is None or seen < record.stage_opened_at:
            continue  # not seen since the stage opened: gone, or not reading (see the docs)
        on_new = consumer_version(c) == record.to_version
        unhealthy = c.reported_version == record.to_version and c.healthy is False
        if not on_new or unhealthy:
            failing.append(c.identity)
    if record.health_check:
        fresh = record.checked_at is not None and record.checked_at >= record.stage_opened_at
        if not fresh:
            return Health(False, tuple(failing), "the health check has not passed in this stage")
        if not record.check_passed:
            return Health(False, tuple(failing), f"the health check fails: {record.check_detail}")
    if len(failing) > record.max_failures:
        return Health(
            False,
            tuple(failing),
            f"{len(failing)} consumer(s) failing or not on version {record.to_version} "
            f"(at most {record.max_failures} tolerated): {', '.join(failing[:5])}",
        )
    return Health(True, tuple(failing), "healthy")


def count_failure(record: RolloutRecord, why: str) -> tuple[RolloutRecord, Step | None]:
    """One failure (a consumer's failing report of the new version, or the operator's check
    failing): the record with it counted, and a rollback once more than `max_failures`."""
    counted = dataclasses.replace(record, failures=record.failures + 1)
    if counted.failures > record.max_failures:
        return counted, Step(
            StepKind.ROLLBACK,
            f"{counted.failures} failure(s) in stage {record.stage + 1} (at most "
            f"{record.max_failures} tolerated); last: {why}",
        )
    return counted, None


def on_timer(
    record: RolloutRecord, consumers: Sequence[ConsumerRecord], now: dt.datetime
) -> Step | None:
    """What the bake timer says at `now`: nothing yet, the next stage, completion, or a
    rollback (the stage did not become healthy within its bake)."""
    if record.state != RolloutState.RUNNING:
        return None
    if now < bake_ends(record) and now < record.deadline:
        return None
    verdict = health(record, consumers)
    if not verdict.healthy:
        return Step(
            StepKind.ROLLBACK,
            f"stage {record.stage + 1} ({record.stages[record.stage]}%) did not become healthy "
            f"within its bake: {verdict.reason}",
        )
    if record.stage + 1 >= len(record.stages):
        return Step(StepKind.COMPLETE, "every stage baked healthy")
    return Step(
        StepKind.ADVANCE,
        f"stage {record.stage + 1} ({record.stages[record.stage]}%) baked healthy",
    )


def promote(record: RolloutRecord) -> Step:
    """The operator opens the next stage before the bake ends. The final stage always bakes:
    the old version is revoked only after it did."""
    _unfinished(record, "promote")
    if record.state != RolloutState.RUNNING:
        raise FailedPrecondition(
            f"the rollout is {record.state}; only a running rollout can be promoted"
        )
    if record.stage + 1 >= len(record.stages):
        raise FailedPrecondition(
            f"the final stage (100%) is open; the rollout completes when it has baked "
            f"({bake_ends(record).isoformat(timespec='seconds')}), or abort it"
        )
    return Step(StepKind.ADVANCE, "promoted by an operator")


def abort(record: RolloutRecord) -> Step:
    _unfinished(record, "abort")
    if record.state not in (RolloutState.PENDING, RolloutState.RUNNING):
        raise FailedPrecondition(f"the rollout is already {record.state}")
    return Step(StepKind.ABORT, "aborted by an operator")


def _unfinished(record: RolloutRecord, what: str) -> None:
    if record.state in TERMINAL:
        raise FailedPrecondition(
            f"the latest rollout of this secret is {record.state} "
            f"({record.reason or 'finished'}); nothing to {what}"
        )
