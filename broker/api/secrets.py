"""The Secrets service: thin servicers over `broker.secrets.SecretService`.

Every RPC that names a secret is authorized in the servicer (`MethodSpec(deferred=True)`): it
loads the secret's metadata first and asks the policy with its attributes (tenant, environment,
owner, classification, service, and the reference, which grant and approval wildcards match);
an absent secret, or one whose metadata does not verify, is decided as one nobody owns, and a
refused workload is told the same in both cases. Every RPC names the secret in the audit ledger
only by the SHA-256 of its reference. People reading a secret whose environment or
classification is listed in `secrets.justification_required` must give a justification;
workloads may declare a purpose (`x-broker-purpose`), recorded in the audit event.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Collection
from typing import TYPE_CHECKING, Any

import grpc
from google.protobuf.timestamp_pb2 import Timestamp

from broker.config import DEFAULT_JUSTIFICATION_REQUIRED
from broker.devvault.pull import DEV_PULL_PURPOSE
from broker.envelope import KekRotation, KekRotator
from broker.errors import InvalidArgument, NotFound, PermissionDenied
from broker.policy import Action, Caller
from broker.secrets import (
    SecretInfo,
    SecretIntegrityError,
    SecretRef,
    SecretService,
    VersionInfo,
    reference_hash,
)
from ca.layout import DEV_TENANT

from ._proto import secrets_pb2, secrets_pb2_grpc
from .interceptors import MethodSpec, current_call

if TYPE_CHECKING:
    from broker.app import Application

    from .services import ServiceBinding

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


def _is_person(caller: Caller) -> bool:
    """Operators and break-glass holders, as opposed to workloads."""
    path = caller.spiffe_id.split("/", 3)[-1] if caller.spiffe_id.count("/") >= 3 else ""
    return caller.is_operator or path.startswith(("broker/operator/", "broker/breakglass/"))


def _unowned(tenant: str, reference: str) -> dict[str, str]:
    """The attributes of a secret nobody owns at `reference` (decided when it is absent)."""
    ref = SecretRef.parse(reference)
    return {
        "tenant": tenant,
        "environment": ref.environment,
        "owner": "",
        "service": ref.service,
        "reference": ref.text,
    }


def _ts(value: dt.datetime | None) -> Timestamp | None:
    if value is None:
        return None
    return Timestamp(seconds=int(value.timestamp()), nanos=value.microsecond * 1000)


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
        last_rotated=_ts(r.last_rotated),
        created_at=_ts(r.created_at),
        state=r.state,
        current_version=r.current_version,
        revoked_at=_ts(r.revoked_at),
        deleted_at=_ts(r.deleted_at),
        missing=list(info.missing),
        rotation_due=_ts(info.rotation_due),
    )


def _version(v: VersionInfo) -> secrets_pb2.SecretVersion:
    return secrets_pb2.SecretVersion(
        version=v.version,
        state=v.state,
        created_at=_ts(v.created_at),
        retire_at=_ts(v.retire_at),
        revoked_at=_ts(v.revoked_at),
        kek=v.kek,
    )


def _info(info: SecretInfo) -> secrets_pb2.SecretInfo:
    return secrets_pb2.SecretInfo(
        metadata=_metadata(info), versions=[_version(v) for v in info.versions]
    )


def _source(request: Any) -> tuple[bytes | None, int | None]:
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
    def __init__(
        self,
        secrets: SecretService,
        kek: KekRotator,
        default_tenant: str,
        justification_required: Collection[str] = DEFAULT_JUSTIFICATION_REQUIRED,
    ) -> None:
        self._secrets = secrets
        self._kek = kek
        self._default_tenant = default_tenant
        self._justify = frozenset(justification_required)

    def _tenant(self, requested: str) -> str:
        """The request's tenant: as asked, else the workload's own, else the default. The
        policy refuses a workload asking for another tenant's secret."""
        call = current_call()
        if requested:
            tenant = requested
        elif not call.caller.is_operator and call.caller.attributes.get("tenant"):
            tenant = call.caller.attributes["tenant"]
        else:
            tenant = self._default_tenant
        call.details["tenant"] = tenant
        return tenant

    def _named(self, request: Any) -> str:
        tenant = self._tenant(request.tenant)
        current_call().details["reference_sha256"] = reference_hash(request.reference)
        return tenant

    def _decide(self, reference: str, attributes: dict[str, str]) -> None:
        """The deferred decision on a secret's attributes (its reference among them, which
        grant and approval wildcards match). A workload refused is told the same for a secret
        that exists and one that does not, naming neither owner nor rule (the audit event keeps
        the real reason)."""
        call = current_call()
        try:
            call.authorize(reference_hash(reference), attributes)
        except PermissionDenied:
            if call.caller.is_operator:
                raise  # operators administer secrets: the reason helps, and they may `show`
            raise PermissionDenied(
                f"{call.action} refused: there is no such secret for this caller, or it may "
                "not use it (an operator can grant access with 'broker grant create')"
            ) from None

    async def _load(self, tenant: str, request: Any, version: int | None = None) -> Any:
        """The secret's metadata and version row, or (absent, or metadata that did not verify)
        the request decided as for a secret nobody owns, so a caller learns nothing about what
        exists, and then NotFound or the integrity refusal (audited with the request)."""
        call = current_call()
        try:
            loaded = await self._secrets.load(tenant, request.reference, version)
        except SecretIntegrityError:
            call.details["integrity"] = "metadata MAC mismatch"
            self._decide(request.reference, _unowned(tenant, request.reference))
            raise
        if loaded is None:
            self._decide(request.reference, _unowned(tenant, request.reference))
            raise NotFound(f"no such secret in tenant {tenant!r}")
        return loaded

    async def _loaded(self, request: Any) -> tuple[str, SecretInfo]:
        """Tenant and metadata of the secret an administrative call names, authorized."""
        tenant = self._named(request)
        info = (await self._load(tenant, request))[0]
        self._decide(request.reference, info.attributes())
        return tenant, info

    async def Put(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        tenant = self._named(request)
        ref = SecretRef.parse(request.reference)
        owner = request.owner or ref.service
        self._decide(
            request.reference,
            _unowned(tenant, request.reference)
            | {"owner": owner, "classification": request.classification},
        )
        value, length = _source(request)
        info = await self._secrets.put(
            tenant,
            request.reference,
            owner=owner,
            classification=request.classification,
            rotation_period=dt.timedelta(seconds=request.rotation_period_seconds),
            value=value,
            generate_length=length,
        )
        current_call().details.update(version=1, generated=length is not None)
        return _info(info)

    async def Get(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        call = current_call()
        tenant = self._named(request)
        purpose = _header(context, PURPOSE_HEADER)
        if purpose:
            call.details["purpose"] = purpose  # the workload's own declared purpose
        info, row = await self._load(tenant, request, request.version or None)
        if purpose == DEV_PULL_PURPOSE and (info.record.environment or "") in self._justify:
            # `broker dev pull`: production (as the policy marks it) never reaches a dev vault.
            self._decide(request.reference, info.attributes())
            raise PermissionDenied(
                f"dev pull refused: environment {info.record.environment!r} is production "
                "(secrets.justification_required); it is never copied to a dev vault"
            )
        self._require_justification(info)
        self._decide(request.reference, info.attributes())
        secret = await self._secrets.reveal(info, row)
        call.details["version"] = secret.version
        return secrets_pb2.GetSecretResponse(
            value=secret.value,
            version=secret.version,
            metadata=_metadata(info),
            created_at=_ts(secret.created_at),
        )

    def _require_justification(self, info: SecretInfo) -> None:
        """People (operators, break-glass holders) give a justification to read secrets whose
        environment or classification is in `secrets.justification_required`; checked before
        the decision, so a refusal spends no approval."""
        call = current_call()
        if not _is_person(call.caller) or call.justification.strip():
            return
        record = info.record
        needs = [v for v in (record.environment, record.classification) if v in self._justify]
        if needs:
            raise InvalidArgument(
                f"a justification is required to read a {'/'.join(needs)} secret as a person: "
                "pass --justification TEXT (e.g. the ticket and why)"
            )

    async def List(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        infos = await self._secrets.list_secrets(self._tenant(request.tenant), request.prefix)
        return secrets_pb2.ListSecretsResponse(secrets=[_metadata(i) for i in infos])

    async def Show(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        tenant, _ = await self._loaded(request)
        return _info(await self._secrets.show(tenant, request.reference))

    async def Rotate(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        call = current_call()
        tenant = self._named(request)
        value, length = _source(request)
        # Decided on the secret's attributes (a prod + pii secret rotated off schedule needs a
        # second operator's approval), so load them first.
        info = (await self._load(tenant, request))[0]
        due = info.rotation_due
        on_schedule = due is None or due <= self._secrets.now()
        call.details["on_schedule"] = on_schedule
        self._decide(
            request.reference,
            info.attributes() | {"on_schedule": "true" if on_schedule else "false"},
        )
        info, before, after = await self._secrets.rotate(
            tenant,
            request.reference,
            environment=request.environment,
            ticket=request.ticket,
            justification=request.justification,
            value=value,
            generate_length=length,
        )
        current_call().details.update(
            from_version=before,
            to_version=after,
            ticket=request.ticket,
            generated=length is not None,
        )
        return _info(info)

    async def Rollback(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        tenant, _ = await self._loaded(request)
        info, before, after = await self._secrets.rollback(tenant, request.reference)
        current_call().details.update(from_version=before, to_version=after)
        return _info(info)

    async def Revoke(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        tenant, _ = await self._loaded(request)
        info = await self._secrets.revoke(tenant, request.reference, request.justification)
        current_call().details["versions"] = len(info.versions)
        return _info(info)

    async def Delete(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        tenant, _ = await self._loaded(request)
        return _info(await self._secrets.delete(tenant, request.reference))

    async def Due(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        tenant = request.tenant or None
        infos = await self._secrets.due(tenant)
        return secrets_pb2.ListSecretsResponse(secrets=[_metadata(i) for i in infos])

    async def RotateKEK(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        rotations = await self._kek.rotate(request.tenant or None)
        current_call().details["rotations"] = [
            {"tenant": r.tenant, "kek": r.new_label, "rewrapped": r.rewrapped} for r in rotations
        ]
        return secrets_pb2.RotateKEKResponse(rotations=[_rotation(r) for r in rotations])


def binding(app: Application) -> ServiceBinding:
    from .services import ServiceBinding

    default_tenant = app.config.identity.default_tenant or DEV_TENANT
    return ServiceBinding(
        secrets_pb2.DESCRIPTOR.services_by_name["Secrets"],
        secrets_pb2_grpc.add_SecretsServicer_to_server,
        SecretsServicer(
            app.secrets,
            app.kek_rotator,
            default_tenant,
            app.config.secrets.justification_required,
        ),
        SECRETS_SPECS,
    )
