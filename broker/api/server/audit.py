"""The Audit service: verify the ledger, sign a checkpoint, read its newest entries."""

from __future__ import annotations

from typing import TYPE_CHECKING

import grpc

from broker.audit import AuditLedger, parse_checkpoint
from broker.errors import InvalidArgument
from broker.policy import Action

from .._proto import audit_pb2, audit_pb2_grpc
from .binding import MethodSpec, ServiceBinding
from .pipeline import current_call

if TYPE_CHECKING:
    from broker.app import Application

__all__ = ["AUDIT_SPECS", "AuditServicer", "binding"]

_AUDIT = "/broker.v1.Audit/"
AUDIT_SPECS: dict[str, MethodSpec] = {
    _AUDIT + "Verify": MethodSpec(Action.AUDIT_VERIFY),
    _AUDIT + "Tail": MethodSpec(Action.AUDIT_READ),
    _AUDIT + "Checkpoint": MethodSpec(Action.AUDIT_CHECKPOINT),
}


class AuditServicer(audit_pb2_grpc.AuditServicer):  # type: ignore[misc]
    def __init__(self, ledger: AuditLedger) -> None:
        self._ledger = ledger

    async def Verify(
        self, request: audit_pb2.VerifyAuditRequest, context: grpc.aio.ServicerContext
    ) -> audit_pb2.VerifyAuditResponse:
        checkpoint = None
        if request.checkpoint_json:
            checkpoint = parse_checkpoint(request.checkpoint_json)  # InvalidArgument if bad
        result = await self._ledger.verify(checkpoint=checkpoint)
        return audit_pb2.VerifyAuditResponse(
            intact=result.intact,
            entries=result.entries,
            first_broken_seq=result.first_broken_seq,
            reason=result.reason,
            notes=list(result.notes),
        )

    async def Checkpoint(
        self, request: audit_pb2.CheckpointRequest, context: grpc.aio.ServicerContext
    ) -> audit_pb2.CheckpointResponse:
        checkpoint = None if request.fresh else await self._ledger.latest_checkpoint()
        if checkpoint is None:
            checkpoint = await self._ledger.make_checkpoint()
        current_call().details.update(checkpoint_seq=checkpoint.seq)
        return audit_pb2.CheckpointResponse(checkpoint_json=checkpoint.to_json())

    async def Tail(
        self, request: audit_pb2.TailAuditRequest, context: grpc.aio.ServicerContext
    ) -> audit_pb2.TailAuditResponse:
        limit = request.limit or 20
        if not 0 < limit <= 1000:
            raise InvalidArgument("limit must be between 1 and 1000")
        records = await self._ledger.tail(limit)
        return audit_pb2.TailAuditResponse(
            entries=[
                audit_pb2.AuditEntry(seq=r.seq, event_json=r.event, entry_hash=r.entry_hash.hex())
                for r in records
            ]
        )


def binding(app: Application) -> ServiceBinding:
    return ServiceBinding(
        audit_pb2.DESCRIPTOR.services_by_name["Audit"],
        audit_pb2_grpc.add_AuditServicer_to_server,
        AuditServicer(app.ledger),
        AUDIT_SPECS,
    )
