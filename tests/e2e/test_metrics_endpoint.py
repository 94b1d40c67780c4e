"""`broker serve --workers 2` with `BROKER_METRICS_LISTEN`: the supervisor serves one
/metrics endpoint summing both workers (prometheus multiprocess mode), and the broker's
stderr is JSON lines."""

from __future__ import annotations

import json
import re
import urllib.request
from pathlib import Path

import pytest

from tests.e2e.conftest import BrokerCli, BrokerProcess, free_port

pytestmark = pytest.mark.e2e

MINT_JWT = "/broker.v1.CertificateAuthority/MintJWTSVID"


def _scrape(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as resp:
        return resp.read().decode()


def _sample(text: str, name: str, **labels: str) -> float:
    total = 0.0
    for line in text.splitlines():
        if not line.startswith(name + "{"):
            continue
        if all(f'{k}="{v}"' in line for k, v in labels.items()):
            total += float(line.rsplit(" ", 1)[1])
    return total


def test_one_endpoint_counts_every_worker(tmp_path: Path) -> None:
    port = free_port()
    server = BrokerProcess(
        tmp_path / "data",
        tmp_path,
        ["--dev", "--data-dir", str(tmp_path / "data"), "--workers", "2"],
        env={"BROKER_METRICS_LISTEN": f"127.0.0.1:{port}"},
    )
    server.start()
    try:
        cli = BrokerCli(server, tmp_path)
        td = cli.ok("ca", "status", "--output", "json").json()["trust_domain"]
        calls = 6
        for _ in range(calls):  # a new connection each: the kernel spreads them over workers
            cli.ok(
                "jwt", "mint", "--spiffe-id", f"spiffe://{td}/default/dev/web", "--audience", "db"
            )
        cli.ok("ca", "rotate", "--force")
        text = _scrape(port)
        # the orchestrator's probes beside /metrics, without credentials
        for path, answer in (("/healthz", "ok\n"), ("/readyz", "ready\n")):
            with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=10) as resp:
                assert (resp.status, resp.read().decode()) == (200, answer)
        # SIGTERM: the supervisor stops its workers and its endpoint, and exits cleanly
        assert server.stop() == 0, server.stderr_text()
        stderr = server.stderr_text()
    finally:
        server.ensure_stopped()

    # the sum over both workers' files, not one worker's share
    assert _sample(text, "broker_rpc_duration_seconds_count", method=MINT_JWT, code="OK") == calls
    assert _sample(text, "broker_audit_write_duration_seconds_count", outcome="ok") >= calls + 2
    assert (
        _sample(
            text, "broker_ca_rotation_duration_seconds_count", trigger="forced", outcome="rotated"
        )
        == 1
    )
    assert re.search(r"metrics on http://127\.0\.0\.1:\d+/metrics", stderr)
    logged = [line for line in stderr.splitlines() if line.startswith("{")]
    assert logged, stderr
    for line in logged:
        record = json.loads(line)
        assert {"ts", "level", "logger", "pid", "msg"} <= set(record)
