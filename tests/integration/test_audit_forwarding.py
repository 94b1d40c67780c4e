"""The audit stream into a REAL rsyslog (TLS input, its own CA): across a receiver killed mid-
stream and a broker restart, every ledger entry arrives, in order, none missing, and after
deduplication by seq none twice; each received record re-checks against the ledger. A receiver
whose certificate is not from the configured CA gets nothing."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from prometheus_client import REGISTRY

from broker.audit import AuditLedger
from broker.config import AuditSink
from broker.forwarding import AuditForwarder, SyslogTlsSink
from broker.storage.factory import open_storage
from broker.storage.interface import Storage
from ca.clock import FakeClock
from ca.keys import SoftwareBackend
from tests.fixtures.rsyslog import RsyslogServer


class Monotonic:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
async def storage(tmp_path: Path) -> AsyncIterator[Storage]:
    store = await open_storage(f"sqlite:///{tmp_path / 'broker.db'}")
    await store.migrate()
    yield store
    await store.close()


@pytest.fixture
async def ledger(storage: Storage) -> AsyncIterator[AuditLedger]:
    led = AuditLedger(storage, SoftwareBackend())
    await led.open()
    led.start()
    yield led
    await led.stop()


async def _fill(ledger: AuditLedger, n: int, tag: str) -> None:
    await asyncio.gather(
        *(ledger.record({"who": f"spiffe://td/w/{tag}{i}", "what": "secret.get"}) for i in range(n))
    )
    await ledger.drain()


def _sink(rsyslog: RsyslogServer, ca: Path) -> SyslogTlsSink:
    return SyslogTlsSink(AuditSink("siem", f"syslog+tls://127.0.0.1:{rsyslog.port}", ca))


def _forwarder(
    storage: Storage, sink: SyslogTlsSink, owner: str, mono: Monotonic
) -> AuditForwarder:
    return AuditForwarder(storage, [sink], FakeClock(), owner, batch=200, monotonic=mono)


async def _catch_up(fwd: AuditForwarder, mono: Monotonic) -> None:
    for _ in range(100):
        busy = await fwd.tick()
        state = fwd.states["siem"]
        if not busy and state.failures == 0:
            return
        mono.now += 120.0  # past any backoff
    raise AssertionError(f"forwarder did not catch up: {fwd.states['siem'].last_error}")


def _kill_when_receiving(rsyslog: RsyslogServer) -> None:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and not rsyslog.out.exists():
        time.sleep(0.001)  # watching a subprocess's output file, not timing the code under test
    rsyslog.kill()


async def test_stream_survives_receiver_kill_and_broker_restart(
    storage: Storage, ledger: AuditLedger, rsyslog: RsyslogServer
) -> None:
    mono = Monotonic()
    await _fill(ledger, 1500, "a")
    fwd = _forwarder(storage, _sink(rsyslog, rsyslog.ca_file), "broker-1", mono)
    # Kill rsyslog (SIGKILL) while the first batches are on the wire.
    killer = asyncio.get_running_loop().run_in_executor(None, _kill_when_receiving, rsyslog)
    for _ in range(10):
        await fwd.tick()
        if fwd.states["siem"].failures:
            break
    await killer
    await fwd.tick()  # rsyslog is gone: fails, nothing is lost, the request path still writes
    assert fwd.states["siem"].failures >= 1
    cursor_while_down = int(await storage.get_meta("audit_forward:siem") or 0)
    await _fill(ledger, 300, "b")
    await fwd.tick()  # backing off: only the lag is updated
    head = (await storage.audit_tail(1))[0].seq
    lag = REGISTRY.get_sample_value("broker_audit_forward_lag_entries", {"sink": "siem"})
    assert lag == head - cursor_while_down
    assert REGISTRY.get_sample_value("broker_audit_forward_failures_total", {"sink": "siem"})

    # The broker restarts (a new process takes the lease) and rsyslog comes back.
    await storage.release_lease("audit.forward.siem", "broker-1")
    rsyslog.start()
    restarted = _forwarder(storage, _sink(rsyslog, rsyslog.ca_file), "broker-2", mono)
    await _catch_up(restarted, mono)
    await _fill(ledger, 50, "c")
    await _catch_up(restarted, mono)

    received = rsyslog.records()
    ledger_records = await storage.read_audit(0, 10_000)
    seen: dict[int, dict[str, object]] = {}
    order: list[int] = []
    for rec in received:
        seq = int(str(rec["seq"]))
        if seq not in seen:
            seen[seq] = rec
            order.append(seq)
    assert order == [r.seq for r in ledger_records]  # all, in order, none missing
    assert len(order) == 1 + 1500 + 300 + 50
    for rec in ledger_records:  # what arrived is what the ledger holds
        got = seen[rec.seq]
        assert got["hash"] == rec.entry_hash.hex()
        assert got["prev_hash"] == rec.prev_hash.hex()
        assert got["event"] == rec.event
    assert await storage.get_meta("audit_forward:siem") == str(ledger_records[-1].seq)
    assert REGISTRY.get_sample_value("broker_audit_forward_lag_entries", {"sink": "siem"}) == 0


async def test_a_receiver_with_a_certificate_from_another_ca_gets_nothing(
    storage: Storage, ledger: AuditLedger, rsyslog: RsyslogServer
) -> None:
    mono = Monotonic()
    await _fill(ledger, 5, "x")
    fwd = _forwarder(storage, _sink(rsyslog, rsyslog.wrong_ca_file), "broker-1", mono)
    await fwd.tick()
    state = fwd.states["siem"]
    assert state.failures == 1
    assert "CERTIFICATE_VERIFY_FAILED" in state.last_error
    assert rsyslog.records() == []
    assert await storage.get_meta("audit_forward:siem") is None
    seq = await ledger.record({"who": "spiffe://td/w", "what": "secret.get"})
    assert seq == 7  # recording went on
