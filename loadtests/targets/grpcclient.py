"""gRPC clients for the load workers: grpc.aio on one event loop, or sync grpc in threads.

Requests are pre-serialized protobuf bytes sent through a generic unary-unary method (no
per-call serialization in the timed loop); responses are parsed, as a real client would.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Any

__all__ = ["GrpcSpec", "ResponseError"]


class ResponseError(Exception):
    pass


def _load(dotted: str) -> Any:
    module, _, name = dotted.partition(":")
    return getattr(importlib.import_module(module), name)


@dataclass(frozen=True)
class GrpcSpec:
    """Call `method` over mTLS with one of `requests`; the parsed response must have a non-empty
    `require_field` (a repeated or bytes/string field) to count as a success."""

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

    @property
    def payload_count(self) -> int:
        return len(self.requests)

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
        self._parse = _load(spec.response_type).FromString
        self._calls: list[Any] = []

    def _check(self, raw: Any) -> None:
        if not getattr(raw, self.spec.require_field):
            raise ResponseError(f"response without {self.spec.require_field}")

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
        self._calls = [
            ch.unary_unary(self.spec.method, response_deserializer=self._parse)
            for ch in self._channels
        ]

    async def call(self, index: int) -> None:
        call = self._calls[index % len(self._calls)]
        self._check(await call(self.spec.requests[index], timeout=self.spec.timeout_s))

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
        self._calls = [
            ch.unary_unary(self.spec.method, response_deserializer=self._parse)
            for ch in self._channels
        ]

    def call(self, index: int) -> None:
        call = self._calls[index % len(self._calls)]
        self._check(call(self.spec.requests[index], timeout=self.spec.timeout_s))

    def close(self) -> None:
        for ch in self._channels:
            ch.close()
