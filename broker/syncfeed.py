"""Change notification for the agents' sync streams (`WatchAgent`).

Every subscribed agent waits on one `SyncFeed`; a change to what an agent sync says — a
registration entry created or deleted, the bundle (a CA rotation), the denylist — bumps the
feed's version and wakes every waiter, which then re-reads its own sync and pushes it only if it
differs from the last one it sent.

Where changes come from:
- in-process: `IdentityService` calls `changed()` right after it stores an entry or a denial;
- another replica on the same database: each replica polls a cheap fingerprint of the shared
  state (`observe`) on its background loop (every `server` sync interval, 2 s): the CA journal's
  bundle sequence (already re-read there for rotations), the denylist (already re-read there),
  and one aggregate over the registration entries (`COUNT(*)`, `MAX(created_at)`). A replica
  thus learns of another's change within one interval; no LISTEN/NOTIFY is needed, so SQLite
  and PostgreSQL behave alike.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Hashable

__all__ = ["SyncFeed"]


class SyncFeed:
    def __init__(self) -> None:
        self._version = 0
        self._next: asyncio.Future[int] | None = None
        self._fingerprint: Hashable | None = None
        self.subscribers = 0

    @property
    def version(self) -> int:
        return self._version

    def changed(self) -> None:
        """Something an agent sync reports changed: wake every subscriber."""
        self._version += 1
        waiting, self._next = self._next, None
        if waiting is not None and not waiting.done():
            waiting.set_result(self._version)

    def observe(self, fingerprint: Hashable) -> bool:
        """Record the shared state's fingerprint; a change from the last one observed (not the
        first observation) is a change. Returns whether it was one."""
        previous, self._fingerprint = self._fingerprint, fingerprint
        if previous is None or previous == fingerprint:
            return False
        self.changed()
        return True

    async def wait(self, version: int, within: float) -> int:
        """The feed's version once it differs from `version`, or after `within` seconds."""
        if self._version != version:
            return self._version
        if self._next is None or self._next.done():
            self._next = asyncio.get_running_loop().create_future()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(asyncio.shield(self._next), within)
        return self._version
