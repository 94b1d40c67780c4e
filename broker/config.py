"""Configuration: frozen dataclasses loaded once from TOML, then environment overrides,
validated at startup. Secrets are only ever given by reference (a file path or an env var
name), never inline: a DSN with a password or a PIN in a URI is refused.

Environment overrides (applied after the file): BROKER_LISTEN, BROKER_TRUST_DOMAIN,
BROKER_STORAGE_DSN, BROKER_KEYS_URI, BROKER_KEYS_PIN_SOURCE, BROKER_RATE_LIMIT_RPS,
BROKER_RATE_LIMIT_BURST, BROKER_WORKERS, BROKER_ATTEST_LISTEN, BROKER_METRICS_LISTEN,
BROKER_DB_REAPER_INTERVAL, BROKER_DB_CREATION_TIMEOUT, BROKER_AUDIT_SINKS (the [audit.sinks]
tables as TOML); BROKER_OTLP_ENDPOINT and the standard OTEL_* tracing variables
(broker.tracing.settings).
"""

from __future__ import annotations

import datetime as dt
import math
import os
import re
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlsplit

from broker.dsn import password_in_dsn
from broker.errors import InvalidArgument
from broker.tracing.settings import TracingConfig, tracing_config, tracing_env
from ca.duration import parse_duration
from ca.errors import CAError
from ca.layout import IdentityLayout
from ca.spiffeid import SpiffeId

__all__ = [
    "DEFAULT_ATTEST_LISTEN",
    "DEFAULT_DATA_DIR",
    "DEFAULT_LISTEN",
    "OPERATOR_PREFIX",
    "AuditConfig",
    "CAConfig",
    "Config",
    "DatabaseConfig",
    "IdentityConfig",
    "KeysConfig",
    "OperatorsConfig",
    "ServerConfig",
    "StorageConfig",
    "load_config",
]


DEFAULT_LISTEN = "127.0.0.1:8443"  # also the CLI's default --server
# Attestation (no client certificate yet): server-authenticated TLS, only the Attest RPC is
# admitted without a client certificate. "auto": the listen port + 1 (any free port if that one
# is taken, or if the listen port is 0); "off": none; otherwise HOST:PORT, which must bind.
DEFAULT_ATTEST_LISTEN = "auto"
DEFAULT_DATA_DIR = Path(".broker")
OPERATOR_PREFIX = "/broker/operator/"  # operator identities; reserved, never minted


@dataclass(frozen=True)
class StorageConfig:
    dsn: str
    password_file: Path | None = None
    password_env: str | None = None

    def resolved_dsn(self) -> str:
        """The DSN with the password read from its reference, for the storage layer only."""
        password = _read_secret_ref(self.password_file, self.password_env, "storage password")
        if password is None:
            return self.dsn
        parts = urlsplit(self.dsn)
        user = parts.username or ""
        # The host part as written: a multi-host DSN (h1:p1,h2:p2,...) has no single port.
        hosts = parts.netloc.rpartition("@")[2]
        netloc = f"{quote(user, safe='')}:{quote(password, safe='')}@{hosts}"
        return parts._replace(netloc=netloc).geturl()


@dataclass(frozen=True)
class KeysConfig:
    uri: str
    pin_source: str | None = None


@dataclass(frozen=True)
class CAConfig:
    key_type: str = "ec-p256"
    root_ttl: dt.timedelta = dt.timedelta(days=3650)
    issuing_ttl: dt.timedelta = dt.timedelta(days=7)
    rotation_check_interval: dt.timedelta = dt.timedelta(seconds=60)
    backdate: dt.timedelta = dt.timedelta(seconds=30)
    bundle_refresh_hint: dt.timedelta = dt.timedelta(minutes=5)


@dataclass(frozen=True)
class IdentityConfig:
    template: str = "{tenant}/{environment}/{service}"
    default_tenant: str | None = None


@dataclass(frozen=True)
class ServerConfig:
    listen: str = DEFAULT_LISTEN
    operators: tuple[str, ...] = ()
    server_names: tuple[str, ...] = ("localhost", "127.0.0.1")
    server_cert_ttl: dt.timedelta = dt.timedelta(hours=24)
    max_message_bytes: int = 1 << 20
    rate_limit_rps: float = 500.0
    rate_limit_burst: float = 1000.0
    workers: int = 1  # processes sharing the listen port (SO_REUSEPORT)
    attest_listen: str = DEFAULT_ATTEST_LISTEN
    # Prometheus /metrics on HOST:PORT; "" (the default) serves none. Unauthenticated: keep it
    # on loopback or a scrape-only network.
    metrics_listen: str = ""
    # Rate-limit refusals (and calls without an identity on the attestation port) reach the
    # audit ledger once per caller per interval, with a count; the metric counts every one.
    refusal_audit_interval: dt.timedelta = dt.timedelta(seconds=10)
    # A connection that has not finished its TLS handshake by then is closed (gRPC's own
    # default is 120 s); see docs/security.md, "Connections".
    handshake_timeout: dt.timedelta = dt.timedelta(seconds=10)
    # Open connections per peer address, and in all (0: derived from the fd limit at start).
    # The per-peer cap needs the connection gate (broker.api.server.gate) in front of a port:
    # "attest" (the attestation port, the default), "all" (the main port too), "off".
    max_connections_per_peer: int = 64
    max_connections: int = 0
    connection_gate: str = "attest"
    # The largest message the attestation port (no client certificate) reads.
    attest_max_message_bytes: int = 64 * 1024


@dataclass(frozen=True)
class DatabaseConfig:
    """Dynamic database credentials: how often the lease reaper runs, and how long a lease may
    stay pending before its creation counts as failed (and its user, if any, is dropped)."""

    reaper_interval: dt.timedelta = dt.timedelta(seconds=1)
    creation_timeout: dt.timedelta = dt.timedelta(seconds=30)
    # PBKDF2 iterations of the SCRAM-SHA-256 verifiers sent to PostgreSQL instead of passwords
    # (docs/database.md: the server's CPU per credential follows it).
    scram_iterations: int = 4096


# Reads of secrets whose environment or classification is listed need a justification when
# the reader is a person (operator or break-glass holder); workloads declare a purpose instead.
DEFAULT_JUSTIFICATION_REQUIRED: tuple[str, ...] = ("prod", "pii")


@dataclass(frozen=True)
class SecretsConfig:
    """Wrapped static secrets: which environments and classifications people must justify
    reading (`justification_required`, e.g. ["prod", "pii"]; [] requires none)."""

    justification_required: tuple[str, ...] = DEFAULT_JUSTIFICATION_REQUIRED


@dataclass(frozen=True)
class RotationConfig:
    """Scheduled rotation (docs/rotation.md): KEKs every `kek_period` (default yearly), every
    envelope data key re-made every `data_key_period` (default 90 days), and the leader-held
    job that rotates `--generate` secrets and reports third-party ones as due every
    `check_interval`."""

    kek_period: dt.timedelta = dt.timedelta(days=365)
    data_key_period: dt.timedelta = dt.timedelta(days=90)
    check_interval: dt.timedelta = dt.timedelta(minutes=1)


DEFAULT_MFA_AMR = ("mfa", "otp", "hwk", "swk")
MAX_OPERATOR_TTL = dt.timedelta(hours=8)


@dataclass(frozen=True)
class OperatorsConfig:
    """Operator login against an OpenID Connect provider (`broker login`); off without an
    issuer. `roles` maps each broker role (admin, security, approver, auditor) to the values of
    `roles_claim` that grant it. A login needs MFA: an `amr` value in `mfa_amr` or an `acr` in
    `mfa_acr`. Certificates last `default_ttl` (at most `max_ttl`, itself at most 8 h) and never
    beyond the ID token's session: `auth_time + session_max` (or `exp` without auth_time)."""

    issuer: str = ""
    client_id: str = ""
    audience: tuple[str, ...] = ()  # accepted ID-token audiences; default: (client_id,)
    scopes: tuple[str, ...] = ("openid", "email", "groups")
    algorithms: tuple[str, ...] = ("RS256", "ES256")
    mfa_amr: tuple[str, ...] = DEFAULT_MFA_AMR
    mfa_acr: tuple[str, ...] = ()
    roles_claim: str = "groups"
    roles: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    subject_claim: str = "sub"
    default_ttl: dt.timedelta = dt.timedelta(hours=1)
    max_ttl: dt.timedelta = MAX_OPERATOR_TTL
    session_max: dt.timedelta = MAX_OPERATOR_TTL

    @property
    def enabled(self) -> bool:
        return bool(self.issuer)

    @property
    def audiences(self) -> tuple[str, ...]:
        return self.audience or (self.client_id,)

    def validate(self) -> None:
        if not self.enabled:
            return
        from broker.operators.oidc import ALLOWED_ALGORITHMS
        from broker.operators.roles import ROLES

        parts = urlsplit(self.issuer)
        loopback = parts.hostname in ("127.0.0.1", "::1", "localhost")
        if parts.scheme != "https" and not (parts.scheme == "http" and loopback):
            raise InvalidArgument("config: operators.issuer must be an https URL")
        if not self.client_id:
            raise InvalidArgument("config: operators.client_id is required with an issuer")
        bad = sorted(set(self.algorithms) - ALLOWED_ALGORITHMS)
        if bad or not self.algorithms:
            raise InvalidArgument(
                f"config: operators.algorithms must be asymmetric ({', '.join(bad) or 'empty'})"
            )
        unknown = sorted(set(self.roles) - set(ROLES))
        if unknown:
            raise InvalidArgument(
                f"config: operators.roles: unknown role {unknown[0]!r} "
                f"(roles are {', '.join(ROLES)})"
            )
        if not self.mfa_amr and not self.mfa_acr:
            raise InvalidArgument("config: operators needs mfa_amr or mfa_acr: MFA is required")
        if not dt.timedelta(minutes=1) <= self.max_ttl <= MAX_OPERATOR_TTL:
            raise InvalidArgument("config: operators.max_ttl must be between 1m and 8h")
        if not dt.timedelta(0) < self.default_ttl <= self.max_ttl:
            raise InvalidArgument("config: operators.default_ttl must be between 0 and max_ttl")
        if not dt.timedelta(0) < self.session_max <= dt.timedelta(hours=24):
            raise InvalidArgument("config: operators.session_max must be between 0 and 24h")


SINK_SCHEMES = ("syslog+tls", "https")
_SINK_NAME = re.compile(r"^[a-z0-9][a-z0-9_-]{0,62}$")


@dataclass(frozen=True)
class AuditSink:
    """One place the audit stream is forwarded to (docs/observability.md): `syslog+tls://HOST:PORT`
    (RFC 5424 messages, RFC 5425 framing over TLS) or an `https://` JSON-lines webhook. `ca_file`
    is the CA that must have signed the receiver's certificate (default: the system's)."""

    name: str
    url: str
    ca_file: Path | None = None
    server_name: str = ""  # the name checked in the receiver's certificate (default: its host)
    timeout: dt.timedelta = dt.timedelta(seconds=10)

    @property
    def scheme(self) -> str:
        return self.url.partition("://")[0]


NOTIFICATION_KINDS = (
    "secret.revoked",
    "leases.revoked_by_prefix",
    "svid.denied",
    "breakglass.issued",
    "breakglass.used",
    "anomaly.detected",
    "audit.verification_failed",
    "secret.due",
    "ca.root_compromised",
)


@dataclass(frozen=True)
class NotifyChannel:
    """A webhook that receives signed notifications (docs/observability.md): an https:// URL,
    the CA its certificate must chain to, and the kinds it wants (default: all)."""

    name: str
    url: str
    ca_file: Path | None = None
    timeout: dt.timedelta = dt.timedelta(seconds=10)
    events: tuple[str, ...] = NOTIFICATION_KINDS


@dataclass(frozen=True)
class NotificationsConfig:
    channels: tuple[NotifyChannel, ...] = ()
    retries: int = 5


@dataclass(frozen=True)
class AuditConfig:
    """The audit ledger: how often a signed checkpoint is made (docs/ledger.md), and the sinks
    its entries are forwarded to (docs/observability.md)."""

    checkpoint_interval: dt.timedelta = dt.timedelta(hours=1)
    sinks: tuple[AuditSink, ...] = ()
    forward_interval: dt.timedelta = dt.timedelta(seconds=1)
    forward_batch: int = 500


@dataclass(frozen=True)
class Config:
    trust_domain: str
    data_dir: Path
    storage: StorageConfig
    keys: KeysConfig
    ca: CAConfig = field(default_factory=CAConfig)
    identity: IdentityConfig = field(default_factory=IdentityConfig)
    server: ServerConfig = field(default_factory=ServerConfig)
    database: DatabaseConfig = field(default_factory=DatabaseConfig)
    secrets: SecretsConfig = field(default_factory=SecretsConfig)

    operators: OperatorsConfig = field(default_factory=OperatorsConfig)
    audit: AuditConfig = field(default_factory=AuditConfig)
    notifications: NotificationsConfig = field(default_factory=NotificationsConfig)
    dev: bool = False
    rotation: RotationConfig = field(default_factory=RotationConfig)
    # OpenTelemetry traces over OTLP/gRPC (broker.tracing; off unless an endpoint is set).
    tracing: TracingConfig = field(default_factory=TracingConfig)

    @property
    def operator_dir(self) -> Path:
        """Where the broker keeps the bootstrap operator identity for the CLI."""
        return self.data_dir / "operator"

    @property
    def bundle_path(self) -> Path:
        return self.data_dir / "bundle.pem"

    def validate(self) -> Config:
        try:
            td = SpiffeId.parse(f"spiffe://{self.trust_domain}").trust_domain
            for op in self.server.operators:
                sid = SpiffeId.parse(op)
                if not sid.member_of(td):
                    raise InvalidArgument(f"operator {op} is not in trust domain {td}")
                # Operator IDs live only under the reserved prefix, which the CA never mints
                # for anyone (no RPC, entry, join token or attestor can yield one).
                if not sid.path.startswith(OPERATOR_PREFIX) or sid.path == OPERATOR_PREFIX:
                    raise InvalidArgument(
                        f"config: operator {op} is outside the reserved prefix "
                        f"spiffe://{td}{OPERATOR_PREFIX}: operator IDs must be "
                        f"spiffe://{td}{OPERATOR_PREFIX}NAME, so that no workload can ever be "
                        "minted one"
                    )
        except CAError as exc:
            raise InvalidArgument(f"config: {exc}") from exc
        if not self.server.operators:
            raise InvalidArgument("config: server.operators must name at least one SPIFFE ID")
        _check_listen(self.server.listen)
        if self.server.attest_listen not in ("auto", "off"):
            _check_listen(self.server.attest_listen)
        if self.server.metrics_listen:
            _check_listen(self.server.metrics_listen)
        if self.ca.key_type not in ("ec-p256", "ec-p384"):
            raise InvalidArgument("config: ca.key_type must be ec-p256 or ec-p384")
        if not 1 <= self.server.workers <= 64:
            raise InvalidArgument("config: server.workers must be between 1 and 64")
        if self.server.max_message_bytes < 4096:
            raise InvalidArgument("config: server.max_message_bytes must be at least 4096")
        if not 1024 <= self.server.attest_max_message_bytes <= self.server.max_message_bytes:
            raise InvalidArgument(
                "config: server.attest_max_message_bytes must be between 1024 and "
                "server.max_message_bytes"
            )
        if not dt.timedelta(0) < self.server.handshake_timeout <= dt.timedelta(minutes=5):
            raise InvalidArgument("config: server.handshake_timeout must be between 0s and 5m")
        if self.server.refusal_audit_interval < dt.timedelta(0):
            raise InvalidArgument("config: server.refusal_audit_interval must not be negative")
        if self.server.connection_gate not in ("attest", "all", "off"):
            raise InvalidArgument('config: server.connection_gate must be "attest", "all" or "off"')
        if self.server.max_connections_per_peer < 1 or self.server.max_connections < 0:
            raise InvalidArgument(
                "config: server.max_connections_per_peer must be at least 1 and "
                "server.max_connections at least 0 (0: from the fd limit)"
            )
        where = password_in_dsn(self.storage.dsn)
        if where is not None:
            raise InvalidArgument(
                f"config: storage.dsn must not contain a password (it has {where}); "
                "use storage.password_file or storage.password_env (BROKER_STORAGE_DSN too)"
            )
        if not dt.timedelta(seconds=1) <= self.database.creation_timeout <= dt.timedelta(hours=1):
            raise InvalidArgument("config: database.creation_timeout must be between 1s and 1h")
        if not dt.timedelta(0) < self.database.reaper_interval <= dt.timedelta(minutes=10):
            raise InvalidArgument("config: database.reaper_interval must be between 0 and 10m")
        for name in self.secrets.justification_required:
            if not re.fullmatch(r"[a-z0-9][a-z0-9._-]{0,62}", name):
                raise InvalidArgument(
                    f"config: secrets.justification_required entry {name!r} is not an "
                    'environment or classification name (e.g. "prod", "pii")'
                )
        if not 1 <= self.database.scram_iterations <= 1_000_000:
            raise InvalidArgument("config: database.scram_iterations must be between 1 and 1000000")
        if not dt.timedelta(minutes=1) <= self.audit.checkpoint_interval <= dt.timedelta(days=7):
            raise InvalidArgument("config: audit.checkpoint_interval must be between 1m and 7d")
        if not 0 <= self.notifications.retries <= 20:
            raise InvalidArgument("config: notifications.retries must be between 0 and 20")
        if not 1 <= self.audit.forward_batch <= 10000:
            raise InvalidArgument("config: audit.forward_batch must be between 1 and 10000")
        if not dt.timedelta(0) < self.audit.forward_interval <= dt.timedelta(minutes=5):
            raise InvalidArgument("config: audit.forward_interval must be between 0 and 5m")
        if "pin-value" in self.keys.uri:
            raise InvalidArgument("config: keys.uri must not contain a PIN; use keys.pin_source")
        self.operators.validate()
        self._check_ranges()
        _check_identity(self.identity)
        return self

    def _check_ranges(self) -> None:
        """Numbers and durations within sane bounds (NaN and infinities are refused: every
        comparison with NaN is false, so a plain `x <= 0` check lets it through)."""
        srv, ca = self.server, self.ca
        for name, value, low, high in (
            ("rate_limit_rps", srv.rate_limit_rps, 0.001, 1e6),
            ("rate_limit_burst", srv.rate_limit_burst, 1.0, 1e7),
        ):
            if not (math.isfinite(value) and low <= value <= high):
                raise InvalidArgument(
                    f"config: server.{name} must be a number between {low:g} and {high:g} "
                    f"(got {value!r})"
                )
        day = dt.timedelta(days=1)
        for key, span, shortest, longest in (
            ("ca.root_ttl", ca.root_ttl, day, dt.timedelta(days=36500)),
            ("ca.issuing_ttl", ca.issuing_ttl, dt.timedelta(hours=1), dt.timedelta(days=3650)),
            (
                "ca.rotation_check_interval",
                ca.rotation_check_interval,
                dt.timedelta(seconds=1),
                day,
            ),
            ("ca.backdate", ca.backdate, dt.timedelta(0), dt.timedelta(hours=1)),
            ("ca.bundle_refresh_hint", ca.bundle_refresh_hint, dt.timedelta(seconds=1), day),
            (
                "server.server_cert_ttl",
                srv.server_cert_ttl,
                dt.timedelta(minutes=5),
                dt.timedelta(days=366),
            ),
        ):
            if not shortest <= span <= longest:
                raise InvalidArgument(
                    f"config: {key} must be between {_human(shortest)} and {_human(longest)} "
                    f"(got {_human(span)})"
                )
        if ca.issuing_ttl * 2 > ca.root_ttl:
            raise InvalidArgument(
                f"config: ca.root_ttl ({_human(ca.root_ttl)}) must be at least twice "
                f"ca.issuing_ttl ({_human(ca.issuing_ttl)}): the root must outlive its "
                "issuing CAs"
            )

    def check_persistent_keys(self) -> Config:
        """Refuse in-memory keys: storage is always persistent (SQLite file or PostgreSQL), and
        what it holds sealed (KEKs wrap every secret, the CA signs every SVID) would be lost
        at the first restart."""
        if self.keys.uri.strip() == "software:" or self.keys.uri.startswith("software:object"):
            raise InvalidArgument(
                "config: keys.uri 'software:' keeps keys in memory, lost at exit, while the "
                "storage is persistent: use pkcs11:token=... or software:path=DIR"
            )
        return self


_MAX_TEMPLATE = 256
_MAX_SEGMENTS = 16


def _check_identity(identity: IdentityConfig) -> None:
    """The identity template, checked here (bounded: length and segment count first, then one
    linear pass in IdentityLayout) so a bad one is one clear line at startup."""
    template = identity.template
    if len(template) > _MAX_TEMPLATE or template.count("/") >= _MAX_SEGMENTS:
        raise InvalidArgument(
            f"config: identity.template is too long (at most {_MAX_TEMPLATE} characters and "
            f"{_MAX_SEGMENTS} segments)"
        )
    if identity.default_tenant is not None and len(identity.default_tenant) > _MAX_TEMPLATE:
        raise InvalidArgument("config: identity.default_tenant is too long")
    try:
        IdentityLayout(template, identity.default_tenant)
    except CAError as exc:
        raise InvalidArgument(f"config: {exc}") from None


def _human(value: dt.timedelta) -> str:
    seconds = int(value.total_seconds())
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size and seconds % size == 0:
            return f"{seconds // size}{unit}"
    return f"{seconds}s"


def _check_listen(listen: str) -> None:
    host, sep, port = listen.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) < 65536:
        raise InvalidArgument(f"listen address {listen!r} must be HOST:PORT (port 0 picks one)")


def _read_secret_ref(path: Path | None, env: str | None, what: str) -> str | None:
    if path is not None:
        try:
            return path.read_text().rstrip("\n")
        except OSError as exc:
            raise InvalidArgument(f"cannot read {what} from {path}: {exc.strerror}") from exc
    if env is not None:
        value = os.environ.get(env)
        if value is None:
            raise InvalidArgument(f"{what}: environment variable {env} is not set")
        return value
    return None


def _rotation(section: Mapping[str, Any]) -> RotationConfig:
    d = RotationConfig()
    config = RotationConfig(
        kek_period=_duration(section, "kek_period", d.kek_period),
        data_key_period=_duration(section, "data_key_period", d.data_key_period),
        check_interval=_duration(section, "check_interval", d.check_interval),
    )
    for key in ("kek_period", "data_key_period"):
        if getattr(config, key) < dt.timedelta(days=1):
            raise InvalidArgument(f"config: rotation.{key} must be at least 1d (e.g. 90d)")
    if not dt.timedelta(seconds=1) <= config.check_interval <= dt.timedelta(hours=1):
        raise InvalidArgument("config: rotation.check_interval must be between 1s and 1h")
    return config


def _duration(section: Mapping[str, Any], key: str, default: dt.timedelta) -> dt.timedelta:
    if key not in section:
        return default
    try:
        return parse_duration(str(section[key]))
    except CAError as exc:
        raise InvalidArgument(f"config: {key}: {exc}") from exc


def _integer(section: Mapping[str, Any], key: str, default: int) -> int:
    value = section.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidArgument(f"config: {key} must be a whole number (got {value!r})")
    return value


_SECTIONS = {
    "": {
        "trust_domain",
        "data_dir",
        "storage",
        "keys",
        "ca",
        "identity",
        "server",
        "database",
        "secrets",
        "operators",
        "audit",
        "notifications",
        "rotation",
        "tracing",
    },
    "rotation": {"kek_period", "data_key_period", "check_interval"},
    "notifications": {"channels", "retries"},
    "audit": {"checkpoint_interval", "sinks", "forward_interval", "forward_batch"},
    "secrets": {"justification_required"},
    "operators": {
        "issuer",
        "client_id",
        "audience",
        "scopes",
        "algorithms",
        "mfa_amr",
        "mfa_acr",
        "roles_claim",
        "roles",
        "subject_claim",
        "default_ttl",
        "max_ttl",
        "session_max",
    },
    "storage": {"dsn", "password_file", "password_env"},
    "keys": {"uri", "pin_source"},
    "ca": {
        "key_type",
        "root_ttl",
        "issuing_ttl",
        "rotation_check_interval",
        "backdate",
        "bundle_refresh_hint",
    },
    "identity": {"template", "default_tenant"},
    "database": {"reaper_interval", "creation_timeout", "scram_iterations"},
    "server": {
        "listen",
        "operators",
        "server_names",
        "server_cert_ttl",
        "max_message_bytes",
        "rate_limit_rps",
        "rate_limit_burst",
        "workers",
        "attest_listen",
        "metrics_listen",
        "refusal_audit_interval",
        "handshake_timeout",
        "max_connections_per_peer",
        "max_connections",
        "connection_gate",
        "attest_max_message_bytes",
    },
}


def _check_keys(doc: Mapping[str, Any]) -> None:
    for name, allowed in _SECTIONS.items():
        section = doc if not name else doc.get(name, {})
        if not isinstance(section, Mapping):
            raise InvalidArgument(f"config: [{name}] must be a table")
        unknown = sorted(set(section) - allowed)
        if unknown:
            where = f"[{name}]" if name else "top level"
            raise InvalidArgument(f"config: unknown key {unknown[0]!r} in {where}")


def config_from_document(doc: Mapping[str, Any], base_dir: Path) -> Config:
    """Build a Config from a parsed TOML document (paths relative to `base_dir`)."""
    _check_keys(doc)
    try:
        return _from_document(doc, base_dir)
    except (TypeError, ValueError) as exc:
        raise InvalidArgument(f"config: a value has the wrong type: {exc}") from None


def _from_document(doc: Mapping[str, Any], base_dir: Path) -> Config:
    try:
        storage, keys = doc["storage"], doc["keys"]
        trust_domain = str(doc["trust_domain"])
        dsn, uri = str(storage["dsn"]), str(keys["uri"])
    except KeyError as exc:
        raise InvalidArgument(f"config: missing required key {exc.args[0]!r}") from exc
    ca, ident, srv = doc.get("ca", {}), doc.get("identity", {}), doc.get("server", {})
    defaults_ca, defaults_srv = CAConfig(), ServerConfig()

    def path(value: Any) -> Path | None:
        return None if value is None else (base_dir / str(value))

    db, defaults_db = doc.get("database", {}), DatabaseConfig()
    database = DatabaseConfig(
        reaper_interval=_duration(db, "reaper_interval", defaults_db.reaper_interval),
        creation_timeout=_duration(db, "creation_timeout", defaults_db.creation_timeout),
        scram_iterations=_integer(db, "scram_iterations", defaults_db.scram_iterations),
    )
    aud = doc.get("audit", {})
    audit = AuditConfig(
        checkpoint_interval=_duration(aud, "checkpoint_interval", AuditConfig.checkpoint_interval),
        sinks=audit_sinks(aud.get("sinks", {}), base_dir),
        forward_interval=_duration(aud, "forward_interval", AuditConfig.forward_interval),
        forward_batch=_integer(aud, "forward_batch", AuditConfig.forward_batch),
    )
    required = doc.get("secrets", {}).get("justification_required", DEFAULT_JUSTIFICATION_REQUIRED)
    if not isinstance(required, list | tuple) or not all(isinstance(v, str) for v in required):
        raise InvalidArgument(
            'config: secrets.justification_required must be a list of names, e.g. ["prod", "pii"]'
        )
    notes = doc.get("notifications", {})
    notifications = NotificationsConfig(
        channels=notify_channels(notes.get("channels", {}), base_dir),
        retries=_integer(notes, "retries", NotificationsConfig.retries),
    )
    return Config(
        rotation=_rotation(doc.get("rotation", {})),
        audit=audit,
        notifications=notifications,
        tracing=tracing_config(doc.get("tracing", {}), base_dir),
        operators=_operators(doc.get("operators", {})),
        database=database,
        secrets=SecretsConfig(justification_required=tuple(required)),
        trust_domain=trust_domain,
        data_dir=path(doc.get("data_dir", ".")) or base_dir,
        storage=StorageConfig(
            dsn=dsn,
            password_file=path(storage.get("password_file")),
            password_env=storage.get("password_env"),
        ),
        keys=KeysConfig(uri=uri, pin_source=keys.get("pin_source")),
        ca=CAConfig(
            key_type=str(ca.get("key_type", defaults_ca.key_type)),
            root_ttl=_duration(ca, "root_ttl", defaults_ca.root_ttl),
            issuing_ttl=_duration(ca, "issuing_ttl", defaults_ca.issuing_ttl),
            rotation_check_interval=_duration(
                ca, "rotation_check_interval", defaults_ca.rotation_check_interval
            ),
            backdate=_duration(ca, "backdate", defaults_ca.backdate),
            bundle_refresh_hint=_duration(
                ca, "bundle_refresh_hint", defaults_ca.bundle_refresh_hint
            ),
        ),
        identity=IdentityConfig(
            template=str(ident.get("template", IdentityConfig.template)),
            default_tenant=ident.get("default_tenant"),
        ),
        server=ServerConfig(
            listen=str(srv.get("listen", defaults_srv.listen)),
            operators=tuple(str(o) for o in srv.get("operators", ())),
            server_names=tuple(str(n) for n in srv.get("server_names", defaults_srv.server_names)),
            server_cert_ttl=_duration(srv, "server_cert_ttl", defaults_srv.server_cert_ttl),
            max_message_bytes=int(srv.get("max_message_bytes", defaults_srv.max_message_bytes)),
            rate_limit_rps=float(srv.get("rate_limit_rps", defaults_srv.rate_limit_rps)),
            rate_limit_burst=float(srv.get("rate_limit_burst", defaults_srv.rate_limit_burst)),
            workers=int(srv.get("workers", defaults_srv.workers)),
            attest_listen=str(srv.get("attest_listen", defaults_srv.attest_listen)),
            metrics_listen=str(srv.get("metrics_listen", defaults_srv.metrics_listen)),
            refusal_audit_interval=_duration(
                srv, "refusal_audit_interval", defaults_srv.refusal_audit_interval
            ),
            handshake_timeout=_duration(srv, "handshake_timeout", defaults_srv.handshake_timeout),
            max_connections_per_peer=int(
                srv.get("max_connections_per_peer", defaults_srv.max_connections_per_peer)
            ),
            max_connections=int(srv.get("max_connections", defaults_srv.max_connections)),
            connection_gate=str(srv.get("connection_gate", defaults_srv.connection_gate)),
            attest_max_message_bytes=int(
                srv.get("attest_max_message_bytes", defaults_srv.attest_max_message_bytes)
            ),
        ),
    )


def _strings(section: Mapping[str, Any], key: str, default: tuple[str, ...]) -> tuple[str, ...]:
    value = section.get(key, default)
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list | tuple) or not all(isinstance(v, str) for v in value):
        raise InvalidArgument(f"config: operators.{key} must be a list of strings")
    return tuple(value)


def audit_sinks(section: Any, base_dir: Path) -> tuple[AuditSink, ...]:
    """[audit.sinks.NAME] tables: url = "syslog+tls://host:port" | "https://...", ca_file,
    server_name, timeout. Refuses any other scheme, a bad name, a URL without a host."""
    if not isinstance(section, Mapping):
        raise InvalidArgument("config: [audit.sinks] must be a table of [audit.sinks.NAME]")
    sinks = []
    for name, table in section.items():
        if not _SINK_NAME.match(name):
            raise InvalidArgument(f"config: audit sink name {name!r} must match [a-z0-9_-]+")
        if not isinstance(table, Mapping):
            raise InvalidArgument(f"config: [audit.sinks.{name}] must be a table")
        unknown = sorted(set(table) - {"url", "ca_file", "server_name", "timeout"})
        if unknown:
            raise InvalidArgument(f"config: unknown key {unknown[0]!r} in [audit.sinks.{name}]")
        url = str(table.get("url", ""))
        scheme, sep, rest = url.partition("://")
        if not sep or scheme not in SINK_SCHEMES:
            raise InvalidArgument(
                f"config: audit sink {name!r}: url must start with syslog+tls:// or https:// "
                f"(got {url!r})"
            )
        host = rest.split("/", 1)[0]
        if not host or (scheme == "syslog+tls" and not host.rpartition(":")[2].isdigit()):
            raise InvalidArgument(
                f"config: audit sink {name!r}: url needs a host"
                + (" and a port" if scheme == "syslog+tls" else "")
            )
        if scheme == "https" and "server_name" in table:
            raise InvalidArgument(
                f"config: audit sink {name!r}: server_name is for syslog+tls sinks only"
            )
        ca = table.get("ca_file")
        sinks.append(
            AuditSink(
                name=name,
                url=url,
                ca_file=None if ca is None else base_dir / str(ca),
                server_name=str(table.get("server_name", "")),
                timeout=_duration(table, "timeout", AuditSink.timeout),
            )
        )
    return tuple(sinks)


def notify_channels(section: Any, base_dir: Path) -> tuple[NotifyChannel, ...]:
    """[notifications.channels.NAME] tables: url = "https://...", ca_file, server_name,
    timeout, events = [kinds]. Refuses another scheme, a bad name, an unknown kind."""
    if not isinstance(section, Mapping):
        raise InvalidArgument("config: [notifications.channels] must be a table of tables")
    channels = []
    for name, table in section.items():
        where = f"[notifications.channels.{name}]"
        if not _SINK_NAME.match(name):
            raise InvalidArgument(f"config: channel name {name!r} must match [a-z0-9_-]+")
        if not isinstance(table, Mapping):
            raise InvalidArgument(f"config: {where} must be a table")
        unknown = sorted(set(table) - {"url", "ca_file", "timeout", "events"})
        if unknown:
            raise InvalidArgument(f"config: unknown key {unknown[0]!r} in {where}")
        url = str(table.get("url", ""))
        if not url.startswith("https://") or len(url) <= len("https://"):
            raise InvalidArgument(f"config: {where}: url must be https://HOST/... (got {url!r})")
        events = _strings(table, "events", NOTIFICATION_KINDS)
        bad = [e for e in events if e not in NOTIFICATION_KINDS]
        if bad:
            known = ", ".join(NOTIFICATION_KINDS)
            raise InvalidArgument(f"config: {where}: unknown event {bad[0]!r} (known: {known})")
        ca = table.get("ca_file")
        channels.append(
            NotifyChannel(
                name=name,
                url=url,
                ca_file=None if ca is None else base_dir / str(ca),
                timeout=_duration(table, "timeout", NotifyChannel.timeout),
                events=events,
            )
        )
    return tuple(channels)


def _operators(section: Mapping[str, Any]) -> OperatorsConfig:
    d = OperatorsConfig()
    roles = section.get("roles", {})
    if not isinstance(roles, Mapping):
        raise InvalidArgument("config: [operators.roles] must be a table of role = [claim values]")
    return OperatorsConfig(
        issuer=str(section.get("issuer", "")),
        client_id=str(section.get("client_id", "")),
        audience=_strings(section, "audience", ()),
        scopes=_strings(section, "scopes", d.scopes),
        algorithms=_strings(section, "algorithms", d.algorithms),
        mfa_amr=_strings(section, "mfa_amr", d.mfa_amr),
        mfa_acr=_strings(section, "mfa_acr", d.mfa_acr),
        roles_claim=str(section.get("roles_claim", d.roles_claim)),
        roles={str(k): _strings(roles, str(k), ()) for k in roles},
        subject_claim=str(section.get("subject_claim", d.subject_claim)),
        default_ttl=_duration(section, "default_ttl", d.default_ttl),
        max_ttl=_duration(section, "max_ttl", d.max_ttl),
        session_max=_duration(section, "session_max", d.session_max),
    )


def apply_env(config: Config, environ: Mapping[str, str] | None = None) -> Config:
    env = os.environ if environ is None else environ
    server, storage, keys = config.server, config.storage, config.keys
    try:
        if "BROKER_LISTEN" in env:
            server = replace(server, listen=env["BROKER_LISTEN"])
        if "BROKER_RATE_LIMIT_RPS" in env:
            server = replace(server, rate_limit_rps=float(env["BROKER_RATE_LIMIT_RPS"]))
        if "BROKER_RATE_LIMIT_BURST" in env:
            server = replace(server, rate_limit_burst=float(env["BROKER_RATE_LIMIT_BURST"]))
        if "BROKER_WORKERS" in env:
            server = replace(server, workers=int(env["BROKER_WORKERS"]))
    except ValueError as exc:
        raise InvalidArgument(f"environment: BROKER_RATE_LIMIT_* / BROKER_WORKERS: {exc}") from exc
    if "BROKER_ATTEST_LISTEN" in env:
        server = replace(server, attest_listen=env["BROKER_ATTEST_LISTEN"])
    if "BROKER_SERVER_NAMES" in env:
        # Comma-separated DNS names and IP addresses for the serving certificate (a container
        # sets its host name and published address here).
        names = tuple(n.strip() for n in env["BROKER_SERVER_NAMES"].split(",") if n.strip())
        server = replace(server, server_names=names)
    if "BROKER_METRICS_LISTEN" in env:
        server = replace(server, metrics_listen=env["BROKER_METRICS_LISTEN"])
    if "BROKER_STORAGE_DSN" in env:
        storage = replace(storage, dsn=env["BROKER_STORAGE_DSN"])
    if "BROKER_KEYS_URI" in env:
        keys = replace(keys, uri=env["BROKER_KEYS_URI"])
    if "BROKER_KEYS_PIN_SOURCE" in env:
        keys = replace(keys, pin_source=env["BROKER_KEYS_PIN_SOURCE"])
    trust_domain = env.get("BROKER_TRUST_DOMAIN", config.trust_domain)
    database = config.database
    for var, name in (
        ("BROKER_DB_REAPER_INTERVAL", "reaper_interval"),
        ("BROKER_DB_CREATION_TIMEOUT", "creation_timeout"),
    ):
        if var in env:
            value: Any = _duration(env, var, dt.timedelta(0))
            database = replace(database, **{name: value})
    config = replace(config, database=database)
    if "BROKER_AUDIT_CHECKPOINT_INTERVAL" in env:
        interval = _duration(env, "BROKER_AUDIT_CHECKPOINT_INTERVAL", dt.timedelta(0))
        config = replace(config, audit=replace(config.audit, checkpoint_interval=interval))
    config = replace(config, tracing=tracing_env(config.tracing, env))
    if "BROKER_AUDIT_SINKS" in env:
        config = replace(config, audit=replace(config.audit, sinks=_env_sinks(env)))
    return replace(config, server=server, storage=storage, keys=keys, trust_domain=trust_domain)


def _env_sinks(env: Mapping[str, str]) -> tuple[AuditSink, ...]:
    """BROKER_AUDIT_SINKS: the `[audit.sinks]` tables as TOML, e.g.
    `siem = { url = "syslog+tls://siem:6514", ca_file = "/etc/broker/siem-ca.pem" }` (one
    sink per line); replaces the file's sinks ("" = none). Relative paths: from the working
    directory. For containers and `--dev`, which have no config file."""
    try:
        doc = tomllib.loads(env["BROKER_AUDIT_SINKS"])
    except tomllib.TOMLDecodeError as exc:
        raise InvalidArgument(f"environment: BROKER_AUDIT_SINKS is not TOML: {exc}") from None
    return audit_sinks(doc, Path.cwd())


def load_config(path: Path, environ: Mapping[str, str] | None = None) -> Config:
    """Read a TOML config file, apply env overrides, validate. Raises InvalidArgument."""
    try:
        doc = tomllib.loads(path.read_text())
    except OSError as exc:
        raise InvalidArgument(f"cannot read config {path}: {exc.strerror}") from exc
    except tomllib.TOMLDecodeError as exc:
        raise InvalidArgument(f"config {path} is not valid TOML: {exc}") from exc
    config = apply_env(config_from_document(doc, path.parent.resolve()), environ)
    return config.validate().check_persistent_keys()
