"""A broker replica older than the shared database's schema (another replica, upgraded first,
has migrated it) refuses to start, in one line, and changes nothing (issue 19, "a replica
started against a schema newer than its code")."""

from __future__ import annotations

import asyncio
import subprocess
import sys
from pathlib import Path
from urllib.parse import urlsplit

import asyncpg
import pytest

from broker.storage.factory import open_storage
from broker.storage.sql import latest_version
from tests.e2e.conftest import _child_env
from tests.fixtures.postgres import PgCluster

pytestmark = [pytest.mark.e2e, pytest.mark.postgres]


async def _migrate_then_from_the_future(dsn: str, version: int) -> None:
    storage = await open_storage(dsn)
    try:
        await storage.migrate()
    finally:
        await storage.close()
    conn = await asyncpg.connect(dsn)
    try:
        await conn.execute(
            "INSERT INTO schema_migrations (version, name, applied_at) "
            "SELECT $1::int, 'from_a_newer_replica', applied_at FROM schema_migrations "
            "WHERE version = 1",
            version,
        )
    finally:
        await conn.close()


async def _versions(dsn: str) -> list[int]:
    conn = await asyncpg.connect(dsn)
    try:
        return [r[0] for r in await conn.fetch("SELECT version FROM schema_migrations ORDER BY 1")]
    finally:
        await conn.close()


def test_an_older_replica_refuses_a_newer_schema_in_one_line(
    pg_cluster: PgCluster, tmp_path: Path
) -> None:
    _, dsn = pg_cluster.fresh_database()
    newer = latest_version("postgresql") + 1
    asyncio.run(_migrate_then_from_the_future(dsn, newer))
    before = asyncio.run(_versions(dsn))
    parts = urlsplit(dsn)
    password_file = tmp_path / "db-password"
    password_file.write_text(parts.password or "")
    password_file.chmod(0o600)
    bare = parts._replace(netloc=f"{parts.username}@{parts.hostname}:{parts.port}").geturl()
    config = tmp_path / "broker.toml"
    config.write_text(
        f"""
trust_domain = "example.org"
data_dir = "{tmp_path / "data"}"
[storage]
dsn = "{bare}"
password_file = "{password_file}"
[keys]
uri = "software:path={tmp_path}/keys"
pin_source = "env:BROKER_TEST_PIN"
[server]
listen = "127.0.0.1:0"
operators = ["spiffe://example.org/broker/operator/alice"]
"""
    )
    done = subprocess.run(
        [sys.executable, "-m", "broker.cli", "serve", "--config", str(config)],
        capture_output=True,
        text=True,
        env=_child_env({"BROKER_TEST_PIN": "123456"}),
        timeout=120,
        check=False,
    )
    assert done.returncode != 0, done.stderr
    # The refusal is one line; the structured log (JSON lines, already started) may precede it.
    lines = [line for line in done.stderr.strip().splitlines() if not line.startswith("{")]
    assert len(lines) == 1 and lines[0].startswith("broker: "), done.stderr
    assert f"schema is at version {newer}" in lines[0] and "upgrade the broker" in lines[0]
    assert "Traceback" not in done.stderr
    assert (parts.password or "-") not in done.stderr
    assert asyncio.run(_versions(dsn)) == before
