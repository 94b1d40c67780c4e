"""The kernel's word on who is calling the Workload API.

Callers are identified by the kernel, not by anything they send: grpc does not expose a Unix
socket's peer credentials, so the public socket is a small proxy. It accepts each connection,
reads SO_PEERCRED (pid, uid, gid, fixed at connect time), and forwards the bytes to the gRPC
server's own socket (in a private 0700 directory) from a client socket bound to a fresh,
random abstract address. gRPC reports that address as the peer ("unix-abstract:<tag>"), which
names the credentials in `PeerRegistry`. A connection the proxy did not make has no entry and
gets PERMISSION_DENIED; an abstract address in use cannot be bound twice, so a live tag cannot
be forged.
"""

from __future__ import annotations

import asyncio
import contextlib
import grp
import itertools
import logging
import os
import pwd
import secrets
import socket
import stat
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import cast

from broker.errors import InvalidArgument, PermissionDenied

from ..relay import RelayEnd

__all__ = ["PeerCredentialProxy", "PeerInfo", "PeerRegistry", "selectors_of"]

log = logging.getLogger("broker.agent")

_PEERCRED = struct.Struct("3i")


@dataclass(frozen=True)
class PeerInfo:
    pid: int
    uid: int
    gid: int

    def selectors(self) -> frozenset[str]:
        out = {f"unix:uid:{self.uid}", f"unix:gid:{self.gid}"}
        with contextlib.suppress(KeyError):
            out.add(f"unix:user:{pwd.getpwuid(self.uid).pw_name}")
        with contextlib.suppress(KeyError):
            out.add(f"unix:group:{grp.getgrgid(self.gid).gr_name}")
        return frozenset(out)


def selectors_of(uid: int, gid: int) -> frozenset[str]:
    return PeerInfo(0, uid, gid).selectors()


class PeerRegistry:
    """Tag (abstract address of the proxy's upstream socket) -> the caller's credentials."""

    def __init__(self) -> None:
        self._peers: dict[str, tuple[PeerInfo, frozenset[str]]] = {}

    def add(self, tag: str, peer: PeerInfo) -> None:
        self._peers[tag] = (peer, peer.selectors())

    def remove(self, tag: str) -> None:
        self._peers.pop(tag, None)

    def lookup(self, grpc_peer: str) -> tuple[PeerInfo, frozenset[str]]:
        """PermissionDenied unless the peer came through the proxy."""
        found = self._peers.get(grpc_peer.removeprefix("unix-abstract:"))
        if found is None:
            raise PermissionDenied("the caller could not be identified")
        return found


class PeerCredentialProxy:
    def __init__(self, registry: PeerRegistry, public_path: Path, upstream_path: Path) -> None:
        self.registry = registry
        self._public = public_path
        self.upstream = str(upstream_path)
        self._prefix = f"broker-agent-{secrets.token_hex(8)}-"
        self._counter = itertools.count()
        self._server: asyncio.AbstractServer | None = None
        self.connections: set[_Downstream] = set()

    def next_tag(self) -> str:
        return self._prefix + str(next(self._counter))

    async def start(self) -> None:
        if self._public.exists() or self._public.is_symlink():
            if not stat.S_ISSOCK(self._public.lstat().st_mode):
                raise InvalidArgument(
                    f"{self._public} exists and is not a socket; not replacing it"
                )
            self._public.unlink()  # a stale socket from an earlier run
        loop = asyncio.get_running_loop()
        self._server = await loop.create_unix_server(
            lambda: _Downstream(self), path=str(self._public)
        )
        os.chmod(self._public, 0o777)  # noqa: S103 (any local process may ask; entries decide)

    async def close(self) -> None:
        if self._server is None:
            return  # never listened: the path is not ours to remove
        self._server.close()
        for connection in list(self.connections):  # Server.close() leaves accepted ones open
            connection.close()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self._server.wait_closed(), 2)
        with contextlib.suppress(FileNotFoundError):
            self._public.unlink()


class _Downstream(asyncio.Protocol):
    """The workload's connection. Protocol callbacks (not streams): each chunk is written
    straight to the other side, with flow control passed through (pause/resume)."""

    def __init__(self, proxy: PeerCredentialProxy) -> None:
        self._proxy = proxy
        self.transport: asyncio.Transport | None = None
        self.upstream: _Upstream | None = None
        self._tag = ""
        self._pending: list[bytes] = []

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass
        self._proxy.connections.add(self)
        sock = transport.get_extra_info("socket")
        try:
            raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _PEERCRED.size)
        except OSError as exc:
            log.warning("workload connection refused: no peer credentials (%s)", exc)
            transport.close()
            return
        pid, uid, gid = _PEERCRED.unpack(raw)
        self._tag = self._proxy.next_tag()
        asyncio.get_running_loop().create_task(self._connect(PeerInfo(pid, uid, gid)))

    async def _connect(self, peer: PeerInfo) -> None:
        loop = asyncio.get_running_loop()
        upstream = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            upstream.bind("\0" + self._tag)
            upstream.setblocking(False)
            await loop.sock_connect(upstream, self._proxy.upstream)
            self._proxy.registry.add(self._tag, peer)
            _, protocol = await loop.create_unix_connection(lambda: _Upstream(self), sock=upstream)
        except OSError as exc:
            upstream.close()
            self._proxy.registry.remove(self._tag)
            log.warning("workload connection refused: %s", exc)
            if self.transport is not None:
                self.transport.close()
            return
        self.upstream = protocol
        for chunk in self._pending:
            protocol.write(chunk)
        self._pending.clear()
        if self.transport is None or self.transport.is_closing():
            protocol.close()

    def data_received(self, data: bytes) -> None:
        if self.upstream is None:
            self._pending.append(data)
        else:
            self.upstream.write(data)

    def eof_received(self) -> bool:
        if self.upstream is not None:
            self.upstream.write_eof()
        return True

    def pause_writing(self) -> None:
        if self.upstream is not None:
            self.upstream.pause_reading()

    def resume_writing(self) -> None:
        if self.upstream is not None:
            self.upstream.resume_reading()

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None
        self._proxy.connections.discard(self)
        self._proxy.registry.remove(self._tag)
        if self.upstream is not None:
            self.upstream.close()

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()
        if self.upstream is not None:
            self.upstream.close()


class _Upstream(RelayEnd):
    """The proxy's connection to the gRPC server, from the tagged abstract address."""

    def __init__(self, downstream: _Downstream) -> None:
        self._down = downstream
        self._transport: asyncio.Transport | None = None

    def data_received(self, data: bytes) -> None:
        down = self._down.transport
        if down is not None:
            down.write(data)

    def eof_received(self) -> bool:
        down = self._down.transport
        if down is not None and down.can_write_eof():
            down.write_eof()
        return True

    def pause_writing(self) -> None:
        if self._down.transport is not None:
            self._down.transport.pause_reading()

    def resume_writing(self) -> None:
        if self._down.transport is not None:
            self._down.transport.resume_reading()

    def connection_lost(self, exc: Exception | None) -> None:
        self._transport = None
        if self._down.transport is not None:
            self._down.transport.close()
