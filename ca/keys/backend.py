"""The key-backend interface: the one seam between the CA and wherever its keys live.

The CA only ever holds a signer; an HSM key and a software key look the same to it. Private
material never leaves a backend: not in return values, logs, storage or error messages.

`KeyBackend` is the small interface every backend has (create, look up, sign, public key,
close). Optional powers are separate protocols, as in smallstep's kms/apiv1: `DataKeyWrapper`
(wrap/unwrap a data key), `MacSigner` (HMAC), `KeyDestroyer` (delete a key) and `RsaSigner`
(RSA-3072 keys signing with RSA-PSS). A caller that needs one asks for it with
`data_key_wrapper()`, `mac_signer()`, `key_destroyer()` or `rsa_signer()`, which return the
backend typed for that power or raise `ca.errors.CapabilityMissing` naming the backend and the
power.

The input checks every backend shares (`validate_label`, `check_data_key`, `check_wrapped`)
live here too, so backends import this module and never `ca.keys.uri` (which imports the
backends to open them).
"""

from __future__ import annotations

import enum
import re
from typing import Protocol, runtime_checkable

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa

from ca.errors import CapabilityMissing, IntegrityError, InvalidInput

__all__ = [
    "DEFAULT_PKCS11_MODULE",
    "RSA_BITS",
    "RSA_PSS_SALT_BYTES",
    "RSA_PUBLIC_EXPONENT",
    "DataKeyWrapper",
    "DestroyingBackend",
    "KeyBackend",
    "KeyDestroyer",
    "KeyKind",
    "MacBackend",
    "MacSigner",
    "RsaBackend",
    "RsaSigner",
    "WrappingBackend",
    "check_data_key",
    "check_rsa_digest",
    "check_wrapped",
    "data_key_wrapper",
    "key_destroyer",
    "mac_signer",
    "rsa_pss",
    "rsa_signer",
    "validate_label",
]

#: The PKCS#11 module a ``pkcs11:`` URI uses when it names none (SoftHSM2, Debian's path).
DEFAULT_PKCS11_MODULE = "/usr/lib/softhsm/libsofthsm2.so"

_LABEL_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:-]{0,127}")


class KeyKind(enum.Enum):
    """What a key is for. EC keys sign (the CA's signers); HMAC keys MAC; AES keys wrap data
    keys; RSA keys sign with RSA-PSS through the optional `RsaSigner` power only (never as a CA
    signer: `signer()` and `public_key()` refuse them)."""

    EC_P256 = "ec-p256"
    EC_P384 = "ec-p384"
    HMAC_SHA256 = "hmac-sha256"
    AES_256 = "aes-256"
    RSA_3072 = "rsa-3072"


#: RSA-3072 keys: modulus size and public exponent (65537) every backend generates with.
RSA_BITS = 3072
RSA_PUBLIC_EXPONENT = 65537
#: RSA-PSS salt length: the digest length (SHA-256), as RFC 8017 recommends and KMSs use.
RSA_PSS_SALT_BYTES = 32


def rsa_pss() -> padding.PSS:
    """The one RSA signature scheme offered: RSA-PSS, MGF1-SHA-256, a 32-byte salt (with
    SHA-256 as the message hash). What a verifier outside the broker passes to `verify()`."""
    return padding.PSS(mgf=padding.MGF1(hashes.SHA256()), salt_length=RSA_PSS_SALT_BYTES)


def validate_label(label: str) -> str:
    """Check a key label: 1-128 characters of ``A-Z a-z 0-9 . _ : -``, starting alphanumeric.

    The same rule holds for every backend, so a label valid on one is valid on all (and is
    safe as a file name and inside a URI).
    """
    if not isinstance(label, str) or _LABEL_RE.fullmatch(label) is None:
        raise InvalidInput(
            f"invalid key label {label!r}: use 1-128 characters of letters, digits, '.', '_', "
            "':' or '-', starting with a letter or digit"
        )
    return label


def check_data_key(material: bytes) -> bytes:
    """A data key to wrap: 16..64 bytes, a multiple of 8 (AES key wrap, RFC 3394)."""
    if not isinstance(material, bytes | bytearray | memoryview):
        raise InvalidInput("a data key must be bytes")
    data = bytes(material)
    if not 16 <= len(data) <= 64 or len(data) % 8:
        raise InvalidInput(
            f"a data key to wrap must be 16 to 64 bytes and a multiple of 8, got {len(data)}"
        )
    return data


def check_wrapped(wrapped: bytes) -> bytes:
    """A wrapped data key: 24..72 bytes, a multiple of 8; anything else cannot be genuine."""
    if not isinstance(wrapped, bytes | bytearray | memoryview):
        raise InvalidInput("a wrapped data key must be bytes")
    data = bytes(wrapped)
    if not 24 <= len(data) <= 72 or len(data) % 8:
        raise IntegrityError(
            f"wrapped data key has an impossible length ({len(data)} bytes): damaged or forged"
        )
    return data


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

    def close(self) -> None:
        """Release sessions and handles. Idempotent."""
        ...


@runtime_checkable
class DataKeyWrapper(Protocol):
    """Optional power: wrap data keys under a key-encryption key held by the backend."""

    def wrap(self, label: str, key_material: bytes) -> bytes:
        """Wrap a data key (16..64 bytes, multiple of 8) under an AES_256 key (AES key wrap)."""
        ...

    def unwrap(self, label: str, wrapped: bytes) -> bytes:
        """Inverse of `wrap`; raises `ca.errors.IntegrityError` if `wrapped` was tampered with."""
        ...


@runtime_checkable
class MacSigner(Protocol):
    """Optional power: HMAC under a key that never leaves the backend."""

    def mac(self, label: str, data: bytes) -> bytes:
        """HMAC-SHA256 of `data` under an HMAC_SHA256 key."""
        ...


@runtime_checkable
class RandomSource(Protocol):
    """Optional power: random bytes from the backend's generator (C_GenerateRandom on
    PKCS#11), for every value the broker generates (passwords, secret values)."""

    def random(self, n: int) -> bytes:
        """`n` (1..4096) random bytes."""
        ...


@runtime_checkable
class KeyDestroyer(Protocol):
    """Optional power: delete keys."""

    def destroy_key(self, label: str) -> None:
        """Delete the key. Idempotent: succeeds when the key is already gone."""
        ...


@runtime_checkable
class RsaSigner(Protocol):
    """Optional power: RSA_3072 keys (generated by `create_key`) that sign with RSA-PSS.

    Separate from `signer()`, which hands out EC signers to the CA and stays EC only. Both
    methods raise `ca.errors.InvalidInput` for a key of another kind.
    """

    def rsa_sign_digest(self, label: str, digest: bytes) -> bytes:
        """RSA-PSS signature (`rsa_pss()`) over a 32-byte SHA-256 digest, made inside the
        backend; `InvalidInput` for a digest of another length."""
        ...

    def rsa_public_key(self, label: str) -> rsa.RSAPublicKey: ...


@runtime_checkable
class WrappingBackend(KeyBackend, DataKeyWrapper, Protocol):
    """A backend that wraps data keys (what `broker.envelope` needs)."""


@runtime_checkable
class MacBackend(KeyBackend, MacSigner, Protocol):
    """A backend that computes MACs (what the audit ledger and secret metadata need)."""


@runtime_checkable
class RandomBackend(KeyBackend, RandomSource, Protocol):
    """A backend that generates random bytes (what broker-generated passwords need)."""


@runtime_checkable
class DestroyingBackend(KeyBackend, KeyDestroyer, Protocol):
    """A backend that deletes keys (what CA and KEK rotation need to retire old keys)."""


@runtime_checkable
class RsaBackend(KeyBackend, RsaSigner, Protocol):
    """A backend with RSA signing keys (what the KMS needs for ``rsa-3072`` keys)."""


def _missing(backend: object, power: str) -> CapabilityMissing:
    name = getattr(backend, "description", None) or type(backend).__name__
    return CapabilityMissing(f"key backend {name} cannot {power}")


def data_key_wrapper(backend: KeyBackend) -> WrappingBackend:
    """`backend` typed as one that wraps data keys; `CapabilityMissing` if it cannot."""
    if not isinstance(backend, WrappingBackend):
        raise _missing(backend, "wrap data keys (it has no wrap/unwrap)")
    return backend


def mac_signer(backend: KeyBackend) -> MacBackend:
    """`backend` typed as one that computes MACs; `CapabilityMissing` if it cannot."""
    if not isinstance(backend, MacBackend):
        raise _missing(backend, "compute MACs (it has no mac)")
    return backend


def random_source(backend: KeyBackend) -> RandomBackend:
    """`backend` typed as one that generates random bytes; `CapabilityMissing` if it
    cannot."""
    if not isinstance(backend, RandomBackend):
        raise _missing(backend, "generate random bytes (it has no random)")
    return backend


def check_random_length(n: int) -> int:
    """`n` itself when it is a length `random` accepts (1..4096); InvalidInput otherwise."""
    if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= 4096:
        raise InvalidInput("random: ask for 1 to 4096 bytes")
    return n


def key_destroyer(backend: KeyBackend) -> DestroyingBackend:
    """`backend` typed as one that deletes keys; `CapabilityMissing` if it cannot."""
    if not isinstance(backend, DestroyingBackend):
        raise _missing(backend, "destroy keys (it has no destroy_key)")
    return backend


def rsa_signer(backend: KeyBackend) -> RsaBackend:
    """`backend` typed as one with RSA signing keys; `CapabilityMissing` if it has none."""
    if not isinstance(backend, RsaBackend):
        raise _missing(backend, "sign with RSA keys (it has no rsa_sign_digest)")
    return backend


def check_rsa_digest(digest: bytes) -> bytes:
    """A digest for `RsaSigner.rsa_sign_digest`: 32 bytes (SHA-256)."""
    if not isinstance(digest, bytes | bytearray | memoryview):
        raise InvalidInput("a digest must be bytes")
    data = bytes(digest)
    if len(data) != hashes.SHA256.digest_size:
        raise InvalidInput(f"an RSA-PSS digest is 32 bytes (SHA-256), not {len(data)}")
    return data
