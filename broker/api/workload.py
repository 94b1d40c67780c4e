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
import datetime as dt
import grp
import itertools
import json
import logging
import os
import pwd
import secrets
import signal
import socket
import stat
import struct
import sys
import tempfile
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import grpc
from cryptography import x509
from google.protobuf import struct_pb2
from grpc_reflection.v1alpha import reflection

from broker.agent import Agent, FileDelivery, Snapshot
from broker.errors import BrokerError, InvalidArgument, PermissionDenied
from broker.secretfiles import SecretFiles
from ca.clock import Clock, SystemClock
from ca.errors import CAError

from ._proto import workload_pb2, workload_pb2_grpc
from .client import BrokerClient, ClientCredentials
from .identity_client import GrpcBrokerLink
from .relay import RelayEnd
from .secrets_client import BrokerSecretSource, SecretsClient
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


def _claims_struct(claims: dict[str, Any]) -> struct_pb2.Struct:
    out = struct_pb2.Struct()
    out.update(json.loads(json.dumps(claims, default=str)))
    return out


class WorkloadAPIServicer(workload_pb2_grpc.SpiffeWorkloadAPIServicer):  # type: ignore[misc]
    def __init__(self, agent: Agent, registry: PeerRegistry) -> None:
        self._agent = agent
        self._registry = registry
        # Rendered stream messages per (kind, snapshot version, caller selectors): callers
        # with the same selectors share one message until the snapshot changes or an SVID in
        # it expires.
        self._rendered: dict[tuple[str, int, frozenset[str]], tuple[Any, bytes, dt.datetime]] = {}
        self._rendered_version = -1

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

    def _render(self, kind: str, selectors: frozenset[str], snap: Snapshot) -> tuple[Any, bytes]:
        """The message of stream `kind` for this caller; raises BrokerError."""
        if snap.version != self._rendered_version or len(self._rendered) > 4096:
            self._rendered.clear()
            self._rendered_version = snap.version
        key = (kind, snap.version, selectors)
        hit = self._rendered.get(key)
        now = self._agent.clock.now()
        if hit is not None and hit[2] > now:
            return hit[0], hit[1]
        svids = self._agent.svids_for(selectors, snap)  # entitlement for every stream
        if kind == "x509":
            message: Any = workload_pb2.X509SVIDResponse(
                svids=[
                    workload_pb2.X509SVID(
                        spiffe_id=s.spiffe_id,
                        x509_svid=b"".join(s.chain_der),
                        x509_svid_key=s.key_der,
                        bundle=snap.bundle_der,
                    )
                    for s in svids
                ]
            )
        elif kind == "x509-bundles":
            message = workload_pb2.X509BundlesResponse(
                bundles={f"spiffe://{snap.trust_domain}": snap.bundle_der}
            )
        else:
            message = workload_pb2.JWTBundlesResponse(
                bundles={f"spiffe://{snap.trust_domain}": snap.jwt_bundle_json}
            )
        encoded = message.SerializeToString(deterministic=True)
        self._rendered[key] = (message, encoded, min(s.expires_at for s in svids))
        return message, encoded

    async def _stream(self, context: grpc.aio.ServicerContext, kind: str) -> AsyncIterator[Any]:
        selectors = await self._caller(context)
        snapshot = self._agent.snapshot
        last: bytes | None = None
        while True:
            try:
                message, encoded = self._render(kind, selectors, snapshot)
            except (BrokerError, CAError) as exc:
                await _abort(context, exc)  # also mid-stream, e.g. the entry was deleted
                return
            if encoded != last:
                last = encoded
                yield message
            snapshot = await self._agent.wait_change(snapshot.version)

    async def FetchX509SVID(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        async for message in self._stream(context, "x509"):
            yield message

    async def FetchX509Bundles(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        async for message in self._stream(context, "x509-bundles"):
            yield message

    async def FetchJWTBundles(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        async for message in self._stream(context, "jwt-bundles"):
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
    endpoint = WorkloadEndpoint(server, proxy, private_dir)
    try:
        await proxy.start()
    except BaseException:
        await endpoint.stop()
        raise
    return endpoint


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
    # Secrets to keep as 0600 files in `write_dir` (file name -> secret://...), fetched with
    # the identity the agent writes there (the workload's own), refreshed every
    # `secret_interval` seconds and right after each SVID rotation.
    secrets: dict[str, str] = field(default_factory=dict)
    secret_interval: float = 10.0


RESERVED_FILES = frozenset({"svid.pem", "key.pem", "bundle.pem"})


class _SecretFileSync:
    """Keeps `AgentOptions.secrets` as files in the write dir, as the workload whose SVID the
    agent writes there: its mTLS identity is the one the policy sees."""

    def __init__(self, options: AgentOptions) -> None:
        assert options.write_dir is not None
        for name in options.secrets:
            if name in RESERVED_FILES:
                raise InvalidArgument(f"secret file name {name!r} is taken by the agent's SVID")
        self._options = options
        self._dir = options.write_dir
        self._identity: bytes = b""
        self._files: SecretFiles | None = None
        self._client: BrokerClient | None = None
        self.wake = asyncio.Event()

    def _source_for_identity(self) -> bool:
        """(Re)build the client when the SVID in the write dir changed; False if none yet."""
        try:
            chain = (self._dir / "svid.pem").read_bytes()
            key = (self._dir / "key.pem").read_bytes()
            bundle = (self._dir / "bundle.pem").read_bytes()
        except FileNotFoundError:
            return False
        if chain + bundle != self._identity:
            if self._client is not None:
                self._client.close()
            self._client = BrokerClient(self._options.server, ClientCredentials(chain, key, bundle))
            source = BrokerSecretSource(SecretsClient(self._client))
            self._files = SecretFiles(source, self._dir, self._options.secrets)
            self._identity = chain + bundle
        return True

    def sync_once(self) -> None:
        if not self._source_for_identity() or self._files is None:
            return
        for result in self._files.sync():
            if result.outcome in ("removed", "kept"):
                log.warning("secret file %s %s: %s", result.name, result.outcome, result.error)

    async def run(self) -> None:
        while True:
            try:
                await asyncio.to_thread(self.sync_once)
            except Exception:
                log.exception("secret file sync failed; retrying")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.wake.wait(), self._options.secret_interval)
            self.wake.clear()

    def close(self) -> None:
        if self._client is not None:
            self._client.close()


def pinned_roots(bundle_pem: bytes) -> list[x509.Certificate]:
    """The roots of the `--bundle` file: what the agent trusts before the broker says more."""
    try:
        roots = x509.load_pem_x509_certificates(bundle_pem)
    except ValueError:
        raise InvalidArgument("the --bundle file holds no PEM certificates") from None
    return roots


async def _agent_main(options: AgentOptions, clock: Clock) -> None:
    link = GrpcBrokerLink(
        options.server,
        options.attest_server,
        options.bundle_pem,
        join_token=options.join_token,
        jwt=options.jwt,
    )
    delivery = None
    secret_files = None
    loop = asyncio.get_running_loop()
    if options.write_dir is not None:
        wake: Callable[[], None] | None = None
        if options.secrets:
            secret_files = _SecretFileSync(options)
            event = secret_files.wake

            def wake() -> None:  # deliver() may run on a worker thread: go through the loop
                loop.call_soon_threadsafe(event.set)

        delivery = FileDelivery(
            options.write_dir,
            selectors_of(os.getuid(), os.getgid()),
            options.on_rotate,
            on_written=wake,
        )
    agent = Agent(
        link,
        clock,
        trust_anchors=pinned_roots(options.bundle_pem),
        sync_interval=options.sync_interval,
        delivery=delivery,
    )
    endpoint = await serve_workload_api(agent, options.socket_path)
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    runner = asyncio.create_task(agent.run())
    secrets_task = None if secret_files is None else asyncio.create_task(secret_files.run())
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
        if secrets_task is not None:
            secrets_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await secrets_task
        with contextlib.suppress(asyncio.CancelledError):
            await runner
        await endpoint.stop()
        link.close()
        if secret_files is not None:
            secret_files.close()


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
