"""The dev vault's key: an AES-256 key that never leaves a SoftHSM2 token created for the user
under `$BROKER_HOME/dev-vault/hsm/` (the broker's own key custody code, `ca.keys`), or, only when
SoftHSM2 is not installed, a 32-byte key file of mode 0600 (with a warning).

The key only wraps per-entry data keys (AES key wrap); values are sealed with AES-GCM under
those. Without the key nothing in the vault can be opened: `VaultKeyGone` says so.
"""

from __future__ import annotations

import os
import secrets as random
from pathlib import Path
from typing import Final, Protocol

from cryptography.hazmat.primitives.keywrap import (
    InvalidUnwrap,
    aes_key_unwrap,
    aes_key_wrap,
)

from ca.errors import CAError, IntegrityError
from ca.keys import KeyKind, data_key_wrapper

__all__ = [
    "KEY_LABEL",
    "TOKEN_LABEL",
    "FileKey",
    "HsmKey",
    "VaultKey",
    "VaultKeyError",
    "VaultKeyGone",
    "create_vault_key",
    "open_vault_key",
]

TOKEN_LABEL: Final = "broker-dev-vault"  # noqa: S105 (a token label)
KEY_LABEL: Final = "dev-vault.kek"
_KEY_FILE: Final = "vault.key"
_PIN_FILE: Final = "pin"


class VaultKeyError(Exception):
    """The vault key cannot be used (says why, never key material)."""


class VaultKeyGone(VaultKeyError):
    """The key that sealed the vault no longer exists."""


class VaultKey(Protocol):
    kind: str

    def wrap(self, data_key: bytes) -> bytes: ...

    def unwrap(self, wrapped: bytes) -> bytes:
        """Raises `VaultKeyError` when `wrapped` was not made by this key."""
        ...

    def close(self) -> None: ...


def _write_private(path: Path, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)


class FileKey:
    """The software fallback: a random key in a 0600 file."""

    kind = "file"

    def __init__(self, path: Path) -> None:
        try:
            if path.stat().st_mode & 0o077:
                raise VaultKeyError(f"{path} is readable by others; refusing to use it")
            self._key = path.read_bytes()
        except FileNotFoundError:
            raise VaultKeyGone(f"the dev vault's key file {path} is gone") from None
        except OSError as exc:
            raise VaultKeyError(f"cannot read {path}: {exc.strerror or exc}") from None
        if len(self._key) != 32:
            raise VaultKeyError(f"{path} is not a dev vault key")

    @classmethod
    def create(cls, path: Path) -> FileKey:
        _write_private(path, random.token_bytes(32))
        return cls(path)

    def wrap(self, data_key: bytes) -> bytes:
        return aes_key_wrap(self._key, data_key)

    def unwrap(self, wrapped: bytes) -> bytes:
        try:
            return aes_key_unwrap(self._key, wrapped)
        except (InvalidUnwrap, ValueError):
            raise VaultKeyError("a data key did not unwrap under this vault's key") from None

    def close(self) -> None:
        self._key = b""

    def __repr__(self) -> str:
        return "FileKey(<hidden>)"


class HsmKey:
    """A non-extractable AES-256 key on the user's own SoftHSM2 token."""

    kind = "softhsm"

    def __init__(self, directory: Path) -> None:
        from broker.softhsm import configure_process
        from ca.keys.pkcs11 import Pkcs11Backend

        conf = directory / "softhsm2.conf"
        pin_path = directory / _PIN_FILE
        if not conf.is_file() or not pin_path.is_file() or not (directory / "tokens").is_dir():
            raise VaultKeyGone(f"the dev vault's SoftHSM2 token under {directory} is gone")
        try:
            configure_process(conf)
            self._backend = data_key_wrapper(
                Pkcs11Backend(TOKEN_LABEL, pin_path.read_bytes().strip())
            )
        except (CAError, OSError) as exc:
            raise VaultKeyGone(f"the dev vault's SoftHSM2 token cannot be opened: {exc}") from None
        if not self._backend.has_key(KEY_LABEL):
            self._backend.close()
            raise VaultKeyGone("the dev vault's key is no longer on its SoftHSM2 token")

    @classmethod
    def create(cls, directory: Path) -> HsmKey:
        from broker.softhsm import SOFTHSM_MODULE, configure_process, init_token
        from ca.keys.pkcs11 import Pkcs11Backend, refresh_module

        directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        # Hex PINs: softhsm2-util takes PINs on its command line and init_token refuses one
        # starting with '-', which a URL-safe token does once in 64 draws (the flaky pull).
        pin = random.token_hex(24).encode()
        _write_private(directory / _PIN_FILE, pin)
        try:
            conf = init_token(directory, TOKEN_LABEL, pin, random.token_hex(24).encode())
            configure_process(conf)
            refresh_module(SOFTHSM_MODULE)
            backend = Pkcs11Backend(TOKEN_LABEL, pin)
            try:
                backend.create_key(KEY_LABEL, KeyKind.AES_256)
            finally:
                backend.close()
        except CAError as exc:
            raise VaultKeyError(f"cannot create the dev vault's SoftHSM2 token: {exc}") from None
        return cls(directory)

    def wrap(self, data_key: bytes) -> bytes:
        return self._backend.wrap(KEY_LABEL, data_key)

    def unwrap(self, wrapped: bytes) -> bytes:
        try:
            return self._backend.unwrap(KEY_LABEL, wrapped)
        except IntegrityError:
            raise VaultKeyError("a data key did not unwrap under this vault's key") from None
        except CAError as exc:
            raise VaultKeyError(f"the vault's token refused: {exc}") from None

    def close(self) -> None:
        self._backend.close()


def create_vault_key(directory: Path, *, softhsm: bool) -> VaultKey:
    if softhsm:
        return HsmKey.create(directory / "hsm")
    return FileKey.create(directory / _KEY_FILE)


def open_vault_key(directory: Path, kind: str) -> VaultKey:
    if kind == "softhsm":
        return HsmKey(directory / "hsm")
    if kind == "file":
        return FileKey(directory / _KEY_FILE)
    raise VaultKeyError(f"unknown dev vault key kind {kind[:40]!r}")
