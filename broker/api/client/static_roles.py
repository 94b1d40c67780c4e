"""Client for static database roles (`broker.v1.StaticRoles`), over a `BrokerClient`'s channel.

Plain Python values in and out; failures raise `broker.api.client.ClientError`.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any

from broker.api._proto import static_roles_pb2, static_roles_pb2_grpc
from broker.api.timestamps import optional_datetime

from .base import FeatureClient, Transport

__all__ = ["StaticCreds", "StaticRole", "StaticRolesClient"]


@dataclass(frozen=True)
class StaticRole:
    name: str
    connection: str
    username: str
    owner: str
    tenant: str
    environment: str
    rotation_period_seconds: int
    rotation_statements: str
    version: int
    rotated_at: datetime | None
    next_rotation_at: datetime | None
    created_at: datetime | None
    rotation_in_flight: bool = False


@dataclass(frozen=True)
class StaticCreds:
    username: str
    password: str
    version: int
    next_rotation_at: datetime | None


def _role(m: Any) -> StaticRole:
    return StaticRole(
        m.name,
        m.connection,
        m.username,
        m.owner,
        m.tenant,
        m.environment,
        m.rotation_period_seconds,
        m.rotation_statements,
        m.version,
        optional_datetime(m, "rotated_at"),
        optional_datetime(m, "next_rotation_at"),
        optional_datetime(m, "created_at"),
        m.rotation_in_flight,
    )


class StaticRolesClient(FeatureClient):
    def __init__(self, transport: Transport) -> None:
        super().__init__(transport)
        self._stub = static_roles_pb2_grpc.StaticRolesStub(transport.channel)

    def add(
        self,
        name: str,
        connection: str,
        username: str,
        *,
        rotation_period_seconds: int = 0,
        rotation_statements: str | None = None,
        owner: str = "",
        tenant: str = "",
        environment: str = "",
    ) -> StaticRole:
        request = static_roles_pb2.AddStaticRoleRequest(
            name=name,
            connection=connection,
            username=username,
            rotation_period_seconds=rotation_period_seconds,
            owner=owner,
            tenant=tenant,
            environment=environment,
        )
        if rotation_statements is not None:
            request.rotation_statements = rotation_statements
        return _role(self._call(self._stub.AddStaticRole, request))

    def list(self) -> list[StaticRole]:
        response = self._call(self._stub.ListStaticRoles, static_roles_pb2.ListStaticRolesRequest())
        return [_role(r) for r in response.roles]

    def get(self, name: str) -> StaticRole:
        request = static_roles_pb2.GetStaticRoleRequest(name=name)
        return _role(self._call(self._stub.GetStaticRole, request))

    def delete(self, name: str) -> None:
        request = static_roles_pb2.DeleteStaticRoleRequest(name=name)
        self._call(self._stub.DeleteStaticRole, request)

    def rotate(self, name: str, reason: str, ticket: str) -> StaticRole:
        request = static_roles_pb2.RotateStaticRoleRequest(name=name, reason=reason, ticket=ticket)
        return _role(self._call(self._stub.RotateStaticRole, request))

    def creds(self, name: str) -> StaticCreds:
        request = static_roles_pb2.GetStaticCredentialsRequest(name=name)
        m = self._call(self._stub.GetStaticCredentials, request)
        return StaticCreds(
            m.username, m.password, m.version, optional_datetime(m, "next_rotation_at")
        )
