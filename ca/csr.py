"""Certificate signing requests: parse, check proof of possession, classify the key.

Only three things in a CSR are used: its public key, the proof that the requester holds the
matching private key (the CSR's self-signature), and, for information only, the SANs it asks for.
The subject and requested extensions are never copied into a certificate: the CA decides them.
Every refusal is an `InvalidCSR` that says what was wrong.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Collection
from typing import Final

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa

from ca.errors import InvalidCSR, InvalidInput

__all__ = [
    "DEFAULT_MAX_CSR_BYTES",
    "SUPPORTED_KEY_TYPES",
    "CSRInfo",
    "SubjectPublicKey",
    "key_type_of",
    "parse_csr",
]

SubjectPublicKey = ec.EllipticCurvePublicKey | rsa.RSAPublicKey | ed25519.Ed25519PublicKey
"""Public key types the CA certifies (see `SUPPORTED_KEY_TYPES`)."""

DEFAULT_MAX_CSR_BYTES: Final = 16384
SUPPORTED_KEY_TYPES: Final = frozenset(
    {"ec-p256", "ec-p384", "rsa-2048", "rsa-3072", "rsa-4096", "ed25519"}
)

_EC_CURVES: Final = {"secp256r1": "ec-p256", "secp384r1": "ec-p384"}
_RSA_SIZES: Final = {2048: "rsa-2048", 3072: "rsa-3072", 4096: "rsa-4096"}
_PEM_LABELS: Final = (b"CERTIFICATE REQUEST", b"NEW CERTIFICATE REQUEST")
_SIGNATURE_HASHES: Final = (hashes.SHA256, hashes.SHA384, hashes.SHA512)


@dataclasses.dataclass(frozen=True, slots=True)
class CSRInfo:
    """What the CA takes from a CSR. `requested_*` are informational, never trusted."""

    public_key: SubjectPublicKey
    key_type: str
    requested_uris: tuple[str, ...] = ()
    requested_dns: tuple[str, ...] = ()


def key_type_of(public_key: object) -> str:
    """Classify a public key as one of `SUPPORTED_KEY_TYPES`.

    Raises `InvalidInput` for anything else (other curves, RSA under 2048 bits or of an unusual
    size, RSA with a weak exponent, DSA, ...), naming the key and the supported types.
    """
    supported = ", ".join(sorted(SUPPORTED_KEY_TYPES))
    if isinstance(public_key, ec.EllipticCurvePublicKey):
        name = public_key.curve.name
        if name not in _EC_CURVES:
            raise InvalidInput(
                f"EC curve {name} is not supported; supported key types: {supported}"
            )
        return _EC_CURVES[name]
    if isinstance(public_key, rsa.RSAPublicKey):
        size = public_key.key_size
        if size < 2048:
            raise InvalidInput(
                f"RSA key of {size} bits is too small (minimum 2048); "
                f"supported key types: {supported}"
            )
        if size not in _RSA_SIZES:
            raise InvalidInput(
                f"RSA key size {size} is not supported; supported key types: {supported}"
            )
        exponent = public_key.public_numbers().e
        if exponent < 65537 or exponent % 2 == 0:
            raise InvalidInput(f"RSA public exponent {exponent} is not allowed (use 65537)")
        return _RSA_SIZES[size]
    if isinstance(public_key, ed25519.Ed25519PublicKey):
        return "ed25519"
    raise InvalidInput(
        f"key algorithm {type(public_key).__name__} is not supported; "
        f"supported key types: {supported}"
    )


def _load(data: bytes) -> x509.CertificateSigningRequest:
    stripped = data.strip()
    if stripped.startswith(b"-----BEGIN"):
        label = stripped[len(b"-----BEGIN ") :].split(b"-----", 1)[0]
        if label not in _PEM_LABELS:
            raise InvalidCSR(
                f"PEM block is {label[:40].decode('ascii', 'replace')!r}, "
                "expected 'CERTIFICATE REQUEST'"
            )
        if stripped.count(b"-----BEGIN") != 1:
            raise InvalidCSR("CSR PEM must hold exactly one 'CERTIFICATE REQUEST' block")
        try:
            return x509.load_pem_x509_csr(stripped)
        except ValueError:
            raise InvalidCSR(
                "CSR PEM is malformed or truncated (could not decode the PKCS#10 structure)"
            ) from None
    if not stripped.startswith(b"\x30"):
        raise InvalidCSR("CSR is neither PEM ('-----BEGIN CERTIFICATE REQUEST-----') nor DER")
    try:
        return x509.load_der_x509_csr(data)
    except ValueError:
        raise InvalidCSR(
            "CSR DER is malformed or truncated (could not decode the PKCS#10 structure)"
        ) from None


def parse_csr(
    data: bytes,
    *,
    max_bytes: int = DEFAULT_MAX_CSR_BYTES,
    allowed_key_types: Collection[str] = SUPPORTED_KEY_TYPES,
) -> CSRInfo:
    """Parse a PEM or DER PKCS#10 CSR and check its proof of possession.

    Refuses, each with `InvalidCSR`: non-bytes, empty or over `max_bytes` input; malformed or
    truncated encoding; a key type outside `allowed_key_types`; a signature made with a hash
    weaker than SHA-256; a signature that does not verify.
    """
    if not isinstance(data, bytes | bytearray | memoryview):
        raise InvalidCSR(f"CSR must be bytes (PEM or DER), not {type(data).__name__}")
    data = bytes(data)
    if not data.strip():
        raise InvalidCSR("CSR is empty")
    if len(data) > max_bytes:
        raise InvalidCSR(f"CSR is {len(data)} bytes, over the limit of {max_bytes} bytes")
    csr = _load(data)
    try:
        public_key = csr.public_key()
    except (ValueError, UnsupportedAlgorithm):
        raise InvalidCSR("CSR public key is malformed or of an unsupported algorithm") from None
    try:
        key_type = key_type_of(public_key)
    except InvalidInput as exc:
        raise InvalidCSR(f"CSR key refused: {exc}") from None
    if key_type not in allowed_key_types:
        allowed = ", ".join(sorted(allowed_key_types)) or "none"
        raise InvalidCSR(f"CSR key type {key_type} is not allowed; allowed: {allowed}")
    try:
        hash_algorithm = csr.signature_hash_algorithm
    except UnsupportedAlgorithm:
        raise InvalidCSR("CSR signature algorithm is not supported") from None
    if key_type != "ed25519" and not isinstance(hash_algorithm, _SIGNATURE_HASHES):
        name = hash_algorithm.name if hash_algorithm is not None else "none"
        raise InvalidCSR(f"CSR is signed with {name}; use SHA-256, SHA-384 or SHA-512")
    try:
        valid = csr.is_signature_valid
    except (ValueError, UnsupportedAlgorithm):
        valid = False
    if not valid:
        raise InvalidCSR(
            "CSR signature does not verify: it was not signed by the private key matching its "
            "public key, or it was altered"
        )
    uris: tuple[str, ...] = ()
    dns: tuple[str, ...] = ()
    try:
        san = csr.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        pass
    except (ValueError, x509.DuplicateExtension, x509.UnsupportedGeneralNameType):
        raise InvalidCSR("CSR extensions are malformed (duplicate or undecodable)") from None
    else:
        uris = tuple(san.get_values_for_type(x509.UniformResourceIdentifier))
        dns = tuple(san.get_values_for_type(x509.DNSName))
    assert isinstance(public_key, SubjectPublicKey)  # key_type_of accepted it
    return CSRInfo(public_key, key_type, uris, dns)
