"""A synchronous client for the CertificateAuthority service (mint X.509- and JWT-SVIDs, the
trust bundle, CA status and rotation, the CA policy), over a `BrokerClient`'s mTLS channel.
Every method returns plain Python values; failures raise `broker.api.client.base.ClientError`."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime

from broker.api._proto import ca_pb2, ca_pb2_grpc
from broker.api.client.records import record_from
from broker.api.timestamps import optional_datetime, to_datetime

from .base import FeatureClient, Transport

__all__ = [
    "X509SVID",
    "Authority",
    "Bundle",
    "CAClient",
    "CAPolicyDocument",
    "CAStatusReport",
    "MintedJWTSVID",
    "RotateResult",
]


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
    root_phase: str = "steady"
    root_phase_until: datetime | None = None

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


def _authority(a: ca_pb2.Authority) -> Authority:
    return record_from(Authority, a)


def _status(s: ca_pb2.GetStatusResponse) -> CAStatusReport:
    return CAStatusReport(
        trust_domain=s.trust_domain,
        key_backend=s.key_backend,
        storage=s.storage,
        bundle_sequence=s.bundle_sequence,
        policy_version=s.policy_version,
        authorities=[_authority(a) for a in s.authorities],
        root_phase=s.root_phase or "steady",
        root_phase_until=optional_datetime(s, "root_phase_until"),
    )


class CAClient(FeatureClient):
    def __init__(self, transport: Transport) -> None:
        super().__init__(transport)
        self._stub = ca_pb2_grpc.CertificateAuthorityStub(transport.channel)

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
        response: ca_pb2.MintX509SVIDResponse = self._call(self._stub.MintX509SVID, request)
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
        response: ca_pb2.MintJWTSVIDResponse = self._call(self._stub.MintJWTSVID, request)
        return MintedJWTSVID(
            spiffe_id=response.spiffe_id,
            token=response.token,
            expires_at=to_datetime(response.expires_at),
        )

    def bundle(self) -> Bundle:
        response: ca_pb2.GetBundleResponse = self._call(
            self._stub.GetBundle, ca_pb2.GetBundleRequest()
        )
        return Bundle(
            trust_domain=response.trust_domain,
            jwks=response.jwks,
            pem=response.pem,
            sequence=response.sequence,
        )

    def status(self) -> CAStatusReport:
        response: ca_pb2.GetStatusResponse = self._call(
            self._stub.GetStatus, ca_pb2.GetStatusRequest()
        )
        return _status(response)

    def rotate(
        self,
        force: bool = False,
        *,
        root: bool = False,
        compromised: bool = False,
        activate_after_seconds: int | None = None,
        agent_grace_seconds: int | None = None,
    ) -> RotateResult:
        request = ca_pb2.RotateRequest(force=force, root=root, compromised=compromised)
        if activate_after_seconds is not None:
            request.activate_after_seconds = activate_after_seconds
        if agent_grace_seconds is not None:
            request.agent_grace_seconds = agent_grace_seconds
        response: ca_pb2.RotateResponse = self._call(self._stub.Rotate, request)
        return RotateResult(actions=list(response.actions), status=_status(response.status))

    def get_policy(self) -> CAPolicyDocument:
        response: ca_pb2.GetPolicyResponse = self._call(
            self._stub.GetPolicy, ca_pb2.GetPolicyRequest()
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
            self._stub.SetPolicy, ca_pb2.SetPolicyRequest(document_json=document_json)
        )
        return response.version
