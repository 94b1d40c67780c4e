"""The agent's sync as a stream the broker pushes (`WatchAgent`), instead of a poll every
`sync_interval`.

`SyncStream.run()` runs beside `Agent.run()`: once the agent has attested it opens the stream
(one audited request), hands every sync the broker pushes to the agent (`Agent.pushed`), and
while the stream is up the agent's own poll is off. The broker sends a keepalive when nothing
changed for a minute; if nothing at all arrives for `silence` seconds (a broker that vanished
without closing the connection) the stream is cancelled. When it breaks the agent polls again
at once and the stream is re-opened with backoff and jitter (1 s doubling to 60 s) — on the
next broker address when several are configured (`broker.api.client.failover`). A broker that
does not know `WatchAgent` (UNIMPLEMENTED: an older broker) is polled as before, and asked
again for a stream only after `retry_unsupported` seconds (it may have been upgraded).

The stream is read on a worker thread (the gRPC client is blocking); pushed syncs cross to the
event loop through a queue.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import threading
from collections.abc import Iterator
from typing import Protocol

from broker.agent import Agent, SyncResult

__all__ = ["StreamUnsupported", "SyncStream", "SyncWatch", "WatchingLink"]

log = logging.getLogger("broker.agent")

BACKOFF_MIN = 1.0
BACKOFF_MAX = 60.0
JITTER = 0.2


class StreamUnsupported(Exception):
    """The broker does not offer the sync stream (UNIMPLEMENTED)."""


class SyncWatch(Protocol):
    """An open stream: iterate it for pushed syncs (None for a keepalive); `cancel` ends it
    (the iteration then raises). Iteration raises `StreamUnsupported` or a
    `broker.errors.BrokerError` when the stream fails."""

    def __iter__(self) -> Iterator[SyncResult | None]: ...

    def cancel(self) -> None: ...


class WatchingLink(Protocol):
    def watch(self, agent_id: str) -> SyncWatch: ...


_END = object()


class SyncStream:
    def __init__(
        self,
        agent: Agent,
        link: WatchingLink,
        *,
        silence: float = 150.0,
        retry_unsupported: float = 600.0,
        rng: random.Random | None = None,
    ) -> None:
        self._agent = agent
        self._link = link
        self._silence = silence
        self._retry_unsupported = retry_unsupported
        self._rng = rng or random.Random()  # noqa: S311 (jitter, not a secret)
        self._failures = 0
        self.opened = 0  # streams opened (each is one audited request)
        self.pushed = 0  # syncs received

    async def run(self) -> None:
        """Follow the stream until cancelled (see the module docstring)."""
        await self._agent.ready_to_sync.wait()
        while True:
            try:
                await self._follow()
                self._failures = 0 if self.pushed else self._failures
            except StreamUnsupported:
                log.info(
                    "the broker has no sync stream (an older broker): polling every %.0f s",
                    self._agent.sync_interval,
                )
                self._agent.stream_up(False)
                await asyncio.sleep(self._retry_unsupported)
                continue
            except asyncio.CancelledError:
                self._agent.stream_up(False)
                raise
            except Exception as exc:
                self._agent.stream_up(False)
                self._failures += 1
                delay = min(BACKOFF_MAX, BACKOFF_MIN * 2.0 ** (self._failures - 1))
                delay *= 1 + self._rng.uniform(-JITTER, JITTER)
                log.warning("the sync stream broke (re-opening in %.1f s): %s", delay, exc)
                await asyncio.sleep(delay)

    async def _follow(self) -> None:
        agent_id = self._agent.agent_id
        if agent_id is None:
            raise RuntimeError("the agent has not attested")
        watch = await asyncio.to_thread(self._link.watch, agent_id)
        self.opened += 1
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[object] = asyncio.Queue()

        def hand(item: object) -> None:
            with contextlib.suppress(RuntimeError):  # the loop closed (the agent stopped)
                loop.call_soon_threadsafe(queue.put_nowait, item)

        def read() -> None:
            try:
                for item in watch:
                    hand(item)
            except BaseException as exc:  # handed to the event loop
                hand(exc)
                return
            hand(_END)

        reader = threading.Thread(target=read, name="sync-stream", daemon=True)
        reader.start()
        identity = self._agent.identity_serial
        try:
            while True:
                try:
                    item = await asyncio.wait_for(queue.get(), self._silence)
                except TimeoutError:
                    raise ConnectionError(
                        f"nothing from the broker's sync stream for {self._silence:.0f} s"
                    ) from None
                if isinstance(item, BaseException):
                    if self._agent.identity_serial != identity:
                        return  # the agent renewed its SVID and closed the old connection
                    raise item
                if item is _END:
                    raise ConnectionError("the broker ended the sync stream")
                if item is not None:
                    assert isinstance(item, SyncResult)
                    await self._agent.pushed(item)
                    self.pushed += 1
                    self._failures = 0
                self._agent.stream_up(True)
                if self._agent.identity_serial != identity:
                    # The agent renewed its SVID (a new mTLS connection): re-open on it.
                    return
        finally:
            watch.cancel()
            with contextlib.suppress(Exception):
                await asyncio.to_thread(reader.join, 5.0)
