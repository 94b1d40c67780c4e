"""`FailoverChannel`: calls go to the current address and stay there while it answers; an
address that stops answering is put on backoff (with jitter) and the next becomes current; a
call that never reached a broker is sent again to the next address, one that may have reached
it is not (no request is ever sent twice); answers of the broker itself (its correlation id came
back) never move the client."""

from __future__ import annotations

import random
from collections.abc import Callable
from typing import Any

import grpc
import pytest

from broker.api.client.failover import (
    BACKOFF_MAX,
    FailoverChannel,
    open_channel,
    resolve_targets,
    split_targets,
)


class FakeRpcError(grpc.RpcError, grpc.Call):  # type: ignore[misc]
    def __init__(self, code: grpc.StatusCode, details: str, answered: bool = False) -> None:
        self._code = code
        self._details = details
        self._trailing = (("x-correlation-id", "abc"),) if answered else ()

    def code(self) -> grpc.StatusCode:
        return self._code

    def details(self) -> str:
        return self._details

    def trailing_metadata(self) -> Any:
        return self._trailing

    def initial_metadata(self) -> Any:
        return ()

    def is_active(self) -> bool:
        return False

    def time_remaining(self) -> None:
        return None

    def cancel(self) -> bool:
        return False

    def add_callback(self, callback: Callable[..., Any]) -> bool:
        return False


REFUSED = FakeRpcError(
    grpc.StatusCode.UNAVAILABLE,
    "failed to connect to all addresses; last error: Connection refused",
)
DROPPED = FakeRpcError(grpc.StatusCode.UNAVAILABLE, "Socket closed")
DEADLINE = FakeRpcError(grpc.StatusCode.DEADLINE_EXCEEDED, "Deadline Exceeded")
BROKER_SAYS = FakeRpcError(grpc.StatusCode.UNAVAILABLE, "the database is down", answered=True)


class FakeChannel:
    def __init__(self, name: str, log: list[str]) -> None:
        self.name = name
        self.log = log
        self.fail: list[Exception] = []
        self.closed = False

    def unary_unary(self, method: str, *args: Any, **kwargs: Any) -> Any:
        def call(request: Any, **kw: Any) -> str:
            self.log.append(self.name)
            if self.fail:
                raise self.fail.pop(0)
            return f"{self.name}:{request}"

        return call

    def close(self) -> None:
        self.closed = True


class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def _channel(n: int = 2) -> tuple[FailoverChannel, dict[str, FakeChannel], list[str], Clock]:
    log: list[str] = []
    fakes: dict[str, FakeChannel] = {}

    def open_one(target: str) -> Any:
        fakes[target] = FakeChannel(target, log)
        return fakes[target]

    clock = Clock()
    targets = [f"b{i}:8443" for i in range(n)]
    channel = FailoverChannel(targets, open_one, rng=random.Random(1), monotonic=clock)
    return channel, fakes, log, clock


def test_calls_stick_to_the_first_address_while_it_answers() -> None:
    channel, _, log, _ = _channel()
    call = channel.unary_unary("/x/Y")
    assert [call(i) for i in range(3)] == ["b0:8443:0", "b0:8443:1", "b0:8443:2"]
    assert log == ["b0:8443"] * 3


def test_a_refused_connection_is_retried_on_the_next_address_and_sticks_there() -> None:
    channel, fakes, log, _ = _channel()
    fakes["b0:8443"].fail = [REFUSED]
    call = channel.unary_unary("/x/Y")
    assert call("r") == "b1:8443:r"
    assert call("s") == "b1:8443:s"  # sticky: b0 is not tried again
    assert log == ["b0:8443", "b1:8443", "b1:8443"]
    assert channel.current == "b1:8443"


@pytest.mark.parametrize("error", [DROPPED, DEADLINE])
def test_a_call_that_may_have_reached_the_broker_is_not_sent_again(error: Exception) -> None:
    channel, fakes, log, _ = _channel()
    fakes["b0:8443"].fail = [error]
    call = channel.unary_unary("/x/Y")
    with pytest.raises(grpc.RpcError) as raised:
        call("r")
    assert raised.value is error
    assert log == ["b0:8443"]  # sent once, to one broker
    assert call("s") == "b1:8443:s"  # the next call goes to the next address
    assert channel.current == "b1:8443"


def test_an_answer_of_the_broker_itself_does_not_move_the_client() -> None:
    channel, fakes, log, _ = _channel()
    fakes["b0:8443"].fail = [BROKER_SAYS]
    call = channel.unary_unary("/x/Y")
    with pytest.raises(grpc.RpcError):
        call("r")
    assert channel.current == "b0:8443" and log == ["b0:8443"]
    assert call("s") == "b0:8443:s"


def test_backoff_with_jitter_then_the_address_is_tried_again() -> None:
    channel, fakes, log, clock = _channel()
    fakes["b0:8443"].fail = [REFUSED]
    call = channel.unary_unary("/x/Y")
    call("a")
    # Now b1 fails too: b0 is still on backoff, but it is tried (never a refusal untried).
    fakes["b1:8443"].fail = [REFUSED]
    assert call("b") == "b0:8443:b"
    assert log == ["b0:8443", "b1:8443", "b1:8443", "b0:8443"]
    # Every address refusing: the last error is raised after one round.
    fakes["b0:8443"].fail = [REFUSED]
    fakes["b1:8443"].fail = [REFUSED]
    with pytest.raises(grpc.RpcError):
        call("c")
    clock.t += BACKOFF_MAX * 2  # both backoffs over: the current address first again
    assert channel.order() == [channel._current, 1 - channel._current]


def test_the_backoff_doubles_and_is_jittered() -> None:
    delays = []
    for seed in range(5):
        channel, _, _, clock = _channel()
        channel._rng = random.Random(seed)
        for _ in range(3):
            channel.failed(0)
        delays.append(channel._addresses[0].down_until - clock.t)
    assert all(4 * 0.8 <= d <= 4 * 1.2 for d in delays)  # 1, 2, 4 s: the third is 4 s +-20 %
    assert len(set(delays)) > 1  # jittered: a fleet does not come back in step


def test_split_and_resolve_targets() -> None:
    assert split_targets(" a:1, b:2,,a:1 ") == ["a:1", "b:2"]
    assert resolve_targets("a:1,b:2") == ["a:1", "b:2"]
    assert resolve_targets("127.0.0.1:8443") == ["127.0.0.1:8443"]
    assert resolve_targets("localhost:8443") == ["localhost:8443"]
    several = resolve_targets(
        "brokers.internal:8443", resolve=lambda host, port: ["10.0.0.1", "10.0.0.2", "fd00::3"]
    )
    assert several == ["10.0.0.1:8443", "10.0.0.2:8443", "[fd00::3]:8443"]
    one = resolve_targets("broker.internal:8443", resolve=lambda host, port: ["10.0.0.1"])
    assert one == ["broker.internal:8443"]


def test_open_channel_is_a_plain_channel_for_one_address() -> None:
    opened: list[str] = []

    def open_one(target: str) -> Any:
        opened.append(target)
        return FakeChannel(target, [])

    single = open_channel("127.0.0.1:1", open_one)
    assert isinstance(single, FakeChannel) and opened == ["127.0.0.1:1"]
    several = open_channel("127.0.0.1:1,127.0.0.1:2", open_one)
    assert isinstance(several, FailoverChannel)
    assert several.targets == ["127.0.0.1:1", "127.0.0.1:2"]
    several.close()
    assert all(a.channel.closed for a in several._addresses)
