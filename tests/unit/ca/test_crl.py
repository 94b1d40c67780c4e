"""CRLs signed by an issuing CA: RFC 5280 fields, the listed serials, the signature."""

from __future__ import annotations

import datetime as dt

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from ca.crl import build_crl, revoked_serials
from ca.errors import InvalidInput

NOW = dt.datetime(2026, 12, 3, 12, 0, tzinfo=dt.UTC)


def _ca(key: ec.EllipticCurvePrivateKey) -> x509.Certificate:
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "issuing")])
    return (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(1)
        .not_valid_before(NOW - dt.timedelta(days=1))
        .not_valid_after(NOW + dt.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .sign(key, hashes.SHA256())
    )


def test_a_crl_lists_the_serials_and_verifies_under_its_issuer() -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    issuer = _ca(key)
    der = build_crl(
        issuer,
        key,
        [(0xABC, NOW - dt.timedelta(minutes=1)), (0x1234, NOW)],
        this_update=NOW,
        next_update=NOW + dt.timedelta(hours=1),
        number=7,
    )
    crl = x509.load_der_x509_crl(der)
    assert crl.is_signature_valid(issuer.public_key())  # type: ignore[arg-type]
    assert not crl.is_signature_valid(ec.generate_private_key(ec.SECP256R1()).public_key())
    assert crl.issuer == issuer.subject
    assert revoked_serials(der) == {0xABC, 0x1234}
    assert crl.extensions.get_extension_for_class(x509.CRLNumber).value.crl_number == 7
    assert crl.next_update_utc == NOW + dt.timedelta(hours=1)
    aki = crl.extensions.get_extension_for_class(x509.AuthorityKeyIdentifier).value
    ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
    assert aki.key_identifier == ski.digest


def test_an_empty_crl_is_still_signed() -> None:
    key = ec.generate_private_key(ec.SECP384R1())
    der = build_crl(
        _ca(key), key, [], this_update=NOW, next_update=NOW + dt.timedelta(hours=1), number=1
    )
    crl = x509.load_der_x509_crl(der)
    assert len(crl) == 0 and crl.is_signature_valid(key.public_key())
    assert isinstance(crl.signature_hash_algorithm, hashes.SHA384)


def test_next_update_must_follow_this_update() -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    with pytest.raises(InvalidInput):
        build_crl(_ca(key), key, [], this_update=NOW, next_update=NOW, number=1)
