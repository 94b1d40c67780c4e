"""The CLI's seam to the broker: every client the commands use, behind one `Clients` protocol.

This is the ONLY module of `broker.cli` that imports from `broker.api` (the client SDK): the
commands get their clients from the click context (`broker.cli.options.clients`), so unit tests
hand in fakes (tests/unit/broker/cli/fakes.py) and the client package can move without touching
a command. The record types re-exported here are the clients' dataclasses; the CLI renders them
to JSON with one generic function (`broker.cli.render.record_json`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Protocol

from broker.api.client.access import (
    AccessClient,
    ApprovalView,
    BreakGlassView,
    GrantView,
    RegoPolicy,
)
from broker.api.client.base import (
    X509SVID,
    AuditEntry,
    AuditVerification,
    Authority,
    BrokerClient,
    Bundle,
    CAPolicyDocument,
    CAStatusReport,
    ClientCredentials,
    ClientError,
    MintedJWTSVID,
    RotateResult,
)
from broker.api.client.database import Connection, DatabaseClient, Lease, Role
from broker.api.client.health import HealthClient
from broker.api.client.identity import Attestor, Entry, IdentityClient
from broker.api.client.operators import (
    OperatorsClient,
    OperatorSession,
    login,
    login_config,
)
from broker.api.client.sdk import SecretRefused, SecretResolver, SecretUnavailable
from broker.api.client.secrets import (
    BrokerSecretSource,
    KekRotationResult,
    SecretDetails,
    SecretMeta,
    SecretsClient,
)

__all__ = [
    "X509SVID",
    "AccessClient",
    "ApprovalView",
    "Attestor",
    "AuditClient",
    "AuditEntry",
    "AuditVerification",
    "Authority",
    "BreakGlassView",
    "BrokerAPI",
    "BrokerSecretSource",
    "Bundle",
    "CAClient",
    "CAPolicyDocument",
    "CAStatusReport",
    "ClientCredentials",
    "ClientError",
    "Clients",
    "Connection",
    "ConnectionSettings",
    "DatabaseClient",
    "Entry",
    "GrantView",
    "GrpcClients",
    "HealthClient",
    "IdentityClient",
    "KekRotationResult",
    "Lease",
    "MintedJWTSVID",
    "OperatorSession",
    "OperatorsClient",
    "RegoPolicy",
    "Role",
    "RotateResult",
    "SecretDetails",
    "SecretMeta",
    "SecretRefused",
    "SecretResolver",
    "SecretUnavailable",
    "SecretsClient",
    "login",
    "login_config",
    "run_agent",
]


@dataclass(frozen=True)
class ConnectionSettings:
    """Where and as whom a client command connects (built from the connection options)."""

    server: str
    credentials: ClientCredentials
    justification: str | None = None


class CAClient(Protocol):
    """What the CLI needs of the CA API (`BrokerClient`)."""

    def mint_x509(
        self,
        spiffe_id: str,
        ttl_seconds: int | None = None,
        csr: bytes | None = None,
        dns_names: Sequence[str] = (),
        key_type: str = "",
    ) -> X509SVID: ...

    def mint_jwt(
        self, spiffe_id: str, audience: Sequence[str], ttl_seconds: int | None = None
    ) -> MintedJWTSVID: ...

    def bundle(self) -> Bundle: ...

    def status(self) -> CAStatusReport: ...

    def rotate(self, force: bool = False) -> RotateResult: ...

    def get_policy(self) -> CAPolicyDocument: ...

    def set_policy(self, document_json: str) -> int: ...


class AuditClient(Protocol):
    """What the CLI needs of the audit API (`BrokerClient`)."""

    def audit_verify(self, checkpoint_json: str = "") -> AuditVerification: ...

    def audit_checkpoint(self, fresh: bool = False) -> str: ...

    def audit_tail(self, limit: int = 20) -> list[AuditEntry]: ...


class BrokerAPI(CAClient, AuditClient, Protocol):
    """The CA and audit client in one (what `BrokerClient` is)."""

    def close(self) -> None: ...


class Clients(Protocol):
    """Every client a command may use, for one connection. Built by `CliContext.connect`
    from the connection options when a command first asks (`broker.cli.options.clients`);
    closed by the root group when the command ends."""

    @property
    def ca(self) -> CAClient: ...

    @property
    def audit(self) -> AuditClient: ...

    @property
    def identity(self) -> IdentityClient: ...

    @property
    def database(self) -> DatabaseClient: ...

    @property
    def secrets(self) -> SecretsClient: ...

    @property
    def access(self) -> AccessClient: ...

    @property
    def operators(self) -> OperatorsClient: ...

    @property
    def health(self) -> HealthClient: ...

    def close(self) -> None: ...


class GrpcClients:
    """The real `Clients`: one mTLS channel (`BrokerClient`), the feature clients on it built
    when first used."""

    def __init__(self, settings: ConnectionSettings) -> None:
        self._broker = BrokerClient(
            settings.server, settings.credentials, justification=settings.justification
        )

    @property
    def ca(self) -> CAClient:
        return self._broker

    @property
    def audit(self) -> AuditClient:
        return self._broker

    @cached_property
    def identity(self) -> IdentityClient:
        return IdentityClient(self._broker)

    @cached_property
    def database(self) -> DatabaseClient:
        return DatabaseClient(self._broker)

    @cached_property
    def secrets(self) -> SecretsClient:
        return SecretsClient(self._broker)

    @cached_property
    def access(self) -> AccessClient:
        return AccessClient(self._broker)

    @cached_property
    def operators(self) -> OperatorsClient:
        return OperatorsClient(self._broker)

    @cached_property
    def health(self) -> HealthClient:
        return HealthClient(self._broker)

    def close(self) -> None:
        self._broker.close()


def run_agent(
    *,
    server: str,
    attest_server: str,
    bundle_pem: bytes,
    socket_path: Path,
    join_token: str | None,
    jwt: str | None,
    write_dir: Path | None,
    on_rotate: str | None,
    sync_interval: float,
    secrets: Mapping[str, str],
    secret_interval: float,
) -> None:
    """Run the agent (`broker agent`) until it is stopped; imported only when it runs."""
    from broker.api.workload import AgentOptions
    from broker.api.workload import run_agent as run

    run(
        AgentOptions(
            server=server,
            attest_server=attest_server,
            bundle_pem=bundle_pem,
            socket_path=socket_path,
            join_token=join_token,
            jwt=jwt,
            write_dir=write_dir,
            on_rotate=on_rotate,
            sync_interval=sync_interval,
            secrets=dict(secrets),
            secret_interval=secret_interval,
        )
    )
