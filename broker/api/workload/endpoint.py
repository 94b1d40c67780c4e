"""The SPIFFE Workload API that `broker agent` serves on a Unix socket, behind the
peer-credential proxy (`peercred`), which names every caller by its kernel credentials."""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import logging
import tempfile
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
from google.protobuf import struct_pb2
from grpc_reflection.v1alpha import reflection

from broker.agent import Agent, Snapshot
from broker.errors import BrokerError, InvalidArgument
from ca.errors import CAError

from .._proto import workload_pb2, workload_pb2_grpc
from ..status import to_status
from .peercred import PeerCredentialProxy, PeerRegistry

__all__ = [
    "SECURITY_HEADER",
    "SERVICE_NAME",
    "WorkloadAPIServicer",
    "WorkloadEndpoint",
    "serve_workload_api",
]

log = logging.getLogger("broker.agent")

SECURITY_HEADER = "workload.spiffe.io"
SERVICE_NAME = "SpiffeWorkloadAPI"


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
                ],
                crl=list(snap.crl),
            )
        elif kind == "x509-bundles":
            message = workload_pb2.X509BundlesResponse(
                bundles={f"spiffe://{snap.trust_domain}": snap.bundle_der}, crl=list(snap.crl)
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

    async def FetchX509SVID(
        self, request: workload_pb2.X509SVIDRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[workload_pb2.X509SVIDResponse]:
        async for message in self._stream(context, "x509"):
            yield message

    async def FetchX509Bundles(
        self, request: workload_pb2.X509BundlesRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[workload_pb2.X509BundlesResponse]:
        async for message in self._stream(context, "x509-bundles"):
            yield message

    async def FetchJWTBundles(
        self, request: workload_pb2.JWTBundlesRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[workload_pb2.JWTBundlesResponse]:
        async for message in self._stream(context, "jwt-bundles"):
            yield message

    async def FetchJWTSVID(
        self, request: workload_pb2.JWTSVIDRequest, context: grpc.aio.ServicerContext
    ) -> workload_pb2.JWTSVIDResponse:
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

    async def ValidateJWTSVID(
        self, request: workload_pb2.ValidateJWTSVIDRequest, context: grpc.aio.ServicerContext
    ) -> workload_pb2.ValidateJWTSVIDResponse:
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
