"""Integration fixtures: the broker's gRPC server in-process, wired the way
`broker.daemon._serve` wires it, but on 127.0.0.1:0 with a temp SQLite file, an in-memory
software key backend (or a SoftHSM2 token), a Config built directly and a FakeClock started at
the real time (TLS checks certificate validity against the wall clock; the rate limiter reads
the fake monotonic clock, so rate limits are deterministic).

- ``broker_factory``: ``await broker_factory(**options)`` starts a broker and returns a
  `BrokerHarness`; everything started is stopped at teardown.
- ``broker``: one broker with the defaults.

A `BrokerHarness` issues identities from its own CA (`operator`, `identity(spiffe_id)`), opens
mTLS channels with them (`channel`, `ca`, `audit`), and reads the audit ledger straight from
storage (`events`, `event_for`).
"""

from __future__ import annotations

import datetime as dt
import json
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from broker.api._proto import audit_pb2_grpc, ca_pb2_grpc
from broker.api.server.serving import ServingCredentials, serve_application
from broker.app import Application
from broker.config import CAConfig, Config, KeysConfig, ServerConfig, StorageConfig
from broker.errors import StorageError
from broker.storage.factory import open_storage
from broker.storage.interface import Storage
from ca.clock import FakeClock
from ca.keys import KeyBackend, SoftwareBackend
from ca.spiffeid import SpiffeId

TRUST_DOMAIN = "example.org"
OPERATOR_ID = "spiffe://example.org/broker/operator/ops"
WORKLOAD_ID = "spiffe://example.org/acme/prod/web"
OTHER_WORKLOAD_ID = "spiffe://example.org/acme/prod/db"
CORRELATION_HEADER = "x-correlation-id"


@dataclass(frozen=True)
class Identity:
    """An mTLS client identity: PEM chain (leaf first) and PEM key."""

    spiffe_id: str
    chain_pem: bytes
    key_pem: bytes
    serial: int


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


class FailingAuditStorage:
    """A Storage whose `append_audit` raises StorageError while `fail_audit` is set;
    everything else is delegated to the real storage."""

    def __init__(self, inner: Storage) -> None:
        self._inner = inner
        self.fail_audit = False
        self.failed_appends = 0

    async def append_audit(
        self, events: Sequence[str], seal: Any, head: Any = None, guard: Any = None
    ) -> list[int]:
        if self.fail_audit:
            self.failed_appends += 1
            raise StorageError("sqlite: disk I/O error (injected by the test)")
        return await self._inner.append_audit(events, seal, head, guard)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)


@dataclass
class BrokerHarness:
    app: Application
    server: grpc.aio.Server
    port: int
    serving: ServingCredentials
    clock: FakeClock
    storage: Any  # the Storage the Application got (maybe a wrapper)
    tmp_path: Path
    operator: Identity = field(init=False)
    _channels: list[grpc.aio.Channel] = field(default_factory=list)
    attest_port: int | None = None

    def __post_init__(self) -> None:
        self.operator = self.identity(OPERATOR_ID)

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def bundle_pem(self) -> bytes:
        return self.app.ca.trust_bundle_pem()

    def identity(self, spiffe_id: str, ttl: dt.timedelta = dt.timedelta(hours=1)) -> Identity:
        """A client certificate from the broker's own CA (issue_internal bypasses CA policy,
        so it serves for operators and workloads alike)."""
        key = ec.generate_private_key(ec.SECP256R1())
        leaf, issuer = self.app.ca.issue_internal(SpiffeId.parse(spiffe_id), key.public_key(), ttl)
        chain = b"".join(c.public_bytes(serialization.Encoding.PEM) for c in (leaf, issuer))
        return Identity(spiffe_id, chain, _pem_key(key), leaf.serial_number)

    def channel(
        self,
        identity: Identity | None,
        *,
        chain_pem: bytes | None = None,
        key_pem: bytes | None = None,
        options: Sequence[tuple[str, Any]] = (),
    ) -> grpc.aio.Channel:
        """An mTLS channel presenting `identity` (or explicit PEMs; none at all when both are
        None) and trusting the broker's bundle. Closed at teardown."""
        if identity is not None:
            chain_pem, key_pem = identity.chain_pem, identity.key_pem
        creds = grpc.ssl_channel_credentials(
            root_certificates=self.bundle_pem, private_key=key_pem, certificate_chain=chain_pem
        )
        channel = grpc.aio.secure_channel(self.address, creds, options=list(options))
        self._channels.append(channel)
        return channel

    def ca(self, identity: Identity | None = None) -> ca_pb2_grpc.CertificateAuthorityStub:
        return ca_pb2_grpc.CertificateAuthorityStub(self.channel(identity or self.operator))

    def audit(self, identity: Identity | None = None) -> audit_pb2_grpc.AuditStub:
        return audit_pb2_grpc.AuditStub(self.channel(identity or self.operator))

    async def events(self) -> list[dict[str, Any]]:
        """Every audit event in the ledger, oldest first (read from storage, not over gRPC)."""
        records = await self.app.storage.read_audit(after_seq=0, limit=100_000)
        return [json.loads(r.event) for r in records]

    async def event_for(self, correlation_id: str) -> dict[str, Any]:
        matches = [e for e in await self.events() if e["correlation_id"] == correlation_id]
        assert len(matches) == 1, f"expected one audit event for {correlation_id}: {matches}"
        return matches[0]

    async def close_channels(self) -> None:
        for channel in self._channels:
            await channel.close()
        self._channels.clear()


BrokerFactory = Callable[..., Awaitable[BrokerHarness]]


def make_config(tmp_path: Path, keys_uri: str = "software:", **server: Any) -> Config:
    """A validated Config; then listen is set to 127.0.0.1:0 (validation wants a real port,
    the tests want any free one)."""
    config = Config(
        trust_domain=TRUST_DOMAIN,
        data_dir=tmp_path,
        storage=StorageConfig(dsn=f"sqlite:///{tmp_path / 'broker.db'}"),
        keys=KeysConfig(uri=keys_uri),
        ca=CAConfig(),
        server=replace(ServerConfig(operators=(OPERATOR_ID,)), **server),
    ).validate()
    return replace(config, server=replace(config.server, listen="127.0.0.1:0"))


@pytest.fixture
async def broker_factory(tmp_path: Path) -> AsyncIterator[BrokerFactory]:
    started: list[tuple[BrokerHarness, grpc.aio.Server]] = []
    apps: list[Application] = []

    async def start(
        *,
        keys: KeyBackend | None = None,
        keys_uri: str = "software:",
        wrap_storage: Callable[[Storage], Any] | None = None,
        ca_service: Any = None,
        tracing: Any = None,
        **server: Any,
    ) -> BrokerHarness:
        directory = tmp_path / f"broker-{len(apps)}"
        directory.mkdir()
        config = make_config(directory, keys_uri, **server)
        backend = keys if keys is not None else SoftwareBackend()
        storage: Any = await open_storage(config.storage.resolved_dsn())
        if wrap_storage is not None:
            storage = wrap_storage(storage)
        clock = FakeClock(dt.datetime.now(dt.UTC))
        if tracing is not None:  # a broker.tracing.provider.Tracing: wrapped as the daemon does
            backend, storage = tracing.keys(backend), tracing.storage(storage)
        app = Application(config, backend, storage, clock, tracing=tracing)
        apps.append(app)
        await app.start()
        served = await serve_application(app, ca=ca_service)
        server_obj, port, serving = served.server, served.port, served.credentials
        assert port > 0
        harness = BrokerHarness(app, server_obj, port, serving, clock, storage, directory)
        harness.attest_port = served.attest_port
        started.append((harness, server_obj))
        return harness

    try:
        yield start
    finally:
        for harness, server_obj in reversed(started):
            await harness.close_channels()
            await server_obj.stop(grace=None)
        for app in reversed(apps):
            await app.close()


@pytest.fixture
async def broker(broker_factory: BrokerFactory) -> BrokerHarness:
    return await broker_factory()


def leaf_of(chain_der: Sequence[bytes]) -> x509.Certificate:
    return x509.load_der_x509_certificate(chain_der[0])
