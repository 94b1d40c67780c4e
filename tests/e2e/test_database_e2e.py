"""Dynamic database credentials from the CLI, against `broker serve --dev` as a subprocess and
the throwaway PostgreSQL cluster and MariaDB server; and crash recovery: kill -9 the broker
while leases are live and being created, restart it, and check that no database user outlives
its lease and none is orphaned."""

from __future__ import annotations

import contextlib
import datetime as dt
import sqlite3
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from tests.fixtures.dbtargets import Target, target_for

from .conftest import BrokerCli, BrokerProcess, _child_env

pytestmark = pytest.mark.e2e

PLUGINS = ["postgresql", "mysql"]
CREDS_KEYS = {"username", "password", "lease_id", "lease_duration", "renewable", "expires_at"}
# Creation that leaves the user in place for a while before finishing (MySQL commits the
# CREATE USER at once): a crash in that window leaves a user behind a pending lease.
SLOW_CREATION = {
    "postgresql": "CREATE ROLE {{name}} WITH LOGIN PASSWORD {{password}} "
    "VALID UNTIL {{expiration}};\nSELECT pg_sleep(3);\nGRANT SELECT ON items TO {{name}};",
    "mysql": "CREATE USER {{name}}@'%' IDENTIFIED BY {{password}};\nDO SLEEP(3);\n"
    "GRANT SELECT ON {db}.items TO {{name}}@'%';",
}
WAIT = 45.0  # upper bound for anything the reaper must do after a restart


@pytest.fixture(params=PLUGINS)
async def target(request: pytest.FixtureRequest) -> AsyncIterator[Target]:
    async with target_for(request.param, request) as value:
        yield value


def _files(tmp_path: Path, target: Target, creation: str) -> tuple[Path, Path]:
    password = tmp_path / "admin-password"
    password.write_text(target.password + "\n")
    password.chmod(0o600)
    statements = tmp_path / "creation.sql"
    statements.write_text(target.sql(creation))
    return password, statements


async def test_cli_end_to_end(broker_cli: BrokerCli, target: Target, tmp_path: Path) -> None:
    cli = broker_cli
    password_file, creation = _files(tmp_path, target, target.creation)
    name = f"c{target.plugin[:2]}{int(time.time() * 1000) % 10**8}"
    role = f"r{name}"
    added = cli.ok(
        "db",
        "connection",
        "add",
        name,
        "--plugin",
        target.plugin,
        "--dsn",
        target.dsn,
        "--password-file",
        str(password_file),
        "--output",
        "json",
    ).json()
    assert added["name"] == name and added["dsn"] == target.dsn
    shown = cli.ok("db", "connection", "show", name, "--output", "json")
    listed = cli.ok("db", "connection", "list", "--output", "json")
    for out in (shown.stdout, listed.stdout, cli.ok("db", "connection", "show", name).stdout):
        assert target.password not in out
    cli.ok(
        "db",
        "role",
        "add",
        role,
        "--connection",
        name,
        "--creation-statements",
        str(creation),
        "--default-ttl",
        "10m",
        "--max-ttl",
        "1h",
    )
    assert cli.ok("db", "role", "show", role, "--output", "json").json()["max_ttl"] == 3600

    creds = cli.ok("db", "creds", role, "--ttl", "5m", "--output", "json").json()
    assert set(creds) == CREDS_KEYS
    assert creds["lease_duration"] == 300 and creds["renewable"] is True
    assert creds["lease_id"].startswith(f"db/{role}/")
    assert dt.datetime.fromisoformat(creds["expires_at"].replace("Z", "+00:00")) > dt.datetime.now(
        dt.UTC
    )
    assert await target.can_login(creds["username"], creds["password"])

    leases = cli.ok("lease", "list", "--output", "json").json()
    assert creds["lease_id"] in [lease["lease_id"] for lease in leases]
    renewed = cli.ok(
        "lease", "renew", creds["lease_id"], "--increment", "5h", "--output", "json"
    ).json()
    assert renewed["renewable"] is False and renewed["lease_duration"] <= 3600

    too_long = cli.run("db", "creds", role, "--ttl", "2h")
    assert too_long.returncode == 1
    assert too_long.stderr_lines == [
        f"broker: invalid argument: requested TTL 7200s exceeds the max TTL 3600s of role '{role}'"
    ]
    unknown = cli.run("db", "creds", "no-such-role")
    assert unknown.returncode == 1 and len(unknown.stderr_lines) == 1
    assert unknown.stderr.startswith("broker: not found")
    usage = cli.run(
        "db",
        "connection",
        "add",
        "x",
        "--plugin",
        "oracle",
        "--dsn",
        "x",
        "--password-file",
        str(password_file),
    )
    assert usage.returncode == 2 and len(usage.stderr_lines) == 1

    session = await target.login(creds["username"], creds["password"])
    cli.ok("lease", "revoke", creds["lease_id"])
    try:
        assert not await target.alive(session)
    finally:
        await target.close_session(session)
    assert not await target.exists(creds["username"])
    again = cli.run("lease", "revoke", creds["lease_id"])
    assert again.returncode == 1 and again.stderr.startswith("broker: not found")

    cli.ok("db", "connection", "rotate-root", name)
    assert not await target.can_login(target.admin, target.password)
    more = [cli.ok("db", "creds", role, "--output", "json").json() for _ in range(2)]
    for item in more:
        assert await target.can_login(item["username"], item["password"])
    out = cli.ok("lease", "revoke", "--prefix", f"db/{role}/", "--output", "json").json()
    assert out == {"revoked": 2, "errors": []}
    for item in more:
        assert not await target.exists(item["username"])
    cli.ok("db", "role", "remove", role)
    cli.ok("db", "connection", "remove", name)
    assert name not in cli.ok("db", "connection", "list").stdout

    tail = cli.ok("audit", "tail", "-n", "200", "--output", "json").stdout
    assert creds["lease_id"] in tail
    assert creds["password"] not in tail and target.password not in tail


# -- crash recovery ---------------------------------------------------------------------------


@pytest.fixture
def crash_broker(tmp_path: Path) -> Iterator[BrokerProcess]:
    server = BrokerProcess(
        tmp_path / "data",
        tmp_path,
        env={"BROKER_DB_CREATION_TIMEOUT": "6s", "BROKER_DB_REAPER_INTERVAL": "200ms"},
    )
    server.start()
    try:
        yield server
    finally:
        server.ensure_stopped()


def _leases(server: BrokerProcess) -> list[tuple[str, str, str, int]]:
    """(id, username, state, expires_at µs) straight from the broker's SQLite file."""
    with contextlib.closing(sqlite3.connect(server.data_dir / "broker.db", timeout=10)) as db:
        return db.execute("SELECT id, username, state, expires_at FROM db_leases").fetchall()


def _now_us() -> int:
    return int(time.time() * 1_000_000)


async def test_kill_9_while_leases_are_live_and_being_created(
    crash_broker: BrokerProcess, target: Target, tmp_path: Path
) -> None:
    server = crash_broker
    cli = BrokerCli(server, tmp_path)
    password_file, creation = _files(tmp_path, target, target.creation)
    slow = tmp_path / "slow.sql"
    slow.write_text(target.sql(SLOW_CREATION[target.plugin]))
    cli.ok(
        "db",
        "connection",
        "add",
        "main",
        "--plugin",
        target.plugin,
        "--dsn",
        target.dsn,
        "--password-file",
        str(password_file),
    )
    role = f"crash{target.plugin[:2]}"
    cli.ok(
        "db",
        "role",
        "add",
        role,
        "--connection",
        "main",
        "--creation-statements",
        str(creation),
        "--max-ttl",
        "1h",
    )
    cli.ok(
        "db",
        "role",
        "add",
        f"{role}slow",
        "--connection",
        "main",
        "--creation-statements",
        str(slow),
        "--max-ttl",
        "1h",
    )
    short = [
        cli.ok("db", "creds", role, "--ttl", "3s", "--output", "json").json() for _ in range(2)
    ]
    long = [cli.ok("db", "creds", role, "--ttl", "1h", "--output", "json").json() for _ in range(2)]

    # Requests in flight on the slow role, then kill -9 while their leases are pending.
    env = _child_env({"BROKER_ADDR": server.address, "BROKER_DATA_DIR": str(server.data_dir)})
    inflight = [
        subprocess.Popen(
            [sys.executable, "-m", "broker.cli", "db", "creds", f"{role}slow", "--ttl", "1h"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            env=env,
            cwd=tmp_path,
        )
        for _ in range(4)
    ]
    try:
        deadline = time.monotonic() + WAIT
        while not any(state == "pending" for _, _, state, _ in _leases(server)):
            assert time.monotonic() < deadline, "no creation got under way"
            time.sleep(0.05)
        if target.plugin == "mysql":  # wait until one such user really exists
            while not await target.users_like(f"v_{role}slow_"):
                assert time.monotonic() < deadline, "no slow user was created"
                time.sleep(0.05)
        server._kill()  # SIGKILL: no cleanup of any kind
    finally:
        for process in inflight:
            process.wait(timeout=60)
    pending = [row for row in _leases(server) if row[2] == "pending"]
    assert pending, "the crash should have left pending leases"
    orphans_before = await target.users_like(f"v_{role}slow_")

    server.start()
    deadline = time.monotonic() + WAIT
    while True:
        rows = _leases(server)
        unsettled = [r for r in rows if r[2] != "active" or r[3] <= _now_us()]
        users = set(await target.users_like(f"v_{role}"))
        if not unsettled and users == {r[1] for r in rows}:
            break
        assert time.monotonic() < deadline, (
            f"after restart: leases {rows}, users {sorted(users)}, "
            f"orphans before restart {orphans_before}\n{server.stderr_text()[-3000:]}"
        )
        time.sleep(0.2)
    # Every user that exists has an active, unexpired lease; the short ones are gone.
    assert {r[1] for r in rows} == {c["username"] for c in long}
    for item in short:
        assert not await target.exists(item["username"])
    for item in long:
        assert await target.can_login(item["username"], item["password"])
    cli.ok("lease", "revoke", "--prefix", "db/")
    assert await target.users_like(f"v_{role}") == []
    assert _leases(server) == []
    assert server.stop() == 0


async def test_cli_refuses_a_password_in_the_dsn(
    broker_cli: BrokerCli, target: Target, tmp_path: Path
) -> None:
    """Issue 20 finding 8 from the CLI: `--dsn "...?password=..."` (any case, encoded, in the
    user part) is refused with one line on stderr; nothing is added, shown or stored."""
    import urllib.parse

    cli = broker_cli
    password_file, _ = _files(tmp_path, target, target.creation)
    quoted = urllib.parse.quote(target.password, safe="")
    sep = "&" if "?" in target.dsn else "?"
    user = urllib.parse.urlsplit(target.dsn).username or ""
    forms = [
        f"{target.dsn}{sep}password={quoted}",
        f"{target.dsn}{sep}PassWord={quoted}",
        f"{target.dsn}{sep}pass%77ord={quoted}",
        target.dsn.replace(f"{user}@", f"{user}:{quoted}@", 1),
    ]
    name = f"smuggled{target.plugin[:2]}"
    for dsn in forms:
        result = cli.run(
            "db", "connection", "add", name, "--plugin", target.plugin, "--dsn", dsn,
            "--password-file", str(password_file),
        )  # fmt: skip
        assert result.returncode != 0, result.describe()
        assert len(result.stderr_lines) == 1, result.describe()
        assert "must not carry a password" in result.stderr
        assert target.password not in result.stdout + result.stderr
    listed = cli.ok("db", "connection", "list", "--output", "json").json()
    assert name not in [c["name"] for c in listed]
    data = cli.server.data_dir
    for file in ("broker.db", "broker.db-wal"):
        if (data / file).exists():
            assert target.password.encode() not in (data / file).read_bytes()
