"""Issue 20 findings on dynamic database credentials, repeated as attacks through the whole
request path (mTLS, policy, audit) against the throwaway PostgreSQL cluster and MariaDB server."""

from __future__ import annotations

import json
import signal
import urllib.parse
from collections.abc import AsyncIterator
from dataclasses import replace
from pathlib import Path

import grpc
import pytest
from prometheus_client import REGISTRY

from broker.api._proto import database_pb2
from tests.fixtures.dbtargets import Target, target_for

from .conftest import WORKLOAD_ID, BrokerHarness
from .test_database import Api, refused, setup_role

PLUGINS = ["postgresql", "mysql"]


@pytest.fixture(params=PLUGINS)
async def target(request: pytest.FixtureRequest) -> AsyncIterator[Target]:
    async with target_for(request.param, request) as value:
        yield value


def _password_forms(dsn: str, password: str) -> list[str]:
    """The target's real admin password smuggled into its DSN every way a driver would read."""
    quoted = urllib.parse.quote(password, safe="")
    sep = "&" if "?" in dsn else "?"
    user = urllib.parse.urlsplit(dsn).username or ""
    return [
        f"{dsn}{sep}password={quoted}",
        f"{dsn}{sep}PASSWORD={quoted}",
        f"{dsn}{sep}Pass%77ord={quoted}",
        f"{dsn}{sep}sslmode=disable&password={quoted}",
        f"{dsn}#password={quoted}",
        dsn.replace(f"{user}@", f"{user}:{quoted}@", 1),
        dsn.replace(f"{user}@", f"{user}%3A{quoted}@", 1),
    ]


async def test_a_password_in_the_dsn_is_refused_and_nothing_is_stored(
    broker: BrokerHarness, target: Target
) -> None:
    """Finding 8: `?password=` in the DSN used to be accepted, returned by `show`, stored in
    plaintext and audited. Every form is refused with INVALID_ARGUMENT; no connection, no
    password in the database file (WAL included), in the ledger or in the reply."""
    ops = Api(broker, broker.operator)
    for i, dsn in enumerate(_password_forms(target.dsn, target.password)):
        for verify in (True, False):
            err = await refused(
                ops.db.AddConnection(
                    database_pb2.AddConnectionRequest(
                        name=f"smuggled{i}",
                        plugin=target.plugin,
                        dsn=dsn,
                        password=target.password,
                        skip_verify=not verify,
                    )
                )
            )
            assert err.code() == grpc.StatusCode.INVALID_ARGUMENT, dsn
            assert "must not carry a password" in (err.details() or "")
            assert target.password not in (err.details() or "")
    listed = await ops.db.ListConnections(database_pb2.ListConnectionsRequest())
    assert list(listed.connections) == []
    assert await broker.app.storage.database().list_connections() == []
    for name in ("broker.db", "broker.db-wal"):
        path = broker.tmp_path / name
        if path.exists():
            assert target.password.encode() not in path.read_bytes()
    events = await broker.events()
    assert any(e["what"].endswith("AddConnection") or "connection" in e["what"] for e in events)
    assert target.password not in json.dumps(events)

    # the same connection without the password is fine, and shows no secret
    await ops.db.AddConnection(
        database_pb2.AddConnectionRequest(
            name="clean", plugin=target.plugin, dsn=target.dsn, password=target.password
        )
    )
    shown = await ops.db.GetConnection(database_pb2.GetConnectionRequest(name="clean"))
    assert shown.dsn == target.dsn and target.password not in str(shown)


async def test_a_lease_that_outlives_its_database_outage_is_still_revoked(
    broker: BrokerHarness, request: pytest.FixtureRequest
) -> None:
    """Finding 6: MariaDB (no VALID UNTIL) stopped with SIGSTOP around a 5 s lease's expiry,
    past the attempts that make it irrevocable; it used to be left alone and its user kept
    logging in. Now it is retried (and alerted); once MariaDB resumes the user is dropped."""
    server = request.getfixturevalue("mariadb_server")
    assert server.process is not None
    service = broker.app.database
    service.settings = replace(service.settings, max_attempts=2)
    async with target_for("mysql", request) as target:
        await setup_role(broker, target)
        web = Api(broker, broker.identity(WORKLOAD_ID))
        creds = await web.db.IssueCredentials(
            database_pb2.IssueCredentialsRequest(role="app", ttl_seconds=5)
        )
        assert await target.can_login(creds.username, creds.password)
        server.process.send_signal(signal.SIGSTOP)
        try:
            broker.clock.advance(seconds=6)
            for _ in range(service.settings.max_attempts + 1):  # irrevocable, then retried
                result = await broker.app.lease_reaper.tick()
                assert result is not None and result.revoked == [] and len(result.failed) == 1
                broker.clock.advance(seconds=service.settings.backoff_max.total_seconds())
            (row,) = await broker.app.storage.database().list_leases()
            assert row.state == "irrevocable"
            assert row.attempts == service.settings.max_attempts + 1
            assert REGISTRY.get_sample_value("broker_leases_irrevocable", {"kind": "database"}) == 1
        finally:
            server.process.send_signal(signal.SIGCONT)
        result = await broker.app.lease_reaper.tick()
        assert result is not None and [r.id for r in result.revoked] == [creds.lease.id]
        assert not await target.exists(creds.username)
        assert not await target.can_login(creds.username, creds.password)
        assert await broker.app.storage.database().list_leases() == []
        assert REGISTRY.get_sample_value("broker_leases_irrevocable", {"kind": "database"}) == 0
        alerts = [e for e in await broker.events() if e["what"] == "lease.irrevocable"]
        assert [e["resource"] for e in alerts] == [creds.lease.id]


async def test_passwords_never_reach_the_statement_log(
    broker: BrokerHarness, target: Target, request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    """Finding 14: rotate-root sent the new admin password as a literal (visible with
    log_statement = all). Now PostgreSQL gets a SCRAM-SHA-256 verifier computed by the broker,
    for the rotated admin password and for every credential's password; MariaDB gets the
    mysql_native_password hash for the admin. The server log holds neither password, and both
    still log in."""
    if target.plugin == "postgresql":
        cluster = request.getfixturevalue("pg_cluster")
        cluster.psql("ALTER SYSTEM SET log_statement = 'all'")
        cluster.psql("SELECT pg_reload_conf()")
        log_path = cluster.log_file

        def restore() -> None:
            cluster.psql("ALTER SYSTEM RESET log_statement")
            cluster.psql("SELECT pg_reload_conf()")
    else:
        server = request.getfixturevalue("mariadb_server")
        log_path = tmp_path / "general.log"
        server.sql(f"SET GLOBAL general_log_file = '{log_path}'")
        server.sql("SET GLOBAL general_log = 1")

        def restore() -> None:
            server.sql("SET GLOBAL general_log = 0")

    start = log_path.stat().st_size if log_path.exists() else 0
    try:
        ops = await setup_role(broker, target)
        await ops.db.RotateRoot(database_pb2.RotateRootRequest(name="main"))
        web = Api(broker, broker.identity(WORKLOAD_ID))
        creds = await web.db.IssueCredentials(database_pb2.IssueCredentialsRequest(role="app"))
        await ops.db.RotateRoot(database_pb2.RotateRootRequest(name="main"))
        assert await target.can_login(creds.username, creds.password)
    finally:
        restore()
    # The new admin password is in no log: read it back the way the broker does.
    service = broker.app.database
    record = await service.connection("main")
    from broker.database.connections import _password_aad

    admin_password = service.connections._open(record.sealed_password, _password_aad("main"))
    assert admin_password != target.password
    assert await target.can_login(target.admin, admin_password)
    logged = log_path.read_bytes()[start:].decode(errors="replace")
    if target.plugin == "postgresql":
        assert "ALTER ROLE CURRENT_USER PASSWORD 'SCRAM-SHA-256$4096:" in logged  # it was on
        assert creds.username in logged
        assert creds.password not in logged
    else:
        assert "SET PASSWORD = '*" in logged  # the log was on; the admin went as a hash
    assert admin_password not in logged


@pytest.mark.parametrize("iterations", [1, 4096])
async def test_scram_verifiers_of_any_cost_log_in(
    request: pytest.FixtureRequest, iterations: int
) -> None:
    """The verifier the broker computes is what PostgreSQL stores, at the configured cost
    (database.scram_iterations), and the plaintext password logs in against it."""
    import datetime as dt

    from broker.database.engine import NewUser, open_engine

    async with target_for("postgresql", request) as target:
        engine = open_engine(
            target.plugin, target.dsn, target.password, scram_iterations=iterations
        )
        try:
            user = NewUser(
                f"v_scram_{iterations}", "A" * 8 + "b" * 8 + "3" * 8,
                dt.datetime.now(dt.UTC) + dt.timedelta(hours=1),
            )  # fmt: skip
            await engine.create_user(target.template(target.creation), user)
            assert await target.can_login(user.username, user.password)
            assert not await target.can_login(user.username, user.password + "x")
            cluster = request.getfixturevalue("pg_cluster")
            stored = cluster.psql(
                f"SELECT rolpassword FROM pg_authid WHERE rolname = '{user.username}'"
            )
            assert f"SCRAM-SHA-256${iterations}:" in stored
            await engine.revoke_user(user.username)
        finally:
            await engine.close()


async def test_a_password_stored_in_a_dsn_before_the_fix_is_removed_at_start(
    broker: BrokerHarness, target: Target
) -> None:
    """A connection added before DSN passwords were refused keeps its password in storage;
    start-up (the reaper's recovery pass) removes it, and the connection keeps working with
    the sealed admin password."""
    ops = await setup_role(broker, target)
    quoted = urllib.parse.quote(target.password, safe="")
    sep = "&" if "?" in target.dsn else "?"
    legacy = f"{target.dsn}{sep}PassWord={quoted}"
    store = broker.app.storage.database()
    async with store._b.transaction(write=True) as tx:  # as an old broker would have stored it
        await tx.execute("UPDATE db_connections SET dsn = ? WHERE name = 'main'", legacy)
    shown = await ops.db.GetConnection(database_pb2.GetConnectionRequest(name="main"))
    assert target.password not in str(shown) and "PassWord=***" in shown.dsn  # redacted
    await broker.app.database.close()
    await broker.app.database.recover_all()
    record = await store.get_connection("main")
    assert record is not None and record.dsn == target.dsn
    web = Api(broker, broker.identity(WORKLOAD_ID))
    creds = await web.db.IssueCredentials(database_pb2.IssueCredentialsRequest(role="app"))
    assert await target.can_login(creds.username, creds.password)
