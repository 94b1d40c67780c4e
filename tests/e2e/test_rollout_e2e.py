"""Staged rollout end to end (issue 12): `broker serve --dev`, three real agents each keeping the
secret as a file (`--secret`) and checking it with a real health-check command after each
write (`--health-check`), and the operator's CLI (`secrets rotate --stages`, `rollout status`,
`rollout promote`). (a) A healthy canary is promoted to 100 % and completes: every agent holds
the new value and the old version is revoked. (b) A failing canary (its health check rejects the
new value) is rolled back: every agent is back on the old value and the new version is revoked.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from broker.rollout.plan import stage_of
from tests.e2e import test_agent_e2e as agent_e2e
from tests.e2e.conftest import BrokerCli
from tests.e2e.test_agent_e2e import TD, AgentProcess, _entry, _join_agent

pytestmark = pytest.mark.e2e

# The agent tests' fixtures: a socket directory others may traverse, and the agents to stop.
socket_dir = agent_e2e.socket_dir
agents = agent_e2e.agents

STAGES = (50, 100)
TIMEOUT = 60.0


def _wait_for(predicate: Callable[[], bool], what: str, timeout: float = TIMEOUT) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(0.2)


def _pods(service: str, reference: str) -> list[str]:
    """Three workload identities of `service`: one in the canary stage, two in the last."""
    canary: list[str] = []
    rest: list[str] = []
    n = 0
    while len(canary) < 1 or len(rest) < 2:
        spiffe_id = f"spiffe://{TD}/default/dev/{service}/pod-{n}"
        (canary if stage_of(STAGES, reference, spiffe_id) == 0 else rest).append(spiffe_id)
        n += 1
    return [canary[0], *rest[:2]]


def _start_agents(
    cli: BrokerCli,
    socket_dir: Path,
    tmp_path: Path,
    agents: list[AgentProcess],
    service: str,
    reference: str,
) -> dict[str, Path]:
    """An agent per pod identity, each with the secret as a file and a health check that
    rejects a value starting with "bad-"; {SPIFFE ID: the secret file}."""
    files = {}
    for index, spiffe_id in enumerate(_pods(service, reference)):
        node = f"{service}-node-{index}"
        _entry(
            cli, spiffe_id, f"spiffe://{TD}/agents/{node}", "--selector", f"unix:uid:{os.getuid()}"
        )
        out = tmp_path / f"files-{index}"
        logs = tmp_path / f"agent-{index}"
        sockets = socket_dir / str(index)
        logs.mkdir()
        sockets.mkdir()
        sockets.chmod(0o755)
        check = f"sh -c '! grep -q ^bad- {out / 'api-token'}'"
        _join_agent(
            cli, sockets, logs, agents, node, "--write-dir", str(out),
            "--secret", f"api-token={reference}", "--secret-interval", "1s",
            "--health-check", check,
        )  # fmt: skip
        files[spiffe_id] = out / "api-token"
    return files


def _put(cli: BrokerCli, tmp_path: Path, reference: str, service: str) -> bytes:
    value = f"tok-{os.urandom(12).hex()}".encode()
    path = tmp_path / "v1"
    path.write_bytes(value)
    cli.ok(
        "secrets", "put", reference, "--value-file", str(path), "--owner", service,
        "--classification", "confidential", "--rotation-period", "90d",
    )  # fmt: skip
    return value


def _status(cli: BrokerCli, reference: str) -> dict[str, Any]:
    return dict(json.loads(cli.ok("rollout", "status", reference, "--output", "json").stdout))


def _rotate(cli: BrokerCli, tmp_path: Path, reference: str, value: bytes, *extra: str) -> str:
    path = tmp_path / "v2"
    path.write_bytes(value)
    return cli.ok(
        "secrets", "rotate", reference, "--env", "dev", "--value-file", str(path),
        "--ticket", "CHG-12", "--justification", "staged rollout e2e",
        "--stages", ",".join(f"{s}%" for s in STAGES), *extra,
    ).stdout  # fmt: skip


def test_a_healthy_canary_is_promoted_to_100_percent(
    broker_cli: BrokerCli, socket_dir: Path, tmp_path: Path, agents: list[AgentProcess]
) -> None:
    service, reference = "rollok", "secret://rollok/dev/api/token"
    old = _put(broker_cli, tmp_path, reference, service)
    files = _start_agents(broker_cli, socket_dir, tmp_path, agents, service, reference)
    for path in files.values():
        _wait_for(lambda p=path: p.exists() and p.read_bytes() == old, f"{path} to hold v1")
    new = f"tok-{os.urandom(12).hex()}".encode()
    started = _rotate(
        broker_cli, tmp_path, reference, new, "--bake", "30s", "--health-check", "/bin/true"
    )
    assert started.startswith("rollout rollout-") and "v1 -> v2, stage 1 of 2 (50%) open" in started
    canary, *rest = files
    # The canary stage: only the canary gets v2; it reports healthy; the others stay on v1.
    _wait_for(lambda: files[canary].read_bytes() == new, "the canary to get v2")

    def canary_reported() -> bool:
        consumers = {c["identity"]: c for c in _status(broker_cli, reference)["consumers"]}
        c = consumers.get(canary, {})
        return bool(c.get("reported_version") == 2 and c.get("health") == "healthy")

    _wait_for(canary_reported, "the canary's healthy report")
    assert all(files[p].read_bytes() == old for p in rest)
    status = _status(broker_cli, reference)
    assert status["state"] == "running" and status["stage"] == 1
    # Promote to 100 %: everyone gets v2; the final stage bakes, then the rollout completes.
    promoted = broker_cli.ok("rollout", "promote", reference)
    assert promoted.stdout.startswith("promoted: stage 2 (100%) open")
    _wait_for(lambda: _status(broker_cli, reference)["state"] == "completed", "completion")
    for path in files.values():
        _wait_for(lambda p=path: p.read_bytes() == new, f"{path} to hold v2")
    status = _status(broker_cli, reference)
    assert status["reason"] == "every stage baked healthy" and status["check"] == "passed"
    by_id = {c["identity"]: c for c in status["consumers"]}
    assert set(by_id) == set(files)
    assert all(c["reported_version"] == 2 and c["health"] == "healthy" for c in by_id.values())
    shown = json.loads(broker_cli.ok("secrets", "show", reference, "--output", "json").stdout)
    assert [(v["version"], v["state"]) for v in shown["versions"]] == [
        (1, "revoked"),
        (2, "current"),
    ]
    text = broker_cli.ok("rollout", "status", reference).stdout
    assert f"of {reference} (tenant default): completed" in text.splitlines()[0]
    # Finished: promote and abort are refused with one line, and nothing changes.
    for verb in ("promote", "abort"):
        refused = broker_cli.run("rollout", verb, reference)
        assert refused.returncode == 1
        assert refused.stderr.startswith("broker: ") and "completed" in refused.stderr
    assert _status(broker_cli, reference)["state"] == "completed"


def test_a_failing_canary_is_rolled_back_for_every_consumer(
    broker_cli: BrokerCli, socket_dir: Path, tmp_path: Path, agents: list[AgentProcess]
) -> None:
    service, reference = "rollbad", "secret://rollbad/dev/api/token"
    old = _put(broker_cli, tmp_path, reference, service)
    files = _start_agents(broker_cli, socket_dir, tmp_path, agents, service, reference)
    for path in files.values():
        _wait_for(lambda p=path: p.exists() and p.read_bytes() == old, f"{path} to hold v1")
    bad = f"bad-{os.urandom(12).hex()}".encode()
    _rotate(broker_cli, tmp_path, reference, bad, "--bake", "10m")
    # The canary writes the bad value, its health check fails, it reports: rolled back at once.
    _wait_for(
        lambda: _status(broker_cli, reference)["state"] == "rolled-back", "the automatic rollback"
    )
    status = _status(broker_cli, reference)
    canary = next(iter(files))
    assert canary in status["reason"] and "--health-check failed: exit 1" in status["reason"]
    assert status["failures"] == 1
    # Every consumer is back on the old value (the canary rewrites its file at its next read).
    for path in files.values():
        _wait_for(lambda p=path: p.read_bytes() == old, f"{path} back on v1")
    shown = json.loads(broker_cli.ok("secrets", "show", reference, "--output", "json").stdout)
    assert [(v["version"], v["state"]) for v in shown["versions"]] == [
        (1, "current"),
        (2, "revoked"),
    ]
    # The audit ledger has every step with its versions.
    entries = json.loads(broker_cli.ok("audit", "tail", "-n", "200", "--output", "json").stdout)
    events = [e["event"] for e in entries]
    steps = [e for e in events if str(e.get("what", "")).startswith("rollout.")]
    whats = [e["what"] for e in steps]
    assert "rollout.start" in whats and "rollout.rolled-back" in whats
    assert all(e["details"]["to_version"] == 2 for e in steps)
