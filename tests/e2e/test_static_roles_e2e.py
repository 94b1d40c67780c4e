"""Static database roles from the CLI, against `broker serve --dev` as a subprocess and the
throwaway PostgreSQL cluster and MariaDB server: a personnel-change rotation (`broker revoke
--owner ... --reason personnel-change`, and `db static-role rotate`) while an application
session keeps working (issue 12, "done means" (c))."""

from __future__ import annotations

import datetime as dt
import secrets
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from broker.database.engine import NewUser
from tests.fixtures.dbtargets import Target, target_for

from .conftest import BrokerCli

pytestmark = pytest.mark.e2e

KEYS = {"username", "password", "version", "next_rotation_at"}


@pytest.fixture(params=["postgresql", "mysql"])
async def target(request: pytest.FixtureRequest) -> AsyncIterator[Target]:
    async with target_for(request.param, request) as value:
        yield value


async def test_personnel_change_rotation_while_the_application_works(
    broker_cli: BrokerCli, target: Target, tmp_path: Path
) -> None:
    cli = broker_cli
    suffix = f"{target.plugin[:2]}{int(time.time() * 1000) % 10**8}"
    connection, role, owner = f"c{suffix}", f"s{suffix}", f"svc{suffix}"
    username, known = f"app_{secrets.token_hex(4)}", "known-to-a-person-1"
    engine = target.engine()
    try:
        await engine.create_user(
            target.template(target.creation.replace(" VALID UNTIL {{expiration}}", "")),
            NewUser(username, known, dt.datetime.now(dt.UTC) + dt.timedelta(days=9)),
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
    added = cli.ok(
        "db", "static-role", "add", role, "--connection", connection, "--username", username,
        "--rotation-period", "30d", "--owner", owner, "--output", "json",
    ).json()  # fmt: skip
    assert added["version"] == 1 and added["rotation_period"] == 30 * 86400
    assert not await target.can_login(username, known)

    first = cli.ok("db", "static-creds", role, "--output", "json").json()
    assert set(first) == KEYS and first["username"] == username
    app = await target.login(username, first["password"])  # the application's session
    try:
        revoked = cli.ok(
            "revoke", "--owner", owner, "--reason", "personnel-change", "--ticket", "HR-9",
            "--output", "json",
        ).json()  # fmt: skip
        assert {"kind": "static-role", "id": role, "error": None} in revoked["objects"]
        second = cli.ok("db", "static-creds", role, "--output", "json").json()
        assert second["version"] == 2 and second["password"] != first["password"]
        assert await target.alive(app), "the application's open session keeps working"
        assert await target.can_login(username, second["password"])
        assert not await target.can_login(username, first["password"])

        rotated = cli.ok(
            "db", "static-role", "rotate", role, "--reason", "personnel-change", "--ticket", "HR-10"
        )  # fmt: skip
        assert "version 3" in rotated.stdout
        third = cli.ok("db", "static-creds", role, "--output", "json").json()
        assert await target.can_login(username, third["password"])
        assert await target.alive(app)
    finally:
        await target.close_session(app)

    shown = cli.ok("db", "static-role", "show", role).stdout
    assert third["password"] not in shown
    unknown = cli.run("db", "static-role", "rotate", "nope", "--reason", "x", "--ticket", "T")
    assert unknown.returncode == 1 and len(unknown.stderr_lines) == 1
    ghost = cli.run(
        "db", "static-role", "add", "ghost", "--connection", connection, "--username", "nobody_here"
    )
    assert ghost.returncode == 1 and ghost.stderr.startswith("broker: ")
    cli.ok("db", "static-role", "delete", role)
    cli.ok("db", "connection", "remove", connection)
