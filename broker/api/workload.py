"""The SPIFFE Workload API served by `broker agent` on a Unix socket, and the agent process.

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
import json
import logging
import os
import pwd
import secrets
import signal
import socket
import struct
import sys
import tempfile
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
from google.protobuf import struct_pb2
from grpc_reflection.v1alpha import reflection

from broker.agent import Agent, FileDelivery, Snapshot
from broker.errors import BrokerError, InvalidArgument, PermissionDenied
from ca.clock import Clock, SystemClock
from ca.errors import CAError

from ._proto import workload_pb2, workload_pb2_grpc
from .identity_client import GrpcBrokerLink
from .status import to_status

__all__ = [
    "AgentOptions",
    "PeerInfo",
    "PeerRegistry",
    "WorkloadAPIServicer",
    "run_agent",
    "selectors_of",
    "serve_workload_api",
]

log = logging.getLogger("broker.agent")

SECURITY_HEADER = "workload.spiffe.io"
SERVICE_NAME = "SpiffeWorkloadAPI"
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
        self._registry = registry
        self._public = public_path
        self._upstream = str(upstream_path)
        self._prefix = f"broker-agent-{secrets.token_hex(8)}-"
        self._counter = itertools.count()
        self._server: asyncio.AbstractServer | None = None

    async def start(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            self._public.unlink()
        self._server = await asyncio.start_unix_server(self._handle, path=str(self._public))
        os.chmod(self._public, 0o777)  # noqa: S103 (any local process may ask; entries decide)

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._server.wait_closed(), 2)
        with contextlib.suppress(FileNotFoundError):
            self._public.unlink()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        sock = writer.get_extra_info("socket")
        tag = self._prefix + str(next(self._counter))
        try:
            raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _PEERCRED.size)
            pid, uid, gid = _PEERCRED.unpack(raw)
            upstream = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            upstream.bind("\0" + tag)
            upstream.setblocking(False)
            await asyncio.get_running_loop().sock_connect(upstream, self._upstream)
            up_reader, up_writer = await asyncio.open_unix_connection(sock=upstream)
        except OSError as exc:
            log.warning("workload connection refused: %s", exc)
            writer.close()
            return
        self._registry.add(tag, PeerInfo(pid, uid, gid))
        try:
            await asyncio.gather(_pipe(reader, up_writer), _pipe(up_reader, writer))
        finally:
            self._registry.remove(tag)
            for w in (writer, up_writer):
                w.close()


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while True:
            data = await reader.read(65536)
            if not data:
                break
            writer.write(data)
            await writer.drain()
    except (ConnectionError, OSError):
        pass
    finally:
        with contextlib.suppress(Exception):
            if writer.can_write_eof():
                writer.write_eof()


def _claims_struct(claims: dict[str, Any]) -> struct_pb2.Struct:
    out = struct_pb2.Struct()
    out.update(json.loads(json.dumps(claims, default=str)))
    return out


class WorkloadAPIServicer(workload_pb2_grpc.SpiffeWorkloadAPIServicer):  # type: ignore[misc]
    def __init__(self, agent: Agent, registry: PeerRegistry) -> None:
        self._agent = agent
        self._registry = registry

    async def _caller(self, context: grpc.aio.ServicerContext) -> frozenset[str]:
        """Check the security header, then identify the caller; aborts on failure."""
        metadata = dict(context.invocation_metadata() or ())
        if metadata.get(SECURITY_HEADER) != "true":
            await context.abort(
                grpc.StatusCode.INVALID_ARGUMENT, "security header missing from request"
            )
        try:
            return self._registry.lookup(context.peer())[1]
        except BrokerError as exc:
            await _abort(context, exc)
            raise

    async def _stream(
        self,
        context: grpc.aio.ServicerContext,
        render: Callable[[frozenset[str], Snapshot], Any],
    ) -> AsyncIterator[Any]:
        selectors = await self._caller(context)
        snapshot = self._agent.snapshot
        last: bytes | None = None
        while True:
            try:
                message = render(selectors, snapshot)
            except (BrokerError, CAError) as exc:
                await _abort(context, exc)  # also mid-stream, e.g. the entry was deleted
                return
            encoded = message.SerializeToString(deterministic=True)
            if encoded != last:
                last = encoded
                yield message
            snapshot = await self._agent.wait_change(snapshot.version)

    def _x509(self, selectors: frozenset[str], snap: Snapshot) -> Any:
        svids = self._agent.svids_for(selectors, snap)
        bundle = snap.bundle_der
        return workload_pb2.X509SVIDResponse(
            svids=[
                workload_pb2.X509SVID(
                    spiffe_id=s.spiffe_id,
                    x509_svid=b"".join(s.chain_der),
                    x509_svid_key=s.key_der,
                    bundle=bundle,
                )
                for s in svids
            ]
        )

    def _x509_bundles(self, selectors: frozenset[str], snap: Snapshot) -> Any:
        self._agent.svids_for(selectors, snap)  # the caller must be entitled to something
        return workload_pb2.X509BundlesResponse(
            bundles={f"spiffe://{snap.trust_domain}": snap.bundle_der}
        )

    def _jwt_bundles(self, selectors: frozenset[str], snap: Snapshot) -> Any:
        self._agent.svids_for(selectors, snap)
        return workload_pb2.JWTBundlesResponse(
            bundles={f"spiffe://{snap.trust_domain}": snap.jwt_bundle_json}
        )

    async def FetchX509SVID(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        async for message in self._stream(context, self._x509):
            yield message

    async def FetchX509Bundles(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        async for message in self._stream(context, self._x509_bundles):
            yield message

    async def FetchJWTBundles(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        async for message in self._stream(context, self._jwt_bundles):
            yield message

    async def FetchJWTSVID(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        selectors = await self._caller(context)
        try:
            if not request.audience:
                raise InvalidArgument("audience must be specified")
            svids = await self._agent.jwt_svids(
                selectors, tuple(request.audience), request.spiffe_id
            )
        except (BrokerError, CAError) as exc:
            await _abort(context, exc)
            raise
        return workload_pb2.JWTSVIDResponse(
            svids=[workload_pb2.JWTSVID(spiffe_id=s.spiffe_id, svid=s.token) for s in svids]
        )

    async def ValidateJWTSVID(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        await self._caller(context)
        try:
            if not request.audience:
                raise InvalidArgument("audience must be specified")
            if not request.svid:
                raise InvalidArgument("svid must be specified")
            spiffe_id, claims = self._agent.validate_jwt(request.svid, request.audience)
        except BrokerError as exc:
            await _abort(context, exc)
            raise
        except CAError as exc:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
            raise
        return workload_pb2.ValidateJWTSVIDResponse(
            spiffe_id=spiffe_id, claims=_claims_struct(claims)
        )


async def _abort(context: grpc.aio.ServicerContext, exc: BaseException) -> None:
    code, message = to_status(exc, "-")
    await context.abort(code, message)


@dataclass
class WorkloadEndpoint:
    server: grpc.aio.Server
    proxy: PeerCredentialProxy
    private_dir: Path

    async def stop(self) -> None:
        await self.proxy.close()
        await self.server.stop(grace=1)
        with contextlib.suppress(OSError):
            for p in self.private_dir.iterdir():
                p.unlink()
            self.private_dir.rmdir()


async def serve_workload_api(agent: Agent, socket_path: Path) -> WorkloadEndpoint:
    """Serve the Workload API for `agent` on `socket_path` (created 0777; the directory must
    let callers reach it)."""
    registry = PeerRegistry()
    private_dir = Path(tempfile.mkdtemp(prefix="broker-agent-"))  # 0700
    upstream = private_dir / "grpc.sock"
    server = grpc.aio.server(
        options=[("grpc.max_receive_message_length", 1 << 20), ("grpc.so_reuseport", 0)]
    )
    workload_pb2_grpc.add_SpiffeWorkloadAPIServicer_to_server(
        WorkloadAPIServicer(agent, registry), server
    )
    reflection.enable_server_reflection((SERVICE_NAME, reflection.SERVICE_NAME), server)
    server.add_insecure_port(f"unix:{upstream}")
    await server.start()
    proxy = PeerCredentialProxy(registry, socket_path, upstream)
    await proxy.start()
    return WorkloadEndpoint(server, proxy, private_dir)


# -- the `broker agent` process ---------------------------------------------------------------


@dataclass(frozen=True)
class AgentOptions:
    server: str
    attest_server: str
    bundle_pem: bytes
    socket_path: Path
    join_token: str | None = None
    jwt: str | None = None
    write_dir: Path | None = None
    on_rotate: str | None = None
    sync_interval: float = 5.0


async def _agent_main(options: AgentOptions, clock: Clock) -> None:
    link = GrpcBrokerLink(
        options.server,
        options.attest_server,
        options.bundle_pem,
        join_token=options.join_token,
        jwt=options.jwt,
    )
    delivery = None
    if options.write_dir is not None:
        delivery = FileDelivery(
            options.write_dir, selectors_of(os.getuid(), os.getgid()), options.on_rotate
        )
    agent = Agent(link, clock, sync_interval=options.sync_interval, delivery=delivery)
    endpoint = await serve_workload_api(agent, options.socket_path)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    runner = asyncio.create_task(agent.run())
    announced = asyncio.create_task(agent.ready.wait())
    stopping = asyncio.create_task(stop.wait())
    try:
        await asyncio.wait({announced, stopping}, return_when=asyncio.FIRST_COMPLETED)
        if announced.done():
            print(
                f"broker agent serving the Workload API on unix://{options.socket_path} "
                f"as {agent.agent_id}",
                flush=True,
            )
        await stopping
    finally:
        for task in (runner, announced, stopping):
            task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await runner
        await endpoint.stop()
        link.close()


def run_agent(options: AgentOptions, clock: Clock | None = None) -> None:
    """Run the agent until SIGTERM/SIGINT."""
    logging.basicConfig(
        level=logging.INFO,
        stream=sys.stderr,
        format='{"ts":"%(asctime)s","level":"%(levelname)s","logger":"%(name)s","msg":%(message)r}',
    )
    try:
        import uvloop

        loop_factory: Any = uvloop.new_event_loop
    except ImportError:  # pragma: no cover
        loop_factory = None
    with asyncio.Runner(loop_factory=loop_factory) as runner:
        runner.run(_agent_main(options, clock or SystemClock()))
