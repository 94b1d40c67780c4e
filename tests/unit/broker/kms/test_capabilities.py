"""The KMS asks the key backend for the optional powers it needs (wrap/unwrap, MAC, destroy)
when built, so a backend without one fails at start-up, not on the first request."""

from __future__ import annotations

import pytest

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
