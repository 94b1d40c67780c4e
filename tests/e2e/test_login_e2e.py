"""`broker login` as a user runs it: `broker serve --config` with [operators] pointing at a
real OpenID provider (node oidc-provider), each CLI command its own subprocess, the browser
driven over HTTP. Code + PKCE on a loopback redirect, the device flow, --id-token-file; then
every client command uses the stored login, `login status`, `operator list|revoke`, and
`logout`, after which the old certificate no longer works."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.e2e.conftest import COMMAND_TIMEOUT, BrokerCli, BrokerProcess, CliResult, _child_env
from tests.fixtures.oidc_provider import Browser, OidcProvider, code_flow_token

TD = "example.org"


def _config(tmp: Path, issuer: str) -> Path:
    path = tmp / "broker.toml"
    path.write_text(
        f"""
trust_domain = "{TD}"
data_dir = "{tmp / "data"}"

[storage]
dsn = "sqlite:///{tmp / "broker.db"}"

[keys]
uri = "software:path={tmp / "keys"}"
pin_source = "env:BROKER_TEST_KEYS_PIN"

[server]
operators = ["spiffe://{TD}/broker/operator/bootstrap"]

[operators]
issuer = "{issuer}"
client_id = "broker-cli"
roles_claim = "groups"

[operators.roles]
admin = ["broker-admins"]
approver = ["broker-approvers"]
auditor = ["broker-auditors"]
security = ["broker-security"]
"""
    )
    return path


@pytest.fixture(scope="module")
def login_broker(
    tmp_path_factory: pytest.TempPathFactory, oidc_provider: OidcProvider
) -> Iterator[BrokerProcess]:
    tmp = tmp_path_factory.mktemp("login")
    (tmp / "keys").mkdir(mode=0o700)
    config = _config(tmp, oidc_provider.issuer)
    server = BrokerProcess(
        tmp / "data", tmp, ["--config", str(config)], {"BROKER_TEST_KEYS_PIN": "test-pin-1234"}
    )
    server.start()
    try:
        yield server
        assert server.stop() == 0, server.stderr_text()
    finally:
        server.ensure_stopped()


class Person:
    """One operator's shell: its own $BROKER_HOME, no --data-dir (so the login is used)."""

    def __init__(self, server: BrokerProcess, home: Path) -> None:
        self.server = server
        self.home = home
        self.bundle = str(server.data_dir / "bundle.pem")

    def env(self) -> dict[str, str]:
        return {"BROKER_ADDR": self.server.address, "BROKER_HOME": str(self.home)}

    def run(self, *args: str) -> CliResult:
        completed = subprocess.run(
            [sys.executable, "-m", "broker.cli", *args],
            capture_output=True,
            text=True,
            env=_child_env(self.env()),
            cwd=self.home,
            timeout=COMMAND_TIMEOUT,
            check=False,
        )
        return CliResult(tuple(args), completed.returncode, completed.stdout, completed.stderr)

    def ok(self, *args: str) -> CliResult:
        result = self.run(*args)
        assert result.returncode == 0, result.describe()
        return result

    def refused(self, *args: str) -> str:
        result = self.run(*args)
        assert result.returncode == 1, result.describe()
        lines = result.stderr_lines
        assert len(lines) == 1 and lines[0].startswith("broker: "), result.describe()
        return lines[0]

    def interactive(self, *args: str) -> subprocess.Popen[str]:
        return subprocess.Popen(
            [sys.executable, "-m", "broker.cli", *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            stdin=subprocess.DEVNULL,
            text=True,
            env=_child_env(self.env()),
            cwd=self.home,
        )


@pytest.fixture
def person_factory(login_broker: BrokerProcess, tmp_path: Path) -> Iterator[object]:
    made: list[Path] = []

    def make(name: str) -> Person:
        home = tmp_path / f"home-{name}"
        home.mkdir()
        made.append(home)
        return Person(login_broker, home)

    yield make
    for home in made:
        shutil.rmtree(home, ignore_errors=True)


def _finish(process: subprocess.Popen[str]) -> tuple[int, str, str]:
    out, err = process.communicate(timeout=COMMAND_TIMEOUT)
    return process.returncode, out, err


def test_code_flow_login_is_used_by_every_command_until_logout(
    person_factory: object, login_broker: BrokerProcess
) -> None:
    alice = person_factory("alice")  # type: ignore[operator]
    process = alice.interactive("login", "--bundle", alice.bundle)
    assert process.stderr is not None
    lines = [process.stderr.readline(), process.stderr.readline()]
    assert lines[0].startswith("Open this URL"), lines
    url = lines[1].strip()
    page = Browser().sign_in(url, "alice")  # the redirect lands on the CLI's loopback listener
    assert "Signed in" in page.body
    code, out, err = _finish(process)
    assert code == 0, err
    assert re.match(
        r"logged in as alice \(spiffe://example.org/broker/operator/alice\), roles admin, approver",
        out,
    )
    directory = alice.home / "operator"
    assert (directory / "svid.pem").is_file() and (directory / "bundle.pem").is_file()
    assert (directory / "key.pem").stat().st_mode & 0o777 == 0o600

    status = alice.ok("login", "status").stdout
    assert "subject:   alice" in status and "roles:     admin, approver" in status
    alice.ok("ca", "status")  # no --cert: the login is used
    tail = alice.ok("audit", "tail", "-n", "1", "--output", "json").json()
    assert tail[-1]["event"]["who"] == f"spiffe://{TD}/broker/operator/alice"
    listed = alice.ok("operator", "list", "--output", "json").json()
    assert [o["subject"] for o in listed] == ["alice"]

    saved = alice.home / "saved"
    shutil.copytree(directory, saved)
    logout = alice.ok("logout").stdout
    assert logout.startswith("logged out alice")
    assert not directory.exists()
    line = alice.refused(
        "ca",
        "status",
        "--cert",
        str(saved / "svid.pem"),
        "--key",
        str(saved / "key.pem"),
        "--bundle",
        str(saved / "bundle.pem"),
    )
    assert "denylist" in line
    assert "not logged in" in alice.refused("login", "status")


def test_device_flow_login(person_factory: object) -> None:
    bob = person_factory("bob")  # type: ignore[operator]
    process = bob.interactive("login", "--device", "--bundle", bob.bundle)
    assert process.stderr is not None
    line = process.stderr.readline()
    match = re.match(r"To sign in, open (\S+) and enter the code (\S+)", line)
    assert match, line
    Browser().approve_device(match.group(1), "bob")
    code, out, err = _finish(process)
    assert code == 0, err
    assert out.startswith("logged in as bob") and "roles approver" in out
    assert "roles:     approver" in bob.ok("login", "status").stdout
    # an approver is no administrator
    assert "role" in bob.refused("ca", "rotate", "--force")


def test_id_token_file_refusals_are_one_line(
    person_factory: object, oidc_provider: OidcProvider
) -> None:
    carol = person_factory("carol")  # type: ignore[operator]
    token, nonce = code_flow_token(oidc_provider, "carol")  # password only: no MFA
    (carol.home / "token").write_text(token)
    line = carol.refused(
        "login", "--id-token-file", "token", "--nonce", nonce, "--bundle", carol.bundle
    )
    assert line.startswith("broker: permission denied: login needs MFA")
    assert not (carol.home / "operator").exists()

    token, nonce = code_flow_token(oidc_provider, "erin")
    (carol.home / "token").write_text(token)
    line = carol.refused("login", "--id-token-file", "token", "--bundle", carol.bundle)
    assert "nonce does not match" in line
    line = carol.refused(
        "login",
        "--id-token-file",
        "token",
        "--nonce",
        nonce,
        "--ttl",
        "9h",
        "--bundle",
        carol.bundle,
    )
    assert "at most 8h" in line
    carol.ok("login", "--id-token-file", "token", "--nonce", nonce, "--bundle", carol.bundle)
    line = carol.refused(
        "login", "--id-token-file", "token", "--nonce", nonce, "--bundle", carol.bundle
    )
    assert "used for a login already" in line


def test_operator_revoke_stops_another_login(
    person_factory: object, oidc_provider: OidcProvider
) -> None:
    erin, dave = person_factory("erin2"), person_factory("dave")  # type: ignore[operator]
    for person, name in ((erin, "erin"), (dave, "dave")):
        token, nonce = code_flow_token(oidc_provider, name)
        (person.home / "token").write_text(token)
        person.ok("login", "--id-token-file", "token", "--nonce", nonce, "--bundle", person.bundle)
    assert "subject:   dave" in dave.ok("login", "status").stdout
    # dave is an auditor: may list operators, may not revoke them
    assert {"dave", "erin"} <= {
        o["subject"] for o in dave.ok("operator", "list", "--output", "json").json()
    }
    line = dave.refused("operator", "revoke", "erin")
    assert line.startswith("broker: permission denied:") and "auditor" in line
    out = erin.ok("operator", "revoke", "dave").stdout  # erin: security
    assert out.startswith("revoked dave certificate ")
    assert "denylist" in dave.refused("login", "status")


def test_dev_mode_still_writes_an_admin_operator_identity(
    broker_cli: BrokerCli, tmp_path: Path
) -> None:
    """No provider: serve --dev keeps writing DATA_DIR/operator/, an admin."""
    env = {"BROKER_HOME": str(tmp_path / "nobody")}
    status = broker_cli.ok(
        "login",
        "status",
        "--cert",
        str(broker_cli.server.data_dir / "operator" / "svid.pem"),
        env=env,
    )
    assert "roles:     admin" in status.stdout
    assert (
        "failed precondition: operator login is not configured"
        in broker_cli.run(
            "login", "--bundle", str(broker_cli.server.data_dir / "bundle.pem"), env=env
        ).stderr
    )
