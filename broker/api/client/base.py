"""The client base: one mTLS connection to a broker (`BrokerClient`, the `Transport` every
feature client calls through), its error mapping, and the `FeatureClient` every feature client
in this package builds on (`ca.CAClient`, `audit.AuditClient`, `identity`, `database`,
`secrets`, `access`, `operators`), e.g. `CAClient(BrokerClient(target, credentials)).status()`.

The client speaks mTLS only: it presents a certificate chain and key (usually the operator
SVID) and trusts the trust domain's bundle. Every method returns plain Python values, never
protobuf messages, and every failure is raised as one `ClientError` naming the gRPC status
code, so callers need not import grpc.
"""

from __future__ import annotations

import re
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Protocol, TypeVar

import grpc
from cryptography import x509
from cryptography.exceptions import InvalidSignature

from ca.errors import CAError
from ca.x509svid import server_name, trust_domain_of_roots

from .failover import open_channel

__all__ = [
    "MAX_MESSAGE_BYTES",
    "BrokerClient",
    "ClientCredentials",
    "ClientError",
    "FeatureClient",
    "Transport",
    "broker_server_name",
    "channel_options",
]

MAX_MESSAGE_BYTES = 4 * 1024 * 1024
DEFAULT_TIMEOUT_SECONDS = 30.0
CORRELATION_HEADER = "x-correlation-id"
JUSTIFICATION_HEADER = "x-broker-justification"

_Response = TypeVar("_Response")

# gRPC's UNAVAILABLE details for connection-level failures (as opposed to a server that
# answered UNAVAILABLE itself because one of its backends is down).
_TRANSPORT_FAILURE = re.compile(
    r"failed to connect to all addresses|errors resolving|dns resolution failed|"
    r"socket closed|handshake|connection refused|connection reset|ssl_error",
    re.IGNORECASE,
)
_VERIFY_FAILED = re.compile(r"CERTIFICATE_VERIFY_FAILED:\s*([^:]+)")
_TOO_LARGE = re.compile(r"message larger than max \((\d+) vs\. (\d+)\)", re.IGNORECASE)
_TLS_ALERT = re.compile(r"(TLSV1_ALERT_[A-Z_]+|SSLV3_ALERT_[A-Z_]+)")


class ClientError(Exception):
    """A call failed. `code_name` is the gRPC status name (e.g. "PERMISSION_DENIED",
    "UNAVAILABLE"); `message` is the server's details, or for transport failures the
    transport's reason."""

    def __init__(
        self, code_name: str, message: str, *, details: str | None = None, answered: bool = False
    ) -> None:
        super().__init__(f"{code_name}: {message}")
        self.code_name = code_name
        self.message = message
        self.details = message if details is None else details
        # The broker's pipeline answered (its correlation id came back): the status is the
        # broker's own, e.g. UNAVAILABLE for a database or HSM behind it, not a broker that
        # cannot be reached.
        self.answered = answered


@dataclass(frozen=True)
class ClientCredentials:
    """PEM material for mTLS: our certificate chain (leaf first), its key, and the roots
    (the trust domain's bundle) that the server's certificate must chain to."""

    cert_chain: bytes
    private_key: bytes
    root_certificates: bytes


def _pem_certificates(data: bytes) -> list[x509.Certificate]:
    try:
        return x509.load_pem_x509_certificates(data)
    except ValueError:
        return []


def _issued_by(cert: x509.Certificate, issuer: x509.Certificate) -> bool:
    try:
        cert.verify_directly_issued_by(issuer)
    except (ValueError, TypeError, InvalidSignature):
        return False
    return True


def _client_certificate_problem(credentials: ClientCredentials) -> str | None:
    """Why the broker would refuse our certificate at the TLS handshake, judged locally
    (gRPC reports only "Socket closed" when the server rejects a client certificate)."""
    chain = _pem_certificates(credentials.cert_chain)
    roots = _pem_certificates(credentials.root_certificates)
    if not chain:
        return "the client certificate is not a PEM certificate"
    leaf = chain[0]
    now = datetime.now(UTC)
    if leaf.not_valid_after_utc < now:
        expired = leaf.not_valid_after_utc.strftime("%Y-%m-%dT%H:%M:%SZ")
        return f"the client certificate expired at {expired}"
    current = leaf
    for _ in range(len(chain)):
        if any(_issued_by(current, root) for root in roots):
            return None
        parent = next((c for c in chain[1:] if _issued_by(current, c)), None)
        if parent is None:
            break
        current = parent
    return (
        "the client certificate is not issued by the trust domain's CA in the bundle "
        "(is it from another CA?)"
    )


def _transport_reason(details: str, credentials: ClientCredentials) -> str:
    """A short reason for an UNAVAILABLE status, from gRPC's long transport message."""
    lowered = details.lower()
    if "connection refused" in lowered:
        return "connection refused (is 'broker serve' running there?)"
    if "errors resolving" in lowered or "dns resolution failed" in lowered:
        return "cannot resolve the host name"
    if ("peer name" in lowered and "not in peer certificate" in lowered) or (
        "hostname verification" in lowered
    ):
        return (
            "TLS handshake failed: the server's certificate is not the broker's "
            "(it lacks the broker's identity, spiffe://<trust domain>/broker/server); "
            "refusing to talk to it"
        )
    verify = _VERIFY_FAILED.search(details)
    if verify:
        return (
            "TLS handshake failed: the broker's certificate is not trusted by the bundle "
            f"({verify.group(1).strip()})"
        )
    if "handshake" in lowered or "socket closed" in lowered or "ssl" in lowered:
        problem = _client_certificate_problem(credentials)
        if problem:
            return f"TLS handshake failed: {problem}"
        alert = _TLS_ALERT.search(details)
        if alert:
            return f"TLS handshake failed: {alert.group(1).lower().replace('_', ' ')}"
        if "handshake" in lowered:
            return "TLS handshake failed"
        return "the connection was closed (is it a broker, and does it accept this certificate?)"
    if "timeout" in lowered or "timed out" in lowered:
        return "connection timed out"
    # Keep the last clause of "failed to connect to all addresses; last error: ...: reason".
    return details.rsplit(": ", 1)[-1] or details


def _error(exc: grpc.RpcError, credentials: ClientCredentials) -> ClientError:
    code = exc.code() if isinstance(exc, grpc.Call) else None
    details = exc.details() if isinstance(exc, grpc.Call) else None
    name = code.name if isinstance(code, grpc.StatusCode) else "UNKNOWN"
    # Without details (e.g. grpc.health.v1's NOT_FOUND), say the code, never the Python repr
    # of the error object.
    message = " ".join((details or f"the broker answered {name} without details").split())
    trailing = exc.trailing_metadata() if isinstance(exc, grpc.Call) else None
    answered = any(key == CORRELATION_HEADER for key, _ in trailing or ())
    if name == "UNAVAILABLE" and not answered and _TRANSPORT_FAILURE.search(message):
        return ClientError(name, _transport_reason(message, credentials), details=message)
    too_large = _TOO_LARGE.search(message)
    if name == "RESOURCE_EXHAUSTED" and too_large:
        sent, limit = too_large.groups()
        side = "the broker's" if "SERVER" in message.upper() else "this client's"
        return ClientError(
            name,
            f"the message is {sent} bytes, over {side} limit of {limit} bytes",
            details=message,
        )
    return ClientError(name, message, details=message, answered=answered)


def broker_server_name(root_certificates: bytes) -> str:
    """The name a client checks the broker's certificate against: the DNS name that stands for
    `spiffe://<td>/broker/server` (`ca.x509svid.server_name`), for the trust domain the bundle's
    roots name. Raises `ClientError` (INVALID_ARGUMENT) when the bundle names none."""
    try:
        return server_name(trust_domain_of_roots(_pem_certificates(root_certificates)))
    except CAError as exc:
        raise ClientError("INVALID_ARGUMENT", f"the trust bundle is not usable: {exc}") from None


def channel_options(
    root_certificates: bytes, server_name: str | None = None
) -> list[tuple[str, Any]]:
    """gRPC channel options for a connection to the broker: bounded messages, and the server
    accepted only if its certificate is the broker's own (see `broker_server_name`) — never
    merely one naming the host dialled, which a workload SVID with a DNS SAN could.

    `server_name` replaces the name checked (`--tls-server-name`): for a broker behind a name
    of its `server.server_names`, or a TLS proxy in front of it. Whoever holds a certificate
    from the bundle's CA with that name is then accepted, so give a name the CA reserves for
    the broker (docs/security.md)."""
    return [
        ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
        ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
        (
            "grpc.ssl_target_name_override",
            server_name or broker_server_name(root_certificates),
        ),
    ]


class BrokerClient:
    """A connection to a broker (`target` may list several, comma-separated: see
    `failover.FailoverChannel`). Not thread-safe to close while calls are running;
    use it as a context manager or call `close()`.

    The server is accepted only if its certificate chains to the bundle in `credentials` and
    is the broker's serving certificate for that trust domain (`channel_options`), whatever
    host `target` names.
    """

    def __init__(
        self,
        target: str,
        credentials: ClientCredentials,
        *,
        timeout: float = DEFAULT_TIMEOUT_SECONDS,
        justification: str | None = None,
        server_name: str | None = None,
    ) -> None:
        self.target = target
        self._credentials = credentials
        self._timeout = timeout
        self._justification = justification
        if justification and not (justification.isascii() and justification.isprintable()):
            raise ClientError("INVALID_ARGUMENT", "the justification must be printable ASCII text")
        options = channel_options(credentials.root_certificates, server_name)
        channel_credentials = grpc.ssl_channel_credentials(
            root_certificates=credentials.root_certificates,
            private_key=credentials.private_key,
            certificate_chain=credentials.cert_chain,
        )
        # Several addresses ("a:8443,b:8443", or a name with several DNS records): one channel
        # that fails over between them (`failover.FailoverChannel`).
        self._channel = open_channel(
            target, lambda one: grpc.secure_channel(one, channel_credentials, options=options)
        )

    def __enter__(self) -> BrokerClient:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def close(self) -> None:
        self._channel.close()

    def _metadata(self) -> list[tuple[str, str]]:
        # 32 hex digits: the form of a W3C trace id, so a tracing broker makes it the trace's
        # id and the ledger's correlation id alike (broker.tracing.server).
        metadata = [(CORRELATION_HEADER, uuid.uuid4().hex)]
        if self._justification:
            metadata.append((JUSTIFICATION_HEADER, self._justification))
        return metadata

    # Feature clients (broker/api/client/<feature>.py) build their stubs on this channel and
    # call through `call`, so every RPC gets the same metadata, timeout and error mapping.

    @property
    def channel(self) -> grpc.Channel:
        return self._channel

    def call(
        self,
        method: Callable[..., _Response],
        request: Any,
        metadata: Sequence[tuple[str, str]] = (),
        timeout: float | None = None,
    ) -> _Response:
        """Call a unary RPC on `channel` (with extra `metadata` headers); raises
        `ClientError` on failure. `timeout` may lengthen, never shorten, the client's own."""
        timeout = self._timeout if timeout is None else max(timeout, self._timeout)
        try:
            return method(request, timeout=timeout, metadata=[*self._metadata(), *metadata])
        except grpc.RpcError as exc:
            raise _error(exc, self._credentials) from None


class Transport(Protocol):
    """What a feature client needs from a connection (`BrokerClient` is one): its channel, and
    `call`, which adds the correlation and justification headers, the timeout and the mapping
    of failures to `ClientError`."""

    @property
    def channel(self) -> grpc.Channel: ...

    def call(
        self,
        method: Callable[..., _Response],
        request: Any,
        metadata: Sequence[tuple[str, str]] = (),
        timeout: float | None = None,
    ) -> _Response: ...


class FeatureClient:
    """The one way a feature client wraps a connection: it builds its stubs on
    `transport.channel` and calls through `_call`, so every RPC gets the same headers, timeout
    and error mapping."""

    def __init__(self, transport: Transport) -> None:
        self._transport = transport

    def _call(
        self,
        method: Callable[..., _Response],
        request: Any,
        metadata: Sequence[tuple[str, str]] = (),
        timeout: float | None = None,
    ) -> _Response:
        return self._transport.call(method, request, metadata, timeout)
