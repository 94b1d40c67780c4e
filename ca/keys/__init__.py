"""Key custody: one small interface (`KeyBackend`), a PKCS#11 and a software implementation.

Open a backend by URI with `open_backend()`::

    backend = open_backend("pkcs11:token=broker?pin-source=file:/run/broker/pin")
    cert = builder.sign(backend.signer("issuing-ca-3"), hashes.SHA256())

`jws_signature()` gives the raw ``r || s`` ECDSA signature JWS wants, for any signer.
"""

from __future__ import annotations

from ca.keys.backend import KeyBackend, KeyKind
from ca.keys.pkcs11 import Pkcs11Backend
from ca.keys.signer import BackendSigner, jws_signature
from ca.keys.software import SoftwareBackend
from ca.keys.uri import PinSource, key_uri, open_backend

__all__ = [
    "BackendSigner",
    "KeyBackend",
    "KeyKind",
    "PinSource",
    "Pkcs11Backend",
    "SoftwareBackend",
    "jws_signature",
    "key_uri",
    "open_backend",
]
