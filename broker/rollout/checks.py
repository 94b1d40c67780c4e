"""The operator's `--health-check`, run by the broker during a rollout: an http(s) GET (2xx
passes; redirects are not followed, so a loopback URL cannot send the broker elsewhere) or a
command run without a shell (exit 0 passes). The command gets the rollout's reference, versions
and stage in its environment, never the secret's value."""

from __future__ import annotations

import asyncio
import contextlib
import os
import urllib.error
import urllib.request
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Protocol

from broker.rollout.plan import HealthCheck

__all__ = ["CheckResult", "HealthChecker", "ProcessHealthChecker"]

_DETAIL = 200


@dataclass(frozen=True)
class CheckResult:
    passed: bool
    detail: str


class HealthChecker(Protocol):
    async def run(self, check: HealthCheck, env: Mapping[str, str]) -> CheckResult: ...


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args: object, **kwargs: object) -> None:
        return None


class ProcessHealthChecker:
    """`HealthChecker` for real URLs and commands, each bounded by `timeout` seconds."""

    def __init__(self, timeout: float = 10.0) -> None:
        self.timeout = timeout
        self._opener = urllib.request.build_opener(_NoRedirect())

    async def run(self, check: HealthCheck, env: Mapping[str, str]) -> CheckResult:
        if check.is_url:
            return await asyncio.to_thread(self._get, check.text)
        return await self._command(check.argv, env)

    def _get(self, url: str) -> CheckResult:
        try:
            with self._opener.open(url, timeout=self.timeout) as response:
                status = response.status
        except urllib.error.HTTPError as exc:
            status = exc.code
        except (urllib.error.URLError, OSError, ValueError) as exc:
            reason = getattr(exc, "reason", exc)
            return CheckResult(False, f"GET failed: {reason}"[:_DETAIL])
        if 200 <= status < 300:
            return CheckResult(True, f"HTTP {status}")
        return CheckResult(False, f"HTTP {status}")

    async def _command(self, argv: list[str], env: Mapping[str, str]) -> CheckResult:
        try:
            process = await asyncio.create_subprocess_exec(
                *argv,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.DEVNULL,
                stderr=asyncio.subprocess.PIPE,
                env={**os.environ, **env},
            )
        except OSError as exc:
            return CheckResult(False, f"cannot run {argv[0]!r}: {exc.strerror or exc}"[:_DETAIL])
        try:
            _, stderr = await asyncio.wait_for(process.communicate(), self.timeout)
        except TimeoutError:
            with contextlib.suppress(ProcessLookupError):
                process.kill()
            await process.wait()
            return CheckResult(False, f"timed out after {self.timeout:g}s")
        if process.returncode == 0:
            return CheckResult(True, "exit 0")
        last = (stderr or b"").decode(errors="replace").strip().splitlines()[-1:] or [""]
        return CheckResult(False, f"exit {process.returncode}: {last[0]}"[:_DETAIL].rstrip(": "))
