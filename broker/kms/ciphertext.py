"""The KMS ciphertext format and encryption contexts.

A ciphertext names where it belongs (tenant, key, key version), so a rotated key keeps old
data readable and a ciphertext handed to another tenant or key is refused before any key is
touched. The payload is AES-256-GCM under a fresh one-time key that the key version wraps
inside the key backend; the associated data binds the header and the caller's encryption
context, so changing either makes decryption fail.

    b"bkms" | format (1) | tenant | key name | version (u32) | wrapped key | nonce (12) | ct+tag

(strings and the wrapped key are u16-length-prefixed). An encryption context is a small map
of strings; it is never stored, only bound (and recorded in the audit event as a SHA-256).
"""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Final

from broker.envelope import aad
from broker.errors import InvalidArgument

__all__ = [
    "MAX_CONTEXT_BYTES",
    "MAX_CONTEXT_PAIRS",
    "Ciphertext",
    "context_bytes",
    "context_hash",
]

MAGIC: Final = b"bkms"
FORMAT: Final = 1
NONCE_BYTES: Final = 12
TAG_BYTES: Final = 16
MAX_CONTEXT_PAIRS: Final = 32
MAX_CONTEXT_BYTES: Final = 4096
_HEADER: Final = struct.Struct(">4sB")


def context_bytes(context: Mapping[str, str]) -> bytes:
    """Canonical bytes of an encryption context (order-free, unambiguous). Raises
    `InvalidArgument` for more than 32 pairs, more than 4096 bytes, or an empty key."""
    if len(context) > MAX_CONTEXT_PAIRS:
        raise InvalidArgument(
            f"an encryption context has at most {MAX_CONTEXT_PAIRS} pairs, not {len(context)}"
        )
    size = 0
    parts: list[str] = []
    for key in sorted(context):
        value = context[key]
        if not key:
            raise InvalidArgument("an encryption context key must not be empty")
        size += len(key.encode()) + len(value.encode())
        parts += [key, value]
    if size > MAX_CONTEXT_BYTES:
        raise InvalidArgument(
            f"an encryption context is at most {MAX_CONTEXT_BYTES} bytes, not {size}"
        )
    return aad("broker.kms.context.v1", *parts)


def context_hash(context: Mapping[str, str]) -> str:
    """The hex SHA-256 that names an encryption context in the audit ledger."""
    return hashlib.sha256(context_bytes(context)).hexdigest()


@dataclass(frozen=True)
class Ciphertext:
    tenant: str
    key: str
    version: int
    wrapped_key: bytes
    nonce: bytes
    sealed: bytes  # AES-GCM ciphertext || tag

    def associated(self, context: Mapping[str, str]) -> bytes:
        return aad("broker.kms.v1", self.tenant, self.key, self.version) + context_bytes(context)

    def to_bytes(self) -> bytes:
        out = bytearray(_HEADER.pack(MAGIC, FORMAT))
        for text in (self.tenant, self.key):
            raw = text.encode()
            out += struct.pack(">H", len(raw)) + raw
        out += struct.pack(">IH", self.version, len(self.wrapped_key)) + self.wrapped_key
        return bytes(out + self.nonce + self.sealed)

    @classmethod
    def from_bytes(cls, data: bytes) -> Ciphertext:
        """Raises `InvalidArgument` for anything that is not a whole KMS ciphertext."""
        try:
            magic, fmt = _HEADER.unpack_from(data)
            if magic != MAGIC or fmt != FORMAT:
                raise ValueError("not a broker KMS ciphertext")
            offset = _HEADER.size
            texts = []
            for _ in range(2):
                (length,) = struct.unpack_from(">H", data, offset)
                offset += 2
                raw = data[offset : offset + length]
                if len(raw) != length:
                    raise ValueError("truncated")
                texts.append(raw.decode())
                offset += length
            version, wrapped_len = struct.unpack_from(">IH", data, offset)
            offset += 6
            wrapped = data[offset : offset + wrapped_len]
            offset += wrapped_len
            nonce = data[offset : offset + NONCE_BYTES]
            sealed = data[offset + NONCE_BYTES :]
            if len(wrapped) != wrapped_len or len(nonce) != NONCE_BYTES or len(sealed) < TAG_BYTES:
                raise ValueError("truncated")
            if version < 1:
                raise ValueError("bad key version")
        except (struct.error, UnicodeDecodeError, ValueError) as exc:
            raise InvalidArgument(f"malformed ciphertext: {exc}") from None
        return cls(texts[0], texts[1], version, bytes(wrapped), bytes(nonce), bytes(sealed))
