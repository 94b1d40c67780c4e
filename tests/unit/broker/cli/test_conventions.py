"""CLI conventions (issue 15 item 5): `broker --version`, `broker status`, `-o`/`BROKER_OUTPUT`,
`broker completion bash|zsh|fish`."""

from __future__ import annotations

import datetime as dt
import json
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from broker.cli.clients import ClientError
from tests.unit.broker.cli.test_cli import Harness

OPERATOR = "spiffe://broker.local/broker/operator/dev"


def _certificate(expires_in: dt.timedelta) -> bytes:
    key = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(dt.UTC)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "x")])
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(1)
        .not_valid_before(now - dt.timedelta(minutes=1))
        .not_valid_after(now + expires_in)
        .add_extension(
            x509.SubjectAlternativeName([x509.UniformResourceIdentifier(OPERATOR)]), False
        )
        .sign(key, hashes.SHA256())
    )
    return cert.public_bytes(serialization.Encoding.PEM)


@pytest.fixture
def harness(tmp_path: Path) -> Harness:
    data_dir = tmp_path / "data"
    (data_dir / "operator").mkdir(parents=True)
    (data_dir / "operator" / "svid.pem").write_bytes(_certificate(dt.timedelta(hours=2)))
    (data_dir / "operator" / "key.pem").write_bytes(b"operator key")
    (data_dir / "bundle.pem").write_bytes(b"bundle")
    return Harness(data_dir)


def test_version(harness: Harness) -> None:
    result = harness.invoke("--version")
    assert result.exit_code == 0
    assert result.stdout.startswith("broker ") and len(result.stdout.split()) == 2


def test_status_reports_reachability_identity_ca_and_expiry(harness: Harness) -> None:
    result = harness.invoke("status", "-o", "json")
    assert result.exit_code == 0, result.stderr
    document = json.loads(result.stdout)
    assert document["reachable"] is True and document["error"] is None
    assert document["server"] == "127.0.0.1:8443"
    assert document["identity"]["spiffe_id"] == OPERATOR
    assert 7000 < document["identity"]["expires_in_seconds"] <= 7200
    assert document["identity"]["expired"] is False
    assert document["ca"]["trust_domain"] == "broker.local"
    assert document["ca"]["root"]["id"] == "root-1"
    text = harness.invoke("status")
    assert text.exit_code == 0
    lines = text.stdout.splitlines()
    assert lines[0] == "broker:     127.0.0.1:8443 reachable"
    assert lines[1].startswith(f"you:        {OPERATOR} (")
    assert lines[2].startswith("credential: expires ") and "(1h5" in lines[2]
    assert lines[3].startswith("CA:         broker.local, keys software (dev), root root-1")


def test_status_of_an_unreachable_broker_exits_1_and_still_says_who_you_are(
    harness: Harness,
) -> None:
    harness.fail = ClientError("UNAVAILABLE", "connection refused")
    result = harness.invoke("status", "--output", "json")
    assert result.exit_code == 1
    document = json.loads(result.stdout)
    assert document["reachable"] is False and document["ca"] is None
    assert document["error"] == "cannot reach the broker at 127.0.0.1:8443: connection refused"
    assert document["identity"]["spiffe_id"] == OPERATOR


def test_output_from_short_option_and_environment(harness: Harness) -> None:
    assert json.loads(harness.invoke("ca", "status", "-o", "json").stdout)["trust_domain"]
    env = {"BROKER_OUTPUT": "json"}
    assert json.loads(harness.invoke("ca", "status", env=env).stdout)["trust_domain"]
    # the option wins over the environment
    assert not harness.invoke("ca", "status", "-o", "text", env=env).stdout.startswith("{")
    bad = harness.invoke("ca", "status", env={"BROKER_OUTPUT": "yaml"})
    assert bad.exit_code == 2


@pytest.mark.parametrize(("shell", "marker"), [("bash", "complete "), ("zsh", "#compdef broker"),
                                              ("fish", "complete ")])  # fmt: skip
def test_completion_scripts(harness: Harness, shell: str, marker: str) -> None:
    result = harness.invoke("completion", shell)
    assert result.exit_code == 0
    assert marker in result.stdout and "_BROKER_COMPLETE" in result.stdout
