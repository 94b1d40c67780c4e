"""Envelope encryption: a fresh AES-256-GCM data key per value, wrapped by a per-tenant
key-encryption key (KEK) that lives in the key backend and never leaves it. Data keys (and
nonces) come from the key backend's random generator (`C_GenerateRandom` on a PKCS#11 token,
`os.urandom` for the software backend); a backend without one falls back to `os.urandom`.

A `SealedBlob` names the KEK that wrapped its data key, so blobs sealed before a KEK rotation
stay readable until they are rewrapped (`Envelope.rewrap`). The associated data binds a blob to
where it belongs (tenant, reference, version, ...): the caller builds it with `aad(...)`, and a
blob moved anywhere else fails to open with `IntegrityError`.

KEK labels are `kek.<tenant>.<generation>`; the current generation per tenant is kept in the
storage meta table under `kek.current.<tenant>`. Tenants named with a leading underscore are
the broker's own (e.g. `_system` for database admin passwords).
"""

from __future__ import annotations

import collections
import contextlib
import datetime as dt
import os
import re
import struct
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Final, Protocol

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from broker.errors import InvalidArgument
from broker.storage.interface import MetaRepository
from ca.clock import Clock
from ca.errors import IntegrityError, KeyExists
from ca.keys import KeyBackend, KeyKind, RandomBackend, data_key_wrapper, key_destroyer
from ca.keys.executor import token_call

__all__ = [
    "DATA_KEYS_COUNTER",
    "MAX_DATA_KEY_AGE",
    "SYSTEM_TENANT",
    "DataKeyCache",
    "Envelope",
    "KekRotation",
    "KekRotator",
    "KekTenants",
    "SealedBlob",
    "SealedStore",
    "aad",
    "aad_field",
    "kek_label",
]

SYSTEM_TENANT: Final = "_system"
#: Storage counter moved whenever cached data keys must go on every worker and replica.
DATA_KEYS_COUNTER: Final = "data_keys"
MAX_DATA_KEY_AGE: Final = dt.timedelta(minutes=5)
_TENANT_RE: Final = re.compile(r"^_?[a-z0-9][a-z0-9-]{0,62}$")
_FORMAT: Final = 1
_NONCE_BYTES: Final = 12
_DATA_KEY_BYTES: Final = 32


def _check_tenant(tenant: str) -> str:
    if not _TENANT_RE.fullmatch(tenant):
        raise InvalidArgument(
            f"invalid tenant {tenant!r}: use 1-63 lowercase letters, digits or '-'"
        )
    return tenant


def kek_label(tenant: str, generation: int) -> str:
    return f"kek.{_check_tenant(tenant)}.{generation}"


def aad(*parts: str | int) -> bytes:
    """Unambiguous associated data from parts (length-prefixed, so ("a", "bc") != ("ab", "c"))."""
    out = bytearray()
    for part in parts:
        raw = str(part).encode()
        out += struct.pack(">I", len(raw)) + raw
    return bytes(out)


def aad_field(value: object) -> str:
    """One stored field as an `aad` part for a row MAC: None as a NUL (distinct from any text,
    the empty string included), datetimes in UTC to the microsecond, the rest as text."""
    if value is None:
        return "\x00"
    if isinstance(value, dt.datetime):
        return value.astimezone(dt.UTC).isoformat(timespec="microseconds")
    return str(value)


@dataclass(frozen=True)
class SealedBlob:
    kek_label: str
    wrapped_key: bytes
    nonce: bytes
    ciphertext: bytes  # AES-GCM output (ciphertext || tag)

    def to_bytes(self) -> bytes:
        label = self.kek_label.encode()
        return (
            struct.pack(">BHH", _FORMAT, len(label), len(self.wrapped_key))
            + label
            + self.wrapped_key
            + self.nonce
            + self.ciphertext
        )

    @classmethod
    def from_bytes(cls, data: bytes) -> SealedBlob:
        try:
            version, label_len, wrapped_len = struct.unpack_from(">BHH", data)
            if version != _FORMAT:
                raise ValueError(f"unknown format {version}")
            offset = 5
            label = data[offset : offset + label_len].decode()
            offset += label_len
            wrapped = data[offset : offset + wrapped_len]
            offset += wrapped_len
            nonce = data[offset : offset + _NONCE_BYTES]
            ciphertext = data[offset + _NONCE_BYTES :]
            if len(wrapped) != wrapped_len or len(nonce) != _NONCE_BYTES or len(ciphertext) < 16:
                raise ValueError("truncated")
        except (struct.error, UnicodeDecodeError, ValueError) as exc:
            raise IntegrityError(f"sealed blob is damaged: {exc}") from None
        return cls(label, bytes(wrapped), bytes(nonce), bytes(ciphertext))


class DataKeyCache:
    """Data keys unwrapped for reads, kept in this process's memory only: never written,
    logged or pickled, bounded in count (least recently used go first) and in age (at most
    `MAX_DATA_KEY_AGE` by the injected clock's monotonic time). Keyed by (KEK label, wrapped
    key): a blob rewrapped under another KEK or sealed afresh is a different entry.

    What it trades: a secret read that hits skips the token (one round trip to the HSM) at the
    cost of data keys staying in memory for up to five minutes after their last unwrap; the
    KEK never leaves the token. `Envelope.forget_data_keys` empties it at once on rotate,
    rollback, revoke, delete and KEK rotation, and other workers and replicas follow within
    their 2 s sync (`Envelope.sync`). Thread-safe."""

    def __init__(
        self, clock: Clock, *, max_entries: int = 4096, max_age: dt.timedelta = MAX_DATA_KEY_AGE
    ) -> None:
        if not 1 <= max_entries <= 1_000_000:
            raise ValueError("max_entries must be 1..1000000")
        if not dt.timedelta(0) < max_age <= MAX_DATA_KEY_AGE:
            raise ValueError(f"max_age must be positive and at most {MAX_DATA_KEY_AGE}")
        self._clock = clock
        self._max_entries = max_entries
        self._max_age = max_age.total_seconds()
        self._entries: collections.OrderedDict[tuple[str, bytes], tuple[bytes, float]] = (
            collections.OrderedDict()
        )
        self._lock = threading.Lock()
        #: Moves on every `clear`: a key unwrapped by a read that started before a clear is
        #: not cached after it (`put(..., generation=)`).
        self.generation = 0
        self.hits = 0
        self.misses = 0

    def get(self, kek_label: str, wrapped: bytes) -> bytes | None:
        key = (kek_label, wrapped)
        now = self._clock.monotonic()
        with self._lock:
            entry = self._entries.get(key)
            if entry is None or entry[1] <= now:
                if entry is not None:
                    del self._entries[key]
                self.misses += 1
                return None
            self._entries.move_to_end(key)
            self.hits += 1
            return entry[0]

    def put(
        self, kek_label: str, wrapped: bytes, data_key: bytes, *, generation: int | None = None
    ) -> None:
        """Keep `data_key`, unless the cache was cleared since `generation` was read."""
        expires = self._clock.monotonic() + self._max_age
        with self._lock:
            if generation is not None and generation != self.generation:
                return
            self._entries[(kek_label, wrapped)] = (data_key, expires)
            self._entries.move_to_end((kek_label, wrapped))
            while len(self._entries) > self._max_entries:
                self._entries.popitem(last=False)

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()
            self.generation += 1

    def __len__(self) -> int:
        return len(self._entries)

    def __repr__(self) -> str:
        return f"<DataKeyCache {len(self._entries)} entries>"  # never the keys

    def __reduce__(self) -> tuple[object, ...]:
        raise TypeError("a DataKeyCache holds data keys and is never pickled")


class Envelope:
    """Seal and open values under per-tenant KEKs held by `keys`."""

    def __init__(
        self, keys: KeyBackend, meta: MetaRepository, data_keys: DataKeyCache | None = None
    ) -> None:
        self._keys = data_key_wrapper(keys)
        self._random = keys.random if isinstance(keys, RandomBackend) else os.urandom
        self._meta = meta
        self._data_keys = data_keys
        self._data_keys_seen: str | None = None

    @property
    def data_keys(self) -> DataKeyCache | None:
        return self._data_keys

    @property
    def keys(self) -> KeyBackend:
        return self._keys

    async def generation(self, tenant: str) -> int:
        """The tenant's current KEK generation (0: none yet)."""
        value = await self._meta.get_meta(f"kek.current.{_check_tenant(tenant)}")
        return 0 if value is None else int(value)

    async def current_kek(self, tenant: str) -> str:
        """The label of the tenant's current KEK, creating generation 1 on first use."""
        generation = await self.generation(tenant)
        if generation == 0:
            generation = 1
            self._ensure(kek_label(tenant, generation))
            await self._meta.set_meta(f"kek.current.{tenant}", str(generation))
        return kek_label(tenant, generation)

    async def new_kek(self, tenant: str) -> str:
        """Create the next KEK generation and make it current; returns its label. Blobs under
        older generations still open; rewrap them, then destroy the old KEK."""
        generation = await self.generation(tenant) + 1
        label = kek_label(tenant, generation)
        self._ensure(label)
        await self._meta.set_meta(f"kek.current.{tenant}", str(generation))
        return label

    def _ensure(self, label: str) -> None:
        with contextlib.suppress(KeyExists):  # another process created it first
            self._keys.create_key(label, KeyKind.AES_256)

    async def seal(self, tenant: str, plaintext: bytes, associated: bytes) -> SealedBlob:
        label = await self.current_kek(tenant)
        return await self._seal_off_loop(label, plaintext, associated)

    def _fresh_key(self) -> tuple[bytes, bytes]:
        """A new data key and nonce, in one call to the backend's random generator."""
        raw = self._random(_DATA_KEY_BYTES + _NONCE_BYTES)
        if len(raw) != _DATA_KEY_BYTES + _NONCE_BYTES:
            raise IntegrityError("the key backend's random generator returned a short read")
        return raw[:_DATA_KEY_BYTES], raw[_DATA_KEY_BYTES:]

    async def _seal_off_loop(self, label: str, plaintext: bytes, associated: bytes) -> SealedBlob:
        data_key, nonce = await token_call(self._keys, self._fresh_key)
        ciphertext = AESGCM(data_key).encrypt(nonce, plaintext, associated)
        wrapped = await token_call(self._keys, self._keys.wrap, label, data_key)
        return SealedBlob(label, wrapped, nonce, ciphertext)

    def seal_with(self, label: str, plaintext: bytes, associated: bytes) -> SealedBlob:
        data_key, nonce = self._fresh_key()
        ciphertext = AESGCM(data_key).encrypt(nonce, plaintext, associated)
        return SealedBlob(label, self._keys.wrap(label, data_key), nonce, ciphertext)

    async def reseal_if_stale(
        self, tenant: str, blob: SealedBlob, plaintext: bytes, associated: bytes
    ) -> SealedBlob | None:
        """Call after storing `blob`: None if its KEK is still the tenant's current one, else
        the value sealed again under the current KEK, to compare-and-set over the stored blob.
        This closes the race with a concurrent KEK rotation (which makes the new generation
        current before it rewraps and destroys, so it may not have seen `blob`)."""
        current = await self.current_kek(tenant)
        if blob.kek_label == current:
            return None
        return await self._seal_off_loop(current, plaintext, associated)

    def open(self, blob: SealedBlob, associated: bytes) -> bytes:
        """The plaintext; raises `IntegrityError` for a tampered, swapped or misplaced blob and
        `KeyNotFound` when its KEK is gone."""
        data_key = self._keys.unwrap(blob.kek_label, blob.wrapped_key)
        try:
            return AESGCM(data_key).decrypt(blob.nonce, blob.ciphertext, associated)
        except InvalidTag:
            raise IntegrityError(
                "sealed value did not verify: tampered with, or moved from another secret, "
                "version or tenant"
            ) from None

    async def unseal(self, blob: SealedBlob, associated: bytes) -> bytes:
        """`open` for the request path: the data key from the cache, or unwrapped by the token
        on its executor (never on the event loop). Same errors as `open`; a data key is cached
        only once the value verified under it."""
        cache = self._data_keys
        generation = 0 if cache is None else cache.generation
        data_key = None if cache is None else cache.get(blob.kek_label, blob.wrapped_key)
        fresh = data_key is None
        if data_key is None:
            data_key = await token_call(
                self._keys, self._keys.unwrap, blob.kek_label, blob.wrapped_key
            )
        try:
            plaintext = AESGCM(data_key).decrypt(blob.nonce, blob.ciphertext, associated)
        except InvalidTag:
            raise IntegrityError(
                "sealed value did not verify: tampered with, or moved from another secret, "
                "version or tenant"
            ) from None
        if fresh and cache is not None:
            cache.put(blob.kek_label, blob.wrapped_key, data_key, generation=generation)
        return plaintext

    async def forget_data_keys(self) -> None:
        """Drop every cached data key here at once, and on every other worker and replica at
        their next `sync` (the storage counter moves)."""
        if self._data_keys is not None:
            self._data_keys.clear()
        value = await self._meta.increment_counter(DATA_KEYS_COUNTER)
        await self._meta.set_meta(DATA_KEYS_COUNTER, str(value))
        self._data_keys_seen = str(value)

    async def sync(self) -> None:
        """Drop the cached data keys if another process asked for it (one small read)."""
        seen = await self._meta.get_meta(DATA_KEYS_COUNTER)
        if seen != self._data_keys_seen:
            if self._data_keys is not None:
                self._data_keys.clear()
            self._data_keys_seen = seen

    def rewrap(self, blob: SealedBlob, label: str) -> SealedBlob:
        """The same ciphertext with its data key rewrapped under `label` (the value itself is
        never decrypted)."""
        data_key = self._keys.unwrap(blob.kek_label, blob.wrapped_key)
        return SealedBlob(label, self._keys.wrap(label, data_key), blob.nonce, blob.ciphertext)


class SealedStore(Protocol):
    """A store of sealed blobs (secret versions, database admin passwords, ...). KEK rotation
    (`broker kek rotate`) walks every registered store (`Application.sealed_stores`)."""

    async def rewrap(self, envelope: Envelope, tenant: str, new_label: str) -> int:
        """Rewrap every blob of `tenant` not yet under `new_label` (values are never
        decrypted); return how many were rewrapped."""
        ...

    async def kek_in_use(self, label: str) -> bool:
        """True while any blob in this store is still wrapped under `label`."""
        ...


@dataclass(frozen=True)
class KekRotation:
    tenant: str
    new_label: str
    rewrapped: int
    destroyed: tuple[str, ...]
    kept: tuple[str, ...]  # older KEKs some blob still uses (a concurrent write; rotate again)


class KekTenants(Protocol):
    async def kek_tenants(self) -> list[str]:
        """Every tenant that has a KEK."""
        ...


class KekRotator:
    """`broker kek rotate`: a new KEK generation per tenant, every registered store's blobs
    rewrapped under it (values are never decrypted), then each older generation destroyed once
    no store uses it. Safe to run again after a failure: rewrapping skips blobs already under
    the newest KEK and destruction re-checks every store."""

    def __init__(
        self, envelope: Envelope, stores: Sequence[SealedStore], tenants: KekTenants
    ) -> None:
        self._envelope = envelope
        self._stores = stores
        self._tenants = tenants

    async def rotate(self, tenant: str | None = None) -> list[KekRotation]:
        """Rotate `tenant` (every tenant with a KEK when None, including `SYSTEM_TENANT`)."""
        if tenant is not None:
            _check_tenant(tenant)
            tenants = [tenant]
        else:
            tenants = await self._tenants.kek_tenants()
        return [await self._rotate_one(t) for t in tenants]

    async def _rotate_one(self, tenant: str) -> KekRotation:
        label = await self._envelope.new_kek(tenant)
        generation = await self._envelope.generation(tenant)
        rewrapped = 0
        for store in self._stores:
            rewrapped += await store.rewrap(self._envelope, tenant, label)
        # Data keys unwrapped under the old generations go from every process's memory now.
        await self._envelope.forget_data_keys()
        destroyed: list[str] = []
        kept: list[str] = []
        keys = key_destroyer(self._envelope.keys)
        for old in range(1, generation):
            old_label = kek_label(tenant, old)
            if not keys.has_key(old_label):
                continue
            in_use = False
            for store in self._stores:
                if await store.kek_in_use(old_label):
                    in_use = True
                    break
            if in_use:
                kept.append(old_label)
            else:
                keys.destroy_key(old_label)
                destroyed.append(old_label)
        return KekRotation(tenant, label, rewrapped, tuple(destroyed), tuple(kept))
