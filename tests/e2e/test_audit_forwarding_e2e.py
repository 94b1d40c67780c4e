"""The audit stream end to end: `broker serve --config` with an [audit.sinks] syslog+tls sink
pointing at a real rsyslog. Requests are audited and forwarded; rsyslog is killed (SIGKILL)
while the broker keeps answering, the broker is restarted, rsyslog comes back: every ledger
entry is in rsyslog's file, in order, none missing after deduplication by seq."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest

from broker.storage.factory import open_storage
from tests.e2e.conftest import BrokerCli, BrokerProcess
from tests.fixtures.rsyslog import RsyslogServer

pytestmark = pytest.mark.e2e

TD = "incident.example"
OPERATOR = f"spiffe://{TD}/broker/operator/ops"


def _config(tmp: Path, rsyslog: RsyslogServer) -> Path:
    (tmp / "data").mkdir(mode=0o700)
    (tmp / "pin").write_text("incident-e2e-pin\n")
    (tmp / "pin").chmod(0o600)
    path = tmp / "broker.toml"
    path.write_text(
        f"""
trust_domain = "{TD}"
data_dir = "{tmp / "data"}"

[storage]
dsn = "sqlite:///{tmp / "data" / "broker.db"}"

[keys]
uri = "software:path={tmp / "keys"}?pin-source=file:{tmp / "pin"}"

[server]
operators = ["{OPERATOR}"]

[audit]
forward_interval = "100ms"

[audit.sinks.siem]
url = "syslog+tls://127.0.0.1:{rsyslog.port}"
ca_file = "{rsyslog.ca_file}"
timeout = "5s"
"""
    )
    return path


async def _ledger_seqs(db: Path) -> list[int]:
    store = await open_storage(f"sqlite:///{db}")
    try:
        return [r.seq for r in await store.read_audit(0, 100_000)]
    finally:
        await store.close()


def _received(rsyslog: RsyslogServer) -> list[int]:
    seen: list[int] = []
    for rec in rsyslog.records():
        seq = int(rec["seq"])
        if seq not in seen:
            seen.append(seq)
    return seen


def _wait_for(rsyslog: RsyslogServer, count: int, server: BrokerProcess) -> list[int]:
    deadline = time.monotonic() + 60  # waiting on two subprocesses, not timing the broker
    while time.monotonic() < deadline:
        got = _received(rsyslog)
        if len(got) >= count:
            return got
        time.sleep(0.1)
    raise AssertionError(
        f"rsyslog has {len(_received(rsyslog))} of {count}: {server.stderr_text()[-3000:]}"
    )


def test_the_stream_survives_a_receiver_kill_and_a_broker_restart(
    tmp_path: Path, rsyslog: RsyslogServer
) -> None:
    config = _config(tmp_path, rsyslog)
    data = tmp_path / "data"
    server = BrokerProcess(data, tmp_path, ["--config", str(config)])
    cli = BrokerCli(server, tmp_path)
    server.start()
    try:
        for _ in range(3):
            cli.ok("ca", "status")
        first = _wait_for(rsyslog, 4, server)
        assert first == list(range(1, len(first) + 1))

        rsyslog.kill()
        for _ in range(3):
            cli.ok("ca", "status")  # answered while the sink is down
        assert server.stop() == 0, server.stderr_text()
        server.start()  # the broker restarts with the sink still down
        cli.ok("ca", "status")
        rsyslog.start()
        cli.ok("ca", "status")
        assert server.stop() == 0, server.stderr_text()
        expected = asyncio.run(_ledger_seqs(data / "broker.db"))
        server.start()  # forwards what was left, and its own start entries
        expected_now = asyncio.run(_ledger_seqs(data / "broker.db"))
        got = _wait_for(rsyslog, len(expected_now), server)
        assert got[: len(expected)] == expected
        assert got == list(range(1, len(got) + 1))  # in order, none missing
    finally:
        server.ensure_stopped()
