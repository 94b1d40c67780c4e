"""gRPC servicer for staged rollouts (`broker.v1.Rollouts`): validate, one domain call
(`broker.rollout.service.RolloutService`), convert. Every RPC is decided by the domain on the
secret's attributes (`deferred`): Start, Promote and Abort as `secrets.rotate`, Status as
`secrets.show`, a consumer's Report as `secrets.get` (whoever may read the secret may report on
it). The audit ledger names the secret by the SHA-256 of its reference; the domain writes one
event per step of the rollout besides the call's own.

A reference `db:ROLE` names a static database role's rollout
(`broker.rollout.static_role.StaticRolloutService`): Start, Status, Promote and Abort are then
decided here as `db.role.admin` on `static/ROLE`, a Report by the domain as a read of the role's
credentials (`db.creds`)."""

from __future__ import annotations

import datetime as dt
import functools
from typing import TYPE_CHECKING, Any

import grpc

from broker.database.static import resource_name
from broker.errors import FailedPrecondition, InvalidArgument
from broker.operators.roles import ADMIN
from broker.policy import Action
from broker.rollout.service import RolloutService, RolloutStatus, StartRequest
from broker.rollout.static_role import (
    StaticRolloutService,
    StaticStartRequest,
    is_static_reference,
    role_of,
)
from broker.secrets import SecretService, reference_hash

from .._proto import rollout_pb2, rollout_pb2_grpc
from ..timestamps import to_timestamp
from .binding import MethodSpec, ServiceBinding
from .pipeline import current_call

if TYPE_CHECKING:
    from broker.app import Application

__all__ = ["ROLLOUT_SPECS", "RolloutsServicer", "binding"]

_SVC = "/broker.v1.Rollouts/"
_MAX = 200


def _ref_resource(request: Any) -> str:
    if is_static_reference(request.reference):
        return "static/" + str(request.reference)[3:][:200]  # a static role's rollout
    return reference_hash(request.reference) if request.reference else ""


ROLLOUT_SPECS: dict[str, MethodSpec] = {
    _SVC + "Start": MethodSpec(Action.SECRETS_ROTATE, _ref_resource, deferred=True),
    _SVC + "Status": MethodSpec(Action.SECRETS_SHOW, _ref_resource, deferred=True),
    _SVC + "Promote": MethodSpec(Action.SECRETS_ROTATE, _ref_resource, deferred=True),
    _SVC + "Abort": MethodSpec(Action.SECRETS_ROTATE, _ref_resource, deferred=True),
    _SVC + "Report": MethodSpec(Action.SECRETS_GET, _ref_resource, deferred=True),
}


def status_message(status: RolloutStatus) -> rollout_pb2.RolloutStatus:
    r = status.record
    return rollout_pb2.RolloutStatus(
        id=r.id,
        tenant=r.tenant,
        reference=r.ref,
        reference_sha256=reference_hash(r.ref),
        from_version=r.from_version,
        to_version=r.to_version or 0,
        state=str(r.state),
        stages=list(r.stages),
        stage=r.stage + 1,
        stage_opened_at=to_timestamp(r.stage_opened_at),
        bake_ends=to_timestamp(status.bake_ends),
        bake_seconds=r.bake_seconds,
        max_failures=r.max_failures,
        failures=r.failures,
        health_check=r.health_check,
        check="" if r.check_passed is None else ("passed" if r.check_passed else "failed"),
        check_detail=r.check_detail,
        started_at=to_timestamp(r.started_at),
        finished_at=to_timestamp(r.finished_at),
        reason=r.reason,
        started_by=r.started_by,
        ticket=r.ticket,
        healthy=status.healthy,
        health_reason=status.health_reason,
        approver=r.approver,
        consumers=[
            rollout_pb2.RolloutConsumer(
                identity=c.identity,
                stage=c.stage + 1,
                served_version=c.served_version or 0,
                reported_version=c.reported_version or 0,
                health="" if c.healthy is None else ("healthy" if c.healthy else "unhealthy"),
                detail=c.detail,
                read_at=to_timestamp(c.read_at),
                reported_at=to_timestamp(c.reported_at),
            )
            for c in status.consumers
        ],
    )


class RolloutsServicer(rollout_pb2_grpc.RolloutsServicer):  # type: ignore[misc]
    def __init__(
        self,
        rollouts: RolloutService,
        secrets: SecretService,
        static: StaticRolloutService | None = None,
    ) -> None:
        self._rollouts = rollouts
        self._secrets = secrets
        self._static = static

    def _static_role(self, request: Any, *, consumer: bool = False) -> StaticRolloutService:
        """A `db:ROLE` reference: a static database role's rollout. Start, Status, Promote
        and Abort are decided as `db.role.admin` on `static/ROLE` (as `db static-role
        rotate`); a consumer's Report is decided by the domain as the role's credentials."""
        if self._static is None:
            raise FailedPrecondition("staged rollouts of static roles are not enabled here")
        name = role_of(request.reference)
        call = current_call()
        call.details["reference"] = request.reference
        if not consumer:
            call.authorize(resource_name(name), action=Action.DB_ROLE_ADMIN)
        return self._static

    def _tenant(self, request: Any) -> str:
        call = current_call()
        tenant = self._secrets.tenant_for(call.caller, request.tenant)
        call.details["tenant"] = tenant
        call.details["reference_sha256"] = reference_hash(request.reference)
        return tenant

    async def Start(
        self, request: rollout_pb2.StartRolloutRequest, context: grpc.aio.ServicerContext
    ) -> rollout_pb2.RolloutStatus:
        call = current_call()
        if is_static_reference(request.reference):
            static = self._static_role(request)
            if request.WhichOneof("source") is not None:
                raise InvalidArgument("a static role's new password is always generated")
            started = await static.start(
                role_of(request.reference),
                StaticStartRequest(
                    reason=request.justification,
                    ticket=request.ticket,
                    stages=list(request.stages),
                    bake=dt.timedelta(seconds=request.bake_seconds),
                    max_failures=request.max_failures,
                    health_check=request.health_check,
                ),
                actor=call.caller.spiffe_id,
                admin=call.caller.is_operator and ADMIN in call.caller.roles,
            )
            call.details.update(rollout=started.record.id, to_version=started.record.to_version)
            return status_message(started)
        tenant = self._tenant(request)
        which = request.WhichOneof("source")

        def approver() -> str:
            decision = call.decision
            if decision is None:
                return ""
            approval = decision.flags.get("approval", "")
            return f"approval {approval}" if approval else ""

        status = await self._rollouts.start_for(
            tenant,
            request.reference,
            call.caller,
            call.authorize,
            StartRequest(
                environment=request.environment,
                ticket=request.ticket,
                justification=request.justification,
                stages=list(request.stages),
                bake=dt.timedelta(seconds=request.bake_seconds),
                max_failures=request.max_failures,
                health_check=request.health_check,
                value=bytes(request.value) if which == "value" else None,
                generate_length=int(request.generate_length)
                if which == "generate_length"
                else None,
            ),
            details=call.details,
            approver=approver,
        )
        call.details.update(
            to_version=status.record.to_version,
            ticket=request.ticket[:_MAX],
            generated=which == "generate_length",
            bake_seconds=status.record.bake_seconds,
            max_failures=status.record.max_failures,
            health_check=bool(status.record.health_check),
        )
        return status_message(status)

    async def Status(
        self, request: rollout_pb2.RolloutRequest, context: grpc.aio.ServicerContext
    ) -> rollout_pb2.RolloutStatus:
        call = current_call()
        if is_static_reference(request.reference):
            static = self._static_role(request)
            status = await static.status(request.reference)
        else:
            tenant = self._tenant(request)
            status = await self._rollouts.status_for(
                tenant, request.reference, call.caller, call.authorize
            )
        return status_message(status)

    async def Promote(
        self, request: rollout_pb2.RolloutRequest, context: grpc.aio.ServicerContext
    ) -> rollout_pb2.RolloutStatus:
        call = current_call()
        if is_static_reference(request.reference):
            static = self._static_role(request)
            status = await static.promote(request.reference, actor=call.caller.spiffe_id)
        else:
            tenant = self._tenant(request)
            status = await self._rollouts.promote_for(
                tenant, request.reference, call.caller, call.authorize
            )
        call.details.update(rollout=status.record.id, stage=status.record.stage + 1)
        return status_message(status)

    async def Abort(
        self, request: rollout_pb2.RolloutRequest, context: grpc.aio.ServicerContext
    ) -> rollout_pb2.RolloutStatus:
        call = current_call()
        if is_static_reference(request.reference):
            static = self._static_role(request)
            status = await static.abort(request.reference, actor=call.caller.spiffe_id)
        else:
            tenant = self._tenant(request)
            status = await self._rollouts.abort_for(
                tenant, request.reference, call.caller, call.authorize
            )
        call.details.update(rollout=status.record.id, state=str(status.record.state))
        return status_message(status)

    async def Report(
        self, request: rollout_pb2.ReportRolloutRequest, context: grpc.aio.ServicerContext
    ) -> rollout_pb2.ReportRolloutResponse:
        call = current_call()
        if is_static_reference(request.reference):
            static = self._static_role(request, consumer=True)
            status = await static.report(
                request.reference,
                call.caller,
                functools.partial(call.authorize, action=Action.DB_CREDS),
                version=request.version,
                healthy=request.healthy,
                detail=request.detail,
            )
        else:
            tenant = self._tenant(request)
            status = await self._rollouts.report_for(
                tenant,
                request.reference,
                call.caller,
                call.authorize,
                version=request.version,
                healthy=request.healthy,
                detail=request.detail,
            )
        call.details.update(version=request.version, healthy=request.healthy)
        if status is None:
            return rollout_pb2.ReportRolloutResponse(tracked=False)
        return rollout_pb2.ReportRolloutResponse(
            tracked=True, rollout_id=status.record.id, state=str(status.record.state)
        )


def binding(app: Application) -> ServiceBinding:
    return ServiceBinding(
        rollout_pb2.DESCRIPTOR.services_by_name["Rollouts"],
        rollout_pb2_grpc.add_RolloutsServicer_to_server,
        RolloutsServicer(app.rollouts, app.secrets, app.static_rollouts),
        ROLLOUT_SPECS,
    )
