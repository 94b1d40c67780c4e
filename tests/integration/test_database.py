"""Dynamic database credentials through the whole request path (mTLS, policy, audit), in
process, against the throwaway PostgreSQL cluster and MariaDB server; time moves on the
harness's FakeClock and the reaper is ticked by hand."""

from __future__ import annotations

import datetime as dt
import json
import secrets
from collections.abc import AsyncIterator
from typing import Any

import grpc
import pytest

from broker.api._proto import database_pb2, database_pb2_grpc
from tests.fixtures.dbtargets import Target, target_for
from tests.fixtures.tcpproxy import TcpProxy

from .conftest import OTHER_WORKLOAD_ID, WORKLOAD_ID, BrokerHarness, Identity

PLUGINS = ["postgresql", "mysql"]


@pytest.fixture(params=PLUGINS)
async def target(request: pytest.FixtureRequest) -> AsyncIterator[Target]:
    async with target_for(request.param, request) as value:
        yield value


class Api:
    """Stubs for one identity."""

    def __init__(self, broker: BrokerHarness, identity: Identity) -> None:
        channel = broker.channel(identity)
        self.db = database_pb2_grpc.DatabaseStub(channel)
        self.leases = database_pb2_grpc.LeasesStub(channel)


async def refused(call: Any) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await call
    return info.value


async def setup_role(
    broker: BrokerHarness,
    target: Target,
    *,
    role: str = "app",
    dsn: str | None = None,
    creation: str | None = None,
    max_ttl: int = 3600,
    default_ttl: int = 600,
    verify: bool = True,
) -> Api:
    ops = Api(broker, broker.operator)
    await ops.db.AddConnection(
        database_pb2.AddConnectionRequest(
            name="main",
            plugin=target.plugin,
            dsn=dsn or target.dsn,
            password=target.password,
            skip_verify=not verify,
        )
    )
    await ops.db.AddRole(
        database_pb2.AddRoleRequest(
            role=database_pb2.DatabaseRole(
                name=role,
                connection="main",
                creation_statements=creation or target.creation,
                default_ttl_seconds=default_ttl,
                max_ttl_seconds=max_ttl,
                owner="web",
                tenant="acme",
                environment="prod",
            )
        )
    )
    return ops


async def lease_rows(broker: BrokerHarness) -> list[Any]:
    return await broker.app.storage.database().list_leases()


async def test_issue_login_renew_capped_revoke(broker: BrokerHarness, target: Target) -> None:
    await setup_role(broker, target, max_ttl=1800, default_ttl=600)
    web = Api(broker, broker.identity(WORKLOAD_ID))
    creds = await web.db.IssueCredentials(database_pb2.IssueCredentialsRequest(role="app"))
    assert creds.lease.id.startswith("db/app/")
    assert creds.lease.lease_duration_seconds == 600
    assert creds.lease.renewable
    assert creds.lease.holder == WORKLOAD_ID
    assert len(creds.username) <= (63 if target.plugin == "postgresql" else 32)
    session = await target.login(creds.username, creds.password)
    assert await target.alive(session)

    broker.clock.advance(seconds=300)
    renewed = await web.leases.Renew(
        database_pb2.RenewLeaseRequest(lease_id=creds.lease.id, increment_seconds=7200)
    )
    # capped at the role's max TTL (1800 s after issue)
    assert renewed.expires_at.seconds == creds.lease.max_expires_at.seconds
    assert renewed.lease_duration_seconds == 1500
    assert not renewed.renewable

    await web.leases.Revoke(database_pb2.RevokeLeaseRequest(lease_id=creds.lease.id))
    try:
        assert not await target.alive(session), "revocation must end open sessions"
    finally:
        await target.close_session(session)
    assert not await target.exists(creds.username)
    assert not await target.can_login(creds.username, creds.password)
    assert await lease_rows(broker) == []

    # audited with the lease id, never the password
    events = await broker.events()
    issue = [e for e in events if e["what"] == "db.creds"]
    assert issue and issue[-1]["details"]["lease_id"] == creds.lease.id
    assert [e for e in events if e["what"] == "lease.revoke"][-1]["resource"] == creds.lease.id
    ledger = json.dumps(events)
    assert creds.password not in ledger
    assert target.password not in ledger


async def test_only_the_owner_gets_credentials_and_only_the_holder_renews(
    broker: BrokerHarness, target: Target
) -> None:
    await setup_role(broker, target)
    other = Api(broker, broker.identity(OTHER_WORKLOAD_ID))
    err = await refused(other.db.IssueCredentials(database_pb2.IssueCredentialsRequest(role="app")))
    assert err.code() == grpc.StatusCode.PERMISSION_DENIED
    assert await lease_rows(broker) == []

    web = Api(broker, broker.identity(WORKLOAD_ID))
    creds = await web.db.IssueCredentials(database_pb2.IssueCredentialsRequest(role="app"))
    for call in (
        other.leases.Renew(database_pb2.RenewLeaseRequest(lease_id=creds.lease.id)),
        other.leases.Revoke(database_pb2.RevokeLeaseRequest(lease_id=creds.lease.id)),
        other.leases.RevokePrefix(database_pb2.RevokePrefixRequest(prefix="db/")),
        web.leases.RevokePrefix(database_pb2.RevokePrefixRequest(prefix="db/app/")),
        other.leases.List(database_pb2.ListLeasesRequest()),
        other.leases.Revoke(database_pb2.RevokeLeaseRequest(lease_id="db/app/unknown")),
    ):
        assert (await refused(call)).code() == grpc.StatusCode.PERMISSION_DENIED
    # nothing changed
    rows = await lease_rows(broker)
    assert [(r.id, r.state, r.expires_at) for r in rows] == [
        (creds.lease.id, "active", rows[0].expires_at)
    ]
    assert int(rows[0].expires_at.timestamp()) == creds.lease.expires_at.seconds
    assert await target.can_login(creds.username, creds.password)
    # workloads administer nothing
    for call in (
        other.db.ListConnections(database_pb2.ListConnectionsRequest()),
        web.db.AddConnection(
            database_pb2.AddConnectionRequest(
                name="x", plugin=target.plugin, dsn=target.dsn, password=target.password
            )
        ),
        web.db.RotateRoot(database_pb2.RotateRootRequest(name="main")),
        web.db.RemoveRole(database_pb2.RemoveRoleRequest(name="app")),
    ):
        assert (await refused(call)).code() == grpc.StatusCode.PERMISSION_DENIED
    ops = Api(broker, broker.operator)
    assert len((await ops.db.ListConnections(database_pb2.ListConnectionsRequest())).connections)


async def test_reaper_revokes_expired_leases_on_the_fake_clock(
    broker: BrokerHarness, target: Target
) -> None:
    await setup_role(broker, target)
    web = Api(broker, broker.identity(WORKLOAD_ID))
    short = await web.db.IssueCredentials(
        database_pb2.IssueCredentialsRequest(role="app", ttl_seconds=60)
    )
    long = await web.db.IssueCredentials(
        database_pb2.IssueCredentialsRequest(role="app", ttl_seconds=600)
    )
    session = await target.login(short.username, short.password)
    reaper = broker.app.lease_reaper
    result = await reaper.tick()
    assert result is not None and result.revoked == []
    broker.clock.advance(seconds=61)
    result = await reaper.tick()
    assert result is not None and [r.id for r in result.revoked] == [short.lease.id]
    try:
        assert not await target.alive(session)
    finally:
        await target.close_session(session)
    assert not await target.exists(short.username)
    assert await target.exists(long.username)
    assert [r.id for r in await lease_rows(broker)] == [long.lease.id]
    from prometheus_client import REGISTRY

    assert REGISTRY.get_sample_value("broker_active_leases", {"kind": "database"}) == 1
    assert REGISTRY.get_sample_value("broker_reaper_lag_seconds", {"kind": "database"}) == 0
    events = [e for e in await broker.events() if e["what"] == "lease.expire"]
    assert events and events[-1]["resource"] == short.lease.id
    assert short.password not in json.dumps(events)


async def test_bad_input_changes_nothing(broker: BrokerHarness, target: Target) -> None:
    ops = await setup_role(broker, target, max_ttl=600, default_ttl=60)
    web = Api(broker, broker.identity(WORKLOAD_ID))
    cases = [
        # an unknown role is refused as one the workload may not use (names cannot be probed)
        (
            web.db.IssueCredentials(database_pb2.IssueCredentialsRequest(role="nope")),
            "PERMISSION_DENIED",
        ),
        (
            web.db.IssueCredentials(
                database_pb2.IssueCredentialsRequest(role="app", ttl_seconds=601)
            ),
            "INVALID_ARGUMENT",
        ),
        (
            web.db.IssueCredentials(
                database_pb2.IssueCredentialsRequest(role="app", ttl_seconds=0)
            ),
            "INVALID_ARGUMENT",
        ),
        (
            ops.db.AddConnection(
                database_pb2.AddConnectionRequest(
                    name="x'; DROP TABLE db_roles; --",
                    plugin=target.plugin,
                    dsn=target.dsn,
                    password=target.password,
                )
            ),
            "INVALID_ARGUMENT",
        ),
        (
            ops.db.AddConnection(
                database_pb2.AddConnectionRequest(
                    name="withpw",
                    plugin=target.plugin,
                    dsn=target.dsn.replace("@", ":secret@", 1),
                    password=target.password,
                )
            ),
            "INVALID_ARGUMENT",
        ),
    ]
    for bad_role, statements in [
        ("bad'name", target.creation),
        ("r1", "CREATE USER {{name}} IDENTIFIED BY '{{password}}x';"),  # inside quotes
        ("r2", "CREATE USER {{name}}; {{ password }}; {{evil}}"),  # unknown placeholder
        ("r3", "SELECT 1"),  # no {{name}}
    ]:
        cases.append(
            (
                ops.db.AddRole(
                    database_pb2.AddRoleRequest(
                        role=database_pb2.DatabaseRole(
                            name=bad_role, connection="main", creation_statements=statements
                        )
                    )
                ),
                "INVALID_ARGUMENT",
            )
        )
    for call, code in cases:
        assert (await refused(call)).code().name == code
    assert await lease_rows(broker) == []
    assert [r.name for r in (await ops.db.ListRoles(database_pb2.ListRolesRequest())).roles] == [
        "app"
    ]
    names = [
        c.name
        for c in (await ops.db.ListConnections(database_pb2.ListConnectionsRequest())).connections
    ]
    assert names == ["main"]


async def test_role_names_cannot_be_probed(broker: BrokerHarness, target: Target) -> None:
    """Issue 17: a workload asking for a role that does not exist is answered exactly as for an
    existing role it may not use (same code, same message), both refusals are audited with the
    real reason, and nothing is created. An operator, who administers roles, learns that the
    role is absent."""
    ops = await setup_role(broker, target)
    other = Api(broker, broker.identity(OTHER_WORKLOAD_ID))
    before = len(await broker.events())
    users = await target.users_like("v_")
    refused_existing = await refused(
        other.db.IssueCredentials(database_pb2.IssueCredentialsRequest(role="app"))
    )
    unknown = await refused(
        other.db.IssueCredentials(database_pb2.IssueCredentialsRequest(role="nope"))
    )
    assert refused_existing.code() == unknown.code() == grpc.StatusCode.PERMISSION_DENIED
    assert refused_existing.details() == unknown.details()
    assert "app" not in (unknown.details() or "") and "web" not in (unknown.details() or "")
    events = [e for e in (await broker.events())[before:] if e["what"] == "db.creds"]
    assert [(e["resource"], e["decision"], e["outcome"]) for e in events] == [
        ("app", "deny", "PERMISSION_DENIED"),
        ("nope", "deny", "PERMISSION_DENIED"),
    ]
    assert all(e["reason"] and e["reason"] != unknown.details() for e in events)
    # nothing changed: no lease, no user, the roles as they were
    assert await lease_rows(broker) == []
    assert await target.users_like("v_") == users
    roles = (await ops.db.ListRoles(database_pb2.ListRolesRequest())).roles
    assert [r.name for r in roles] == ["app"]
    # operators administer roles: they are told the role is absent
    err = await refused(ops.db.IssueCredentials(database_pb2.IssueCredentialsRequest(role="nope")))
    assert err.code() == grpc.StatusCode.NOT_FOUND


async def test_failing_statements_roll_back_with_a_clear_message(
    broker: BrokerHarness, target: Target
) -> None:
    failing = {
        "postgresql": "CREATE ROLE {{name}} LOGIN PASSWORD {{password}};\n"
        "GRANT SELECT ON no_such_table TO {{name}};",
        "mysql": "CREATE USER {{name}}@'%' IDENTIFIED BY {{password}};\n"
        "GRANT SELECT ON no_such_db.no_such_table TO {{name}}@'%';",
    }[target.plugin]
    await setup_role(broker, target, creation=failing, role="failing")
    web = Api(broker, broker.identity(WORKLOAD_ID))
    err = await refused(
        web.db.IssueCredentials(database_pb2.IssueCredentialsRequest(role="failing"))
    )
    assert err.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "no_such" in (err.details() or "")
    assert await lease_rows(broker) == []
    assert await target.users_like("v_failing_") == []


async def test_database_down_is_unavailable_and_recovers(
    broker: BrokerHarness, target: Target
) -> None:
    proxy = TcpProxy(target.host, target.port).start()
    try:
        dsn = target.dsn.replace(f":{target.port}/", f":{proxy.port}/")
        await setup_role(broker, target, dsn=dsn, role="down")
        web = Api(broker, broker.identity(WORKLOAD_ID))
        live = await web.db.IssueCredentials(
            database_pb2.IssueCredentialsRequest(role="down", ttl_seconds=60)
        )
        proxy.down()
        err = await refused(
            web.db.IssueCredentials(database_pb2.IssueCredentialsRequest(role="down"))
        )
        assert err.code() == grpc.StatusCode.UNAVAILABLE
        # no lease left pending: the failed one is handed to the reaper
        rows = {r.id: r for r in await lease_rows(broker)}
        assert rows[live.lease.id].state == "active"
        others = [r for r in rows.values() if r.id != live.lease.id]
        assert all(r.state == "revoking" for r in others)
        # the live lease expires while the database is down: revocation fails, retried later
        broker.clock.advance(seconds=61)
        result = await broker.app.lease_reaper.tick()
        assert result is not None and result.revoked == [] and result.failed
        row = {r.id: r for r in await lease_rows(broker)}[live.lease.id]
        assert row.state == "revoking" and row.attempts == 1 and row.last_error
        assert row.due_at > broker.clock.now()  # backoff
        assert await target.exists(live.username)
        proxy.up()
        broker.clock.advance(seconds=600)
        result = await broker.app.lease_reaper.tick()
        assert result is not None and live.lease.id in [r.id for r in result.revoked]
        assert await lease_rows(broker) == []
        assert not await target.exists(live.username)
        assert await target.users_like("v_down_") == []
        again = await web.db.IssueCredentials(database_pb2.IssueCredentialsRequest(role="down"))
        assert await target.can_login(again.username, again.password)
    finally:
        proxy.stop()


async def test_repeated_failures_make_a_lease_irrevocable(
    broker: BrokerHarness, target: Target
) -> None:
    proxy = TcpProxy(target.host, target.port).start()
    try:
        dsn = target.dsn.replace(f":{target.port}/", f":{proxy.port}/")
        await setup_role(broker, target, dsn=dsn)
        web = Api(broker, broker.identity(WORKLOAD_ID))
        creds = await web.db.IssueCredentials(
            database_pb2.IssueCredentialsRequest(role="app", ttl_seconds=60)
        )
        proxy.down()
        broker.clock.advance(seconds=61)
        attempts = broker.app.database.settings.max_attempts
        for _ in range(attempts):
            await broker.app.lease_reaper.tick()
            broker.clock.advance(seconds=3600)
        row = (await lease_rows(broker))[0]
        assert row.state == "irrevocable" and row.attempts == attempts
        # The reaper keeps retrying it (issue 20 #6), at most every backoff_max; it stays
        # irrevocable (alerted) meanwhile.
        result = await broker.app.lease_reaper.tick()
        assert result is not None and result.revoked == [] and len(result.failed) == 1
        ops = Api(broker, broker.operator)
        listed = (await ops.leases.List(database_pb2.ListLeasesRequest())).leases
        assert [(lease.id, lease.state) for lease in listed] == [(creds.lease.id, "irrevocable")]
        assert listed[0].attempts == attempts + 1 and listed[0].last_error
        assert listed[0].next_attempt_at.ToDatetime(dt.UTC) > broker.clock.now()
        events = [e for e in await broker.events() if e["what"] == "lease.irrevocable"]
        assert len(events) == 1 and events[0]["resource"] == creds.lease.id
        # an operator may retry at once when the database is back
        proxy.up()
        await ops.leases.Revoke(database_pb2.RevokeLeaseRequest(lease_id=creds.lease.id))
        assert not await target.exists(creds.username)
        assert await lease_rows(broker) == []
    finally:
        proxy.stop()


async def test_admin_password_is_sealed_and_never_returned(
    broker: BrokerHarness, target: Target
) -> None:
    ops = await setup_role(broker, target)
    shown = await ops.db.GetConnection(database_pb2.GetConnectionRequest(name="main"))
    assert target.password not in str(shown)
    assert shown.kek_label.startswith("kek._system.")
    record = await broker.app.storage.database().get_connection("main")
    assert record is not None
    assert target.password.encode() not in record.sealed_password
    db_file = (broker.tmp_path / "broker.db").read_bytes()
    assert target.password.encode() not in db_file


async def test_rotate_root_and_recovery(broker: BrokerHarness, target: Target) -> None:
    ops = await setup_role(broker, target)
    rotated = await ops.db.RotateRoot(database_pb2.RotateRootRequest(name="main"))
    assert rotated.HasField("root_rotated_at")
    assert not await target.can_login(target.admin, target.password)
    web = Api(broker, broker.identity(WORKLOAD_ID))
    creds = await web.db.IssueCredentials(database_pb2.IssueCredentialsRequest(role="app"))
    assert await target.can_login(creds.username, creds.password)

    # A crash after the database took a new password but before the broker stored it: the
    # recovery record (written first) holds it, and the next use settles it.
    service = broker.app.database
    store = broker.app.storage.database()
    fresh = secrets.token_urlsafe(20)
    from broker.database.connections import _recovery_aad
    from broker.storage.database import RecoveryRecord

    blob = await broker.app.envelope.seal("_system", fresh.encode(), _recovery_aad("main"))
    await store.put_recovery(
        RecoveryRecord("main", blob.to_bytes(), blob.kek_label, broker.clock.now())
    )
    engine = await service.connections.engine("main")
    await engine.rotate_root(fresh)  # the database changed; the broker "crashed" here
    await service.close()  # forget the engines, as a restart would
    again = await web.db.IssueCredentials(database_pb2.IssueCredentialsRequest(role="app"))
    assert await target.can_login(again.username, again.password)
    assert await store.get_recovery("main") is None
    assert await target.can_login(target.admin, fresh)

    # A crash before the database changed anything: the old password stays.
    unused = secrets.token_urlsafe(20)
    blob = await broker.app.envelope.seal("_system", unused.encode(), _recovery_aad("main"))
    await store.put_recovery(
        RecoveryRecord("main", blob.to_bytes(), blob.kek_label, broker.clock.now())
    )
    await service.close()
    third = await web.db.IssueCredentials(database_pb2.IssueCredentialsRequest(role="app"))
    assert await target.can_login(third.username, third.password)
    assert await store.get_recovery("main") is None
    assert await target.can_login(target.admin, fresh)


async def test_kek_rotation_rewraps_admin_passwords(broker: BrokerHarness, target: Target) -> None:
    await setup_role(broker, target)
    store = broker.app.storage.database()
    before = await store.get_connection("main")
    assert before is not None
    label = await broker.app.envelope.new_kek("_system")
    assert await broker.app.database.kek_in_use(before.kek_label)
    assert await broker.app.database.rewrap(broker.app.envelope, "_system", label) == 1
    after = await store.get_connection("main")
    assert after is not None and after.kek_label == label
    assert not await broker.app.database.kek_in_use(before.kek_label)
    await broker.app.database.close()
    web = Api(broker, broker.identity(WORKLOAD_ID))
    creds = await web.db.IssueCredentials(database_pb2.IssueCredentialsRequest(role="app"))
    assert await target.can_login(creds.username, creds.password)


async def test_removing_a_role_keeps_its_leases_revocable(
    broker: BrokerHarness, target: Target
) -> None:
    ops = await setup_role(broker, target)
    web = Api(broker, broker.identity(WORKLOAD_ID))
    creds = await web.db.IssueCredentials(
        database_pb2.IssueCredentialsRequest(role="app", ttl_seconds=30)
    )
    await ops.db.RemoveRole(database_pb2.RemoveRoleRequest(name="app"))
    err = await refused(ops.db.RemoveConnection(database_pb2.RemoveConnectionRequest(name="main")))
    assert err.code() == grpc.StatusCode.FAILED_PRECONDITION
    broker.clock.advance(seconds=31)
    await broker.app.lease_reaper.tick()
    assert not await target.exists(creds.username)
    await ops.db.RemoveConnection(database_pb2.RemoveConnectionRequest(name="main"))


async def test_revoke_prefix(broker: BrokerHarness, target: Target) -> None:
    ops = await setup_role(broker, target)
    web = Api(broker, broker.identity(WORKLOAD_ID))
    issued = [
        await web.db.IssueCredentials(database_pb2.IssueCredentialsRequest(role="app"))
        for _ in range(3)
    ]
    response = await ops.leases.RevokePrefix(database_pb2.RevokePrefixRequest(prefix="db/app/"))
    assert response.revoked == 3 and not response.errors
    for creds in issued:
        assert not await target.exists(creds.username)
    assert await lease_rows(broker) == []


def test_usernames_fit_the_engine_and_are_unique() -> None:
    from broker.database.roles import render_username
    from broker.storage.database import RoleRecord

    role = RoleRecord(
        "r" * 60,
        "c",
        "o",
        "t",
        "e",
        "",
        None,
        None,
        60,
        60,
        "{{role}}-{{holder}}-{{random}}",
        32,
        "alphanumeric",
        dt.datetime.now(dt.UTC),
    )
    for limit in (32, 63):
        holder = "spiffe://x/a/b/Svc'Name"
        now = dt.datetime.now(dt.UTC)
        names = {render_username(role, holder, limit, now) for _ in range(200)}
        assert len(names) == 200
        assert all(len(n) <= limit for n in names)
        assert all(set(n) <= set("abcdefghijklmnopqrstuvwxyz0123456789_-") for n in names)


async def test_a_kek_rotation_racing_a_write_leaves_no_blob_under_the_old_kek(
    broker: BrokerHarness, target: Target
) -> None:
    service = broker.app.database
    store = service.store
    insert = store.insert_connection
    rotated: list[str] = []

    async def rotate_then_insert(record: Any) -> None:
        # the rotation makes a new KEK current after our blob was sealed, before it is stored
        rotated.append(await broker.app.envelope.new_kek("_system"))
        await insert(record)

    store.insert_connection = rotate_then_insert  # type: ignore[method-assign]
    try:
        added = await service.add_connection("raced", target.plugin, target.dsn, target.password)
    finally:
        store.insert_connection = insert  # type: ignore[method-assign]
    assert rotated and added.kek_label == rotated[0]
    stored = await store.get_connection("raced")
    assert stored is not None and stored.kek_label == rotated[0]
    assert not await service.kek_in_use("kek._system.1")
    engine = await service.connections.engine("raced")  # the password still opens
    await engine.verify()
