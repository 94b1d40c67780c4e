"""The Secrets service: thin servicers over `broker.secrets.SecretService`.

Every RPC that names a secret is authorized by the domain (`MethodSpec(deferred=True)`): the
servicer hands the call's `authorize` to `SecretService`, which loads the secret's metadata
first and decides on its attributes (tenant, environment, owner, classification, service, and
the reference, which grant and approval wildcards match); an absent secret, or one whose
metadata does not verify, is decided as one nobody owns, and a refused workload is told the
same in both cases. Every RPC names the secret in the audit ledger only by the SHA-256 of its
reference. People reading a secret whose environment or classification is listed in
`secrets.justification_required` must give a justification; workloads may declare a purpose
(`x-broker-purpose`), recorded in the audit event.
"""

from __future__ import annotations

import datetime as dt
from typing import TYPE_CHECKING, Any

import grpc

from broker.envelope import KekRotation, KekRotator
from broker.errors import InvalidArgument
from broker.policy import Action
from broker.secrets import (
    NamedSecret,
    SecretInfo,
    SecretService,
    VersionInfo,
    reference_hash,
)

from .._proto import secrets_pb2, secrets_pb2_grpc
from ..timestamps import to_timestamp
from .binding import MethodSpec, ServiceBinding
from .pipeline import current_call

if TYPE_CHECKING:
    from broker.app import Application


__all__ = ["SECRETS_SPECS", "SecretsServicer", "binding"]

_SVC = "/broker.v1.Secrets/"


def _ref_resource(request: Any) -> str:
    return reference_hash(request.reference) if request.reference else ""


SECRETS_SPECS: dict[str, MethodSpec] = {
    _SVC + "Put": MethodSpec(Action.SECRETS_PUT, _ref_resource, deferred=True),
    _SVC + "Get": MethodSpec(Action.SECRETS_GET, _ref_resource, deferred=True),
    _SVC + "List": MethodSpec(Action.SECRETS_LIST, lambda r: r.tenant),
    _SVC + "Show": MethodSpec(Action.SECRETS_SHOW, _ref_resource, deferred=True),
    _SVC + "Rotate": MethodSpec(Action.SECRETS_ROTATE, _ref_resource, deferred=True),
    _SVC + "Rollback": MethodSpec(Action.SECRETS_ROLLBACK, _ref_resource, deferred=True),
    _SVC + "Revoke": MethodSpec(Action.SECRETS_REVOKE, _ref_resource, deferred=True),
    _SVC + "Delete": MethodSpec(Action.SECRETS_DELETE, _ref_resource, deferred=True),
    _SVC + "Due": MethodSpec(Action.SECRETS_LIST, lambda r: r.tenant),
    _SVC + "RotateKEK": MethodSpec(Action.KEK_ROTATE, lambda r: r.tenant),
}


# The purpose a workload (SDK, agent, CLI) declares for a read, recorded in its audit event.
PURPOSE_HEADER = "x-broker-purpose"
_MAX_PURPOSE = 256


def _header(context: grpc.aio.ServicerContext, name: str) -> str:
    for key, value in context.invocation_metadata() or ():
        if key == name and isinstance(value, str):
            if len(value) > _MAX_PURPOSE or not (value.isascii() and value.isprintable()):
                raise InvalidArgument(
                    f"{name} must be printable ASCII text of at most {_MAX_PURPOSE} characters"
                )
            return value.strip()
    return ""


def _metadata(info: SecretInfo) -> secrets_pb2.SecretMetadata:
    r = info.record
    return secrets_pb2.SecretMetadata(
        tenant=r.tenant,
        reference=r.ref,
        reference_sha256=info.sha256,
        service=r.service or "",
        environment=r.environment or "",
        owner=r.owner or "",
        classification=r.classification or "",
        rotation_period_seconds=r.rotation_period_s or 0,
        last_rotated=to_timestamp(r.last_rotated),
        created_at=to_timestamp(r.created_at),
        state=r.state,
        current_version=r.current_version,
        revoked_at=to_timestamp(r.revoked_at),
        deleted_at=to_timestamp(r.deleted_at),
        missing=list(info.missing),
        rotation_due=to_timestamp(info.rotation_due),
    )


def _version(v: VersionInfo) -> secrets_pb2.SecretVersion:
    return secrets_pb2.SecretVersion(
        version=v.version,
        state=v.state,
        created_at=to_timestamp(v.created_at),
        retire_at=to_timestamp(v.retire_at),
        revoked_at=to_timestamp(v.revoked_at),
        kek=v.kek,
    )


def _info(info: SecretInfo) -> secrets_pb2.SecretInfo:
    return secrets_pb2.SecretInfo(
        metadata=_metadata(info), versions=[_version(v) for v in info.versions]
    )


def _source(
    request: secrets_pb2.PutSecretRequest | secrets_pb2.RotateSecretRequest,
) -> tuple[bytes | None, int | None]:
    which = request.WhichOneof("source")
    if which == "value":
        return bytes(request.value), None
    if which == "generate_length":
        return None, int(request.generate_length)
    return None, None


def _rotation(r: KekRotation) -> secrets_pb2.KEKRotation:
    return secrets_pb2.KEKRotation(
        tenant=r.tenant,
        new_kek=r.new_label,
        rewrapped=r.rewrapped,
        destroyed=list(r.destroyed),
        kept=list(r.kept),
    )


class SecretsServicer(secrets_pb2_grpc.SecretsServicer):  # type: ignore[misc]
    def __init__(self, secrets: SecretService, kek: KekRotator) -> None:
        self._secrets = secrets
        self._kek = kek

    def _tenant(self, requested: str) -> str:
        call = current_call()
        tenant = self._secrets.tenant_for(call.caller, requested)
        call.details["tenant"] = tenant
        return tenant

    def _named(self, request: Any) -> str:
        tenant = self._tenant(request.tenant)
        current_call().details["reference_sha256"] = reference_hash(request.reference)
        return tenant

    def _administered(
        self,
        request: secrets_pb2.ShowSecretRequest
        | secrets_pb2.RollbackSecretRequest
        | secrets_pb2.RevokeSecretRequest
        | secrets_pb2.DeleteSecretRequest,
    ) -> NamedSecret:
        """The secret an administrative call names, to hand to its one domain call."""
        call = current_call()
        tenant = self._named(request)
        return NamedSecret(tenant, request.reference, call.caller, call.authorize, call.details)

    async def Put(
        self, request: secrets_pb2.PutSecretRequest, context: grpc.aio.ServicerContext
    ) -> secrets_pb2.SecretInfo:
        call = current_call()
        tenant = self._named(request)
        value, length = _source(request)
        info = await self._secrets.put_for(
            tenant,
            request.reference,
            call.caller,
            call.authorize,
            owner=request.owner,
            classification=request.classification,
            rotation_period=dt.timedelta(seconds=request.rotation_period_seconds),
            value=value,
            generate_length=length,
        )
        call.details.update(version=1, generated=length is not None)
        return _info(info)

    async def Get(
        self, request: secrets_pb2.GetSecretRequest, context: grpc.aio.ServicerContext
    ) -> secrets_pb2.GetSecretResponse:
        call = current_call()
        tenant = self._named(request)
        purpose = _header(context, PURPOSE_HEADER)
        if purpose:
            call.details["purpose"] = purpose  # the workload's own declared purpose
        secret = await self._secrets.get(
            tenant,
            request.reference,
            call.caller,
            call.authorize,
            version=request.version or None,
            justification=call.justification,
            purpose=purpose,
            details=call.details,
        )
        call.details["version"] = secret.version
        return secrets_pb2.GetSecretResponse(
            value=secret.value,
            version=secret.version,
            metadata=_metadata(secret.info),
            created_at=to_timestamp(secret.created_at),
        )

    async def List(
        self, request: secrets_pb2.ListSecretsRequest, context: grpc.aio.ServicerContext
    ) -> secrets_pb2.ListSecretsResponse:
        infos = await self._secrets.list_secrets(self._tenant(request.tenant), request.prefix)
        return secrets_pb2.ListSecretsResponse(secrets=[_metadata(i) for i in infos])

    async def Show(
        self, request: secrets_pb2.ShowSecretRequest, context: grpc.aio.ServicerContext
    ) -> secrets_pb2.SecretInfo:
        return _info(await self._secrets.show_for(self._administered(request)))

    async def Rotate(
        self, request: secrets_pb2.RotateSecretRequest, context: grpc.aio.ServicerContext
    ) -> secrets_pb2.SecretInfo:
        call = current_call()
        tenant = self._named(request)
        value, length = _source(request)
        info, before, after = await self._secrets.rotate_for(
            tenant,
            request.reference,
            call.caller,
            call.authorize,
            environment=request.environment,
            ticket=request.ticket,
            justification=request.justification,
            value=value,
            generate_length=length,
            details=call.details,
        )
        call.details.update(
            from_version=before,
            to_version=after,
            ticket=request.ticket,
            generated=length is not None,
        )
        return _info(info)

    async def Rollback(
        self, request: secrets_pb2.RollbackSecretRequest, context: grpc.aio.ServicerContext
    ) -> secrets_pb2.SecretInfo:
        info, before, after = await self._secrets.rollback_for(self._administered(request))
        current_call().details.update(from_version=before, to_version=after)
        return _info(info)

    async def Revoke(
        self, request: secrets_pb2.RevokeSecretRequest, context: grpc.aio.ServicerContext
    ) -> secrets_pb2.SecretInfo:
        named = self._administered(request)
        info = await self._secrets.revoke_for(named, request.justification)
        current_call().details["versions"] = len(info.versions)
        return _info(info)

    async def Delete(
        self, request: secrets_pb2.DeleteSecretRequest, context: grpc.aio.ServicerContext
    ) -> secrets_pb2.SecretInfo:
        return _info(await self._secrets.delete_for(self._administered(request)))

    async def Due(
        self, request: secrets_pb2.DueSecretsRequest, context: grpc.aio.ServicerContext
    ) -> secrets_pb2.ListSecretsResponse:
        tenant = request.tenant or None
        infos = await self._secrets.due(tenant)
        return secrets_pb2.ListSecretsResponse(secrets=[_metadata(i) for i in infos])

    async def RotateKEK(
        self, request: secrets_pb2.RotateKEKRequest, context: grpc.aio.ServicerContext
    ) -> secrets_pb2.RotateKEKResponse:
        rotations = await self._kek.rotate(request.tenant or None)
        current_call().details["rotations"] = [
            {"tenant": r.tenant, "kek": r.new_label, "rewrapped": r.rewrapped} for r in rotations
        ]
        return secrets_pb2.RotateKEKResponse(rotations=[_rotation(r) for r in rotations])


def binding(app: Application) -> ServiceBinding:
    return ServiceBinding(
        secrets_pb2.DESCRIPTOR.services_by_name["Secrets"],
        secrets_pb2_grpc.add_SecretsServicer_to_server,
        SecretsServicer(app.secrets, app.kek_rotator),
        SECRETS_SPECS,
    )
