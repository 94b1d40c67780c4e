"""Secrets on the production path: `broker serve --config` with PostgreSQL storage and the KEKs
in a SoftHSM2 token, driven through the CLI; values survive a restart and a KEK rotation, and no
PostgreSQL table holds them in plaintext."""

from __future__ import annotations

import asyncio
import secrets as random
from collections.abc import Iterator
from pathlib import Path

import asyncpg
import pytest

from tests.e2e.conftest import BrokerCli, BrokerProcess
from tests.e2e.test_serve_config import _config
from tests.fixtures.postgres import PgCluster
from tests.fixtures.softhsm import SoftHsmToken

pytestmark = pytest.mark.e2e

REF = "secret://payments/prod/stripe/api-key"


@pytest.fixture(scope="module")
def prod_secrets(
    tmp_path_factory: pytest.TempPathFactory, pg_cluster: PgCluster, softhsm_env: object
) -> Iterator[tuple[BrokerProcess, str, SoftHsmToken]]:
    tmp = tmp_path_factory.mktemp("prod-secrets")
    token = softhsm_env.new_token()  # type: ignore[attr-defined]
    dsn = pg_cluster.create_database("broker_secrets")
    server = BrokerProcess(
        tmp / "data",
        tmp,
        ["--config", str(_config(tmp, dsn, token))],
        {"SOFTHSM2_CONF": str(token.conf_path)},
    )
    server.start()
    try:
        yield server, dsn, token
        assert server.stop() == 0, server.stderr_text()
    finally:
        server.ensure_stopped()


async def _dump(dsn: str) -> bytes:
    conn = await asyncpg.connect(dsn)
    try:
        tables = [
            r[0]
            for r in await conn.fetch(
                "SELECT tablename FROM pg_tables WHERE schemaname = current_schema()"
            )
        ]
        assert {"secrets", "secret_versions"} <= set(tables)
        rows = []
        for table in tables:
            rows += [r[0] for r in await conn.fetch(f'SELECT t::text FROM "{table}" t')]
        return "\n".join(rows).encode()
    finally:
        await conn.close()


def test_secrets_on_postgresql_and_the_hsm(
    prod_secrets: tuple[BrokerProcess, str, SoftHsmToken], tmp_path: Path
) -> None:
    server, dsn, _ = prod_secrets
    cli = BrokerCli(server, tmp_path)
    value = f"sk_prod_{random.token_hex(16)}".encode()
    (tmp_path / "value").write_bytes(value)
    cli.ok(
        "secrets", "put", REF, "--value-file", str(tmp_path / "value"), "--owner", "payments",
        "--classification", "confidential", "--rotation-period", "90d", "--tenant", "acme",
    )  # fmt: skip
    # A person reading a prod secret says why (secrets.justification_required, issue 20).
    unjustified = cli.run("secrets", "get", REF, "--tenant", "acme")
    assert unjustified.returncode == 1 and len(unjustified.stderr_lines) == 1
    assert "justification is required" in unjustified.stderr_lines[0]
    read = ("secrets", "get", REF, "--tenant", "acme", "--justification", "INC-1 verify")
    assert cli.ok(*read).stdout == value.decode()

    assert server.stop() == 0
    server.start()  # the KEK lives in the token, the blob in PostgreSQL
    assert cli.ok(*read).stdout == value.decode()

    [rotation] = cli.ok("kek", "rotate", "--tenant", "acme", "--output", "json").json()
    assert rotation["destroyed"] == ["kek.acme.1"] and rotation["rewrapped"] == 1
    assert cli.ok(*read).stdout == value.decode()

    dump = asyncio.run(_dump(dsn))
    assert value not in dump and value.hex().encode() not in dump
    assert b"kek.acme.2" in dump  # what is there: the label of the KEK, the wrapped key
