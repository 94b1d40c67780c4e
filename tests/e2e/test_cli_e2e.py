"""The `broker` CLI against a real `broker serve --dev` subprocess: minting, bundles, rotation,
policy, audit, refusals and restart. Every command runs as its own subprocess."""

from __future__ import annotations

import datetime as dt
import json
import os
import stat
import subprocess
import sys
from pathlib import Path
from typing import Any

import jwt
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from tests.e2e.conftest import BrokerCli, BrokerProcess, CliResult

pytestmark = pytest.mark.e2e

SKEW = dt.timedelta(seconds=120)


# -- helpers -----------------------------------------------------------------------------------


def _status(cli: BrokerCli) -> dict[str, Any]:
    document: dict[str, Any] = cli.ok("ca", "status", "--output", "json").json()
    return document


def _trust_domain(cli: BrokerCli) -> str:
    return str(_status(cli)["trust_domain"])


def _workload_id(cli: BrokerCli, service: str) -> str:
    return f"spiffe://{_trust_domain(cli)}/default/dev/{service}"


def _active_issuing(status: dict[str, Any]) -> dict[str, Any]:
    active: list[dict[str, Any]] = [a for a in status["issuing"] if a["state"] == "active"]
    assert len(active) == 1, status["issuing"]
    return active[0]


def _split_chain(svid_pem: Path, workdir: Path) -> tuple[Path, Path | None]:
    certs = x509.load_pem_x509_certificates(svid_pem.read_bytes())
    leaf = workdir / f"{svid_pem.parent.name}-leaf.pem"
    leaf.write_bytes(certs[0].public_bytes(serialization.Encoding.PEM))
    if len(certs) == 1:
        return leaf, None
    rest = workdir / f"{svid_pem.parent.name}-intermediates.pem"
    rest.write_bytes(b"".join(c.public_bytes(serialization.Encoding.PEM) for c in certs[1:]))
    return leaf, rest


def _openssl_verify(
    bundle: Path, svid_pem: Path, workdir: Path
) -> subprocess.CompletedProcess[str]:
    leaf, rest = _split_chain(svid_pem, workdir)
    args = ["openssl", "verify", "-CAfile", str(bundle)]
    if rest is not None:
        args += ["-untrusted", str(rest)]
    return subprocess.run([*args, str(leaf)], capture_output=True, text=True, check=False)


def _fp(authority: dict[str, Any]) -> str:
    return str(authority["fingerprint_sha256"]).replace(":", "").lower()


def _issuer_fingerprint(svid_pem: Path) -> str:
    """SHA-256 of the first intermediate in an svid.pem (the CA that signed the leaf)."""
    certs = x509.load_pem_x509_certificates(svid_pem.read_bytes())
    assert len(certs) >= 2, "expected leaf + issuing CA"
    return certs[1].fingerprint(hashes.SHA256()).hex()


def _leaf(svid_pem: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificates(svid_pem.read_bytes())[0]


def _uri_sans(cert: x509.Certificate) -> list[str]:
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    return san.get_values_for_type(x509.UniformResourceIdentifier)


def _public_der(holder: Any) -> bytes:
    """SubjectPublicKeyInfo DER of a private key, certificate or CSR."""
    return bytes(
        holder.public_key().public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )


def _audit_events(cli: BrokerCli, limit: int = 200) -> list[dict[str, Any]]:
    entries: list[dict[str, Any]] = cli.ok(
        "audit", "tail", "-n", str(limit), "--output", "json"
    ).json()
    return entries


def _last_seq(cli: BrokerCli) -> int:
    entries = _audit_events(cli, 1)
    return int(entries[-1]["seq"]) if entries else 0


def _assert_one_line_refusal(result: CliResult) -> str:
    assert result.returncode != 0, result.describe()
    assert len(result.stderr_lines) == 1, result.describe()
    assert "Traceback" not in result.stderr
    return result.stderr_lines[0]


def _make_csr(key: ec.EllipticCurvePrivateKey) -> x509.CertificateSigningRequest:
    return (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "e2e")]))
        .sign(key, hashes.SHA256())
    )


# -- minting -----------------------------------------------------------------------------------


def test_mint_with_broker_generated_key(broker_cli: BrokerCli, tmp_path: Path) -> None:
    spiffe_id = _workload_id(broker_cli, "web")
    out = tmp_path / "web"
    requested = dt.timedelta(minutes=30)
    before = dt.datetime.now(dt.UTC)
    result = broker_cli.ok(
        "svid", "mint", "--spiffe-id", spiffe_id, "--ttl", "30m", "--out", str(out)
    )
    assert len([line for line in result.stdout.splitlines() if line.startswith("wrote ")]) == 3

    for name in ("svid.pem", "bundle.pem", "key.pem"):
        assert (out / name).is_file(), name
    assert stat.S_IMODE((out / "key.pem").stat().st_mode) == 0o600
    assert (out / "key.pem").read_bytes().startswith(b"-----BEGIN PRIVATE KEY-----")

    verified = _openssl_verify(out / "bundle.pem", out / "svid.pem", tmp_path)
    assert verified.returncode == 0, verified.stdout + verified.stderr

    leaf = _leaf(out / "svid.pem")
    assert _uri_sans(leaf) == [spiffe_id]
    assert leaf.not_valid_after_utc <= before + requested + SKEW
    assert leaf.not_valid_after_utc > before + requested - SKEW
    assert leaf.not_valid_after_utc - leaf.not_valid_before_utc <= requested + SKEW
    key = serialization.load_pem_private_key((out / "key.pem").read_bytes(), password=None)
    assert _public_der(key) == _public_der(leaf)


def test_mint_json_output(broker_cli: BrokerCli, tmp_path: Path) -> None:
    spiffe_id = _workload_id(broker_cli, "json")
    document = broker_cli.ok(
        "svid", "mint", "--spiffe-id", spiffe_id, "--out", str(tmp_path / "o"), "--output", "json"
    ).json()
    assert document["spiffe_id"] == spiffe_id
    assert sorted(Path(f).name for f in document["files"]) == ["bundle.pem", "key.pem", "svid.pem"]
    leaf = _leaf(tmp_path / "o" / "svid.pem")
    assert document["serial"] == format(leaf.serial_number, "x")
    expires = dt.datetime.fromisoformat(document["expires_at"].replace("Z", "+00:00"))
    assert abs(expires - leaf.not_valid_after_utc) < dt.timedelta(seconds=1)


def test_mint_with_csr_keeps_the_key(broker_cli: BrokerCli, tmp_path: Path) -> None:
    spiffe_id = _workload_id(broker_cli, "csr")
    key = ec.generate_private_key(ec.SECP256R1())
    csr = _make_csr(key)
    csr_path = tmp_path / "req.pem"
    csr_path.write_bytes(csr.public_bytes(serialization.Encoding.PEM))
    out = tmp_path / "csr-out"
    broker_cli.ok(
        "svid", "mint", "--spiffe-id", spiffe_id, "--csr", str(csr_path), "--out", str(out)
    )
    assert not (out / "key.pem").exists()
    leaf = _leaf(out / "svid.pem")
    assert _public_der(leaf) == _public_der(csr)
    assert _uri_sans(leaf) == [spiffe_id]
    verified = _openssl_verify(out / "bundle.pem", out / "svid.pem", tmp_path)
    assert verified.returncode == 0, verified.stdout + verified.stderr


def test_jwt_svid_verifies_with_the_bundle_jwks(broker_cli: BrokerCli) -> None:
    spiffe_id = _workload_id(broker_cli, "api")
    token = broker_cli.ok(
        "jwt",
        "mint",
        "--spiffe-id",
        spiffe_id,
        "--audience",
        "orders",
        "--audience",
        "billing",
        "--ttl",
        "5m",
    ).stdout
    assert token.endswith("\n") and token.count("\n") == 1
    token = token.strip()
    jwks = json.loads(broker_cli.ok("ca", "bundle", "--format", "jwks").stdout)
    kid = jwt.get_unverified_header(token)["kid"]
    matching = [k for k in jwks["keys"] if k.get("kid") == kid]
    assert len(matching) == 1, (kid, jwks)
    assert matching[0].get("use") == "jwt-svid"
    claims = jwt.decode(
        token, jwt.PyJWK(matching[0], algorithm="ES256"), algorithms=["ES256"], audience="orders"
    )
    assert claims["sub"] == spiffe_id
    assert claims["exp"] - claims["iat"] <= 5 * 60 + 5
    with pytest.raises(jwt.InvalidAudienceError):
        jwt.decode(
            token,
            jwt.PyJWK(matching[0], algorithm="ES256"),
            algorithms=["ES256"],
            audience="someone-else",
        )

    document = broker_cli.ok(
        "jwt", "mint", "--spiffe-id", spiffe_id, "--audience", "orders", "--output", "json"
    ).json()
    assert document["spiffe_id"] == spiffe_id
    assert jwt.get_unverified_header(document["token"])["kid"] == kid
    assert document["expires_at"].endswith("Z")


# -- CA bundle, status, rotation ---------------------------------------------------------------


def test_bundle_pem_parses_and_contains_the_root(broker_cli: BrokerCli) -> None:
    pem = broker_cli.ok("ca", "bundle", "--format", "pem").stdout
    certs = x509.load_pem_x509_certificates(pem.encode())
    assert certs
    root = _status(broker_cli)["root"]
    fingerprints = [c.fingerprint(hashes.SHA256()).hex() for c in certs]
    assert _fp(root) in fingerprints


def test_status_json_describes_root_issuing_and_backend(broker_cli: BrokerCli) -> None:
    status = _status(broker_cli)
    assert status["trust_domain"]
    assert status["key_backend"]
    assert status["root"]["kind"] == "root"
    assert status["root"]["state"] == "active"
    assert status["root"]["not_after"].endswith("Z")
    issuing = _active_issuing(status)
    assert dt.datetime.fromisoformat(issuing["not_after"].replace("Z", "+00:00")) > dt.datetime.now(
        dt.UTC
    )
    assert all(a["kind"] == "issuing" for a in status["issuing"])
    text = broker_cli.ok("ca", "status").stdout
    assert status["trust_domain"] in text and issuing["id"] in text


def test_forced_rotation_keeps_old_and_new_svids_valid(
    broker_cli: BrokerCli, tmp_path: Path
) -> None:
    spiffe_id = _workload_id(broker_cli, "rotating")
    before = _active_issuing(_status(broker_cli))
    broker_cli.ok("svid", "mint", "--spiffe-id", spiffe_id, "--out", str(tmp_path / "old"))

    rotated = broker_cli.ok("ca", "rotate", "--force")
    assert rotated.stdout.strip()
    after = _active_issuing(_status(broker_cli))
    assert after["id"] != before["id"]
    assert after["generation"] > before["generation"]

    bundle = tmp_path / "bundle-now.pem"
    bundle.write_text(broker_cli.ok("ca", "bundle", "--format", "pem").stdout)
    old = _openssl_verify(bundle, tmp_path / "old" / "svid.pem", tmp_path)
    assert old.returncode == 0, old.stdout + old.stderr

    broker_cli.ok("svid", "mint", "--spiffe-id", spiffe_id, "--out", str(tmp_path / "new"))
    assert _issuer_fingerprint(tmp_path / "old" / "svid.pem") == _fp(before)
    assert _issuer_fingerprint(tmp_path / "new" / "svid.pem") == _fp(after)
    new = _openssl_verify(bundle, tmp_path / "new" / "svid.pem", tmp_path)
    assert new.returncode == 0, new.stdout + new.stderr


# -- policy ------------------------------------------------------------------------------------


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    raise TypeError(value)


def _to_toml(document: dict[str, Any]) -> str:
    lines = [f"{k} = {_toml_value(v)}" for k, v in document.items() if k != "rules"]
    for rule in document["rules"]:
        lines += ["", "[[rules]]", *(f"{k} = {_toml_value(v)}" for k, v in rule.items())]
    return "\n".join(lines) + "\n"


def test_policy_round_trip_and_enforcement(broker_cli: BrokerCli, tmp_path: Path) -> None:
    original = broker_cli.ok("ca", "policy", "get", "--output", "json").json()
    assert original["version"] >= 0
    assert original["document"]["rules"]
    text = broker_cli.ok("ca", "policy", "get").stdout
    assert f"version {original['version']}" in text.splitlines()[0]

    stricter = json.loads(json.dumps(original["document"]))
    for rule in stricter["rules"]:
        rule["x509_max_ttl"] = "1h"
        rule["x509_default_ttl"] = "30m"
    toml_file = tmp_path / "strict.toml"
    toml_file.write_text(_to_toml(stricter))
    set_result = broker_cli.ok("ca", "policy", "set", str(toml_file))
    new_version = original["version"] + 1
    assert set_result.stdout.strip() == f"policy version {new_version}"

    try:
        current = broker_cli.ok("ca", "policy", "get", "--output", "json").json()
        assert current["version"] == new_version
        assert [r["x509_max_ttl"] for r in current["document"]["rules"]] == ["1h"] * len(
            stricter["rules"]
        )
        assert current["author"]

        spiffe_id = _workload_id(broker_cli, "strict")
        refused = broker_cli.run(
            "svid",
            "mint",
            "--spiffe-id",
            spiffe_id,
            "--ttl",
            "2h",
            "--out",
            str(tmp_path / "strict"),
        )
        line = _assert_one_line_refusal(refused)
        assert "1h" in line, line
        assert not (tmp_path / "strict").exists()
        broker_cli.ok(
            "svid",
            "mint",
            "--spiffe-id",
            spiffe_id,
            "--ttl",
            "45m",
            "--out",
            str(tmp_path / "strict-ok"),
        )
    finally:
        restore = tmp_path / "original.json"
        restore.write_text(json.dumps(original["document"]))
        broker_cli.ok("ca", "policy", "set", str(restore))
    restored = broker_cli.ok("ca", "policy", "get", "--output", "json").json()
    assert restored["document"]["rules"] == original["document"]["rules"]


def test_invalid_policy_is_refused_and_changes_nothing(
    broker_cli: BrokerCli, tmp_path: Path
) -> None:
    before = broker_cli.ok("ca", "policy", "get", "--output", "json").json()
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"rules": [{"pattern": "spiffe://x/**", "x509_max_ttl": "48h"}]}))
    line = _assert_one_line_refusal(broker_cli.run("ca", "policy", "set", str(bad)))
    assert line.startswith("broker: ")
    after = broker_cli.ok("ca", "policy", "get", "--output", "json").json()
    assert after["version"] == before["version"]


def test_policy_get_output_feeds_back_into_set_unchanged(
    broker_cli: BrokerCli, tmp_path: Path
) -> None:
    # A rule that gives only some keys gets the defaults for the others (issue 15: the README
    # example was refused for missing keys); `get --output json` then round-trips into `set`.
    before = broker_cli.ok("ca", "policy", "get", "--output", "json").json()
    td = before["document"]["rules"][0]["pattern"].split("/")[2]
    partial = tmp_path / "partial.toml"
    partial.write_text(
        f'[[rules]]\npattern = "spiffe://{td}/acme/prod/*"\nx509_max_ttl = "12h"\n'
        f'key_types = ["ec-p256"]\n\n[[rules]]\npattern = "spiffe://{td}/**"\n'
    )
    try:
        broker_cli.ok("ca", "policy", "set", str(partial))
        got = broker_cli.ok("ca", "policy", "get", "--output", "json")
        first = got.json()
        prod, rest = first["document"]["rules"]
        assert prod["x509_max_ttl"] == "12h" and prod["x509_default_ttl"] == "1h"
        assert prod["jwt_default_ttl"] == "5m" and prod["jwt_max_ttl"] == "1h"
        assert prod["key_types"] == ["ec-p256"] and prod["dns_names"] == []
        assert rest["x509_max_ttl"] == before["document"]["rules"][0]["x509_max_ttl"]

        exported = tmp_path / "exported.json"
        exported.write_text(got.stdout)  # exactly what `get --output json` printed
        set_again = broker_cli.ok("ca", "policy", "set", str(exported))
        assert set_again.stdout.strip() == f"policy version {first['version'] + 1}"
        second = broker_cli.ok("ca", "policy", "get", "--output", "json").json()
        assert second["version"] == first["version"] + 1
        assert second["document"] == first["document"]

        # defaults never hide a mistake: an unknown key or a bad value is still refused
        for body, fragment in (
            ('x509_ttl = "1h"', "unknown key(s) x509_ttl"),
            ('x509_max_ttl = "25h"', "hard ceiling"),
        ):
            bad = tmp_path / "bad.toml"
            bad.write_text(f'[[rules]]\npattern = "spiffe://{td}/**"\n{body}\n')
            line = _assert_one_line_refusal(broker_cli.run("ca", "policy", "set", str(bad)))
            assert line.startswith("broker: invalid argument:") and fragment in line, line
        unchanged = broker_cli.ok("ca", "policy", "get", "--output", "json").json()
        assert unchanged["version"] == second["version"]
    finally:
        restore = tmp_path / "before.json"
        restore.write_text(json.dumps(before))
        broker_cli.ok("ca", "policy", "set", str(restore))
    after = broker_cli.ok("ca", "policy", "get", "--output", "json").json()
    assert after["document"] == before["document"]


# -- audit -------------------------------------------------------------------------------------


def test_audit_verify_and_tail_show_the_calls(broker_cli: BrokerCli, tmp_path: Path) -> None:
    spiffe_id = _workload_id(broker_cli, "audited")
    operator = _leaf(broker_cli.server.data_dir / "operator" / "svid.pem")
    operator_id = _uri_sans(operator)[0]
    broker_cli.ok(
        "svid",
        "mint",
        "--spiffe-id",
        spiffe_id,
        "--out",
        str(tmp_path / "a"),
        "--justification",
        "e2e-ticket-42",
    )

    verified = broker_cli.ok("audit", "verify")
    assert verified.stdout.startswith("audit ledger intact: ")
    assert int(verified.stdout.split(":")[1].split()[0]) > 0

    entries = _audit_events(broker_cli, 50)
    seqs = [e["seq"] for e in entries]
    assert seqs == sorted(seqs)
    mints = [e["event"] for e in entries if e["event"].get("resource") == spiffe_id]
    assert mints, entries
    event = mints[-1]
    assert event["who"] == operator_id
    assert event["what"] == "svid.mint"
    assert event["decision"] == "allow"
    assert event["outcome"] == "OK"
    assert event["why"] == "e2e-ticket-42"
    assert event.get("correlation_id")

    text = broker_cli.ok("audit", "tail", "-n", "5").stdout.splitlines()
    assert len(text) == 5


# -- refusals ----------------------------------------------------------------------------------


def _bad_csr_files(tmp_path: Path) -> dict[str, Path]:
    key = ec.generate_private_key(ec.SECP256R1())
    der = _make_csr(key).public_bytes(serialization.Encoding.DER)
    files = {
        "malformed": b"this is not a certificate request\n",
        "truncated": der[: len(der) // 2],
        # Flip a bit in the signature (the last bytes of the DER).
        "bad-signature": der[:-3] + bytes([der[-3] ^ 0x01]) + der[-2:],
        "huge": b"-----BEGIN CERTIFICATE REQUEST-----\n" + b"A" * (1 << 20) + b"\n",
    }
    paths = {}
    for name, data in files.items():
        path = tmp_path / f"{name}.csr"
        path.write_bytes(data)
        paths[name] = path
    return paths


BAD_REQUESTS = [
    ("dotdot", lambda td: f"spiffe://{td}/default/dev/../admin", []),
    ("other-domain", lambda td: "spiffe://evil.example/default/dev/web", []),
    ("too-long", lambda td: f"spiffe://{td}/default/dev/" + "a" * 2100, []),
    ("ttl-zero", lambda td: f"spiffe://{td}/default/dev/ttl-zero", ["--ttl", "0s"]),
    ("ttl-negative", lambda td: f"spiffe://{td}/default/dev/ttl-negative", ["--ttl", "-5m"]),
    ("ttl-too-long", lambda td: f"spiffe://{td}/default/dev/ttl-too-long", ["--ttl", "25h"]),
    ("csr-malformed", lambda td: f"spiffe://{td}/default/dev/csr-malformed", ["csr:malformed"]),
    ("csr-truncated", lambda td: f"spiffe://{td}/default/dev/csr-truncated", ["csr:truncated"]),
    ("csr-bad-signature", lambda td: f"spiffe://{td}/default/dev/csr-sig", ["csr:bad-signature"]),
    ("csr-huge", lambda td: f"spiffe://{td}/default/dev/csr-huge", ["csr:huge"]),
    # Nobody mints an operator (issue 11 item 5) or the broker itself; one operator alone does
    # not mint a production identity (issue 20 finding 4).
    ("operator-id", lambda td: f"spiffe://{td}/broker/operator/bob", []),
    ("server-id", lambda td: f"spiffe://{td}/broker/server", []),
    ("prod-alone", lambda td: f"spiffe://{td}/default/prod/web", []),
]


@pytest.mark.parametrize(
    ("case", "make_id", "extra"), BAD_REQUESTS, ids=[case for case, _, _ in BAD_REQUESTS]
)
def test_bad_mint_requests_are_refused_in_one_line_and_issue_nothing(
    broker_cli: BrokerCli, tmp_path: Path, case: str, make_id: Any, extra: list[str]
) -> None:
    spiffe_id = make_id(_trust_domain(broker_cli))
    args = []
    csrs = _bad_csr_files(tmp_path)
    for item in extra:
        args += ["--csr", str(csrs[item.split(":", 1)[1]])] if item.startswith("csr:") else [item]
    marker = _last_seq(broker_cli)
    out = tmp_path / "out"

    result = broker_cli.run("svid", "mint", "--spiffe-id", spiffe_id, *args, "--out", str(out))

    line = _assert_one_line_refusal(result)
    assert line.startswith("broker: "), line
    assert not out.exists()
    new_events = [e["event"] for e in _audit_events(broker_cli) if e["seq"] > marker]
    mints = [e for e in new_events if e.get("what") == "svid.mint"]
    assert all(e.get("outcome") != "OK" for e in mints), mints
    if case == "ttl-negative":
        assert mints == []  # refused by the CLI itself, never sent
    else:
        # Everything that reached the broker was audited as refused, the oversized request
        # included (the pipeline, not the transport, enforces the request size limit).
        assert mints, new_events
        assert all(e.get("outcome") not in ("", "OK") for e in mints)


def test_client_certificate_from_another_ca_is_refused_in_one_line(
    broker_cli: BrokerCli, tmp_path: Path
) -> None:
    now = dt.datetime.now(dt.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "rogue CA")])
    ca_cert = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=1))
        .not_valid_after(now + dt.timedelta(hours=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    operator_id = _uri_sans(_leaf(broker_cli.server.data_dir / "operator" / "svid.pem"))[0]
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([]))
        .issuer_name(ca_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=1))
        .not_valid_after(now + dt.timedelta(hours=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.UniformResourceIdentifier(operator_id)]),
            critical=True,
        )
        .sign(ca_key, hashes.SHA256())
    )
    cert_path, key_path = tmp_path / "rogue.pem", tmp_path / "rogue-key.pem"
    cert_path.write_bytes(
        cert.public_bytes(serialization.Encoding.PEM)
        + ca_cert.public_bytes(serialization.Encoding.PEM)
    )
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    result = broker_cli.run("ca", "status", "--cert", str(cert_path), "--key", str(key_path))
    line = _assert_one_line_refusal(result)
    assert result.returncode == 1
    assert "TLS" in line or "certificate" in line, line


def test_missing_credentials_and_unreachable_broker_are_one_line(
    broker_cli: BrokerCli, tmp_path: Path
) -> None:
    missing = broker_cli.run("ca", "status", env={"BROKER_DATA_DIR": str(tmp_path / "none")})
    line = _assert_one_line_refusal(missing)
    assert line == (
        f"broker: no client certificate at {tmp_path / 'none'}/operator/svid.pem "
        "(start 'broker serve --dev' or pass --cert)"
    )

    from tests.e2e.conftest import free_port

    address = f"127.0.0.1:{free_port()}"
    down = broker_cli.run("ca", "status", "--server", address)
    line = _assert_one_line_refusal(down)
    assert line.startswith(f"broker: cannot reach the broker at {address}: "), line


def test_localhost_and_ip_literal_both_work(broker_cli: BrokerCli) -> None:
    port = broker_cli.server.port
    for host in ("127.0.0.1", "localhost"):
        status = broker_cli.ok("ca", "status", "--output", "json", "--server", f"{host}:{port}")
        assert status.json()["trust_domain"]


# -- restart -----------------------------------------------------------------------------------


def test_restart_with_the_same_data_dir_keeps_the_root(tmp_path: Path) -> None:
    server = BrokerProcess(tmp_path / "data", tmp_path)
    cli = BrokerCli(server, tmp_path)
    server.start()
    try:
        assert "listening" in server.listening_line
        first = _status(cli)["root"]["fingerprint_sha256"]
        assert server.stop() == 0, server.stderr_text()
        server.start()
        second = _status(cli)["root"]["fingerprint_sha256"]
        assert first and second == first
        assert server.stop() == 0, server.stderr_text()
    finally:
        server.ensure_stopped()


def test_serve_on_a_busy_port_is_refused_in_one_line(
    broker_server: BrokerProcess, tmp_path: Path
) -> None:
    completed = subprocess.run(
        [
            sys.executable,
            "-m",
            "broker.cli",
            "serve",
            "--dev",
            "--data-dir",
            str(tmp_path / "data"),
            "--listen",
            broker_server.address,
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        cwd=tmp_path,
        env={k: v for k, v in os.environ.items() if not k.startswith(("BROKER_", "GRPC_"))},
    )
    assert completed.returncode == 1, completed.stderr
    assert "Traceback" not in completed.stderr
    # The daemon's structured log lines ({...}) and warnings may precede the refusal.
    refusals = [
        line
        for line in completed.stderr.splitlines()
        if line.startswith("broker: ") and not line.startswith("broker: warning:")
    ]
    assert len(refusals) == 1, completed.stderr
    assert broker_server.address in refusals[0]
    others = [
        line for line in completed.stderr.splitlines() if not line.startswith(("broker: ", "{"))
    ]
    assert others == [], completed.stderr


def test_status_version_and_output_env_against_a_real_broker(broker_cli: BrokerCli) -> None:
    """Issue 15 item 5 end to end: `broker status` (reachable, who, CA, expiry),
    `broker --version`, BROKER_OUTPUT."""
    status = broker_cli.ok("status", env={"BROKER_OUTPUT": "json"}).json()
    assert status["reachable"] is True and status["error"] is None
    assert status["identity"]["spiffe_id"].startswith("spiffe://")
    assert "/broker/operator/" in status["identity"]["spiffe_id"]
    assert status["identity"]["expires_in_seconds"] > 0
    assert status["ca"]["trust_domain"] == _trust_domain(broker_cli)
    assert status["ca"]["root"]["state"] == "active" and status["ca"]["issuing"]
    text = broker_cli.ok("status").stdout.splitlines()
    assert text[0].endswith(" reachable") and text[3].startswith("CA:")
    version = broker_cli.ok("--version").stdout.strip()
    assert version.startswith("broker ") and version != "broker unknown"


def test_health_of_an_unknown_service_is_one_plain_line(broker_cli: BrokerCli) -> None:
    # grpc.health.v1 answers NOT_FOUND without details; the CLI once printed the Python repr
    # of the error object (`<_InactiveRpcError of RPC ...>`).
    assert broker_cli.ok("health").stdout.strip() == "SERVING"
    unknown = broker_cli.run("health", "--service", "no.such.Service")
    line = _assert_one_line_refusal(unknown)
    assert line.startswith("broker: not found: the broker reports no health status for service")
    assert "'no.such.Service'" in line
    assert not any(text in line for text in ("<_", "StatusCode", "debug_error_string"))
