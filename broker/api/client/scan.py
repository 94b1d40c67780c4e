"""A synchronous client for the Scan service (fingerprints for `broker scan`), over a
`BrokerClient`'s mTLS channel; failures raise `broker.api.client.base.ClientError`."""

from __future__ import annotations

from broker.api._proto import scan_pb2, scan_pb2_grpc
from broker.api.client.base import FeatureClient, Transport
from broker.scan.fingerprints import Fingerprint, ScanKeySet

__all__ = ["ScanClient"]


class ScanClient(FeatureClient):
    def __init__(self, transport: Transport) -> None:
        super().__init__(transport)
        self._stub = scan_pb2_grpc.ScanStub(transport.channel)

    def fingerprints(self, *, tenant: str = "", prefix: str = "") -> ScanKeySet:
        """A per-scan key and the fingerprints of the tenant's distributable secret versions."""
        reply = self._call(
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
