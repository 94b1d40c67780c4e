"""Staged rollout of a static database role's new password (`StaticRolloutService`) on the
in-memory engine (tests/fixtures/fakeengine.py), SQLite storage and a fake clock: canary
consumers get the second user with the new password, the others the old user and password
(unchanged); completion switches the role and locks the old user out; rollback and abort drop
the second user; bad input and a second rollout are refused with nothing changed; a start the
broker died in is undone."""

from __future__ import annotations

import datetime as dt
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from broker.database.credentials import CredentialService
from broker.database.static import StaticRoleSpec
from broker.envelope import Envelope
from broker.errors import FailedPrecondition, InvalidArgument, NotFound, PermissionDenied
from broker.policy import Action, Authorize, Caller, Decision, DefaultPolicy
from broker.rollout.checks import CheckResult
from broker.rollout.plan import HealthCheck, stage_of
from broker.rollout.service import RolloutService
from broker.rollout.static_role import (
    METRIC_KIND,
    StaticRolloutService,
    StaticStartRequest,
    second_username,
    static_reference,
)
from broker.storage import open_storage
from broker.storage.rollouts import RolloutState
from broker.storage.sql import SqlStorage
from ca.clock import FakeClock
from ca.keys.software import SoftwareBackend
from tests.fixtures.fakeengine import FakeDatabase, FakeUser

T0 = dt.datetime(2026, 3, 1, 12, 0, 0, tzinfo=dt.UTC)
STAGES = (10, 50, 100)
REF = "db:app"
OPERATOR = "spiffe://example.org/broker/operator/alice"


def consumer(n: int) -> Caller:
    return Caller(
        f"spiffe://example.org/acme/prod/web/pod-{n}",
        False,
        {"tenant": "acme", "environment": "prod", "service": "web"},
    )


def by_stage() -> dict[int, Caller]:
    """One consumer of each stage of STAGES for db:app (found by the placement hash)."""
    out: dict[int, Caller] = {}
    n = 0
    while len(out) < 3:
        c = consumer(n)
        out.setdefault(stage_of(STAGES, REF, c.spiffe_id), c)
        n += 1
    return out


def authorizer(who: Caller) -> Authorize:
    policy = DefaultPolicy([])

    def authorize(resource: str, attributes: Mapping[str, str] | None = None, /) -> Decision:
        decision = policy.decide(who, Action.DB_CREDS, resource, attributes=attributes)
        if not decision.allowed:
            raise PermissionDenied(decision.reason)
        return decision

    return authorize


@dataclass
class Checker:
    passed: bool = True
    runs: list[str] = field(default_factory=list)

    async def run(self, check: HealthCheck, env: Mapping[str, str]) -> CheckResult:
        self.runs.append(check.text)
        return CheckResult(self.passed, "ok" if self.passed else "exit 1")


@dataclass
class World:
    clock: FakeClock
    db: FakeDatabase
    storage: SqlStorage
    service: CredentialService
    rollouts: StaticRolloutService
    audit: list[Mapping[str, Any]]
    old_password: str

    async def creds(self, who: Caller) -> tuple[str, str, int]:
        got = await self.rollouts.credentials("app", who, authorizer(who))
        return got.username, got.password, got.version

    def logs_in(self, username: str, password: str) -> bool:
        user = self.db.users.get(username)
        return user is not None and user.password == password


@pytest.fixture
async def world(tmp_path: Path) -> AsyncIterator[World]:
    storage = await open_storage(f"sqlite://{tmp_path / 'broker.db'}")
    assert isinstance(storage, SqlStorage)
    await storage.migrate()
    clock = FakeClock(T0)
    db = FakeDatabase()
    db.users["app_user"] = FakeUser("initial", T0 + dt.timedelta(days=999))
    envelope = Envelope(SoftwareBackend(), storage)
    events: list[Mapping[str, Any]] = []

    async def audit(event: Mapping[str, Any]) -> None:
        events.append(event)

    service = CredentialService(storage.database(), envelope, clock, engines=db.open, audit=audit)
    await service.add_connection("main", "postgresql", "postgresql://admin@db/app", "root-password")
    await service.static.add(
        StaticRoleSpec("app", "main", "app_user", owner="web", tenant="acme", environment="prod")
    )
    rollouts = StaticRolloutService(
        storage.rollouts(),
        storage.static_rollouts(),
        service.static,
        service.connections,
        envelope,
        clock,
        Checker(),
        audit=audit,
    )
    service.static.rollout_running = lambda role: rollouts.busy(role.tenant, f"db:{role.name}")
    try:
        yield World(clock, db, storage, service, rollouts, events, db.users["app_user"].password)
    finally:
        await service.close()
        await storage.close()


def request(**changes: Any) -> StaticStartRequest:
    values: dict[str, Any] = {
        "reason": "quarterly",
        "ticket": "SEC-12",
        "stages": STAGES,
        "bake": dt.timedelta(minutes=5),
    }
    values.update(changes)
    return StaticStartRequest(**values)


async def test_canary_gets_the_second_user_and_the_others_the_unchanged_old_one(
    world: World,
) -> None:
    status = await world.rollouts.start("app", request(), actor=OPERATOR)
    assert status.record.state == RolloutState.RUNNING
    assert (status.record.ref, status.record.from_version, status.record.to_version) == (
        REF,
        1,
        2,
    )
    stages = by_stage()
    user, password, version = await world.creds(stages[0])
    assert (user, version) == ("app_user_b", 2)
    assert password != world.old_password
    assert world.logs_in("app_user_b", password)
    for closed in (stages[1], stages[2]):
        assert await world.creds(closed) == ("app_user", world.old_password, 1)
    assert world.logs_in("app_user", world.old_password)  # never changed meanwhile
    # The consumer reads are the rollout's consumers, on the version of their stage.
    seen = {c.identity: c.served_version for c in status.consumers}
    assert seen == {}
    after = await world.rollouts.status(REF)
    assert {c.identity: c.served_version for c in after.consumers} == {
        stages[0].spiffe_id: 2,
        stages[1].spiffe_id: 1,
        stages[2].spiffe_id: 1,
    }
    assert [e["what"] for e in world.audit][-1] == "rollout.start"
    assert password not in repr(world.audit)


async def test_completion_switches_the_role_and_the_old_password_stops_working(
    world: World,
) -> None:
    await world.rollouts.start("app", request(), actor=OPERATOR)
    stages = by_stage()
    _, new_password, _ = await world.creds(stages[0])
    await world.rollouts.promote(REF, actor=OPERATOR)
    await world.rollouts.promote(REF, actor=OPERATOR)
    for who in stages.values():
        assert await world.creds(who) == ("app_user_b", new_password, 2)
        await world.rollouts.report(REF, who, authorizer(who), version=2, healthy=True)
    world.clock.advance(minutes=5)
    changed = await world.rollouts.tick()
    assert [r.state for r in changed] == [RolloutState.COMPLETED]
    role = await world.service.static.role("app")
    assert (role.username, role.version) == ("app_user_b", 2)
    assert world.logs_in("app_user_b", new_password)
    assert not world.logs_in("app_user", world.old_password)  # rotated away
    assert "app_user" in world.db.users  # the original is kept (it owns the objects)
    for who in stages.values():
        assert await world.creds(who) == ("app_user_b", new_password, 2)
    assert world.audit[-1]["what"] == "rollout.completed"

    # The next rollout puts the new password on the original user and never drops it.
    await world.rollouts.start("app", request(), actor=OPERATOR)
    user, third, version = await world.creds(stages[0])
    assert (user, version) == ("app_user", 3)
    assert world.logs_in("app_user", third)
    assert await world.creds(stages[2]) == ("app_user_b", new_password, 2)
    await world.rollouts.abort(REF, actor=OPERATOR)
    assert "app_user" in world.db.users
    assert not world.logs_in("app_user", third)
    assert await world.creds(stages[0]) == ("app_user_b", new_password, 2)


async def test_a_failing_canary_rolls_back_and_the_second_user_is_dropped(world: World) -> None:
    await world.rollouts.start("app", request(), actor=OPERATOR)
    canary = by_stage()[0]
    _, new_password, _ = await world.creds(canary)
    status = await world.rollouts.report(
        REF, canary, authorizer(canary), version=2, healthy=False, detail="cannot log in"
    )
    assert status is not None
    assert status.record.state == RolloutState.ROLLED_BACK
    assert "app_user_b" not in world.db.users
    assert not world.logs_in("app_user_b", new_password)
    assert world.logs_in("app_user", world.old_password)
    for who in by_stage().values():
        assert await world.creds(who) == ("app_user", world.old_password, 1)
    role = await world.service.static.role("app")
    assert (role.username, role.version) == ("app_user", 1)
    assert world.audit[-1]["what"] == "rollout.rolled-back"
    # After it: a new rollout can start again.
    again = await world.rollouts.start("app", request(), actor=OPERATOR)
    assert again.record.state == RolloutState.RUNNING


async def test_a_failing_health_check_rolls_back(world: World) -> None:
    world.rollouts._checker = Checker(passed=False)
    check = "http://127.0.0.1:9/health"
    await world.rollouts.start("app", request(health_check=check), actor=OPERATOR)
    changed = await world.rollouts.tick()
    assert [r.state for r in changed] == [RolloutState.ROLLED_BACK]
    assert "app_user_b" not in world.db.users
    assert world.logs_in("app_user", world.old_password)


async def test_the_final_stage_bakes_then_completes(world: World) -> None:
    await world.rollouts.start("app", request(stages=(100,)), actor=OPERATOR)
    assert await world.rollouts.tick() == []  # baking
    world.clock.advance(minutes=5)
    changed = await world.rollouts.tick()
    assert [r.state for r in changed] == [RolloutState.COMPLETED]
    new = world.db.users["app_user_b"].password
    assert await world.creds(by_stage()[1]) == ("app_user_b", new, 2)
    assert not world.logs_in("app_user", world.old_password)


async def test_bad_input_is_refused_and_nothing_changes(world: World) -> None:
    before = dict(world.db.users)
    with pytest.raises(NotFound):
        await world.rollouts.start("nope", request(), actor=OPERATOR)
    for name in ("app'; DROP ROLE x; --", "APP", "db:app"):
        with pytest.raises(InvalidArgument):
            await world.rollouts.start(name, request(), actor=OPERATOR)
    for ref in ("db:app;drop", "secret://x", "db:"):
        with pytest.raises(InvalidArgument):
            await world.rollouts.status(ref)
    with pytest.raises(InvalidArgument):
        await world.rollouts.start("app", request(stages=(50, 10)), actor=OPERATOR)
    with pytest.raises(PermissionDenied):
        await world.rollouts.start("app", request(health_check="true"), actor=OPERATOR)
    with pytest.raises(NotFound):
        await world.rollouts.status(REF)  # none started
    assert world.db.users == before
    assert await world.storage.rollouts().unfinished() == []

    await world.rollouts.start("app", request(), actor=OPERATOR)
    running = dict(world.db.users)
    with pytest.raises(FailedPrecondition, match="already running"):
        await world.rollouts.start("app", request(), actor=OPERATOR)
    with pytest.raises(FailedPrecondition, match="staged rollout"):
        await world.service.static.rotate("app", "scheduled")
    with pytest.raises(FailedPrecondition, match="abort it first"):
        await world.service.static.remove("app")
    assert (await world.service.static.role("app")).version == 1
    assert world.db.users == running
    assert len(await world.storage.rollouts().unfinished()) == 1


def test_second_user_names_are_validated() -> None:
    assert second_username("app_user", 63) == "app_user_b"
    for bad in ("a`b", "x'; DROP USER root; --", "", "a b"):
        with pytest.raises(InvalidArgument):
            second_username(bad, 63)
    with pytest.raises(InvalidArgument, match="too long"):
        second_username("u" * 31, 32)
    assert static_reference("app") == "db:app"
    with pytest.raises(InvalidArgument):
        static_reference("app;x")


async def test_a_database_that_refuses_leaves_nothing(world: World) -> None:
    world.db.users.pop("app_user")  # the original user was dropped out of band
    with pytest.raises(FailedPrecondition):
        await world.rollouts.start("app", request(), actor=OPERATOR)
    assert "app_user_b" not in world.db.users
    assert await world.storage.rollouts().unfinished() == []
    pair = await world.storage.static_rollouts().get("app")
    assert pair is not None and pair.target_user == "" and pair.sealed_password is None


async def test_a_start_the_broker_died_in_is_undone(world: World) -> None:
    class Crash(BaseException):
        """The broker process dies here (kill -9)."""

    async def die(_: str) -> None:
        raise Crash

    world.db.after_create_second = die  # the process dies once the second user exists
    with pytest.raises(Crash):
        await world.rollouts.start("app", request(), actor=OPERATOR)
    world.db.after_create_second = None
    assert "app_user_b" in world.db.users
    assert (await world.rollouts.status(REF)).record.state == RolloutState.PENDING
    assert await world.creds(by_stage()[0]) == ("app_user", world.old_password, 1)
    world.clock.advance(minutes=1)
    assert await world.rollouts.tick() == []
    world.clock.advance(minutes=2)
    changed = await world.rollouts.tick()
    assert [r.state for r in changed] == [RolloutState.ABORTED]
    assert "app_user_b" not in world.db.users
    assert await world.creds(by_stage()[0]) == ("app_user", world.old_password, 1)
    assert (await world.rollouts.start("app", request(), actor=OPERATOR)).record.state == (
        RolloutState.RUNNING
    )


async def test_the_secrets_service_leaves_static_rollouts_alone(world: World) -> None:
    await world.rollouts.start("app", request(stages=(100,)), actor=OPERATOR)
    secrets_side = RolloutService(world.storage.rollouts(), None, world.clock, Checker())  # type: ignore[arg-type]
    world.clock.advance(minutes=10)
    assert await secrets_side.tick() == []  # db:ROLE is not a secret's rollout
    assert (await world.rollouts.status(REF)).record.state == RolloutState.RUNNING
    changed = await world.rollouts.tick()
    assert [(r.ref, r.state) for r in changed] == [(REF, RolloutState.COMPLETED)]
    assert METRIC_KIND == "static-role-rollout"


async def test_a_completion_the_broker_died_in_is_rolled_forward(world: World) -> None:
    class Crash(BaseException):
        """The broker process dies here (kill -9)."""

    async def die(username: str) -> None:
        raise Crash(username)

    await world.rollouts.start("app", request(stages=(100,)), actor=OPERATOR)
    world.clock.advance(minutes=5)
    world.db.before_set_password = die  # dies after the role switched, before the old is locked
    with pytest.raises(Crash):
        await world.rollouts.tick()
    world.db.before_set_password = None
    role = await world.service.static.role("app")
    assert (role.username, role.version) == ("app_user_b", 2)
    assert (await world.rollouts.status(REF)).record.state == RolloutState.COMPLETING
    new = world.db.users["app_user_b"].password
    assert await world.creds(by_stage()[2]) == ("app_user_b", new, 2)  # everyone on the new
    assert world.logs_in("app_user", world.old_password)  # not locked out yet
    changed = await world.rollouts.tick()  # the restarted broker's bake timer
    assert [r.state for r in changed] == [RolloutState.COMPLETED]
    assert not world.logs_in("app_user", world.old_password)
    assert world.logs_in("app_user_b", new)
    assert await world.rollouts.tick() == []
