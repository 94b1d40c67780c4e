"""`broker attestor resource`: the resource an approval of an attestor names, computed locally
(no broker contacted), exactly as the broker names it when it refuses `attestor add`."""

from __future__ import annotations

import json
from pathlib import Path

from click.testing import CliRunner

from broker.attestation import attestor_resource
from broker.cli import CliContext, cli

JWKS = {"keys": [{"kty": "EC", "crv": "P-256", "kid": "k1", "x": "AA", "y": "AA"}]}
TEMPLATE = "spiffe://{td}/ns/{kubernetes.io.namespace}/sa/{sub}"


def _definition(jwks: list[str]) -> list[str]:
    return [
        "attestor", "resource", "--name", "k8s", "--issuer", "https://k8s.example",
        "--audience", "broker", *jwks, "--template", TEMPLATE,
    ]  # fmt: skip


def test_the_resource_is_the_brokers_and_needs_no_broker(tmp_path: Path) -> None:
    jwks_file = tmp_path / "jwks.json"
    jwks_file.write_text(json.dumps(JWKS, indent=2))
    # No server is listening there: the command must not try to connect.
    env = {"BROKER_ADDR": "127.0.0.1:1", "BROKER_DATA_DIR": str(tmp_path / "none")}
    result = CliRunner().invoke(
        cli, _definition(["--jwks-file", str(jwks_file)]), obj=CliContext(), env=env
    )
    assert result.exit_code == 0, result.output
    expected = attestor_resource(
        "k8s", "https://k8s.example", "broker", json.dumps(JWKS), TEMPLATE, ()
    )
    assert result.output.strip() == expected
    inline = CliRunner().invoke(
        cli, _definition(["--jwks", json.dumps(JWKS)]), obj=CliContext(), env=env
    )
    assert inline.output.strip() == expected


def test_a_bad_jwks_is_one_line() -> None:
    result = CliRunner().invoke(cli, _definition(["--jwks", "{nope"]), obj=CliContext())
    assert result.exit_code == 1
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("broker: the JWKS is not JSON")
