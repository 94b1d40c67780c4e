"""The signer objects handed out by key backends, and signature-format helpers.

A backend signer is a `cryptography` EC private-key object whose `sign()` runs inside the key
backend; it never exposes private material (`private_bytes()`, `private_numbers()`, `exchange()`
and pickling all refuse). Two signature encodings matter to the CA:

- DER (`SEQUENCE { r INTEGER, s INTEGER }`): what X.509 and cryptography use;
- raw fixed-width `r || s`: what PKCS#11 CKM_ECDSA returns and what JWS ES256/ES384 want.

`jws_signature()` produces the raw form for any EC private key (backend signer or plain
cryptography key).
"""

from __future__ import annotations

import abc
from typing import NoReturn

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives import serialization as _serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import (
    Prehashed,
    decode_dss_signature,
    encode_dss_signature,
)
from cryptography.utils import Buffer

from ca.errors import InvalidInput, KeyBackendError

__all__ = [
    "BackendSigner",
    "der_to_raw",
    "digest_for",
    "jws_hash",
    "jws_signature",
    "prehashed_for_digest",
    "raw_to_der",
]

_PREHASHED_BY_SIZE: dict[int, hashes.HashAlgorithm] = {
    28: hashes.SHA224(),
    32: hashes.SHA256(),
    48: hashes.SHA384(),
    64: hashes.SHA512(),
}


def _coordinate_size(curve: ec.EllipticCurve) -> int:
    return (curve.key_size + 7) // 8


def raw_to_der(raw: bytes, curve: ec.EllipticCurve) -> bytes:
    """Convert a fixed-width `r || s` signature on `curve` to DER."""
    size = _coordinate_size(curve)
    if len(raw) != 2 * size:
        raise KeyBackendError(
            f"raw ECDSA signature has {len(raw)} bytes, expected {2 * size} for {curve.name}"
        )
    r = int.from_bytes(raw[:size], "big")
    s = int.from_bytes(raw[size:], "big")
    return encode_dss_signature(r, s)


def der_to_raw(der: bytes, curve: ec.EllipticCurve) -> bytes:
    """Convert a DER ECDSA signature on `curve` to fixed-width `r || s`."""
    size = _coordinate_size(curve)
    try:
        r, s = decode_dss_signature(der)
    except ValueError as exc:
        raise InvalidInput("not a DER-encoded ECDSA signature") from exc
    if r.bit_length() > 8 * size or s.bit_length() > 8 * size:
        raise InvalidInput(f"ECDSA signature values too large for {curve.name}")
    return r.to_bytes(size, "big") + s.to_bytes(size, "big")


def digest_for(data: Buffer, signature_algorithm: ec.EllipticCurveSignatureAlgorithm) -> bytes:
    """The digest that ECDSA signs: hash `data`, or take it as-is under `Prehashed`."""
    if not isinstance(signature_algorithm, ec.ECDSA):
        raise InvalidInput(
            f"unsupported signature algorithm {type(signature_algorithm).__name__}; "
            "backend signers do ECDSA only"
        )
    algorithm = signature_algorithm.algorithm
    if isinstance(algorithm, Prehashed):
        if len(data) != algorithm.digest_size:
            raise InvalidInput(
                f"prehashed digest has {len(data)} bytes, expected {algorithm.digest_size}"
            )
        return bytes(data)
    h = hashes.Hash(algorithm)
    h.update(data)
    return h.finalize()


def jws_hash(curve: ec.EllipticCurve) -> hashes.HashAlgorithm:
    """The JWS hash for an EC curve: ES256 (P-256), ES384 (P-384), ES512 (P-521)."""
    if isinstance(curve, ec.SECP256R1):
        return hashes.SHA256()
    if isinstance(curve, ec.SECP384R1):
        return hashes.SHA384()
    if isinstance(curve, ec.SECP521R1):
        return hashes.SHA512()
    raise InvalidInput(f"curve {curve.name} has no JWS algorithm")


def jws_signature(signer: ec.EllipticCurvePrivateKey, data: bytes) -> bytes:
    """Sign `data` (the JWS signing input) and return the raw `r || s` JWS signature.

    The hash follows the curve (ES256 for P-256, ES384 for P-384). Works for backend signers
    (software or PKCS#11) and for plain cryptography keys.
    """
    algorithm = jws_hash(signer.curve)
    h = hashes.Hash(algorithm)
    h.update(data)
    digest = h.finalize()
    if isinstance(signer, BackendSigner):
        return signer.sign_raw_digest(digest)
    der = signer.sign(digest, ec.ECDSA(Prehashed(algorithm)))
    return der_to_raw(der, signer.curve)


class BackendSigner(ec.EllipticCurvePrivateKey, abc.ABC):
    """An EC private key whose signing happens inside a key backend.

    Subclasses implement `sign_raw_digest()`; `sign()` hashes in Python (or takes a
    `Prehashed` digest), signs the digest in the backend and returns DER, so
    `x509.CertificateBuilder().sign(signer, hashes.SHA256())` works unchanged.
    """

    def __init__(self, label: str, public_key: ec.EllipticCurvePublicKey) -> None:
        self._label = label
        self._public_key = public_key

    @property
    def label(self) -> str:
        """The backend label of this key."""
        return self._label

    @property
    def curve(self) -> ec.EllipticCurve:
        return self._public_key.curve

    @property
    def key_size(self) -> int:
        return self._public_key.curve.key_size

    def public_key(self) -> ec.EllipticCurvePublicKey:
        return self._public_key

    @abc.abstractmethod
    def sign_raw_digest(self, digest: bytes) -> bytes:
        """ECDSA-sign a precomputed digest; return fixed-width raw `r || s` (JWS form)."""

    def sign(
        self,
        data: Buffer,
        signature_algorithm: ec.EllipticCurveSignatureAlgorithm,
    ) -> bytes:
        """ECDSA signature (DER) over `data` (or over a `Prehashed` digest)."""
        digest = digest_for(bytes(data), signature_algorithm)
        return raw_to_der(self.sign_raw_digest(digest), self.curve)

    def _refuse(self, what: str) -> NoReturn:
        raise KeyBackendError(
            f"{what} refused for key {self._label!r}: private key material never leaves "
            "the key backend"
        )

    def private_bytes(
        self,
        encoding: _serialization.Encoding,
        format: _serialization.PrivateFormat,
        encryption_algorithm: _serialization.KeySerializationEncryption,
    ) -> bytes:
        self._refuse("private_bytes()")

    def private_numbers(self) -> ec.EllipticCurvePrivateNumbers:
        self._refuse("private_numbers()")

    def exchange(self, algorithm: ec.ECDH, peer_public_key: ec.EllipticCurvePublicKey) -> bytes:
        raise KeyBackendError(f"key {self._label!r} is a signing key; ECDH is not offered")

    def __copy__(self) -> BackendSigner:
        return self

    def __deepcopy__(self, memo: dict[int, object]) -> BackendSigner:
        return self

    def __reduce__(self) -> NoReturn:
        self._refuse("pickling")

    def __repr__(self) -> str:
        return f"<{type(self).__name__} label={self._label!r} curve={self.curve.name}>"


def prehashed_for_digest(digest: bytes) -> Prehashed:
    """The `Prehashed` algorithm matching a digest's length (SHA-224..SHA-512)."""
    try:
        return Prehashed(_PREHASHED_BY_SIZE[len(digest)])
    except KeyError:
        raise InvalidInput(
            f"a digest of {len(digest)} bytes matches no supported hash (expected 28, 32, 48 or 64)"
        ) from None
