"""Runbooks as tested procedures: every `broker ...` line of each docs/runbooks/ page's sh blocks
runs, in order, against a real `broker serve --dev`, and must succeed. The test only prepares
what the incident would have left (a secret, a minted SVID) and fills in the $VARIABLES."""

from __future__ import annotations

import re
import shlex
import string
from pathlib import Path

import pytest
from cryptography import x509

from .conftest import BrokerCli

pytestmark = pytest.mark.e2e

RUNBOOKS = Path(__file__).resolve().parents[2] / "docs" / "runbooks"
_BLOCK = re.compile(r"^```sh\n(.*?)^```", re.MULTILINE | re.DOTALL)


def commands(page: Path) -> list[str]:
    """The page's `broker ...` lines, in order."""
    lines = []
    for block in _BLOCK.findall(page.read_text()):
        lines += [ln.strip() for ln in block.splitlines() if ln.strip().startswith("broker ")]
    return lines


def _run_page(cli: BrokerCli, page: str, values: dict[str, str]) -> list[str]:
    ran = []
    lines = commands(RUNBOOKS / page)
    assert lines, f"{page} has no commands"
    for line in lines:
        text = string.Template(line).substitute(values)  # a missing $VARIABLE fails here
        argv = shlex.split(text)
        assert argv[0] == "broker"
        cli.ok(*argv[1:])
        ran.append(text)
    return ran


def test_every_page_is_listed_and_every_command_is_run() -> None:
    pages = sorted(p.name for p in RUNBOOKS.glob("*.md") if p.name != "README.md")
    index = (RUNBOOKS / "README.md").read_text()
    assert pages == sorted(PAGES), "a runbook page without an e2e run"
    assert all(f"({p})" in index for p in pages)


PAGES = ("leaked-secret.md", "failed-rotation.md", "compromised-issuing-key.md", "audit-gap.md")


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
