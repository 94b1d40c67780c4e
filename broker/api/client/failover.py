"""Several broker addresses behind one `grpc.Channel`: the client, the SDK and the agent accept
`a:8443,b:8443` (or a DNS name with several records) wherever they accept one address.

`FailoverChannel` holds one channel per address and sends every call to the current one
("sticky": a working broker keeps the traffic, so a client does not spread its calls). When an
address stops answering — UNAVAILABLE raised by the transport (not an answer of the broker
itself, which carries its correlation id) or DEADLINE_EXCEEDED — it is put on backoff (1 s
doubling to 30 s, with +-20 % jitter, so a fleet does not come back in step) and the next
address becomes current. A call that failed before it reached any broker (the connection was
refused, could not be made, the name did not resolve, the TLS handshake failed) is sent again
to the next address at once: it cannot have been acted on. A call that may have reached the
broker (the connection dropped mid-call, the deadline ran out) is not sent again — the caller
gets the error, and the next call goes to the next address. When every address is on backoff
the one whose backoff ends first is tried (never a refusal without trying).

Server streams (the agent's sync stream) open on the current address; a broken stream moves
the current address like a failed call, so the caller re-opens it on the next one.
"""

from __future__ import annotations

import ipaddress
import random
import re
import socket
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import grpc

__all__ = [
    "BACKOFF_MAX",
    "BACKOFF_MIN",
    "FailoverChannel",
    "open_channel",
    "resolve_targets",
    "split_targets",
]

BACKOFF_MIN = 1.0
BACKOFF_MAX = 30.0
JITTER = 0.2

_CORRELATION_HEADER = "x-correlation-id"
# The call never reached a broker: safe to send again elsewhere.
_NOT_SENT = re.compile(
    r"failed to connect to all addresses|connection refused|errors resolving|"
    r"dns resolution failed|handshake|no route to host|network is unreachable|"
    r"connect failed|connection timed out",
    re.IGNORECASE,
)


def split_targets(target: str) -> list[str]:
    """`a:8443, b:8443` -> ["a:8443", "b:8443"] (blank items dropped, order kept, no
    duplicates)."""
    out: list[str] = []
    for item in target.split(","):
        item = item.strip()
        if item and item not in out:
            out.append(item)
    return out


def _host_port(target: str) -> tuple[str, str] | None:
    if target.startswith("["):  # [v6]:port
        host, sep, port = target[1:].partition("]:")
        return (host, port) if sep and port.isdigit() else None
    host, sep, port = target.rpartition(":")
    return (host, port) if sep and host and port.isdigit() else None


def resolve_targets(
    target: str,
    resolve: Callable[[str, int], Sequence[str]] | None = None,
) -> list[str]:
    """The addresses `target` stands for: each comma-separated item; a single host name with
    several DNS records (A/AAAA) becomes one address per record. IP literals, `localhost` and
    targets with a gRPC scheme (`dns:///`, `unix:`) are kept as given."""
    items = split_targets(target)
    if len(items) != 1:
        return items
    parsed = _host_port(items[0])
    if parsed is None or "://" in items[0] or items[0].startswith("unix:"):
        return items
    host, port = parsed
    try:
        ipaddress.ip_address(host)
        return items
    except ValueError:
        pass
    if host == "localhost":
        return items
    lookup = resolve or _getaddrinfo
    try:
        records = list(dict.fromkeys(lookup(host, int(port))))
    except OSError:
        return items  # gRPC reports the resolution failure itself, in its words
    if len(records) < 2:
        return items
    return [f"[{a}]:{port}" if ":" in a else f"{a}:{port}" for a in records]


def _getaddrinfo(host: str, port: int) -> list[str]:
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return [str(info[4][0]) for info in infos]


def _code(exc: grpc.RpcError) -> grpc.StatusCode | None:
    return exc.code() if isinstance(exc, grpc.Call) else None


def _answered(exc: grpc.RpcError) -> bool:
    trailing = exc.trailing_metadata() if isinstance(exc, grpc.Call) else None
    return any(key == _CORRELATION_HEADER for key, _ in trailing or ())


def moves_on(exc: grpc.RpcError) -> bool:
    """The address stopped answering (rather than the broker answering with an error)."""
    code = _code(exc)
    if code == grpc.StatusCode.DEADLINE_EXCEEDED:
        return True
    return code == grpc.StatusCode.UNAVAILABLE and not _answered(exc)


def never_sent(exc: grpc.RpcError) -> bool:
    """The call failed before any broker could act on it."""
    if _code(exc) != grpc.StatusCode.UNAVAILABLE or _answered(exc):
        return False
    details = exc.details() if isinstance(exc, grpc.Call) else str(exc)
    return bool(_NOT_SENT.search(details or ""))


class _Address:
    def __init__(self, target: str, channel: grpc.Channel) -> None:
        self.target = target
        self.channel = channel
        self.failures = 0
        self.down_until = 0.0


class FailoverChannel(grpc.Channel):  # type: ignore[misc]
    """One channel per address, calls sent to the current one (module docstring)."""

    def __init__(
        self,
        targets: Sequence[str],
        open_one: Callable[[str], grpc.Channel],
        *,
        rng: random.Random | None = None,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        if not targets:
            raise ValueError("no broker address given")
        self._addresses = [_Address(t, open_one(t)) for t in targets]
        self._rng = rng or random.Random()  # noqa: S311 (jitter, not a secret)
        self._now = monotonic
        self._lock = threading.Lock()
        self._current = 0

    # -- which address ------------------------------------------------------------------

    @property
    def targets(self) -> list[str]:
        return [a.target for a in self._addresses]

    @property
    def current(self) -> str:
        return self._addresses[self._current].target

    def order(self) -> list[int]:
        """The addresses to try, current first, those on backoff last (earliest end first)."""
        with self._lock:
            n = len(self._addresses)
            ring = [(self._current + i) % n for i in range(n)]
            now = self._now()
            up = [i for i in ring if self._addresses[i].down_until <= now]
            down = sorted(
                (i for i in ring if self._addresses[i].down_until > now),
                key=lambda i: self._addresses[i].down_until,
            )
            return up + down

    def succeeded(self, index: int) -> None:
        with self._lock:
            address = self._addresses[index]
            address.failures = 0
            address.down_until = 0.0
            self._current = index

    def failed(self, index: int) -> None:
        """Put the address on backoff and make the next one current."""
        with self._lock:
            address = self._addresses[index]
            address.failures += 1
            delay = min(BACKOFF_MAX, BACKOFF_MIN * 2.0 ** (address.failures - 1))
            delay *= 1 + self._rng.uniform(-JITTER, JITTER)
            address.down_until = self._now() + delay
            if self._current == index:
                self._current = (index + 1) % len(self._addresses)

    def invoke(self, attempt: Callable[[grpc.Channel], Any]) -> Any:
        """Run `attempt` on the current channel, moving on as the module docstring says."""
        last: grpc.RpcError | None = None
        for index in self.order():
            try:
                result = attempt(self._addresses[index].channel)
            except grpc.RpcError as exc:
                if not moves_on(exc):
                    raise
                self.failed(index)
                if not never_sent(exc):
                    raise
                last = exc
                continue
            self.succeeded(index)
            return result
        assert last is not None
        raise last

    # -- grpc.Channel -------------------------------------------------------------------

    def unary_unary(self, method: str, *args: Any, **kwargs: Any) -> Any:
        return _UnaryUnary(self, lambda ch: ch.unary_unary(method, *args, **kwargs))

    def unary_stream(self, method: str, *args: Any, **kwargs: Any) -> Any:
        return _UnaryStream(self, lambda ch: ch.unary_stream(method, *args, **kwargs))

    def stream_unary(self, method: str, *args: Any, **kwargs: Any) -> Any:
        return _UnaryUnary(self, lambda ch: ch.stream_unary(method, *args, **kwargs))

    def stream_stream(self, method: str, *args: Any, **kwargs: Any) -> Any:
        return _UnaryStream(self, lambda ch: ch.stream_stream(method, *args, **kwargs))

    def subscribe(self, callback: Callable[..., Any], try_to_connect: bool = False) -> None:
        self._addresses[self._current].channel.subscribe(callback, try_to_connect)

    def unsubscribe(self, callback: Callable[..., Any]) -> None:
        for address in self._addresses:
            address.channel.unsubscribe(callback)

    def close(self) -> None:
        for address in self._addresses:
            address.channel.close()

    def __enter__(self) -> FailoverChannel:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


class _UnaryUnary:
    def __init__(self, owner: FailoverChannel, make: Callable[[grpc.Channel], Any]) -> None:
        self._owner = owner
        self._make = make
        self._callables: dict[int, Any] = {}

    def _on(self, channel: grpc.Channel) -> Any:
        key = id(channel)
        callable_ = self._callables.get(key)
        if callable_ is None:
            callable_ = self._callables[key] = self._make(channel)
        return callable_

    def __call__(self, request: Any, *args: Any, **kwargs: Any) -> Any:
        return self._owner.invoke(lambda ch: self._on(ch)(request, *args, **kwargs))

    def with_call(self, request: Any, *args: Any, **kwargs: Any) -> Any:
        return self._owner.invoke(lambda ch: self._on(ch).with_call(request, *args, **kwargs))

    def future(self, request: Any, *args: Any, **kwargs: Any) -> Any:
        index = self._owner.order()[0]
        return self._on(self._owner._addresses[index].channel).future(request, *args, **kwargs)


class _UnaryStream(_UnaryUnary):
    """A stream opens on the current address; an error that says the address stopped
    answering moves the current address (the caller re-opens the stream)."""

    def __call__(self, request: Any, *args: Any, **kwargs: Any) -> Any:
        index = self._owner.order()[0]
        call = self._on(self._owner._addresses[index].channel)(request, *args, **kwargs)
        return _WatchedStream(call, self._owner, index)


class _WatchedStream:
    def __init__(self, call: Any, owner: FailoverChannel, index: int) -> None:
        self._call = call
        self._owner = owner
        self._index = index

    def __iter__(self) -> Iterator[Any]:
        return self

    def __next__(self) -> Any:
        try:
            item = next(self._call)
        except grpc.RpcError as exc:
            if moves_on(exc):
                self._owner.failed(self._index)
            raise
        self._owner.succeeded(self._index)
        return item

    def __getattr__(self, name: str) -> Any:
        return getattr(self._call, name)  # cancel(), code(), details(), ...


def open_channel(target: str, open_one: Callable[[str], grpc.Channel]) -> grpc.Channel:
    """One channel for a single address, a `FailoverChannel` for several (`resolve_targets`)."""
    targets = resolve_targets(target)
    if len(targets) == 1:
        return open_one(targets[0])
    return FailoverChannel(targets, open_one)
