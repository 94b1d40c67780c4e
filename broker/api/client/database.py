"""Client for dynamic database credentials and leases, over a `BrokerClient`'s channel.

Plain Python values in and out; failures raise `broker.api.client.ClientError`.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from broker.api._proto import database_pb2, database_pb2_grpc
from broker.api.client.records import record_from

from .base import FeatureClient, Transport

__all__ = ["Connection", "Credentials", "DatabaseClient", "Lease", "Role"]


@dataclass(frozen=True)
class Connection:
    name: str
    plugin: str
    dsn: str
    created_at: datetime | None
    root_rotated_at: datetime | None
    kek_label: str


@dataclass(frozen=True)
class Role:
    name: str
    connection: str
    owner: str
    tenant: str
    environment: str
    creation_statements: str
    revocation_statements: str
    rollback_statements: str
    default_ttl_seconds: int
    max_ttl_seconds: int
    username_template: str
    password_length: int
    password_charset: str
    created_at: datetime | None
    classification: str = ""
    rotation_period_seconds: int = 0


@dataclass(frozen=True)
class Lease:
    id: str
    role: str
    connection: str
    username: str
    holder: str
    state: str
    created_at: datetime | None
    expires_at: datetime | None
    max_expires_at: datetime | None
    lease_duration: int
    renewable: bool
    attempts: int
    last_error: str
    next_attempt_at: datetime | None = None  # revoking / irrevocable: the reaper's next try


@dataclass(frozen=True)
class Credentials:
    username: str
    password: str
    lease: Lease


def _connection(m: database_pb2.DatabaseConnection) -> Connection:
    return record_from(Connection, m)


def _role(m: database_pb2.DatabaseRole) -> Role:
    return record_from(Role, m)


def _lease(m: database_pb2.Lease) -> Lease:
    return record_from(Lease, m, {"lease_duration": "lease_duration_seconds"})


class DatabaseClient(FeatureClient):
    def __init__(self, transport: Transport) -> None:
        super().__init__(transport)
        self._db = database_pb2_grpc.DatabaseStub(transport.channel)
        self._leases = database_pb2_grpc.LeasesStub(transport.channel)

    # -- connections

    def add_connection(
        self, name: str, plugin: str, dsn: str, password: str, *, verify: bool = True
    ) -> Connection:
        request = database_pb2.AddConnectionRequest(
            name=name, plugin=plugin, dsn=dsn, password=password, skip_verify=not verify
        )
        return _connection(self._call(self._db.AddConnection, request))

    def list_connections(self) -> list[Connection]:
        response = self._call(self._db.ListConnections, database_pb2.ListConnectionsRequest())
        return [_connection(c) for c in response.connections]

    def get_connection(self, name: str) -> Connection:
        request = database_pb2.GetConnectionRequest(name=name)
        return _connection(self._call(self._db.GetConnection, request))

    def remove_connection(self, name: str) -> None:
        request = database_pb2.RemoveConnectionRequest(name=name)
        self._call(self._db.RemoveConnection, request)

    def rotate_root(self, name: str) -> Connection:
        request = database_pb2.RotateRootRequest(name=name)
        return _connection(self._call(self._db.RotateRoot, request))

    # -- roles

    def add_role(
        self,
        name: str,
        connection: str,
        creation_statements: str,
        *,
        revocation_statements: str | None = None,
        rollback_statements: str | None = None,
        default_ttl_seconds: int = 0,
        max_ttl_seconds: int = 0,
        username_template: str = "",
        owner: str = "",
        tenant: str = "",
        environment: str = "",
        password_length: int = 0,
        password_charset: str = "",
        classification: str = "",
        rotation_period_seconds: int = 0,
    ) -> Role:
        role = database_pb2.DatabaseRole(
            name=name,
            connection=connection,
            creation_statements=creation_statements,
            revocation_statements=revocation_statements or "",
            rollback_statements=rollback_statements or "",
            default_ttl_seconds=default_ttl_seconds,
            max_ttl_seconds=max_ttl_seconds,
            username_template=username_template,
            owner=owner,
            tenant=tenant,
            environment=environment,
            password_length=password_length,
            password_charset=password_charset,
            classification=classification,
            rotation_period_seconds=rotation_period_seconds,
        )
        request = database_pb2.AddRoleRequest(
            role=role,
            has_revocation=revocation_statements is not None,
            has_rollback=rollback_statements is not None,
        )
        return _role(self._call(self._db.AddRole, request))

    def list_roles(self) -> list[Role]:
        response = self._call(self._db.ListRoles, database_pb2.ListRolesRequest())
        return [_role(r) for r in response.roles]

    def get_role(self, name: str) -> Role:
        return _role(self._call(self._db.GetRole, database_pb2.GetRoleRequest(name=name)))

    def remove_role(self, name: str) -> None:
        self._call(self._db.RemoveRole, database_pb2.RemoveRoleRequest(name=name))

    # -- credentials and leases

    def creds(self, role: str, ttl_seconds: int | None = None) -> Credentials:
        request = database_pb2.IssueCredentialsRequest(role=role)
        if ttl_seconds is not None:
            request.ttl_seconds = ttl_seconds
        response = self._call(self._db.IssueCredentials, request)
        return Credentials(response.username, response.password, _lease(response.lease))

    def renew(self, lease_id: str, increment_seconds: int | None = None) -> Lease:
        request = database_pb2.RenewLeaseRequest(lease_id=lease_id)
        if increment_seconds is not None:
            request.increment_seconds = increment_seconds
        return _lease(self._call(self._leases.Renew, request))

    def revoke(self, lease_id: str) -> int:
        request = database_pb2.RevokeLeaseRequest(lease_id=lease_id)
        return int(self._call(self._leases.Revoke, request).revoked)

    def revoke_prefix(self, prefix: str) -> tuple[int, list[str]]:
        request = database_pb2.RevokePrefixRequest(prefix=prefix)
        response = self._call(self._leases.RevokePrefix, request)
        return int(response.revoked), list(response.errors)

    def list_leases(self, prefix: str = "", limit: int = 1000) -> list[Lease]:
        request = database_pb2.ListLeasesRequest(prefix=prefix, limit=limit)
        return [_lease(m) for m in self._call(self._leases.List, request).leases]
