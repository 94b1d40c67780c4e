"""Staged rollout of a static database role's new password through the real request pipeline
(mTLS, policy, audit) on a real PostgreSQL and MariaDB: during the canary a consumer of the open
stage logs in as the second user with the new password and reads what the original may, one of
a closed stage with the old user and password; a rollback leaves the old credentials working and
the second user unable to log in; a completion leaves the old password refused. Bad input and a
second rollout are refused with nothing changed."""

from __future__ import annotations

import datetime as dt
import secrets
from collections.abc import AsyncIterator
from typing import Any

import grpc
import pytest

from broker.api._proto import database_pb2, database_pb2_grpc, rollout_pb2, static_roles_pb2
from broker.api._proto import rollout_pb2_grpc as ro_grpc
from broker.api._proto import static_roles_pb2_grpc as sr_grpc
from broker.database.engine import NewUser
from broker.rollout.plan import bucket
from tests.fixtures.dbtargets import Target, target_for

from .conftest import OTHER_WORKLOAD_ID, WORKLOAD_ID, BrokerHarness

REF = "db:app"


@pytest.fixture(params=["postgresql", "mysql"])
async def target(request: pytest.FixtureRequest) -> AsyncIterator[Target]:
    async with target_for(request.param, request) as value:
        yield value


async def refused(call: Any) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await call
    return info.value


async def reads_items(target: Target, user: str, password: str) -> bool:
    """`user` logs in and selects from the table only the original user was granted."""
    session = await target.login(user, password)
    try:
        if target.plugin == "postgresql":
            await session.fetchval("SELECT count(*) FROM items")
        else:
            with session.cursor() as cursor:
                cursor.execute(target.sql("SELECT COUNT(*) FROM {db}.items"))
                cursor.fetchall()
        return True
    except Exception:
        return False
    finally:
        await target.close_session(session)


async def _setup(broker: BrokerHarness, target: Target) -> str:
    username = f"app_{secrets.token_hex(4)}"
    engine = target.engine()
    try:
        await engine.create_user(
            target.template(target.creation.replace(" VALID UNTIL {{expiration}}", "")),
            NewUser(username, "known-to-a-person", dt.datetime.now(dt.UTC) + dt.timedelta(days=9)),
        )
    finally:
        await engine.close()
    channel = broker.channel(broker.operator)
    await database_pb2_grpc.DatabaseStub(channel).AddConnection(
        database_pb2.AddConnectionRequest(
            name="main", plugin=target.plugin, dsn=target.dsn, password=target.password
        )
    )
    await sr_grpc.StaticRolesStub(channel).AddStaticRole(
        static_roles_pb2.AddStaticRoleRequest(
            name="app",
            connection="main",
            username=username,
            rotation_period_seconds=30 * 86400,
            owner="web",
            tenant="acme",
            environment="prod",
        )
    )
    return username


def stages_with_web_closed() -> list[int]:
    """Stages in which WORKLOAD_ID is not in the first (canary) stage: (b, 100) when its
    bucket b is 1 or more; else (1, 100) puts it in the canary and the test swaps roles."""
    return [max(1, bucket(REF, WORKLOAD_ID)), 100]


def start(**changes: Any) -> rollout_pb2.StartRolloutRequest:
    values: dict[str, Any] = {
        "reference": REF,
        "ticket": "SEC-12",
        "justification": "quarterly",
        "stages": [100],
        "bake_seconds": 300,
    }
    values.update(changes)
    return rollout_pb2.StartRolloutRequest(**values)


async def creds(
    broker: BrokerHarness, web: sr_grpc.StaticRolesStub | None = None
) -> static_roles_pb2.StaticCredentials:
    if web is None:
        web = sr_grpc.StaticRolesStub(broker.channel(broker.identity(WORKLOAD_ID)))
    return await web.GetStaticCredentials(static_roles_pb2.GetStaticCredentialsRequest(name="app"))


async def test_canary_then_rollback_on_a_failing_report(
    broker: BrokerHarness, target: Target
) -> None:
    username = await _setup(broker, target)
    second = f"{username}_b"
    old = await creds(broker)
    ops = ro_grpc.RolloutsStub(broker.channel(broker.operator))
    stages = stages_with_web_closed()
    status = await ops.Start(start(stages=stages))
    assert (status.state, status.from_version, status.to_version) == ("running", 1, 2)
    canary = bucket(REF, WORKLOAD_ID) < stages[0]
    got = await creds(broker)
    if canary:  # WORKLOAD_ID is in the open stage
        assert (got.username, got.version) == (second, 2)
    else:  # a closed stage: the old user and password, unchanged
        assert (got.username, got.password, got.version) == (username, old.password, 1)
        await ops.Promote(rollout_pb2.RolloutRequest(reference=REF))
        got = await creds(broker)
        assert (got.username, got.version) == (second, 2)
    assert got.password != old.password
    assert await target.can_login(second, got.password)
    assert await reads_items(target, second, got.password)  # the original's privileges
    assert await target.can_login(username, old.password)  # never changed

    # A second rollout while this one runs: refused, nothing changed.
    again = await refused(ops.Start(start()))
    assert again.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "already running" in (again.details() or "")

    # The consumer reports the new credentials failing: rolled back at once.
    consumer = ro_grpc.RolloutsStub(broker.channel(broker.identity(WORKLOAD_ID)))
    answer = await consumer.Report(
        rollout_pb2.ReportRolloutRequest(
            reference=REF, version=2, healthy=False, detail="login failed"
        )
    )
    assert (answer.tracked, answer.state) == (True, "rolled-back")
    assert await target.can_login(username, old.password)
    assert not await target.can_login(second, got.password)
    assert not await target.exists(second)
    back = await creds(broker)
    assert (back.username, back.password, back.version) == (username, old.password, 1)
    events = [e["what"] for e in await broker.events()]
    assert "rollout.rolled-back" in events


async def test_completion_switches_users_and_the_old_password_stops_working(
    broker: BrokerHarness, target: Target
) -> None:
    username = await _setup(broker, target)
    old = await creds(broker)
    ops = ro_grpc.RolloutsStub(broker.channel(broker.operator))
    await ops.Start(start())
    web = sr_grpc.StaticRolesStub(broker.channel(broker.identity(WORKLOAD_ID)))
    new = await creds(broker, web)
    assert (new.username, new.version) == (f"{username}_b", 2)
    broker.clock.advance(dt.timedelta(minutes=5).total_seconds())
    assert await broker.app.rollout_job.tick() == 1
    status = await ops.Status(rollout_pb2.RolloutRequest(reference=REF))
    assert status.state == "completed"
    after = await creds(broker, web)
    assert (after.username, after.password, after.version) == (new.username, new.password, 2)
    assert await target.can_login(new.username, new.password)
    assert await reads_items(target, new.username, new.password)
    assert not await target.can_login(username, old.password)  # rotated away
    assert await target.exists(username)  # kept: it may own objects


async def test_bad_input_and_other_callers_are_refused(
    broker: BrokerHarness, target: Target
) -> None:
    username = await _setup(broker, target)
    old = await creds(broker)
    ops = ro_grpc.RolloutsStub(broker.channel(broker.operator))
    for request, code in (
        (start(reference="db:nope"), grpc.StatusCode.NOT_FOUND),
        (start(reference="db:app'; DROP ROLE x; --"), grpc.StatusCode.INVALID_ARGUMENT),
        (start(stages=[50, 10]), grpc.StatusCode.INVALID_ARGUMENT),
        (start(generate_length=32), grpc.StatusCode.INVALID_ARGUMENT),
    ):
        error = await refused(ops.Start(request))
        assert error.code() == code, request
        assert "Traceback" not in (error.details() or "")
    workload = ro_grpc.RolloutsStub(broker.channel(broker.identity(WORKLOAD_ID)))
    denied = await refused(workload.Start(start()))
    assert denied.code() == grpc.StatusCode.PERMISSION_DENIED
    other = ro_grpc.RolloutsStub(broker.channel(broker.identity(OTHER_WORKLOAD_ID)))
    await ops.Start(start())
    report = await refused(
        other.Report(rollout_pb2.ReportRolloutRequest(reference=REF, version=2, healthy=False))
    )
    assert report.code() == grpc.StatusCode.PERMISSION_DENIED
    status = await ops.Status(rollout_pb2.RolloutRequest(reference=REF))
    assert (status.state, status.failures) == ("running", 0)
    assert await target.can_login(username, old.password)
