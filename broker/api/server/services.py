"""The gRPC services one broker process serves, and how the request pipeline treats each RPC.

Every feature contributes `ServiceBinding`s (`binding.py`): its service descriptor, the
generated `add_*Servicer_to_server` function, a servicer built from the `Application`, and one
`MethodSpec` per RPC. `start_server` refuses to start if any RPC of a bound service lacks a spec,
so a new RPC can never slip past the policy and the audit ledger.

To add a feature: write `broker/api/server/<feature>.py` with its servicer and a
`binding(app) -> ServiceBinding` function, and list it in `bindings_for` below.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from broker.policy import Action

from . import (
    access,
    audit,
    ca,
    database,
    identity,
    kms,
    operators,
    revocation,
    rollout,
    scan,
    secrets,
    static_roles,
)
from .binding import MethodSpec, ServiceBinding

if TYPE_CHECKING:
    from broker.app import Application
    from broker.authority import CAService

__all__ = ["INFRA_SPECS", "bindings_for", "method_specs"]

# Health checks and reflection: authenticated and authorized, not written to the ledger.
INFRA_SPECS: dict[str, MethodSpec] = {
    "/grpc.health.v1.Health/Check": MethodSpec(Action.HEALTH, audited=False),
    "/grpc.health.v1.Health/Watch": MethodSpec(Action.HEALTH, audited=False),
    "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo": MethodSpec(
        Action.REFLECTION, audited=False
    ),
    "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo": MethodSpec(
        Action.REFLECTION, audited=False
    ),
}


def bindings_for(app: Application, *, ca_service: CAService | None = None) -> list[ServiceBinding]:
    """Every service the broker serves, wired to `app`. `ca_service` replaces the CA (tests
    only)."""
    bindings = [ca.binding(app, ca_service), audit.binding(app)]
    # Features (one line each, in this order):
    bindings.append(identity.binding(app))
    bindings.append(secrets.binding(app))
    bindings.extend(database.binding(app))  # Database and Leases
    bindings.append(static_roles.binding(app))  # static database roles
    bindings.append(revocation.binding(app))  # revocation by person
    bindings.append(access.binding(app))  # Rego policy, grants, approvals, break-glass
    bindings.append(operators.binding(app))  # operator login, roles, registry
    bindings.append(kms.binding(app))  # KMS keys for services' own data (issue 16)
    bindings.append(scan.binding(app))  # leak-scan fingerprints
    bindings.append(rollout.binding(app))  # staged rollouts of secret versions (issue 12)
    return bindings


def method_specs(bindings: Sequence[ServiceBinding]) -> dict[str, MethodSpec]:
    """All specs of `bindings` plus health and reflection."""
    specs: dict[str, MethodSpec] = dict(INFRA_SPECS)
    for binding in bindings:
        overlap = specs.keys() & binding.specs.keys()
        assert not overlap, f"RPCs specified twice: {sorted(overlap)}"
        specs.update(binding.specs)
    return specs
