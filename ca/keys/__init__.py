"""Key custody: one small interface (`KeyBackend`), a PKCS#11 and a software implementation.

Open a backend by URI with `open_backend()`::

    backend = open_backend("pkcs11:token=broker?pin-source=file:/run/broker/pin")
    cert = builder.sign(backend.signer("issuing-ca-3"), hashes.SHA256())

Optional powers (wrap data keys, MAC, random bytes, destroy keys, RSA-PSS signing) are
protocols of their own; ask for one with `data_key_wrapper()`, `mac_signer()`,
`random_source()`, `key_destroyer()` or `rsa_signer()`.
`jws_signature()` gives the raw ``r || s`` ECDSA signature JWS wants, for any signer.

`Pkcs11Backend` is imported on first use: python-pkcs11 is needed only for ``pkcs11:``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ca.keys.backend import (
    DataKeyWrapper,
    DestroyingBackend,
    KeyBackend,
    KeyDestroyer,
    KeyKind,
    MacBackend,
    MacSigner,
    RandomBackend,
    RandomSource,
    RsaBackend,
    RsaSigner,
    WrappingBackend,
    data_key_wrapper,
    key_destroyer,
    mac_signer,
    random_source,
    rsa_pss,
    rsa_signer,
)
from ca.keys.signer import BackendSigner, jws_signature
from ca.keys.software import SoftwareBackend
from ca.keys.uri import PinSource, key_uri, open_backend

if TYPE_CHECKING:
    from ca.keys.pkcs11 import Pkcs11Backend

__all__ = [
    "BackendSigner",
    "DataKeyWrapper",
    "DestroyingBackend",
    "KeyBackend",
    "KeyDestroyer",
    "KeyKind",
    "MacBackend",
    "MacSigner",
    "PinSource",
    "Pkcs11Backend",
    "RandomBackend",
    "RandomSource",
    "RsaBackend",
    "RsaSigner",
    "SoftwareBackend",
    "WrappingBackend",
    "data_key_wrapper",
    "jws_signature",
    "key_destroyer",
    "key_uri",
    "mac_signer",
    "open_backend",
    "random_source",
    "rsa_pss",
    "rsa_signer",
]


def __getattr__(name: str) -> Any:
    if name == "Pkcs11Backend":
        from ca.keys.pkcs11 import Pkcs11Backend

        return Pkcs11Backend
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
