"""gRPC clients for the load workers: grpc.aio on one event loop, or sync grpc in threads.

Requests are pre-serialized protobuf bytes sent through a generic unary-unary method (no
per-call serialization in the timed loop); responses are parsed, as a real client would.
"""

from __future__ import annotations

import importlib
import time
from dataclasses import dataclass
from typing import Any

__all__ = ["GrpcOp", "GrpcSpec", "ResponseError"]


class ResponseError(Exception):
    pass


def _load(dotted: str) -> Any:
    module, _, name = dotted.partition(":")
    return getattr(importlib.import_module(module), name)


@dataclass(frozen=True)
class GrpcOp:
    """One operation of a mixed load: its name in the report and how to call and check it."""

    name: str
    method: str
    response_type: str
    require_field: str
    # Hand each answer to the relying party (`x509`: its cert_chain, `jwt`: its token) when
    # the spec has a `verify_queue` (loadtests.relyingparty).
    verify: str = ""


@dataclass(frozen=True)
class GrpcSpec:
    """Call `method` over mTLS with one of `requests`; the parsed response must have a non-empty
    `require_field` (a repeated or bytes/string field) to count as a success.

    With `ops`, request `i` is a call of `ops[request_ops[i]]` instead (a mixed load), and the
    generator reports each operation by its name."""

    address: str
    method: str
    requests: tuple[bytes, ...]
    response_type: str  # "module:Class"
    require_field: str
    root_pem: bytes
    cert_pem: bytes
    key_pem: bytes
    server_name: str | None = None
    channels: int = 1
    timeout_s: float = 10.0
    mode: str = "async"  # or "threads"
    name: str = ""  # the operation's name in the report (single-operation load)
    ops: tuple[GrpcOp, ...] = ()
    request_ops: tuple[int, ...] = ()
    verify: str = ""  # the single operation's GrpcOp.verify
    # A spawn-context multiprocessing queue (set per run, pickled when the workers spawn): the
    # answers of operations with `verify` go there, with the moment they arrived.
    verify_queue: Any = None

    @property
    def payload_count(self) -> int:
        return len(self.requests)

    def operation(self, index: int) -> str:
        if self.ops:
            return self.ops[self.request_ops[index]].name
        return self.name

    def make(self) -> Any:
        return _AioClient(self) if self.mode == "async" else _SyncClient(self)

    def channel_options(self) -> list[tuple[str, Any]]:
        opts: list[tuple[str, Any]] = [
            # Separate channels get separate connections instead of sharing one subchannel.
            ("grpc.use_local_subchannel_pool", 1),
            ("grpc.max_receive_message_length", 16 * 1024 * 1024),
        ]
        if self.server_name:
            opts.append(("grpc.ssl_target_name_override", self.server_name))
        if "," in self.address:  # several replicas (targets.broker.grpc_target): spread calls
            opts.append(("grpc.lb_policy_name", "round_robin"))
        return opts


def _classify(exc: BaseException) -> str:
    import grpc

    if isinstance(exc, grpc.RpcError) and hasattr(exc, "code"):
        code = exc.code()
        return f"grpc {code.name}" if code is not None else "grpc ?"
    return type(exc).__name__


class _Base:
    def __init__(self, spec: GrpcSpec) -> None:
        self.spec = spec
        ops = spec.ops or (
            GrpcOp(spec.name, spec.method, spec.response_type, spec.require_field, spec.verify),
        )
        self._ops = ops
        self._op_of = spec.request_ops or (0,) * len(spec.requests)
        self._calls: list[list[Any]] = []  # per channel, per operation

    def _stubs(self, channel: Any) -> list[Any]:
        return [
            channel.unary_unary(op.method, response_deserializer=_load(op.response_type).FromString)
            for op in self._ops
        ]

    def _pick(self, index: int) -> tuple[Any, GrpcOp]:
        op = self._op_of[index]
        return self._calls[index % len(self._calls)][op], self._ops[op]

    def _check(self, raw: Any, op: GrpcOp) -> None:
        if not getattr(raw, op.require_field):
            raise ResponseError(f"response without {op.require_field}")
        sink = self.spec.verify_queue
        if sink is not None and op.verify:
            # An enqueue only (a feeder thread sends it): verified by the relying party in
            # the parent process, off the measured latency.
            payload = tuple(raw.cert_chain) if op.verify == "x509" else raw.token
            sink.put((op.verify, time.monotonic(), payload))

    def _credentials(self) -> Any:
        import grpc

        return grpc.ssl_channel_credentials(
            root_certificates=self.spec.root_pem,
            private_key=self.spec.key_pem,
            certificate_chain=self.spec.cert_pem,
        )

    def classify(self, exc: BaseException) -> str:
        return _classify(exc)


class _AioClient(_Base):
    async def open(self) -> None:
        import grpc

        creds = self._credentials()
        self._channels = [
            grpc.aio.secure_channel(self.spec.address, creds, self.spec.channel_options())
            for _ in range(max(1, self.spec.channels))
        ]
        for ch in self._channels:
            await ch.channel_ready()
        self._calls = [self._stubs(ch) for ch in self._channels]

    async def call(self, index: int) -> None:
        call, op = self._pick(index)
        self._check(await call(self.spec.requests[index], timeout=self.spec.timeout_s), op)

    async def close(self) -> None:
        for ch in self._channels:
            await ch.close()


class _SyncClient(_Base):
    def open(self) -> None:
        import grpc

        creds = self._credentials()
        self._channels = [
            grpc.secure_channel(self.spec.address, creds, self.spec.channel_options())
            for _ in range(max(1, self.spec.channels))
        ]
        for ch in self._channels:
            grpc.channel_ready_future(ch).result(timeout=30)
        self._calls = [self._stubs(ch) for ch in self._channels]

    def call(self, index: int) -> None:
        call, op = self._pick(index)
        self._check(call(self.spec.requests[index], timeout=self.spec.timeout_s), op)

    def close(self) -> None:
        for ch in self._channels:
            ch.close()
