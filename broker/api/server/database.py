"""gRPC servicers for dynamic database credentials (`broker.v1.Database`) and their leases
(`broker.v1.Leases`). Validate, one domain call, convert; never return an admin password."""

from __future__ import annotations

import datetime as dt
from typing import TYPE_CHECKING, Any

import grpc
from google.protobuf.message import Message

from broker.database.credentials import CredentialService, RoleSpec
from broker.dsn import redact
from broker.errors import InvalidArgument
from broker.policy import Action
from broker.storage.database import ConnectionRecord, LeaseRecord, RoleRecord

from .._proto import database_pb2, database_pb2_grpc
from ..timestamps import to_timestamp
from .binding import MethodSpec, ServiceBinding
from .pipeline import current_call

if TYPE_CHECKING:
    from broker.app import Application


__all__ = ["DATABASE_SPECS", "LEASE_SPECS", "DatabaseServicer", "LeasesServicer", "binding"]

_DB = "/broker.v1.Database/"
_LEASES = "/broker.v1.Leases/"
_MAX_NAME = 200


def _name(text: str) -> str:
    return text if len(text) <= _MAX_NAME else text[:_MAX_NAME] + "...(truncated)"


DATABASE_SPECS: dict[str, MethodSpec] = {
    _DB + "AddConnection": MethodSpec(Action.DB_CONNECTION_ADMIN, lambda r: _name(r.name)),
    _DB + "ListConnections": MethodSpec(Action.DB_CONNECTION_ADMIN),
    _DB + "GetConnection": MethodSpec(Action.DB_CONNECTION_ADMIN, lambda r: _name(r.name)),
    _DB + "RemoveConnection": MethodSpec(Action.DB_CONNECTION_ADMIN, lambda r: _name(r.name)),
    _DB + "RotateRoot": MethodSpec(Action.DB_CONNECTION_ADMIN, lambda r: _name(r.name)),
    _DB + "AddRole": MethodSpec(Action.DB_ROLE_ADMIN, lambda r: _name(r.role.name)),
    _DB + "ListRoles": MethodSpec(Action.DB_ROLE_ADMIN),
    _DB + "GetRole": MethodSpec(Action.DB_ROLE_ADMIN, lambda r: _name(r.name)),
    _DB + "RemoveRole": MethodSpec(Action.DB_ROLE_ADMIN, lambda r: _name(r.name)),
    _DB + "IssueCredentials": MethodSpec(Action.DB_CREDS, lambda r: _name(r.role), deferred=True),
}
LEASE_SPECS: dict[str, MethodSpec] = {
    _LEASES + "Renew": MethodSpec(Action.LEASE_RENEW, lambda r: _name(r.lease_id), deferred=True),
    _LEASES + "Revoke": MethodSpec(Action.LEASE_REVOKE, lambda r: _name(r.lease_id), deferred=True),
    _LEASES + "RevokePrefix": MethodSpec(
        Action.LEASE_REVOKE, lambda r: _name(r.prefix), deferred=True
    ),
    _LEASES + "List": MethodSpec(Action.LEASE_LIST, lambda r: _name(r.prefix)),
}


def _seconds(request: Message, field: str) -> dt.timedelta | None:
    if not request.HasField(field):
        return None
    value = getattr(request, field)
    if value <= 0:
        raise InvalidArgument(f"{field.removesuffix('_seconds')} must be positive")
    return dt.timedelta(seconds=value)


def connection_pb(record: ConnectionRecord) -> database_pb2.DatabaseConnection:
    return database_pb2.DatabaseConnection(
        name=record.name,
        plugin=record.plugin,
        dsn=redact(record.dsn),
        created_at=to_timestamp(record.created_at),
        root_rotated_at=to_timestamp(record.rotated_at),
        kek_label=record.kek_label,
    )


def role_pb(record: RoleRecord) -> database_pb2.DatabaseRole:
    return database_pb2.DatabaseRole(
        name=record.name,
        connection=record.connection,
        owner=record.owner,
        tenant=record.tenant,
        environment=record.environment,
        creation_statements=record.creation,
        revocation_statements=record.revocation or "",
        rollback_statements=record.rollback or "",
        default_ttl_seconds=record.default_ttl,
        max_ttl_seconds=record.max_ttl,
        username_template=record.username_template,
        password_length=record.password_length,
        password_charset=record.password_charset,
        created_at=to_timestamp(record.created_at),
        classification=record.classification,
        rotation_period_seconds=record.rotation_period or 0,
    )


def lease_pb(record: LeaseRecord, now: dt.datetime | None = None) -> database_pb2.Lease:
    start = record.created_at if now is None else now
    return database_pb2.Lease(
        id=record.id,
        role=record.role,
        connection=record.connection,
        username=record.username,
        holder=record.holder,
        state=record.state,
        created_at=to_timestamp(record.created_at),
        expires_at=to_timestamp(record.expires_at),
        max_expires_at=to_timestamp(record.max_expires_at),
        lease_duration_seconds=max(0, int((record.expires_at - start).total_seconds())),
        renewable=record.state == "active" and record.expires_at < record.max_expires_at,
        attempts=record.attempts,
        last_error=record.last_error or "",
        next_attempt_at=(
            to_timestamp(record.due_at) if record.state in ("revoking", "irrevocable") else None
        ),
    )


def _lease_details(lease: LeaseRecord) -> dict[str, Any]:
    return {
        "lease_id": lease.id,
        "role": lease.role,
        "username": lease.username,
        "holder": lease.holder,
        "expires_at": lease.expires_at.isoformat(),
    }


class DatabaseServicer(database_pb2_grpc.DatabaseServicer):  # type: ignore[misc]
    def __init__(self, service: CredentialService) -> None:
        self._db = service

    async def AddConnection(
        self, request: database_pb2.AddConnectionRequest, context: grpc.aio.ServicerContext
    ) -> database_pb2.DatabaseConnection:
        record = await self._db.add_connection(
            request.name,
            request.plugin,
            request.dsn,
            request.password,
            verify=not request.skip_verify,
        )
        current_call().details.update(
            plugin=record.plugin, dsn=redact(record.dsn), verified=not request.skip_verify
        )
        return connection_pb(record)

    async def ListConnections(
        self, request: database_pb2.ListConnectionsRequest, context: grpc.aio.ServicerContext
    ) -> database_pb2.ListConnectionsResponse:
        records = await self._db.list_connections()
        return database_pb2.ListConnectionsResponse(connections=[connection_pb(r) for r in records])

    async def GetConnection(
        self, request: database_pb2.GetConnectionRequest, context: grpc.aio.ServicerContext
    ) -> database_pb2.DatabaseConnection:
        return connection_pb(await self._db.connection(request.name))

    async def RemoveConnection(
        self, request: database_pb2.RemoveConnectionRequest, context: grpc.aio.ServicerContext
    ) -> database_pb2.RemoveConnectionResponse:
        await self._db.remove_connection(request.name)
        return database_pb2.RemoveConnectionResponse()

    async def RotateRoot(
        self, request: database_pb2.RotateRootRequest, context: grpc.aio.ServicerContext
    ) -> database_pb2.DatabaseConnection:
        record = await self._db.rotate_root(request.name)
        current_call().details.update(
            rotated_at=record.rotated_at and record.rotated_at.isoformat()
        )
        return connection_pb(record)

    async def AddRole(
        self, request: database_pb2.AddRoleRequest, context: grpc.aio.ServicerContext
    ) -> database_pb2.DatabaseRole:
        r = request.role
        spec = RoleSpec(
            name=r.name,
            connection=r.connection,
            creation=r.creation_statements,
            revocation=r.revocation_statements if request.has_revocation else None,
            rollback=r.rollback_statements if request.has_rollback else None,
            default_ttl=dt.timedelta(seconds=r.default_ttl_seconds or 3600),
            max_ttl=dt.timedelta(seconds=r.max_ttl_seconds or 86400),
            username_template=r.username_template or RoleSpec.username_template,
            owner=r.owner,
            tenant=r.tenant,
            environment=r.environment,
            password_length=r.password_length or RoleSpec.password_length,
            password_charset=r.password_charset or RoleSpec.password_charset,
            classification=r.classification,
            rotation_period=(
                dt.timedelta(seconds=r.rotation_period_seconds)
                if r.rotation_period_seconds > 0
                else None
            ),
        )
        record = await self._db.add_role(spec)
        current_call().details.update(
            connection=record.connection,
            owner=record.owner,
            tenant=record.tenant,
            environment=record.environment,
            default_ttl=record.default_ttl,
            max_ttl=record.max_ttl,
            classification=record.classification,
        )
        return role_pb(record)

    async def ListRoles(
        self, request: database_pb2.ListRolesRequest, context: grpc.aio.ServicerContext
    ) -> database_pb2.ListRolesResponse:
        return database_pb2.ListRolesResponse(
            roles=[role_pb(r) for r in await self._db.list_roles()]
        )

    async def GetRole(
        self, request: database_pb2.GetRoleRequest, context: grpc.aio.ServicerContext
    ) -> database_pb2.DatabaseRole:
        return role_pb(await self._db.role(request.name))

    async def RemoveRole(
        self, request: database_pb2.RemoveRoleRequest, context: grpc.aio.ServicerContext
    ) -> database_pb2.RemoveRoleResponse:
        await self._db.remove_role(request.name)
        return database_pb2.RemoveRoleResponse()

    async def IssueCredentials(
        self, request: database_pb2.IssueCredentialsRequest, context: grpc.aio.ServicerContext
    ) -> database_pb2.DatabaseCredentials:
        call = current_call()
        ttl = _seconds(request, "ttl_seconds")
        issued = await self._db.issue(request.role, call.caller, call.authorize, ttl)
        call.details.update(_lease_details(issued.lease))  # never the password
        return database_pb2.DatabaseCredentials(
            username=issued.username, password=issued.password, lease=lease_pb(issued.lease)
        )


class LeasesServicer(database_pb2_grpc.LeasesServicer):  # type: ignore[misc]
    def __init__(self, service: CredentialService) -> None:
        self._db = service

    async def Renew(
        self, request: database_pb2.RenewLeaseRequest, context: grpc.aio.ServicerContext
    ) -> database_pb2.Lease:
        increment = _seconds(request, "increment_seconds")
        renewed = await self._db.renew(request.lease_id, current_call().authorize, increment)
        current_call().details.update(_lease_details(renewed))
        return lease_pb(renewed, self._db.now())

    async def Revoke(
        self, request: database_pb2.RevokeLeaseRequest, context: grpc.aio.ServicerContext
    ) -> database_pb2.RevokeLeaseResponse:
        call = current_call()
        await self._db.revoke(
            request.lease_id,
            call.authorize,
            loaded=lambda lease: call.details.update(_lease_details(lease)),
        )
        return database_pb2.RevokeLeaseResponse(revoked=1)

    async def RevokePrefix(
        self, request: database_pb2.RevokePrefixRequest, context: grpc.aio.ServicerContext
    ) -> database_pb2.RevokeLeaseResponse:
        call = current_call()
        revoked, errors = await self._db.revoke_prefix(request.prefix, call.authorize)
        call.details.update(prefix=request.prefix, revoked=revoked, failed=len(errors))
        return database_pb2.RevokeLeaseResponse(revoked=revoked, errors=errors[:100])

    async def List(
        self, request: database_pb2.ListLeasesRequest, context: grpc.aio.ServicerContext
    ) -> database_pb2.ListLeasesResponse:
        limit = request.limit or 1000
        if not 0 < limit <= 10000:
            raise InvalidArgument("limit must be between 1 and 10000")
        leases = await self._db.list_leases(request.prefix, limit)
        return database_pb2.ListLeasesResponse(leases=[lease_pb(r) for r in leases])


def binding(app: Application) -> list[ServiceBinding]:
    """Both services (Database and Leases), wired to `app.database`."""

    return [
        ServiceBinding(
            database_pb2.DESCRIPTOR.services_by_name["Database"],
            database_pb2_grpc.add_DatabaseServicer_to_server,
            DatabaseServicer(app.database),
            DATABASE_SPECS,
        ),
        ServiceBinding(
            database_pb2.DESCRIPTOR.services_by_name["Leases"],
            database_pb2_grpc.add_LeasesServicer_to_server,
            LeasesServicer(app.database),
            LEASE_SPECS,
        ),
    ]
