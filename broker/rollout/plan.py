"""What an operator asks of a staged rollout (`--stages`, `--bake`, `--max-failures`,
`--health-check`), validated, and where a consumer lands: its stage, from a hash of its SPIFFE
ID.

Stages are cumulative percentages of consumers (`10%,50%,100%`): strictly increasing, the last
100 %. A consumer's bucket is the first 8 bytes of SHA-256(reference, SPIFFE ID) modulo 100; it
is in the first stage whose percentage is above its bucket, so the same identity always lands
in the same stage of a secret's rollouts, and different secrets canary different consumers.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import ipaddress
import itertools
import re
import shlex
import urllib.parse
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Final

from broker.errors import InvalidArgument

__all__ = [
    "DEFAULT_BAKE",
    "MAX_BAKE",
    "HealthCheck",
    "RolloutPlan",
    "bucket",
    "check_bake",
    "check_stages",
    "stage_of",
]

DEFAULT_BAKE: Final = dt.timedelta(minutes=5)
MAX_BAKE: Final = dt.timedelta(hours=24)
MAX_STAGES: Final = 10
MAX_FAILURES: Final = 1000
MAX_CHECK: Final = 1024


def check_stages(stages: Sequence[int]) -> tuple[int, ...]:
    if not stages:
        raise InvalidArgument("--stages needs at least one stage, e.g. 10%,50%,100%")
    if len(stages) > MAX_STAGES:
        raise InvalidArgument(f"--stages has at most {MAX_STAGES} stages")
    for before, after in itertools.pairwise(stages):
        if after <= before:
            raise InvalidArgument(
                f"stages go backwards or repeat ({before}% then {after}%): each stage must "
                "reach more consumers than the one before"
            )
    if stages[-1] != 100:
        raise InvalidArgument(
            f"the last stage is {stages[-1]}%: stages must end at 100% so every consumer "
            "gets the new version"
        )
    if any(not 1 <= s <= 100 for s in stages):
        raise InvalidArgument("stages are percentages from 1% to 100%")
    return tuple(stages)


def check_bake(bake: dt.timedelta) -> dt.timedelta:
    if bake <= dt.timedelta(0):
        raise InvalidArgument("--bake must be longer than 0: each stage bakes before the next")
    if bake > MAX_BAKE:
        raise InvalidArgument(
            "--bake is at most 24h: the old version is revoked at the latest when its 24 h "
            "rollback window ends"
        )
    return bake


def bucket(reference: str, identity: str) -> int:
    """0..99, from SHA-256 over the reference and the consumer's SPIFFE ID."""
    digest = hashlib.sha256(f"{reference}\n{identity}".encode()).digest()
    return int.from_bytes(digest[:8], "big") % 100


def stage_of(stages: Sequence[int], reference: str, identity: str) -> int:
    """The index of the stage `identity` belongs to."""
    b = bucket(reference, identity)
    for index, percent in enumerate(stages):
        if b < percent:
            return index
    return len(stages) - 1


@dataclass(frozen=True)
class HealthCheck:
    """The operator's `--health-check`: an http(s) URL (GET; 2xx passes) or a command (run
    without a shell; exit 0 passes)."""

    text: str

    @property
    def is_url(self) -> bool:
        return self.text.startswith(("http://", "https://"))

    @property
    def argv(self) -> list[str]:
        return shlex.split(self.text)

    @classmethod
    def parse(cls, text: str, *, loopback_only: bool) -> HealthCheck | None:
        text = (text or "").strip()
        if not text:
            return None
        if len(text) > MAX_CHECK:
            raise InvalidArgument(f"--health-check is at most {MAX_CHECK} characters")
        if not (text.isprintable() and text.isascii()):
            raise InvalidArgument("--health-check must be printable ASCII")
        scheme = re.match(r"^([A-Za-z][A-Za-z0-9+.-]*)://", text)
        if scheme is not None and scheme.group(1).lower() not in ("http", "https"):
            raise InvalidArgument(
                f"--health-check URL scheme {scheme.group(1)!r} is not supported: give an "
                "http:// or https:// URL, or a command"
            )
        check = cls(text)
        if check.is_url:
            url = urllib.parse.urlsplit(text)
            host = url.hostname or ""
            if not host:
                raise InvalidArgument("--health-check URL has no host")
            if loopback_only and not _loopback(host):
                raise InvalidArgument(
                    f"--health-check URL host {host!r} is not loopback: this broker only "
                    "checks loopback URLs (localhost, 127.0.0.0/8, ::1)"
                )
        else:
            try:
                argv = check.argv
            except ValueError as exc:
                raise InvalidArgument(f"--health-check command does not parse: {exc}") from None
            if not argv:
                raise InvalidArgument("--health-check command is empty")
        return check


def _loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


@dataclass(frozen=True)
class RolloutPlan:
    """A validated plan: stages, bake per stage, failures tolerated, the operator's check."""

    stages: tuple[int, ...]
    bake: dt.timedelta = DEFAULT_BAKE
    max_failures: int = 0
    health_check: HealthCheck | None = None

    @classmethod
    def build(
        cls,
        stages: Sequence[int],
        bake: dt.timedelta,
        max_failures: int,
        health_check: str,
        *,
        window: dt.timedelta,
        loopback_only: bool,
    ) -> RolloutPlan:
        checked = check_stages(stages)
        check_bake(bake)
        if not 0 <= max_failures <= MAX_FAILURES:
            raise InvalidArgument(f"--max-failures must be 0..{MAX_FAILURES}")
        if bake * len(checked) > window:
            raise InvalidArgument(
                f"{len(checked)} stages of {_text(bake)} bake take longer than the old "
                f"version's {_text(window)} rollback window: use fewer stages or a shorter "
                "--bake"
            )
        return cls(
            checked,
            bake,
            max_failures,
            HealthCheck.parse(health_check, loopback_only=loopback_only),
        )


def _text(delta: dt.timedelta) -> str:
    seconds = int(delta.total_seconds())
    if seconds % 3600 == 0:
        return f"{seconds // 3600}h"
    if seconds % 60 == 0:
        return f"{seconds // 60}m"
    return f"{seconds}s"
