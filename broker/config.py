"""Configuration: frozen dataclasses loaded once from TOML, then environment overrides,
validated at startup. Secrets are only ever given by reference (a file path or an env var
name), never inline: a DSN with a password or a PIN in a URI is refused.

Environment overrides (applied after the file): BROKER_LISTEN, BROKER_TRUST_DOMAIN,
BROKER_STORAGE_DSN, BROKER_KEYS_URI, BROKER_KEYS_PIN_SOURCE, BROKER_RATE_LIMIT_RPS,
BROKER_RATE_LIMIT_BURST, BROKER_WORKERS, BROKER_ATTEST_LISTEN, BROKER_METRICS_LISTEN,
BROKER_DB_REAPER_INTERVAL, BROKER_DB_CREATION_TIMEOUT.
"""

from __future__ import annotations

import datetime as dt
import os
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlsplit

from broker.errors import InvalidArgument
from ca.duration import parse_duration
from ca.errors import CAError
from ca.spiffeid import SpiffeId

__all__ = [
    "DEFAULT_ATTEST_LISTEN",
    "DEFAULT_DATA_DIR",
    "DEFAULT_LISTEN",
    "AuditConfig",
    "CAConfig",
    "Config",
    "DatabaseConfig",
    "IdentityConfig",
    "KeysConfig",
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
        host = parts.hostname or ""
        port = f":{parts.port}" if parts.port else ""
        netloc = f"{quote(user, safe='')}:{quote(password, safe='')}@{host}{port}"
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


@dataclass(frozen=True)
class DatabaseConfig:
    """Dynamic database credentials: how often the lease reaper runs, and how long a lease may
    stay pending before its creation counts as failed (and its user, if any, is dropped)."""

    reaper_interval: dt.timedelta = dt.timedelta(seconds=1)
    creation_timeout: dt.timedelta = dt.timedelta(seconds=30)


@dataclass(frozen=True)
class AuditConfig:
    """The audit ledger: how often a signed checkpoint is made (docs/ledger.md)."""

    checkpoint_interval: dt.timedelta = dt.timedelta(hours=1)


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
    audit: AuditConfig = field(default_factory=AuditConfig)
    dev: bool = False

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
                if not SpiffeId.parse(op).member_of(td):
                    raise InvalidArgument(f"operator {op} is not in trust domain {td}")
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
        if urlsplit(self.storage.dsn).password:
            raise InvalidArgument(
                "config: storage.dsn must not contain a password; "
                "use storage.password_file or storage.password_env"
            )
        if not dt.timedelta(seconds=1) <= self.database.creation_timeout <= dt.timedelta(hours=1):
            raise InvalidArgument("config: database.creation_timeout must be between 1s and 1h")
        if not dt.timedelta(0) < self.database.reaper_interval <= dt.timedelta(minutes=10):
            raise InvalidArgument("config: database.reaper_interval must be between 0 and 10m")
        if not dt.timedelta(minutes=1) <= self.audit.checkpoint_interval <= dt.timedelta(days=7):
            raise InvalidArgument("config: audit.checkpoint_interval must be between 1m and 7d")
        if "pin-value" in self.keys.uri:
            raise InvalidArgument("config: keys.uri must not contain a PIN; use keys.pin_source")
        return self


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


def _duration(section: Mapping[str, Any], key: str, default: dt.timedelta) -> dt.timedelta:
    if key not in section:
        return default
    try:
        return parse_duration(str(section[key]))
    except CAError as exc:
        raise InvalidArgument(f"config: {key}: {exc}") from exc


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
        "audit",
    },
    "audit": {"checkpoint_interval"},
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
    "database": {"reaper_interval", "creation_timeout"},
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
    )
    aud = doc.get("audit", {})
    audit = AuditConfig(
        checkpoint_interval=_duration(aud, "checkpoint_interval", AuditConfig.checkpoint_interval),
    )
    return Config(
        audit=audit,
        database=database,
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
        ),
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
            database = replace(database, **{name: _duration(env, var, dt.timedelta(0))})
    config = replace(config, database=database)
    if "BROKER_AUDIT_CHECKPOINT_INTERVAL" in env:
        interval = _duration(env, "BROKER_AUDIT_CHECKPOINT_INTERVAL", dt.timedelta(0))
        config = replace(config, audit=replace(config.audit, checkpoint_interval=interval))
    return replace(config, server=server, storage=storage, keys=keys, trust_domain=trust_domain)


def load_config(path: Path, environ: Mapping[str, str] | None = None) -> Config:
    """Read a TOML config file, apply env overrides, validate. Raises InvalidArgument."""
    try:
        doc = tomllib.loads(path.read_text())
    except OSError as exc:
        raise InvalidArgument(f"cannot read config {path}: {exc.strerror}") from exc
    except tomllib.TOMLDecodeError as exc:
        raise InvalidArgument(f"config {path} is not valid TOML: {exc}") from exc
    return apply_env(config_from_document(doc, path.parent.resolve()), environ).validate()
