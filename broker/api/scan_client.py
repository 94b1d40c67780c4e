"""A synchronous client for the Scan service (fingerprints for `broker scan`)."""

from __future__ import annotations

from typing import Any

from broker.api._proto import scan_pb2, scan_pb2_grpc
from broker.scan.fingerprints import Fingerprint, ScanKeySet

__all__ = ["ScanClient"]


class ScanClient:
    def __init__(self, transport: Any) -> None:
        self._t = transport
        self._stub = scan_pb2_grpc.ScanStub(transport.channel)

    def fingerprints(self, *, tenant: str = "", prefix: str = "") -> ScanKeySet:
        """A per-scan key and the fingerprints of the tenant's distributable secret versions;
        raises `broker.api.client.ClientError`."""
        reply = self._t.call(
            self._stub.Fingerprints, scan_pb2.FingerprintsRequest(tenant=tenant, prefix=prefix)
        )
        return ScanKeySet(
            reply.scan_id,
            bytes(reply.scan_key),
            tuple(
                Fingerprint(f.reference, f.version, bytes(f.digest), f.length)
                for f in reply.fingerprints
            ),
        )
