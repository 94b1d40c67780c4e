"""The grpc.aio server: mTLS with a serving certificate from the broker's own CA (swapped in
on renewal without a restart), the request pipeline, health checking and reflection, and
bounded message sizes."""

from __future__ import annotations

import threading
from collections.abc import Sequence
from dataclasses import dataclass

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1._async import HealthServicer
from grpc_reflection.v1alpha import reflection

from broker.app import Application, TLSMaterial
from broker.authority import CAService
from broker.errors import Unavailable

from .interceptors import RequestPipeline
from .services import ServiceBinding, bindings_for, method_specs

__all__ = ["AppServer", "ServingCredentials", "TLSMaterial", "serve_application", "start_server"]


class ServingCredentials:
    """Holds the current serving certificate. gRPC asks on every new handshake; after
    `update()` new connections get the new certificate and trust bundle."""

    def __init__(self, material: TLSMaterial) -> None:
        self._lock = threading.Lock()
        self._material = material
        self._fresh = False
        self._fresh_attest = False  # the attestation port's credentials fetch on their own

    def update(self, material: TLSMaterial) -> None:
        with self._lock:
            self._material, self._fresh, self._fresh_attest = material, True, True

    def _config(self, material: TLSMaterial) -> grpc.ServerCertificateConfiguration:
        return grpc.ssl_server_certificate_configuration(
            [(material.key_pem, material.chain_pem)], root_certificates=material.client_roots_pem
        )

    def _fetch(self) -> grpc.ServerCertificateConfiguration | None:
        with self._lock:
            if not self._fresh:
                return None
            self._fresh = False
            return self._config(self._material)

    def credentials(self) -> grpc.ServerCredentials:
        with self._lock:
            initial = self._config(self._material)
        return grpc.dynamic_ssl_server_credentials(
            initial, self._fetch, require_client_authentication=True
        )

    def _fetch_attest(self) -> grpc.ServerCertificateConfiguration | None:
        with self._lock:
            if not self._fresh_attest:
                return None
            self._fresh_attest = False
            return grpc.ssl_server_certificate_configuration(
                [(self._material.key_pem, self._material.chain_pem)]
            )

    def attest_credentials(self) -> grpc.ServerCredentials:
        """Server-authenticated TLS without client certificates, for the attestation port
        (the pipeline admits only bootstrap RPCs there without a certificate)."""
        with self._lock:
            initial = grpc.ssl_server_certificate_configuration(
                [(self._material.key_pem, self._material.chain_pem)]
            )
        return grpc.dynamic_ssl_server_credentials(
            initial, self._fetch_attest, require_client_authentication=False
        )


def _attest_address(listen: str, attest_listen: str, port: int) -> str | None:
    if attest_listen == "off":
        return None
    if attest_listen != "auto":
        return attest_listen
    host = listen.rpartition(":")[0]
    return f"{host}:{port + 1 if port and port < 65535 else 0}"


async def start_server(
    *,
    listen: str,
    credentials: ServingCredentials,
    pipeline: RequestPipeline,
    bindings: Sequence[ServiceBinding],
    max_message_bytes: int,
    reuse_port: bool = False,
    attest_listen: str = "off",
) -> tuple[grpc.aio.Server, int, int | None]:
    """Start serving; returns the server, the bound port and the attestation port (None when
    off). Raises Unavailable if an address cannot be bound (see `ServerConfig.attest_listen`
    for "auto")."""
    missing = set().union(*(b.missing_specs() for b in bindings))
    assert not missing, f"RPCs without a method spec: {sorted(missing)}"
    server = grpc.aio.server(
        interceptors=[pipeline],
        options=[
            # 4x the request limit: the pipeline refuses (and audits) what lies between.
            ("grpc.max_receive_message_length", 4 * max_message_bytes),
            ("grpc.max_send_message_length", 4 * max_message_bytes),
            ("grpc.so_reuseport", 1 if reuse_port else 0),
            ("grpc.keepalive_permit_without_calls", 1),
            ("grpc.http2.min_ping_interval_without_data_ms", 10_000),
        ],
    )
    for binding in bindings:
        binding.add_to_server(binding.servicer, server)
    health = HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health, server)
    served = [b.full_name for b in bindings]
    names = (
        *served,
        health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
        reflection.SERVICE_NAME,
    )
    reflection.enable_server_reflection(names, server)
    try:
        port = server.add_secure_port(listen, credentials.credentials())
    except RuntimeError as exc:
        raise Unavailable(f"cannot listen on {listen}: {exc}") from exc
    if port == 0:
        raise Unavailable(f"cannot listen on {listen}: address in use or not available")
    attest_port = _add_attest_port(server, credentials, listen, attest_listen, port, reuse_port)
    await server.start()
    for name in served:
        await health.set(name, health_pb2.HealthCheckResponse.SERVING)
    await health.set("", health_pb2.HealthCheckResponse.SERVING)
    return server, port, attest_port


def _add_attest_port(
    server: grpc.aio.Server,
    credentials: ServingCredentials,
    listen: str,
    attest_listen: str,
    port: int,
    reuse_port: bool,
) -> int | None:
    address = _attest_address(listen, attest_listen, port)
    if address is None:
        return None
    try:
        bound = server.add_secure_port(address, credentials.attest_credentials())
    except RuntimeError:
        bound = 0
    if bound == 0 and attest_listen == "auto" and not reuse_port:
        fallback = f"{listen.rpartition(':')[0]}:0"
        bound = server.add_secure_port(fallback, credentials.attest_credentials())
    if bound == 0:
        if attest_listen == "auto":
            return None  # several workers, port taken: attestation through another replica
        raise Unavailable(f"cannot listen on {address} (attestation): address in use")
    return int(bound)


@dataclass
class AppServer:
    server: grpc.aio.Server
    port: int
    credentials: ServingCredentials
    material: TLSMaterial
    attest_port: int | None = None


async def serve_application(
    app: Application, *, reuse_port: bool = False, ca: CAService | None = None
) -> AppServer:
    """Serve a started `Application` on its configured address: a fresh serving certificate,
    the request pipeline, the servicers. The daemon and the integration tests both use this, so
    the tests exercise the real wiring. `ca` replaces the CA service (tests only)."""
    material = app.serving_material()
    credentials = ServingCredentials(material)
    bindings = bindings_for(app, ca=ca)
    pipeline = RequestPipeline(
        method_specs(bindings),
        app.authenticator,
        app.limiter,
        app.policy,
        app.ledger,
        app.clock,
        max_request_bytes=app.config.server.max_message_bytes,
        observer=app.anomalies.observe,
    )
    server, port, attest_port = await start_server(
        listen=app.config.server.listen,
        credentials=credentials,
        pipeline=pipeline,
        bindings=bindings,
        max_message_bytes=app.config.server.max_message_bytes,
        reuse_port=reuse_port,
        attest_listen=app.config.server.attest_listen,
    )
    return AppServer(server, port, credentials, material, attest_port)
