"""A synchronous client for the Secrets service, over a `BrokerClient`'s mTLS channel.

Every method returns plain Python values; failures raise `broker.api.client.ClientError`.
`BrokerSecretSource` adapts it to the grpc-free runtime SDK (`broker.api.client.sdk`).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any

from broker.api._proto import secrets_pb2, secrets_pb2_grpc
from broker.api.client.base import ClientError, FeatureClient, Transport
from broker.api.client.records import record_from
from broker.api.client.sdk import FetchedSecret, SecretRefused, SecretUnavailable
from broker.api.timestamps import optional_datetime

__all__ = [
    "BrokerSecretSource",
    "KekRotationResult",
    "SecretDetails",
    "SecretMeta",
    "SecretRead",
    "SecretVersionView",
    "SecretsClient",
]


# Codes after which the SDK may keep serving a cached value (the broker is briefly away).
_TRANSIENT = frozenset({"UNAVAILABLE", "DEADLINE_EXCEEDED", "RESOURCE_EXHAUSTED", "CANCELLED"})


# The purpose a workload declares for a read (recorded in the audit event of the read).
PURPOSE_HEADER = "x-broker-purpose"


@dataclass(frozen=True)
class SecretMeta:
    tenant: str
    reference: str
    reference_sha256: str
    service: str
    environment: str
    owner: str
    classification: str
    rotation_period_seconds: int
    last_rotated: datetime | None
    created_at: datetime | None
    state: str
    current_version: int
    revoked_at: datetime | None
    deleted_at: datetime | None
    missing: tuple[str, ...]
    rotation_due: datetime | None


@dataclass(frozen=True)
class SecretVersionView:
    version: int
    state: str
    created_at: datetime | None
    retire_at: datetime | None
    revoked_at: datetime | None
    kek: str


@dataclass(frozen=True)
class SecretDetails:
    metadata: SecretMeta
    versions: tuple[SecretVersionView, ...]


@dataclass(frozen=True)
class SecretRead:
    value: bytes
    version: int
    created_at: datetime | None
    metadata: SecretMeta


@dataclass(frozen=True)
class KekRotationResult:
    tenant: str
    new_kek: str
    rewrapped: int
    destroyed: tuple[str, ...]
    kept: tuple[str, ...]


def _meta(m: secrets_pb2.SecretMetadata) -> SecretMeta:
    return record_from(SecretMeta, m)


def _details(info: secrets_pb2.SecretInfo) -> SecretDetails:
    return SecretDetails(
        _meta(info.metadata), tuple(record_from(SecretVersionView, v) for v in info.versions)
    )


def _source(value: bytes | None, generate_length: int | None) -> dict[str, Any]:
    if value is not None:
        return {"value": value}
    if generate_length is not None:
        return {"generate_length": generate_length}
    return {}


class SecretsClient(FeatureClient):
    def __init__(self, transport: Transport) -> None:
        super().__init__(transport)
        self._stub = secrets_pb2_grpc.SecretsStub(transport.channel)

    def put(
        self,
        reference: str,
        *,
        owner: str,
        classification: str,
        rotation_period_seconds: int,
        value: bytes | None = None,
        generate_length: int | None = None,
        tenant: str = "",
    ) -> SecretDetails:
        request = secrets_pb2.PutSecretRequest(
            tenant=tenant,
            reference=reference,
            owner=owner,
            classification=classification,
            rotation_period_seconds=rotation_period_seconds,
            **_source(value, generate_length),
        )
        return _details(self._call(self._stub.Put, request))

    def get(
        self, reference: str, *, version: int = 0, tenant: str = "", purpose: str = ""
    ) -> SecretRead:
        """`purpose`: what the caller reads it for (e.g. "checkout: charge cards"), recorded
        in the audit event; people give a justification instead (`BrokerClient`)."""
        if purpose and not (len(purpose) <= 256 and purpose.isascii() and purpose.isprintable()):
            raise ClientError(
                "INVALID_ARGUMENT", "the purpose must be printable ASCII of at most 256 characters"
            )
        response = self._call(
            self._stub.Get,
            secrets_pb2.GetSecretRequest(tenant=tenant, reference=reference, version=version),
            ((PURPOSE_HEADER, purpose),) if purpose else (),
        )
        return SecretRead(
            bytes(response.value),
            response.version,
            optional_datetime(response, "created_at"),
            _meta(response.metadata),
        )

    def list_secrets(self, *, prefix: str = "", tenant: str = "") -> list[SecretMeta]:
        response = self._call(
            self._stub.List, secrets_pb2.ListSecretsRequest(tenant=tenant, prefix=prefix)
        )
        return [_meta(m) for m in response.secrets]

    def show(self, reference: str, *, tenant: str = "") -> SecretDetails:
        request = secrets_pb2.ShowSecretRequest(tenant=tenant, reference=reference)
        return _details(self._call(self._stub.Show, request))

    def rotate(
        self,
        reference: str,
        *,
        environment: str,
        ticket: str,
        justification: str,
        value: bytes | None = None,
        generate_length: int | None = None,
        tenant: str = "",
    ) -> SecretDetails:
        request = secrets_pb2.RotateSecretRequest(
            tenant=tenant,
            reference=reference,
            environment=environment,
            ticket=ticket,
            justification=justification,
            **_source(value, generate_length),
        )
        return _details(self._call(self._stub.Rotate, request))

    def rollback(self, reference: str, *, tenant: str = "") -> SecretDetails:
        request = secrets_pb2.RollbackSecretRequest(tenant=tenant, reference=reference)
        return _details(self._call(self._stub.Rollback, request))

    def revoke(self, reference: str, *, justification: str, tenant: str = "") -> SecretDetails:
        request = secrets_pb2.RevokeSecretRequest(
            tenant=tenant, reference=reference, justification=justification
        )
        return _details(self._call(self._stub.Revoke, request))

    def delete(self, reference: str, *, tenant: str = "") -> SecretDetails:
        request = secrets_pb2.DeleteSecretRequest(tenant=tenant, reference=reference)
        return _details(self._call(self._stub.Delete, request))

    def due(self, *, tenant: str = "") -> list[SecretMeta]:
        response = self._call(self._stub.Due, secrets_pb2.DueSecretsRequest(tenant=tenant))
        return [_meta(m) for m in response.secrets]

    def rotate_kek(self, *, tenant: str = "") -> list[KekRotationResult]:
        response = self._call(self._stub.RotateKEK, secrets_pb2.RotateKEKRequest(tenant=tenant))
        return [
            KekRotationResult(r.tenant, r.new_kek, r.rewrapped, tuple(r.destroyed), tuple(r.kept))
            for r in response.rotations
        ]


class BrokerSecretSource:
    """`broker.api.client.sdk.SecretSource` over a `SecretsClient`: transient failures become
    `SecretUnavailable` (the SDK may serve its cache), refusals `SecretRefused`."""

    def __init__(self, client: SecretsClient, *, tenant: str = "", purpose: str = "") -> None:
        self._client = client
        self._tenant = tenant
        self._purpose = purpose

    def fetch(self, reference: str) -> FetchedSecret:
        try:
            read = self._client.get(reference, tenant=self._tenant, purpose=self._purpose)
        except ClientError as exc:
            if exc.code_name in _TRANSIENT:
                raise SecretUnavailable(f"{exc.code_name}: {exc.message}") from None
            raise SecretRefused(exc.code_name, exc.message) from None
        return FetchedSecret(read.value, read.version)
