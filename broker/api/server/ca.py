"""The CertificateAuthority service: validate the request shape, make one domain call,
convert to proto. Servicers raise domain errors only; the request pipeline maps them to
status codes.
"""

from __future__ import annotations

import datetime as dt
from typing import TYPE_CHECKING, Any

import grpc

from broker.authn import Authenticator
from broker.authority import AuthorityView, CAService, CAStatus
from broker.errors import InvalidArgument
from broker.policy import Action

from .._proto import ca_pb2, ca_pb2_grpc
from ..timestamps import to_timestamp
from .attributes import identity_attributes, resource_name
from .binding import MethodSpec, ServiceBinding
from .pipeline import CallContext, current_call

if TYPE_CHECKING:
    from broker.app import Application

__all__ = ["CA_SPECS", "CertificateAuthorityServicer", "binding"]


def _ttl(request: Any, field: str = "ttl_seconds") -> dt.timedelta | None:
    if not request.HasField(field):
        return None
    return dt.timedelta(seconds=getattr(request, field))


_CA = "/broker.v1.CertificateAuthority/"
CA_SPECS: dict[str, MethodSpec] = {
    # Deferred: the decision needs the target ID's attributes (a prod identity minted by an
    # operator needs a second operator's approval).
    _CA + "MintX509SVID": MethodSpec(
        Action.SVID_MINT, lambda r: resource_name(r.spiffe_id), deferred=True
    ),
    _CA + "MintJWTSVID": MethodSpec(
        Action.JWT_MINT, lambda r: resource_name(r.spiffe_id), deferred=True
    ),
    _CA + "GetBundle": MethodSpec(Action.BUNDLE_GET),
    _CA + "GetStatus": MethodSpec(Action.CA_STATUS),
    _CA + "Rotate": MethodSpec(Action.CA_ROTATE),
    _CA + "GetPolicy": MethodSpec(Action.CA_POLICY_GET),
    _CA + "SetPolicy": MethodSpec(Action.CA_POLICY_SET),
}


def _authority(a: AuthorityView) -> ca_pb2.Authority:
    return ca_pb2.Authority(
        id=a.id,
        kind=a.kind,
        generation=a.generation,
        state=a.state,
        not_before=to_timestamp(a.not_before),
        not_after=to_timestamp(a.not_after),
        activated_at=to_timestamp(a.activated_at),
        retired_at=to_timestamp(a.retired_at),
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
        root_phase=s.root_phase,
        root_phase_until=to_timestamp(s.root_phase_until),
    )


class CertificateAuthorityServicer(ca_pb2_grpc.CertificateAuthorityServicer):  # type: ignore[misc]
    def __init__(self, ca: CAService, authenticator: Authenticator | None = None) -> None:
        self._ca = ca
        self._auth = authenticator

    def _authorize_mint(self, spiffe_id: str) -> CallContext:
        call = current_call()
        call.authorize(resource_name(spiffe_id), identity_attributes(self._auth, spiffe_id))
        return call

    async def MintX509SVID(
        self, request: ca_pb2.MintX509SVIDRequest, context: grpc.aio.ServicerContext
    ) -> ca_pb2.MintX509SVIDResponse:
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
            expires_at=to_timestamp(issued.expires_at),
            serial=issued.serial,
        )

    async def MintJWTSVID(
        self, request: ca_pb2.MintJWTSVIDRequest, context: grpc.aio.ServicerContext
    ) -> ca_pb2.MintJWTSVIDResponse:
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
            spiffe_id=token.spiffe_id, token=token.token, expires_at=to_timestamp(token.expires_at)
        )

    async def GetBundle(
        self, request: ca_pb2.GetBundleRequest, context: grpc.aio.ServicerContext
    ) -> ca_pb2.GetBundleResponse:
        b = self._ca.bundle()
        return ca_pb2.GetBundleResponse(
            trust_domain=b.trust_domain, jwks=b.jwks, pem=b.pem, sequence=b.sequence
        )

    async def GetStatus(
        self, request: ca_pb2.GetStatusRequest, context: grpc.aio.ServicerContext
    ) -> ca_pb2.GetStatusResponse:
        return _status(await self._ca.status())

    async def Rotate(
        self, request: ca_pb2.RotateRequest, context: grpc.aio.ServicerContext
    ) -> ca_pb2.RotateResponse:
        if request.root:
            if request.force:
                raise InvalidArgument(
                    "--force rotates the issuing CA; --root the root CA: not both"
                )
            activate_after = _ttl(request, "activate_after_seconds")
            agent_grace = _ttl(request, "agent_grace_seconds")
            if activate_after is not None and request.compromised:
                raise InvalidArgument(
                    "--activate-after applies to a planned root rotation; a compromised root "
                    "is replaced at once"
                )
            if agent_grace is not None and not request.compromised:
                raise InvalidArgument("--agent-grace applies to --root --compromised only")
            actions = await self._ca.rotate_root(
                compromised=request.compromised,
                activate_after=activate_after,
                agent_grace=agent_grace,
            )
            current_call().details.update(
                actions=actions, root=True, compromised=request.compromised
            )
        else:
            if (
                request.compromised
                or request.HasField("activate_after_seconds")
                or request.HasField("agent_grace_seconds")
            ):
                raise InvalidArgument(
                    "--compromised, --activate-after and --agent-grace need --root"
                )
            actions = await self._ca.rotate(force=request.force)
            current_call().details.update(actions=actions, force=request.force)
        return ca_pb2.RotateResponse(actions=actions, status=_status(await self._ca.status()))

    async def GetPolicy(
        self, request: ca_pb2.GetPolicyRequest, context: grpc.aio.ServicerContext
    ) -> ca_pb2.GetPolicyResponse:
        p = self._ca.policy_document()
        return ca_pb2.GetPolicyResponse(
            version=p.version,
            document_json=p.document,
            author=p.author,
            updated_at=to_timestamp(p.created_at),
        )

    async def SetPolicy(
        self, request: ca_pb2.SetPolicyRequest, context: grpc.aio.ServicerContext
    ) -> ca_pb2.SetPolicyResponse:
        if not request.document_json.strip():
            raise InvalidArgument("policy document is empty")
        version = await self._ca.set_policy(request.document_json, current_call().caller)
        current_call().details.update(policy_version=version)
        return ca_pb2.SetPolicyResponse(version=version)


def binding(app: Application, ca: CAService | None = None) -> ServiceBinding:
    """`ca` replaces the application's CA (tests only)."""
    return ServiceBinding(
        ca_pb2.DESCRIPTOR.services_by_name["CertificateAuthority"],
        ca_pb2_grpc.add_CertificateAuthorityServicer_to_server,
        CertificateAuthorityServicer(ca if ca is not None else app.ca, app.authenticator),
        CA_SPECS,
    )
