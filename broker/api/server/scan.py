"""The Scan service: keyed fingerprints of managed secret values for `broker scan`.

One RPC, `Fingerprints`, authorized as `secrets.scan` on the tenant (an operator action: the
fingerprints let their holder test guesses offline, see docs/developers.md). The audit event
records the tenant, the scan id and how many fingerprints were handed out; never a value.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import grpc

from broker.policy import Action
from broker.scan.fingerprints import FingerprintIssuer
from broker.secrets import SecretService

from .._proto import scan_pb2, scan_pb2_grpc
from .binding import MethodSpec, ServiceBinding
from .pipeline import current_call

if TYPE_CHECKING:
    from broker.app import Application

__all__ = ["SCAN_SPECS", "ScanServicer", "binding"]

SCAN_SPECS: dict[str, MethodSpec] = {
    "/broker.v1.Scan/Fingerprints": MethodSpec(Action.SECRETS_SCAN, lambda r: r.tenant),
}


class ScanServicer(scan_pb2_grpc.ScanServicer):  # type: ignore[misc]
    def __init__(self, issuer: FingerprintIssuer, secrets: SecretService) -> None:
        self._issuer = issuer
        self._secrets = secrets

    async def Fingerprints(
        self, request: scan_pb2.FingerprintsRequest, context: grpc.aio.ServicerContext
    ) -> scan_pb2.FingerprintsResponse:
        call = current_call()
        tenant = self._secrets.tenant_for(call.caller, request.tenant)
        keyset = await self._issuer.issue(tenant, request.prefix)
        call.details.update(
            tenant=tenant, scan_id=keyset.scan_id, fingerprints=len(keyset.fingerprints)
        )
        return scan_pb2.FingerprintsResponse(
            scan_id=keyset.scan_id,
            scan_key=keyset.key,
            tenant=tenant,
            fingerprints=[
                scan_pb2.SecretFingerprint(
                    reference=f.reference, version=f.version, digest=f.digest, length=f.length
                )
                for f in keyset.fingerprints
            ],
        )


def binding(app: Application) -> ServiceBinding:
    return ServiceBinding(
        scan_pb2.DESCRIPTOR.services_by_name["Scan"],
        scan_pb2_grpc.add_ScanServicer_to_server,
        ScanServicer(FingerprintIssuer(app.secrets, app.keys), app.secrets),
        SCAN_SPECS,
    )
