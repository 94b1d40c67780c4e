"""What a feature declares to the server: one `ServiceBinding` per gRPC service and one
`MethodSpec` per RPC (how the request pipeline treats it).

A leaf module (no servicer, no pipeline): feature servicer modules import it to describe
their RPCs, and `services.py` collects their bindings.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from google.protobuf.descriptor import ServiceDescriptor

__all__ = ["MethodSpec", "ServiceBinding"]


@dataclass(frozen=True)
class MethodSpec:
    """How the pipeline treats one RPC: its action name, how to name the resource from the
    request, and whether it is written to the audit ledger.

    `deferred=True` moves the policy decision into the domain, for resources whose attributes
    (owner, tenant, environment, classification) must be loaded first: the pipeline does not
    decide at admission; the servicer passes `current_call().authorize` (the `Authorize` port,
    `broker.policy`) into its one domain call, which loads the resource and calls it with the
    resource's name and attributes before touching anything (an absent resource is decided as
    one nobody owns, then answered as a refusal). A deferred RPC that returns without
    `authorize` having been called fails closed.
    """

    action: str
    resource: Callable[[Any], str] = lambda _request: ""
    audited: bool = True
    deferred: bool = False
    # Admitted without a client certificate (attestation: the credential is in the request).
    # The caller is then "bootstrap:<peer host>", rate limited per host and audited as such.
    bootstrap: bool = False


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
