"""The client base: one mTLS connection to a broker (`BrokerClient`, with the CA and audit
calls every broker serves), its error mapping, and the `FeatureClient` every feature client in
this package builds on.

The client speaks mTLS only: it presents a certificate chain and key (usually the operator
SVID) and trusts the trust domain's bundle. Every method returns plain Python values, never
protobuf messages, and every failure is raised as one `ClientError` naming the gRPC status
code, so callers need not import grpc.
"""

from __future__ import annotations

import json
import re
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Protocol, TypeVar

import grpc
from cryptography import x509
from cryptography.exceptions import InvalidSignature

from broker.api._proto import audit_pb2, audit_pb2_grpc, ca_pb2, ca_pb2_grpc
from broker.api.timestamps import optional_datetime, to_datetime
from ca.errors import CAError
from ca.x509svid import server_name, trust_domain_of_roots

__all__ = [
    "MAX_MESSAGE_BYTES",
    "X509SVID",
    "AuditEntry",
    "AuditVerification",
    "Authority",
    "BrokerClient",
    "Bundle",
    "CAPolicyDocument",
    "CAStatusReport",
    "ClientCredentials",
    "ClientError",
    "FeatureClient",
    "MintedJWTSVID",
    "RotateResult",
    "Transport",
    "broker_server_name",
    "channel_options",
]

MAX_MESSAGE_BYTES = 4 * 1024 * 1024
DEFAULT_TIMEOUT_SECONDS = 30.0
# `broker audit verify` walks the whole ledger: ~36 s for a million entries on the project's
# loaded 2-core machine (`python -m loadtests preload`), so the usual 30 s would refuse a
# ledger of that size with "timed out" although nothing is wrong.
AUDIT_VERIFY_TIMEOUT_SECONDS = 3600.0
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


@dataclass(frozen=True)
class X509SVID:
    spiffe_id: str
    cert_chain: list[bytes]  # DER, leaf first, then intermediates
    private_key: bytes | None  # PKCS#8 DER; None when the caller sent a CSR
    bundle: list[bytes]  # DER roots
    expires_at: datetime
    serial: str


@dataclass(frozen=True)
class MintedJWTSVID:
    spiffe_id: str
    token: str
    expires_at: datetime


@dataclass(frozen=True)
class Bundle:
    trust_domain: str
    jwks: bytes
    pem: str
    sequence: int


@dataclass(frozen=True)
class Authority:
    id: str
    kind: str
    generation: int
    state: str
    not_before: datetime | None
    not_after: datetime | None
    activated_at: datetime | None
    retired_at: datetime | None
    key_uri: str
    jwt_kid: str
    subject: str
    serial: str
    fingerprint_sha256: str


@dataclass(frozen=True)
class CAStatusReport:
    trust_domain: str
    key_backend: str
    storage: str
    bundle_sequence: int
    policy_version: int
    authorities: list[Authority]

    @property
    def root(self) -> Authority | None:
        """The active root authority (or the newest root when none is active)."""
        roots = [a for a in self.authorities if a.kind == "root"]
        active = [a for a in roots if a.state == "active"]
        candidates = active or roots
        return max(candidates, key=lambda a: a.generation) if candidates else None

    @property
    def issuing(self) -> list[Authority]:
        return [a for a in self.authorities if a.kind == "issuing"]


@dataclass(frozen=True)
class RotateResult:
    actions: list[str]
    status: CAStatusReport


@dataclass(frozen=True)
class CAPolicyDocument:
    version: int
    document_json: str
    author: str
    updated_at: datetime | None


@dataclass(frozen=True)
class AuditVerification:
    intact: bool
    entries: int
    first_broken_seq: int
    reason: str
    notes: tuple[str, ...] = ()


@dataclass(frozen=True)
class AuditEntry:
    seq: int
    event: dict[str, Any]
    event_json: str
    entry_hash: str


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


def _authority(a: ca_pb2.Authority) -> Authority:
    return Authority(
        id=a.id,
        kind=a.kind,
        generation=a.generation,
        state=a.state,
        not_before=optional_datetime(a, "not_before"),
        not_after=optional_datetime(a, "not_after"),
        activated_at=optional_datetime(a, "activated_at"),
        retired_at=optional_datetime(a, "retired_at"),
        key_uri=a.key_uri,
        jwt_kid=a.jwt_kid,
        subject=a.subject,
        serial=a.serial,
        fingerprint_sha256=a.fingerprint_sha256,
    )


def _status(s: ca_pb2.GetStatusResponse) -> CAStatusReport:
    return CAStatusReport(
        trust_domain=s.trust_domain,
        key_backend=s.key_backend,
        storage=s.storage,
        bundle_sequence=s.bundle_sequence,
        policy_version=s.policy_version,
        authorities=[_authority(a) for a in s.authorities],
    )


def _audit_entry(e: audit_pb2.AuditEntry) -> AuditEntry:
    try:
        event = json.loads(e.event_json) if e.event_json else {}
    except json.JSONDecodeError:
        event = {}
    if not isinstance(event, dict):
        event = {"event": event}
    return AuditEntry(seq=e.seq, event=event, event_json=e.event_json, entry_hash=e.entry_hash)


def _error(exc: grpc.RpcError, credentials: ClientCredentials) -> ClientError:
    code = exc.code() if isinstance(exc, grpc.Call) else None
    details = exc.details() if isinstance(exc, grpc.Call) else None
    name = code.name if isinstance(code, grpc.StatusCode) else "UNKNOWN"
    message = " ".join((details or str(exc) or "no details").split())
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
    """A connection to one broker. Not thread-safe to close while calls are running;
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
        self._channel = grpc.secure_channel(target, channel_credentials, options=options)
        self._ca = ca_pb2_grpc.CertificateAuthorityStub(self._channel)
        self._audit = audit_pb2_grpc.AuditStub(self._channel)

    def __enter__(self) -> BrokerClient:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def close(self) -> None:
        self._channel.close()

    def _metadata(self) -> list[tuple[str, str]]:
        metadata = [(CORRELATION_HEADER, str(uuid.uuid4()))]
        if self._justification:
            metadata.append((JUSTIFICATION_HEADER, self._justification))
        return metadata

    def _call(
        self,
        method: Callable[..., _Response],
        request: Any,
        extra: Sequence[tuple[str, str]] = (),
        timeout: float | None = None,
    ) -> _Response:
        timeout = self._timeout if timeout is None else max(timeout, self._timeout)
        try:
            return method(request, timeout=timeout, metadata=[*self._metadata(), *extra])
        except grpc.RpcError as exc:
            raise _error(exc, self._credentials) from None

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
    ) -> _Response:
        """Call a unary RPC on `channel` (with extra `metadata` headers); raises
        `ClientError` on failure."""
        return self._call(method, request, metadata)

    def mint_x509(
        self,
        spiffe_id: str,
        ttl_seconds: int | None = None,
        csr: bytes | None = None,
        dns_names: Sequence[str] = (),
        key_type: str = "",
    ) -> X509SVID:
        """Issue an X.509-SVID. `ttl_seconds=None` leaves the TTL to CA policy; any int
        (including 0 or a negative number) is sent as is and judged by the server."""
        request = ca_pb2.MintX509SVIDRequest(
            spiffe_id=spiffe_id, csr=csr or b"", key_type=key_type, dns_names=list(dns_names)
        )
        if ttl_seconds is not None:
            request.ttl_seconds = ttl_seconds
        response: ca_pb2.MintX509SVIDResponse = self._call(self._ca.MintX509SVID, request)
        return X509SVID(
            spiffe_id=response.spiffe_id,
            cert_chain=list(response.cert_chain),
            private_key=response.private_key or None,
            bundle=list(response.bundle),
            expires_at=to_datetime(response.expires_at),
            serial=response.serial,
        )

    def mint_jwt(
        self, spiffe_id: str, audience: Sequence[str], ttl_seconds: int | None = None
    ) -> MintedJWTSVID:
        """Issue a JWT-SVID; `ttl_seconds` as for `mint_x509`."""
        request = ca_pb2.MintJWTSVIDRequest(spiffe_id=spiffe_id, audience=list(audience))
        if ttl_seconds is not None:
            request.ttl_seconds = ttl_seconds
        response: ca_pb2.MintJWTSVIDResponse = self._call(self._ca.MintJWTSVID, request)
        return MintedJWTSVID(
            spiffe_id=response.spiffe_id,
            token=response.token,
            expires_at=to_datetime(response.expires_at),
        )

    def bundle(self) -> Bundle:
        response: ca_pb2.GetBundleResponse = self._call(
            self._ca.GetBundle, ca_pb2.GetBundleRequest()
        )
        return Bundle(
            trust_domain=response.trust_domain,
            jwks=response.jwks,
            pem=response.pem,
            sequence=response.sequence,
        )

    def status(self) -> CAStatusReport:
        response: ca_pb2.GetStatusResponse = self._call(
            self._ca.GetStatus, ca_pb2.GetStatusRequest()
        )
        return _status(response)

    def rotate(self, force: bool = False) -> RotateResult:
        response: ca_pb2.RotateResponse = self._call(
            self._ca.Rotate, ca_pb2.RotateRequest(force=force)
        )
        return RotateResult(actions=list(response.actions), status=_status(response.status))

    def get_policy(self) -> CAPolicyDocument:
        response: ca_pb2.GetPolicyResponse = self._call(
            self._ca.GetPolicy, ca_pb2.GetPolicyRequest()
        )
        return CAPolicyDocument(
            version=response.version,
            document_json=response.document_json,
            author=response.author,
            updated_at=optional_datetime(response, "updated_at"),
        )

    def set_policy(self, document_json: str) -> int:
        """Replace the CA policy; returns the new version."""
        response: ca_pb2.SetPolicyResponse = self._call(
            self._ca.SetPolicy, ca_pb2.SetPolicyRequest(document_json=document_json)
        )
        return response.version

    def audit_verify(self, checkpoint_json: str = "") -> AuditVerification:
        response: audit_pb2.VerifyAuditResponse = self._call(
            self._audit.Verify,
            audit_pb2.VerifyAuditRequest(checkpoint_json=checkpoint_json),
            timeout=AUDIT_VERIFY_TIMEOUT_SECONDS,
        )
        return AuditVerification(
            intact=response.intact,
            entries=response.entries,
            first_broken_seq=response.first_broken_seq,
            reason=response.reason,
            notes=tuple(response.notes),
        )

    def audit_checkpoint(self, fresh: bool = False) -> str:
        """The latest signed ledger checkpoint as JSON (made now if none, or if `fresh`)."""
        response: audit_pb2.CheckpointResponse = self._call(
            self._audit.Checkpoint, audit_pb2.CheckpointRequest(fresh=fresh)
        )
        return str(response.checkpoint_json)

    def audit_tail(self, limit: int = 20) -> list[AuditEntry]:
        """The newest `limit` entries, oldest first."""
        response: audit_pb2.TailAuditResponse = self._call(
            self._audit.Tail, audit_pb2.TailAuditRequest(limit=limit)
        )
        return [_audit_entry(e) for e in response.entries]


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
    ) -> _Response:
        return self._transport.call(method, request, metadata)
