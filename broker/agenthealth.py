"""The node agent's health socket (`broker agent --health-socket PATH`) and its reader
(`broker agent status`).

The agent answers every connection on a Unix socket with one JSON line and closes it:

    {"state": "ready" | "degraded" | "starting", "reasons": [...], "agent_id": "spiffe://..."}

`ready`: the agent holds its own SVID and one for every entry, and nothing is failing;
`degraded`: it serves what it holds, with one reason per failing round or entry; `starting`: not
attested yet. No request is read, nothing secret is said (entry ids, SPIFFE IDs and the
broker's refusal messages). The socket is created 0660: the agent's user and group may probe.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import socket
from pathlib import Path
from typing import Any, Protocol

from broker.errors import Unavailable

__all__ = ["HEALTH_STATES", "HealthSource", "read_health", "serve_health"]

HEALTH_STATES = ("ready", "degraded", "starting")
_MAX_ANSWER = 1 << 20


class HealthSource(Protocol):
    """What the socket reports (`broker.agent.Agent`)."""

    @property
    def agent_id(self) -> str | None: ...

    def health(self) -> tuple[str, list[str]]: ...


def health_document(source: HealthSource) -> dict[str, Any]:
    state, reasons = source.health()
    return {"state": state, "reasons": list(reasons), "agent_id": source.agent_id}


async def serve_health(source: HealthSource, path: Path) -> asyncio.AbstractServer:
    """Listen on `path` (a stale socket there is replaced) and answer each connection."""

    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            writer.write(json.dumps(health_document(source)).encode() + b"\n")
            await writer.drain()
        except (ConnectionError, OSError):
            pass
        finally:
            writer.close()
            with contextlib.suppress(ConnectionError, OSError):
                await writer.wait_closed()

    _remove_stale_socket(path)
    server = await asyncio.start_unix_server(answer, path=str(path))
    os.chmod(path, 0o660)
    return server


def _remove_stale_socket(path: Path) -> None:
    """A socket left by an agent that was killed; anything else there is left alone (and the
    bind then fails)."""
    with contextlib.suppress(FileNotFoundError):
        if path.is_socket():
            path.unlink()


def read_health(path: Path, timeout: float = 5.0) -> dict[str, Any]:
    """The agent's answer on `path`; Unavailable (one line) when nothing answers there."""
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as conn:
            conn.settimeout(timeout)
            conn.connect(str(path))
            chunks = []
            size = 0
            while size <= _MAX_ANSWER:
                chunk = conn.recv(65536)
                if not chunk:
                    break
                chunks.append(chunk)
                size += len(chunk)
    except OSError as exc:
        raise Unavailable(
            f"no agent answers on the health socket {path}: {exc.strerror or exc}"
        ) from None
    try:
        document = json.loads(b"".join(chunks))
    except ValueError:
        raise Unavailable(f"the health socket {path} gave no health document") from None
    if not isinstance(document, dict) or document.get("state") not in HEALTH_STATES:
        raise Unavailable(f"the health socket {path} gave no health document")
    reasons = document.get("reasons")
    document["reasons"] = [str(r) for r in reasons] if isinstance(reasons, list) else []
    return document
