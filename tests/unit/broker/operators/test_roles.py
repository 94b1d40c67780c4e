"""Subjects as SPIFFE path segments (escaped injectively, path characters refused), role
mapping from a claim, and the certificate extension that carries roles."""

from __future__ import annotations

import datetime as dt

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec

from broker.errors import Unauthenticated
from broker.operators.roles import (
    OperatorClaims,
    map_roles,
    operator_claims_of,
    roles_extension,
    subject_segment,
)


@pytest.mark.parametrize(
    ("subject", "segment"),
    [
        ("alice", "alice"),
        ("alice@example.org", "alice_40example.org"),
        ("a_b", "a__b"),
        ("a+tag@x", "a_2btag_40x"),
        ("248289761001", "248289761001"),
    ],
)
def test_subjects_become_one_segment(subject: str, segment: str) -> None:
    assert subject_segment(subject) == segment


def test_the_escape_is_injective() -> None:
    assert subject_segment("a_40b") != subject_segment("a@b")


@pytest.mark.parametrize(
    "subject",
    ["mallory/../alice", "../x", "..", ".", "a/b", "a%2fb", "a b", "a\\b", "", "é", "x" * 129],
)
def test_path_characters_are_refused(subject: str) -> None:
    with pytest.raises(Unauthenticated):
        subject_segment(subject)


def test_roles_come_from_the_configured_claim() -> None:
    mapping = {"admin": ("ops",), "auditor": ("audit", "sec")}
    assert map_roles({"groups": ["ops", "x"]}, "groups", mapping) == {"admin"}
    assert map_roles({"groups": "sec"}, "groups", mapping) == {"auditor"}
    assert map_roles({"groups": ["nothing"]}, "groups", mapping) == frozenset()
    assert map_roles({"groups": {"ops": 1}}, "groups", mapping) == frozenset()
    assert map_roles({}, "groups", mapping) == frozenset()


def _cert(extensions: list[x509.ExtensionType]) -> x509.Certificate:
    key = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(dt.UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([]))
        .issuer_name(x509.Name([x509.NameAttribute(x509.OID_COMMON_NAME, "t")]))
        .public_key(key.public_key())
        .serial_number(1)
        .not_valid_before(now)
        .not_valid_after(now + dt.timedelta(hours=1))
    )
    for ext in extensions:
        builder = builder.add_extension(ext, critical=False)
    return builder.sign(key, hashes.SHA256())


def test_the_extension_round_trips() -> None:
    claims = OperatorClaims("alice", frozenset({"admin", "auditor"}), ("pwd", "otp"), "https://i")
    assert operator_claims_of(_cert([roles_extension(claims)])) == claims
    assert operator_claims_of(_cert([])) is None
    long = OperatorClaims("a" * 128, frozenset({"security"}), ("x" * 200,), "https://i" * 20)
    assert operator_claims_of(_cert([roles_extension(long)])) == long
