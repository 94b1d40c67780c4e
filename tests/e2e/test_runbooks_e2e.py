"""Runbooks as tested procedures: every `broker ...` line of each docs/runbooks/ page's sh blocks
runs, in order, against a real `broker serve --dev`, and must succeed. The test only prepares
what the incident would have left (a secret, a minted SVID) and fills in the $VARIABLES."""

from __future__ import annotations

import re
import shlex
import shutil
import string
import time
from pathlib import Path

import pytest
from cryptography import x509

from .conftest import BrokerCli, BrokerProcess, CliResult

pytestmark = pytest.mark.e2e

RUNBOOKS = Path(__file__).resolve().parents[2] / "docs" / "runbooks"
_BLOCK = re.compile(r"^```sh\n(.*?)^```", re.MULTILINE | re.DOTALL)


def commands(page: Path) -> list[str]:
    """The page's `broker ...` lines, in order."""
    lines = []
    for block in _BLOCK.findall(page.read_text()):
        lines += [ln.strip() for ln in block.splitlines() if ln.strip().startswith("broker ")]
    return lines


def _run_page(
    cli: BrokerCli, page: str, values: dict[str, str], lines: list[str] | None = None
) -> list[str]:
    ran = []
    lines = commands(RUNBOOKS / page) if lines is None else lines
    assert lines, f"{page} has no commands"
    for line in lines:
        text = string.Template(line).substitute(values)  # a missing $VARIABLE fails here
        argv = shlex.split(text)
        assert argv[0] == "broker"
        cli.ok(*argv[1:])
        ran.append(text)
    return ran


def _ok_soon(cli: BrokerCli, *args: str, within: float = 60.0) -> CliResult:
    """Run until it succeeds: after a root is replaced, the broker re-issues the CLI's
    bootstrap identity and bundle within seconds (its background job)."""
    deadline = time.monotonic() + within
    while True:
        result = cli.run(*args)
        if result.returncode == 0 or time.monotonic() > deadline:
            assert result.returncode == 0, result.describe()
            return result
        time.sleep(0.5)


def test_every_page_is_listed_and_every_command_is_run() -> None:
    pages = sorted(p.name for p in RUNBOOKS.glob("*.md") if p.name != "README.md")
    index = (RUNBOOKS / "README.md").read_text()
    assert pages == sorted(PAGES), "a runbook page without an e2e run"
    assert all(f"({p})" in index for p in pages)


PAGES = (
    "leaked-secret.md",
    "failed-rotation.md",
    "compromised-issuing-key.md",
    "audit-gap.md",
    "compromised-root-key.md",
    "lost-hsm-token.md",
)


def test_leaked_secret(broker_cli: BrokerCli, tmp_path: Path) -> None:
    ref, new_ref = "secret://payments/dev/runbook/api-key", "secret://payments/dev/runbook/api-key2"
    broker_cli.ok(
        "secrets", "put", ref, "--generate", "--owner", "payments",
        "--classification", "confidential", "--rotation-period", "90d",
    )  # fmt: skip
    broker_cli.ok("secrets", "get", ref)  # the read the runbook looks for
    values = {"REF": ref, "NEW_REF": new_ref, "OWNER": "payments", "TICKET": "SEC-42"}
    _run_page(broker_cli, "leaked-secret.md", values)
    refused = broker_cli.run("secrets", "get", ref)
    assert refused.returncode == 1 and "revoked" in refused.stderr
    assert broker_cli.ok("secrets", "get", new_ref).stdout


def test_failed_rotation(broker_cli: BrokerCli) -> None:
    ref = "secret://payments/dev/runbook/db-password"
    broker_cli.ok(
        "secrets", "put", ref, "--generate", "--owner", "payments",
        "--classification", "confidential", "--rotation-period", "90d",
    )  # fmt: skip
    before = broker_cli.ok("ca", "status", "--output", "json").json()
    _run_page(broker_cli, "failed-rotation.md", {"REF": ref, "TICKET": "SEC-43"})
    after = broker_cli.ok("ca", "status", "--output", "json").json()
    assert after != before  # a new issuing generation is active


def test_compromised_issuing_key(broker_cli: BrokerCli, tmp_path: Path) -> None:
    out = tmp_path / "svid"
    broker_cli.ok(
        "svid", "mint", "--spiffe-id", "spiffe://broker.local/acme/dev/web", "--out", str(out)
    )
    serial = format(
        x509.load_pem_x509_certificates((out / "svid.pem").read_bytes())[0].serial_number, "x"
    )
    _run_page(broker_cli, "compromised-issuing-key.md", {"SERIAL": serial})


def test_audit_gap(broker_cli: BrokerCli, tmp_path: Path) -> None:
    checkpoint = tmp_path / "checkpoint.json"
    _run_page(broker_cli, "audit-gap.md", {"CHECKPOINT": str(checkpoint)})
    assert checkpoint.read_text().strip()


def _root_fingerprints(cli: BrokerCli) -> dict[str, str]:
    status = cli.ok("ca", "status", "--output", "json").json()
    return {
        a["id"]: a["fingerprint_sha256"]
        for a in status["authorities"]
        if a["kind"] == "root" and a["state"] != "expired"
    }


def _bundle_roots(cli: BrokerCli) -> list[x509.Certificate]:
    return x509.load_pem_x509_certificates(cli.ok("ca", "bundle").stdout.encode())


def test_compromised_root_key(broker_cli: BrokerCli, tmp_path: Path) -> None:
    out = tmp_path / "svid"
    broker_cli.ok(
        "svid", "mint", "--spiffe-id", "spiffe://broker.local/acme/dev/web", "--out", str(out)
    )
    before_roots = _bundle_roots(broker_cli)
    lines = commands(RUNBOOKS / "compromised-root-key.md")
    rotate = lines.index("broker ca rotate --root --compromised")
    _run_page(broker_cli, "compromised-root-key.md", {}, lines[: rotate + 1])
    for line in lines[rotate + 1 :]:  # in order, each once the CLI's identity is re-issued
        _ok_soon(broker_cli, *shlex.split(line)[1:])
    after_roots = _bundle_roots(broker_cli)
    assert len(after_roots) == 1 and after_roots[0] not in before_roots
    status = broker_cli.ok("ca", "status", "--output", "json").json()
    assert status["root_phase"] == "steady"
    states = {a["id"]: a["state"] for a in status["authorities"]}
    assert states["root-1"] == "expired"
    # The SVID minted before no longer verifies against the bundle now published.
    from ca.errors import CAError
    from ca.x509svid import verify_chain

    leaf, *rest = x509.load_pem_x509_certificates((out / "svid.pem").read_bytes())
    try:
        verify_chain(leaf, rest, after_roots, leaf.not_valid_before_utc)
    except CAError:
        pass
    else:
        raise AssertionError("an SVID under the replaced root still verifies")
    tail = broker_cli.ok("audit", "tail", "-n", "200", "--output", "json").stdout
    assert '"compromised": true' in tail or '"compromised":true' in tail


def test_lost_hsm_token(tmp_path: Path) -> None:
    data = tmp_path / "data"
    server = BrokerProcess(data, tmp_path)
    cli = BrokerCli(server, tmp_path)
    checkpoint = tmp_path / "checkpoint.json"
    page = (RUNBOOKS / "lost-hsm-token.md").read_text()
    with_backup, _, without = page.partition("## Without a backup")
    server.start()
    try:
        roots = _root_fingerprints(cli)
        cli.ok("audit", "checkpoint", "--out", str(checkpoint))
        assert server.stop() == 0
        backup = tmp_path / "backup"
        shutil.copytree(data, backup)  # the documented backup: the whole --dev data dir
        shutil.rmtree(data / "hsm")  # the token is lost
        shutil.copytree(backup, data, dirs_exist_ok=True)  # restored together
        server.start()
        block = [
            ln.strip()
            for b in _BLOCK.findall(with_backup)
            for ln in b.splitlines()
            if ln.strip().startswith("broker ")
        ]
        _run_page(cli, "lost-hsm-token.md", {"CHECKPOINT": str(checkpoint)}, block)
        assert _root_fingerprints(cli) == roots  # the same CA is back
    finally:
        server.ensure_stopped()

    # Without a backup: a new broker, a new root, and the steps that re-establish trust.
    fresh = BrokerProcess(tmp_path / "fresh", tmp_path)
    fresh_cli = BrokerCli(fresh, tmp_path)
    fresh.start()
    try:
        block = [
            ln.strip()
            for b in _BLOCK.findall(without)
            for ln in b.splitlines()
            if ln.strip().startswith("broker ")
        ]
        ran = _run_page(fresh_cli, "lost-hsm-token.md", {"NODE": "node-1"}, block)
        assert any("token create" in line for line in ran)
        assert set(_root_fingerprints(fresh_cli).values()).isdisjoint(roots.values())
    finally:
        fresh.ensure_stopped()
