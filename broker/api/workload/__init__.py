"""The agent's side of the API: the SPIFFE Workload API on a Unix socket (`endpoint`), the
SO_PEERCRED plumbing that names its callers (`peercred`) and the `broker agent` process
(`main`). It uses the broker's clients (`broker.api.client`) and never imports the server."""

from .endpoint import WorkloadAPIServicer, WorkloadEndpoint, serve_workload_api
from .main import AgentOptions, pinned_roots, run_agent
from .peercred import PeerInfo, PeerRegistry, selectors_of

__all__ = [
    "AgentOptions",
    "PeerInfo",
    "PeerRegistry",
    "WorkloadAPIServicer",
    "WorkloadEndpoint",
    "pinned_roots",
    "run_agent",
    "selectors_of",
    "serve_workload_api",
]
