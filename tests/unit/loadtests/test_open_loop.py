"""The generator's open loop (`--rate`): the number of requests sent follows the schedule,
not the server's speed. A fake client answers at once; no timing is asserted."""

from __future__ import annotations

from dataclasses import dataclass

from loadtests import generator, hist


class _InstantClient:
    async def open(self) -> None:
        return None

    async def call(self, index: int) -> None:
        return None

    def classify(self, exc: BaseException) -> str:
        return type(exc).__name__

    async def close(self) -> None:
        return None


@dataclass(frozen=True)
class _InstantSpec:
    mode: str = "async"
    payload_count: int = 4

    def make(self) -> _InstantClient:
        return _InstantClient()

    def operation(self, index: int) -> str:
        return "instant"


def test_open_loop_sends_rate_times_duration() -> None:
    out = generator.run_load(
        _InstantSpec(),
        concurrency=4,
        processes=1,
        warmup=0.0,
        duration=1.0,
        request_timeout=5.0,
        use_uvloop=False,
        rate=60.0,
    )
    # 60 intended sends in the 1 s window (one every 1/60 s across 4 users), however fast
    # the "server" answers; a closed loop would have sent thousands.
    assert 59 <= out.ok <= 61, out.ok
    assert out.errors == {}
    assert out.operations["instant"]["ok"] == out.ok
    assert hist.decode(out.histogram).get_total_count() == out.ok
