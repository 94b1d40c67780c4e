"""Leader-held jobs (the lease reaper, scheduled static-role rotation, staged rollouts): a round
every `interval` seconds, each round taking the job's lease first so only one replica acts, and
the lease released on the way out so another replica takes over at once instead of when it
expires."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import Protocol


class LeaseReleaser(Protocol):
    async def release_lease(self, name: str, owner: str) -> None: ...


async def lead_rounds(
    tick: Callable[[], Awaitable[object]],
    *,
    interval: float,
    locks: LeaseReleaser,
    lease: str,
    owner: str,
    what: str,
    log: logging.Logger,
) -> None:
    """Run `tick` every `interval` seconds until cancelled; a failed round is logged and the
    next one tried (`what` names the job in the log)."""
    try:
        while True:
            try:
                await tick()
            except Exception:
                log.exception("%s round failed; retrying", what)
            await asyncio.sleep(interval)
    finally:
        try:
            await asyncio.shield(locks.release_lease(lease, owner))
        except Exception:  # shutting down; the lease expires anyway
            log.debug("releasing the %s lease failed", what, exc_info=True)
