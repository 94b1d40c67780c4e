"""Fakes for the CLI's `Clients` seam: each feature client is a `Recorder` that answers every
call it was told about with a canned record (the client SDK's own dataclasses) and records it."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from click.testing import CliRunner, Result

from broker.api.client.access import (
    ApprovalView,
    BreakGlassCredential,
    BreakGlassView,
    GrantView,
    PolicyDecision,
    RegoPolicy,
)
from broker.api.client.ca import CAPolicyDocument
from broker.api.client.database import Connection, Credentials, Lease, Role
from broker.api.client.identity import Attestor, Entry, JoinToken
from broker.api.client.kms import KeyDetails, KeyMeta, KeyVersionView
from broker.api.client.operators import OperatorSession
from broker.api.client.secrets import (
    KekRotationResult,
    SecretDetails,
    SecretMeta,
    SecretRead,
    SecretVersionView,
)
from broker.cli import CliContext, ConnectionSettings, cli

T0 = datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)
T1 = datetime(2026, 1, 2, 4, 4, 5, tzinfo=UTC)
Z0, Z1 = "2026-01-02T03:04:05Z", "2026-01-02T04:04:05Z"


class Recorder:
    """A feature client: `answers` maps a method name to what it returns (an exception is
    raised instead); every call is recorded as (name, args, kwargs)."""

    def __init__(self, **answers: Any) -> None:
        self.answers = answers
        self.calls: list[tuple[str, tuple[Any, ...], dict[str, Any]]] = []

    def __getattr__(self, name: str) -> Callable[..., Any]:
        if name not in self.answers:
            raise AttributeError(f"the fake was not told what {name}() answers")

        def call(*args: Any, **kwargs: Any) -> Any:
            self.calls.append((name, args, kwargs))
            answer = self.answers[name]
            if isinstance(answer, BaseException):
                raise answer
            return answer

        return call


@dataclass
class FakeClients:
    """`broker.cli.Clients` with fakes; `audit` defaults to the `ca` fake (one fake may
    answer both the CA and the audit calls)."""

    ca: Any = None
    audit: Any = None
    identity: Any = None
    database: Any = None
    secrets: Any = None
    access: Any = None
    operators: Any = None
    kms: Any = None
    scan: Any = None
    static_roles: Any = None
    revocation: Any = None
    health: Any = None
    rollouts: Any = None
    closed: bool = False

    def __post_init__(self) -> None:
        if self.audit is None:
            self.audit = self.ca

    def close(self) -> None:
        self.closed = True
        if self.ca is not None and hasattr(self.ca, "close"):
            self.ca.close()


@dataclass
class CliHarness:
    """Runs the CLI with `clients` behind every connection, from a data dir holding a
    (fake) operator identity."""

    data_dir: Path
    clients: FakeClients
    settings: list[ConnectionSettings] = field(default_factory=list)

    def connect(self, settings: ConnectionSettings) -> FakeClients:
        self.settings.append(settings)
        return self.clients

    def invoke(self, *args: str, input: bytes | None = None) -> Result:
        return CliRunner().invoke(
            cli,
            list(args),
            obj=CliContext(connect=self.connect),
            env={"BROKER_DATA_DIR": str(self.data_dir), "BROKER_HOME": str(self.data_dir)},
            input=input,
            catch_exceptions=False,
        )


def harness(tmp_path: Path, **clients: Any) -> CliHarness:
    data_dir = tmp_path / "data"
    (data_dir / "operator").mkdir(parents=True)
    (data_dir / "operator" / "svid.pem").write_bytes(b"operator cert")
    (data_dir / "operator" / "key.pem").write_bytes(b"operator key")
    (data_dir / "bundle.pem").write_bytes(b"bundle")
    return CliHarness(data_dir, FakeClients(**clients))


# -- canned records ----------------------------------------------------------------------------

CONNECTION = Connection("pg", "postgresql", "postgresql://admin@db:5432/app", T0, None, "kek.1")
ROLE = Role(
    name="app",
    connection="pg",
    owner="payments",
    tenant="default",
    environment="dev",
    creation_statements="CREATE ROLE {{name}};",
    revocation_statements="",
    rollback_statements="",
    default_ttl_seconds=3600,
    max_ttl_seconds=86400,
    username_template="v_{{role}}_{{random}}",
    password_length=32,
    password_charset="alphanumeric",
    created_at=T0,
)
LEASE = Lease(
    id="db/app/abc",
    role="app",
    connection="pg",
    username="v_app_x",
    holder="spiffe://td/payments",
    state="active",
    created_at=T0,
    expires_at=T1,
    max_expires_at=T1,
    lease_duration=3600,
    renewable=True,
    attempts=0,
    last_error="",
)
STUCK = Lease(
    id="db/app/def",
    role="app",
    connection="pg",
    username="v_app_y",
    holder="spiffe://td/payments",
    state="irrevocable",
    created_at=T0,
    expires_at=T0,
    max_expires_at=T1,
    lease_duration=0,
    renewable=False,
    attempts=7,
    last_error="connection refused\nby peer",
    next_attempt_at=T1,
)
CREDENTIALS = Credentials("v_app_x", "s3cret-password", LEASE)

ENTRY = Entry(
    id="e-1",
    spiffe_id="spiffe://td/web",
    parent_id="spiffe://td/agents/a",
    selectors=["unix:uid:1000"],
    x509_ttl_seconds=600,
    jwt_ttl_seconds=0,
    dns_names=["web.local"],
    created_at=T0,
)
ATTESTOR = Attestor(
    name="k8s",
    issuer="https://issuer",
    audience="broker",
    template="spiffe://{td}/ns/{ns}",
    algorithms=["RS256"],
    created_at=T0,
    key_ids=["kid-1"],
)
JOIN_TOKEN = JoinToken("tok-123", "spiffe://td/agents/a", T1)

META = SecretMeta(
    tenant="default",
    reference="secret://payments/prod/stripe/api-key",
    reference_sha256="ab" * 32,
    service="payments",
    environment="prod",
    owner="payments",
    classification="internal",
    rotation_period_seconds=90 * 86400,
    last_rotated=T0,
    created_at=T0,
    state="active",
    current_version=2,
    revoked_at=None,
    deleted_at=None,
    missing=(),
    rotation_due=T1,
)
DETAILS = SecretDetails(
    META,
    (
        SecretVersionView(2, "current", T1, None, None, "kek.default.1"),
        SecretVersionView(1, "previous", T0, T1, None, "kek.default.1"),
    ),
)
READ = SecretRead(b"the-value", 2, T1, META)
KEK_ROTATION = KekRotationResult("default", "kek.default.2", 3, ("kek.default.1",), ())

GRANT = GrantView(
    id="g-1",
    grantee="spiffe://td/ops/alice",
    action="secrets.get",
    resource="secret://payments/*",
    justification="INC-1",
    created_by="spiffe://td/ops/bob",
    created_at=T0,
    expires_at=T1,
    revoked_at=None,
    revoked_by="",
    state="active",
)
APPROVAL = ApprovalView(
    id="a-1",
    requester="spiffe://td/ops/alice",
    action="secrets.rotate",
    resource="secret://payments/prod/stripe/api-key",
    justification="INC-2",
    created_at=T0,
    expires_at=T1,
    approved_by="spiffe://td/ops/bob",
    approved_at=T0,
    used_at=None,
    state="approved",
)
BREAKGLASS = BreakGlassView(
    id="b-1",
    operator="spiffe://td/ops/alice",
    approval_id="a-1",
    spiffe_id="spiffe://td/breakglass/alice",
    action="secrets.get",
    resource="secret://payments/prod/stripe/api-key",
    issued_at=T0,
    expires_at=T1,
    used_at=None,
    revoked_at=None,
    state="issued",
)
BREAKGLASS_CREDENTIAL = BreakGlassCredential(BREAKGLASS, [b"leaf"], b"key", [b"root"])
REGO = RegoPolicy(4, {"main.rego": "package broker\n"}, "spiffe://td/ops/bob", T0)
DECISION = PolicyDecision(True, "allow_owner", "the owner reads", {"breakglass": "no"}, {"a": 1})
CA_POLICY = CAPolicyDocument(2, '{"rules": []}', "spiffe://td/ops/bob", T0)

SESSION = OperatorSession(
    subject="alice@example.com",
    spiffe_id="spiffe://td/operators/alice",
    roles=["admin"],
    amr=["pwd", "otp"],
    serial="0a1b",
    issued_at=T0,
    expires_at=T1,
    revoked_at=None,
    issuer="https://sso",
)

KEY_META = KeyMeta(
    tenant="default",
    name="orders-dek",
    purpose="encrypt",
    key_type="aes-256",
    owner="orders",
    environment="prod",
    classification="confidential",
    rotation_period_seconds=90 * 86400,
    state="enabled",
    current_version=2,
    created_at=T0,
    last_rotated=T1,
    rotation_due=T1,
    destroy_after=None,
)
KEY_DETAILS = KeyDetails(
    KEY_META,
    (KeyVersionView(1, "enabled", T0, None), KeyVersionView(2, "enabled", T1, None)),
)
COMPLIANCE_REPORT: dict[str, Any] = {
    "generated_at": Z1,
    "tenant": None,
    "window_days": 30,
    "summary": {
        "credentials": 1,
        "overdue": 1,
        "metadata_complete": 1,
        "metadata_completeness": 1.0,
        "grants": 0,
        "breakglass": 0,
    },
    "credentials": [
        {
            "kind": "key",
            "tenant": "default",
            "name": "orders-dek",
            "owner": "orders",
            "environment": "prod",
            "classification": "confidential",
            "state": "enabled",
            "last_rotated": Z0,
            "rotation_due": Z1,
            "overdue": True,
            "age_days": 1.0,
            "missing": [],
            "detail": "aes-256 v2",
        }
    ],
    "grants": [],
    "breakglass": [],
    "operators": [{"operator": "spiffe://td/ops/alice", "kind": "login", "last_login": Z0}],
    "audit": {
        "intact": True,
        "entries": 12,
        "reason": "",
        "checkpoint_seq": 10,
        "checkpoint_time": Z0,
    },
}
