"""KMS for services' own data (issue 16): named keys in the key backend, envelope encryption
with encryption contexts, signing and MACs, the scheduled key lifecycle and compliance reports.
"""

from __future__ import annotations

from broker.kms.ciphertext import Ciphertext, context_bytes, context_hash
from broker.kms.keys import (
    DataKey,
    KeyInfo,
    KeyIntegrityError,
    KeyMac,
    KeyService,
    Signature,
    refusal,
    unowned,
)

__all__ = [
    "Ciphertext",
    "DataKey",
    "KeyInfo",
    "KeyIntegrityError",
    "KeyMac",
    "KeyService",
    "Signature",
    "context_bytes",
    "context_hash",
    "refusal",
    "unowned",
]
