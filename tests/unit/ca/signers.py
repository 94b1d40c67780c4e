"""Test doubles for CA keys."""

from __future__ import annotations

from typing import Any, NoReturn

from cryptography.hazmat.primitives.asymmetric import ec


class NoExportSigner(ec.EllipticCurvePrivateKey):
    """Stands in for an HSM key: it signs, but its private material is unreachable."""

    def __init__(self, inner: ec.EllipticCurvePrivateKey) -> None:
        self._inner = inner
        self.sign_calls = 0

    def sign(self, data: bytes, signature_algorithm: ec.EllipticCurveSignatureAlgorithm) -> bytes:
        self.sign_calls += 1
        return self._inner.sign(data, signature_algorithm)

    def public_key(self) -> ec.EllipticCurvePublicKey:
        return self._inner.public_key()

    @property
    def curve(self) -> ec.EllipticCurve:
        return self._inner.curve

    @property
    def key_size(self) -> int:
        return self._inner.key_size

    def exchange(self, algorithm: ec.ECDH, peer_public_key: ec.EllipticCurvePublicKey) -> bytes:
        raise AssertionError("the CA must never do ECDH with a CA key")

    def private_numbers(self) -> NoReturn:
        raise AssertionError("private_numbers() called on an HSM-style signer")

    def private_bytes(self, *args: Any, **kwargs: Any) -> NoReturn:
        raise AssertionError("private_bytes() called on an HSM-style signer")

    def __copy__(self) -> NoExportSigner:
        return self

    def __deepcopy__(self, memo: dict[int, object]) -> NoExportSigner:
        return self
