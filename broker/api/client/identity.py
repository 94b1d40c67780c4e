"""Clients for broker.v1.WorkloadIdentity: `IdentityClient` (operators: join tokens, attestors,
entries, the denylist) wraps a `BrokerClient`; `GrpcBrokerLink` is the agent's `BrokerLink`
(attestation over the server-authenticated attestation port, everything else over mTLS with
the agent's current SVID)."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import grpc

from broker.agent import AgentEntry, AgentSVID, JWTResult, SyncResult
from broker.agentstream import StreamUnsupported
from broker.api._proto import identity_pb2, identity_pb2_grpc
from broker.api.client.records import record_from
from broker.api.timestamps import to_datetime
from broker.errors import BrokerError, InvalidArgument, PermissionDenied, Unavailable

from .base import (
    DEFAULT_TIMEOUT_SECONDS,
    BrokerClient,
    ClientCredentials,
    ClientError,
    FeatureClient,
    Transport,
    _error,
    channel_options,
)
from .failover import open_channel

__all__ = ["Attestor", "Entry", "GrpcBrokerLink", "IdentityClient", "JoinToken"]


@dataclass(frozen=True)
class JoinToken:
    token: str
    spiffe_id: str
    expires_at: datetime


@dataclass(frozen=True)
class Attestor:
    name: str
    issuer: str
    audience: str
    template: str
    algorithms: list[str]
    created_at: datetime
    key_ids: list[str]


@dataclass(frozen=True)
class Entry:
    id: str
    spiffe_id: str
    parent_id: str
    selectors: list[str]
    x509_ttl_seconds: int
    jwt_ttl_seconds: int
    dns_names: list[str]
    created_at: datetime


def _entry(e: identity_pb2.Entry) -> Entry:
    return record_from(Entry, e)


def _attestor(a: identity_pb2.Attestor) -> Attestor:
    import json

    try:
        kids = [str(k.get("kid", "")) for k in json.loads(a.jwks_json).get("keys", [])]
    except (ValueError, AttributeError):
        kids = []
    return Attestor(
        name=a.name,
        issuer=a.issuer,
        audience=a.audience,
        template=a.template,
        algorithms=list(a.algorithms),
        created_at=to_datetime(a.created_at),
        key_ids=kids,
    )


class IdentityClient(FeatureClient):
    def __init__(self, transport: Transport) -> None:
        super().__init__(transport)
        self._stub = identity_pb2_grpc.WorkloadIdentityStub(transport.channel)

    def create_join_token(self, spiffe_id: str, ttl_seconds: int | None = None) -> JoinToken:
        request = identity_pb2.CreateJoinTokenRequest(spiffe_id=spiffe_id)
        if ttl_seconds is not None:
            request.ttl_seconds = ttl_seconds
        r = self._call(self._stub.CreateJoinToken, request)
        return JoinToken(r.token, r.spiffe_id, to_datetime(r.expires_at))

    def add_attestor(
        self,
        name: str,
        issuer: str,
        audience: str,
        jwks_json: str,
        template: str,
        algorithms: Sequence[str] = (),
    ) -> Attestor:
        request = identity_pb2.Attestor(
            name=name,
            issuer=issuer,
            audience=audience,
            jwks_json=jwks_json,
            template=template,
            algorithms=list(algorithms),
        )
        return _attestor(self._call(self._stub.AddAttestor, request))

    def list_attestors(self) -> list[Attestor]:
        r = self._call(self._stub.ListAttestors, identity_pb2.ListAttestorsRequest())
        return [_attestor(a) for a in r.attestors]

    def remove_attestor(self, name: str) -> None:
        self._call(self._stub.RemoveAttestor, identity_pb2.RemoveAttestorRequest(name=name))

    def create_entry(
        self,
        spiffe_id: str,
        parent_id: str,
        selectors: Sequence[str],
        x509_ttl_seconds: int = 0,
        jwt_ttl_seconds: int = 0,
        dns_names: Sequence[str] = (),
    ) -> Entry:
        request = identity_pb2.Entry(
            spiffe_id=spiffe_id,
            parent_id=parent_id,
            selectors=list(selectors),
            x509_ttl_seconds=x509_ttl_seconds,
            jwt_ttl_seconds=jwt_ttl_seconds,
            dns_names=list(dns_names),
        )
        return _entry(self._call(self._stub.CreateEntry, request))

    def list_entries(self, parent_id: str = "") -> list[Entry]:
        r = self._call(self._stub.ListEntries, identity_pb2.ListEntriesRequest(parent_id=parent_id))
        return [_entry(e) for e in r.entries]

    def get_entry(self, entry_id: str) -> Entry:
        return _entry(self._call(self._stub.GetEntry, identity_pb2.GetEntryRequest(id=entry_id)))

    def delete_entry(self, entry_id: str) -> None:
        self._call(self._stub.DeleteEntry, identity_pb2.DeleteEntryRequest(id=entry_id))

    def deny(self, target: str) -> tuple[str, str]:
        r = self._call(self._stub.DenySVID, identity_pb2.DenySVIDRequest(target=target))
        return r.kind, r.value


def _as_broker_error(exc: ClientError) -> BrokerError:
    if exc.code_name in ("UNAVAILABLE", "DEADLINE_EXCEEDED", "CANCELLED", "UNKNOWN"):
        return Unavailable(exc.message)
    if exc.code_name in ("PERMISSION_DENIED", "UNAUTHENTICATED"):
        return PermissionDenied(exc.message)
    if exc.code_name == "INVALID_ARGUMENT":
        return InvalidArgument(exc.message)
    return Unavailable(f"{exc.code_name}: {exc.message}")


def _issued(r: Any) -> AgentSVID:
    from cryptography import x509

    leaf = x509.load_der_x509_certificate(r.cert_chain[0])
    return AgentSVID(
        spiffe_id=r.spiffe_id,
        chain_der=tuple(r.cert_chain),
        expires_at=to_datetime(r.expires_at),
        not_before=leaf.not_valid_before_utc,
    )


def _sync_result(r: Any) -> SyncResult:
    return SyncResult(
        entries=[
            AgentEntry(e.id, e.spiffe_id, frozenset(e.selectors), tuple(e.dns_names))
            for e in r.entries
        ],
        trust_domain=r.trust_domain,
        bundle_jwks=r.bundle_jwks,
        bundle_sequence=r.bundle_sequence,
        crl=tuple(bytes(c) for c in r.crl),
        root_cross=tuple(bytes(c) for c in r.root_cross_certificates),
    )


class _Watch:
    """An open WatchAgent stream as `broker.agentstream.SyncWatch`."""

    def __init__(self, call: Any, credentials: ClientCredentials) -> None:
        self._call = call
        self._credentials = credentials

    def __iter__(self) -> Iterator[SyncResult | None]:
        try:
            for message in self._call:
                yield None if message.keepalive else _sync_result(message)
        except grpc.RpcError as exc:
            if isinstance(exc, grpc.Call) and exc.code() == grpc.StatusCode.UNIMPLEMENTED:
                raise StreamUnsupported(exc.details() or "UNIMPLEMENTED") from None
            raise _as_broker_error(_error(exc, self._credentials)) from None

    def cancel(self) -> None:
        self._call.cancel()


class GrpcBrokerLink:
    """`broker.agent.BrokerLink` over gRPC. Thread-safe enough for the agent: calls come one
    at a time from worker threads; `use_identity` and `use_roots` swap the mTLS client under a
    lock. Every connection, the attestation port's too, accepts the server only if its
    certificate chains to the current roots and is the broker's own (`channel_options`)."""

    def __init__(
        self,
        server: str,
        attest_server: str,
        bundle_pem: bytes,
        *,
        join_token: str | None = None,
        jwt: str | None = None,
        timeout: float = DEFAULT_TIMEOUT_SECONDS,
    ) -> None:
        if (join_token is None) == (jwt is None):
            raise InvalidArgument("give exactly one of a join token or a JWT")
        self._server = server
        self._attest_server = attest_server
        self._bundle = bundle_pem
        self._join_token = join_token
        self._jwt = jwt
        self._timeout = timeout
        self._lock = threading.Lock()
        self._client: BrokerClient | None = None
        self._stub: Any = None
        self._identity: tuple[bytes, bytes] | None = None

    def attest(self, csr_der: bytes) -> AgentSVID:
        request = identity_pb2.AttestRequest(csr=csr_der)
        if self._join_token is not None:
            request.join_token = self._join_token
        else:
            assert self._jwt is not None
            request.jwt = self._jwt
        with self._lock:
            roots = self._bundle
        creds = grpc.ssl_channel_credentials(root_certificates=roots)
        target = self._attest_server
        try:
            options = channel_options(roots)
        except ClientError as exc:
            raise _as_broker_error(exc) from None
        with open_channel(
            target, lambda one: grpc.secure_channel(one, creds, options=options)
        ) as channel:
            stub = identity_pb2_grpc.WorkloadIdentityStub(channel)
            try:
                response = stub.Attest(request, timeout=self._timeout)
            except grpc.RpcError as exc:
                none = ClientCredentials(b"", b"", roots)
                raise _as_broker_error(_error(exc, none)) from None
        return _issued(response)

    def use_identity(self, chain_pem: bytes, key_pem: bytes) -> None:
        with self._lock:
            roots = self._bundle
            self._identity = (chain_pem, key_pem)
        self._connect(chain_pem, key_pem, roots)

    def use_roots(self, roots_pem: bytes) -> None:
        """Verify the broker against these roots from now on (the agent calls this once it
        has accepted a bundle change; see `broker.agent`)."""
        with self._lock:
            if roots_pem == self._bundle:
                return
            self._bundle = roots_pem
            identity = self._identity
        if identity is not None:
            self._connect(*identity, roots_pem)

    def _connect(self, chain_pem: bytes, key_pem: bytes, roots: bytes) -> None:
        try:
            client = BrokerClient(
                self._server, ClientCredentials(chain_pem, key_pem, roots), timeout=self._timeout
            )
        except ClientError as exc:
            raise _as_broker_error(exc) from None
        with self._lock:
            old, self._client = self._client, client
            self._stub = identity_pb2_grpc.WorkloadIdentityStub(client.channel)
        if old is not None:
            old.close()

    def _call(self, name: str, request: Any) -> Any:
        with self._lock:
            client, stub = self._client, self._stub
        if client is None:
            raise Unavailable("the agent has not attested yet")
        method: Callable[..., Any] = getattr(stub, name)
        try:
            return client.call(method, request)
        except ClientError as exc:
            raise _as_broker_error(exc) from None

    def renew(self, csr_der: bytes) -> AgentSVID:
        return _issued(self._call("RenewAgent", identity_pb2.RenewAgentRequest(csr=csr_der)))

    def sync(self) -> SyncResult:
        return _sync_result(self._call("SyncAgent", identity_pb2.SyncAgentRequest()))

    def watch(self, agent_id: str) -> _Watch:
        """Open the broker's sync stream (`broker.agentstream`); no deadline (it lives until
        cancelled, the connection drops or the agent's identity changes)."""
        with self._lock:
            client, stub = self._client, self._stub
        if client is None:
            raise Unavailable("the agent has not attested yet")
        call = stub.WatchAgent(
            identity_pb2.WatchAgentRequest(agent_id=agent_id), metadata=client._metadata()
        )
        return _Watch(call, client._credentials)

    def mint_x509(self, entry_id: str, csr_der: bytes) -> AgentSVID:
        return _issued(
            self._call(
                "MintEntryX509", identity_pb2.MintEntryX509Request(entry_id=entry_id, csr=csr_der)
            )
        )

    def mint_jwt(self, entry_id: str, audience: Sequence[str]) -> JWTResult:
        r = self._call(
            "MintEntryJWT",
            identity_pb2.MintEntryJWTRequest(entry_id=entry_id, audience=list(audience)),
        )
        return JWTResult(r.spiffe_id, r.token, to_datetime(r.expires_at))

    def close(self) -> None:
        with self._lock:
            client, self._client = self._client, None
        if client is not None:
            client.close()
