"""Client for grpc.health.v1.Health: `HealthClient.check` asks the broker whether it serves
(`broker health`, the container's HEALTHCHECK)."""

from __future__ import annotations

from grpc_health.v1 import health_pb2, health_pb2_grpc

from .base import FeatureClient, Transport

__all__ = ["HealthClient"]


class HealthClient(FeatureClient):
    def __init__(self, transport: Transport) -> None:
        super().__init__(transport)
        self._stub = health_pb2_grpc.HealthStub(transport.channel)

    def check(self, service: str = "") -> str:
        """The serving status of `service` ("" is the broker as a whole): "SERVING",
        "NOT_SERVING", ...; raises `ClientError` when the broker cannot be reached."""
        response = self._call(self._stub.Check, health_pb2.HealthCheckRequest(service=service))
        return str(health_pb2.HealthCheckResponse.ServingStatus.Name(response.status))
