"""The CLI's seam to the broker: every client the commands use, behind one `Clients` protocol.

This is the ONLY module of `broker.cli` that imports from `broker.api` (the client SDK): the
commands get their clients from the click context (`broker.cli.options.clients`), so unit tests
hand in fakes (tests/unit/broker/cli/fakes.py) and the client package can move without touching
a command. The record types re-exported here are the clients' dataclasses; the CLI renders them
to JSON with one generic function (`broker.cli.render.record_json`).
"""

from __future__ import annotations

from collections.abc import Mapping
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
from broker.api.client.audit import AuditClient, AuditEntry, AuditVerification
from broker.api.client.base import BrokerClient, ClientCredentials, ClientError
from broker.api.client.ca import (
    X509SVID,
    Authority,
    Bundle,
    CAClient,
    CAPolicyDocument,
    CAStatusReport,
    MintedJWTSVID,
    RotateResult,
)
from broker.api.client.database import Connection, DatabaseClient, Lease, Role
from broker.api.client.health import HealthClient
from broker.api.client.identity import Attestor, Entry, IdentityClient
from broker.api.client.kms import KeyDetails, KeyMeta, KeyVersionView, KmsClient
from broker.api.client.operators import (
    OperatorsClient,
    OperatorSession,
    login,
    login_config,
)
from broker.api.client.revocation import RevocationClient, RevocationResult, RevokedObject
from broker.api.client.rollout import (
    RolloutConsumerView,
    RolloutReport,
    RolloutsClient,
    RolloutView,
)
from broker.api.client.scan import ScanClient
from broker.api.client.sdk import SecretRefused, SecretResolver, SecretUnavailable
from broker.api.client.secrets import (
    BrokerSecretSource,
    KekRotationResult,
    SecretDetails,
    SecretMeta,
    SecretsClient,
)
from broker.api.client.static_roles import StaticCreds, StaticRole, StaticRolesClient

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
    "KeyDetails",
    "KeyMeta",
    "KeyVersionView",
    "KmsClient",
    "Lease",
    "MintedJWTSVID",
    "OperatorSession",
    "OperatorsClient",
    "RegoPolicy",
    "RevocationClient",
    "RevocationResult",
    "RevokedObject",
    "Role",
    "RolloutConsumerView",
    "RolloutReport",
    "RolloutView",
    "RolloutsClient",
    "RotateResult",
    "ScanClient",
    "SecretDetails",
    "SecretMeta",
    "SecretRefused",
    "SecretResolver",
    "SecretUnavailable",
    "SecretsClient",
    "StaticCreds",
    "StaticRole",
    "StaticRolesClient",
    "agent_health",
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
    server_name: str | None = None  # --tls-server-name: the name the broker's cert must have


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
    def static_roles(self) -> StaticRolesClient: ...

    @property
    def revocation(self) -> RevocationClient: ...

    @property
    def access(self) -> AccessClient: ...

    @property
    def operators(self) -> OperatorsClient: ...

    @property
    def kms(self) -> KmsClient: ...

    @property
    def scan(self) -> ScanClient: ...

    @property
    def health(self) -> HealthClient: ...

    @property
    def rollouts(self) -> RolloutsClient: ...

    def close(self) -> None: ...


class GrpcClients:
    """The real `Clients`: one mTLS channel (`BrokerClient`), the feature clients on it built
    when first used."""

    def __init__(self, settings: ConnectionSettings) -> None:
        self._broker = BrokerClient(
            settings.server,
            settings.credentials,
            justification=settings.justification,
            server_name=settings.server_name,
        )

    @cached_property
    def ca(self) -> CAClient:
        return CAClient(self._broker)

    @cached_property
    def audit(self) -> AuditClient:
        return AuditClient(self._broker)

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
    def static_roles(self) -> StaticRolesClient:
        return StaticRolesClient(self._broker)

    @cached_property
    def revocation(self) -> RevocationClient:
        return RevocationClient(self._broker)

    @cached_property
    def access(self) -> AccessClient:
        return AccessClient(self._broker)

    @cached_property
    def operators(self) -> OperatorsClient:
        return OperatorsClient(self._broker)

    @cached_property
    def kms(self) -> KmsClient:
        return KmsClient(self._broker)

    @cached_property
    def scan(self) -> ScanClient:
        return ScanClient(self._broker)

    @cached_property
    def health(self) -> HealthClient:
        return HealthClient(self._broker)

    @cached_property
    def rollouts(self) -> RolloutsClient:
        return RolloutsClient(self._broker)

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
    health_socket: Path | None = None,
    trust_store: Path | None = None,
    bundle_mtime: float = 0.0,
    health_check: str | None = None,
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
            health_socket=health_socket,
            trust_store=trust_store,
            bundle_mtime=bundle_mtime,
            health_check=health_check,
        )
    )


def agent_health(path: Path) -> dict[str, object]:
    """What a running agent says on its health socket (`broker agent status`)."""
    from broker.agenthealth import read_health

    return read_health(path)
