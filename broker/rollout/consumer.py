"""The consumer's side of a rollout, for the agent (`broker agent --secret ... --on-rotate CMD
--health-check CMD`): once new secret files are written, run the `--on-rotate` hook (the
service reloads), then the health check; report to the broker which version each file now
holds and whether the check passed. While a rollout of the secret is running the check runs
and is reported again at every refresh, so a consumer that turns unhealthy later is counted too.

No grpc and no broker internals here: the broker is reached through a `RolloutReporter`
(`broker.api.client.rollout.BrokerRolloutReporter`). Commands run without a shell.
"""

from __future__ import annotations

import logging
import os
import shlex
import subprocess
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol

__all__ = ["CommandResult", "ConsumerReports", "RolloutReporter", "run_command"]

log = logging.getLogger(__name__)

_DETAIL = 200


class RolloutReporter(Protocol):
    def report(self, reference: str, version: int, healthy: bool, detail: str = "") -> bool:
        """Send one report; True while a rollout of the secret is running."""
        ...


@dataclass(frozen=True)
class CommandResult:
    ok: bool
    detail: str


def run_command(command: str, env: Mapping[str, str], timeout: float = 60.0) -> CommandResult:
    """Run `command` (split like a shell would, but without one); exit 0 is success."""
    try:
        done = subprocess.run(
            shlex.split(command),
            env={**os.environ, **env},
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            timeout=timeout,
            check=False,
        )
    except subprocess.TimeoutExpired:
        return CommandResult(False, f"timed out after {timeout:g}s")
    except (OSError, ValueError) as exc:
        return CommandResult(False, f"cannot run: {exc}"[:_DETAIL])
    if done.returncode == 0:
        return CommandResult(True, "")
    last = (done.stderr or b"").decode(errors="replace").strip().splitlines()[-1:] or [""]
    return CommandResult(False, f"exit {done.returncode}: {last[0]}"[:_DETAIL].rstrip(": "))


@dataclass(frozen=True)
class Synced:
    """One secret file after a refresh: its reference, whether it was (re)written, the version
    it holds (0: none)."""

    name: str
    reference: str
    written: bool
    version: int


class ConsumerReports:
    def __init__(
        self,
        reporter: RolloutReporter,
        *,
        on_rotate: str | None = None,
        health_check: str | None = None,
        run: Callable[[str, Mapping[str, str]], CommandResult] = run_command,
    ) -> None:
        self._reporter = reporter
        self._on_rotate = on_rotate
        self._check = health_check
        self._run = run
        self._watching: set[str] = set()  # references with a rollout running

    def after_sync(self, synced: Sequence[Synced]) -> dict[str, bool]:
        """Hook, check and report after one refresh; {reference: healthy} of what was
        reported."""
        written = [s for s in synced if s.written and s.version]
        due = written + [
            s for s in synced if not s.written and s.version and s.reference in self._watching
        ]
        if not due:
            return {}
        env = {f"BROKER_SECRET_VERSION_{_env_name(s.name)}": str(s.version) for s in synced}
        healthy, detail = True, ""
        if written and self._on_rotate:
            hook = self._run(self._on_rotate, env)
            if not hook.ok:
                healthy, detail = False, f"--on-rotate failed: {hook.detail}"
        if healthy and self._check:
            check = self._run(self._check, env)
            if not check.ok:
                healthy, detail = False, f"--health-check failed: {check.detail}"
        out = {}
        for s in due:
            try:
                running = self._reporter.report(s.reference, s.version, healthy, detail)
            except Exception as exc:  # the broker away: the next refresh reports again
                log.warning("rollout report for secret file %s not sent: %s", s.name, exc)
                continue
            out[s.reference] = healthy
            if running:
                self._watching.add(s.reference)
            else:
                self._watching.discard(s.reference)
        return out


def _env_name(name: str) -> str:
    return "".join(c if c.isalnum() else "_" for c in name).upper()
