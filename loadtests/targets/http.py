"""An asyncio HTTP/1.1 client (aiohttp, keep-alive connections) for the load workers."""

from __future__ import annotations

import asyncio
import ssl
from dataclasses import dataclass
from typing import Any

__all__ = ["HttpError", "HttpSpec"]


class HttpError(Exception):
    def __init__(self, status: int, body: bytes) -> None:
        super().__init__(f"HTTP {status}: {body[:300]!r}")
        self.status = status


@dataclass(frozen=True)
class HttpSpec:
    """POST one of `bodies` to `base_url + path`; a 200 whose body holds `expect` is a success."""

    base_url: str
    path: str
    headers: tuple[tuple[str, str], ...]
    bodies: tuple[bytes, ...]
    expect: bytes
    ca_pem: str | None = None
    timeout_s: float = 10.0
    mode: str = "async"
    name: str = ""  # the operation's name in the report
    method: str = "POST"  # GET sends no body (bodies then only set the payload count)

    @property
    def payload_count(self) -> int:
        return len(self.bodies)

    def operation(self, index: int) -> str:
        return self.name

    def make(self) -> _AiohttpClient:
        return _AiohttpClient(self)


class _AiohttpClient:
    def __init__(self, spec: HttpSpec) -> None:
        self.spec = spec
        self._session: Any = None
        self._url = spec.base_url.rstrip("/") + spec.path

    async def open(self) -> None:
        import aiohttp

        ssl_ctx: ssl.SSLContext | bool = False
        if self.spec.base_url.startswith("https:"):
            ssl_ctx = ssl.create_default_context(cadata=self.spec.ca_pem)
        connector = aiohttp.TCPConnector(
            limit=0, ssl=ssl_ctx, keepalive_timeout=120, enable_cleanup_closed=False
        )
        self._session = aiohttp.ClientSession(
            connector=connector,
            headers=dict(self.spec.headers),
            timeout=aiohttp.ClientTimeout(total=self.spec.timeout_s),
            skip_auto_headers=("User-Agent",),
        )

    async def call(self, index: int) -> None:
        data = None if self.spec.method == "GET" else self.spec.bodies[index]
        async with self._session.request(self.spec.method, self._url, data=data) as resp:
            body = await resp.read()
            if resp.status != 200 or self.spec.expect not in body:
                raise HttpError(resp.status, body)

    def classify(self, exc: BaseException) -> str:
        if isinstance(exc, HttpError):
            return f"HTTP {exc.status}"
        if isinstance(exc, asyncio.TimeoutError | TimeoutError):
            return "timeout"
        return type(exc).__name__

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
