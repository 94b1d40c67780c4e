"""Client for staged rollouts (`broker.v1.Rollouts`): the operator's start, status, promote
and abort, and a consumer's report. Plain dataclasses out; failures raise `ClientError`."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any

from broker.api._proto import rollout_pb2, rollout_pb2_grpc
from broker.api.timestamps import optional_datetime

from .base import FeatureClient, Transport

__all__ = [
    "BrokerRolloutReporter",
    "RolloutConsumerView",
    "RolloutReport",
    "RolloutView",
    "RolloutsClient",
]


@dataclass(frozen=True)
class RolloutConsumerView:
    identity: str
    stage: int  # 1-based
    served_version: int  # 0: not read during the rollout
    reported_version: int  # 0: no report
    health: str  # healthy, unhealthy or "" (no report)
    detail: str
    read_at: datetime | None
    reported_at: datetime | None


@dataclass(frozen=True)
class RolloutView:
    id: str
    tenant: str
    reference: str
    reference_sha256: str
    from_version: int
    to_version: int
    state: str
    stages: tuple[int, ...]
    stage: int  # 1-based
    stage_opened_at: datetime | None
    bake_ends: datetime | None
    bake_seconds: int
    max_failures: int
    failures: int
    health_check: str
    check: str
    check_detail: str
    started_at: datetime | None
    finished_at: datetime | None
    reason: str
    started_by: str
    ticket: str
    approver: str
    healthy: bool
    health_reason: str
    consumers: tuple[RolloutConsumerView, ...]


@dataclass(frozen=True)
class RolloutReport:
    tracked: bool  # False: no rollout of the secret is running; the report was ignored
    rollout_id: str
    state: str


def _view(m: Any) -> RolloutView:
    return RolloutView(
        id=m.id,
        tenant=m.tenant,
        reference=m.reference,
        reference_sha256=m.reference_sha256,
        from_version=m.from_version,
        to_version=m.to_version,
        state=m.state,
        stages=tuple(m.stages),
        stage=m.stage,
        stage_opened_at=optional_datetime(m, "stage_opened_at"),
        bake_ends=optional_datetime(m, "bake_ends"),
        bake_seconds=m.bake_seconds,
        max_failures=m.max_failures,
        failures=m.failures,
        health_check=m.health_check,
        check=m.check,
        check_detail=m.check_detail,
        started_at=optional_datetime(m, "started_at"),
        finished_at=optional_datetime(m, "finished_at"),
        reason=m.reason,
        started_by=m.started_by,
        ticket=m.ticket,
        approver=m.approver,
        healthy=m.healthy,
        health_reason=m.health_reason,
        consumers=tuple(
            RolloutConsumerView(
                c.identity,
                c.stage,
                c.served_version,
                c.reported_version,
                c.health,
                c.detail,
                optional_datetime(c, "read_at"),
                optional_datetime(c, "reported_at"),
            )
            for c in m.consumers
        ),
    )


class RolloutsClient(FeatureClient):
    def __init__(self, transport: Transport) -> None:
        super().__init__(transport)
        self._stub = rollout_pb2_grpc.RolloutsStub(transport.channel)

    def start(
        self,
        reference: str,
        *,
        environment: str,
        ticket: str,
        justification: str,
        stages: list[int],
        bake_seconds: int,
        max_failures: int = 0,
        health_check: str = "",
        value: bytes | None = None,
        generate_length: int | None = None,
        tenant: str = "",
    ) -> RolloutView:
        source: dict[str, Any] = {}
        if value is not None:
            source["value"] = value
        elif generate_length is not None:
            source["generate_length"] = generate_length
        request = rollout_pb2.StartRolloutRequest(
            tenant=tenant,
            reference=reference,
            environment=environment,
            ticket=ticket,
            justification=justification,
            stages=stages,
            bake_seconds=bake_seconds,
            max_failures=max_failures,
            health_check=health_check,
            **source,
        )
        return _view(self._call(self._stub.Start, request))

    def status(self, reference: str, *, tenant: str = "") -> RolloutView:
        request = rollout_pb2.RolloutRequest(tenant=tenant, reference=reference)
        return _view(self._call(self._stub.Status, request))

    def promote(self, reference: str, *, tenant: str = "") -> RolloutView:
        request = rollout_pb2.RolloutRequest(tenant=tenant, reference=reference)
        return _view(self._call(self._stub.Promote, request))

    def abort(self, reference: str, *, tenant: str = "") -> RolloutView:
        request = rollout_pb2.RolloutRequest(tenant=tenant, reference=reference)
        return _view(self._call(self._stub.Abort, request))

    def report(
        self, reference: str, *, version: int, healthy: bool, detail: str = "", tenant: str = ""
    ) -> RolloutReport:
        """A consumer's report: the version it serves, and whether its health check passes."""
        request = rollout_pb2.ReportRolloutRequest(
            tenant=tenant, reference=reference, version=version, healthy=healthy, detail=detail
        )
        response = self._call(self._stub.Report, request)
        return RolloutReport(response.tracked, response.rollout_id, response.state)


class BrokerRolloutReporter:
    """A consumer's reports (`broker.rollout.consumer.RolloutReporter`, and the SDK's
    `SecretResolver(reporter=...)`) over a `RolloutsClient`."""

    def __init__(self, client: RolloutsClient, *, tenant: str = "") -> None:
        self._client = client
        self._tenant = tenant

    def report(self, reference: str, version: int, healthy: bool, detail: str = "") -> bool:
        answer = self._client.report(
            reference, version=version, healthy=healthy, detail=detail, tenant=self._tenant
        )
        return answer.tracked and answer.state == "running"
