"""X509-SVID profiles: every MUST of the spec, real verifiers (cryptography, openssl), pkilint."""

from __future__ import annotations

import datetime as dt
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.hazmat.primitives.asymmetric.utils import Prehashed
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from pkilint import loader
from pkilint.pkix import certificate, extension, name
from pkilint.validation import ValidationFindingSeverity

from ca.errors import (
    CAStateError,
    IntegrityError,
    InvalidInput,
    InvalidSpiffeId,
    InvalidTTL,
    PolicyViolation,
)
from ca.spiffeid import SpiffeId
from ca.x509svid import (
    DEFAULT_BACKDATE,
    LINEAGE_OID,
    MAX_LINEAGE,
    IssuedSVID,
    Lineage,
    build_intermediate,
    build_leaf,
    build_root,
    chain_der,
    chain_pem,
    server_name,
    spiffe_id_of,
    trust_domain_of_roots,
    verify_chain,
)
from tests.unit.ca.signers import NoExportSigner

NOW = dt.datetime(2026, 3, 1, 12, 0, 0, tzinfo=dt.UTC)
TD = "example.org"
WORKLOAD = SpiffeId.parse("spiffe://example.org/acme/prod/web")
HOUR = dt.timedelta(hours=1)
DAY = dt.timedelta(days=1)


# --- pkilint, reproducing what the `lint_pkix_cert lint` command does -------------------------

_LINTER = certificate.create_pkix_certificate_validator_container(
    certificate.create_decoding_validators(
        name.ATTRIBUTE_TYPE_MAPPINGS, extension.EXTENSION_MAPPINGS
    ),
    [
        certificate.create_issuer_validator_container([]),
        certificate.create_validity_validator_container(),
        certificate.create_subject_validator_container([]),
        certificate.create_extensions_validator_container([]),
        certificate.create_spki_validator_container([]),
    ],
)
# pkilint 0.13 parses URIs with a web-centric grammar and flags every spiffe:// URI.
_KNOWN_FALSE_POSITIVES = {"pkix.invalid_uri_syntax"}


def lint_errors(cert: x509.Certificate) -> list[str]:
    document = loader.RFC5280CertificateDocumentLoader().load_der_document(
        cert.public_bytes(serialization.Encoding.DER), "cert"
    )
    return [
        f"{fd.finding.code}: {fd.message}"
        for result in _LINTER.validate(document.root)
        for fd in result.finding_descriptions
        if fd.finding.severity <= ValidationFindingSeverity.ERROR
        and fd.finding.code not in _KNOWN_FALSE_POSITIVES
    ]


# --- fixtures ---------------------------------------------------------------------------------


class PKI:
    def __init__(self, root_curve: ec.EllipticCurve | None = None) -> None:
        self.root_key = NoExportSigner(ec.generate_private_key(root_curve or ec.SECP256R1()))
        self.issuing_key = NoExportSigner(ec.generate_private_key(ec.SECP256R1()))
        self.root = build_root(self.root_key, TD, NOW - DAY, dt.timedelta(days=365))
        self.intermediate = build_intermediate(
            self.root_key,
            self.root,
            self.issuing_key.public_key(),
            TD,
            NOW - HOUR,
            dt.timedelta(days=7),
        )

    def leaf(self, public_key: Any = None, **kwargs: Any) -> x509.Certificate:
        key = public_key or ec.generate_private_key(ec.SECP256R1()).public_key()
        kwargs.setdefault("spiffe_id", WORKLOAD)
        kwargs.setdefault("now", NOW)
        kwargs.setdefault("ttl", HOUR)
        return build_leaf(self.issuing_key, self.intermediate, key, **kwargs)


@pytest.fixture(scope="module")
def pki() -> PKI:
    return PKI()


@pytest.fixture(scope="module")
def rsa_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


@pytest.fixture(scope="module")
def leaf(pki: PKI) -> x509.Certificate:
    return pki.leaf()


def ext(cert: x509.Certificate, cls: type[Any]) -> x509.Extension[Any]:
    return cert.extensions.get_extension_for_class(cls)


# --- the HSM path ------------------------------------------------------------------------------


def test_signer_never_exports_private_material(pki: PKI) -> None:
    with pytest.raises(AssertionError):
        pki.root_key.private_bytes(
            serialization.Encoding.DER,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    before = pki.issuing_key.sign_calls
    pki.leaf()
    assert pki.issuing_key.sign_calls == before + 1
    assert pki.root_key.sign_calls >= 2  # root and intermediate were signed through sign()


# --- leaf: each MUST of the X509-SVID profile ---------------------------------------------------


def test_leaf_has_exactly_one_uri_san_the_spiffe_id(leaf: x509.Certificate) -> None:
    san = ext(leaf, x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.UniformResourceIdentifier) == [WORKLOAD.id_string]
    assert spiffe_id_of(leaf) == WORKLOAD


def test_leaf_san_critical_when_subject_empty(leaf: x509.Certificate) -> None:
    assert len(leaf.subject.rdns) == 0
    assert ext(leaf, x509.SubjectAlternativeName).critical is True


def test_leaf_san_not_critical_with_subject(pki: PKI) -> None:
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "web")])
    cert = pki.leaf(subject=subject)
    assert cert.subject == subject
    assert ext(cert, x509.SubjectAlternativeName).critical is False


def test_leaf_basic_constraints_ca_false_critical(leaf: x509.Certificate) -> None:
    bc = ext(leaf, x509.BasicConstraints)
    assert bc.critical is True
    assert bc.value.ca is False
    assert bc.value.path_length is None


def test_leaf_key_usage_ec_digital_signature_only(leaf: x509.Certificate) -> None:
    ku = ext(leaf, x509.KeyUsage)
    assert ku.critical is True
    assert ku.value.digital_signature is True
    assert ku.value.key_cert_sign is False
    assert ku.value.crl_sign is False
    assert ku.value.key_encipherment is False
    assert ku.value.key_agreement is False
    assert ku.value.content_commitment is False
    assert ku.value.data_encipherment is False


def test_leaf_key_usage_rsa_adds_key_encipherment(pki: PKI, rsa_key: rsa.RSAPrivateKey) -> None:
    ku = ext(pki.leaf(rsa_key.public_key()), x509.KeyUsage).value
    assert ku.digital_signature and ku.key_encipherment
    assert not (ku.key_cert_sign or ku.crl_sign or ku.key_agreement)


def test_leaf_eku_server_and_client_auth(leaf: x509.Certificate) -> None:
    eku = ext(leaf, x509.ExtendedKeyUsage).value
    assert set(eku) == {ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH}


def test_leaf_ski_and_aki(pki: PKI, leaf: x509.Certificate) -> None:
    ski = ext(leaf, x509.SubjectKeyIdentifier).value
    assert ski == x509.SubjectKeyIdentifier.from_public_key(leaf.public_key())  # type: ignore[arg-type]
    aki = ext(leaf, x509.AuthorityKeyIdentifier).value
    assert aki.key_identifier == ext(pki.intermediate, x509.SubjectKeyIdentifier).value.digest
    assert leaf.issuer == pki.intermediate.subject


def test_leaf_serials_are_random_positive_and_wide(pki: PKI) -> None:
    key = ec.generate_private_key(ec.SECP256R1()).public_key()
    serials = [pki.leaf(key).serial_number for _ in range(200)]
    assert len(set(serials)) == 200
    assert all(0 < s < 2**159 for s in serials)
    # 159 random bits: a serial under 2^64 has probability 2^-95.
    assert all(s.bit_length() > 64 for s in serials)
    assert max(s.bit_length() for s in serials) > 150


def test_leaf_validity_backdated_and_ttl(leaf: x509.Certificate) -> None:
    assert dt.timedelta(seconds=30) == DEFAULT_BACKDATE
    assert leaf.not_valid_before_utc == NOW - DEFAULT_BACKDATE
    assert leaf.not_valid_after_utc == NOW + HOUR


def test_leaf_backdate_configurable(pki: PKI) -> None:
    cert = pki.leaf(backdate=dt.timedelta(seconds=5))
    assert cert.not_valid_before_utc == NOW - dt.timedelta(seconds=5)
    with pytest.raises(InvalidInput, match="backdate"):
        pki.leaf(backdate=dt.timedelta(hours=2))


def test_leaf_capped_at_issuer_not_after(pki: PKI) -> None:
    near_end = pki.intermediate.not_valid_after_utc - dt.timedelta(minutes=10)
    cert = pki.leaf(now=near_end, ttl=HOUR)
    assert cert.not_valid_after_utc == pki.intermediate.not_valid_after_utc
    verify_chain(cert, [pki.intermediate], [pki.root], near_end)


def test_leaf_not_before_not_before_issuer(pki: PKI) -> None:
    at_start = pki.intermediate.not_valid_before_utc + dt.timedelta(seconds=1)
    cert = pki.leaf(now=at_start)
    assert cert.not_valid_before_utc == pki.intermediate.not_valid_before_utc


def test_leaf_dns_names(pki: PKI) -> None:
    cert = pki.leaf(dns_names=["Web.Example.org", "web.example.org", "*.svc.local"])
    san = ext(cert, x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["web.example.org", "*.svc.local"]
    assert san.get_values_for_type(x509.UniformResourceIdentifier) == [WORKLOAD.id_string]


@pytest.mark.parametrize("bad", ["", "a..b", "-a.b", "a_b.c", "ex ample", "é.org", "*", "a" * 64])
def test_leaf_bad_dns_names_refused(pki: PKI, bad: str) -> None:
    with pytest.raises(InvalidInput, match="not a valid hostname"):
        pki.leaf(dns_names=[bad])


SERVER = SpiffeId.parse("spiffe://example.org/broker/server")


def test_the_reserved_server_name_goes_only_with_the_brokers_id(pki: PKI) -> None:
    name = server_name(TD)
    cert = pki.leaf(spiffe_id=SERVER, dns_names=[name, "localhost"])
    san = ext(cert, x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == [name, "localhost"]
    for sid, dns in (
        (WORKLOAD, name),  # a workload with the broker's name
        (WORKLOAD, "*.example.org.spiffe.invalid"),
        (SERVER, "server.broker.other.org.spiffe.invalid"),  # another domain's name
    ):
        with pytest.raises(PolicyViolation, match="reserved for the broker's serving"):
            pki.leaf(spiffe_id=sid, dns_names=[dns])


def test_the_trust_domain_of_a_bundle_comes_from_its_roots(pki: PKI) -> None:
    assert trust_domain_of_roots([pki.root]).name == TD
    with pytest.raises(InvalidInput, match="no trust domain"):
        trust_domain_of_roots([])
    other = build_root(ec.generate_private_key(ec.SECP256R1()), "other.org", NOW, DAY)
    with pytest.raises(InvalidInput, match="several"):
        trust_domain_of_roots([pki.root, other])


def test_leaf_signature_hash_follows_issuer_curve() -> None:
    p384 = PKI(root_curve=ec.SECP384R1())
    assert isinstance(p384.intermediate.signature_hash_algorithm, hashes.SHA384)
    assert isinstance(p384.leaf().signature_hash_algorithm, hashes.SHA256)


def test_leaf_ed25519_subject_key(pki: PKI) -> None:
    cert = pki.leaf(ed25519.Ed25519PrivateKey.generate().public_key())
    assert ext(cert, x509.KeyUsage).value.key_encipherment is False
    verify_chain(cert, [pki.intermediate], [pki.root], NOW)


# --- leaf refusals -----------------------------------------------------------------------------


@pytest.mark.parametrize("ttl", [dt.timedelta(0), dt.timedelta(seconds=-1), -HOUR])
def test_leaf_non_positive_ttl_refused(pki: PKI, ttl: dt.timedelta) -> None:
    with pytest.raises(InvalidTTL, match="must be positive"):
        pki.leaf(ttl=ttl)


def test_leaf_over_24h_refused(pki: PKI) -> None:
    with pytest.raises(PolicyViolation, match="hard ceiling of 24h"):
        pki.leaf(ttl=DAY + dt.timedelta(seconds=1))
    # The 24 h ceiling is on the validity window: the 30 s backdate comes out of it.
    full = pki.leaf(ttl=DAY)
    assert full.not_valid_after_utc - full.not_valid_before_utc == DAY
    assert full.not_valid_after_utc == NOW + DAY - DEFAULT_BACKDATE


@pytest.mark.parametrize("backdate", [dt.timedelta(0), DEFAULT_BACKDATE, dt.timedelta(minutes=10)])
def test_leaf_validity_window_never_exceeds_24h(pki: PKI, backdate: dt.timedelta) -> None:
    """Issue 20 finding 13: a --ttl 24h SVID was valid 24 h 30 s (notBefore backdated)."""
    for ttl in (DAY, DAY - dt.timedelta(seconds=1), HOUR):
        cert = pki.leaf(ttl=ttl, backdate=backdate)
        window = cert.not_valid_after_utc - cert.not_valid_before_utc
        assert window <= DAY
        assert cert.not_valid_after_utc == min(NOW + ttl, NOW - backdate + DAY)


def test_lineage_round_trips_and_caps_not_after(pki: PKI) -> None:
    cap = NOW + dt.timedelta(minutes=10)
    lineage = Lineage(minted_by="spiffe://example.org/broker/operator/a", ancestors=("ab12",))
    child = lineage.child("cd34", capped_until=cap)
    cert = pki.leaf(ttl=DAY, lineage=child)
    assert cert.not_valid_after_utc == cap
    got = Lineage.of(cert)
    assert got == Lineage("spiffe://example.org/broker/operator/a", ("ab12", "cd34"), cap)
    assert not cert.extensions.get_extension_for_oid(LINEAGE_OID).critical
    assert Lineage.of(pki.leaf()) is None
    # A chain keeps only its most recent ancestors; the cap is inherited and only lowered.
    long = Lineage(ancestors=tuple(format(i + 1, "x") for i in range(MAX_LINEAGE)))
    assert long.child("ff", capped_until=None).ancestors[-1] == "ff"
    assert len(long.child("ff", capped_until=None).ancestors) == MAX_LINEAGE
    assert child.child("ee", capped_until=None).capped_until == cap
    assert child.child("ee", capped_until=NOW).capped_until == NOW
    with pytest.raises(PolicyViolation, match="expired"):
        pki.leaf(lineage=Lineage(ancestors=("ab",), capped_until=NOW))


def test_leaf_without_path_refused(pki: PKI) -> None:
    with pytest.raises(InvalidSpiffeId, match="has no path"):
        pki.leaf(spiffe_id="spiffe://example.org")


def test_leaf_in_other_trust_domain_refused(pki: PKI) -> None:
    with pytest.raises(InvalidSpiffeId, match=r"not in the issuer's trust domain 'example.org'"):
        pki.leaf(spiffe_id="spiffe://other.org/web")


def test_leaf_malformed_id_refused(pki: PKI) -> None:
    with pytest.raises(InvalidSpiffeId, match=r"'..' is not allowed"):
        pki.leaf(spiffe_id="spiffe://example.org/a/../b")


def test_leaf_weak_subject_keys_refused(pki: PKI) -> None:
    small = rsa.generate_private_key(public_exponent=65537, key_size=1024)
    with pytest.raises(InvalidInput, match="too small"):
        pki.leaf(small.public_key())
    with pytest.raises(InvalidInput, match="secp256k1 is not supported"):
        pki.leaf(ec.generate_private_key(ec.SECP256K1()).public_key())


def test_expired_issuer_refused(pki: PKI) -> None:
    later = pki.intermediate.not_valid_after_utc
    with pytest.raises(CAStateError, match="expired"):
        pki.leaf(now=later)


def test_issuer_not_yet_valid_refused(pki: PKI) -> None:
    with pytest.raises(CAStateError, match="not valid before"):
        pki.leaf(now=pki.intermediate.not_valid_before_utc - dt.timedelta(seconds=1))


def test_signer_not_matching_issuer_refused(pki: PKI) -> None:
    wrong = NoExportSigner(ec.generate_private_key(ec.SECP256R1()))
    with pytest.raises(CAStateError, match="does not match"):
        build_leaf(wrong, pki.intermediate, pki.issuing_key.public_key(), WORKLOAD, NOW, HOUR)


def test_leaf_cannot_issue(pki: PKI) -> None:
    leaf_key = NoExportSigner(ec.generate_private_key(ec.SECP256R1()))
    leaf = pki.leaf(leaf_key.public_key())
    with pytest.raises(CAStateError, match="not a CA"):
        build_leaf(leaf_key, leaf, leaf_key.public_key(), WORKLOAD, NOW, HOUR)


# --- root and intermediate ---------------------------------------------------------------------


def test_root_profile(pki: PKI) -> None:
    root = pki.root
    bc = ext(root, x509.BasicConstraints)
    assert bc.critical and bc.value.ca and bc.value.path_length == 1
    ku = ext(root, x509.KeyUsage)
    assert ku.critical
    assert ku.value.key_cert_sign and ku.value.crl_sign
    assert not ku.value.digital_signature
    ski = ext(root, x509.SubjectKeyIdentifier).value
    assert ski == x509.SubjectKeyIdentifier.from_public_key(pki.root_key.public_key())
    assert ext(root, x509.AuthorityKeyIdentifier).value.key_identifier == ski.digest
    assert root.subject == root.issuer
    assert root.subject.get_attributes_for_oid(NameOID.ORGANIZATION_NAME)[0].value == TD
    assert root.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "SPIFFE root CA"
    san = ext(root, x509.SubjectAlternativeName)
    assert san.critical is False
    assert san.value.get_values_for_type(x509.UniformResourceIdentifier) == ["spiffe://example.org"]
    root.verify_directly_issued_by(root)
    assert root.not_valid_before_utc == NOW - DAY - DEFAULT_BACKDATE
    assert root.not_valid_after_utc == NOW - DAY + dt.timedelta(days=365)


def test_root_options() -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    root = build_root(
        key, "spiffe://example.org", NOW, DAY, subject_cn="Acme root", path_length=None
    )
    assert ext(root, x509.BasicConstraints).value.path_length is None
    assert root.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "Acme root"
    with pytest.raises(InvalidTTL):
        build_root(key, TD, NOW, dt.timedelta(0))
    with pytest.raises(InvalidInput, match="common name"):
        build_root(key, TD, NOW, DAY, subject_cn="x" * 65)


def test_root_for_long_trust_domain_stays_within_name_bounds() -> None:
    td = "a" * 200 + ".example.org"
    root = build_root(ec.generate_private_key(ec.SECP256R1()), td, NOW, DAY)
    assert lint_errors(root) == []
    uris = ext(root, x509.SubjectAlternativeName).value.get_values_for_type(
        x509.UniformResourceIdentifier
    )
    assert uris == ["spiffe://" + td]


def test_intermediate_profile(pki: PKI) -> None:
    inter = pki.intermediate
    bc = ext(inter, x509.BasicConstraints)
    assert bc.critical and bc.value.ca and bc.value.path_length == 0
    ku = ext(inter, x509.KeyUsage)
    assert ku.critical and ku.value.key_cert_sign and ku.value.crl_sign
    assert not ku.value.digital_signature
    assert ext(inter, x509.SubjectKeyIdentifier).value == x509.SubjectKeyIdentifier.from_public_key(
        pki.issuing_key.public_key()
    )
    assert (
        ext(inter, x509.AuthorityKeyIdentifier).value.key_identifier
        == ext(pki.root, x509.SubjectKeyIdentifier).value.digest
    )
    assert inter.issuer == pki.root.subject
    inter.verify_directly_issued_by(pki.root)
    assert inter.not_valid_after_utc == NOW - HOUR + dt.timedelta(days=7)


def test_intermediate_capped_at_root_not_after(pki: PKI) -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    late = pki.root.not_valid_after_utc - DAY
    inter = build_intermediate(
        pki.root_key, pki.root, key.public_key(), TD, late, dt.timedelta(days=30)
    )
    assert inter.not_valid_after_utc == pki.root.not_valid_after_utc


def test_intermediate_refusals(pki: PKI) -> None:
    key = ec.generate_private_key(ec.SECP256R1()).public_key()
    with pytest.raises(CAStateError, match="does not match"):
        build_intermediate(pki.issuing_key, pki.root, key, TD, NOW, DAY)
    with pytest.raises(CAStateError, match="expired"):
        build_intermediate(pki.root_key, pki.root, key, TD, pki.root.not_valid_after_utc, DAY)
    with pytest.raises(InvalidTTL):
        build_intermediate(pki.root_key, pki.root, key, TD, NOW, -DAY)


# --- verification with real verifiers ----------------------------------------------------------


def test_verify_chain_ok(pki: PKI, leaf: x509.Certificate) -> None:
    verify_chain(leaf, [pki.intermediate], [pki.root], NOW)
    verify_chain(leaf, [pki.intermediate], [pki.root], NOW, trust_domain=TD)


def test_verify_chain_rsa_leaf(pki: PKI, rsa_key: rsa.RSAPrivateKey) -> None:
    verify_chain(pki.leaf(rsa_key.public_key()), [pki.intermediate], [pki.root], NOW)


def test_verify_chain_refusals(pki: PKI, leaf: x509.Certificate) -> None:
    with pytest.raises(IntegrityError, match="does not verify"):
        verify_chain(leaf, [], [pki.root], NOW)
    other = PKI()
    with pytest.raises(IntegrityError, match="does not verify"):
        verify_chain(leaf, [pki.intermediate], [other.root], NOW)
    with pytest.raises(IntegrityError, match="does not verify"):
        verify_chain(leaf, [other.intermediate], [pki.root], NOW)
    with pytest.raises(IntegrityError, match="does not verify"):
        verify_chain(leaf, [pki.intermediate], [pki.root], NOW + HOUR + dt.timedelta(seconds=1))
    with pytest.raises(IntegrityError, match="does not verify"):
        verify_chain(leaf, [pki.intermediate], [pki.root], NOW - dt.timedelta(minutes=1))
    with pytest.raises(IntegrityError, match=r"not in trust domain 'other.org'"):
        verify_chain(leaf, [pki.intermediate], [pki.root], NOW, trust_domain="other.org")
    with pytest.raises(IntegrityError, match="no trust anchors"):
        verify_chain(leaf, [pki.intermediate], [], NOW)


def test_verify_chain_refuses_ca_as_leaf(pki: PKI) -> None:
    with pytest.raises(IntegrityError, match="not an X509-SVID"):
        verify_chain(pki.intermediate, [], [pki.root], NOW)


def _hand_built_leaf(pki: PKI, *, uris: list[str], ca: bool = False) -> x509.Certificate:
    key = ec.generate_private_key(ec.SECP256R1()).public_key()
    builder = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([]))
        .issuer_name(pki.intermediate.subject)
        .public_key(key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(NOW - HOUR)
        .not_valid_after(NOW + HOUR)
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(True, False, False, False, False, ca, False, False, False), critical=True
        )
        .add_extension(
            x509.ExtendedKeyUsage(
                [ExtendedKeyUsageOID.CLIENT_AUTH, ExtendedKeyUsageOID.SERVER_AUTH]
            ),
            critical=False,
        )
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(
                ext(pki.intermediate, x509.SubjectKeyIdentifier).value
            ),
            critical=False,
        )
        .add_extension(
            x509.SubjectAlternativeName([x509.UniformResourceIdentifier(u) for u in uris]),
            critical=True,
        )
    )
    return builder.sign(pki.issuing_key, hashes.SHA256())


def test_verify_chain_refuses_two_uri_sans(pki: PKI) -> None:
    cert = _hand_built_leaf(pki, uris=[WORKLOAD.id_string, "spiffe://example.org/admin"])
    with pytest.raises(IntegrityError, match="2 URI SANs"):
        verify_chain(cert, [pki.intermediate], [pki.root], NOW)


def test_verify_chain_refuses_leaf_with_ca_true(pki: PKI) -> None:
    cert = _hand_built_leaf(pki, uris=[WORKLOAD.id_string], ca=True)
    with pytest.raises(IntegrityError, match="CA:true"):
        verify_chain(cert, [pki.intermediate], [pki.root], NOW)


@pytest.fixture(scope="module")
def pem_files(pki: PKI, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Path]]:
    directory = tmp_path_factory.mktemp("pem")
    rsa_leaf_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    files = {
        "root": pki.root,
        "intermediate": pki.intermediate,
        "leaf": pki.leaf(dns_names=["web.example.org"]),
        "rsa_leaf": pki.leaf(rsa_leaf_key.public_key()),
        "other_root": PKI().root,
    }
    paths = {}
    for label, cert in files.items():
        paths[label] = directory / f"{label}.pem"
        paths[label].write_bytes(chain_pem([cert]))
    yield paths


def openssl_verify(
    paths: dict[str, Path], *args: str, leaf: str = "leaf"
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["openssl", "verify", "-attime", str(int(NOW.timestamp())), *args, str(paths[leaf])],
        capture_output=True,
        text=True,
        check=False,
    )


@pytest.mark.parametrize("purpose", ["sslclient", "sslserver"])
@pytest.mark.parametrize("leaf_name", ["leaf", "rsa_leaf"])
def test_openssl_verifies_chain(pem_files: dict[str, Path], purpose: str, leaf_name: str) -> None:
    result = openssl_verify(
        pem_files,
        "-x509_strict",
        "-purpose",
        purpose,
        "-CAfile",
        str(pem_files["root"]),
        "-untrusted",
        str(pem_files["intermediate"]),
        leaf=leaf_name,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.strip().endswith(": OK")


def test_openssl_refuses_missing_intermediate_or_wrong_root(pem_files: dict[str, Path]) -> None:
    no_intermediate = openssl_verify(pem_files, "-x509_strict", "-CAfile", str(pem_files["root"]))
    assert no_intermediate.returncode != 0
    wrong_root = openssl_verify(
        pem_files,
        "-x509_strict",
        "-CAfile",
        str(pem_files["other_root"]),
        "-untrusted",
        str(pem_files["intermediate"]),
    )
    assert wrong_root.returncode != 0


# --- pkilint -----------------------------------------------------------------------------------


def test_pkilint_root_intermediate_leaf(pki: PKI, rsa_key: rsa.RSAPrivateKey) -> None:
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "web")])
    for cert in (
        pki.root,
        pki.intermediate,
        pki.leaf(),
        pki.leaf(rsa_key.public_key(), dns_names=["web.example.org"]),
        pki.leaf(subject=subject),
    ):
        assert lint_errors(cert) == []


def test_pkilint_reports_spiffe_uri_false_positive_only(pki: PKI) -> None:
    document = loader.RFC5280CertificateDocumentLoader().load_der_document(
        pki.leaf().public_bytes(serialization.Encoding.DER), "leaf"
    )
    codes = {
        fd.finding.code
        for result in _LINTER.validate(document.root)
        for fd in result.finding_descriptions
        if fd.finding.severity <= ValidationFindingSeverity.ERROR
    }
    assert codes <= _KNOWN_FALSE_POSITIVES


def test_pkilint_catches_a_broken_profile(pki: PKI) -> None:
    # Sanity check that the linter would fail the tests above: an empty subject with a
    # NON-critical SAN violates RFC 5280 section 4.2.1.6.
    key = ec.generate_private_key(ec.SECP256R1()).public_key()
    bad = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([]))
        .issuer_name(pki.intermediate.subject)
        .public_key(key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(NOW)
        .not_valid_after(NOW + HOUR)
        .add_extension(
            x509.SubjectAlternativeName([x509.UniformResourceIdentifier(WORKLOAD.id_string)]),
            critical=False,
        )
        .sign(pki.issuing_key, hashes.SHA256())
    )
    assert lint_errors(bad) != []


# --- helpers -----------------------------------------------------------------------------------


def test_spiffe_id_of_refusals(pki: PKI) -> None:
    with pytest.raises(InvalidInput, match="2 URI SANs"):
        spiffe_id_of(
            _hand_built_leaf(pki, uris=["spiffe://example.org/a", "spiffe://example.org/b"])
        )
    with pytest.raises(InvalidInput, match="0 URI SANs"):
        spiffe_id_of(_hand_built_leaf(pki, uris=[]))
    with pytest.raises(InvalidSpiffeId, match="must start with 'spiffe://'"):
        spiffe_id_of(_hand_built_leaf(pki, uris=["https://example.org/a"]))
    key = ec.generate_private_key(ec.SECP256R1())
    bare = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "x")]))
        .issuer_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "x")]))
        .public_key(key.public_key())
        .serial_number(1)
        .not_valid_before(NOW)
        .not_valid_after(NOW + HOUR)
        .sign(key, hashes.SHA256())
    )
    with pytest.raises(InvalidInput, match="no subjectAltName"):
        spiffe_id_of(bare)


def test_issued_svid_chain(pki: PKI, leaf: x509.Certificate) -> None:
    issued = IssuedSVID.of(leaf, [pki.intermediate])
    assert issued.chain == (leaf, pki.intermediate)
    assert pki.root not in issued.chain
    assert issued.not_after == leaf.not_valid_after_utc
    assert issued.serial == leaf.serial_number
    assert issued.spiffe_id == WORKLOAD
    der = issued.chain_der()
    assert der == chain_der([leaf, pki.intermediate])
    assert der.startswith(leaf.public_bytes(serialization.Encoding.DER))
    assert x509.load_pem_x509_certificates(issued.chain_pem()) == [leaf, pki.intermediate]


def test_prehashed_is_not_needed() -> None:
    # The builders pass a plain ECDSA(hash) to sign(); an HSM signer that only supports
    # Prehashed would still receive a standard algorithm object it can inspect.
    seen: list[object] = []

    class Recording(NoExportSigner):
        def sign(
            self, data: bytes, signature_algorithm: ec.EllipticCurveSignatureAlgorithm
        ) -> bytes:
            seen.append(signature_algorithm)
            return super().sign(data, signature_algorithm)

    signer = Recording(ec.generate_private_key(ec.SECP256R1()))
    build_root(signer, TD, NOW, DAY)
    assert len(seen) == 1
    assert isinstance(seen[0], ec.ECDSA)
    assert isinstance(seen[0].algorithm, hashes.SHA256)
    assert not isinstance(seen[0].algorithm, Prehashed)
