"""The KMS asks the key backend for the optional powers it needs (wrap/unwrap, MAC, destroy)
when built, so a backend without one fails at start-up, not on the first request. RSA keys are
optional: a backend without them refuses only rsa-3072 keys, before anything is generated."""

from __future__ import annotations

import pytest

from broker.errors import InvalidArgument
from broker.kms import KeyMac, KeyService
from ca.clock import FakeClock
from ca.errors import CapabilityMissing
from tests.unit.ca.keys.test_backend import SignOnly


class WrapAndMacOnly(SignOnly):
    """Wraps and MACs, cannot destroy keys."""

    def wrap(self, label: str, key_material: bytes) -> bytes:
        raise AssertionError("not called")

    def unwrap(self, label: str, wrapped: bytes) -> bytes:
        raise AssertionError("not called")

    def mac(self, label: str, data: bytes) -> bytes:
        raise AssertionError("not called")


def test_the_kms_refuses_a_backend_without_its_powers_when_built() -> None:
    with pytest.raises(CapabilityMissing, match="cannot compute MACs"):
        KeyMac(SignOnly())
    with pytest.raises(CapabilityMissing, match="cannot wrap data keys"):
        KeyService(None, SignOnly(), FakeClock(), mac=object())  # type: ignore[arg-type]
    with pytest.raises(CapabilityMissing, match="cannot destroy keys"):
        KeyService(None, WrapAndMacOnly(), FakeClock())  # type: ignore[arg-type]


class NoRsa(WrapAndMacOnly):
    """Every power the KMS needs, but no RSA keys; records what it is asked to create."""

    def __init__(self) -> None:
        super().__init__()
        self.created: list[str] = []

    def create_key(self, label: str, kind: object) -> None:
        self.created.append(label)

    def destroy_key(self, label: str) -> None:
        raise AssertionError("not called")


async def test_a_backend_without_rsa_keys_refuses_rsa_3072_and_creates_nothing() -> None:
    backend = NoRsa()
    service = KeyService(None, backend, FakeClock(), mac=object())  # type: ignore[arg-type]
    with pytest.raises(InvalidArgument, match="'rsa-3072' is not supported by the key backend"):
        await service.create(
            "default",
            "signing",
            purpose="sign",
            key_type="rsa-3072",
            owner="orders",
            environment="prod",
            classification="internal",
        )
    assert backend.created == []
