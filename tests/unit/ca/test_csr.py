import dataclasses
import subprocess
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import dsa, ec, ed25519, rsa
from cryptography.x509.oid import NameOID

from ca.csr import SUPPORTED_KEY_TYPES, CSRInfo, key_type_of, parse_csr
from ca.errors import InvalidCSR, InvalidInput

PrivateKey = (
    ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey | ed25519.Ed25519PrivateKey | dsa.DSAPrivateKey
)


def make_csr(
    key: PrivateKey,
    *,
    uris: tuple[str, ...] = (),
    dns: tuple[str, ...] = (),
    cn: str = "ignored",
) -> x509.CertificateSigningRequest:
    builder = x509.CertificateSigningRequestBuilder().subject_name(
        x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])
    )
    names: list[x509.GeneralName] = [x509.UniformResourceIdentifier(u) for u in uris]
    names += [x509.DNSName(d) for d in dns]
    if names:
        builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=False)
    algorithm = None if isinstance(key, ed25519.Ed25519PrivateKey) else hashes.SHA256()
    return builder.sign(key, algorithm)


def der(csr: x509.CertificateSigningRequest) -> bytes:
    return csr.public_bytes(serialization.Encoding.DER)


def pem(csr: x509.CertificateSigningRequest) -> bytes:
    return csr.public_bytes(serialization.Encoding.PEM)


@pytest.fixture(scope="module")
def rsa2048() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


@pytest.fixture(scope="module")
def p256() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def test_pem_and_der_accepted(p256: ec.EllipticCurvePrivateKey) -> None:
    csr = make_csr(p256)
    from_pem = parse_csr(pem(csr))
    from_der = parse_csr(der(csr))
    assert from_pem == from_der
    assert from_pem.key_type == "ec-p256"
    assert from_pem.public_key == p256.public_key()


@pytest.mark.parametrize(
    ("make_key", "key_type"),
    [
        (lambda: ec.generate_private_key(ec.SECP256R1()), "ec-p256"),
        (lambda: ec.generate_private_key(ec.SECP384R1()), "ec-p384"),
        (lambda: ed25519.Ed25519PrivateKey.generate(), "ed25519"),
    ],
)
def test_key_types(make_key: object, key_type: str) -> None:
    key = make_key()  # type: ignore[operator]
    assert parse_csr(der(make_csr(key))).key_type == key_type


def test_rsa_2048(rsa2048: rsa.RSAPrivateKey) -> None:
    info = parse_csr(pem(make_csr(rsa2048)))
    assert info.key_type == "rsa-2048"
    assert "rsa-2048" in SUPPORTED_KEY_TYPES


def test_requested_names_are_reported_not_trusted(p256: ec.EllipticCurvePrivateKey) -> None:
    csr = make_csr(p256, uris=("spiffe://evil.org/admin",), dns=("evil.example",), cn="root")
    info = parse_csr(der(csr))
    assert info.requested_uris == ("spiffe://evil.org/admin",)
    assert info.requested_dns == ("evil.example",)
    # The subject is not part of what the CA takes from a CSR at all.
    assert {f.name for f in dataclasses.fields(CSRInfo)} == {
        "public_key",
        "key_type",
        "requested_uris",
        "requested_dns",
    }


def test_small_rsa_refused() -> None:
    small = rsa.generate_private_key(public_exponent=65537, key_size=1024)
    with pytest.raises(InvalidCSR, match="1024 bits is too small"):
        parse_csr(der(make_csr(small)))


@pytest.mark.parametrize("curve", [ec.SECP521R1(), ec.SECP256K1(), ec.SECP224R1()])
def test_other_curves_refused(curve: ec.EllipticCurve) -> None:
    key = ec.generate_private_key(curve)
    with pytest.raises(InvalidCSR, match=f"EC curve {curve.name} is not supported"):
        parse_csr(der(make_csr(key)))


def test_dsa_refused() -> None:
    key = dsa.generate_private_key(key_size=2048)
    with pytest.raises(InvalidCSR, match="DSAPublicKey is not supported"):
        parse_csr(der(make_csr(key)))


def test_allowed_key_types_restricts(p256: ec.EllipticCurvePrivateKey) -> None:
    with pytest.raises(InvalidCSR, match="ec-p256 is not allowed; allowed: ec-p384"):
        parse_csr(der(make_csr(p256)), allowed_key_types={"ec-p384"})


def test_empty_refused() -> None:
    with pytest.raises(InvalidCSR, match="empty"):
        parse_csr(b"")
    with pytest.raises(InvalidCSR, match="empty"):
        parse_csr(b"  \n")


def test_non_bytes_refused(p256: ec.EllipticCurvePrivateKey) -> None:
    with pytest.raises(InvalidCSR, match="must be bytes"):
        parse_csr(pem(make_csr(p256)).decode())  # type: ignore[arg-type]


def test_oversized_refused(p256: ec.EllipticCurvePrivateKey) -> None:
    data = der(make_csr(p256))
    with pytest.raises(InvalidCSR, match=f"{len(data)} bytes, over the limit of 100 bytes"):
        parse_csr(data, max_bytes=100)
    with pytest.raises(InvalidCSR, match="over the limit of 16384 bytes"):
        parse_csr(b"\x30" + b"\x00" * 20000)


def test_truncated_der_refused(p256: ec.EllipticCurvePrivateKey) -> None:
    data = der(make_csr(p256))
    for cut in (1, 10, len(data) // 2, len(data) - 1):
        with pytest.raises(InvalidCSR, match="malformed or truncated"):
            parse_csr(data[:cut])


def test_trailing_garbage_refused(p256: ec.EllipticCurvePrivateKey) -> None:
    with pytest.raises(InvalidCSR, match="malformed"):
        parse_csr(der(make_csr(p256)) + b"\x00\x01")


def test_truncated_pem_refused(p256: ec.EllipticCurvePrivateKey) -> None:
    text = pem(make_csr(p256))
    with pytest.raises(InvalidCSR):
        parse_csr(text[: len(text) // 2])
    lines = text.splitlines(keepends=True)
    without_middle = lines[0] + b"".join(lines[2:])
    with pytest.raises(InvalidCSR, match="malformed or truncated"):
        parse_csr(without_middle)


def test_garbage_refused() -> None:
    with pytest.raises(InvalidCSR, match="neither PEM"):
        parse_csr(b"hello, I am a CSR")
    with pytest.raises(InvalidCSR, match="malformed"):
        parse_csr(b"\x30\x82\xff\xff" + b"\x00" * 50)


def test_wrong_pem_label_refused(p256: ec.EllipticCurvePrivateKey) -> None:
    text = pem(make_csr(p256)).replace(b"CERTIFICATE REQUEST", b"CERTIFICATE")
    with pytest.raises(InvalidCSR, match="PEM block is 'CERTIFICATE'"):
        parse_csr(text)


def test_two_pem_blocks_refused(p256: ec.EllipticCurvePrivateKey) -> None:
    text = pem(make_csr(p256))
    with pytest.raises(InvalidCSR, match="exactly one"):
        parse_csr(text + text)


def test_tampered_signature_refused(p256: ec.EllipticCurvePrivateKey) -> None:
    data = bytearray(der(make_csr(p256)))
    data[-1] ^= 0x01  # the last byte belongs to the signature BIT STRING
    with pytest.raises(InvalidCSR, match="signature does not verify"):
        parse_csr(bytes(data))


def test_tampered_content_refused(p256: ec.EllipticCurvePrivateKey) -> None:
    data = der(make_csr(p256, cn="aaaaaaaa"))
    tampered = data.replace(b"aaaaaaaa", b"aaaaaaab")
    assert tampered != data
    with pytest.raises(InvalidCSR, match="signature does not verify"):
        parse_csr(tampered)


def test_csr_signed_by_another_key_refused(p256: ec.EllipticCurvePrivateKey) -> None:
    # Proof of possession: splice the public key of one CSR into another's signed content.
    other = ec.generate_private_key(ec.SECP256R1())
    mine, theirs = der(make_csr(p256)), der(make_csr(other))
    spki = serialization.PublicFormat.SubjectPublicKeyInfo
    my_key = p256.public_key().public_bytes(serialization.Encoding.DER, spki)
    their_key = other.public_key().public_bytes(serialization.Encoding.DER, spki)
    spliced = mine.replace(my_key, their_key)
    assert spliced != mine and spliced != theirs
    with pytest.raises(InvalidCSR, match="signature does not verify"):
        parse_csr(spliced)


def test_sha1_signature_refused(tmp_path: Path) -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    key_file = tmp_path / "key.pem"
    key_file.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    out = tmp_path / "sha1.der"
    subprocess.run(
        [
            "openssl",
            "req",
            "-new",
            "-key",
            str(key_file),
            "-sha1",
            "-subj",
            "/CN=x",
            "-outform",
            "DER",
            "-out",
            str(out),
        ],
        check=True,
        capture_output=True,
    )
    with pytest.raises(InvalidCSR, match="signed with sha1"):
        parse_csr(out.read_bytes())


def test_key_type_of_rejects_weak_exponent() -> None:
    key = rsa.generate_private_key(public_exponent=3, key_size=2048)
    with pytest.raises(InvalidInput, match="exponent 3"):
        key_type_of(key.public_key())


def test_key_type_of_unusual_rsa_size(rsa2048: rsa.RSAPrivateKey) -> None:
    assert key_type_of(rsa2048.public_key()) == "rsa-2048"
    odd = rsa.generate_private_key(public_exponent=65537, key_size=2560)
    with pytest.raises(InvalidInput, match="RSA key size 2560 is not supported"):
        key_type_of(odd.public_key())
