"""gRPC servicer for static database roles (`broker.v1.StaticRoles`). Validate, one domain
call, convert; the password leaves only through GetStaticCredentials, to the owning service
(a deferred decision: the domain loads the role and asks the `Authorize` port)."""

from __future__ import annotations

import datetime as dt
from typing import TYPE_CHECKING

import grpc

from broker.database.credentials import CredentialService
from broker.database.static import StaticRoleSpec, resource_name
from broker.errors import InvalidArgument
from broker.policy import Action
from broker.rollout.static_role import StaticRolloutService
from broker.storage.database import StaticRoleRecord

from .._proto import static_roles_pb2, static_roles_pb2_grpc
from ..timestamps import to_timestamp
from .binding import MethodSpec, ServiceBinding
from .pipeline import current_call

if TYPE_CHECKING:
    from broker.app import Application

__all__ = ["STATIC_ROLE_SPECS", "StaticRolesServicer", "binding"]

_SR = "/broker.v1.StaticRoles/"
_MAX_NAME = 200
_MAX_TEXT = 200


def _name(text: str) -> str:
    return resource_name(text if len(text) <= _MAX_NAME else text[:_MAX_NAME] + "...(truncated)")


STATIC_ROLE_SPECS: dict[str, MethodSpec] = {
    _SR + "AddStaticRole": MethodSpec(Action.DB_ROLE_ADMIN, lambda r: _name(r.name)),
    _SR + "ListStaticRoles": MethodSpec(Action.DB_ROLE_ADMIN),
    _SR + "GetStaticRole": MethodSpec(Action.DB_ROLE_ADMIN, lambda r: _name(r.name)),
    _SR + "DeleteStaticRole": MethodSpec(Action.DB_ROLE_ADMIN, lambda r: _name(r.name)),
    _SR + "RotateStaticRole": MethodSpec(Action.DB_ROLE_ADMIN, lambda r: _name(r.name)),
    _SR + "GetStaticCredentials": MethodSpec(
        Action.DB_CREDS, lambda r: _name(r.name), deferred=True
    ),
}


def static_role_pb(
    record: StaticRoleRecord, in_flight: bool = False
) -> static_roles_pb2.StaticRole:
    return static_roles_pb2.StaticRole(
        name=record.name,
        connection=record.connection,
        username=record.username,
        owner=record.owner,
        tenant=record.tenant,
        environment=record.environment,
        rotation_period_seconds=record.rotation_period,
        rotation_statements=record.rotation_statements or "",
        version=record.version,
        rotated_at=to_timestamp(record.rotated_at),
        next_rotation_at=to_timestamp(record.next_rotation_at),
        created_at=to_timestamp(record.created_at),
        rotation_in_flight=in_flight,
    )


def _text(value: str, what: str) -> str:
    text = value.strip()
    if not text:
        raise InvalidArgument(f"a {what} is required")
    if len(text) > _MAX_TEXT or not text.isprintable():
        raise InvalidArgument(f"the {what} must be printable and at most {_MAX_TEXT} characters")
    return text


class StaticRolesServicer(static_roles_pb2_grpc.StaticRolesServicer):  # type: ignore[misc]
    def __init__(
        self, service: CredentialService, rollouts: StaticRolloutService | None = None
    ) -> None:
        self._db = service
        self._rollouts = rollouts  # staged rollouts: static-creds answers by stage

    async def AddStaticRole(
        self, request: static_roles_pb2.AddStaticRoleRequest, context: grpc.aio.ServicerContext
    ) -> static_roles_pb2.StaticRole:
        if request.rotation_period_seconds < 0:
            raise InvalidArgument("rotation period must be positive")
        spec = StaticRoleSpec(
            name=request.name,
            connection=request.connection,
            username=request.username,
            rotation_period=dt.timedelta(seconds=request.rotation_period_seconds or 30 * 86400),
            rotation_statements=(
                request.rotation_statements if request.HasField("rotation_statements") else None
            ),
            owner=request.owner,
            tenant=request.tenant,
            environment=request.environment,
        )
        call = current_call()
        record = await self._db.static.add(spec, actor=call.caller.spiffe_id)
        call.details.update(
            connection=record.connection,
            username=record.username,
            owner=record.owner,
            rotation_period=record.rotation_period,
            version=record.version,
        )
        return static_role_pb(record)

    async def ListStaticRoles(
        self, request: static_roles_pb2.ListStaticRolesRequest, context: grpc.aio.ServicerContext
    ) -> static_roles_pb2.ListStaticRolesResponse:
        records = await self._db.static.list_roles()
        return static_roles_pb2.ListStaticRolesResponse(roles=[static_role_pb(r) for r in records])

    async def GetStaticRole(
        self, request: static_roles_pb2.GetStaticRoleRequest, context: grpc.aio.ServicerContext
    ) -> static_roles_pb2.StaticRole:
        record = await self._db.static.role(request.name)
        return static_role_pb(record, await self._db.static.in_flight(request.name))

    async def DeleteStaticRole(
        self, request: static_roles_pb2.DeleteStaticRoleRequest, context: grpc.aio.ServicerContext
    ) -> static_roles_pb2.DeleteStaticRoleResponse:
        record = await self._db.static.remove(request.name)
        current_call().details.update(connection=record.connection, username=record.username)
        return static_roles_pb2.DeleteStaticRoleResponse()

    async def RotateStaticRole(
        self, request: static_roles_pb2.RotateStaticRoleRequest, context: grpc.aio.ServicerContext
    ) -> static_roles_pb2.StaticRole:
        reason = _text(request.reason, "reason")
        ticket = _text(request.ticket, "ticket")
        call = current_call()
        call.details.update(reason=reason, ticket=ticket)
        before = await self._db.static.role(request.name)
        record = await self._db.static.rotate(
            request.name, f"{reason} (ticket {ticket})", actor=call.caller.spiffe_id
        )
        call.details.update(before_version=before.version, after_version=record.version)
        return static_role_pb(record)

    async def GetStaticCredentials(
        self,
        request: static_roles_pb2.GetStaticCredentialsRequest,
        context: grpc.aio.ServicerContext,
    ) -> static_roles_pb2.StaticCredentials:
        call = current_call()
        next_at: dt.datetime | None
        if self._rollouts is None:
            creds = await self._db.static.credentials(request.name, call.caller, call.authorize)
            username, password, version = creds.username, creds.password, creds.role.version
            next_at = creds.role.next_rotation_at
        else:
            # The role's credentials, or during a staged rollout of it those of the caller's
            # stage (this read is the consumer's read of the rollout).
            routed = await self._rollouts.credentials(request.name, call.caller, call.authorize)
            username, password, version = routed.username, routed.password, routed.version
            next_at = routed.next_rotation_at
            if routed.rollout_id is not None:
                call.details.update(rollout=routed.rollout_id, stage=(routed.stage or 0) + 1)
        call.details.update(username=username, version=version)  # no password
        return static_roles_pb2.StaticCredentials(
            username=username,
            password=password,
            version=version,
            next_rotation_at=to_timestamp(next_at),
        )


def binding(app: Application) -> ServiceBinding:
    """The StaticRoles service, wired to `app.database`."""
    return ServiceBinding(
        static_roles_pb2.DESCRIPTOR.services_by_name["StaticRoles"],
        static_roles_pb2_grpc.add_StaticRolesServicer_to_server,
        StaticRolesServicer(app.database, app.static_rollouts),
        STATIC_ROLE_SPECS,
    )
