"""The gRPC services one broker process serves, and how the request pipeline treats each RPC.

Every feature contributes one `ServiceBinding`: its service descriptor, the generated
`add_*Servicer_to_server` function, a servicer built from the `Application`, and one
`MethodSpec` per RPC. `start_server` refuses to start if any RPC of a bound service lacks a spec,
so a new RPC can never slip past the policy and the audit ledger.

To add a feature: write `broker/api/<feature>.py` with its servicer and a
`binding(app) -> ServiceBinding` function, and list it in `bindings_for` below.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from google.protobuf.descriptor import ServiceDescriptor

from . import access, database, identity, operators, scan, secrets
from ._proto import audit_pb2, audit_pb2_grpc, ca_pb2, ca_pb2_grpc
from .interceptors import MethodSpec
from .servicers import (
    AUDIT_SPECS,
    CA_SPECS,
    INFRA_SPECS,
    AuditServicer,
    CertificateAuthorityServicer,
)

if TYPE_CHECKING:
    from broker.app import Application
    from broker.authority import CAService

__all__ = ["ServiceBinding", "bindings_for", "method_specs"]


@dataclass(frozen=True)
class ServiceBinding:
    service: ServiceDescriptor
    add_to_server: Callable[[Any, Any], None]
    servicer: Any
    specs: Mapping[str, MethodSpec]

    @property
    def full_name(self) -> str:
        return str(self.service.full_name)

    def missing_specs(self) -> set[str]:
        """RPCs of this service that have no MethodSpec."""
        return {f"/{self.full_name}/{m.name}" for m in self.service.methods} - self.specs.keys()


def bindings_for(app: Application, *, ca: CAService | None = None) -> list[ServiceBinding]:
    """Every service the broker serves, wired to `app`. `ca` replaces the CA (tests only)."""
    bindings = [
        ServiceBinding(
            ca_pb2.DESCRIPTOR.services_by_name["CertificateAuthority"],
            ca_pb2_grpc.add_CertificateAuthorityServicer_to_server,
            CertificateAuthorityServicer(ca if ca is not None else app.ca, app.authenticator),
            CA_SPECS,
        ),
        ServiceBinding(
            audit_pb2.DESCRIPTOR.services_by_name["Audit"],
            audit_pb2_grpc.add_AuditServicer_to_server,
            AuditServicer(app.ledger),
            AUDIT_SPECS,
        ),
    ]
    # Features (one line each, in this order):
    bindings.append(identity.binding(app))
    bindings.append(secrets.binding(app))
    bindings.extend(database.binding(app))  # Database and Leases
    bindings.append(access.binding(app))  # Rego policy, grants, approvals, break-glass
    bindings.append(operators.binding(app))  # operator login, roles, registry
    bindings.append(scan.binding(app))  # leak-scan fingerprints
    return bindings


def method_specs(bindings: Sequence[ServiceBinding]) -> dict[str, MethodSpec]:
    """All specs of `bindings` plus health and reflection."""
    specs: dict[str, MethodSpec] = dict(INFRA_SPECS)
    for binding in bindings:
        overlap = specs.keys() & binding.specs.keys()
        assert not overlap, f"RPCs specified twice: {sorted(overlap)}"
        specs.update(binding.specs)
    return specs
