"""SoftwareBackend: keys held by this process, with `cryptography`.

For tests and for machines without an HSM. Two modes:

- in memory, ``SoftwareBackend()``: keys vanish with the process;
- persistent, ``SoftwareBackend(directory=path, pin=b"...")``: one file per key,
  ``DIR/<label>.key``, mode 0600, written atomically and never overwritten. Every file is
  encrypted under a key derived from the PIN with scrypt (random salt per file, parameters kept
  in the file):

  * EC and RSA keys: PKCS#8 PEM with ``BestAvailableEncryption``, whose password is the scrypt
    output (so guessing the PIN costs one scrypt per guess, not PKCS#8's cheap PBKDF2);
  * HMAC and AES keys: AES-256-GCM, with the label and kind as associated data, so a file
    renamed to another label does not decrypt.

  ``DIR/.pin-check`` (AES-GCM of a constant under the PIN) lets a wrong PIN fail at open with
  `BadPin` rather than at first use.

Decrypted keys are cached in memory after first use. Private material never leaves: `signer()`
returns a `BackendSigner` whose `private_bytes()` refuses.
"""

from __future__ import annotations

import base64
import contextlib
import dataclasses
import hmac
import json
import os
import secrets
import threading
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.asymmetric.utils import Prehashed, decode_dss_signature
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.scrypt import Scrypt
from cryptography.hazmat.primitives.keywrap import (
    InvalidUnwrap,
    aes_key_unwrap,
    aes_key_wrap,
)
from cryptography.utils import Buffer

from ca.errors import BadPin, IntegrityError, InvalidInput, KeyBackendError, KeyExists, KeyNotFound
from ca.keys.backend import (
    RSA_BITS,
    RSA_PUBLIC_EXPONENT,
    KeyKind,
    check_data_key,
    check_random_length,
    check_rsa_digest,
    check_wrapped,
    rsa_pss,
    validate_label,
)
from ca.keys.signer import BackendSigner, digest_for, prehashed_for_digest

__all__ = ["SoftwareBackend", "SoftwareSigner"]

_FORMAT = "ca.keys.software/1"
_PIN_CHECK_NAME = ".pin-check"
_PIN_CHECK_PLAINTEXT = b"ca.keys software key store"
_SCRYPT_N = 2**15
_SCRYPT_R = 8
_SCRYPT_P = 1
_CURVES: dict[KeyKind, ec.EllipticCurve] = {
    KeyKind.EC_P256: ec.SECP256R1(),
    KeyKind.EC_P384: ec.SECP384R1(),
}


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _unb64(text: object) -> bytes:
    if not isinstance(text, str):
        raise ValueError("expected base64 text")
    return base64.b64decode(text, validate=True)


@dataclasses.dataclass(frozen=True)
class _SoftKey:
    kind: KeyKind
    ec_key: ec.EllipticCurvePrivateKey | None = None
    secret: bytes = b""
    rsa_key: rsa.RSAPrivateKey | None = None

    def __repr__(self) -> str:  # never show material
        return f"_SoftKey(kind={self.kind.value})"


class SoftwareSigner(BackendSigner):
    """Signer over a software key; each call goes through the backend (so destroy/close bite)."""

    def __init__(
        self, backend: SoftwareBackend, label: str, public_key: ec.EllipticCurvePublicKey
    ) -> None:
        super().__init__(label, public_key)
        self._backend = backend

    def sign(
        self,
        data: Buffer,
        signature_algorithm: ec.EllipticCurveSignatureAlgorithm,
    ) -> bytes:
        digest = digest_for(bytes(data), signature_algorithm)
        key = self._backend._ec_key(self.label)
        return key.sign(digest, ec.ECDSA(prehashed_for_digest(digest)))

    def sign_raw_digest(self, digest: bytes) -> bytes:
        algorithm = prehashed_for_digest(digest)
        der = self._backend._ec_key(self.label).sign(digest, ec.ECDSA(algorithm))
        r, s = decode_dss_signature(der)
        size = (self.curve.key_size + 7) // 8
        return r.to_bytes(size, "big") + s.to_bytes(size, "big")


class SoftwareBackend:
    """Key custody in this process (see the module docstring). Thread-safe."""

    def __init__(self, directory: Path | None = None, pin: bytes | None = None) -> None:
        self._lock = threading.Lock()
        self._keys: dict[str, _SoftKey] = {}
        self._closed = False
        self._directory: Path | None = None
        self._pin = b""
        if directory is None:
            return
        if not pin:
            raise InvalidInput(
                f"the software key store in {directory} needs a PIN to encrypt its key files"
            )
        self._directory = Path(directory)
        self._pin = bytes(pin)
        try:
            self._directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        except FileExistsError:
            raise InvalidInput(f"software key store {directory} is not a directory") from None
        except OSError as exc:
            raise KeyBackendError(
                f"cannot create software key store {directory}: {exc.strerror}"
            ) from None
        self._check_pin()

    # -- KeyBackend ---------------------------------------------------------------------------

    @property
    def description(self) -> str:
        if self._directory is None:
            return "software (in memory)"
        return f"software dir={self._directory}"

    @property
    def persistent(self) -> bool:
        """True when keys live in files and survive the process."""
        return self._directory is not None

    def create_key(self, label: str, kind: KeyKind) -> None:
        validate_label(label)
        if not isinstance(kind, KeyKind):
            raise InvalidInput(f"unknown key kind {kind!r}")
        if kind in _CURVES:
            key = _SoftKey(kind, ec_key=ec.generate_private_key(_CURVES[kind]))
        elif kind is KeyKind.RSA_3072:
            key = _SoftKey(kind, rsa_key=rsa.generate_private_key(RSA_PUBLIC_EXPONENT, RSA_BITS))
        else:
            key = _SoftKey(kind, secret=secrets.token_bytes(32))
        with self._lock:
            self._check_open()
            exists = label in self._keys or (
                self._directory is not None and self._key_path(label).exists()
            )
            if exists:
                raise KeyExists(f"key {label!r} already exists in {self.description}")
            if self._directory is None:
                self._keys[label] = key
                return
        # Persistent: encryption (scrypt) happens outside the lock; the link is exclusive.
        self._write_key_file(label, key)
        with self._lock:
            self._keys[label] = key

    def has_key(self, label: str) -> bool:
        validate_label(label)
        with self._lock:
            self._check_open()
            if self._directory is None:
                return label in self._keys
            return self._key_path(label).is_file()

    def signer(self, label: str) -> ec.EllipticCurvePrivateKey:
        return SoftwareSigner(self, label, self.public_key(label))

    def public_key(self, label: str) -> ec.EllipticCurvePublicKey:
        return self._ec_key(label).public_key()

    def random(self, n: int) -> bytes:
        """The operating system's generator (os.urandom): there is no HSM here."""
        return os.urandom(check_random_length(n))

    def rsa_sign_digest(self, label: str, digest: bytes) -> bytes:
        data = check_rsa_digest(digest)
        return self._rsa_key(label).sign(data, rsa_pss(), Prehashed(hashes.SHA256()))

    def rsa_public_key(self, label: str) -> rsa.RSAPublicKey:
        return self._rsa_key(label).public_key()

    def mac(self, label: str, data: bytes) -> bytes:
        key = self._secret(label, KeyKind.HMAC_SHA256, "mac")
        return hmac.digest(key, bytes(data), "sha256")

    def wrap(self, label: str, key_material: bytes) -> bytes:
        material = check_data_key(key_material)
        return aes_key_wrap(self._secret(label, KeyKind.AES_256, "wrap"), material)

    def unwrap(self, label: str, wrapped: bytes) -> bytes:
        blob = check_wrapped(wrapped)
        kek = self._secret(label, KeyKind.AES_256, "unwrap")
        try:
            return aes_key_unwrap(kek, blob)
        except InvalidUnwrap:
            raise IntegrityError(
                f"wrapped data key did not verify under key {label!r}: damaged, forged or "
                "wrapped under another key"
            ) from None

    def destroy_key(self, label: str) -> None:
        validate_label(label)
        with self._lock:
            self._check_open()
            self._keys.pop(label, None)
            if self._directory is not None:
                try:
                    self._key_path(label).unlink()
                except FileNotFoundError:
                    pass
                except OSError as exc:
                    raise KeyBackendError(
                        f"cannot delete key {label!r} from {self.description}: {exc.strerror}"
                    ) from None

    def close(self) -> None:
        with self._lock:
            self._closed = True
            self._keys.clear()
            self._pin = b""

    def __repr__(self) -> str:
        return f"<SoftwareBackend {self.description}>"

    # -- internals ----------------------------------------------------------------------------

    def _check_open(self) -> None:
        if self._closed:
            raise KeyBackendError(f"key backend {self.description} is closed")

    def _key_path(self, label: str) -> Path:
        assert self._directory is not None
        return self._directory / f"{label}.key"

    def _get(self, label: str) -> _SoftKey:
        validate_label(label)
        with self._lock:
            self._check_open()
            key = self._keys.get(label)
            if key is not None:
                return key
            if self._directory is None:
                raise KeyNotFound(f"no key {label!r} in {self.description}")
        key = self._read_key_file(label)
        with self._lock:
            self._check_open()
            if not self._key_path(label).is_file():  # destroyed while we were reading
                raise KeyNotFound(f"no key {label!r} in {self.description}")
            return self._keys.setdefault(label, key)

    def _ec_key(self, label: str) -> ec.EllipticCurvePrivateKey:
        key = self._get(label)
        if key.ec_key is None:
            raise InvalidInput(f"key {label!r} is a {key.kind.value} key; signing needs an EC key")
        return key.ec_key

    def _rsa_key(self, label: str) -> rsa.RSAPrivateKey:
        key = self._get(label)
        if key.rsa_key is None:
            raise InvalidInput(
                f"key {label!r} is a {key.kind.value} key; RSA signing needs an rsa-3072 key"
            )
        return key.rsa_key

    def _secret(self, label: str, kind: KeyKind, operation: str) -> bytes:
        key = self._get(label)
        if key.kind is not kind:
            raise InvalidInput(
                f"key {label!r} is a {key.kind.value} key; {operation} needs a {kind.value} key"
            )
        return key.secret

    # -- files --------------------------------------------------------------------------------

    def _kdf(self, salt: bytes, n: int, r: int, p: int) -> bytes:
        return Scrypt(salt=salt, length=32, n=n, r=r, p=p).derive(self._pin)

    @staticmethod
    def _kdf_params(salt: bytes) -> dict[str, Any]:
        return {
            "name": "scrypt",
            "n": _SCRYPT_N,
            "r": _SCRYPT_R,
            "p": _SCRYPT_P,
            "salt": _b64(salt),
        }

    def _derive_from(self, kdf: object) -> bytes:
        if not isinstance(kdf, dict) or kdf.get("name") != "scrypt":
            raise ValueError("unsupported kdf")
        n, r, p = kdf["n"], kdf["r"], kdf["p"]
        if not all(isinstance(v, int) for v in (n, r, p)) or not 2**10 <= n <= 2**22:
            raise ValueError("bad kdf parameters")
        return self._kdf(_unb64(kdf["salt"]), n, r, p)

    def _write_exclusive(self, path: Path, content: bytes) -> None:
        """Write `content` to a new file `path` (mode 0600); `FileExistsError` if it exists."""
        assert self._directory is not None
        tmp = self._directory / f".{path.name}.{secrets.token_hex(8)}.tmp"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            try:
                os.fchmod(fd, 0o600)
                os.write(fd, content)
                os.fsync(fd)
            finally:
                os.close(fd)
            os.link(tmp, path)  # atomic, and fails if `path` exists
        finally:
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()
        dir_fd = os.open(self._directory, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)

    def _check_pin(self) -> None:
        assert self._directory is not None
        path = self._directory / _PIN_CHECK_NAME
        if not path.exists():
            salt, nonce = secrets.token_bytes(16), secrets.token_bytes(12)
            blob = AESGCM(self._kdf(salt, _SCRYPT_N, _SCRYPT_R, _SCRYPT_P)).encrypt(
                nonce, _PIN_CHECK_PLAINTEXT, _FORMAT.encode()
            )
            doc = {
                "format": _FORMAT,
                "kdf": self._kdf_params(salt),
                "nonce": _b64(nonce),
                "ciphertext": _b64(blob),
            }
            try:
                self._write_exclusive(path, json.dumps(doc).encode())
                return
            except FileExistsError:
                pass  # created concurrently: verify against it
        try:
            doc = json.loads(path.read_bytes())
            key = self._derive_from(doc["kdf"])
            nonce, blob = _unb64(doc["nonce"]), _unb64(doc["ciphertext"])
        except (OSError, ValueError, KeyError, TypeError):
            raise KeyBackendError(
                f"PIN check file {path} is unreadable or corrupt; restore it from backup"
            ) from None
        try:
            AESGCM(key).decrypt(nonce, blob, _FORMAT.encode())
        except InvalidTag:
            raise BadPin(f"wrong PIN for software key store {self._directory}") from None

    def _aad(self, label: str, kind: KeyKind) -> bytes:
        return f"{_FORMAT}|{label}|{kind.value}".encode()

    def _write_key_file(self, label: str, key: _SoftKey) -> None:
        salt = secrets.token_bytes(16)
        derived = self._kdf(salt, _SCRYPT_N, _SCRYPT_R, _SCRYPT_P)
        doc: dict[str, Any] = {
            "format": _FORMAT,
            "label": label,
            "kind": key.kind.value,
            "kdf": self._kdf_params(salt),
        }
        private = key.ec_key if key.ec_key is not None else key.rsa_key
        if private is not None:
            doc["pkcs8"] = private.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.BestAvailableEncryption(_b64(derived).encode()),
            ).decode("ascii")
        else:
            nonce = secrets.token_bytes(12)
            doc["nonce"] = _b64(nonce)
            doc["ciphertext"] = _b64(
                AESGCM(derived).encrypt(nonce, key.secret, self._aad(label, key.kind))
            )
        try:
            self._write_exclusive(self._key_path(label), json.dumps(doc, indent=1).encode())
        except FileExistsError:
            raise KeyExists(f"key {label!r} already exists in {self.description}") from None
        except OSError as exc:
            raise KeyBackendError(
                f"cannot write key {label!r} to {self.description}: {exc.strerror}"
            ) from None

    def _read_key_file(self, label: str) -> _SoftKey:
        path = self._key_path(label)
        try:
            raw = path.read_bytes()
        except FileNotFoundError:
            raise KeyNotFound(f"no key {label!r} in {self.description}") from None
        except OSError as exc:
            raise KeyBackendError(f"cannot read key file {path}: {exc.strerror}") from None
        damaged = IntegrityError(f"key file {path} is damaged or was not written for key {label!r}")
        try:
            doc = json.loads(raw)
            if doc.get("format") != _FORMAT or doc.get("label") != label:
                raise damaged
            kind = KeyKind(doc["kind"])
            derived = self._derive_from(doc["kdf"])
            if kind in _CURVES:
                loaded = serialization.load_pem_private_key(
                    doc["pkcs8"].encode("ascii"), password=_b64(derived).encode()
                )
                if not isinstance(loaded, ec.EllipticCurvePrivateKey) or not isinstance(
                    loaded.curve, type(_CURVES[kind])
                ):
                    raise damaged
                return _SoftKey(kind, ec_key=loaded)
            if kind is KeyKind.RSA_3072:
                loaded = serialization.load_pem_private_key(
                    doc["pkcs8"].encode("ascii"), password=_b64(derived).encode()
                )
                if not isinstance(loaded, rsa.RSAPrivateKey) or loaded.key_size != RSA_BITS:
                    raise damaged
                return _SoftKey(kind, rsa_key=loaded)
            secret = AESGCM(derived).decrypt(
                _unb64(doc["nonce"]), _unb64(doc["ciphertext"]), self._aad(label, kind)
            )
            return _SoftKey(kind, secret=secret)
        except IntegrityError:
            raise
        except (ValueError, KeyError, TypeError, AttributeError, InvalidTag):
            # A wrong PIN is caught at open by the PIN check; here it means tampering.
            raise damaged from None
