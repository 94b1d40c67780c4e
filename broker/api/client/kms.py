"""A synchronous client for the Kms service, over a `BrokerClient`'s mTLS channel.

Every method returns plain Python values; failures raise `broker.api.client.base.ClientError`.
`BrokerDataKeySource` adapts it to the grpc-free SDK (`broker.kms.sdk.KmsEnvelope`, with its
local data-key cache bounded in uses and age).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from broker.api._proto import kms_pb2, kms_pb2_grpc
from broker.api.client.base import FeatureClient, Transport
from broker.api.timestamps import optional_datetime

__all__ = [
    "BrokerDataKeySource",
    "KeyDetails",
    "KeyMeta",
    "KeyVersionView",
    "KmsClient",
]


@dataclass(frozen=True)
class KeyMeta:
    tenant: str
    name: str
    purpose: str
    key_type: str
    owner: str
    environment: str
    classification: str
    rotation_period_seconds: int
    state: str
    current_version: int
    created_at: datetime | None
    last_rotated: datetime | None
    rotation_due: datetime | None
    destroy_after: datetime | None


@dataclass(frozen=True)
class KeyVersionView:
    version: int
    state: str
    created_at: datetime | None
    destroyed_at: datetime | None


@dataclass(frozen=True)
class KeyDetails:
    metadata: KeyMeta
    versions: tuple[KeyVersionView, ...]


def _meta(m: Any) -> KeyMeta:
    return KeyMeta(
        tenant=m.tenant,
        name=m.name,
        purpose=m.purpose,
        key_type=m.key_type,
        owner=m.owner,
        environment=m.environment,
        classification=m.classification,
        rotation_period_seconds=m.rotation_period_seconds,
        state=m.state,
        current_version=m.current_version,
        created_at=optional_datetime(m, "created_at"),
        last_rotated=optional_datetime(m, "last_rotated"),
        rotation_due=optional_datetime(m, "rotation_due"),
        destroy_after=optional_datetime(m, "destroy_after"),
    )


def _details(info: Any) -> KeyDetails:
    return KeyDetails(
        _meta(info.metadata),
        tuple(
            KeyVersionView(
                v.version,
                v.state,
                optional_datetime(v, "created_at"),
                optional_datetime(v, "destroyed_at"),
            )
            for v in info.versions
        ),
    )


def _input(message: bytes | None, digest: bytes | None) -> dict[str, bytes]:
    return {"message": message} if message is not None else {"digest": digest or b""}


class KmsClient(FeatureClient):
    def __init__(self, transport: Transport) -> None:
        super().__init__(transport)
        self._stub = kms_pb2_grpc.KmsStub(transport.channel)

    # -- administration (operators) ---------------------------------------------------------

    def create_key(
        self,
        name: str,
        *,
        purpose: str,
        key_type: str,
        owner: str,
        environment: str,
        classification: str,
        rotation_period_seconds: int,
        tenant: str = "",
    ) -> KeyDetails:
        request = kms_pb2.CreateKeyRequest(
            tenant=tenant,
            name=name,
            purpose=purpose,
            key_type=key_type,
            owner=owner,
            environment=environment,
            classification=classification,
            rotation_period_seconds=rotation_period_seconds,
        )
        return _details(self._call(self._stub.CreateKey, request))

    def list_keys(self, *, tenant: str = "") -> list[KeyMeta]:
        response = self._call(self._stub.ListKeys, kms_pb2.ListKeysRequest(tenant=tenant))
        return [_meta(m) for m in response.keys]

    def _key_call(self, method: Any, name: str, tenant: str) -> KeyDetails:
        return _details(self._call(method, kms_pb2.KeyRequest(tenant=tenant, name=name)))

    def show_key(self, name: str, *, tenant: str = "") -> KeyDetails:
        return self._key_call(self._stub.ShowKey, name, tenant)

    def rotate_key(self, name: str, *, tenant: str = "") -> KeyDetails:
        return self._key_call(self._stub.RotateKey, name, tenant)

    def disable_key(self, name: str, *, tenant: str = "") -> KeyDetails:
        return self._key_call(self._stub.DisableKey, name, tenant)

    def enable_key(self, name: str, *, tenant: str = "") -> KeyDetails:
        return self._key_call(self._stub.EnableKey, name, tenant)

    def schedule_destroy(self, name: str, *, after_seconds: int, tenant: str = "") -> KeyDetails:
        request = kms_pb2.ScheduleDestroyRequest(
            tenant=tenant, name=name, after_seconds=after_seconds
        )
        return _details(self._call(self._stub.ScheduleDestroy, request))

    def cancel_destroy(self, name: str, *, tenant: str = "") -> KeyDetails:
        return self._key_call(self._stub.CancelDestroy, name, tenant)

    # -- use (services) ---------------------------------------------------------------------

    def generate_data_key(
        self, key: str, context: Mapping[str, str], *, key_bytes: int = 32, tenant: str = ""
    ) -> tuple[bytes, bytes, int]:
        """(plaintext data key, its ciphertext, key version)."""
        response = self._call(
            self._stub.GenerateDataKey,
            kms_pb2.GenerateDataKeyRequest(
                tenant=tenant, key=key, context=dict(context), key_bytes=key_bytes
            ),
        )
        return bytes(response.plaintext), bytes(response.ciphertext), response.key_version

    def encrypt(
        self, key: str, plaintext: bytes, context: Mapping[str, str], *, tenant: str = ""
    ) -> bytes:
        response = self._call(
            self._stub.Encrypt,
            kms_pb2.EncryptRequest(
                tenant=tenant, key=key, plaintext=plaintext, context=dict(context)
            ),
        )
        return bytes(response.ciphertext)

    def decrypt(
        self, ciphertext: bytes, context: Mapping[str, str], *, key: str = "", tenant: str = ""
    ) -> bytes:
        response = self._call(
            self._stub.Decrypt,
            kms_pb2.DecryptRequest(
                tenant=tenant, ciphertext=ciphertext, context=dict(context), key=key
            ),
        )
        return bytes(response.plaintext)

    def reencrypt(
        self,
        ciphertext: bytes,
        context: Mapping[str, str],
        *,
        destination_key: str = "",
        destination_context: Mapping[str, str] | None = None,
        tenant: str = "",
    ) -> tuple[bytes, int]:
        response = self._call(
            self._stub.ReEncrypt,
            kms_pb2.ReEncryptRequest(
                tenant=tenant,
                ciphertext=ciphertext,
                context=dict(context),
                destination_key=destination_key,
                destination_context=dict(destination_context or {}),
            ),
        )
        return bytes(response.ciphertext), response.key_version

    def sign(
        self,
        key: str,
        *,
        message: bytes | None = None,
        digest: bytes | None = None,
        tenant: str = "",
    ) -> tuple[bytes, int]:
        response = self._call(
            self._stub.Sign,
            kms_pb2.SignRequest(tenant=tenant, key=key, **_input(message, digest)),
        )
        return bytes(response.signature), response.key_version

    def verify(
        self,
        key: str,
        signature: bytes,
        *,
        message: bytes | None = None,
        digest: bytes | None = None,
        version: int = 0,
        tenant: str = "",
    ) -> bool:
        response = self._call(
            self._stub.Verify,
            kms_pb2.VerifyRequest(
                tenant=tenant,
                key=key,
                key_version=version,
                signature=signature,
                **_input(message, digest),
            ),
        )
        return bool(response.valid)

    def public_key(self, key: str, *, version: int = 0, tenant: str = "") -> tuple[str, int]:
        response = self._call(
            self._stub.GetPublicKey,
            kms_pb2.GetPublicKeyRequest(tenant=tenant, key=key, key_version=version),
        )
        return response.public_key_pem, response.key_version

    def compliance_report(self, *, tenant: str = "", window_seconds: int = 0) -> dict[str, Any]:
        """The report document (see `broker.kms.report`)."""
        response = self._call(
            self._stub.ComplianceReport,
            kms_pb2.ComplianceReportRequest(tenant=tenant, window_seconds=window_seconds),
        )
        document: dict[str, Any] = json.loads(response.document_json)
        return document


class BrokerDataKeySource:
    """`broker.kms.sdk.DataKeySource` over a `KmsClient`."""

    def __init__(self, client: KmsClient, *, tenant: str = "") -> None:
        self._client = client
        self._tenant = tenant

    def generate_data_key(self, key: str, context: Mapping[str, str]) -> tuple[bytes, bytes]:
        plaintext, ciphertext, _ = self._client.generate_data_key(key, context, tenant=self._tenant)
        return plaintext, ciphertext

    def decrypt_data_key(self, ciphertext: bytes, context: Mapping[str, str]) -> bytes:
        return self._client.decrypt(ciphertext, context, tenant=self._tenant)
