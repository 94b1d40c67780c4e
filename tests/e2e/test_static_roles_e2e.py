"""Static database roles from the CLI, against `broker serve --dev` as a subprocess and the
throwaway PostgreSQL cluster and MariaDB server: a personnel-change rotation (`broker revoke
--owner ... --reason personnel-change`, and `db static-role rotate`) while an application
session keeps working (issue 12, "done means" (c))."""

from __future__ import annotations

import asyncio
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


class Application:
    """A small application with a connection pool over a static role: every query borrows a
    session; a session is recycled after `max_uses` queries (as a pool's max lifetime does)
    and the new one logs in with the credentials fetched at that moment through
    `broker db static-creds` (a stale password -- fetched just before a rotation landed -- is
    fetched again once, as a client of Vault static roles does). One session opened at the
    start is never recycled: an existing session must stay usable."""

    def __init__(self, cli: BrokerCli, target: Target, role: str, size: int = 3) -> None:
        self.cli, self.target, self.role, self.size = cli, target, role, size
        self.max_uses = 4
        self.queries = 0
        self.failed_queries: list[str] = []
        self.logins: list[int] = []  # the version each new session logged in with
        self.stale_logins = 0
        self.pinned: object = None
        self.pool: list[tuple[object, int]] = []  # (session, uses)

    async def _creds(self) -> dict[str, object]:
        result = await asyncio.to_thread(
            self.cli.ok, "db", "static-creds", self.role, "--output", "json"
        )
        return dict(result.json())

    async def _connect(self) -> object:
        for _ in range(2):
            creds = await self._creds()
            try:
                session = await self.target.login(str(creds["username"]), str(creds["password"]))
            except Exception:  # authentication failed: a rotation landed since the fetch
                self.stale_logins += 1
                continue
            self.logins.append(int(str(creds["version"])))
            return session
        raise AssertionError("could not log in with freshly fetched credentials")

    async def start(self) -> None:
        self.pinned = await self._connect()
        self.pool = [(await self._connect(), 0) for _ in range(self.size)]

    async def query(self, slot: int) -> None:
        session, uses = self.pool[slot]
        if uses >= self.max_uses:
            await self.target.close_session(session)
            session, uses = await self._connect(), 0
        self.queries += 1
        if not await self.target.alive(session):
            self.failed_queries.append(f"pooled session, query {self.queries}")
        self.pool[slot] = (session, uses + 1)
        if not await self.target.alive(self.pinned):
            self.failed_queries.append(f"long-lived session, query {self.queries}")

    async def run_until(self, done: asyncio.Event, extra_rounds: int) -> None:
        slot = 0
        while not done.is_set() or extra_rounds > 0:
            if done.is_set():
                extra_rounds -= 1
            await self.query(slot)
            slot = (slot + 1) % self.size

    async def close(self) -> None:
        for session, _ in self.pool:
            await self.target.close_session(session)
        if self.pinned is not None:
            await self.target.close_session(self.pinned)


async def test_an_application_pool_keeps_working_through_a_personnel_change_rotation(
    broker_cli: BrokerCli, target: Target, tmp_path: Path
) -> None:
    cli = broker_cli
    suffix = f"{target.plugin[:2]}{int(time.time() * 1000) % 10**8}"
    connection, role = f"p{suffix}", f"a{suffix}"
    username = f"pool_{secrets.token_hex(4)}"
    engine = target.engine()
    try:
        await engine.create_user(
            target.template(target.creation.replace(" VALID UNTIL {{expiration}}", "")),
            NewUser(username, "known-to-a-person-2", dt.datetime.now(dt.UTC) + dt.timedelta(9)),
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
    cli.ok("db", "static-role", "add", role, "--connection", connection, "--username", username)
    app = Application(cli, target, role)
    await app.start()
    try:
        done = asyncio.Event()
        working = asyncio.create_task(app.run_until(done, extra_rounds=3 * app.max_uses + 3))
        while app.queries < 2 * app.size:  # the application is busy before the rotation
            await asyncio.sleep(0.05)
        rotated = await asyncio.to_thread(
            cli.ok, "db", "static-role", "rotate", role, "--reason", "personnel-change",
            "--ticket", "HR-11",
        )  # fmt: skip
        done.set()
        await asyncio.wait_for(working, timeout=300)
    finally:
        await app.close()
    assert "version 2" in rotated.stdout
    assert app.failed_queries == [], "no query failed through the rotation"
    assert app.logins[0] == 1 and app.logins[-1] == 2, app.logins
    assert app.logins.count(2) >= app.size, "every pooled session was reopened on the new password"
    assert app.queries > 3 * app.max_uses
    current = cli.ok("db", "static-creds", role, "--output", "json").json()
    assert current["version"] == 2
    assert not await target.can_login(username, "known-to-a-person-2")
    cli.ok("db", "static-role", "delete", role)
    cli.ok("db", "connection", "remove", connection)
