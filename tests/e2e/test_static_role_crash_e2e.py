"""A static-role rotation survives a real `kill -9` at every step (issue 12): `broker serve
--dev` as a subprocess, started with the test-only hook `BROKER_TEST_CRASH_AT=<step>`
(broker/database/static.py), sends itself SIGKILL right after the intent is written, after the
database took the new password, and after the new password was stored. The broker is started
again without the hook; afterwards, on real PostgreSQL and MariaDB, no rotation is left in
flight, the password the broker hands out is the one the database takes (the owner logs in
with it), the one before no longer works once the rotation reached the database, and the next
rotation works. The same holds for a kill while a role is being added (its first rotation)."""

from __future__ import annotations

import datetime as dt
import secrets
import signal
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from broker.database.engine import NewUser
from broker.database.static import CRASH_STEPS
from tests.fixtures.dbtargets import Target, target_for

from .conftest import BrokerCli, BrokerProcess

pytestmark = pytest.mark.e2e


@pytest.fixture(params=["postgresql", "mysql"])
async def target(request: pytest.FixtureRequest) -> AsyncIterator[Target]:
    async with target_for(request.param, request) as value:
        yield value


@pytest.fixture
def server(tmp_path: Path) -> Iterator[BrokerProcess]:
    process = BrokerProcess(tmp_path / "data", tmp_path)
    process.start()
    try:
        yield process
    finally:
        process.ensure_stopped()


async def test_kill_9_at_every_step_of_a_static_role_rotation(
    server: BrokerProcess, target: Target, tmp_path: Path
) -> None:
    cli = BrokerCli(server, tmp_path)
    suffix = f"{target.plugin[:2]}{int(time.time() * 1000) % 10**8}"
    connection, role = f"k{suffix}", f"r{suffix}"
    username = f"crash_{secrets.token_hex(4)}"
    engine = target.engine()
    try:
        await engine.create_user(
            target.template(target.creation.replace(" VALID UNTIL {{expiration}}", "")),
            NewUser(username, "known-before-1", dt.datetime.now(dt.UTC) + dt.timedelta(days=9)),
        )
    finally:
        await engine.close()
    password_file = tmp_path / "admin-password"
    password_file.write_text(target.password + "\n")
    password_file.chmod(0o600)
    cli.ok(
        "db", "connection", "add", connection, "--plugin", target.plugin, "--dsn", target.dsn,
        "--password-file", str(password_file),
    )  # fmt: skip
    # Killed while adding the role (its first rotation reached the database): the restarted
    # broker finishes it, and the password a person knew is gone.
    assert server.stop() == 0, server.stderr_text()
    server.env = {"BROKER_TEST_CRASH_AT": "database-set"}
    server.start()
    add = ("db", "static-role", "add", role, "--connection", connection, "--username", username)
    assert cli.run(*add).returncode != 0
    assert server.wait_exit() == -signal.SIGKILL, server.stderr_text()
    server.env = {}
    server.start()
    shown = cli.ok("db", "static-role", "show", role, "--output", "json").json()
    assert (shown["version"], shown["rotation_in_flight"]) == (1, False)
    before = cli.ok("db", "static-creds", role, "--output", "json").json()
    assert before["version"] == 1
    assert await target.can_login(username, before["password"])
    assert not await target.can_login(username, "known-before-1")

    for step in CRASH_STEPS:
        assert server.stop() == 0, server.stderr_text()
        server.env = {"BROKER_TEST_CRASH_AT": step}
        server.start()
        cut = cli.run(
            "db", "static-role", "rotate", role, "--reason", "personnel-change", "--ticket", "T-1"
        )  # fmt: skip
        assert server.wait_exit() == -signal.SIGKILL, f"{step}: {server.stderr_text()}"
        assert cut.returncode != 0, f"{step}: the client saw the broker die: {cut.describe()}"
        # Where it died: before the database call the old password still works; after it,
        # only the new one (which only the intent knows) does.
        reached_database = step != "intent-written"
        assert await target.can_login(username, before["password"]) is not reached_database

        server.env = {}
        server.start()
        shown = cli.ok("db", "static-role", "show", role, "--output", "json").json()
        assert shown["rotation_in_flight"] is False, f"{step}: settled at startup"
        assert shown["version"] == before["version"] + 1, f"{step}: rolled forward"
        after = cli.ok("db", "static-creds", role, "--output", "json").json()
        assert after["version"] == shown["version"]
        assert after["password"] != before["password"]
        assert await target.can_login(username, after["password"]), (
            f"{step}: the stored password and the database's agree"
        )
        assert not await target.can_login(username, before["password"]), step
        before = after

    rotated = cli.ok(
        "db", "static-role", "rotate", role, "--reason", "scheduled", "--ticket", "T-2"
    )  # fmt: skip
    assert f"version {before['version'] + 1}" in rotated.stdout
    final = cli.ok("db", "static-creds", role, "--output", "json").json()
    assert await target.can_login(username, final["password"])
    cli.ok("db", "static-role", "delete", role)
    cli.ok("db", "connection", "remove", connection)
    assert server.stop() == 0, server.stderr_text()
