"""The key-backend interface: optional powers as protocols of their own, asked for by callers."""

from __future__ import annotations

import pytest
from cryptography.hazmat.primitives.asymmetric import ec

from ca.errors import CapabilityMissing, KeyBackendError
from ca.keys import (
    DataKeyWrapper,
    KeyBackend,
    KeyDestroyer,
    KeyKind,
    MacSigner,
    RsaSigner,
    SoftwareBackend,
    data_key_wrapper,
    key_destroyer,
    mac_signer,
    random_source,
    rsa_signer,
)


class SignOnly:
    """A backend with the core interface and no optional power (a signing-only KMS)."""

    description = "sign-only test backend"

    def __init__(self) -> None:
        self._keys: dict[str, ec.EllipticCurvePrivateKey] = {}

    def create_key(self, label: str, kind: KeyKind) -> None:
        self._keys[label] = ec.generate_private_key(ec.SECP256R1())

    def has_key(self, label: str) -> bool:
        return label in self._keys

    def signer(self, label: str) -> ec.EllipticCurvePrivateKey:
        return self._keys[label]

    def public_key(self, label: str) -> ec.EllipticCurvePublicKey:
        return self._keys[label].public_key()

    def close(self) -> None:
        pass


def test_a_core_backend_needs_no_optional_power() -> None:
    backend = SignOnly()
    assert isinstance(backend, KeyBackend)
    assert not isinstance(backend, DataKeyWrapper | MacSigner | KeyDestroyer | RsaSigner)


@pytest.mark.parametrize(
    ("accessor", "power"),
    [
        (data_key_wrapper, "wrap data keys"),
        (mac_signer, "compute MACs"),
        (key_destroyer, "destroy keys"),
        (random_source, "generate random bytes"),
        (rsa_signer, "sign with RSA keys"),
    ],
)
def test_asking_for_a_missing_power_names_backend_and_power(accessor: object, power: str) -> None:
    with pytest.raises(CapabilityMissing) as excinfo:
        accessor(SignOnly())  # type: ignore[operator]
    assert str(excinfo.value).startswith(f"key backend sign-only test backend cannot {power}")
    assert isinstance(excinfo.value, KeyBackendError)  # reported as the key backend failing


def test_accessors_return_the_backend_itself_when_it_has_the_power() -> None:
    backend = SoftwareBackend()
    assert data_key_wrapper(backend) is backend
    assert mac_signer(backend) is backend
    assert key_destroyer(backend) is backend
    assert random_source(backend) is backend
    assert rsa_signer(backend) is backend
