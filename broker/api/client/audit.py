"""A synchronous client for the Audit service (verify the ledger, its signed checkpoint, the
newest entries), over a `BrokerClient`'s mTLS channel. Every method returns plain Python
values; failures raise `broker.api.client.base.ClientError`."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from broker.api._proto import audit_pb2, audit_pb2_grpc

from .base import FeatureClient, Transport

__all__ = ["AUDIT_VERIFY_TIMEOUT_SECONDS", "AuditClient", "AuditEntry", "AuditVerification"]

# `broker audit verify` walks the whole ledger: ~36 s for a million entries on the project's
# loaded 2-core machine (`python -m loadtests preload`), so the usual 30 s would refuse a
# ledger of that size with "timed out" although nothing is wrong.
AUDIT_VERIFY_TIMEOUT_SECONDS = 3600.0


@dataclass(frozen=True)
class AuditVerification:
    intact: bool
    entries: int
    first_broken_seq: int
    reason: str
    notes: tuple[str, ...] = ()


@dataclass(frozen=True)
class AuditEntry:
    seq: int
    event: dict[str, Any]
    event_json: str
    entry_hash: str


def _audit_entry(e: audit_pb2.AuditEntry) -> AuditEntry:
    try:
        event = json.loads(e.event_json) if e.event_json else {}
    except json.JSONDecodeError:
        event = {}
    if not isinstance(event, dict):
        event = {"event": event}
    return AuditEntry(seq=e.seq, event=event, event_json=e.event_json, entry_hash=e.entry_hash)


class AuditClient(FeatureClient):
    def __init__(self, transport: Transport) -> None:
        super().__init__(transport)
        self._stub = audit_pb2_grpc.AuditStub(transport.channel)

    def audit_verify(self, checkpoint_json: str = "") -> AuditVerification:
        response: audit_pb2.VerifyAuditResponse = self._call(
            self._stub.Verify,
            audit_pb2.VerifyAuditRequest(checkpoint_json=checkpoint_json),
            timeout=AUDIT_VERIFY_TIMEOUT_SECONDS,
        )
        return AuditVerification(
            intact=response.intact,
            entries=response.entries,
            first_broken_seq=response.first_broken_seq,
            reason=response.reason,
            notes=tuple(response.notes),
        )

    def audit_checkpoint(self, fresh: bool = False) -> str:
        """The latest signed ledger checkpoint as JSON (made now if none, or if `fresh`)."""
        response: audit_pb2.CheckpointResponse = self._call(
            self._stub.Checkpoint, audit_pb2.CheckpointRequest(fresh=fresh)
        )
        return str(response.checkpoint_json)

    def audit_tail(self, limit: int = 20) -> list[AuditEntry]:
        """The newest `limit` entries, oldest first."""
        response: audit_pb2.TailAuditResponse = self._call(
            self._stub.Tail, audit_pb2.TailAuditRequest(limit=limit)
        )
        return [_audit_entry(e) for e in response.entries]
