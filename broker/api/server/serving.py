"""The grpc.aio servers: mTLS with a serving certificate from the broker's own CA (swapped in
on renewal without a restart), the request pipeline, health checking and reflection, and
bounded message sizes and handshakes.

The attestation port (no client certificate) is a server of its own, so that it can read much
smaller messages than the main port: it parses what anyone sends before authentication.
Both close connections whose TLS handshake is not done within `handshake_timeout` and cap the
connections they hold (docs/security.md, "Connections").
"""

from __future__ import annotations

import asyncio
import resource
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field, replace

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1._async import HealthServicer
from grpc_reflection.v1alpha import reflection, reflection_pb2, reflection_pb2_grpc
from grpc_reflection.v1alpha._async import ReflectionServicer

from broker.app import Application, TLSMaterial
from broker.authority import CAService
from broker.errors import Unavailable
from broker.ratelimit import RefusalSampler

from .binding import ServiceBinding
from .gate import ConnectionGate
from .pipeline import RequestPipeline
from .services import bindings_for, method_specs

__all__ = [
    "AppServer",
    "ConnectionLimits",
    "ServerGroup",
    "ServingCredentials",
    "TLSMaterial",
    "serve_application",
    "start_server",
]

# Headroom over the pipeline's request limit on the main port: a request a little too large is
# refused by the pipeline (and audited); anything larger is refused by gRPC before it is read.
_MAIN_RECEIVE_SLACK = 64 * 1024
REFLECTION_V1 = "grpc.reflection.v1.ServerReflection"


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


@dataclass(frozen=True)
class ConnectionLimits:
    """Transport bounds (see `ServerConfig`): `max_connections` 0 means gRPC's default (none).
    `main_gate` / `attest_gate` put a `ConnectionGate` (per-peer cap) in front of the port."""

    handshake_timeout_ms: int = 10_000
    max_connections: int = 0
    attest_max_message_bytes: int = 64 * 1024
    main_gate: ConnectionGate | None = None
    attest_gate: ConnectionGate | None = None


class ServerGroup:
    """The main server and, when on, the attestation server, with their connection gates:
    started and stopped together (the rest of the broker sees one server)."""

    def __init__(
        self,
        main: grpc.aio.Server,
        attest: grpc.aio.Server | None,
        gates: Sequence[ConnectionGate] = (),
    ) -> None:
        self.main = main
        self.attest = attest
        self.gates = list(gates)
        self._all = [main] if attest is None else [main, attest]

    async def start(self) -> None:
        for server in self._all:
            await server.start()

    async def stop(self, grace: float | None) -> None:
        for gate in self.gates:
            gate.stop_accepting()
        await asyncio.gather(*(server.stop(grace) for server in self._all))
        for gate in self.gates:
            await gate.close()


async def _bind(
    server: grpc.aio.Server,
    address: str,
    credentials: grpc.ServerCredentials,
    gate: ConnectionGate | None,
    reuse_port: bool,
) -> int:
    """Listen on `address`, directly or through `gate`; returns the port, 0 if not bound."""
    if gate is None:
        try:
            return int(server.add_secure_port(address, credentials))
        except RuntimeError:
            return 0
    host, _, port = address.rpartition(":")
    try:
        return await gate.start(host, int(port), reuse_port=reuse_port)
    except OSError:
        return 0


def _bind_upstream(
    server: grpc.aio.Server, credentials: grpc.ServerCredentials, gate: ConnectionGate | None
) -> None:
    if gate is not None and not server.add_secure_port(
        f"unix-abstract:{gate.upstream}", credentials
    ):
        raise Unavailable(f"cannot listen on the abstract socket {gate.upstream}")


def connection_budget() -> int:
    """How many client connections this process can hold: its fd soft limit less a reserve
    for storage, the HSM, logs and the metrics endpoint (see `broker.daemon.raise_fd_limit`)."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        return 1 << 20
    return max(64, soft - max(256, soft // 10))


def _transport_options(
    receive_bytes: int, send_bytes: int, reuse_port: bool, limits: ConnectionLimits
) -> list[tuple[str, int]]:
    options = [
        ("grpc.max_receive_message_length", receive_bytes),
        ("grpc.max_send_message_length", send_bytes),
        ("grpc.so_reuseport", 1 if reuse_port else 0),
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.http2.min_ping_interval_without_data_ms", 10_000),
        # gRPC's default is 120 s: an idle connection that never says hello holds an fd
        # that long (GRPC_ARG_SERVER_HANDSHAKE_TIMEOUT_MS).
        ("grpc.server_handshake_timeout_ms", limits.handshake_timeout_ms),
    ]
    if limits.max_connections > 0:
        # Refused at accept beyond this (GRPC_ARG_MAX_ALLOWED_INCOMING_CONNECTIONS), so the
        # process keeps the fds it needs for storage, the HSM and logs.
        options.append(("grpc.max_allowed_incoming_connections", limits.max_connections))
    return options


def _add_services(
    server: grpc.aio.Server, bindings: Sequence[ServiceBinding], health: HealthServicer
) -> None:
    for binding in bindings:
        binding.add_to_server(binding.servicer, server)
    health_pb2_grpc.add_HealthServicer_to_server(health, server)
    names = (
        *(b.full_name for b in bindings),
        health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
        reflection.SERVICE_NAME,
        REFLECTION_V1,
    )
    servicer = ReflectionServicer(names)
    reflection_pb2_grpc.add_ServerReflectionServicer_to_server(servicer, server)
    # grpc.reflection.v1 (what grpcurl and current tools ask first) has the same messages as
    # v1alpha field for field; grpcio-reflection serves v1alpha only, so the same servicer
    # answers under the v1 name too.
    server.add_generic_rpc_handlers(
        (
            grpc.method_handlers_generic_handler(
                REFLECTION_V1,
                {
                    "ServerReflectionInfo": grpc.stream_stream_rpc_method_handler(
                        servicer.ServerReflectionInfo,
                        request_deserializer=reflection_pb2.ServerReflectionRequest.FromString,
                        response_serializer=reflection_pb2.ServerReflectionResponse.SerializeToString,
                    )
                },
            ),
        )
    )


async def start_server(
    *,
    listen: str,
    credentials: ServingCredentials,
    pipeline: RequestPipeline,
    bindings: Sequence[ServiceBinding],
    max_message_bytes: int,
    reuse_port: bool = False,
    attest_listen: str = "off",
    limits: ConnectionLimits | None = None,
) -> tuple[ServerGroup, int, int | None]:
    """Start serving; returns the servers, the bound port and the attestation port (None when
    off). Raises Unavailable if an address cannot be bound (see `ServerConfig.attest_listen`
    for "auto")."""
    missing = set().union(*(b.missing_specs() for b in bindings))
    assert not missing, f"RPCs without a method spec: {sorted(missing)}"
    limits = limits or ConnectionLimits()
    attest_limits = limits
    if limits.max_connections > 0 and attest_listen != "off":
        # One budget for both servers: a quarter for the attestation port.
        attest_limits = replace(limits, max_connections=max(1, limits.max_connections // 4))
        limits = replace(
            limits, max_connections=max(1, limits.max_connections - attest_limits.max_connections)
        )
    server = grpc.aio.server(
        interceptors=[pipeline],
        options=_transport_options(
            max_message_bytes + _MAIN_RECEIVE_SLACK, 4 * max_message_bytes, reuse_port, limits
        ),
    )
    health = HealthServicer()
    _add_services(server, bindings, health)
    main_credentials = credentials.credentials()
    _bind_upstream(server, main_credentials, limits.main_gate)
    port = await _bind(server, listen, main_credentials, limits.main_gate, reuse_port)
    if port == 0:
        raise Unavailable(f"cannot listen on {listen}: address in use or not available")
    gates = [limits.main_gate] if limits.main_gate is not None else []
    attest_server: grpc.aio.Server | None = None
    attest_port: int | None = None
    if _attest_address(listen, attest_listen, port) is not None:
        attest_server = grpc.aio.server(
            interceptors=[pipeline],
            options=_transport_options(
                limits.attest_max_message_bytes, 4 * max_message_bytes, reuse_port, attest_limits
            ),
        )
        _add_services(attest_server, bindings, health)
        attest_port = await _add_attest_port(
            attest_server, credentials, listen, attest_listen, port, reuse_port, limits.attest_gate
        )
        if attest_port is None:
            attest_server = None
        elif limits.attest_gate is not None:
            gates.append(limits.attest_gate)
    group = ServerGroup(server, attest_server, gates)
    await group.start()
    for name in (b.full_name for b in bindings):
        await health.set(name, health_pb2.HealthCheckResponse.SERVING)
    await health.set("", health_pb2.HealthCheckResponse.SERVING)
    return group, port, attest_port


async def _add_attest_port(
    server: grpc.aio.Server,
    credentials: ServingCredentials,
    listen: str,
    attest_listen: str,
    port: int,
    reuse_port: bool,
    gate: ConnectionGate | None,
) -> int | None:
    address = _attest_address(listen, attest_listen, port)
    if address is None:
        return None
    attest_credentials = credentials.attest_credentials()
    _bind_upstream(server, attest_credentials, gate)
    bound = await _bind(server, address, attest_credentials, gate, reuse_port)
    if bound == 0 and attest_listen == "auto" and not reuse_port:
        fallback = f"{listen.rpartition(':')[0]}:0"
        bound = await _bind(server, fallback, attest_credentials, gate, reuse_port)
    if bound == 0:
        if attest_listen == "auto":
            return None  # several workers, port taken: attestation through another replica
        raise Unavailable(f"cannot listen on {address} (attestation): address in use")
    return int(bound)


@dataclass
class AppServer:
    server: ServerGroup
    port: int
    credentials: ServingCredentials
    material: TLSMaterial
    attest_port: int | None = None
    pipeline: RequestPipeline | None = field(default=None, repr=False)


async def serve_application(
    app: Application, *, reuse_port: bool = False, ca: CAService | None = None
) -> AppServer:
    """Serve a started `Application` on its configured address: a fresh serving certificate,
    the request pipeline, the servicers. The daemon and the integration tests both use this, so
    the tests exercise the real wiring. `ca` replaces the CA service (tests only)."""
    material = app.serving_material()
    credentials = ServingCredentials(material)
    bindings = bindings_for(app, ca_service=ca)
    server_config = app.config.server
    budget = server_config.max_connections or connection_budget()
    attest_on = server_config.attest_listen != "off"

    def gate(share: int) -> ConnectionGate:
        # A gated connection holds three fds: the client's, the gate's upstream, gRPC's.
        return ConnectionGate(
            ConnectionGate.new_upstream_name(),
            max_per_peer=server_config.max_connections_per_peer,
            max_connections=max(1, share // 3),
            idle_timeout=server_config.handshake_timeout.total_seconds(),
        )

    main_gate = (
        gate(budget - budget // 4 if attest_on else budget)
        if server_config.connection_gate == "all"
        else None
    )
    attest_gate = (
        gate(budget // 4) if attest_on and server_config.connection_gate != "off" else None
    )
    gates = [g for g in (main_gate, attest_gate) if g is not None]

    def peer_of(grpc_peer: str) -> str | None:
        for g in gates:
            found = g.peer_of(grpc_peer)
            if found is not None:
                return found
        return None

    pipeline = RequestPipeline(
        method_specs(bindings),
        app.authenticator,
        app.limiter,
        app.policy,
        app.ledger,
        app.clock,
        max_request_bytes=app.config.server.max_message_bytes,
        observer=app.anomalies.observe,
        refusals=RefusalSampler(
            app.clock, app.config.server.refusal_audit_interval.total_seconds()
        ),
        peers=peer_of if gates else None,
        spans=app.tracing.request_spans() if app.tracing is not None else None,
    )
    limits = ConnectionLimits(
        handshake_timeout_ms=max(1, int(server_config.handshake_timeout.total_seconds() * 1000)),
        max_connections=budget,
        attest_max_message_bytes=server_config.attest_max_message_bytes,
        main_gate=main_gate,
        attest_gate=attest_gate,
    )
    server, port, attest_port = await start_server(
        listen=app.config.server.listen,
        credentials=credentials,
        pipeline=pipeline,
        bindings=bindings,
        max_message_bytes=app.config.server.max_message_bytes,
        reuse_port=reuse_port,
        attest_listen=app.config.server.attest_listen,
        limits=limits,
    )
    return AppServer(server, port, credentials, material, attest_port, pipeline)
