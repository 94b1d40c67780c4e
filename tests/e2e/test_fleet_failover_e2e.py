"""Clients with several brokers, end to end: two `broker serve` replicas on one storage (one
SQLite file, one key store), the CLI and `broker agent` given both addresses. One replica is
killed (SIGKILL): the agent keeps serving its cached SVIDs, re-opens its sync stream on the
other replica (which pushes it a new entry), and the CLI's calls fail over without the user
doing anything."""

from __future__ import annotations

import asyncio
import json
import os
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from spiffe import WorkloadApiClient

from broker.storage.factory import open_storage
from tests.e2e.conftest import BrokerCli, BrokerProcess, CliResult
from tests.e2e.test_agent_e2e import AgentProcess, attest_address, socket_dir

pytestmark = [pytest.mark.e2e]

__all__ = ["socket_dir"]

TD = "fleet.example"
OPERATOR = f"spiffe://{TD}/broker/operator/ops"
AGENT = f"spiffe://{TD}/agents/node-f"


def _config(tmp: Path, name: str) -> Path:
    """Replica `name`: its own data dir (lock, operator identity), the shared storage and
    keys."""
    data = tmp / name
    data.mkdir(mode=0o700)
    path = tmp / f"{name}.toml"
    path.write_text(
        f"""
trust_domain = "{TD}"
data_dir = "{data}"

[storage]
dsn = "sqlite:///{tmp / "shared.db"}"

[keys]
uri = "software:path={tmp / "keys"}?pin-source=file:{tmp / "pin"}"

[server]
operators = ["{OPERATOR}"]
"""
    )
    return path


class Replicas:
    """The two replicas as one `server` for `AgentProcess` and `BrokerCli`: both addresses."""

    def __init__(self, a: BrokerProcess, b: BrokerProcess) -> None:
        self.a, self.b = a, b
        self.data_dir = a.data_dir

    @property
    def address(self) -> str:
        return f"{self.a.address},{self.b.address}"

    @property
    def listening_line(self) -> str:
        return f"(attestation on {attest_address(self.a)},{attest_address(self.b)})"


@pytest.fixture
def replicas(tmp_path: Path) -> Iterator[Replicas]:
    (tmp_path / "pin").write_text("fleet-e2e-pin\n")
    (tmp_path / "pin").chmod(0o600)
    a = BrokerProcess(tmp_path / "a", tmp_path, ["--config", str(_config(tmp_path, "a"))])
    b = BrokerProcess(tmp_path / "b", tmp_path, ["--config", str(_config(tmp_path, "b"))])
    a.start()  # creates the CA; b loads it
    try:
        b.start()
        yield Replicas(a, b)
    finally:
        a.ensure_stopped()
        b.ensure_stopped()


def _cli(replicas: Replicas, tmp_path: Path, *args: str, server: str | None = None) -> CliResult:
    env = {"BROKER_SERVER": server or replicas.address, "BROKER_ADDR": ""}
    return BrokerCli(replicas.a, tmp_path).run(*args, env=env)


def _ok(replicas: Replicas, tmp_path: Path, *args: str) -> CliResult:
    result = _cli(replicas, tmp_path, *args)
    assert result.returncode == 0, result.describe()
    return result


def _svids(agent: AgentProcess) -> set[str]:
    with WorkloadApiClient(agent.endpoint) as client:
        return {str(s.spiffe_id) for s in client.fetch_x509_context().x509_svids}


def _wait_svids(agent: AgentProcess, want: set[str]) -> set[str]:
    deadline = time.monotonic() + 60  # waiting on subprocesses, not timing the broker
    got: set[str] = set()
    while time.monotonic() < deadline:
        got = _svids(agent)
        if got >= want:
            return got
        time.sleep(0.2)
    raise AssertionError(f"the agent serves {got}, not {want}:\n{agent.stderr_text()[-3000:]}")


async def _watch_openings(db: Path) -> list[dict[str, object]]:
    store = await open_storage(f"sqlite:///{db}")
    try:
        events = [json.loads(r.event) for r in await store.read_audit(0, 100_000)]
    finally:
        await store.close()
    return [e for e in events if str(e.get("method", "")).endswith("/WatchAgent")]


def test_a_killed_replica_costs_the_agent_and_the_cli_nothing(
    replicas: Replicas, tmp_path: Path, socket_dir: Path
) -> None:
    uid = f"unix:uid:{os.getuid()}"
    web, api = f"spiffe://{TD}/acme/dev/web", f"spiffe://{TD}/acme/dev/api"
    _ok(replicas, tmp_path, "entry", "create", "--spiffe-id", web, "--parent-id", AGENT,
        "--selector", uid)  # fmt: skip
    token = _ok(replicas, tmp_path, "token", "create", "--spiffe-id", AGENT).stdout.strip()
    agent = AgentProcess(
        replicas,  # type: ignore[arg-type]
        socket_dir,
        tmp_path,
        env={"BROKER_JOIN_TOKEN": token},
    )
    agent.start()
    try:
        assert _wait_svids(agent, {web}) == {web}

        replicas.a._kill()  # SIGKILL the replica every client is stuck to (the first)
        assert _svids(agent) == {web}  # served from the agent's cache meanwhile

        # The CLI with both addresses: the refused connection is retried on b at once.
        status = _cli(replicas, tmp_path, "ca", "status", "--output", "json")
        assert status.returncode == 0, status.describe()
        # With only the dead one: a one-line refusal naming it.
        alone = _cli(replicas, tmp_path, "ca", "status", server=replicas.a.address)
        assert alone.returncode != 0 and alone.stderr_lines[0].startswith("broker: ")
        assert len(alone.stderr_lines) == 1, alone.describe()

        # A new entry, written through b, is pushed to the agent over its re-opened stream.
        _ok(replicas, tmp_path, "entry", "create", "--spiffe-id", api, "--parent-id", AGENT,
            "--selector", uid)  # fmt: skip
        assert _wait_svids(agent, {web, api}) == {web, api}
        openings = asyncio.run(_watch_openings(tmp_path / "shared.db"))
        allowed = [e for e in openings if e["decision"] == "allow" and e["who"] == AGENT]
        assert len(allowed) >= 2  # on a, then again on b
        # A replica holding an agent's stream still stops cleanly and promptly on SIGTERM
        # (BrokerProcess.stop fails the test after 10 s), and the agent keeps serving.
        assert replicas.b.stop() == 0, replicas.b.stderr_text()[-3000:]
        assert _svids(agent) == {web, api}
    finally:
        agent.stop()
