"""`RolloutService` over real SQLite storage, the software key backend and a fake clock: stage
routing by identity, bake timers, consumers' and the operator's health, automatic rollback,
crash recovery, and every bad input refused with nothing changed."""

from __future__ import annotations

import dataclasses
import datetime as dt
import secrets as random
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from broker import metrics
from broker.envelope import DataKeyCache, Envelope
from broker.errors import FailedPrecondition, InvalidArgument, NotFound, PermissionDenied
from broker.policy import Caller, Decision
from broker.rollout.checks import CheckResult
from broker.rollout.plan import HealthCheck, stage_of
from broker.rollout.service import RolloutService, StartRequest
from broker.secrets import MetadataMac, Route, SecretService
from broker.storage import open_storage
from broker.storage.rollouts import RolloutState
from ca.clock import FakeClock
from ca.keys import SoftwareBackend

T0 = dt.datetime(2026, 6, 1, 9, 0, tzinfo=dt.UTC)
REF = "secret://payments/prod/stripe/api-key"
OPERATOR = Caller("spiffe://td/broker/operator/alice", True, roles=frozenset({"admin"}))
AUDITOR = Caller("spiffe://td/broker/operator/bob", True, roles=frozenset({"security"}))
STAGES = (10, 50, 100)


def workload(name: str) -> Caller:
    return Caller(
        f"spiffe://td/acme/prod/payments/{name}",
        False,
        {"tenant": "acme", "environment": "prod"},
    )


def consumers_by_stage() -> dict[int, list[Caller]]:
    """Three consumers of each stage of STAGES for REF (found by the placement hash)."""
    out: dict[int, list[Caller]] = {0: [], 1: [], 2: []}
    n = 0
    while any(len(v) < 3 for v in out.values()):
        caller = workload(f"pod-{n}")
        stage = stage_of(STAGES, REF, caller.spiffe_id)
        if len(out[stage]) < 3:
            out[stage].append(caller)
        n += 1
    return out


@dataclass
class Port:
    allow: bool = True
    asked: list[tuple[str, dict[str, str]]] = field(default_factory=list)

    def __call__(self, resource: str, attributes: Mapping[str, str] | None = None, /) -> Decision:
        self.asked.append((resource, dict(attributes or {})))
        if not self.allow:
            raise PermissionDenied("not granted (rule test)")
        return Decision(True, "allowed", "test")


@dataclass
class Checker:
    """A HealthChecker whose answer the test sets; remembers what it ran."""

    passed: bool = True
    runs: list[tuple[str, dict[str, str]]] = field(default_factory=list)

    async def run(self, check: HealthCheck, env: Mapping[str, str]) -> CheckResult:
        self.runs.append((check.text, dict(env)))
        return CheckResult(self.passed, "exit 0" if self.passed else "exit 1: connection refused")


@dataclass
class World:
    secrets: SecretService
    rollouts: RolloutService
    clock: FakeClock
    checker: Checker
    audit: list[dict[str, Any]]
    old: bytes


@pytest.fixture
async def world(tmp_path: Path) -> AsyncIterator[World]:
    storage = await open_storage(f"sqlite://{tmp_path / 'broker.db'}")
    await storage.migrate()
    keys, clock = SoftwareBackend(), FakeClock(T0)
    mac = MetadataMac(keys)
    secrets = SecretService(
        storage.secrets(mac), Envelope(keys, storage, DataKeyCache(clock)), clock
    )
    await secrets.start(mac)
    audit: list[dict[str, Any]] = []

    async def record(event: Mapping[str, Any]) -> None:
        audit.append(dict(event))

    checker = Checker()
    rollouts = RolloutService(storage.rollouts(), secrets, clock, checker, audit=record)
    secrets.route_reads(rollouts)
    old = f"sk_test_{random.token_hex(16)}".encode()
    await secrets.put(
        "acme",
        REF,
        owner="payments",
        classification="confidential",
        rotation_period=dt.timedelta(days=90),
        value=old,
    )
    try:
        yield World(secrets, rollouts, clock, checker, audit, old)
    finally:
        await storage.close()


def request(**overrides: Any) -> StartRequest:
    base: dict[str, Any] = {
        "environment": "prod",
        "ticket": "SEC-12",
        "justification": "quarterly rotation",
        "stages": STAGES,
        "bake": dt.timedelta(minutes=5),
        "generate_length": 32,
    }
    return StartRequest(**(base | overrides))


async def read(w: World, caller: Caller) -> int:
    return (await w.secrets.get("acme", REF, caller, Port())).version


async def versions_of(w: World, groups: dict[int, list[Caller]]) -> dict[int, set[int]]:
    return {stage: {await read(w, c) for c in callers} for stage, callers in groups.items()}


async def test_a_healthy_rollout_opens_stage_after_stage_then_revokes_the_old_version(
    world: World,
) -> None:
    w = world
    groups = consumers_by_stage()
    before = metrics.ROTATIONS.labels("secret-rollout", "success")._value.get()
    status = await w.rollouts.start_for("acme", REF, OPERATOR, Port(), request())
    assert status.record.state == RolloutState.RUNNING
    assert (status.record.from_version, status.record.to_version) == (1, 2)
    # Stage 1 (10 %) open: its consumers get version 2, everyone else version 1.
    assert await versions_of(w, groups) == {0: {2}, 1: {1}, 2: {1}}
    # Nothing happens before the bake ends.
    w.clock.advance(minutes=4)
    assert await w.rollouts.tick() == []
    w.clock.advance(minutes=1)
    [advanced] = await w.rollouts.tick()
    assert advanced.stage == 1
    assert await versions_of(w, groups) == {0: {2}, 1: {2}, 2: {1}}
    # An operator promotes to the final stage; the final stage still bakes before completion.
    promoted = await w.rollouts.promote_for("acme", REF, OPERATOR, Port())
    assert promoted.record.stage == 2
    with pytest.raises(FailedPrecondition, match="final stage"):
        await w.rollouts.promote_for("acme", REF, OPERATOR, Port())
    assert await versions_of(w, groups) == {0: {2}, 1: {2}, 2: {2}}
    info = await w.secrets.show("acme", REF)
    assert [v.state for v in info.versions] == ["previous", "current"]
    w.clock.advance(minutes=5)
    [done] = await w.rollouts.tick()
    assert done.state == RolloutState.COMPLETED
    info = await w.secrets.show("acme", REF)
    assert [v.state for v in info.versions] == ["revoked", "current"]
    with pytest.raises(FailedPrecondition, match="revoked"):
        await w.secrets.get("acme", REF, OPERATOR, Port(), version=1, justification="t")
    # After completion reads are no longer routed: everyone gets the current version.
    assert await versions_of(w, groups) == {0: {2}, 1: {2}, 2: {2}}
    after = metrics.ROTATIONS.labels("secret-rollout", "success")._value.get()
    assert after == before + 1
    kinds = [e["what"] for e in w.audit]
    assert kinds == ["rollout.start", "rollout.advance", "rollout.advance", "rollout.completed"]
    assert all(
        e["details"]["from_version"] == 1 and e["details"]["to_version"] == 2 for e in w.audit
    )
    assert w.audit[1]["details"]["stage"] == 2 and w.audit[2]["reason"] == "promoted by an operator"


async def test_a_failing_report_rolls_every_consumer_back_to_the_old_version(
    world: World,
) -> None:
    w = world
    groups = consumers_by_stage()
    await w.rollouts.start_for("acme", REF, OPERATOR, Port(), request())
    canary = groups[0][0]
    assert await read(w, canary) == 2
    status = await w.rollouts.report_for(
        "acme", REF, canary, Port(), version=2, healthy=False, detail="login to stripe failed"
    )
    assert status is not None and status.record.state == RolloutState.ROLLED_BACK
    assert "login to stripe failed" in status.record.reason
    assert await versions_of(w, groups) == {0: {1}, 1: {1}, 2: {1}}
    secret = await w.secrets.get("acme", REF, canary, Port())
    assert secret.value == w.old
    info = await w.secrets.show("acme", REF)
    assert [v.state for v in info.versions] == ["current", "revoked"]
    # Finished: promote and abort are refused, and nothing changes.
    for call in (w.rollouts.promote_for, w.rollouts.abort_for):
        with pytest.raises(FailedPrecondition, match="rolled-back"):
            await call("acme", REF, OPERATOR, Port())
    assert [v.state for v in (await w.secrets.show("acme", REF)).versions] == [
        "current",
        "revoked",
    ]
    assert [e["what"] for e in w.audit][-2:] == ["rollout.report", "rollout.rolled-back"]
    assert w.audit[-2]["details"]["health"] == {
        "passed": False,
        "detail": "login to stripe failed",
    }


async def test_a_stage_that_does_not_converge_within_its_bake_is_rolled_back(
    world: World,
) -> None:
    w = world
    groups = consumers_by_stage()
    await w.rollouts.start_for("acme", REF, OPERATOR, Port(), request(max_failures=1))
    canary, other = groups[0][0], groups[0][1]
    assert await read(w, canary) == 2
    assert await read(w, other) == 2
    # Both report they still serve version 1 (their reload did not take): not converged.
    for caller in (canary, other):
        await w.rollouts.report_for("acme", REF, caller, Port(), version=1, healthy=True)
    # A report repeating the last one is stored but not audited again.
    await w.rollouts.report_for("acme", REF, canary, Port(), version=1, healthy=True)
    assert [e["what"] for e in w.audit].count("rollout.report") == 2
    w.clock.advance(minutes=5)
    [rolled] = await w.rollouts.tick()
    assert rolled.state == RolloutState.ROLLED_BACK
    assert "did not become healthy within its bake" in rolled.reason
    assert await versions_of(w, groups) == {0: {1}, 1: {1}, 2: {1}}


async def test_the_operator_health_check_gates_each_stage(world: World) -> None:
    w = world
    status = await w.rollouts.start_for(
        "acme", REF, OPERATOR, Port(), request(health_check="/usr/bin/true --probe")
    )
    assert status.record.health_check == "/usr/bin/true --probe"
    await w.rollouts.tick()
    assert w.checker.runs[0][1]["BROKER_ROLLOUT_TO_VERSION"] == "2"
    assert all(w.old.decode() not in value for value in w.checker.runs[0][1].values())
    w.clock.advance(minutes=5)
    [advanced] = await w.rollouts.tick()
    assert advanced.stage == 1 and advanced.check_passed
    w.checker.passed = False
    w.clock.advance(seconds=10)
    [rolled] = await w.rollouts.tick()
    assert rolled.state == RolloutState.ROLLED_BACK
    assert "health check: exit 1: connection refused" in rolled.reason
    assert (await w.secrets.show("acme", REF)).record.current_version == 1
    check_events = [e for e in w.audit if e["what"] == "rollout.check"]
    assert [e["outcome"] for e in check_events][-1] == "failed"


async def test_abort_puts_everyone_back_and_a_new_rollout_may_start(world: World) -> None:
    w = world
    groups = consumers_by_stage()
    await w.rollouts.start_for("acme", REF, OPERATOR, Port(), request())
    aborted = await w.rollouts.abort_for("acme", REF, OPERATOR, Port())
    assert aborted.record.state == RolloutState.ABORTED
    assert await versions_of(w, groups) == {0: {1}, 1: {1}, 2: {1}}
    again = await w.rollouts.start_for("acme", REF, OPERATOR, Port(), request())
    assert (again.record.from_version, again.record.to_version) == (1, 3)


async def test_bad_input_is_refused_and_nothing_changes(world: World) -> None:
    w = world
    cases: list[tuple[dict[str, Any], str]] = [
        ({"stages": (10, 50)}, "must end at 100%"),
        ({"stages": (50, 10, 100)}, "backwards"),
        ({"stages": (10, 10, 100)}, "backwards"),
        ({"stages": ()}, "at least one stage"),
        ({"bake": dt.timedelta(0)}, "longer than 0"),
        ({"bake": dt.timedelta(hours=25)}, "at most 24h"),
        ({"bake": dt.timedelta(hours=12)}, "rollback window"),
        ({"health_check": "http://10.0.0.8/healthz"}, "not loopback"),
        ({"health_check": "https://example.org/healthz"}, "not loopback"),
        ({"health_check": "ftp://127.0.0.1/x"}, "scheme 'ftp' is not supported"),
        ({"health_check": "file:///etc/passwd"}, "scheme 'file' is not supported"),
        ({"health_check": "'unterminated"}, "does not parse"),
        ({"max_failures": -1}, "max-failures"),
        ({"environment": "dev"}, "does not match"),
    ]
    for overrides, message in cases:
        with pytest.raises(InvalidArgument, match=message):
            await w.rollouts.start_for("acme", REF, OPERATOR, Port(), request(**overrides))
    with pytest.raises(NotFound):
        await w.rollouts.start_for(
            "acme", "secret://payments/prod/nope", OPERATOR, Port(), request()
        )
    with pytest.raises(PermissionDenied):
        await w.rollouts.start_for("acme", REF, workload("pod-x"), Port(allow=False), request())
    # A command runs on the broker's host: admins only (a loopback URL is for anyone allowed).
    with pytest.raises(PermissionDenied, match="admin role"):
        await w.rollouts.start_for("acme", REF, AUDITOR, Port(), request(health_check="id"))
    with pytest.raises(NotFound, match="never had a staged rollout"):
        await w.rollouts.status_for("acme", REF, OPERATOR, Port())
    info = await w.secrets.show("acme", REF)
    assert [v.version for v in info.versions] == [1] and info.record.current_version == 1
    assert w.audit == []
    # A second rollout while one runs; a plain rotation or rollback while one runs.
    await w.rollouts.start_for("acme", REF, OPERATOR, Port(), request())
    with pytest.raises(FailedPrecondition, match="already running"):
        await w.rollouts.start_for("acme", REF, OPERATOR, Port(), request())
    with pytest.raises(FailedPrecondition, match="staged rollout of this secret is running"):
        await w.secrets.rotate(
            "acme", REF, environment="prod", ticket="T-1", justification="x", generate_length=32
        )
    with pytest.raises(FailedPrecondition, match="staged rollout of this secret is running"):
        await w.secrets.rollback("acme", REF)
    assert [v.version for v in (await w.secrets.show("acme", REF)).versions] == [1, 2]


async def test_a_crash_mid_step_is_finished_by_the_next_tick(world: World) -> None:
    w = world
    groups = consumers_by_stage()
    status = await w.rollouts.start_for("acme", REF, OPERATOR, Port(), request())
    repo = w.rollouts._repo
    # The broker died right after deciding to roll back (state written, versions untouched).
    record = status.record
    rolling = dataclasses.replace(record, state=RolloutState.ROLLING_BACK, reason="crash test")
    assert await repo.update(record, rolling)
    # While it is down readers are already routed to the old version...
    assert await versions_of(w, groups) == {0: {1}, 1: {1}, 2: {1}}
    # ...and the restarted broker's job finishes the rollback.
    [done] = await w.rollouts.tick()
    assert done.state == RolloutState.ROLLED_BACK
    info = await w.secrets.show("acme", REF)
    assert info.record.current_version == 1
    assert [v.state for v in info.versions] == ["current", "revoked"]


async def test_a_start_interrupted_before_or_after_the_rotation_is_settled(world: World) -> None:
    w = world
    repo = w.rollouts._repo
    status = await w.rollouts.start_for("acme", REF, OPERATOR, Port(), request())
    # Simulate a crash between the rotation and the running state: back to pending.
    pending = dataclasses.replace(
        status.record, state=RolloutState.PENDING, to_version=None, failures=0
    )
    assert await repo.update(status.record, pending)
    assert await w.rollouts.tick() == []  # a start in progress is left alone for a while
    w.clock.advance(minutes=3)
    [resumed] = await w.rollouts.tick()
    assert resumed.state == RolloutState.RUNNING and resumed.to_version == 2
    await w.rollouts.abort_for("acme", REF, OPERATOR, Port())
    # A crash before the rotation: the pending rollout is aborted, the secret untouched.
    latest = await repo.latest("acme", REF)
    assert latest is not None
    orphan = dataclasses.replace(
        latest,
        id="rollout-orphan",
        state=RolloutState.PENDING,
        from_version=1,
        to_version=None,
        started_at=w.clock.now(),
        finished_at=None,
    )
    assert await repo.insert(orphan)
    w.clock.advance(minutes=3)
    [aborted] = await w.rollouts.tick()
    assert aborted.state == RolloutState.ABORTED
    assert "before the new version was written" in aborted.reason
    assert (await w.secrets.show("acme", REF)).record.current_version == 1


async def test_a_read_routed_just_before_a_rollback_is_routed_again(world: World) -> None:
    """Route, then the rollback revokes the routed version, then reveal: the consumer is
    routed again and gets the old version instead of a refusal (the model's re-route)."""
    w = world
    canary = consumers_by_stage()[0][0]
    await w.rollouts.start_for("acme", REF, OPERATOR, Port(), request())
    stale = await w.rollouts.route("acme", REF, canary.spiffe_id)
    assert stale is not None and stale.version == 2
    await w.rollouts.abort_for("acme", REF, OPERATOR, Port())
    rollouts = w.rollouts

    class StaleFirst:
        calls = 0

        async def route(self, tenant: str, ref: str, identity: str) -> Route | None:
            self.calls += 1
            return stale if self.calls == 1 else await rollouts.route(tenant, ref, identity)

        async def served(self, route: Route, identity: str) -> None:
            await rollouts.served(route, identity)

        async def busy(self, tenant: str, ref: str) -> bool:
            return await rollouts.busy(tenant, ref)

    router = StaleFirst()
    w.secrets.route_reads(router)
    secret = await w.secrets.get("acme", REF, canary, Port())
    assert (secret.version, secret.value) == (1, w.old)
    assert router.calls == 2
