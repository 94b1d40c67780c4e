"""`broker serve --config`: the production path, with PostgreSQL storage and the CA keys in a
SoftHSM2 token, driven through the CLI like an operator would."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit

import pytest

from tests.e2e.conftest import BrokerCli, BrokerProcess, _child_env
from tests.fixtures.postgres import PgCluster
from tests.fixtures.softhsm import SoftHsmToken

pytestmark = pytest.mark.e2e

TD = "prod.example"
OPERATOR = f"spiffe://{TD}/broker/operator/alice"


def _config(tmp: Path, dsn: str, token: SoftHsmToken) -> Path:
    parts = urlsplit(dsn)
    password_file = tmp / "db-password"
    password_file.write_text(parts.password or "")
    password_file.chmod(0o600)
    bare = parts._replace(netloc=f"{parts.username}@{parts.hostname}:{parts.port}").geturl()
    path = tmp / "broker.toml"
    path.write_text(
        f"""
trust_domain = "{TD}"
data_dir = "{tmp / "data"}"

[storage]
dsn = "{bare}"
password_file = "{password_file}"

[keys]
uri = "pkcs11:token={token.token_label}?module-path={token.module_path}"
pin_source = "file:{token.pin_file}"

[ca]
issuing_ttl = "168h"

[server]
operators = ["{OPERATOR}"]
rate_limit_rps = 1000
"""
    )
    return path


@pytest.fixture(scope="module")
def prod(
    tmp_path_factory: pytest.TempPathFactory, pg_cluster: PgCluster, softhsm_env: object
) -> Iterator[tuple[BrokerProcess, Path, SoftHsmToken]]:
    tmp = tmp_path_factory.mktemp("prod")
    token = softhsm_env.new_token()  # type: ignore[attr-defined]
    config = _config(tmp, pg_cluster.create_database("broker_prod"), token)
    server = BrokerProcess(
        tmp / "data", tmp, ["--config", str(config)], {"SOFTHSM2_CONF": str(token.conf_path)}
    )
    server.start()
    try:
        yield server, config, token
        assert server.stop() == 0, server.stderr_text()
    finally:
        server.ensure_stopped()


def test_production_config_serves_from_postgres_and_the_hsm(
    prod: tuple[BrokerProcess, Path, SoftHsmToken], tmp_path: Path
) -> None:
    server, _, token = prod
    assert "storage: postgresql" in server.listening_line
    cli = BrokerCli(server, tmp_path)
    status = cli.ok("ca", "status", "--output", "json").json()
    assert status["trust_domain"] == TD
    assert status["storage"] == "postgresql"
    assert status["key_backend"].startswith(f"pkcs11 token={token.token_label}")
    assert all(a["key_uri"].startswith("pkcs11:token=") for a in status["authorities"])
    out = tmp_path / "svid"
    # One operator alone mints non-production identities; a prod one needs a second operator.
    refused = cli.run("svid", "mint", "--spiffe-id", f"spiffe://{TD}/acme/prod/web", "--out", "x")
    assert refused.returncode != 0 and "second operator" in refused.stderr, refused.describe()
    cli.ok("svid", "mint", "--spiffe-id", f"spiffe://{TD}/acme/dev/web", "--out", str(out))
    assert (out / "key.pem").stat().st_mode & 0o777 == 0o600
    cli.ok("audit", "verify")
    events = [e["event"] for e in cli.ok("audit", "tail", "--output", "json").json()]
    mints = [e for e in events if e["what"] == "svid.mint"]
    assert mints and mints[-1]["who"] == OPERATOR and mints[-1]["outcome"] == "OK"


def test_restart_keeps_the_ca(
    prod: tuple[BrokerProcess, Path, SoftHsmToken], tmp_path: Path
) -> None:
    server, _, _ = prod
    cli = BrokerCli(server, tmp_path)
    before = cli.ok("ca", "status", "--output", "json").json()["root"]["fingerprint_sha256"]
    assert server.stop() == 0
    server.start()
    after = cli.ok("ca", "status", "--output", "json").json()["root"]["fingerprint_sha256"]
    assert before == after


def test_config_with_an_inline_password_is_refused_in_one_line(
    prod: tuple[BrokerProcess, Path, SoftHsmToken], tmp_path: Path
) -> None:
    _, config, _ = prod
    bad = tmp_path / "bad.toml"
    text = config.read_text()
    dsn_line = next(line for line in text.splitlines() if line.startswith("dsn = "))
    inline = dsn_line.replace("postgresql://", "postgresql://broker:hunter2@", 1).replace(
        urlsplit(dsn_line[7:-1]).username + "@", "", 1
    )
    bad.write_text(text.replace(dsn_line, inline))
    done = subprocess.run(
        [sys.executable, "-m", "broker.cli", "serve", "--config", str(bad)],
        capture_output=True,
        text=True,
        env=_child_env({}),
        timeout=60,
        check=False,
    )
    assert done.returncode != 0
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    assert "must not contain a password" in lines[0]
    assert "hunter2" not in done.stderr


BASE = """
trust_domain = "example.org"
data_dir = "data"
[storage]
dsn = "sqlite:///{tmp}/broker.db"
[keys]
uri = "software:path={tmp}/keys"
pin_source = "env:BROKER_TEST_PIN"
[server]
listen = "127.0.0.1:0"
operators = ["spiffe://example.org/broker/operator/alice"]
"""


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (("[server]", "[server]\nrate_limit_rps = -5"), "rate_limit_rps must be a number"),
        (("[server]", "[server]\nrate_limit_rps = nan"), "rate_limit_rps must be a number"),
        (("[keys]", '[ca]\nroot_ttl = "1s"\n[keys]'), "ca.root_ttl must be"),
        (('uri = "software:path={tmp}/keys"', 'uri = "software:"'), "in memory"),
        (
            ("[server]", '[identity]\ntemplate = "{{tenant}}/{{environment}}"\n[server]'),
            "{service}",
        ),
        (("[server]", f'[identity]\ntemplate = "{"a/" * 40}"\n[server]'), "too long"),
        (("sqlite:///{tmp}/broker.db", "postgresql://u@db/x?PASSWORD=hunter2"), "password"),
    ],
)
def test_bad_config_exits_at_once_in_one_line(
    tmp_path: Path, change: tuple[str, str], message: str
) -> None:
    """Issue 20 finding 14: these were accepted, or (a bad identity template) printed an error
    and then hung; now `serve` exits non-zero at once with one line."""
    text = BASE.replace(*change).replace("{tmp}", str(tmp_path))
    text = text.replace("{{", "{").replace("}}", "}")
    config = tmp_path / "broker.toml"
    config.write_text(text)
    done = subprocess.run(
        [sys.executable, "-m", "broker.cli", "serve", "--config", str(config)],
        capture_output=True,
        text=True,
        env=_child_env({"BROKER_TEST_PIN": "123456"}),
        timeout=60,
        check=False,
    )
    assert done.returncode == 1, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("broker: config: "), done.stderr
    assert message in lines[0]
    assert "hunter2" not in done.stderr
    assert not (tmp_path / "broker.db").exists()
