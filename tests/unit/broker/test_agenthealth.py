"""The agent's health socket and `broker agent status` (issue 15: ready/degraded with the
reasons, usable as a probe: exit 0 only when ready)."""

from __future__ import annotations

import asyncio
import json
import stat
from pathlib import Path

import pytest
from click.testing import CliRunner

from broker.agenthealth import read_health, serve_health
from broker.cli.root import cli
from broker.errors import Unavailable


class FakeSource:
    agent_id: str | None = "spiffe://example.org/agents/node1"

    def __init__(self) -> None:
        self.state = ("ready", [])

    def health(self) -> tuple[str, list[str]]:
        state, reasons = self.state
        return state, list(reasons)


def _status(path: Path, *extra: str) -> tuple[int, str, str]:
    result = CliRunner().invoke(
        cli, ["agent", "status", "--health-socket", str(path), *extra], catch_exceptions=False
    )
    return result.exit_code, result.stdout, result.stderr


async def test_the_socket_answers_ready_then_degraded_with_reasons(tmp_path: Path) -> None:
    path = tmp_path / "health.sock"
    source = FakeSource()
    server = await serve_health(source, path)
    try:
        assert stat.S_IMODE(path.stat().st_mode) == 0o660
        ready = await asyncio.to_thread(read_health, path)
        assert ready == {"state": "ready", "reasons": [], "agent_id": source.agent_id}
        code, out, _ = await asyncio.to_thread(_status, path)
        assert (code, out) == (0, "ready\n")

        source.state = ("degraded", ["entry e-web: DNS name 'web.internal' is not allowed"])
        code, out, _ = await asyncio.to_thread(_status, path)
        assert code == 1
        assert out == "degraded\n  entry e-web: DNS name 'web.internal' is not allowed\n"
        code, out, _ = await asyncio.to_thread(_status, path, "--output", "json")
        assert code == 1
        assert json.loads(out) == {
            "state": "degraded",
            "reasons": ["entry e-web: DNS name 'web.internal' is not allowed"],
            "agent_id": source.agent_id,
        }
    finally:
        server.close()
        await server.wait_closed()


async def test_a_stale_socket_is_replaced(tmp_path: Path) -> None:
    path = tmp_path / "health.sock"
    first = await serve_health(FakeSource(), path)
    first.close()
    await first.wait_closed()
    assert path.is_socket()  # left behind, as by a killed agent
    second = await serve_health(FakeSource(), path)
    try:
        assert (await asyncio.to_thread(read_health, path))["state"] == "ready"
    finally:
        second.close()
        await second.wait_closed()


def test_no_agent_on_the_socket_is_one_line_and_exit_1(tmp_path: Path) -> None:
    path = tmp_path / "none.sock"
    with pytest.raises(Unavailable, match="no agent answers on the health socket"):
        read_health(path)
    code, out, err = _status(path)
    assert code == 1 and out == ""
    assert err.startswith("broker: no agent answers on the health socket ")
    assert len(err.splitlines()) == 1
