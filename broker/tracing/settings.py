"""The `[tracing]` section of the config file and its environment overrides.

    [tracing]
    endpoint = "http://127.0.0.1:4317"   # OTLP/gRPC; "" (default) = tracing off
    ca_file = "collector-ca.pem"          # https:// endpoints: the CA of the collector's cert
    sample_ratio = 1.0                    # of new traces; a caller's traceparent decides its own
    service_name = "credential-broker"    # the resource's service.name
    timeout = "10s"                       # one export call

Environment (after the file): `BROKER_OTLP_ENDPOINT`, else the standard
`OTEL_EXPORTER_OTLP_TRACES_ENDPOINT` / `OTEL_EXPORTER_OTLP_ENDPOINT` when the file names none;
`OTEL_SDK_DISABLED=true` turns tracing off whatever else says. No broker import here (the
config module imports this one).
"""

from __future__ import annotations

import datetime as dt
import math
from collections.abc import Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from broker.errors import InvalidArgument
from ca.duration import parse_duration
from ca.errors import CAError

__all__ = ["DEFAULT_SERVICE_NAME", "TracingConfig", "tracing_config", "tracing_env"]

DEFAULT_SERVICE_NAME = "credential-broker"
_KEYS = {"endpoint", "ca_file", "sample_ratio", "service_name", "timeout"}


@dataclass(frozen=True)
class TracingConfig:
    """OpenTelemetry traces exported over OTLP/gRPC (docs/observability.md, "Traces")."""

    endpoint: str = ""  # http://HOST:PORT (plaintext) or https://HOST:PORT; "" = off
    ca_file: Path | None = None
    sample_ratio: float = 1.0
    service_name: str = DEFAULT_SERVICE_NAME
    timeout: dt.timedelta = dt.timedelta(seconds=10)

    @property
    def enabled(self) -> bool:
        return bool(self.endpoint)

    @property
    def insecure(self) -> bool:
        """Plaintext to the collector (an http:// endpoint)."""
        return self.endpoint.startswith("http://")


def _check(config: TracingConfig) -> TracingConfig:
    if config.endpoint:
        parts = urlsplit(config.endpoint)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise InvalidArgument(
                f"config: tracing.endpoint must be http://HOST:PORT or https://HOST:PORT "
                f"(OTLP/gRPC), got {config.endpoint!r}"
            )
        try:
            parts.port  # noqa: B018 (validates the port)
        except ValueError:
            raise InvalidArgument("config: tracing.endpoint has an invalid port") from None
        if parts.username or parts.password:
            raise InvalidArgument("config: tracing.endpoint must not carry credentials")
    if not (math.isfinite(config.sample_ratio) and 0.0 <= config.sample_ratio <= 1.0):
        raise InvalidArgument("config: tracing.sample_ratio must be between 0 and 1")
    if not config.service_name or len(config.service_name) > 128:
        raise InvalidArgument("config: tracing.service_name must be 1-128 characters")
    if config.timeout <= dt.timedelta(0):
        raise InvalidArgument("config: tracing.timeout must be positive")
    return config


def tracing_config(section: Any, base_dir: Path) -> TracingConfig:
    """The `[tracing]` table (relative `ca_file` against `base_dir`); InvalidArgument for an
    unknown key or a bad value."""
    if not isinstance(section, Mapping):
        raise InvalidArgument("config: [tracing] must be a table")
    unknown = sorted(set(section) - _KEYS)
    if unknown:
        raise InvalidArgument(f"config: unknown key {unknown[0]!r} in [tracing]")
    ca = section.get("ca_file")
    timeout = TracingConfig.timeout
    if "timeout" in section:
        try:
            timeout = parse_duration(str(section["timeout"]))
        except CAError as exc:
            raise InvalidArgument(f"config: tracing.timeout: {exc}") from exc
    ratio = section.get("sample_ratio", TracingConfig.sample_ratio)
    if isinstance(ratio, bool) or not isinstance(ratio, int | float):
        raise InvalidArgument("config: tracing.sample_ratio must be a number between 0 and 1")
    return _check(
        TracingConfig(
            endpoint=str(section.get("endpoint", "")).strip(),
            ca_file=None if ca is None else base_dir / str(ca),
            sample_ratio=float(ratio),
            service_name=str(section.get("service_name", DEFAULT_SERVICE_NAME)),
            timeout=timeout,
        )
    )


def tracing_env(config: TracingConfig, env: Mapping[str, str]) -> TracingConfig:
    """`config` with the environment's say (see the module docstring)."""
    if env.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return replace(config, endpoint="")
    endpoint = env.get("BROKER_OTLP_ENDPOINT")
    if endpoint is None and not config.endpoint:
        endpoint = env.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT") or env.get(
            "OTEL_EXPORTER_OTLP_ENDPOINT"
        )
    if endpoint is None:
        return config
    return _check(replace(config, endpoint=endpoint.strip()))
