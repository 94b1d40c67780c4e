from __future__ import annotations

import base64
import datetime as dt
import json
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import NameOID

from ca.bundle import DEFAULT_REFRESH_HINT_SECONDS, TrustBundle
from ca.errors import InvalidInput, InvalidSpiffeId
from ca.jwtsvid import jwt_kid, public_jwk
from ca.x509svid import build_root

NOW = dt.datetime(2026, 3, 1, 12, 0, 0, tzinfo=dt.UTC)
DAY = dt.timedelta(days=1)


@pytest.fixture(scope="module")
def root() -> x509.Certificate:
    return build_root(ec.generate_private_key(ec.SECP256R1()), "example.org", NOW, DAY * 365)


@pytest.fixture(scope="module")
def next_root() -> x509.Certificate:
    return build_root(ec.generate_private_key(ec.SECP384R1()), "example.org", NOW, DAY * 365)


@pytest.fixture(scope="module")
def jwt_key() -> ec.EllipticCurvePublicKey:
    return ec.generate_private_key(ec.SECP256R1()).public_key()


@pytest.fixture(scope="module")
def bundle(
    root: x509.Certificate, next_root: x509.Certificate, jwt_key: ec.EllipticCurvePublicKey
) -> TrustBundle:
    return TrustBundle(
        trust_domain="example.org",
        x509_authorities=[root, next_root],
        jwt_authorities={jwt_kid(jwt_key): jwt_key},
        sequence=42,
        refresh_hint_seconds=300,
    )


def der(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.DER)


def test_jwks_shape(bundle: TrustBundle, root: x509.Certificate, jwt_key: Any) -> None:
    doc = bundle.to_jwks()
    assert set(doc) == {"keys", "spiffe_sequence", "spiffe_refresh_hint"}
    assert doc["spiffe_sequence"] == 42
    assert doc["spiffe_refresh_hint"] == 300
    x509_keys = [k for k in doc["keys"] if k["use"] == "x509-svid"]
    jwt_keys = [k for k in doc["keys"] if k["use"] == "jwt-svid"]
    assert len(x509_keys) == 2 and len(jwt_keys) == 1
    first = x509_keys[0]
    assert set(first) == {"kty", "use", "crv", "x", "y", "x5c"}
    assert "kid" not in first
    assert first["kty"] == "EC" and first["crv"] == "P-256"
    assert len(first["x5c"]) == 1
    # x5c is standard base64 (RFC 7517 4.7), not base64url.
    assert base64.b64decode(first["x5c"][0], validate=True) == der(root)
    assert x509_keys[1]["crv"] == "P-384"
    jwt_entry = jwt_keys[0]
    assert set(jwt_entry) == {"kty", "use", "kid", "crv", "x", "y"}
    assert jwt_entry["kid"] == jwt_kid(jwt_key)
    assert {k: jwt_entry[k] for k in ("kty", "crv", "x", "y")} == public_jwk(jwt_key)


def test_jwks_json_round_trip(bundle: TrustBundle) -> None:
    data = bundle.to_jwks_json()
    assert isinstance(data, bytes)
    assert json.loads(data) == bundle.to_jwks()
    parsed = TrustBundle.from_jwks("example.org", data)
    assert parsed == bundle
    assert parsed.to_jwks_json() == data
    assert TrustBundle.from_jwks("spiffe://example.org", data.decode()) == bundle
    assert TrustBundle.from_jwks("example.org", bundle.to_jwks()) == bundle


def test_jwt_only_jwks(bundle: TrustBundle, jwt_key: Any) -> None:
    doc = json.loads(bundle.to_jwt_jwks_json())
    assert doc == bundle.to_jwt_jwks()
    assert [k["kid"] for k in doc["keys"]] == [jwt_kid(jwt_key)]
    assert all(k["use"] == "jwt-svid" for k in doc["keys"])


def test_pem_and_der(
    bundle: TrustBundle, root: x509.Certificate, next_root: x509.Certificate
) -> None:
    assert x509.load_pem_x509_certificates(bundle.to_pem()) == [root, next_root]
    assert bundle.x509_der_concat() == der(root) + der(next_root)


def test_rsa_authority(jwt_key: Any) -> None:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "rsa root")])
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(NOW)
        .not_valid_after(NOW + DAY)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    bundle = TrustBundle("example.org", [cert], {"rsa-jwt": key.public_key()}, 1, 60)
    entries = bundle.to_jwks()["keys"]
    assert set(entries[0]) == {"kty", "use", "n", "e", "x5c"}
    assert entries[0]["e"] == "AQAB"
    assert TrustBundle.from_jwks("example.org", bundle.to_jwks_json()) == bundle


def test_immutable(bundle: TrustBundle, jwt_key: Any) -> None:
    with pytest.raises(TypeError):
        bundle.jwt_authorities["x"] = jwt_key  # type: ignore[index]
    assert isinstance(bundle.x509_authorities, tuple)


def test_empty_bundle_and_defaults() -> None:
    parsed = TrustBundle.from_jwks("example.org", b'{"keys": []}')
    assert parsed.x509_authorities == ()
    assert dict(parsed.jwt_authorities) == {}
    assert parsed.sequence == 0
    assert parsed.refresh_hint_seconds == DEFAULT_REFRESH_HINT_SECONDS


def test_unknown_use_and_kty_are_ignored(bundle: TrustBundle) -> None:
    doc = bundle.to_jwks()
    doc["keys"].append({"kty": "EC", "use": "wit-svid", "kid": "w", "crv": "P-256"})
    doc["keys"].append({"kty": "OKP", "use": "jwt-svid", "kid": "o", "crv": "Ed25519", "x": "A"})
    parsed = TrustBundle.from_jwks("example.org", doc)
    assert parsed == bundle


def test_constructor_validation(root: x509.Certificate, jwt_key: Any) -> None:
    with pytest.raises(InvalidSpiffeId):
        TrustBundle("Example.org", [root], {})
    with pytest.raises(InvalidInput, match="sequence"):
        TrustBundle("example.org", [root], {}, sequence=-1)
    with pytest.raises(InvalidInput, match="refresh hint"):
        TrustBundle("example.org", [root], {}, refresh_hint_seconds=True)
    with pytest.raises(InvalidInput, match="kids must be non-empty"):
        TrustBundle("example.org", [root], {"": jwt_key})
    with pytest.raises(InvalidInput, match="certificates"):
        TrustBundle("example.org", [der(root)], {})  # type: ignore[list-item]


def _mutate(bundle: TrustBundle, index: int, **changes: Any) -> dict[str, Any]:
    doc = bundle.to_jwks()
    entry = doc["keys"][index]
    for key, value in changes.items():
        if value is None:
            entry.pop(key, None)
        else:
            entry[key] = value
    return doc


@pytest.mark.parametrize(
    ("index", "changes", "fragment"),
    [
        (0, {"x5c": None}, "exactly one 'x5c'"),
        (0, {"x5c": []}, "exactly one 'x5c'"),
        (0, {"x5c": ["AAAA", "BBBB"]}, "exactly one 'x5c'"),
        (0, {"x5c": ["not base64!"]}, "not a base64 DER certificate"),
        (0, {"x5c": ["MIIB"]}, "not a base64 DER certificate"),
        (0, {"kid": "k"}, "must not have a 'kid'"),
        (0, {"use": 7}, "string 'kty' and 'use'"),
        (0, {"x": None}, "not base64url"),
        (1, {"x5c": None}, "exactly one 'x5c'"),
        (2, {"kid": None}, "must have a non-empty 'kid'"),
        (2, {"kid": ""}, "must have a non-empty 'kid'"),
        (2, {"crv": "P-999"}, "crv 'P-999'"),
    ],
)
def test_malformed_entries_refused(
    bundle: TrustBundle, index: int, changes: dict[str, Any], fragment: str
) -> None:
    with pytest.raises(InvalidInput, match=fragment):
        TrustBundle.from_jwks("example.org", _mutate(bundle, index, **changes))


def test_url_safe_x5c_refused(bundle: TrustBundle) -> None:
    doc = bundle.to_jwks()
    value = doc["keys"][0]["x5c"][0]
    url_safe = value.replace("+", "-").replace("/", "_")
    # ~700 base64 characters without '+' or '/' has probability below 1e-9.
    assert url_safe != value
    doc["keys"][0]["x5c"] = [url_safe]
    with pytest.raises(InvalidInput, match="not a base64 DER"):
        TrustBundle.from_jwks("example.org", doc)


def test_jwk_members_must_match_certificate(
    bundle: TrustBundle, next_root: x509.Certificate
) -> None:
    doc = bundle.to_jwks()
    doc["keys"][0]["x5c"] = [base64.b64encode(der(next_root)).decode()]
    with pytest.raises(InvalidInput, match="do not match the 'x5c'"):
        TrustBundle.from_jwks("example.org", doc)


def test_duplicate_kid_refused(bundle: TrustBundle) -> None:
    doc = bundle.to_jwks()
    doc["keys"].append(dict(doc["keys"][2]))
    with pytest.raises(InvalidInput, match="appears twice"):
        TrustBundle.from_jwks("example.org", doc)


@pytest.mark.parametrize(
    ("data", "fragment"),
    [
        (b"not json", "not valid JSON"),
        (b"\xff\xfe", "not valid JSON"),
        (b"[]", "not a JSON object"),
        (b"{}", "'keys' is missing"),
        (b'{"keys": {}}', "'keys' is missing or not a list"),
        (b'{"keys": [1]}', "keys\\[0\\] is not a JSON object"),
        (b'{"keys": [], "spiffe_sequence": -1}', "spiffe_sequence"),
        (b'{"keys": [], "spiffe_sequence": true}', "spiffe_sequence"),
        (b'{"keys": [], "spiffe_sequence": 1.5}', "spiffe_sequence"),
        (b'{"keys": [], "spiffe_refresh_hint": "300"}', "spiffe_refresh_hint"),
        (b" " * (1 << 20) + b"{}", "over the limit"),
    ],
)
def test_malformed_documents_refused(data: bytes, fragment: str) -> None:
    with pytest.raises(InvalidInput, match=fragment):
        TrustBundle.from_jwks("example.org", data)
