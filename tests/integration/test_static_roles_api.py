"""Static database roles through the real request pipeline (mTLS, policy, audit) against a
real PostgreSQL and MariaDB: the operator adds and rotates, the owning workload reads, anyone
else is refused the same way whether the role exists or not, and nothing changes."""

from __future__ import annotations

import datetime as dt
import json
import secrets
from collections.abc import AsyncIterator
from typing import Any

import grpc
import pytest

from broker.api._proto import database_pb2, database_pb2_grpc, static_roles_pb2
from broker.api._proto import static_roles_pb2_grpc as sr_grpc
from broker.database.engine import NewUser
from tests.fixtures.dbtargets import Target, target_for

from .conftest import OTHER_WORKLOAD_ID, WORKLOAD_ID, BrokerHarness


@pytest.fixture(params=["postgresql", "mysql"])
async def target(request: pytest.FixtureRequest) -> AsyncIterator[Target]:
    async with target_for(request.param, request) as value:
        yield value


async def refused(call: Any) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await call
    return info.value


async def _setup(broker: BrokerHarness, target: Target) -> tuple[str, sr_grpc.StaticRolesStub]:
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
    ops = sr_grpc.StaticRolesStub(channel)
    role = await ops.AddStaticRole(
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
    assert role.version == 1
    return username, ops


async def test_owner_reads_others_are_refused_and_rotation_is_audited(
    broker: BrokerHarness, target: Target
) -> None:
    username, ops = await _setup(broker, target)
    assert not await target.can_login(username, "known-to-a-person")
    web = sr_grpc.StaticRolesStub(broker.channel(broker.identity(WORKLOAD_ID)))
    creds = await web.GetStaticCredentials(static_roles_pb2.GetStaticCredentialsRequest(name="app"))
    assert creds.username == username and creds.version == 1
    assert await target.can_login(username, creds.password)

    other = sr_grpc.StaticRolesStub(broker.channel(broker.identity(OTHER_WORKLOAD_ID)))
    present = await refused(
        other.GetStaticCredentials(static_roles_pb2.GetStaticCredentialsRequest(name="app"))
    )
    absent = await refused(
        other.GetStaticCredentials(static_roles_pb2.GetStaticCredentialsRequest(name="nope"))
    )
    assert present.code() == absent.code() == grpc.StatusCode.PERMISSION_DENIED
    assert present.details() == absent.details()
    for call in (
        web.RotateStaticRole(
            static_roles_pb2.RotateStaticRoleRequest(name="app", reason="x", ticket="T-1")
        ),
        web.DeleteStaticRole(static_roles_pb2.DeleteStaticRoleRequest(name="app")),
        web.AddStaticRole(
            static_roles_pb2.AddStaticRoleRequest(name="mine", connection="main", username=username)
        ),
    ):
        assert (await refused(call)).code() == grpc.StatusCode.PERMISSION_DENIED
    missing = await refused(
        ops.RotateStaticRole(static_roles_pb2.RotateStaticRoleRequest(name="app", reason="x"))
    )
    assert missing.code() == grpc.StatusCode.INVALID_ARGUMENT
    # nothing changed
    same = await web.GetStaticCredentials(static_roles_pb2.GetStaticCredentialsRequest(name="app"))
    assert (same.version, same.password) == (1, creds.password)

    rotated = await ops.RotateStaticRole(
        static_roles_pb2.RotateStaticRoleRequest(
            name="app", reason="personnel-change", ticket="HR-42"
        )
    )
    assert rotated.version == 2
    after = await web.GetStaticCredentials(static_roles_pb2.GetStaticCredentialsRequest(name="app"))
    assert after.password != creds.password and await target.can_login(username, after.password)

    events = await broker.events()
    rotation = [e for e in events if e.get("method", "").endswith("/RotateStaticRole")]
    assert rotation[-1]["details"]["ticket"] == "HR-42"
    assert rotation[-1]["details"]["before_version"] == 1
    assert rotation[-1]["details"]["after_version"] == 2
    reads = [e for e in events if e.get("method", "").endswith("/GetStaticCredentials")]
    assert [e["decision"] for e in reads][:3] == ["allow", "deny", "deny"]
    ledger = json.dumps(events)
    for password in (creds.password, after.password, target.password):
        assert password not in ledger


async def test_bad_input_over_the_api(broker: BrokerHarness, target: Target) -> None:
    username, ops = await _setup(broker, target)
    code = grpc.StatusCode
    injected = "ALTER ROLE {{name}} PASSWORD {{password}}; DROP TABLE items"
    main: dict[str, Any] = {"name": "x", "connection": "main"}
    cases = [
        ({**main, "connection": "nope", "username": username}, code.NOT_FOUND),
        ({**main, "username": "ghost_user"}, code.FAILED_PRECONDITION),
        ({**main, "username": "a'; DROP USER b; --"}, code.INVALID_ARGUMENT),
        ({**main, "username": username}, code.ALREADY_EXISTS),
        ({**main, "username": username, "rotation_statements": injected}, code.INVALID_ARGUMENT),
        ({**main, "username": username, "rotation_period_seconds": 60}, code.INVALID_ARGUMENT),
    ]
    for fields, expected in cases:
        err = await refused(ops.AddStaticRole(static_roles_pb2.AddStaticRoleRequest(**fields)))
        assert err.code() == expected, (fields, err.details())
    listed = await ops.ListStaticRoles(static_roles_pb2.ListStaticRolesRequest())
    assert [(r.name, r.version) for r in listed.roles] == [("app", 1)]
    assert (await refused(
        ops.GetStaticRole(static_roles_pb2.GetStaticRoleRequest(name="nope"))
    )).code() == grpc.StatusCode.NOT_FOUND  # fmt: skip


async def test_revoking_a_person_ends_leases_and_rotates_static_roles(
    broker: BrokerHarness, target: Target
) -> None:
    from broker.api._proto import revocation_pb2, revocation_pb2_grpc

    username, _ = await _setup(broker, target)
    channel = broker.channel(broker.operator)
    await database_pb2_grpc.DatabaseStub(channel).AddRole(
        database_pb2.AddRoleRequest(
            role=database_pb2.DatabaseRole(
                name="dyn",
                connection="main",
                creation_statements=target.creation,
                owner="web",
                tenant="acme",
                environment="prod",
            )
        )
    )
    web_channel = broker.channel(broker.identity(WORKLOAD_ID))
    lease = await database_pb2_grpc.DatabaseStub(web_channel).IssueCredentials(
        database_pb2.IssueCredentialsRequest(role="dyn")
    )
    web = sr_grpc.StaticRolesStub(web_channel)
    before = await web.GetStaticCredentials(
        static_roles_pb2.GetStaticCredentialsRequest(name="app")
    )
    app = await target.login(username, before.password)  # the application keeps running

    request = revocation_pb2.RevokeSubjectRequest(
        identity=WORKLOAD_ID, reason="personnel-change", ticket="HR-7"
    )
    refused_call = await refused(
        revocation_pb2_grpc.RevocationStub(web_channel).RevokeSubject(request)
    )
    assert refused_call.code() == grpc.StatusCode.PERMISSION_DENIED
    assert await target.exists(lease.username)  # nothing changed

    response = await revocation_pb2_grpc.RevocationStub(channel).RevokeSubject(request)
    assert sorted((o.kind, o.id, o.error) for o in response.objects) == [
        ("lease", lease.lease.id, ""),
        ("static-role", "app", ""),
    ]
    assert not await target.exists(lease.username)
    assert not await target.can_login(username, before.password)
    after = await web.GetStaticCredentials(static_roles_pb2.GetStaticCredentialsRequest(name="app"))
    assert after.version == before.version + 1
    assert await target.can_login(username, after.password)
    try:
        assert await target.alive(app), "the open application session survives"
    finally:
        await target.close_session(app)
    events = await broker.events()
    per_object = [e for e in events if e["what"].startswith("subject.revoke.")]
    assert sorted(e["resource"] for e in per_object) == sorted([lease.lease.id, "app"])
    assert all(e["who"] == broker.operator.spiffe_id for e in per_object)


async def test_prod_pii_database_role_needs_the_owner_or_two_operators(
    broker: BrokerHarness,
) -> None:
    """Issue 12: database roles carry a classification, so the prod + pii two-person rule
    applies to `db creds` as to secrets (decided before any user is created)."""
    from broker.api.server.pipeline import CORRELATION_HEADER

    channel = broker.channel(broker.operator)
    db = database_pb2_grpc.DatabaseStub(channel)
    await db.AddConnection(
        database_pb2.AddConnectionRequest(
            name="main", plugin="postgresql", dsn="postgresql://admin@127.0.0.1:1/x",
            password="unused", skip_verify=True,
        )
    )  # fmt: skip
    role = await db.AddRole(
        database_pb2.AddRoleRequest(
            role=database_pb2.DatabaseRole(
                name="pii", connection="main",
                creation_statements="CREATE ROLE {{name}} LOGIN PASSWORD {{password}}",
                owner="web", tenant="acme", environment="prod",
                classification="pii", rotation_period_seconds=90 * 86400,
            )
        )
    )  # fmt: skip
    assert (role.classification, role.rotation_period_seconds) == ("pii", 90 * 86400)
    metadata = ((CORRELATION_HEADER, "op-alone-db"), ("x-broker-justification", "INC-1 x"))
    err = await refused(
        db.IssueCredentials(database_pb2.IssueCredentialsRequest(role="pii"), metadata=metadata)
    )
    assert err.code() == grpc.StatusCode.PERMISSION_DENIED
    assert "second operator" in (err.details() or "")
    event = await broker.event_for("op-alone-db")
    assert (event["decision"], event["rule"]) == ("deny", "two-person")
    assert await broker.app.storage.database().list_leases() == []  # nothing created
    bad = await refused(
        db.AddRole(
            database_pb2.AddRoleRequest(
                role=database_pb2.DatabaseRole(
                    name="bad", connection="main", creation_statements="CREATE ROLE {{name}}",
                    classification="secret-ish",
                )
            )
        )
    )  # fmt: skip
    assert bad.code() == grpc.StatusCode.INVALID_ARGUMENT
