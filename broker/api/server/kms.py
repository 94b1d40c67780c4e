"""The Kms service (issue 16): thin servicers over `broker.kms.KeyService`.

Every RPC that names a key is authorized by the domain (`MethodSpec(deferred=True)`): the
servicer hands the call's `authorize` to `KeyService.authorized`, which loads the key first and
decides on its attributes (tenant, environment, owner, classification); an absent key, or one
whose row does not verify, is decided as one nobody owns, so a refused workload is told the
same in every case and learns nothing about what exists. Decrypt and ReEncrypt take the key
from the ciphertext's header. The audit event names the key, its
version and the SHA-256 of the encryption context; never plaintext, data keys or contexts.
"""

from __future__ import annotations

import datetime as dt
import functools
import json
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import grpc

from broker.errors import FailedPrecondition, InvalidArgument
from broker.kms import KeyInfo, KeyService, context_hash, refusal
from broker.kms.keys import check_tenant
from broker.kms.report import ComplianceReporter
from broker.policy import Action, opaque_refusals

from .._proto import kms_pb2, kms_pb2_grpc
from ..timestamps import to_timestamp
from .binding import MethodSpec, ServiceBinding
from .pipeline import current_call

if TYPE_CHECKING:
    from broker.app import Application

__all__ = ["KMS_SPECS", "KmsServicer", "binding"]

_SVC = "/broker.v1.Kms/"


def _name(request: Any) -> str:
    return str(getattr(request, "name", "") or getattr(request, "key", ""))[:200]


KMS_SPECS: dict[str, MethodSpec] = {
    _SVC + "CreateKey": MethodSpec(Action.KMS_KEY_CREATE, _name, deferred=True),
    _SVC + "ListKeys": MethodSpec(Action.KMS_KEY_LIST, lambda r: r.tenant),
    _SVC + "ShowKey": MethodSpec(Action.KMS_KEY_SHOW, _name, deferred=True),
    _SVC + "RotateKey": MethodSpec(Action.KMS_KEY_ROTATE, _name, deferred=True),
    _SVC + "DisableKey": MethodSpec(Action.KMS_KEY_DISABLE, _name, deferred=True),
    _SVC + "EnableKey": MethodSpec(Action.KMS_KEY_ENABLE, _name, deferred=True),
    _SVC + "ScheduleDestroy": MethodSpec(Action.KMS_KEY_DESTROY, _name, deferred=True),
    _SVC + "CancelDestroy": MethodSpec(Action.KMS_KEY_DESTROY, _name, deferred=True),
    _SVC + "GenerateDataKey": MethodSpec(Action.KMS_DATA_KEY, _name, deferred=True),
    _SVC + "Encrypt": MethodSpec(Action.KMS_ENCRYPT, _name, deferred=True),
    _SVC + "Decrypt": MethodSpec(Action.KMS_DECRYPT, deferred=True),
    _SVC + "ReEncrypt": MethodSpec(Action.KMS_REENCRYPT, deferred=True),
    _SVC + "Sign": MethodSpec(Action.KMS_SIGN, _name, deferred=True),
    _SVC + "Verify": MethodSpec(Action.KMS_VERIFY, _name, deferred=True),
    _SVC + "GetPublicKey": MethodSpec(Action.KMS_PUBLIC_KEY, _name, deferred=True),
    _SVC + "Mac": MethodSpec(Action.KMS_MAC, _name, deferred=True),
    _SVC + "VerifyMac": MethodSpec(Action.KMS_MAC, _name, deferred=True),
    _SVC + "ComplianceReport": MethodSpec(Action.REPORT_COMPLIANCE, lambda r: r.tenant),
}


def _metadata(info: KeyInfo) -> kms_pb2.KeyMetadata:
    r = info.record
    return kms_pb2.KeyMetadata(
        tenant=r.tenant,
        name=r.name,
        purpose=r.purpose,
        key_type=r.key_type,
        owner=r.owner,
        environment=r.environment,
        classification=r.classification,
        rotation_period_seconds=r.rotation_period_s,
        state=r.state,
        current_version=r.current_version,
        created_at=to_timestamp(r.created_at),
        last_rotated=to_timestamp(r.last_rotated),
        rotation_due=to_timestamp(info.rotation_due),
        destroy_after=to_timestamp(r.destroy_after),
    )


def _info(info: KeyInfo) -> kms_pb2.KeyInfo:
    return kms_pb2.KeyInfo(
        metadata=_metadata(info),
        versions=[
            kms_pb2.KeyVersion(
                version=v.version,
                state=v.state,
                created_at=to_timestamp(v.created_at),
                destroyed_at=to_timestamp(v.destroyed_at),
            )
            for v in info.versions
        ],
    )


def _input(request: Any) -> tuple[bytes | None, bytes | None]:
    which = request.WhichOneof("input")
    if which == "message":
        return bytes(request.message), None
    if which == "digest":
        return None, bytes(request.digest)
    raise InvalidArgument("give a message or a digest")


class KmsServicer(kms_pb2_grpc.KmsServicer):  # type: ignore[misc]
    def __init__(self, keys: KeyService, reporter: ComplianceReporter | None = None) -> None:
        self._keys = keys
        self._reporter = reporter

    def _tenant(self, requested: str) -> str:
        """The request's tenant (`KeyService.tenant_for`), recorded in the audit event."""
        call = current_call()
        tenant = self._keys.tenant_for(call.caller, requested)
        call.details["tenant"] = tenant
        return tenant

    def _decide(self, name: str, attributes: Mapping[str, str]) -> None:
        """The decision for a key that does not exist yet (CreateKey)."""
        call = current_call()
        decide = opaque_refusals(call.authorize, call.caller, refusal(call.action))
        decide(name, dict(attributes) | {"name": name})

    async def _key(
        self, tenant: str, name: str, action: str | None = None, version: int | None = None
    ) -> KeyInfo:
        """The key (with `version`, else its current one, in the same read), authorized by
        the domain (see `KeyService.authorized`)."""
        call = current_call()
        call.details["key"] = name
        return await self._keys.authorized(
            tenant,
            name,
            call.caller,
            functools.partial(call.authorize, action=action or call.action),
            action or call.action,
            version=version,
            details=call.details,
        )

    def _context(self, context: Mapping[str, str], field: str = "context_sha256") -> dict[str, str]:
        value = dict(context)
        current_call().details[field] = context_hash(value)  # validates the size limits
        return value

    # -- administration ---------------------------------------------------------------------

    async def CreateKey(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        tenant = self._tenant(request.tenant)
        current_call().details["key"] = request.name
        self._decide(
            request.name,
            {
                "tenant": tenant,
                "environment": request.environment,
                "owner": request.owner,
                "service": request.owner,
                "classification": request.classification,
            },
        )
        info = await self._keys.create(
            tenant,
            request.name,
            purpose=request.purpose,
            key_type=request.key_type,
            owner=request.owner,
            environment=request.environment,
            classification=request.classification,
            rotation_period=dt.timedelta(seconds=request.rotation_period_seconds)
            if request.rotation_period_seconds
            else None,
        )
        current_call().details.update(key_type=request.key_type, version=1)
        return _info(info)

    async def ListKeys(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        infos = await self._keys.list_keys(self._tenant(request.tenant))
        return kms_pb2.ListKeysResponse(keys=[_metadata(i) for i in infos])

    async def ShowKey(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        tenant = self._tenant(request.tenant)
        await self._key(tenant, request.name)
        return _info(await self._keys.show(tenant, request.name))

    async def RotateKey(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        tenant = self._tenant(request.tenant)
        await self._key(tenant, request.name)
        info, before, after = await self._keys.rotate(tenant, request.name)
        current_call().details.update(from_version=before, to_version=after)
        return _info(info)

    async def DisableKey(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        tenant = self._tenant(request.tenant)
        await self._key(tenant, request.name)
        return _info(await self._keys.disable(tenant, request.name))

    async def EnableKey(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        tenant = self._tenant(request.tenant)
        await self._key(tenant, request.name)
        return _info(await self._keys.enable(tenant, request.name))

    async def ScheduleDestroy(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        tenant = self._tenant(request.tenant)
        await self._key(tenant, request.name)
        after = dt.timedelta(seconds=request.after_seconds)
        info = await self._keys.schedule_destroy(tenant, request.name, after)
        current_call().details["destroy_after"] = str(info.record.destroy_after)
        return _info(info)

    async def CancelDestroy(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        tenant = self._tenant(request.tenant)
        await self._key(tenant, request.name)
        return _info(await self._keys.cancel_destroy(tenant, request.name))

    # -- use --------------------------------------------------------------------------------

    async def GenerateDataKey(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        tenant = self._tenant(request.tenant)
        ctx = self._context(request.context)
        info = await self._key(tenant, request.key)
        data_key = await self._keys.generate_data_key(info, ctx, request.key_bytes or 32)
        current_call().details["version"] = data_key.version
        return kms_pb2.GenerateDataKeyResponse(
            plaintext=data_key.plaintext,
            ciphertext=data_key.ciphertext,
            key_version=data_key.version,
        )

    async def Encrypt(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        tenant = self._tenant(request.tenant)
        ctx = self._context(request.context)
        info = await self._key(tenant, request.key)
        ciphertext, version = await self._keys.encrypt(info, bytes(request.plaintext), ctx)
        current_call().details["version"] = version
        return kms_pb2.EncryptResponse(ciphertext=ciphertext, key_version=version)

    async def Decrypt(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        call = current_call()
        tenant = self._tenant(request.tenant)
        ctx = self._context(request.context)
        blob = self._keys.parse(bytes(request.ciphertext), tenant, request.key)
        info = await self._key(tenant, blob.key, version=blob.version)
        call.details["version"] = blob.version
        plaintext, version = await self._keys.decrypt(info, blob, ctx)
        return kms_pb2.DecryptResponse(plaintext=plaintext, key=blob.key, key_version=version)

    async def ReEncrypt(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        call = current_call()
        tenant = self._tenant(request.tenant)
        ctx = self._context(request.context)
        destination_ctx = (
            self._context(request.destination_context, "destination_context_sha256")
            if request.destination_context
            else ctx
        )
        blob = self._keys.parse(bytes(request.ciphertext), tenant)
        source = await self._key(tenant, blob.key, version=blob.version)
        name = request.destination_key or blob.key
        destination = source
        if name != blob.key:
            call.details["destination_key"] = name
            destination = await self._key(tenant, name, Action.KMS_ENCRYPT)
        plaintext, before = await self._keys.decrypt(source, blob, ctx)
        ciphertext, after = await self._keys.encrypt(destination, plaintext, destination_ctx)
        call.details.update(from_version=before, to_version=after)
        return kms_pb2.EncryptResponse(ciphertext=ciphertext, key_version=after)

    async def Sign(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        tenant = self._tenant(request.tenant)
        message, digest = _input(request)
        info = await self._key(tenant, request.key)
        signature = await self._keys.sign(info, message, digest)
        current_call().details["version"] = signature.version
        return kms_pb2.SignResponse(signature=signature.signature, key_version=signature.version)

    async def Verify(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        tenant = self._tenant(request.tenant)
        message, digest = _input(request)
        info = await self._key(tenant, request.key, version=request.key_version or None)
        valid, version = await self._keys.verify(
            info, request.key_version or None, message, digest, bytes(request.signature)
        )
        current_call().details.update(version=version, valid=valid)
        return kms_pb2.VerifyResponse(valid=valid, key_version=version)

    async def GetPublicKey(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        tenant = self._tenant(request.tenant)
        info = await self._key(tenant, request.key, version=request.key_version or None)
        pem, version = await self._keys.public_key(info, request.key_version or None)
        return kms_pb2.GetPublicKeyResponse(
            public_key_pem=pem.decode(), key_version=version, key_type=info.record.key_type
        )

    async def Mac(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        tenant = self._tenant(request.tenant)
        info = await self._key(tenant, request.key)
        tag, version = await self._keys.mac(info, bytes(request.message))
        current_call().details["version"] = version
        return kms_pb2.MacResponse(mac=tag, key_version=version)

    async def VerifyMac(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        tenant = self._tenant(request.tenant)
        info = await self._key(tenant, request.key)
        valid, version = await self._keys.verify_mac(
            info, request.key_version or None, bytes(request.message), bytes(request.mac)
        )
        current_call().details.update(version=version, valid=valid)
        return kms_pb2.VerifyResponse(valid=valid, key_version=version)

    async def ComplianceReport(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        if self._reporter is None:
            raise FailedPrecondition("compliance reports are not configured on this broker")
        if request.window_seconds < 0 or request.window_seconds > 3650 * 86400:
            raise InvalidArgument("the window must be between 1 second and 10 years")
        window = dt.timedelta(seconds=request.window_seconds or 30 * 86400)
        tenant = request.tenant or None
        if tenant is not None:
            check_tenant(tenant)
        document = await self._reporter.build(tenant, window)
        current_call().details.update(
            credentials=document["summary"]["credentials"], overdue=document["summary"]["overdue"]
        )
        return kms_pb2.ComplianceReportResponse(document_json=json.dumps(document))


def binding(app: Application) -> ServiceBinding:
    return ServiceBinding(
        kms_pb2.DESCRIPTOR.services_by_name["Kms"],
        kms_pb2_grpc.add_KmsServicer_to_server,
        KmsServicer(app.kms, app.compliance),
        KMS_SPECS,
    )
