"""The runtime SDK: resolve `secret://` references for a running service, with a short cache.

    from broker.api.client.sdk import SecretResolver
    from broker.api.client.base import BrokerClient, ClientCredentials
    from broker.api.client.secrets import BrokerSecretSource, SecretsClient

    client = BrokerClient("broker.internal:8443", ClientCredentials(chain, key, bundle))
    secrets = SecretResolver(BrokerSecretSource(SecretsClient(client)))
    api_key = secrets.get("secret://payments/prod/stripe/api-key")   # bytes

Cache contract (times from the injected clock's monotonic scale):
- a value is served from the cache for at most `ttl` (5 minutes at most) after it was fetched;
- after `refresh_after` (80 % of the TTL by default) the next `get` fetches again, so a busy
  service never sees its cache expire; `refresh_due()` does the same for every entry (call it
  from a timer to refresh idle entries too);
- if the broker is unreachable (`SecretUnavailable`) while the cached value is still within its
  TTL, the cached value is served; past the TTL the error is raised;
- a refusal (`SecretRefused`: revoked, permission denied, missing metadata, ...) drops the
  cached value at once and is raised: revocation reaches a service at its next refresh.

Staged rollouts (docs/rotation.md): pass `on_update` (called with the reference and the new
`FetchedSecret` whenever a fetch brings a version the resolver did not hold; the service applies
it and returns whether it still works) and `reporter` (a
`broker.api.client.rollout.BrokerRolloutReporter`): the result is reported to the broker, which
rolls the version back if its consumers fail. `report()` reports health at any other time.

No grpc here: the transport is any `SecretSource` (see `broker.api.client.secrets`).
Thread-safe; values are held in memory only.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Final, Protocol

from broker import metrics
from ca.clock import Clock, SystemClock

__all__ = [
    "MAX_TTL_SECONDS",
    "FetchedSecret",
    "SecretRefused",
    "SecretResolver",
    "SecretSource",
    "SecretUnavailable",
    "VersionReporter",
]

MAX_TTL_SECONDS: Final = 300.0


class SecretUnavailable(Exception):
    """The broker could not be reached (or is overloaded); worth retrying."""


class SecretRefused(Exception):
    """The broker refused: `code` is the gRPC status name (e.g. "FAILED_PRECONDITION")."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message


@dataclass(frozen=True)
class FetchedSecret:
    value: bytes
    version: int


class SecretSource(Protocol):
    def fetch(self, reference: str) -> FetchedSecret:
        """The current value; raises `SecretUnavailable` or `SecretRefused`."""
        ...


class VersionReporter(Protocol):
    def report(self, reference: str, version: int, healthy: bool, detail: str = "") -> bool:
        """Tell the broker which version this consumer serves and whether it works."""
        ...


@dataclass
class _Entry:
    secret: FetchedSecret
    fetched_at: float


class SecretResolver:
    def __init__(
        self,
        source: SecretSource,
        *,
        clock: Clock | None = None,
        ttl_seconds: float = MAX_TTL_SECONDS,
        refresh_fraction: float = 0.8,
        on_update: Callable[[str, FetchedSecret], bool] | None = None,
        reporter: VersionReporter | None = None,
    ) -> None:
        if not 0 < ttl_seconds <= MAX_TTL_SECONDS:
            raise ValueError(f"ttl_seconds must be in (0, {MAX_TTL_SECONDS:g}]")
        if not 0 < refresh_fraction < 1:
            raise ValueError("refresh_fraction must be between 0 and 1")
        self._source = source
        self._clock = clock or SystemClock()
        self._ttl = ttl_seconds
        self._refresh_after = ttl_seconds * refresh_fraction
        self._cache: dict[str, _Entry] = {}
        self._lock = threading.Lock()
        self._on_update = on_update
        self._reporter = reporter

    def get(self, reference: str) -> bytes:
        """The value of `reference` (see the module docstring for the cache contract)."""
        return self.get_versioned(reference).value

    def get_text(self, reference: str, encoding: str = "utf-8") -> str:
        return self.get(reference).decode(encoding)

    def get_versioned(self, reference: str) -> FetchedSecret:
        now = self._clock.monotonic()
        with self._lock:
            entry = self._cache.get(reference)
        if entry is not None and now - entry.fetched_at < self._refresh_after:
            metrics.record_sdk_cache("secret", hit=True)
            return entry.secret
        metrics.record_sdk_cache("secret", hit=False)
        return self._fetch(reference, entry, now)

    def _fetch(self, reference: str, entry: _Entry | None, now: float) -> FetchedSecret:
        try:
            secret = self._source.fetch(reference)
        except SecretUnavailable:
            if entry is not None and now - entry.fetched_at < self._ttl:
                return entry.secret  # the broker is briefly away: serve within the TTL
            with self._lock:
                self._cache.pop(reference, None)
            raise
        except SecretRefused:
            with self._lock:
                self._cache.pop(reference, None)
            raise
        with self._lock:
            self._cache[reference] = _Entry(secret, now)
        self._updated(reference, entry, secret)
        return secret

    def _updated(self, reference: str, before: _Entry | None, secret: FetchedSecret) -> None:
        """A fetch brought a version the resolver did not hold: apply it (`on_update`) and
        report the outcome (`reporter`)."""
        if before is not None and before.secret.version == secret.version:
            return
        if self._on_update is None and self._reporter is None:
            return
        healthy, detail = True, ""
        if self._on_update is not None:
            try:
                healthy = bool(self._on_update(reference, secret))
            except Exception as exc:
                healthy, detail = False, f"on_update raised {type(exc).__name__}"
            if not healthy and not detail:
                detail = "on_update reported the new version unhealthy"
        self._send(reference, secret.version, healthy, detail)

    def _send(self, reference: str, version: int, healthy: bool, detail: str) -> None:
        if self._reporter is None:
            return
        try:
            self._reporter.report(reference, version, healthy, detail)
        except Exception:  # the broker away: reporting must never break a read
            return

    def report(self, reference: str, healthy: bool, detail: str = "") -> None:
        """Report the health of the version of `reference` this resolver holds (no-op when it
        holds none or has no reporter)."""
        with self._lock:
            entry = self._cache.get(reference)
        if entry is not None:
            self._send(reference, entry.secret.version, healthy, detail)

    def refresh_due(self) -> dict[str, Exception]:
        """Refresh every cached entry past its refresh point; the failures, by reference. An
        entry that could not be refreshed stays cached while within its TTL (broker
        unreachable) and is dropped on a refusal."""
        now = self._clock.monotonic()
        with self._lock:
            due = [r for r, e in self._cache.items() if now - e.fetched_at >= self._refresh_after]
        errors: dict[str, Exception] = {}
        for reference in due:
            try:
                secret = self._source.fetch(reference)
            except (SecretUnavailable, SecretRefused) as exc:
                errors[reference] = exc
                with self._lock:
                    entry = self._cache.get(reference)
                    if entry is not None and (
                        isinstance(exc, SecretRefused) or now - entry.fetched_at >= self._ttl
                    ):
                        del self._cache[reference]
                continue
            with self._lock:
                before = self._cache.get(reference)
                self._cache[reference] = _Entry(secret, now)
            self._updated(reference, before, secret)
        return errors

    def resolve_env(self, references: Mapping[str, str]) -> dict[str, str]:
        """{NAME: "secret://..."} -> {NAME: value} (values decoded as UTF-8)."""
        return {name: self.get_text(ref) for name, ref in references.items()}

    def resolve_config(self, document: Mapping[str, Any]) -> dict[str, Any]:
        """A copy of a configuration document (e.g. loaded TOML/JSON/YAML) with every
        `secret://` string value resolved; see `broker.secretrefs`."""
        from broker.secretrefs import resolve_config

        return resolve_config(document, self)

    def resolve_environ(self, environ: Mapping[str, str]) -> dict[str, str]:
        """The variables `NAME=secret://...` and `NAME_SECRET_REF=secret://...` of `environ`,
        resolved; see `broker.secretrefs`."""
        from broker.secretrefs import resolve_environ

        return resolve_environ(environ, self)

    def forget(self, reference: str | None = None) -> None:
        """Drop one cached value (all with None)."""
        with self._lock:
            if reference is None:
                self._cache.clear()
            else:
                self._cache.pop(reference, None)
