"""Keyed fingerprints of managed secret values, and the broker side that issues them.

Design (per-scan derived key; see docs/developers.md "What a scan reveals"):
- the broker holds one HMAC-SHA256 key, `scan.fingerprint`, inside its key backend; it never
  leaves the backend;
- each scan gets a fresh random `scan_id` and a derived key `K = HMAC(scan.fingerprint,
  "broker-scan-v1" || scan_id)`, computed inside the backend;
- for every secret version that may still be distributed (current, or previous within its
  rollback window) the broker returns `HMAC-SHA256(K, value)`, the value's length and its
  reference, never the value;
- the scanner hashes candidate strings under K locally and compares. Nothing the scanner
  reads leaves the machine, and the scanner never holds a managed value.

No grpc here; `FingerprintIssuer` is the domain call behind `broker.v1.Scan/Fingerprints`.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import logging
import secrets as random
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Final

from broker.errors import BrokerError
from ca.errors import CAError, KeyExists
from ca.keys import KeyBackend, KeyKind, mac_signer
from ca.keys.executor import token_call

if TYPE_CHECKING:
    from broker.secrets import SecretService

__all__ = [
    "DERIVATION_CONTEXT",
    "MIN_FINGERPRINT_LENGTH",
    "SCAN_KEY_LABEL",
    "Fingerprint",
    "FingerprintIssuer",
    "FingerprintSet",
    "ScanKeySet",
    "fingerprint",
]

log = logging.getLogger(__name__)

SCAN_KEY_LABEL: Final = "scan.fingerprint"
DERIVATION_CONTEXT: Final = b"broker-scan-v1\x00"
# Shorter values are not fingerprinted: a 7-character value would match ordinary words and its
# fingerprint would be cheap to brute-force offline.
MIN_FINGERPRINT_LENGTH: Final = 8


def fingerprint(key: bytes, value: bytes) -> bytes:
    """HMAC-SHA256 of `value` under a per-scan key."""
    return hmac.new(key, value, hashlib.sha256).digest()


@dataclass(frozen=True)
class Fingerprint:
    reference: str
    version: int
    digest: bytes
    length: int

    def __repr__(self) -> str:
        return f"Fingerprint({self.reference!r}, v{self.version}, len={self.length})"


@dataclass(frozen=True)
class ScanKeySet:
    """What one scan receives from the broker: the derived key and the fingerprints."""

    scan_id: str
    key: bytes = field(repr=False)
    fingerprints: tuple[Fingerprint, ...]


class FingerprintSet:
    """Fingerprints indexed by value length, for the scanner's matching loop."""

    def __init__(self, key: bytes, fingerprints: Iterable[Fingerprint]) -> None:
        self._key = key
        self._by_length: dict[int, dict[bytes, Fingerprint]] = {}
        for fp in fingerprints:
            self._by_length.setdefault(fp.length, {})[fp.digest] = fp

    def __len__(self) -> int:
        return sum(len(v) for v in self._by_length.values())

    def __repr__(self) -> str:
        return f"FingerprintSet({len(self)} fingerprints)"

    @property
    def lengths(self) -> frozenset[int]:
        return frozenset(self._by_length)

    def match(self, candidate: bytes) -> Fingerprint | None:
        """The managed secret whose value is exactly `candidate`, if any."""
        table = self._by_length.get(len(candidate))
        if table is None:
            return None
        return table.get(fingerprint(self._key, candidate))

    def matches_in(self, text: bytes) -> Iterator[Fingerprint]:
        """Every managed value that occurs anywhere in `text` (a substring test per length:
        used on short lines and on tokens too long to split)."""
        for length, table in self._by_length.items():
            for start in range(0, len(text) - length + 1):
                fp = table.get(fingerprint(self._key, text[start : start + length]))
                if fp is not None:
                    yield fp


class FingerprintIssuer:
    """Issues per-scan keys and fingerprints for a tenant's distributable secret versions."""

    def __init__(self, secrets: SecretService, keys: KeyBackend) -> None:
        """`keys` must compute MACs (`mac_signer`; CapabilityMissing when built otherwise)."""
        self._secrets = secrets
        self._keys = mac_signer(keys)

    async def _derived_key(self, scan_id: str) -> bytes:
        if not await token_call(self._keys, self._keys.has_key, SCAN_KEY_LABEL):
            with contextlib.suppress(KeyExists):  # another replica created it first
                await token_call(
                    self._keys, self._keys.create_key, SCAN_KEY_LABEL, KeyKind.HMAC_SHA256
                )
        return await token_call(
            self._keys, self._keys.mac, SCAN_KEY_LABEL, DERIVATION_CONTEXT + scan_id.encode()
        )

    async def issue(self, tenant: str, prefix: str = "") -> ScanKeySet:
        """A fresh scan key and the fingerprints of every version of the tenant's secrets
        (under `prefix`) that is current or within its rollback window. Revoked, deleted,
        destroyed and retired versions, and secrets missing metadata, are left out (a leak of
        those is no longer a live credential). Never raises for one unreadable secret."""
        scan_id = random.token_hex(16)
        key = await self._derived_key(scan_id)
        out: list[Fingerprint] = []
        for info in await self._secrets.list_secrets(tenant, prefix):
            if info.record.state != "active" or info.missing:
                continue
            try:
                details = await self._secrets.show(tenant, info.record.ref)
            except (BrokerError, CAError) as exc:  # a secret that does not verify: skipped
                log.warning("scan fingerprints: secret %s skipped: %s", info.sha256[:16], exc)
                continue
            for version in details.versions:
                if version.state not in ("current", "previous"):
                    continue
                try:
                    loaded = await self._secrets.load(tenant, info.record.ref, version.version)
                    if loaded is None:
                        continue
                    value = await self._secrets.reveal(loaded[0], loaded[1])
                except (BrokerError, CAError) as exc:  # tampered or unreadable: nothing to match
                    log.warning(
                        "scan fingerprints: secret %s v%d skipped: %s",
                        info.sha256[:16],
                        version.version,
                        exc,
                    )
                    continue
                if len(value.value) < MIN_FINGERPRINT_LENGTH:
                    continue
                out.append(
                    Fingerprint(
                        info.record.ref,
                        version.version,
                        fingerprint(key, value.value),
                        len(value.value),
                    )
                )
        return ScanKeySet(scan_id, key, tuple(out))
