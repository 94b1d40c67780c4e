"""`broker dev pull`: copy the dev-environment secrets the developer may read into the vault.

Production is never pulled: an environment named like production (`PRODUCTION_NAMES`) is
refused before anything is asked, and the broker itself refuses a read declared as a dev pull
(purpose `dev-pull`) of a secret whose environment its policy marks as production
(`secrets.justification_required`). The TTL is capped (`MAX_TTL`, 8 h). Each read is audited
at the broker as the developer's identity with the purpose `dev-pull`.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Final, Protocol

from .vault import DevVault, PulledValue

__all__ = [
    "DEV_PULL_PURPOSE",
    "MAX_TTL",
    "PRODUCTION_NAMES",
    "PullRefused",
    "PullReport",
    "check_pull",
    "pull",
]

DEV_PULL_PURPOSE: Final = "dev-pull"
MAX_TTL: Final = dt.timedelta(hours=8)
PRODUCTION_NAMES: Final = frozenset({"prod", "production", "prd", "live"})


class PullRefused(Exception):
    """The pull was refused before anything was read."""


class SecretsApi(Protocol):
    """What a pull needs from `broker.api.client.secrets.SecretsClient`."""

    def list_secrets(self, *, prefix: str = "", tenant: str = "") -> Sequence[Any]: ...

    def get(
        self, reference: str, *, version: int = 0, tenant: str = "", purpose: str = ""
    ) -> Any: ...


@dataclass
class PullReport:
    stored: int = 0
    dropped: list[str] = field(default_factory=list)
    refused: list[tuple[str, str]] = field(default_factory=list)  # (reference, why)
    expires_at: dt.datetime | None = None


def check_pull(environment: str, ttl: dt.timedelta, cap: dt.timedelta = MAX_TTL) -> None:
    if environment.lower() in PRODUCTION_NAMES or environment.lower().startswith("prod"):
        raise PullRefused(
            f"environment {environment!r} is production: production secrets are never pulled "
            "into a dev vault (use 'broker exec' on a production host)"
        )
    if ttl <= dt.timedelta(0):
        raise PullRefused("--ttl must be positive")
    if ttl > cap:
        raise PullRefused(
            f"--ttl {int(ttl.total_seconds())}s is over the cap of {int(cap.total_seconds())}s "
            f"({cap.total_seconds() / 3600:g} h)"
        )


def pull(
    vault: DevVault,
    api: SecretsApi,
    environment: str,
    ttl: dt.timedelta,
    *,
    service: str = "",
    tenant: str = "",
    softhsm: bool = True,
    on_error: type[BaseException] | tuple[type[BaseException], ...] = Exception,
) -> PullReport:
    """Pull every active secret of `environment` (of `service` when given) the caller may
    read. A secret the broker refuses is reported, not fatal; an entry pulled before that is
    no longer readable (revoked, deleted, access withdrawn) is dropped from the vault, and a
    rotated one replaced by its current version."""
    check_pull(environment, ttl)
    prefix = f"secret://{service}/{environment}/" if service else ""
    report = PullReport()
    values: list[PulledValue] = []
    for meta in api.list_secrets(prefix=prefix, tenant=tenant):
        if meta.environment != environment or meta.state != "active" or meta.missing:
            continue
        try:
            read = api.get(meta.reference, tenant=tenant, purpose=DEV_PULL_PURPOSE)
        except on_error as exc:
            report.refused.append((meta.reference, str(exc).splitlines()[0][:300]))
            continue
        values.append(PulledValue(meta.reference, environment, read.version, read.value))
    report.stored, report.dropped = vault.store(environment, values, ttl, softhsm=softhsm)
    report.expires_at = vault.now() + ttl
    return report
