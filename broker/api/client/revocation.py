"""Client for revocation by person (`broker.v1.Revocation`)."""

from __future__ import annotations

from dataclasses import dataclass

from broker.api._proto import revocation_pb2, revocation_pb2_grpc

from .base import FeatureClient, Transport

__all__ = ["RevocationClient", "RevocationResult", "RevokedObject"]


@dataclass(frozen=True)
class RevokedObject:
    kind: str  # lease, grant, static-role
    id: str
    error: str = ""  # empty: ended


@dataclass(frozen=True)
class RevocationResult:
    subject: str
    objects: list[RevokedObject]


class RevocationClient(FeatureClient):
    def __init__(self, transport: Transport) -> None:
        super().__init__(transport)
        self._stub = revocation_pb2_grpc.RevocationStub(transport.channel)

    def revoke(
        self, *, identity: str = "", owner: str = "", reason: str, ticket: str = ""
    ) -> RevocationResult:
        request = revocation_pb2.RevokeSubjectRequest(
            identity=identity, owner=owner, reason=reason, ticket=ticket
        )
        response = self._call(self._stub.RevokeSubject, request)
        return RevocationResult(
            response.subject, [RevokedObject(o.kind, o.id, o.error) for o in response.objects]
        )
