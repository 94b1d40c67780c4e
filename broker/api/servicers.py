"""Thin gRPC servicers: validate the request shape, make one domain call, convert to proto.

They raise domain errors only; the request pipeline maps them to status codes.
"""

from __future__ import annotations

import datetime as dt
from typing import Any

import grpc
from google.protobuf.timestamp_pb2 import Timestamp

from broker.access import PROD_ENVIRONMENT
from broker.attestation import template_can_yield
from broker.audit import AuditLedger, parse_checkpoint
from broker.authority import AuthorityView, CAService, CAStatus
from broker.errors import InvalidArgument
from broker.identity import Authenticator
from broker.policy import Action
from ca.errors import CAError
from ca.spiffeid import SpiffeId

from ._proto import audit_pb2, audit_pb2_grpc, ca_pb2, ca_pb2_grpc
from .interceptors import CallContext, MethodSpec, current_call

__all__ = [
    "AUDIT_SPECS",
    "CA_SPECS",
    "INFRA_SPECS",
    "AuditServicer",
    "CertificateAuthorityServicer",
    "identity_attributes",
    "template_attributes",
]

_MAX_RESOURCE = 2100  # a valid SPIFFE ID is at most 2048 bytes; longer ones are cut in the log


def _resource(text: str) -> str:
    return text if len(text) <= _MAX_RESOURCE else text[:_MAX_RESOURCE] + "...(truncated)"


def _ts(value: dt.datetime | None) -> Timestamp | None:
    if value is None:
        return None
    # Cheaper than Timestamp.FromDatetime, which shows up in profiles of the mint path.
    seconds = int(value.timestamp())
    return Timestamp(seconds=seconds, nanos=value.microsecond * 1000)


def _ttl(request: Any, field: str = "ttl_seconds") -> dt.timedelta | None:
    if not request.HasField(field):
        return None
    return dt.timedelta(seconds=getattr(request, field))


_CA = "/broker.v1.CertificateAuthority/"
_AUDIT = "/broker.v1.Audit/"
CA_SPECS: dict[str, MethodSpec] = {
    # Deferred: the decision needs the target ID's attributes (a prod identity minted by an
    # operator needs a second operator's approval).
    _CA + "MintX509SVID": MethodSpec(
        Action.SVID_MINT, lambda r: _resource(r.spiffe_id), deferred=True
    ),
    _CA + "MintJWTSVID": MethodSpec(
        Action.JWT_MINT, lambda r: _resource(r.spiffe_id), deferred=True
    ),
    _CA + "GetBundle": MethodSpec(Action.BUNDLE_GET),
    _CA + "GetStatus": MethodSpec(Action.CA_STATUS),
    _CA + "Rotate": MethodSpec(Action.CA_ROTATE),
    _CA + "GetPolicy": MethodSpec(Action.CA_POLICY_GET),
    _CA + "SetPolicy": MethodSpec(Action.CA_POLICY_SET),
}
AUDIT_SPECS: dict[str, MethodSpec] = {
    _AUDIT + "Verify": MethodSpec(Action.AUDIT_VERIFY),
    _AUDIT + "Tail": MethodSpec(Action.AUDIT_READ),
    _AUDIT + "Checkpoint": MethodSpec(Action.AUDIT_CHECKPOINT),
}
# Health checks and reflection: authenticated and authorized, not written to the ledger.
INFRA_SPECS: dict[str, MethodSpec] = {
    "/grpc.health.v1.Health/Check": MethodSpec(Action.HEALTH, audited=False),
    "/grpc.health.v1.Health/Watch": MethodSpec(Action.HEALTH, audited=False),
    "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo": MethodSpec(
        Action.REFLECTION, audited=False
    ),
    "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo": MethodSpec(
        Action.REFLECTION, audited=False
    ),
}


def identity_attributes(auth: Authenticator | None, spiffe_id: str) -> dict[str, str]:
    """The layout attributes (tenant, environment, service) of the SPIFFE ID an RPC would issue
    a credential for, as the resource's attributes for policy: an operator issuing a prod
    identity needs a second operator. An ID outside the layout or the trust domain has none
    (the domain refuses a malformed one afterwards, with its own message)."""
    if auth is None:
        return {}
    try:
        sid = SpiffeId.parse(spiffe_id)
    except CAError:
        return {}
    if not sid.member_of(auth.trust_domain):
        return {}
    return dict(auth.caller_for_id(sid).attributes)


def template_attributes(auth: Authenticator | None, template: str) -> dict[str, str]:
    """The resource attributes of an attestor's ID template, for policy: environment "prod"
    (as `identity_attributes` gives a prod ID) when some claims make it yield a production
    identity, so an operator adding it needs a second operator; none otherwise."""
    if auth is None or not template_can_yield(
        template, auth.trust_domain, auth.layout, PROD_ENVIRONMENT
    ):
        return {}
    return {"environment": PROD_ENVIRONMENT, "template": template[:_MAX_RESOURCE]}


def _authority(a: AuthorityView) -> ca_pb2.Authority:
    return ca_pb2.Authority(
        id=a.id,
        kind=a.kind,
        generation=a.generation,
        state=a.state,
        not_before=_ts(a.not_before),
        not_after=_ts(a.not_after),
        activated_at=_ts(a.activated_at),
        retired_at=_ts(a.retired_at),
        key_uri=a.key_uri,
        jwt_kid=a.jwt_kid or "",
        subject=a.subject,
        fingerprint_sha256=a.fingerprint_sha256,
        serial=a.serial,
    )


def _status(s: CAStatus) -> ca_pb2.GetStatusResponse:
    return ca_pb2.GetStatusResponse(
        trust_domain=s.trust_domain,
        authorities=[_authority(a) for a in s.authorities],
        key_backend=s.key_backend,
        bundle_sequence=s.bundle_sequence,
        policy_version=s.policy_version,
        storage=s.storage,
    )


class CertificateAuthorityServicer(ca_pb2_grpc.CertificateAuthorityServicer):  # type: ignore[misc]
    def __init__(self, ca: CAService, authenticator: Authenticator | None = None) -> None:
        self._ca = ca
        self._auth = authenticator

    def _authorize_mint(self, spiffe_id: str) -> CallContext:
        call = current_call()
        call.authorize(_resource(spiffe_id), identity_attributes(self._auth, spiffe_id))
        return call

    async def MintX509SVID(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        call = self._authorize_mint(request.spiffe_id)
        issued = await self._ca.mint_x509(
            request.spiffe_id,
            ttl=_ttl(request),
            csr=bytes(request.csr) or None,
            key_type=request.key_type or None,
            dns_names=tuple(request.dns_names),
            caller=call.caller,
        )
        call.details.update(
            serial=issued.serial,
            spiffe_id=issued.spiffe_id,
            expires_at=issued.expires_at.isoformat(),
            key="csr" if request.csr else "generated",
        )
        return ca_pb2.MintX509SVIDResponse(
            spiffe_id=issued.spiffe_id,
            cert_chain=issued.chain_der,
            private_key=issued.private_key_der or b"",
            bundle=issued.bundle_der,
            expires_at=_ts(issued.expires_at),
            serial=issued.serial,
        )

    async def MintJWTSVID(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        call = self._authorize_mint(request.spiffe_id)
        token = await self._ca.mint_jwt(
            request.spiffe_id, tuple(request.audience), ttl=_ttl(request), caller=call.caller
        )
        call.details.update(
            spiffe_id=token.spiffe_id,
            audience=list(request.audience)[:16],
            expires_at=token.expires_at.isoformat(),
            kid=token.kid,
        )
        return ca_pb2.MintJWTSVIDResponse(
            spiffe_id=token.spiffe_id, token=token.token, expires_at=_ts(token.expires_at)
        )

    async def GetBundle(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        b = self._ca.bundle()
        return ca_pb2.GetBundleResponse(
            trust_domain=b.trust_domain, jwks=b.jwks, pem=b.pem, sequence=b.sequence
        )

    async def GetStatus(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        return _status(await self._ca.status())

    async def Rotate(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        actions = await self._ca.rotate(force=request.force)
        current_call().details.update(actions=actions, force=request.force)
        return ca_pb2.RotateResponse(actions=actions, status=_status(await self._ca.status()))

    async def GetPolicy(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        p = self._ca.policy_document()
        return ca_pb2.GetPolicyResponse(
            version=p.version,
            document_json=p.document,
            author=p.author,
            updated_at=_ts(p.created_at),
        )

    async def SetPolicy(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        if not request.document_json.strip():
            raise InvalidArgument("policy document is empty")
        version = await self._ca.set_policy(request.document_json, current_call().caller)
        current_call().details.update(policy_version=version)
        return ca_pb2.SetPolicyResponse(version=version)


class AuditServicer(audit_pb2_grpc.AuditServicer):  # type: ignore[misc]
    def __init__(self, ledger: AuditLedger) -> None:
        self._ledger = ledger

    async def Verify(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        checkpoint = None
        if request.checkpoint_json:
            checkpoint = parse_checkpoint(request.checkpoint_json)  # InvalidArgument if bad
        result = await self._ledger.verify(checkpoint=checkpoint)
        return audit_pb2.VerifyAuditResponse(
            intact=result.intact,
            entries=result.entries,
            first_broken_seq=result.first_broken_seq,
            reason=result.reason,
            notes=list(result.notes),
        )

    async def Checkpoint(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        checkpoint = None if request.fresh else await self._ledger.latest_checkpoint()
        if checkpoint is None:
            checkpoint = await self._ledger.make_checkpoint()
        current_call().details.update(checkpoint_seq=checkpoint.seq)
        return audit_pb2.CheckpointResponse(checkpoint_json=checkpoint.to_json())

    async def Tail(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        limit = request.limit or 20
        if not 0 < limit <= 1000:
            raise InvalidArgument("limit must be between 1 and 1000")
        records = await self._ledger.tail(limit)
        return audit_pb2.TailAuditResponse(
            entries=[
                audit_pb2.AuditEntry(seq=r.seq, event_json=r.event, entry_hash=r.entry_hash.hex())
                for r in records
            ]
        )
