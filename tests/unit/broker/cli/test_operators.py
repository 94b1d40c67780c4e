"""`broker login status` and `broker operator list|revoke` against a fake operators client."""

from __future__ import annotations

import datetime as dt
import json
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from tests.unit.broker.cli.fakes import SESSION, Z0, Z1, Recorder, harness

SESSION_JSON = {
    "subject": "alice@example.com",
    "spiffe_id": "spiffe://td/operators/alice",
    "roles": ["admin"],
    "amr": ["pwd", "otp"],
    "serial": "0a1b",
    "issued_at": Z0,
    "expires_at": Z1,
    "revoked_at": None,
    "issuer": "https://sso",
}


def test_operator_list_and_revoke(tmp_path: Path) -> None:
    fake = Recorder(list_sessions=[SESSION], revoke=[SESSION])
    h = harness(tmp_path, operators=fake)
    listed = json.loads(h.invoke("operator", "list", "--output", "json").stdout)
    assert listed == [SESSION_JSON]  # every list is a bare JSON array (issue 15)
    table = h.invoke("operator", "list", "--all").stdout.splitlines()
    assert table[0].split() == ["SUBJECT", "ROLES", "EXPIRES", "SERIAL", "STATE"]
    assert table[1].split() == ["alice@example.com", "admin", Z1, "0a1b", "active"]
    assert ("list_sessions", (True,), {}) in fake.calls
    revoked = json.loads(h.invoke("operator", "revoke", "0a1b", "--output", "json").stdout)
    assert revoked == {"revoked": [SESSION_JSON]}
    text = h.invoke("operator", "revoke", "0a1b").stdout
    assert text == "revoked alice@example.com certificate 0a1b\n"


def _login(home: Path) -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([])
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(1)
        .not_valid_before(now - dt.timedelta(minutes=1))
        .not_valid_after(now + dt.timedelta(hours=1))
        .sign(key, hashes.SHA256())
    )
    operator = home / "operator"
    operator.mkdir(parents=True, exist_ok=True)
    (operator / "svid.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    (operator / "key.pem").write_bytes(b"key")
    (operator / "bundle.pem").write_bytes(b"bundle")


def test_login_status_json_and_text(tmp_path: Path) -> None:
    h = harness(tmp_path, operators=Recorder(whoami=SESSION))
    _login(h.data_dir)  # BROKER_HOME is the harness's data dir
    document = json.loads(h.invoke("login", "status", "--output", "json").stdout)
    assert document == SESSION_JSON
    text = h.invoke("login", "status").stdout.splitlines()
    assert text == [
        "subject:   alice@example.com",
        "identity:  spiffe://td/operators/alice",
        "roles:     admin",
        "mfa:       pwd, otp",
        f"expires:   {Z1}",
    ]
