"""gRPC servicer for operators (broker.v1.Operators): login with an OpenID Connect ID token
(on the attestation port, no client certificate), whoami, logout, list and revoke."""

from __future__ import annotations

import datetime as dt
from typing import TYPE_CHECKING

import grpc

from broker.attestation import token_fingerprint
from broker.operators.service import OperatorService
from broker.policy import Action
from broker.storage.operators import OperatorSessionRecord

from .._proto import operators_pb2, operators_pb2_grpc
from ..timestamps import to_timestamp
from .binding import MethodSpec, ServiceBinding
from .identity import _peer_serial
from .pipeline import current_call

if TYPE_CHECKING:
    from broker.app import Application


__all__ = ["OPERATOR_SPECS", "OperatorsServicer", "binding"]

_SVC = "/broker.v1.Operators/"

OPERATOR_SPECS: dict[str, MethodSpec] = {
    # The audit event names the token only by a short hash, never the token.
    _SVC + "Login": MethodSpec(
        Action.OPERATOR_LOGIN, lambda r: "id-token:" + token_fingerprint(r.id_token), bootstrap=True
    ),
    _SVC + "LoginConfig": MethodSpec(Action.OPERATOR_LOGIN_CONFIG, bootstrap=True),
    _SVC + "WhoAmI": MethodSpec(Action.OPERATOR_WHOAMI),
    _SVC + "Logout": MethodSpec(Action.OPERATOR_LOGOUT),
    _SVC + "ListOperators": MethodSpec(Action.OPERATOR_LIST),
    _SVC + "RevokeOperator": MethodSpec(Action.OPERATOR_REVOKE, lambda r: r.target[:256]),
}


def _session(r: OperatorSessionRecord) -> operators_pb2.OperatorSession:
    out = operators_pb2.OperatorSession(
        subject=r.subject,
        spiffe_id=r.spiffe_id,
        roles=list(r.roles),
        amr=list(r.amr),
        serial=r.serial,
        issued_at=to_timestamp(r.issued_at),
        expires_at=to_timestamp(r.expires_at),
        issuer=r.issuer,
    )
    if r.revoked_at is not None:
        out.revoked_at.CopyFrom(to_timestamp(r.revoked_at))
    return out


class OperatorsServicer(operators_pb2_grpc.OperatorsServicer):  # type: ignore[misc]
    def __init__(self, service: OperatorService) -> None:
        self._svc = service

    async def LoginConfig(
        self, request: operators_pb2.LoginConfigRequest, context: grpc.aio.ServicerContext
    ) -> operators_pb2.LoginConfigResponse:
        cfg = self._svc.config
        self._svc.verifier  # noqa: B018 (raises FailedPrecondition when login is off)
        return operators_pb2.LoginConfigResponse(
            issuer=cfg.issuer,
            client_id=cfg.client_id,
            scopes=list(cfg.scopes),
            default_ttl_seconds=int(cfg.default_ttl.total_seconds()),
            max_ttl_seconds=int(cfg.max_ttl.total_seconds()),
        )

    async def Login(
        self, request: operators_pb2.LoginRequest, context: grpc.aio.ServicerContext
    ) -> operators_pb2.LoginResponse:
        ttl = dt.timedelta(seconds=request.ttl_seconds) if request.ttl_seconds else None
        details = current_call().details
        result = await self._svc.login(
            request.id_token, request.nonce, bytes(request.csr), ttl, notes=details
        )
        s = result.session
        details.update(
            subject=s.subject,
            spiffe_id=s.spiffe_id,
            amr=list(s.amr),
            roles=list(s.roles),
            serial=s.serial,
            expires_at=s.expires_at.isoformat(),
        )
        return operators_pb2.LoginResponse(
            session=_session(s),
            cert_chain=b"".join(result.chain_der),
            bundle=b"".join(result.bundle_der),
        )

    async def WhoAmI(
        self, request: operators_pb2.WhoAmIRequest, context: grpc.aio.ServicerContext
    ) -> operators_pb2.OperatorSession:
        call = current_call()
        return _session(await self._svc.whoami(call.caller, _peer_serial(context)))

    async def Logout(
        self, request: operators_pb2.LogoutRequest, context: grpc.aio.ServicerContext
    ) -> operators_pb2.OperatorSession:
        call = current_call()
        record = await self._svc.logout(call.caller, _peer_serial(context))
        call.details.update(serial=record.serial, subject=record.subject)
        return _session(record)

    async def ListOperators(
        self, request: operators_pb2.ListOperatorsRequest, context: grpc.aio.ServicerContext
    ) -> operators_pb2.ListOperatorsResponse:
        sessions = await self._svc.list_sessions(include_inactive=request.include_inactive)
        return operators_pb2.ListOperatorsResponse(sessions=[_session(s) for s in sessions])

    async def RevokeOperator(
        self, request: operators_pb2.RevokeOperatorRequest, context: grpc.aio.ServicerContext
    ) -> operators_pb2.RevokeOperatorResponse:
        revoked = await self._svc.revoke(request.target)
        current_call().details.update(serials=[r.serial for r in revoked][:64])
        return operators_pb2.RevokeOperatorResponse(revoked=[_session(r) for r in revoked])


def binding(app: Application) -> ServiceBinding:
    return ServiceBinding(
        operators_pb2.DESCRIPTOR.services_by_name["Operators"],
        operators_pb2_grpc.add_OperatorsServicer_to_server,
        OperatorsServicer(app.operators),
        OPERATOR_SPECS,
    )
