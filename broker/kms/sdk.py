"""The grpc-free half of the KMS SDK: envelope encryption in the service's own process with a
local data-key cache bounded in uses and age (as AWS's Encryption SDK caches data keys).

    envelope = KmsEnvelope(BrokerDataKeySource(KmsClient(client)), "orders-dek")
    blob = envelope.encrypt(b"card ...", {"order": "42"})
    envelope.decrypt(blob, {"order": "42"})

`encrypt` asks the broker for a data key (GenerateDataKey) only when the cache has none for
this key and context that is younger than `max_age` and used fewer than `max_uses` times;
`decrypt` asks it to unwrap (Decrypt) only for a wrapped data key it has not seen recently.
Plaintext data keys stay in this process's memory only: never logged, written or pickled.
The message format:

    b"bkenv" | format (1) | wrapped data key (u16 length + bytes) | nonce (12) | ct + tag

where the wrapped data key is the broker's KMS ciphertext (it names key and version), and the
AES-GCM associated data is the canonical encryption context.
"""

from __future__ import annotations

import collections
import datetime as dt
import os
import struct
import threading
import time
from collections.abc import Callable, Mapping
from typing import Final, Protocol

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from broker import metrics
from broker.kms.ciphertext import context_bytes

__all__ = ["DataKeySource", "EnvelopeError", "KmsEnvelope", "LocalDataKeyCache"]

_MAGIC: Final = b"bkenv"
_FORMAT: Final = 1
_NONCE: Final = 12


class EnvelopeError(Exception):
    """A message that is malformed or did not verify (wrong context, altered)."""


class DataKeySource(Protocol):
    def generate_data_key(self, key: str, context: Mapping[str, str]) -> tuple[bytes, bytes]:
        """(plaintext data key, its KMS ciphertext)."""
        ...

    def decrypt_data_key(self, ciphertext: bytes, context: Mapping[str, str]) -> bytes: ...


class LocalDataKeyCache:
    """Data keys by cache key, each served at most `max_uses` times and for at most `max_age`
    (by `monotonic`), at most `max_entries` kept (least recently used go first). Thread-safe."""

    def __init__(
        self,
        *,
        max_uses: int = 1000,
        max_age: dt.timedelta = dt.timedelta(minutes=5),
        max_entries: int = 256,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        if max_uses < 1 or max_entries < 1 or max_age <= dt.timedelta(0):
            raise ValueError("max_uses, max_entries and max_age must be positive")
        self._max_uses = max_uses
        self._max_age = max_age.total_seconds()
        self._max_entries = max_entries
        self._monotonic = monotonic
        # key -> [plaintext, ciphertext, expires, uses]
        self._entries: collections.OrderedDict[object, list[object]] = collections.OrderedDict()
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0

    def get(self, key: object) -> tuple[bytes, bytes] | None:
        """The entry, counting one use; None (and the entry dropped) when expired or used up."""
        now = self._monotonic()
        with self._lock:
            entry = self._entries.get(key)
            if entry is None or entry[2] <= now or entry[3] >= self._max_uses:  # type: ignore[operator]
                self._entries.pop(key, None)
                self.misses += 1
                metrics.record_sdk_cache("kms-data-key", hit=False)
                return None
            entry[3] = entry[3] + 1  # type: ignore[operator]
            self._entries.move_to_end(key)
            self.hits += 1
        metrics.record_sdk_cache("kms-data-key", hit=True)
        return entry[0], entry[1]  # type: ignore[return-value]

    def put(self, key: object, plaintext: bytes, ciphertext: bytes, *, used: int = 0) -> None:
        with self._lock:
            self._entries[key] = [plaintext, ciphertext, self._monotonic() + self._max_age, used]
            self._entries.move_to_end(key)
            while len(self._entries) > self._max_entries:
                self._entries.popitem(last=False)

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()

    def __len__(self) -> int:
        return len(self._entries)

    def __repr__(self) -> str:
        return f"<LocalDataKeyCache {len(self._entries)} entries>"  # never the keys

    def __reduce__(self) -> tuple[object, ...]:
        raise TypeError("a LocalDataKeyCache holds data keys and is never pickled")


class KmsEnvelope:
    """Encrypt and decrypt messages of any size locally under data keys of one KMS key."""

    def __init__(
        self, source: DataKeySource, key: str, cache: LocalDataKeyCache | None = None
    ) -> None:
        self._source = source
        self._key = key
        self._cache = cache if cache is not None else LocalDataKeyCache()

    @property
    def cache(self) -> LocalDataKeyCache:
        return self._cache

    def encrypt(self, plaintext: bytes, context: Mapping[str, str]) -> bytes:
        associated = context_bytes(context)
        cache_key = ("encrypt", self._key, associated)
        cached = self._cache.get(cache_key)
        if cached is None:
            data_key, wrapped = self._source.generate_data_key(self._key, context)
            self._cache.put(cache_key, data_key, wrapped, used=1)
        else:
            data_key, wrapped = cached
        nonce = os.urandom(_NONCE)
        sealed = AESGCM(data_key).encrypt(nonce, plaintext, b"broker.kms.sdk.v1" + associated)
        return _MAGIC + struct.pack(">BH", _FORMAT, len(wrapped)) + wrapped + nonce + sealed

    def decrypt(self, message: bytes, context: Mapping[str, str]) -> bytes:
        """Raises `EnvelopeError` for a malformed message or one that does not verify; the
        broker's refusals (wrong context, unknown or disabled key) come from the source."""
        try:
            if not message.startswith(_MAGIC):
                raise ValueError("not a KMS envelope message")
            fmt, length = struct.unpack_from(">BH", message, len(_MAGIC))
            if fmt != _FORMAT:
                raise ValueError(f"unknown format {fmt}")
            offset = len(_MAGIC) + 3
            wrapped = message[offset : offset + length]
            nonce = message[offset + length : offset + length + _NONCE]
            sealed = message[offset + length + _NONCE :]
            if len(wrapped) != length or len(nonce) != _NONCE or len(sealed) < 16:
                raise ValueError("truncated")
        except (struct.error, ValueError) as exc:
            raise EnvelopeError(f"malformed message: {exc}") from None
        associated = context_bytes(context)
        cache_key = ("decrypt", bytes(wrapped), associated)
        cached = self._cache.get(cache_key)
        if cached is None:
            data_key = self._source.decrypt_data_key(bytes(wrapped), context)
            self._cache.put(cache_key, data_key, bytes(wrapped), used=1)
        else:
            data_key = cached[0]
        try:
            return AESGCM(data_key).decrypt(nonce, sealed, b"broker.kms.sdk.v1" + associated)
        except InvalidTag:
            raise EnvelopeError("the message did not verify: wrong context, or altered") from None
