"""Staged rollout of a new secret version: `RolloutService` starts one (`secrets rotate
--stages`), steers reads to the version of each consumer's stage (it is the secrets'
`ReadRouter`), takes consumers' reports, and applies the state machine's steps
(`broker.rollout.machine`): open the next stage, complete (revoke the old version), roll back
(revoke the new one). `RolloutJob` is the leader-held bake timer and health checker.

Crash safety: every step first moves the rollout to a state whose routing is already the
step's outcome (`rolling-back`/`aborting`: everyone on the old version; `completing`: everyone
on the new one), then changes the secret's versions, then records the final state. A broker
that dies in between finishes the step when the job next runs (`settle`); a start interrupted
before its new version was written is aborted, one interrupted after is resumed.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import logging
import time
import uuid
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from broker import metrics
from broker.audit import AuditEvent
from broker.errors import (
    BrokerError,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    PermissionDenied,
)
from broker.operators.roles import ADMIN
from broker.policy import Action, Authorize, Caller
from broker.rollout import machine
from broker.rollout.checks import CheckResult, HealthChecker
from broker.rollout.machine import Step, StepKind
from broker.rollout.plan import HealthCheck, RolloutPlan, stage_of
from broker.secrets import Details, Route, SecretRef, SecretService, reference_hash
from broker.storage.rollouts import (
    ConsumerRecord,
    RolloutRecord,
    RolloutRepository,
    RolloutState,
)
from ca.clock import Clock

__all__ = ["METRIC_KIND", "RolloutService", "RolloutStatus", "StartRequest"]

log = logging.getLogger(__name__)

METRIC_KIND = "secret-rollout"
_STALE_PENDING = dt.timedelta(minutes=2)
_MAX_DETAIL = 200

Audit = Callable[[Mapping[str, Any]], Awaitable[object]]


@dataclass(frozen=True)
class StartRequest:
    environment: str
    ticket: str
    justification: str
    stages: Sequence[int]
    bake: dt.timedelta
    max_failures: int = 0
    health_check: str = ""
    value: bytes | None = None
    generate_length: int | None = None


@dataclass(frozen=True)
class RolloutStatus:
    record: RolloutRecord
    consumers: tuple[ConsumerRecord, ...]
    healthy: bool
    health_reason: str
    bake_ends: dt.datetime | None  # of the open stage, while running


class RolloutService:
    metric_kind: str = METRIC_KIND

    def __init__(
        self,
        repository: RolloutRepository,
        secrets: SecretService,
        clock: Clock,
        checker: HealthChecker,
        *,
        audit: Audit | None = None,
        loopback_checks_only: bool = True,
        check_interval: dt.timedelta = dt.timedelta(seconds=10),
    ) -> None:
        self._repo = repository
        self._secrets = secrets
        self._clock = clock
        self._checker = checker
        self._audit = audit
        self.loopback_checks_only = loopback_checks_only
        self.check_interval = check_interval

    # -- ReadRouter (reads of the secret during a rollout) --------------------------------

    async def route(self, tenant: str, ref: str, identity: str) -> Route | None:
        record = await self._repo.active(tenant, ref)
        if record is None:
            return None
        stage = stage_of(record.stages, ref, identity)
        return Route(record.id, stage, machine.routed_version(record, stage))

    async def served(self, route: Route, identity: str) -> None:
        await self._repo.served(
            route.rollout_id, identity, route.stage, route.version, self._clock.now()
        )

    async def busy(self, tenant: str, ref: str) -> bool:
        return await self._repo.active(tenant, ref) is not None

    # -- start ----------------------------------------------------------------------------

    def plan(self, request: StartRequest) -> RolloutPlan:
        return RolloutPlan.build(
            request.stages,
            request.bake,
            request.max_failures,
            request.health_check,
            window=self._secrets.rotation_window,
            loopback_only=self.loopback_checks_only,
        )

    async def start_for(
        self,
        tenant: str,
        reference: str,
        caller: Caller,
        authorize: Authorize,
        request: StartRequest,
        *,
        details: Details | None = None,
        approver: Callable[[], str] | None = None,
    ) -> RolloutStatus:
        """Validate the plan, write the rollout (pending), rotate the secret (authorized as
        `secrets rotate`, approvals included), open the first stage. Nothing changes on a
        refusal."""
        ref = SecretRef.parse(reference)
        plan = self.plan(request)
        if plan.health_check is not None and not plan.health_check.is_url:
            if not (caller.is_operator and ADMIN in caller.roles):
                raise PermissionDenied(
                    "a --health-check command runs on the broker's host: only an operator with "
                    "the admin role may give one; give a loopback http(s) URL instead"
                )
        existing = await self._repo.active(tenant, ref.text)
        if existing is not None:
            raise FailedPrecondition(
                f"a rollout of this secret is already {existing.state} (id {existing.id}, "
                f"stage {existing.stage + 1} of {len(existing.stages)}); promote or abort it "
                "first"
            )
        loaded = await self._secrets.load(tenant, ref.text)
        now = self._clock.now()
        started = time.perf_counter()
        pending = None
        if loaded is not None:
            pending = RolloutRecord(
                id=f"rollout-{uuid.uuid4().hex[:16]}",
                tenant=tenant,
                ref=ref.text,
                from_version=loaded[0].record.current_version,
                to_version=None,
                state=RolloutState.PENDING,
                stages=plan.stages,
                stage=0,
                stage_opened_at=now,
                bake_seconds=int(plan.bake.total_seconds()),
                max_failures=plan.max_failures,
                failures=0,
                health_check="" if plan.health_check is None else plan.health_check.text,
                check_passed=None,
                checked_at=None,
                check_detail="",
                started_at=now,
                deadline=now + self._secrets.rotation_window,
                finished_at=None,
                reason="",
                started_by=caller.spiffe_id,
                ticket=request.ticket,
            )
            if not await self._repo.insert(pending):
                raise FailedPrecondition(
                    "a rollout of this secret was started at the same time; see 'broker "
                    "rollout status REF'"
                )
        try:
            _, before, after = await self._secrets.rotate_for(
                tenant,
                ref.text,
                caller,
                authorize,
                environment=request.environment,
                ticket=request.ticket,
                justification=request.justification,
                value=request.value,
                generate_length=request.generate_length,
                details=details,
                staged=True,
            )
        except BaseException:
            if pending is not None:
                await self._repo.delete_pending(pending.id)
            raise
        assert pending is not None  # rotate_for raised NotFound for an absent secret
        if before != pending.from_version:
            # A plain rotation slipped in between our read and the pending row: undo ours.
            await self._secrets.rollback(tenant, ref.text, staged=True)
            await self._repo.delete_pending(pending.id)
            raise FailedPrecondition("the secret changed while starting the rollout; try again")
        running = dataclasses.replace(
            pending,
            to_version=after,
            state=RolloutState.RUNNING,
            stage_opened_at=self._clock.now(),
            approver="" if approver is None else approver()[:_MAX_DETAIL],
        )
        if not await self._repo.update(pending, running):
            # The job judged the start interrupted and aborted it: the rotation stands alone.
            await self._secrets.rollback(tenant, ref.text, staged=True)
            raise FailedPrecondition("the rollout was interrupted while starting; try again")
        if details is not None:
            details.update(rollout=running.id, stages=list(plan.stages), from_version=before)
        await self._record("rollout.start", running, "started", time.perf_counter() - started)
        return await self._status(running)

    # -- operator calls ---------------------------------------------------------------------

    async def _named(
        self, tenant: str, reference: str, caller: Caller, authorize: Authorize, action: str
    ) -> RolloutRecord:
        """The latest rollout of a secret the caller may `action` (decided on the secret)."""
        ref = SecretRef.parse(reference)

        def routine(_: object) -> Mapping[str, str]:
            # Promote and abort act within a rotation already decided (and approved if it
            # needed it): decided as a rotation on schedule.
            return {"on_schedule": "true"} if action == Action.SECRETS_ROTATE else {}

        await self._secrets.authorized(
            tenant, ref.text, caller, authorize, action, before_decision=routine
        )
        record = await self._repo.latest(tenant, ref.text)
        if record is None:
            raise NotFound("this secret has never had a staged rollout")
        return record

    async def status_for(
        self, tenant: str, reference: str, caller: Caller, authorize: Authorize
    ) -> RolloutStatus:
        record = await self._named(tenant, reference, caller, authorize, Action.SECRETS_SHOW)
        return await self._status(record)

    async def promote_for(
        self, tenant: str, reference: str, caller: Caller, authorize: Authorize
    ) -> RolloutStatus:
        record = await self._named(tenant, reference, caller, authorize, Action.SECRETS_ROTATE)
        step = machine.promote(record)
        return await self._status(await self._apply(record, step, by=caller.spiffe_id))

    async def abort_for(
        self, tenant: str, reference: str, caller: Caller, authorize: Authorize
    ) -> RolloutStatus:
        record = await self._named(tenant, reference, caller, authorize, Action.SECRETS_ROTATE)
        if record.state == RolloutState.PENDING:
            raise FailedPrecondition("the rollout is still starting; try again in a moment")
        step = machine.abort(record)
        return await self._status(await self._apply(record, step, by=caller.spiffe_id))

    # -- consumers' reports -----------------------------------------------------------------

    async def report_for(
        self,
        tenant: str,
        reference: str,
        caller: Caller,
        authorize: Authorize,
        *,
        version: int,
        healthy: bool,
        detail: str = "",
    ) -> RolloutStatus | None:
        """A consumer says which version it serves and whether its health check passes.
        Decided as a read of the secret (whoever may read it may report on it). None when no
        rollout of the secret is running (the report is then ignored)."""
        ref = SecretRef.parse(reference)
        if version < 1:
            raise InvalidArgument("the version a consumer serves is 1 or more")
        detail = detail.strip()[:_MAX_DETAIL]
        await self._secrets.authorized(tenant, ref.text, caller, authorize, Action.SECRETS_GET)
        record = await self._repo.active(tenant, ref.text)
        if record is None:
            return None
        identity = caller.spiffe_id
        stage = stage_of(record.stages, ref.text, identity)
        before = await self._repo.consumer(record.id, identity)
        await self._repo.reported(
            record.id, identity, stage, version, healthy, detail, self._clock.now()
        )
        # Agents report again at every refresh while the rollout runs: a report that says
        # what the consumer said last time is stored (it is seen) but not audited again.
        same = (
            before is not None
            and before.reported_version == version
            and before.healthy == healthy
            and before.detail == detail
        )
        if not same:
            await self._record(
                "rollout.report",
                record,
                "healthy" if healthy else "unhealthy",
                consumer=identity,
                consumer_stage=stage + 1,
                version=version,
                health={"passed": healthy, "detail": detail},
            )
        if not healthy and version == record.to_version and record.state == RolloutState.RUNNING:
            record = await self._failure(record, f"{identity}: {detail or 'unhealthy'}")
        return await self._status(record)

    async def _failure(self, record: RolloutRecord, why: str) -> RolloutRecord:
        """Count one failure; roll back past `max_failures`. Retries a lost compare-and-set."""
        for _ in range(5):
            counted, step = machine.count_failure(record, why)
            if step is not None:
                return await self._apply(record, step, by="broker/rollout", counted=counted)
            if await self._repo.update(record, counted):
                return counted
            fresh = await self._repo.get(record.id)
            if fresh is None or fresh.state != RolloutState.RUNNING:
                return fresh or record
            record = fresh
        return record

    # -- steps --------------------------------------------------------------------------------

    async def _apply(
        self,
        record: RolloutRecord,
        step: Step,
        *,
        by: str,
        counted: RolloutRecord | None = None,
    ) -> RolloutRecord:
        now = self._clock.now()
        base = counted or record
        if step.kind == StepKind.ADVANCE:
            new = dataclasses.replace(base, stage=record.stage + 1, stage_opened_at=now)
            if not await self._repo.update(record, new):
                raise FailedPrecondition("the rollout changed meanwhile; see its status")
            await self._record(
                "rollout.advance",
                new,
                "stage-opened",
                reason=step.reason,
                by=by,
                stage_closed=record.stage + 1,
                health=self._health_details(record),
            )
            return new
        if step.kind == StepKind.COMPLETE:
            middle = dataclasses.replace(base, state=RolloutState.COMPLETING, reason=step.reason)
        elif step.kind == StepKind.ROLLBACK:
            middle = dataclasses.replace(base, state=RolloutState.ROLLING_BACK, reason=step.reason)
        else:
            middle = dataclasses.replace(base, state=RolloutState.ABORTING, reason=step.reason)
        if not await self._repo.update(record, middle):
            raise FailedPrecondition("the rollout changed meanwhile; see its status")
        return await self._settle(middle, by=by)

    async def _settle(self, record: RolloutRecord, *, by: str = "broker/rollout") -> RolloutRecord:
        """Finish a step whose routing is already decided (completing, rolling-back, aborting,
        or a pending start); idempotent, so a restarted broker calls it again."""
        now = self._clock.now()
        if record.state == RolloutState.PENDING:
            return await self._settle_pending(record)
        if record.state == RolloutState.COMPLETING:
            await self._secrets.revoke_version(record.tenant, record.ref, record.from_version)
            return await self._conclude(record, RolloutState.COMPLETED, "success", now, by)
        return await self._settle_back(record, now, by)

    async def _settle_back(self, record: RolloutRecord, now: dt.datetime, by: str) -> RolloutRecord:
        """A rollback or an abort: everybody back on the old version, then concluded."""
        if record.state not in (RolloutState.ROLLING_BACK, RolloutState.ABORTING):
            return record
        await self._back_to_old(record)
        if record.state == RolloutState.ABORTING:
            return await self._conclude(record, RolloutState.ABORTED, "aborted", now, by)
        return await self._conclude(record, RolloutState.ROLLED_BACK, "failure", now, by)

    async def _conclude(
        self,
        record: RolloutRecord,
        final: RolloutState,
        outcome: str,
        now: dt.datetime,
        by: str,
    ) -> RolloutRecord:
        """Store the final state (unless another replica did), count and audit it."""
        done = dataclasses.replace(record, state=final, finished_at=now)
        if not await self._repo.update(record, done):
            return await self._repo.get(record.id) or record
        seconds = (now - record.started_at).total_seconds()
        metrics.record_rotation(self.metric_kind, outcome, seconds)
        await self._record(
            f"rollout.{final}",
            done,
            str(final),
            reason=record.reason,
            by=by,
            health=self._health_details(record),
        )
        return done

    async def _back_to_old(self, record: RolloutRecord) -> None:
        """Make the old version current again and revoke the new one (if not done already)."""
        if record.to_version is None:
            return
        info = await self._secrets.show(record.tenant, record.ref)
        if info.record.current_version == record.to_version:
            await self._secrets.rollback(record.tenant, record.ref, staged=True)

    async def _settle_pending(self, record: RolloutRecord) -> RolloutRecord:
        """A start that has not finished for a while: the broker died during it. If the new
        version was written, resume the rollout at its first stage; else abort it."""
        now = self._clock.now()
        if now - record.started_at < _STALE_PENDING:
            return record
        info = await self._secrets.show(record.tenant, record.ref)
        current = info.record.current_version
        if current > record.from_version:
            new = dataclasses.replace(
                record, to_version=current, state=RolloutState.RUNNING, stage_opened_at=now
            )
            if await self._repo.update(record, new):
                await self._record("rollout.start", new, "resumed", reason="start interrupted")
                return new
            return record
        new = dataclasses.replace(
            record,
            state=RolloutState.ABORTED,
            finished_at=now,
            reason="the broker stopped before the new version was written",
        )
        if await self._repo.update(record, new):
            await self._record("rollout.aborted", new, "aborted", reason=new.reason)
            return new
        return record

    # -- the bake timer (the leader's job) ---------------------------------------------------

    def _owns(self, reference: str) -> bool:
        """Whether this service steers rollouts of `reference` (secrets: not `db:ROLE`)."""
        return not reference.startswith("db:")

    async def tick(self) -> list[RolloutRecord]:
        """One round over every unfinished rollout: finish interrupted steps, run due health
        checks, act on bake timers. Returns the rollouts that changed."""
        changed = []
        for record in await self._repo.unfinished():
            if not self._owns(record.ref):
                continue  # another kind's rollout (a static role's: db:ROLE)
            try:
                after = await self._advance(record)
            except BrokerError as exc:
                log.warning("rollout %s: %s", record.id, exc)
                continue
            if after != record:
                changed.append(after)
        return changed

    async def _advance(self, record: RolloutRecord) -> RolloutRecord:
        if record.state != RolloutState.RUNNING:
            return await self._settle(record)
        now = self._clock.now()
        if record.health_check and (
            record.checked_at is None
            or record.checked_at < record.stage_opened_at
            or now - record.checked_at >= self.check_interval
        ):
            record = await self._check(record)
            if record.state != RolloutState.RUNNING:
                return record
        step = machine.on_timer(record, await self._repo.consumers(record.id), now)
        if step is None:
            return record
        return await self._apply(record, step, by="broker/rollout")

    async def _check(self, record: RolloutRecord) -> RolloutRecord:
        plan_check = HealthCheck.parse(record.health_check, loopback_only=False)
        assert plan_check is not None
        env = {
            "BROKER_ROLLOUT_ID": record.id,
            "BROKER_ROLLOUT_REFERENCE": record.ref,
            "BROKER_ROLLOUT_FROM_VERSION": str(record.from_version),
            "BROKER_ROLLOUT_TO_VERSION": str(record.to_version or 0),
            "BROKER_ROLLOUT_STAGE": str(record.stage + 1),
            "BROKER_ROLLOUT_PERCENT": str(record.stages[record.stage]),
        }
        try:
            result = await self._checker.run(plan_check, env)
        except Exception as exc:  # a checker bug must not stop the timer
            result = CheckResult(False, f"the check could not run: {type(exc).__name__}")
        now = self._clock.now()
        checked = dataclasses.replace(
            record, check_passed=result.passed, checked_at=now, check_detail=result.detail
        )
        await self._record(
            "rollout.check",
            checked,
            "passed" if result.passed else "failed",
            health={"check": record.health_check[:_MAX_DETAIL], **vars(result)},
        )
        if result.passed:
            if await self._repo.update(record, checked):
                return checked
            return await self._repo.get(record.id) or record
        return await self._failure_checked(record, checked, result.detail)

    async def _failure_checked(
        self, record: RolloutRecord, checked: RolloutRecord, why: str
    ) -> RolloutRecord:
        counted, step = machine.count_failure(checked, f"health check: {why}")
        if step is not None:
            return await self._apply(record, step, by="broker/rollout", counted=counted)
        if await self._repo.update(record, counted):
            return counted
        return await self._repo.get(record.id) or record

    # -- views and audit ----------------------------------------------------------------------

    async def _status(self, record: RolloutRecord) -> RolloutStatus:
        consumers = tuple(await self._repo.consumers(record.id))
        verdict = machine.health(record, consumers)
        bake = machine.bake_ends(record) if record.state == RolloutState.RUNNING else None
        return RolloutStatus(record, consumers, verdict.healthy, verdict.reason, bake)

    def _health_details(self, record: RolloutRecord) -> dict[str, Any]:
        out: dict[str, Any] = {"failures": record.failures, "max_failures": record.max_failures}
        if record.health_check:
            out["check"] = {"passed": record.check_passed, "detail": record.check_detail}
        return out

    async def _record(
        self,
        what: str,
        record: RolloutRecord,
        outcome: str,
        seconds: float | None = None,
        **details: Any,
    ) -> None:
        if self._audit is None:
            return
        event = AuditEvent(
            when=self._clock.now(),
            who=str(details.pop("by", record.started_by)),
            what=what,
            resource=reference_hash(record.ref),
            where="broker",
            correlation_id=record.id,
            rule="staged-rollout",
            decision="allow",
            reason=str(details.pop("reason", record.reason))[:_MAX_DETAIL],
            outcome=outcome,
            latency_ms=None if seconds is None else round(seconds * 1000, 3),
            details={
                "tenant": record.tenant,
                "rollout": record.id,
                "from_version": record.from_version,
                "to_version": record.to_version,
                "stage": record.stage + 1,
                "stage_percent": record.stages[record.stage],
                "ticket": record.ticket,
                **({"approver": record.approver} if record.approver else {}),
                **details,
            },
        )
        await self._audit(event.to_dict())
