"""The agent's sync stream (`broker.agentstream`): pushed syncs are applied like polled ones and
the agent stops polling while the stream is up; it polls again at once when the stream breaks,
and keeps polling against a broker without the stream (UNIMPLEMENTED)."""

from __future__ import annotations

import asyncio
import queue
import random
from collections.abc import Iterator

import pytest

from broker.agent import Agent, SyncResult
from broker.agentstream import StreamUnsupported, SyncStream
from broker.errors import PermissionDenied, Unavailable
from ca.clock import FakeClock
from tests.unit.broker.test_agent import DB, WEB, FakeLink, _inline, clock, link

__all__ = ["clock", "link"]


class FakeWatch:
    def __init__(self) -> None:
        self.items: queue.Queue[object] = queue.Queue()
        self.cancelled = False

    def __iter__(self) -> Iterator[SyncResult | None]:
        while True:
            item = self.items.get(timeout=30)
            if isinstance(item, BaseException):
                raise item
            assert item is None or isinstance(item, SyncResult)
            yield item

    def cancel(self) -> None:
        self.cancelled = True
        self.items.put(Unavailable("cancelled"))


class WatchingLink(FakeLink):
    def __init__(self, base: FakeLink) -> None:
        super().__init__(base.ca, base.entries)
        self.watches: list[FakeWatch] = []
        self.unsupported = False

    def watch(self, agent_id: str) -> FakeWatch:
        self.calls.append("watch")
        if self.unsupported:
            raise StreamUnsupported("unknown method WatchAgent")
        w = FakeWatch()
        self.watches.append(w)
        w.items.put(self.sync())
        return w


@pytest.fixture
def wlink(link: FakeLink) -> WatchingLink:
    return WatchingLink(link)


@pytest.fixture
def agent(wlink: WatchingLink, clock: FakeClock) -> Agent:
    return Agent(
        wlink,
        clock,
        trust_anchors=[wlink.ca.root],
        sync_interval=5,
        rng=random.Random(7),
        blocking=_inline,
    )


async def _until(predicate: object, what: str) -> None:
    for _ in range(2000):
        if callable(predicate) and predicate():
            return
        await asyncio.sleep(0.005)
    raise AssertionError(f"timed out waiting for {what}")


async def test_pushed_syncs_are_applied_and_the_agent_stops_polling(
    agent: Agent, wlink: WatchingLink, clock: FakeClock
) -> None:
    await agent.step()  # attest, first (polled) sync, mint
    stream = SyncStream(agent, wlink, rng=random.Random(1))
    task = asyncio.create_task(stream.run())
    try:
        await _until(lambda: stream.pushed == 1 and agent._streaming, "the first push")
        wlink.calls.clear()
        for _ in range(3):  # rounds while the stream is up: no poll
            clock.advance(seconds=6)
            await agent.step()
        assert "sync" not in wlink.calls
        version = agent.snapshot.version
        wlink.entries = [WEB]  # the broker pushes the change
        wlink.watches[-1].items.put(wlink.sync())
        await _until(lambda: agent.snapshot.version != version, "the pushed change")
        with pytest.raises(PermissionDenied):
            agent.svids_for({"unix:uid:1001", "unix:gid:5"})  # DB's entry is gone
        wlink.watches[-1].items.put(None)  # a keepalive changes nothing
        await _until(lambda: wlink.watches[-1].items.empty(), "the keepalive")
        assert stream.opened == 1
    finally:
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task


async def test_a_broken_stream_makes_the_agent_poll_at_once_then_reopens(
    agent: Agent, wlink: WatchingLink, clock: FakeClock
) -> None:
    await agent.step()
    stream = SyncStream(agent, wlink, rng=random.Random(1))
    task = asyncio.create_task(stream.run())
    try:
        await _until(lambda: agent._streaming, "the stream")
        wlink.watches[-1].items.put(Unavailable("Socket closed"))
        await _until(lambda: not agent._streaming, "the break")
        wlink.calls.clear()
        await agent.step()
        assert "sync" in wlink.calls  # polled at once, not after the interval
        await _until(lambda: len(wlink.watches) == 2 and agent._streaming, "the re-opening")
        assert wlink.watches[0].cancelled
    finally:
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task


async def test_an_older_broker_without_the_stream_is_polled(
    agent: Agent, wlink: WatchingLink, clock: FakeClock
) -> None:
    wlink.unsupported = True
    await agent.step()
    stream = SyncStream(agent, wlink, rng=random.Random(1))
    task = asyncio.create_task(stream.run())
    try:
        await _until(lambda: "watch" in wlink.calls, "the attempt")
        await asyncio.sleep(0.05)
        assert not agent._streaming and stream.opened == 0
        wlink.calls.clear()
        wlink.entries = [WEB, DB][:1]
        clock.advance(seconds=6)
        await agent.step()
        assert wlink.calls.count("sync") == 1  # polls as before
        with pytest.raises(PermissionDenied):
            agent.svids_for({"unix:uid:1001", "unix:gid:5"})
    finally:
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
