"""`broker policy|grant|approval|breakglass` against a real `broker serve --dev` subprocess:
the Rego policy is read, tested and replaced (a broken one refused, the old one kept), `.toml`
still sets the CA policy, grants are bounded, self-approval is refused. Two-operator flows run
in tests/integration/test_access.py (the dev broker has one operator identity on disk)."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from broker.api.client.base import BrokerClient, ClientCredentials, ClientError
from broker.api.client.ca import CAClient
from broker.rego import default_modules
from tests.e2e.conftest import BrokerCli, BrokerProcess, CliResult

pytestmark = pytest.mark.e2e

PAUSE = """package broker.authz

import rego.v1

import data.broker.authz.base

allow contains v if some v in base.allow

deny contains v if some v in base.deny

deny contains {"rule": "freeze", "reason": "secrets are frozen during the audit"} if {
	input.action == "secrets.get"
	not input.caller.operator
}
"""


def one_refusal(result: CliResult, code: int = 1) -> str:
    assert result.returncode == code, result.describe()
    lines = result.stderr_lines
    assert len(lines) == 1 and lines[0].startswith("broker: "), lines
    return lines[0]


def trust_domain(cli: BrokerCli) -> str:
    return str(cli.ok("ca", "status", "--output", "json").json()["trust_domain"])


def request_file(tmp: Path, cli: BrokerCli, environment: str) -> Path:
    path = tmp / f"request-{environment}.json"
    td = trust_domain(cli)
    path.write_text(
        json.dumps(
            {
                "caller": f"spiffe://{td}/default/{environment}/web",
                "action": "secrets.get",
                "resource": "secret://web/prod/stripe",
                "attributes": {
                    "tenant": "default",
                    "environment": "prod",
                    "owner": "web",
                    "classification": "internal",
                },
            }
        )
    )
    return path


def test_policy_get_test_and_a_refused_broken_policy(broker_cli: BrokerCli, tmp_path: Path) -> None:
    document = broker_cli.ok("policy", "get", "--output", "json").json()
    assert document["rego"]["version"] == 0
    assert document["rego"]["modules"] == default_modules()
    assert "rules" in json.dumps(document["ca"]["document"])
    text = broker_cli.ok("policy", "get", "--rego").stdout
    assert "# --- default.rego ---" in text and "package broker.authz" in text

    dev = request_file(tmp_path, broker_cli, "dev")
    denied = broker_cli.run("policy", "test", "--input", str(dev))
    assert denied.returncode == 1 and denied.stderr == "", denied.describe()  # deny: exit 1
    out = denied.stdout
    assert out.startswith("deny (rule prod-only): prod resources go only to prod identities")
    assert broker_cli.ok("policy", "test", "--input", str(dev), "--expect", "deny").stdout == out
    prod = request_file(tmp_path, broker_cli, "prod")
    decided = broker_cli.ok("policy", "test", "--input", str(prod), "--output", "json").json()
    assert (decided["decision"], decided["rule"]) == ("allow", "owner")
    assert decided["input"]["caller"]["service"] == "web"
    line = one_refusal(broker_cli.run("policy", "test", "--input", str(dev), "--expect", "allow"))
    assert "expected allow, the policy says deny (rule prod-only)" in line

    broken = tmp_path / "broken.rego"
    broken.write_text("package broker.authz\nimport rego.v1\nallow contains x if {\n")
    line = one_refusal(broker_cli.run("policy", "set", str(broken)))
    assert line.startswith("broker: invalid argument: Rego policy refused: broken.rego:3:")
    after = broker_cli.ok("policy", "get", "--rego", "--output", "json").json()
    assert after["rego"]["version"] == 0


def test_policy_set_dispatches_on_the_extension(broker_cli: BrokerCli, tmp_path: Path) -> None:
    base = tmp_path / "base.rego"
    base.write_text(
        default_modules()["default.rego"].replace(
            "package broker.authz\n", "package broker.authz.base\n", 1
        )
    )
    pause = tmp_path / "pause.rego"
    pause.write_text(PAUSE)
    prod = request_file(tmp_path, broker_cli, "prod")
    candidate = broker_cli.run("policy", "test", "--input", str(prod), str(base), str(pause))
    assert candidate.returncode == 1, candidate.describe()
    assert candidate.stdout.startswith("deny (rule freeze): secrets are frozen")
    assert (
        broker_cli.ok("policy", "get", "--rego", "--output", "json").json()["rego"]["version"] == 0
    )  # testing stores nothing

    out = broker_cli.ok("policy", "set", str(base), str(pause)).stdout
    assert out.strip() == "Rego policy version 1"
    frozen = broker_cli.run("policy", "test", "--input", str(prod))
    assert frozen.returncode == 1 and frozen.stdout.startswith("deny (rule freeze)")
    modules = broker_cli.ok("policy", "get", "--rego", "--output", "json").json()["rego"]
    assert sorted(modules["modules"]) == ["base.rego", "pause.rego"]

    ca_policy = tmp_path / "ca.toml"
    ca_policy.write_text(
        f'[[rules]]\npattern = "spiffe://{trust_domain(broker_cli)}/**"\n'
        'x509_default_ttl = "30m"\nx509_max_ttl = "1h"\njwt_default_ttl = "5m"\n'
        'jwt_max_ttl = "15m"\nkey_types = ["ec-p256"]\n'
    )
    set_ca = broker_cli.ok("policy", "set", str(ca_policy), "--output", "json").json()
    assert set_ca["kind"] == "ca" and set_ca["version"] >= 1

    mixed = broker_cli.run("policy", "set", str(pause), str(ca_policy))
    assert mixed.returncode == 2, mixed.describe()


def test_grants_and_approvals_from_the_cli(broker_cli: BrokerCli) -> None:
    td = trust_domain(broker_cli)
    web = f"spiffe://{td}/default/prod/web"
    args = ["grant", "create", "--to", web, "--action", "secrets.get", "--resource", "secret://x"]
    missing = broker_cli.run(*args, "--ttl", "1h")
    assert missing.returncode == 2, missing.describe()
    line = one_refusal(broker_cli.run(*args, "--ttl", "9h", "--justification", "INC-1"))
    assert "at most 8h" in line
    grant_id = broker_cli.ok(*args, "--ttl", "30m", "--justification", "INC-1").stdout.strip()
    listed = broker_cli.ok("grant", "list", "--output", "json").json()
    assert [(g["id"], g["grantee"], g["state"]) for g in listed] == [(grant_id, web, "active")]
    assert broker_cli.ok("grant", "revoke", grant_id).stdout.strip() == f"revoked {grant_id}"
    assert broker_cli.ok("grant", "list", "--output", "json").json() == []

    approval_id = broker_cli.ok(
        "approval",
        "request",
        "--action",
        "secrets.get",
        "--resource",
        "secret://payments/prod/card-vault",
        "--justification",
        "INC-2",
    ).stdout.strip()
    line = one_refusal(broker_cli.run("approval", "approve", approval_id))
    assert line.startswith("broker: permission denied:") and "cannot approve it" in line
    pending = broker_cli.ok("approval", "list", "--output", "json").json()
    assert [(a["id"], a["state"]) for a in pending] == [(approval_id, "pending")]
    line = one_refusal(
        broker_cli.run("breakglass", "issue", "--approval", approval_id, "--out", "bg")
    )
    assert "failed precondition" in line and "pending" in line
    assert not Path(broker_cli.workdir, "bg").exists()


MAINTENANCE = """package broker.authz

import rego.v1

import data.broker.authz.base

allow contains v if some v in base.allow

deny contains v if some v in base.deny

deny contains {"rule": "maintenance", "reason": "ca status is closed"} if {
	input.action == "ca.status"
}
"""


@pytest.fixture(scope="module")
def two_workers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[BrokerProcess]:
    root = tmp_path_factory.mktemp("policy-workers")
    data = root / "data"
    server = BrokerProcess(data, root, ["--dev", "--data-dir", str(data), "--workers", "2"])
    server.start()
    try:
        yield server
        assert server.stop() == 0, f"broker exited uncleanly; stderr:\n{server.stderr_text()}"
    finally:
        server.ensure_stopped()


def _statuses(server: BrokerProcess, connections: int) -> list[str]:
    """`ca status` over `connections` fresh connections (spread over the workers): the gRPC
    code of each ("OK" when answered)."""
    operator = server.data_dir / "operator"
    credentials = ClientCredentials(
        (operator / "svid.pem").read_bytes(),
        (operator / "key.pem").read_bytes(),
        (server.data_dir / "bundle.pem").read_bytes(),
    )
    codes = []
    for _ in range(connections):
        with BrokerClient(server.address, credentials) as client:
            try:
                CAClient(client).status()
                codes.append("OK")
            except ClientError as exc:
                codes.append(exc.code_name)
    return codes


def test_a_policy_set_through_one_worker_reaches_every_worker(
    two_workers: BrokerProcess, tmp_path: Path
) -> None:
    assert "workers: 2" in two_workers.listening_line
    assert _statuses(two_workers, 8) == ["OK"] * 8
    cli = BrokerCli(two_workers, tmp_path)
    base = tmp_path / "base.rego"
    base.write_text(
        default_modules()["default.rego"].replace(
            "package broker.authz\n", "package broker.authz.base\n", 1
        )
    )
    closed = tmp_path / "maintenance.rego"
    closed.write_text(MAINTENANCE)
    cli.ok("policy", "set", str(base), str(closed))
    deadline = time.monotonic() + 15
    while True:  # every worker drops its cached decisions within its sync interval (2 s)
        codes = _statuses(two_workers, 8)
        if codes == ["PERMISSION_DENIED"] * 8:
            break
        assert time.monotonic() < deadline, f"a worker still answers with the old policy: {codes}"
        time.sleep(1)
