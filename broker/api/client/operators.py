"""A synchronous client for the Operators service: login on the attestation port (server-auth
TLS, no client certificate), and whoami / logout / list / revoke over an mTLS `BrokerClient`.
Failures raise `broker.api.client.ClientError`."""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from typing import Any

import grpc
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from broker.api._proto import operators_pb2, operators_pb2_grpc
from broker.api.client.base import (
    DEFAULT_TIMEOUT_SECONDS,
    ClientCredentials,
    FeatureClient,
    Transport,
    _error,
    channel_options,
)
from broker.api.client.records import record_from

__all__ = [
    "LoginConfig",
    "OperatorLogin",
    "OperatorSession",
    "OperatorsClient",
    "login",
    "login_config",
]


@dataclass(frozen=True)
class OperatorSession:
    subject: str
    spiffe_id: str
    roles: list[str]
    amr: list[str]
    serial: str
    issued_at: dt.datetime | None
    expires_at: dt.datetime | None
    revoked_at: dt.datetime | None
    issuer: str


def _session(m: operators_pb2.OperatorSession) -> OperatorSession:
    return record_from(OperatorSession, m)


@dataclass(frozen=True)
class LoginConfig:
    issuer: str
    client_id: str
    scopes: list[str]
    default_ttl_seconds: int
    max_ttl_seconds: int


@dataclass(frozen=True)
class OperatorLogin:
    session: OperatorSession
    chain_pem: bytes  # leaf first
    bundle_pem: bytes


def _split_der(blob: bytes) -> list[x509.Certificate]:
    """Concatenated DER certificates -> certificates."""
    out = []
    while blob:
        if len(blob) < 4 or blob[0] != 0x30:
            raise ValueError("not a DER certificate")
        first = blob[1]
        if first < 0x80:
            size, head = first, 2
        else:
            n = first & 0x7F
            size, head = int.from_bytes(blob[2 : 2 + n], "big"), 2 + n
        out.append(x509.load_der_x509_certificate(blob[: head + size]))
        blob = blob[head + size :]
    return out


def _pem(certs: list[x509.Certificate]) -> bytes:
    return b"".join(c.public_bytes(serialization.Encoding.PEM) for c in certs)


def _attest_channel(target: str, bundle_pem: bytes) -> grpc.Channel:
    # The ID token goes only to the broker itself: the channel accepts a server whose
    # certificate carries the broker's reserved serving name (see docs/operators.md).
    creds = grpc.ssl_channel_credentials(root_certificates=bundle_pem)
    return grpc.secure_channel(target, creds, options=channel_options(bundle_pem))


def _bootstrap_call(target: str, bundle_pem: bytes, name: str, request: Any, timeout: float) -> Any:
    with _attest_channel(target, bundle_pem) as channel:
        stub = operators_pb2_grpc.OperatorsStub(channel)
        try:
            return getattr(stub, name)(request, timeout=timeout)
        except grpc.RpcError as exc:
            raise _error(exc, ClientCredentials(b"", b"", bundle_pem)) from None


def login_config(
    attest_server: str, bundle_pem: bytes, timeout: float = DEFAULT_TIMEOUT_SECONDS
) -> LoginConfig:
    r = _bootstrap_call(
        attest_server, bundle_pem, "LoginConfig", operators_pb2.LoginConfigRequest(), timeout
    )
    return LoginConfig(
        r.issuer, r.client_id, list(r.scopes), r.default_ttl_seconds, r.max_ttl_seconds
    )


def login(
    attest_server: str,
    bundle_pem: bytes,
    *,
    id_token: str,
    nonce: str,
    csr_der: bytes,
    ttl_seconds: int = 0,
    timeout: float = DEFAULT_TIMEOUT_SECONDS,
) -> OperatorLogin:
    request = operators_pb2.LoginRequest(
        id_token=id_token, nonce=nonce, csr=csr_der, ttl_seconds=ttl_seconds
    )
    r = _bootstrap_call(attest_server, bundle_pem, "Login", request, timeout)
    return OperatorLogin(
        _session(r.session), _pem(_split_der(r.cert_chain)), _pem(_split_der(r.bundle))
    )


class OperatorsClient(FeatureClient):
    def __init__(self, transport: Transport) -> None:
        super().__init__(transport)
        self._stub = operators_pb2_grpc.OperatorsStub(transport.channel)

    def whoami(self) -> OperatorSession:
        return _session(self._call(self._stub.WhoAmI, operators_pb2.WhoAmIRequest()))

    def logout(self) -> OperatorSession:
        return _session(self._call(self._stub.Logout, operators_pb2.LogoutRequest()))

    def list_sessions(self, include_inactive: bool = False) -> list[OperatorSession]:
        r = self._call(
            self._stub.ListOperators,
            operators_pb2.ListOperatorsRequest(include_inactive=include_inactive),
        )
        return [_session(s) for s in r.sessions]

    def revoke(self, target: str) -> list[OperatorSession]:
        r = self._call(
            self._stub.RevokeOperator, operators_pb2.RevokeOperatorRequest(target=target)
        )
        return [_session(s) for s in r.revoked]
