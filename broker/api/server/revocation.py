"""gRPC servicer for revocation by person (`broker.v1.Revocation`): validate, one domain call
(`broker.revocation.SubjectRevocation`), convert. Operators only (action subject.revoke); the
domain writes one audit record per object ended, the pipeline one for the call."""

from __future__ import annotations

from typing import TYPE_CHECKING

import grpc

from broker.policy import Action
from broker.revocation import SubjectRevocation

from .._proto import revocation_pb2, revocation_pb2_grpc
from .binding import MethodSpec, ServiceBinding
from .pipeline import current_call

if TYPE_CHECKING:
    from broker.app import Application

__all__ = ["REVOCATION_SPECS", "RevocationServicer", "binding"]

_MAX = 200


def _subject(request: revocation_pb2.RevokeSubjectRequest) -> str:
    text = request.identity or f"owner:{request.owner}"
    return text[:_MAX]


REVOCATION_SPECS: dict[str, MethodSpec] = {
    "/broker.v1.Revocation/RevokeSubject": MethodSpec(Action.SUBJECT_REVOKE, _subject),
}


class RevocationServicer(revocation_pb2_grpc.RevocationServicer):  # type: ignore[misc]
    def __init__(self, service: SubjectRevocation) -> None:
        self._service = service

    async def RevokeSubject(
        self, request: revocation_pb2.RevokeSubjectRequest, context: grpc.aio.ServicerContext
    ) -> revocation_pb2.RevokeSubjectResponse:
        call = current_call()
        report = await self._service.revoke(
            call.caller,
            identity=request.identity,
            owner=request.owner,
            reason=request.reason,
            ticket=request.ticket[:_MAX],
        )
        call.details.update(
            reason=request.reason,
            ticket=request.ticket[:_MAX],
            leases=len(report.leases),
            grants=len(report.grants),
            static_roles=len(report.static_roles),
            failed=len(report.failed),
        )
        objects = [
            *(revocation_pb2.RevokedObject(kind="lease", id=i) for i in report.leases),
            *(revocation_pb2.RevokedObject(kind="grant", id=i) for i in report.grants),
            *(revocation_pb2.RevokedObject(kind="static-role", id=i) for i in report.static_roles),
            *(revocation_pb2.RevokedObject(kind=k, id=i, error=e) for k, i, e in report.failed),
        ]
        return revocation_pb2.RevokeSubjectResponse(subject=report.subject, objects=objects)


def binding(app: Application) -> ServiceBinding:
    return ServiceBinding(
        revocation_pb2.DESCRIPTOR.services_by_name["Revocation"],
        revocation_pb2_grpc.add_RevocationServicer_to_server,
        RevocationServicer(app.revocation),
        REVOCATION_SPECS,
    )
