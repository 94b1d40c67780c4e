"""The broker with its keys in a remote token: `broker serve --dev` told to load
p11-kit-client.so, SoftHSM2 behind `p11-kit server` (tests/fixtures/p11kit.py). What a new user
tried in issue 18: the CA bootstraps, an SVID verifies, and `broker secrets put` then `get` work
(the data-key wrap crosses p11-kit's remoting); `kek rotate` too."""

from __future__ import annotations

import secrets as random
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography import x509

from tests.e2e.conftest import BrokerCli, BrokerProcess
from tests.fixtures.p11kit import P11KitToken

pytestmark = pytest.mark.e2e

REF = "secret://payments/dev/stripe/api-key"


@pytest.fixture
def remote_broker(p11kit_token: P11KitToken, tmp_path: Path) -> Iterator[BrokerProcess]:
    server = BrokerProcess(
        tmp_path / "data",
        tmp_path,
        env={
            "BROKER_KEYS_URI": (
                f"pkcs11:token={p11kit_token.token_label}?module-path={p11kit_token.module_path}"
            ),
            "BROKER_KEYS_PIN_SOURCE": f"file:{p11kit_token.pin_file}",
            "P11_KIT_SERVER_ADDRESS": p11kit_token.address,
        },
    )
    server.start()
    try:
        yield server
        assert server.stop() == 0, f"broker exited uncleanly; stderr:\n{server.stderr_text()}"
    finally:
        server.ensure_stopped()


def test_secrets_and_svids_with_the_keys_behind_p11kit(
    remote_broker: BrokerProcess, p11kit_token: P11KitToken, tmp_path: Path
) -> None:
    cli = BrokerCli(remote_broker, tmp_path)
    status = cli.ok("ca", "status", "--output", "json").json()
    assert p11kit_token.token_label in str(status)
    out = tmp_path / "svid"
    cli.ok(
        "svid", "mint", "--spiffe-id", f"spiffe://{status['trust_domain']}/x/y", "--out", str(out)
    )
    leaf = x509.load_pem_x509_certificates((out / "svid.pem").read_bytes())[0]
    assert leaf.not_valid_after_utc > leaf.not_valid_before_utc

    value = f"sk_e2e_{random.token_hex(16)}"
    source = tmp_path / "value"
    source.write_text(value)
    cli.ok(
        "secrets", "put", REF, "--value-file", str(source), "--owner", "payments",
        "--classification", "confidential", "--rotation-period", "90d",
    )  # fmt: skip
    assert cli.ok("secrets", "get", REF).stdout == value
    cli.ok("kek", "rotate")
    assert cli.ok("secrets", "get", REF).stdout == value
