"""A TCP front for a gRPC port that anyone can reach before authenticating: it caps the
connections each peer address may hold, closes connections that send nothing within the
handshake timeout, and passes everything else, unchanged, to the gRPC server listening on an
abstract Unix socket (TLS is still terminated by gRPC).

gRPC Python has no accept hook, so this is the one place a per-peer connection count can be
kept. It costs a copy of every byte through the event loop, which is why the broker puts it in
front of the attestation port (small messages, a few calls per agent) and not, by default, in
front of the main port (docs/security.md, "Connections").

Each upstream connection is bound to an abstract address of its own ("tag"), so that gRPC's
`context.peer()` ("unix-abstract:<tag>") names it; `peer_of` turns the tag back into the
client's "ipv4:HOST:PORT", for rate limits and the audit ledger.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import secrets
import socket
from collections import Counter
from typing import cast

from broker import metrics

from ..relay import RelayEnd

__all__ = ["ConnectionGate"]

log = logging.getLogger(__name__)


class ConnectionGate:
    def __init__(
        self,
        upstream: str,
        *,
        max_per_peer: int,
        max_connections: int,
        idle_timeout: float,
    ) -> None:
        """`upstream` is the abstract socket name gRPC listens on (without "unix-abstract:");
        `idle_timeout` closes a connection that has sent no byte by then."""
        self.upstream = upstream
        self.max_per_peer = max_per_peer
        self.max_connections = max_connections
        self.idle_timeout = idle_timeout
        self._per_peer: Counter[str] = Counter()
        self._open = 0
        self._peers: dict[str, str] = {}
        self._prefix = f"broker-gate-{secrets.token_hex(8)}-"
        self._counter = itertools.count()
        self._server: asyncio.AbstractServer | None = None
        self._clients: set[_Client] = set()

    @staticmethod
    def new_upstream_name() -> str:
        return f"broker-attest-{secrets.token_hex(8)}"

    async def start(self, host: str, port: int, *, reuse_port: bool = False) -> int:
        """Listen on host:port; returns the bound port. Raises OSError if it cannot bind."""
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(
            lambda: _Client(self),
            host=host.strip("[]"),
            port=port,
            reuse_port=reuse_port or None,
            backlog=1024,
        )
        return int(self._server.sockets[0].getsockname()[1])

    def stop_accepting(self) -> None:
        if self._server is not None:
            self._server.close()

    async def close(self) -> None:
        """Stop accepting and drop every open connection (after the servers behind it have
        stopped, so their calls could finish)."""
        self.stop_accepting()
        for client in list(self._clients):
            client.abort()
        if self._server is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._server.wait_closed(), 2)
            self._server = None
        await asyncio.sleep(0)  # let the transports report their loss

    @property
    def open_connections(self) -> int:
        return self._open

    def peer_of(self, grpc_peer: str) -> str | None:
        """The client behind an upstream connection's gRPC peer string, or None when the
        connection did not come through this gate."""
        return self._peers.get(grpc_peer.removeprefix("unix-abstract:"))

    # -- bookkeeping for _Client ----------------------------------------------------------

    def _admit(self, host: str) -> bool:
        if self._per_peer[host] >= self.max_per_peer or self._open >= self.max_connections:
            return False
        self._per_peer[host] += 1
        self._open += 1
        return True

    def _release(self, host: str) -> None:
        self._open -= 1
        self._per_peer[host] -= 1
        if self._per_peer[host] <= 0:
            del self._per_peer[host]

    def _next_tag(self) -> str:
        return self._prefix + str(next(self._counter))


def _grpc_peer(address: tuple[str, int] | tuple[str, int, int, int]) -> str:
    host, port = address[0], address[1]
    return f"ipv6:[{host}]:{port}" if ":" in host else f"ipv4:{host}:{port}"


class _Client(RelayEnd):
    """A client's connection. Protocol callbacks (not streams): each chunk goes straight to
    the other side, with flow control passed through (pause/resume)."""

    def __init__(self, gate: ConnectionGate) -> None:
        self._gate = gate
        self._transport: asyncio.Transport | None = None
        self._upstream: _Upstream | None = None
        self._host = ""
        self._tag = ""
        self._pending: list[bytes] = []
        self._idle: asyncio.TimerHandle | None = None
        self._admitted = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass
        address = transport.get_extra_info("peername")
        self._host = str(address[0])
        if not self._gate._admit(self._host):
            metrics.record_refusal("connection_cap")
            self._transport.abort()
            return
        self._admitted = True
        self._gate._clients.add(self)
        self._idle = asyncio.get_running_loop().call_later(
            self._gate.idle_timeout, self._idle_expired
        )
        self._tag = self._gate._next_tag()
        self._gate._peers[self._tag] = _grpc_peer(address)

    def _idle_expired(self) -> None:
        if self._upstream is None and self._transport is not None:
            metrics.record_refusal("handshake_timeout")
            self._transport.abort()

    def data_received(self, data: bytes) -> None:
        if self._upstream is not None:
            self._upstream.write(data)
            return
        first = not self._pending
        self._pending.append(data)
        if first:
            asyncio.get_running_loop().create_task(self._connect())

    async def _connect(self) -> None:
        loop = asyncio.get_running_loop()
        upstream = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            upstream.bind("\0" + self._tag)
            upstream.setblocking(False)
            await loop.sock_connect(upstream, "\0" + self._gate.upstream)
            _, protocol = await loop.create_unix_connection(lambda: _Upstream(self), sock=upstream)
        except OSError as exc:
            upstream.close()
            log.warning("gated connection dropped: upstream unreachable (%s)", exc)
            if self._transport is not None:
                self._transport.abort()
            return
        if self._idle is not None:
            self._idle.cancel()
        self._upstream = protocol
        for chunk in self._pending:
            protocol.write(chunk)
        self._pending.clear()
        if self._transport is None or self._transport.is_closing():
            protocol.close()

    def eof_received(self) -> bool:
        if self._upstream is not None:
            self._upstream.write_eof()
        return True

    def pause_writing(self) -> None:
        if self._upstream is not None:
            self._upstream.pause_reading()

    def resume_writing(self) -> None:
        if self._upstream is not None:
            self._upstream.resume_reading()

    def connection_lost(self, exc: Exception | None) -> None:
        self._transport = None
        if self._idle is not None:
            self._idle.cancel()
        self._gate._clients.discard(self)
        if self._admitted:
            self._admitted = False
            self._gate._release(self._host)
            self._gate._peers.pop(self._tag, None)
        if self._upstream is not None:
            self._upstream.close()

    # -- called by _Upstream --------------------------------------------------------------

    def abort(self) -> None:
        if self._upstream is not None:
            self._upstream.abort()
        if self._transport is not None:
            self._transport.abort()


class _Upstream(RelayEnd):
    """The gate's connection to the gRPC server, from the client's tagged abstract address."""

    def __init__(self, client: _Client) -> None:
        self._client = client
        self._transport: asyncio.Transport | None = None

    def data_received(self, data: bytes) -> None:
        self._client.write(data)

    def eof_received(self) -> bool:
        self._client.write_eof()
        return True

    def pause_writing(self) -> None:
        self._client.pause_reading()

    def resume_writing(self) -> None:
        self._client.resume_reading()

    def connection_lost(self, exc: Exception | None) -> None:
        self._transport = None
        self._client.close()
