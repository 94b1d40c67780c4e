"""Staged rollout of a new password of a static database role (`broker db static-role rotate
NAME --stages ...`), on the secrets' rollout state machine (`broker.rollout.machine`) and its
storage: the rollout is a row of `rollouts` whose reference is `db:ROLE`, so stages (by a hash
of the consumer's SPIFFE ID), bakes, health checks, max-failures, rollback, audit events and
the bake timer are the secrets' ones.

Neither engine keeps two passwords on one user (PostgreSQL has one per role; MariaDB 10.11
refuses `RETAIN CURRENT PASSWORD`), so a rollout uses TWO login users. The role's pair is its
user as added (`app`) and a second user the broker creates for it (`app_b`, with the
original's privileges: `Engine.create_second_user`). A rollout sets the new password on the
user of the pair the role does not use now ("target"); the role's own user and password do not
change while it runs:

* start: the rollout (pending) and the target with its new password, sealed, are written
  first (intent before action); then the target is created (or, already there, given the
  password and unlocked); then the rollout runs. A database that refuses changes nothing.
* reads: `static-creds` answers a consumer whose stage is open with (target, new password),
  every other with the role's user and password (the consumer reads of the rollout).
* completion (the final stage baked): the role becomes (target, new password, version + 1) in
  one transaction, then the old user's password is set to a random one nobody is given, so
  only the new user logs in. A crash in between is rolled forward by the bake timer.
* rollback/abort: everyone is back on the role's user and password, which never changed; the
  target is dropped (the broker-created second user) or given a random password nobody is
  given (the role's original user, when the role was already on the second one).
* a start the broker died in (pending for 2 minutes) is undone as a rollback.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import logging
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Final

from broker.database.connections import Connections
from broker.database.engine import EngineUnavailable, StatementFailed
from broker.database.names import check_name
from broker.database.static import (
    PASSWORD_LENGTH,
    StaticRoles,
    check_username,
)
from broker.envelope import SYSTEM_TENANT, Envelope, SealedBlob, aad
from broker.errors import FailedPrecondition, InvalidArgument, NotFound, PermissionDenied
from broker.passwords import RandomBytes, generate_password, system_random
from broker.policy import Authorize, Caller
from broker.rollout import machine
from broker.rollout.checks import HealthChecker
from broker.rollout.plan import RolloutPlan, stage_of
from broker.rollout.service import Audit, RolloutService, RolloutStatus
from broker.storage.rollouts import RolloutRecord, RolloutRepository, RolloutState
from broker.storage.static_rollouts import SqlStaticRolloutRepository, StaticPair
from ca.clock import Clock
from ca.errors import IntegrityError

__all__ = [
    "METRIC_KIND",
    "PREFIX",
    "RoutedCredentials",
    "StaticRolloutService",
    "StaticStartRequest",
    "is_static_reference",
    "second_username",
    "static_reference",
]

log = logging.getLogger(__name__)

METRIC_KIND: Final = "static-role-rollout"
PREFIX: Final = "db:"
SECOND_SUFFIX: Final = "_b"
WINDOW: Final = dt.timedelta(hours=24)  # the longest a rollout may take (stages x bake)
_STALE_PENDING: Final = dt.timedelta(minutes=2)
_ALPHABET: Final = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789"


def static_reference(name: str) -> str:
    """What `broker rollout status|promote|abort` and the consumers' reports call a static
    role's rollout: `db:NAME` (a secret reference never starts with `db:`)."""
    return PREFIX + check_name(name, "static role")


def is_static_reference(reference: str) -> bool:
    return reference.startswith(PREFIX)


def role_of(reference: str) -> str:
    if not is_static_reference(reference):
        raise InvalidArgument(f"{reference!r} does not name a static role: use db:ROLE")
    return check_name(reference[len(PREFIX) :], "static role")


def second_username(username: str, max_length: int) -> str:
    """The second login user of a role whose user is `username`: `username` + `_b`."""
    check_username(username)
    second = username + SECOND_SUFFIX
    if len(second) > max_length:
        raise InvalidArgument(
            f"user {username!r} is too long for a second user {second!r} on this database "
            f"(at most {max_length} characters): a staged rollout needs one"
        )
    return check_username(second)


def _password_aad(role: str, version: int) -> bytes:
    return aad("db.static-rollout", role, str(version))


@dataclass(frozen=True)
class StaticStartRequest:
    reason: str
    ticket: str
    stages: Sequence[int]
    bake: dt.timedelta
    max_failures: int = 0
    health_check: str = ""


@dataclass(frozen=True)
class RoutedCredentials:
    """What a consumer gets: the username and password of its stage, and the role's version
    they are (the version a consumer reports)."""

    username: str
    password: str
    version: int
    rollout_id: str | None = None
    stage: int | None = None
    next_rotation_at: dt.datetime | None = None


class StaticRolloutService(RolloutService):
    """The rollout service of static roles. It shares the secrets' rollout storage (and the
    machine, bake timer steps, health checks and audit events) but owns the references
    `db:ROLE`; the secrets' service skips them."""

    metric_kind = METRIC_KIND

    def __init__(
        self,
        repository: RolloutRepository,
        pairs: SqlStaticRolloutRepository,
        roles: StaticRoles,
        connections: Connections,
        envelope: Envelope,
        clock: Clock,
        checker: HealthChecker,
        *,
        audit: Audit | None = None,
        random: RandomBytes = system_random,
        loopback_checks_only: bool = True,
        check_interval: dt.timedelta = dt.timedelta(seconds=10),
    ) -> None:
        # Not RolloutService.__init__: there is no secret service behind these rollouts; every
        # method of the base that would use one is overridden here.
        self._repo = repository
        self._pairs = pairs
        self._roles = roles
        self._connections = connections
        self._envelope = envelope
        self._clock = clock
        self._checker = checker
        self._audit = audit
        self._random = random
        self.loopback_checks_only = loopback_checks_only
        self.check_interval = check_interval

    def _owns(self, reference: str) -> bool:
        return is_static_reference(reference)

    # -- start --------------------------------------------------------------------------------

    async def start(
        self, name: str, request: StaticStartRequest, *, actor: str, admin: bool = False
    ) -> RolloutStatus:
        """Start a staged rollout of a new password of static role `name` (see the module
        docstring). `admin`: the caller has the admin role (needed for a --health-check
        command). Raises NotFound, InvalidArgument, PermissionDenied, FailedPrecondition (a
        rollout runs already; the database refused: nothing changed), Unavailable (the
        pending start is undone by the bake timer)."""
        ref = static_reference(name)
        plan = RolloutPlan.build(
            request.stages,
            request.bake,
            request.max_failures,
            request.health_check,
            window=WINDOW,
            loopback_only=self.loopback_checks_only,
        )
        if plan.health_check is not None and not plan.health_check.is_url and not admin:
            raise PermissionDenied(
                "a --health-check command runs on the broker's host: only an operator with "
                "the admin role may give one; give a loopback http(s) URL instead"
            )
        await self._roles.settle(name)
        role = await self._roles.role(name)
        if role.sealed_password is None:
            raise FailedPrecondition(f"static role {name!r} has not been rotated yet")
        existing = await self._repo.active(role.tenant, ref)
        if existing is not None:
            raise FailedPrecondition(
                f"a rollout of static role {name!r} is already {existing.state} (id "
                f"{existing.id}, stage {existing.stage + 1} of {len(existing.stages)}); "
                f"promote or abort it first ('broker rollout status {ref}')"
            )
        max_length = await self._connections.on_engine(
            role.connection, lambda engine: _length(engine.max_username_length)
        )
        pair = await self._pairs.get(name)
        if pair is None or role.username not in (pair.first_user, pair.second_user):
            pair = StaticPair(
                name,
                role.username,
                second_username(role.username, max_length),
                "",
                "",
                0,
                None,
                None,
            )
        target = pair.other(role.username)
        now = self._clock.now()
        started = time.perf_counter()
        version = role.version + 1
        pending = RolloutRecord(
            id=f"rollout-{uuid.uuid4().hex[:16]}",
            tenant=role.tenant,
            ref=ref,
            from_version=role.version,
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
            deadline=now + WINDOW,
            finished_at=None,
            reason=request.reason[:200],
            started_by=actor,
            ticket=request.ticket,
        )
        if not await self._repo.insert(pending):
            raise FailedPrecondition(
                f"a rollout of static role {name!r} was started at the same time; see "
                f"'broker rollout status {ref}'"
            )
        password = generate_password(self._random, PASSWORD_LENGTH, _ALPHABET)
        blob = await self._envelope.seal(
            SYSTEM_TENANT, password.encode(), _password_aad(name, version)
        )
        intent = dataclasses.replace(
            pair,
            target_user=target,
            rollout_id=pending.id,
            version=version,
            sealed_password=blob.to_bytes(),
            kek_label=blob.kek_label,
        )
        if not await self._pairs.begin(intent):
            await self._repo.delete_pending(pending.id)
            raise FailedPrecondition(f"a rollout of static role {name!r} is in flight")
        try:
            await self._connections.on_engine(
                role.connection,
                lambda engine: engine.create_second_user(role.username, target, password),
            )
        except EngineUnavailable:
            raise  # pending: undone by the bake timer once the database is back
        except StatementFailed:
            await self._undo_target(intent, role.connection)
            await self._pairs.clear(name, pending.id)
            await self._repo.delete_pending(pending.id)
            raise
        running = dataclasses.replace(
            pending, to_version=version, state=RolloutState.RUNNING, stage_opened_at=now
        )
        if not await self._repo.update(pending, running):
            raise FailedPrecondition("the rollout was interrupted while starting; try again")
        await self._record(
            "rollout.start",
            running,
            "started",
            time.perf_counter() - started,
            username=role.username,
            second_username=target,
        )
        return await self._status(running)

    # -- consumers -----------------------------------------------------------------------------

    async def credentials(
        self, name: str, caller: Caller, authorize: Authorize
    ) -> RoutedCredentials:
        """`static-creds` during a rollout: the username and password of the caller's stage
        (decided as the role's credentials are: `StaticRoles.credentials`). Without a rollout,
        the role's own."""
        current = await self._roles.credentials(name, caller, authorize)
        role = current.role
        ref = PREFIX + name
        record = await self._repo.active(role.tenant, ref)
        if record is None or record.to_version is None:
            return RoutedCredentials(
                role.username, current.password, role.version, None, None, role.next_rotation_at
            )
        stage = stage_of(record.stages, ref, caller.spiffe_id)
        version = machine.routed_version(record, stage)
        pair = await self._pairs.get(name)
        if (
            version == record.to_version
            and pair is not None
            and pair.rollout_id == record.id
            and pair.sealed_password is not None
        ):
            password = self._open(pair.sealed_password, _password_aad(name, pair.version))
            routed = RoutedCredentials(pair.target_user, password, version, record.id, stage)
        elif version == record.to_version:
            # completing, and the role already switched: the role's own are the new ones.
            fresh = await self._roles.credentials(name, caller, authorize)
            routed = RoutedCredentials(
                fresh.role.username, fresh.password, fresh.role.version, record.id, stage
            )
        else:
            routed = RoutedCredentials(role.username, current.password, version, record.id, stage)
        now = self._clock.now()
        await self._repo.served(record.id, caller.spiffe_id, stage, routed.version, now)
        return dataclasses.replace(routed, next_rotation_at=role.next_rotation_at)

    async def report(
        self,
        reference: str,
        caller: Caller,
        authorize: Authorize,
        *,
        version: int,
        healthy: bool,
        detail: str = "",
    ) -> RolloutStatus | None:
        """A consumer of the role says which version it uses and whether it is healthy (the
        same report as a secret's consumers send). Decided as a read of the role's
        credentials. None when no rollout of the role runs."""
        name = role_of(reference)
        if version < 1:
            raise InvalidArgument("the version a consumer serves is 1 or more")
        await self._roles.credentials(name, caller, authorize)
        return await self._report(reference, caller.spiffe_id, version, healthy, detail)

    async def _report(
        self, ref: str, identity: str, version: int, healthy: bool, detail: str
    ) -> RolloutStatus | None:
        role = await self._roles.role(role_of(ref))
        record = await self._repo.active(role.tenant, ref)
        if record is None:
            return None
        detail = detail.strip()[:200]
        stage = stage_of(record.stages, ref, identity)
        before = await self._repo.consumer(record.id, identity)
        await self._repo.reported(
            record.id, identity, stage, version, healthy, detail, self._clock.now()
        )
        if not (
            before is not None
            and before.reported_version == version
            and before.healthy == healthy
            and before.detail == detail
        ):
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

    # -- operator calls (authorized by the API's operator gate) ----------------------------

    async def status(self, reference: str) -> RolloutStatus:
        return await self._status(await self._latest(reference))

    async def promote(self, reference: str, *, actor: str) -> RolloutStatus:
        record = await self._latest(reference)
        step = machine.promote(record)
        return await self._status(await self._apply(record, step, by=actor))

    async def abort(self, reference: str, *, actor: str) -> RolloutStatus:
        record = await self._latest(reference)
        if record.state == RolloutState.PENDING:
            raise FailedPrecondition("the rollout is still starting; try again in a moment")
        step = machine.abort(record)
        return await self._status(await self._apply(record, step, by=actor))

    async def _latest(self, reference: str) -> RolloutRecord:
        name = role_of(reference)
        role = await self._roles.role(name)
        record = await self._repo.latest(role.tenant, PREFIX + name)
        if record is None:
            raise NotFound(f"static role {name!r} has never had a staged rollout")
        return record

    async def busy(self, tenant: str, ref: str) -> bool:
        return await self._repo.active(tenant, ref) is not None

    # -- steps (the base's _apply moves the state; these finish it) --------------------------

    async def _settle(self, record: RolloutRecord, *, by: str = "broker/rollout") -> RolloutRecord:
        now = self._clock.now()
        if record.state == RolloutState.PENDING:
            if now - record.started_at < _STALE_PENDING:
                return record
            await self._back_to_old(record)
            record = dataclasses.replace(
                record, reason="the broker stopped while starting the rollout; undone"
            )
            return await self._conclude(record, RolloutState.ABORTED, "aborted", now, by)
        if record.state == RolloutState.COMPLETING:
            await self._forward(record)
            return await self._conclude(record, RolloutState.COMPLETED, "success", now, by)
        return await self._settle_back(record, now, by)

    async def _forward(self, record: RolloutRecord) -> None:
        """Completion: the role becomes (target, new password), then the old user's password
        is replaced by one nobody is given. Idempotent (a restarted broker runs it again)."""
        name = role_of(record.ref)
        role = await self._roles.role(name)
        pair = await self._pairs.get(name)
        if pair is not None and pair.rollout_id == record.id and pair.sealed_password:
            password = self._open(pair.sealed_password, _password_aad(name, pair.version))
            sealed = await self._envelope.seal(
                SYSTEM_TENANT, password.encode(), aad("db.static-role", name, "password")
            )
            now = self._clock.now()
            await self._pairs.complete(
                name,
                record.id,
                pair.target_user,
                pair.version,
                sealed.to_bytes(),
                sealed.kek_label,
                now,
                now + dt.timedelta(seconds=role.rotation_period),
            )
            old = role.username
        else:
            pair = await self._pairs.get(name)
            if pair is None:
                return
            old = pair.other(role.username)
        unknown = generate_password(self._random, PASSWORD_LENGTH, _ALPHABET)
        await self._connections.on_engine(
            role.connection, lambda engine: engine.set_password(old, unknown)
        )

    async def _back_to_old(self, record: RolloutRecord) -> None:
        """Everyone back on the role's user and password (never changed): the target is
        dropped (the broker's second user) or locked out with a password nobody is given."""
        name = role_of(record.ref)
        pair = await self._pairs.get(name)
        if pair is None or pair.rollout_id != record.id:
            return  # undone already
        role = await self._roles.role(name)
        await self._undo_target(pair, role.connection)
        await self._pairs.clear(name, record.id)

    async def _undo_target(self, pair: StaticPair, connection: str) -> None:
        target = pair.target_user
        if target == pair.second_user:
            await self._connections.on_engine(connection, lambda engine: engine.revoke_user(target))
            return
        unknown = generate_password(self._random, PASSWORD_LENGTH, _ALPHABET)
        try:
            await self._connections.on_engine(
                connection, lambda engine: engine.set_password(target, unknown)
            )
        except StatementFailed:
            log.warning("static role %s: user %s is gone", pair.name, target)

    def _open(self, blob: bytes, associated: bytes) -> str:
        try:
            return self._envelope.open(SealedBlob.from_bytes(blob), associated).decode()
        except IntegrityError as exc:
            raise FailedPrecondition(
                f"stored static-role rollout password does not verify: {exc}"
            ) from None


async def _length(value: int) -> int:
    return value
