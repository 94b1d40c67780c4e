"""One end of a byte relay between two asyncio connections, as the connection gate in front
of the gRPC ports and the Workload API's SO_PEERCRED proxy both run: the transport's writes,
EOF, close, abort and flow control, each a no-op once the connection is gone."""

from __future__ import annotations

import asyncio
from typing import cast

__all__ = ["RelayEnd"]


class RelayEnd(asyncio.Protocol):
    """Subclasses pass what they receive to the other end (`data_received`, `eof_received`,
    `pause_writing`/`resume_writing`) and are driven by it through these methods."""

    _transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass

    def write(self, data: bytes) -> None:
        if self._transport is not None:
            self._transport.write(data)

    def write_eof(self) -> None:
        if self._transport is not None and self._transport.can_write_eof():
            self._transport.write_eof()

    def close(self) -> None:
        if self._transport is not None:
            self._transport.close()

    def abort(self) -> None:
        if self._transport is not None:
            self._transport.abort()

    def pause_reading(self) -> None:
        if self._transport is not None:
            self._transport.pause_reading()

    def resume_reading(self) -> None:
        if self._transport is not None:
            self._transport.resume_reading()
