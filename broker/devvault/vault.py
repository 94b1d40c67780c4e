"""The local dev vault: `$BROKER_HOME/dev-vault/vault.json`, values sealed at rest.

File format (`broker-dev-vault/1`, JSON, mode 0600, replaced atomically):
    {"format": "broker-dev-vault/1", "vault_id": hex, "key": "softhsm" | "file",
     "check": b64 (a wrapped random key: proves the key is this vault's),
     "entries": {reference: {"environment", "version", "pulled_at", "expires_at" (ISO 8601),
                             "wrapped_key": b64, "nonce": b64, "ciphertext": b64}}}
Each value is sealed with AES-256-GCM under its own data key, wrapped by the vault key
(`broker.devvault.keys`); the associated data binds vault id, reference, version, environment
and expiry, so an entry moved, edited or extended fails to open. Never a plaintext value on disk.

Expired entries are destroyed (removed from the file) by `gc`, which every `broker dev`
command runs first. The clock is injected.
"""

from __future__ import annotations

import base64
import datetime as dt
import json
import os
import secrets as random
import shutil
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from ca.clock import Clock, SystemClock

from .keys import VaultKey, VaultKeyError, VaultKeyGone, create_vault_key, open_vault_key

__all__ = [
    "FORMAT",
    "DevVault",
    "Entry",
    "PulledValue",
    "VaultCorrupted",
    "VaultError",
    "VaultKeyGone",
    "VaultSource",
]

FORMAT: Final = "broker-dev-vault/1"
_FILE: Final = "vault.json"
_MAX_FILE: Final = 64 * 1024 * 1024


class VaultError(Exception):
    """The dev vault cannot be used (one line; never a value)."""


class VaultCorrupted(VaultError):
    """The vault file is not ours, or was altered."""


@dataclass(frozen=True)
class Entry:
    reference: str
    environment: str
    version: int
    pulled_at: dt.datetime
    expires_at: dt.datetime


@dataclass(frozen=True)
class PulledValue:
    reference: str
    environment: str
    version: int
    value: bytes

    def __repr__(self) -> str:
        return f"PulledValue({self.reference!r}, v{self.version})"


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _unb64(text: object) -> bytes:
    if not isinstance(text, str):
        raise VaultCorrupted("the dev vault is corrupted (a field is not base64 text)")
    try:
        return base64.b64decode(text, validate=True)
    except ValueError:
        raise VaultCorrupted("the dev vault is corrupted (a field is not base64)") from None


def _time(text: object) -> dt.datetime:
    try:
        value = dt.datetime.fromisoformat(str(text))
    except ValueError:
        raise VaultCorrupted("the dev vault is corrupted (a bad timestamp)") from None
    if value.tzinfo is None:
        raise VaultCorrupted("the dev vault is corrupted (a timestamp without a zone)")
    return value


def _aad(vault_id: str, ref: str, env: str, version: int, expires: str) -> bytes:
    return json.dumps([FORMAT, vault_id, ref, env, version, expires]).encode()


class DevVault:
    """One developer's vault under `directory` (`$BROKER_HOME/dev-vault`). Not thread-safe;
    one `broker dev` process at a time."""

    def __init__(self, directory: Path, *, clock: Clock | None = None) -> None:
        self.directory = directory
        self._clock = clock or SystemClock()
        self._doc: dict[str, Any] | None = None
        self._key: VaultKey | None = None

    @property
    def path(self) -> Path:
        return self.directory / _FILE

    def exists(self) -> bool:
        return self.path.exists()

    def now(self) -> dt.datetime:
        return self._clock.now()

    # -- opening -----------------------------------------------------------------------------

    def _load(self) -> dict[str, Any]:
        if self._doc is not None:
            return self._doc
        try:
            if self.path.stat().st_size > _MAX_FILE:
                raise VaultCorrupted(f"{self.path} is too large to be a dev vault")
            doc = json.loads(self.path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            doc = {"format": FORMAT, "entries": {}}
        except (ValueError, UnicodeDecodeError):
            raise VaultCorrupted(
                f"{self.path} is not a dev vault (corrupted); run 'broker dev clear'"
            ) from None
        except OSError as exc:
            raise VaultError(f"cannot read {self.path}: {exc.strerror or exc}") from None
        if (
            not isinstance(doc, dict)
            or doc.get("format") != FORMAT
            or not isinstance(doc.get("entries"), dict)
        ):
            raise VaultCorrupted(
                f"{self.path} is not a {FORMAT} vault (foreign or corrupted); run "
                "'broker dev clear'"
            )
        self._doc = doc
        return doc

    def _vault_key(self, *, create: bool, softhsm: bool = True) -> VaultKey:
        if self._key is not None:
            return self._key
        doc = self._load()
        if "vault_id" not in doc:
            if not create:
                raise VaultError("the dev vault is empty: run 'broker dev pull --env dev'")
            self.directory.mkdir(mode=0o700, parents=True, exist_ok=True)
            for stale in ("hsm", "vault.key"):  # leftovers of a vault that was cleared
                target = self.directory / stale
                if target.is_dir():
                    shutil.rmtree(target)
                elif target.exists():
                    target.unlink()
            try:
                key = create_vault_key(self.directory, softhsm=softhsm)
            except VaultKeyError as exc:
                raise VaultError(str(exc)) from None
            doc.update(
                vault_id=random.token_hex(16),
                key=key.kind,
                check=_b64(key.wrap(random.token_bytes(32))),
            )
            self._key = key
            return key
        try:
            key = open_vault_key(self.directory, str(doc.get("key", "")))
            key.unwrap(_unb64(doc.get("check")))
        except VaultKeyGone as exc:
            raise VaultKeyGone(
                f"{exc}; the vault cannot be opened: run 'broker dev clear' and pull again"
            ) from None
        except VaultKeyError as exc:
            raise VaultCorrupted(
                f"the dev vault was not sealed by this vault's key (foreign or corrupted: {exc}); "
                "run 'broker dev clear'"
            ) from None
        self._key = key
        return key

    def close(self) -> None:
        if self._key is not None:
            self._key.close()
            self._key = None

    def _save(self) -> None:
        doc = self._load()
        self.directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        tmp = self.path.with_name(f".{_FILE}.{os.getpid()}.tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(doc, f, indent=1, sort_keys=True)
        tmp.replace(self.path)

    # -- entries -----------------------------------------------------------------------------

    def _entry(self, ref: str, raw: object) -> Entry:
        if not isinstance(raw, dict):
            raise VaultCorrupted("the dev vault is corrupted (an entry is not an object)")
        version = raw.get("version")
        if not isinstance(version, int):
            raise VaultCorrupted("the dev vault is corrupted (an entry has no version)")
        return Entry(
            ref,
            str(raw.get("environment", "")),
            version,
            _time(raw.get("pulled_at")),
            _time(raw.get("expires_at")),
        )

    def entries(self) -> list[Entry]:
        """Names, versions and expiry (never values), sorted by reference."""
        return [self._entry(r, e) for r, e in sorted(self._load()["entries"].items())]

    def gc(self) -> list[str]:
        """Destroy every expired entry; the references destroyed. Idempotent."""
        doc = self._load()
        now = self.now()
        gone = [e.reference for e in self.entries() if e.expires_at <= now]
        for ref in gone:
            del doc["entries"][ref]
        if gone:
            self._save()
        return gone

    def store(
        self,
        environment: str,
        pulled: Iterable[PulledValue],
        ttl: dt.timedelta,
        *,
        softhsm: bool = True,
        complete: bool = True,
    ) -> tuple[int, list[str]]:
        """Seal `pulled` with expiry now + ttl. With `complete`, entries of `environment` that
        were not pulled this time (revoked, deleted, no longer readable) are dropped. Returns
        (stored, dropped references)."""
        key = self._vault_key(create=True, softhsm=softhsm)
        doc = self._load()
        now = self.now()
        expires = (now + ttl).isoformat()
        seen: set[str] = set()
        for item in pulled:
            data_key = AESGCM.generate_key(256)
            nonce = random.token_bytes(12)
            sealed = AESGCM(data_key).encrypt(
                nonce,
                item.value,
                _aad(doc["vault_id"], item.reference, item.environment, item.version, expires),
            )
            doc["entries"][item.reference] = {
                "environment": item.environment,
                "version": item.version,
                "pulled_at": now.isoformat(),
                "expires_at": expires,
                "wrapped_key": _b64(key.wrap(data_key)),
                "nonce": _b64(nonce),
                "ciphertext": _b64(sealed),
            }
            seen.add(item.reference)
        dropped: list[str] = []
        if complete:
            for ref, raw in list(doc["entries"].items()):
                if (
                    ref not in seen
                    and isinstance(raw, dict)
                    and raw.get("environment") == environment
                ):
                    del doc["entries"][ref]
                    dropped.append(ref)
        self._save()
        return len(seen), sorted(dropped)

    def get(self, reference: str) -> bytes:
        """The value; `KeyError` when absent or expired, `VaultCorrupted`/`VaultKeyGone` when it
        cannot be opened."""
        raw = self._load()["entries"].get(reference)
        if raw is None:
            raise KeyError(reference)
        entry = self._entry(reference, raw)
        if entry.expires_at <= self.now():
            raise KeyError(reference)
        key = self._vault_key(create=False)
        try:
            data_key = key.unwrap(_unb64(raw.get("wrapped_key")))
            return AESGCM(data_key).decrypt(
                _unb64(raw.get("nonce")),
                _unb64(raw.get("ciphertext")),
                _aad(self._load()["vault_id"], reference, entry.environment, entry.version,
                     str(raw.get("expires_at"))),
            )  # fmt: skip
        except (VaultKeyError, InvalidTag, ValueError):
            raise VaultCorrupted(
                f"the dev vault entry for {reference} did not open (altered or foreign); run "
                "'broker dev clear'"
            ) from None

    def clear(self) -> int:
        """Remove every entry and the vault key (token or key file); the count removed."""
        try:
            count = len(self._load()["entries"])
        except VaultError:
            count = 0
        self.close()
        for name in (_FILE, "vault.key"):
            (self.directory / name).unlink(missing_ok=True)
        shutil.rmtree(self.directory / "hsm", ignore_errors=True)
        self._doc = None
        return count


class VaultSource:
    """The vault as a `broker.secretrefs.TextSource` (for `broker dev run`)."""

    def __init__(self, vault: DevVault) -> None:
        self._vault = vault

    def get_text(self, reference: str) -> str:
        try:
            return self._vault.get(reference).decode("utf-8")
        except KeyError:
            parts = reference.removeprefix("secret://").split("/")
            env = parts[1] if len(parts) > 2 else "dev"
            raise LookupError(
                f"not in the dev vault (or expired): run 'broker dev pull --env {env}'"
            ) from None
