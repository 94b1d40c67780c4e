"""The key-backend interface: the one seam between the CA and wherever its keys live.

The CA only ever holds a signer; an HSM key and a software key look the same to it. Private
material never leaves a backend: not in return values, logs, storage or error messages.
"""

from __future__ import annotations

import enum
from typing import Protocol, runtime_checkable

from cryptography.hazmat.primitives.asymmetric import ec

__all__ = ["KeyBackend", "KeyKind"]


class KeyKind(enum.Enum):
    """What a key is for. EC keys sign; HMAC keys MAC; AES keys wrap data keys."""

    EC_P256 = "ec-p256"
    EC_P384 = "ec-p384"
    HMAC_SHA256 = "hmac-sha256"
    AES_256 = "aes-256"


@runtime_checkable
class KeyBackend(Protocol):
    """Key custody. Labels are unique names within one backend (the PKCS#11 CKA_LABEL).

    Every method raises `ca.errors.KeyNotFound` for an unknown label and
    `ca.errors.KeyBackendError` when the backend itself fails. Implementations are thread-safe.
    """

    @property
    def description(self) -> str:
        """A human-readable, secret-free description (e.g. "pkcs11 token=broker (SoftHSM)")."""
        ...

    def create_key(self, label: str, kind: KeyKind) -> None:
        """Generate a key inside the backend (sensitive, never extractable).

        Raises `KeyExists` if the label is taken. Not idempotent by design: callers decide.
        """
        ...

    def has_key(self, label: str) -> bool: ...

    def signer(self, label: str) -> ec.EllipticCurvePrivateKey:
        """A cryptography private-key object whose `sign()` runs inside the backend.

        Works with `x509.CertificateBuilder.sign()`; `private_bytes()` always refuses.
        """
        ...

    def public_key(self, label: str) -> ec.EllipticCurvePublicKey: ...

    def mac(self, label: str, data: bytes) -> bytes:
        """HMAC-SHA256 of `data` under an HMAC_SHA256 key."""
        ...

    def wrap(self, label: str, key_material: bytes) -> bytes:
        """Wrap a data key (16..64 bytes, multiple of 8) under an AES_256 key (AES key wrap)."""
        ...

    def unwrap(self, label: str, wrapped: bytes) -> bytes:
        """Inverse of `wrap`; raises `ca.errors.IntegrityError` if `wrapped` was tampered with."""
        ...

    def destroy_key(self, label: str) -> None:
        """Delete the key. Idempotent: succeeds when the key is already gone."""
        ...

    def close(self) -> None:
        """Release sessions and handles. Idempotent."""
        ...
