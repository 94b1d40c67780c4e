"""Client for grpc.health.v1.Health: `HealthClient.check` asks the broker whether it serves
(`broker health`, the container's HEALTHCHECK)."""

from __future__ import annotations

from grpc_health.v1 import health_pb2, health_pb2_grpc

from .base import ClientError, FeatureClient, Transport

__all__ = ["HealthClient"]


class HealthClient(FeatureClient):
    def __init__(self, transport: Transport) -> None:
        super().__init__(transport)
        self._stub = health_pb2_grpc.HealthStub(transport.channel)

    def check(self, service: str = "") -> str:
        """The serving status of `service` ("" is the broker as a whole): "SERVING",
        "NOT_SERVING", ...; raises `ClientError` when the broker cannot be reached."""
        try:
            response = self._call(self._stub.Check, health_pb2.HealthCheckRequest(service=service))
        except ClientError as exc:
            if exc.code_name == "NOT_FOUND":  # the standard answer for a service it never had
                raise ClientError(
                    "NOT_FOUND",
                    f"the broker reports no health status for service {service!r} (check '' "
                    "for the broker, or one of its services, e.g. broker.v1.CertificateAuthority)",
                    details=exc.details,
                    answered=exc.answered,
                ) from None
            raise
        return str(health_pb2.HealthCheckResponse.ServingStatus.Name(response.status))
