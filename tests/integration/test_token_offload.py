"""A slow token must not stall RPCs that do not need it: token calls run on the key backend's
executor, never on the event loop. The backend here is a software backend behind a gate that
holds every signature until the test opens it (an injected delay of any length, ordered by
events, no timing)."""

from __future__ import annotations

import asyncio
import concurrent.futures
import threading
from collections.abc import Iterator
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric import ec
from grpc_health.v1 import health_pb2, health_pb2_grpc

from broker.api._proto import ca_pb2
from ca.keys import BackendSigner, KeyKind, SoftwareBackend

from .conftest import BrokerFactory

# A dev ID: an operator minting a prod identity alone is refused (a second operator approves).
WORKLOAD_ID = "spiffe://example.org/acme/dev/web"

TIMEOUT = 20.0


class _GatedSigner(BackendSigner):
    def __init__(self, inner: Any, backend: SlowToken) -> None:
        super().__init__(inner.label, inner.public_key())
        self._inner = inner
        self._backend = backend

    def sign_raw_digest(self, digest: bytes) -> bytes:
        self._backend.wait_for_gate()
        return bytes(self._inner.sign_raw_digest(digest))


class SlowToken:
    """A SoftwareBackend whose signatures wait for `gate` while it is closed (the test's
    stand-in for a token that takes its time), with an executor like Pkcs11Backend's."""

    def __init__(self) -> None:
        self._inner = SoftwareBackend()
        self.executor = concurrent.futures.ThreadPoolExecutor(max_workers=4)
        self.gate = threading.Event()
        self.gate.set()
        self.entered = threading.Event()
        self.loop_threads: set[int] = set()

    def wait_for_gate(self) -> None:
        self.entered.set()
        self.gate.wait(TIMEOUT)  # bounded: a regression fails instead of hanging

    @property
    def description(self) -> str:
        return "slow token (test)"

    def signer(self, label: str) -> ec.EllipticCurvePrivateKey:
        return _GatedSigner(self._inner.signer(label), self)

    def create_key(self, label: str, kind: KeyKind) -> None:
        self._inner.create_key(label, kind)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)

    def close(self) -> None:
        self.gate.set()
        self.executor.shutdown(wait=False)
        self._inner.close()


@pytest.fixture
def slow_token() -> Iterator[SlowToken]:
    token = SlowToken()
    try:
        yield token
    finally:
        token.gate.set()


async def test_bundle_and_health_are_answered_while_a_token_call_is_in_flight(
    broker_factory: BrokerFactory, slow_token: SlowToken
) -> None:
    b = await broker_factory(keys=slow_token)
    ca = b.ca()
    health = health_pb2_grpc.HealthStub(b.channel(b.operator))
    await ca.GetBundle(ca_pb2.GetBundleRequest(), timeout=TIMEOUT)  # channels up

    slow_token.gate.clear()
    slow_token.entered.clear()
    mint = asyncio.ensure_future(
        ca.MintX509SVID(ca_pb2.MintX509SVIDRequest(spiffe_id=WORKLOAD_ID), timeout=TIMEOUT)
    )
    # The mint is now inside the token, held there.
    assert await asyncio.to_thread(slow_token.entered.wait, TIMEOUT)

    bundle = await ca.GetBundle(ca_pb2.GetBundleRequest(), timeout=TIMEOUT)
    check = await health.Check(health_pb2.HealthCheckRequest(service=""), timeout=TIMEOUT)
    assert bundle.pem and check.status == health_pb2.HealthCheckResponse.SERVING
    assert not mint.done()  # answered while the signature was still being made

    slow_token.gate.set()
    issued = await mint
    assert issued.spiffe_id == WORKLOAD_ID and issued.cert_chain
