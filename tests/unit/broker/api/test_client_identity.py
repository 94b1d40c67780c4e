"""The broker's clients pin the broker's own serving name, derived from the bundle's roots; an
unusable bundle is a clear refusal before anything is dialled."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import pytest
from click.testing import CliRunner
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from broker.api.client.base import (
    BrokerClient,
    ClientCredentials,
    ClientError,
    broker_server_name,
    channel_options,
)
from broker.cli import CliContext, cli
from ca.x509svid import build_root

NOW = dt.datetime.now(dt.UTC)


def _root_pem(trust_domain: str) -> bytes:
    key = ec.generate_private_key(ec.SECP256R1())
    root = build_root(key, trust_domain, NOW, dt.timedelta(days=1))
    return root.public_bytes(serialization.Encoding.PEM)


def test_the_pinned_name_stands_for_the_bundles_trust_domain() -> None:
    roots = _root_pem("example.org") + _root_pem("example.org")
    assert broker_server_name(roots) == "server.broker.example.org.spiffe.invalid"
    assert ("grpc.ssl_target_name_override", broker_server_name(roots)) in channel_options(roots)
    odd = broker_server_name(_root_pem("my_domain"))
    assert odd.startswith("server.broker.") and odd.endswith(".spiffe.invalid")
    assert "_" not in odd


@pytest.mark.parametrize(
    ("bundle", "reason"),
    [
        (b"not pem", "no trust domain"),
        (_root_pem("example.org") + _root_pem("other.org"), "several"),
    ],
)
def test_a_bundle_that_names_no_single_trust_domain_is_refused(bundle: bytes, reason: str) -> None:
    with pytest.raises(ClientError) as info:
        BrokerClient("127.0.0.1:1", ClientCredentials(b"", b"", bundle))
    assert info.value.code_name == "INVALID_ARGUMENT"
    assert "trust bundle is not usable" in info.value.message and reason in info.value.message


def test_the_cli_says_so_in_one_line(tmp_path: Path) -> None:
    for name, data in (("svid.pem", b"cert"), ("key.pem", b"key"), ("bundle.pem", b"junk")):
        (tmp_path / name).write_bytes(data)
    result = CliRunner().invoke(
        cli,
        [
            "--server",
            "127.0.0.1:1",
            "--cert",
            str(tmp_path / "svid.pem"),
            "--key",
            str(tmp_path / "key.pem"),
            "--bundle",
            str(tmp_path / "bundle.pem"),
            "ca",
            "status",
        ],
        obj=CliContext(),
    )
    assert result.exit_code != 0
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "trust bundle is not usable" in lines[0], result.stderr
