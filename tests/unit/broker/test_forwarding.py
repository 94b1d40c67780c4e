"""The audit forwarder: in order, at least once, resumed from its stored cursor, backoff on a
failing sink, one leader per sink, lag metric; and config refusals for bad sinks."""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import AsyncIterator, Sequence
from pathlib import Path

import pytest
from prometheus_client import REGISTRY

from broker.audit import AuditLedger
from broker.config import audit_sinks
from broker.errors import InvalidArgument
from broker.forwarding import AuditForwarder, SinkError
from broker.storage.factory import open_storage
from broker.storage.interface import Storage
from ca.clock import FakeClock
from ca.keys import SoftwareBackend


class FakeSink:
    def __init__(self, name: str = "siem", acknowledges: bool = True) -> None:
        self.name = name
        self.acknowledges = acknowledges
        self.down = False
        self.batches: list[list[dict[str, object]]] = []

    async def deliver(self, messages: Sequence[tuple[str, bytes]]) -> None:
        if self.down:
            raise SinkError("down")
        self.batches.append([json.loads(line) for _, line in messages])

    @property
    def seqs(self) -> list[int]:
        return [int(str(r["seq"])) for batch in self.batches for r in batch]


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


async def _fill(ledger: AuditLedger, n: int) -> None:
    for i in range(n):
        await ledger.record({"who": f"spiffe://td/w/{i}", "what": "svid.mint"})
    await ledger.drain()


def _forwarder(
    storage: Storage, sink: FakeSink, mono: Monotonic, owner: str = "a", batch: int = 4
) -> AuditForwarder:
    return AuditForwarder(storage, [sink], FakeClock(), owner, batch=batch, monotonic=mono)


def _lag(sink: str) -> float | None:
    return REGISTRY.get_sample_value("broker_audit_forward_lag_entries", {"sink": sink})


async def test_entries_are_forwarded_in_order_with_hash_and_mac(
    storage: Storage, ledger: AuditLedger
) -> None:
    await _fill(ledger, 9)  # entries 1..10 (1 is the epoch record)
    sink, mono = FakeSink(), Monotonic()
    fwd = _forwarder(storage, sink, mono)
    while await fwd.tick():
        pass
    assert sink.seqs == list(range(1, 11))
    assert [len(b) for b in sink.batches] == [4, 4, 2]
    prev = bytes(32)
    for rec in (r for b in sink.batches for r in b):  # a receiver can re-check the chain
        seq = int(str(rec["seq"]))
        assert bytes.fromhex(str(rec["prev_hash"])) == prev
        digest = hashlib.sha256(prev + seq.to_bytes(8, "big") + str(rec["event"]).encode())
        assert digest.hexdigest() == rec["hash"]
        assert "mac" in rec
        prev = bytes.fromhex(str(rec["hash"]))
    assert await storage.get_meta("audit_forward:siem") == "10"
    assert _lag("siem") == 0


async def test_a_down_sink_loses_nothing_and_backs_off(
    storage: Storage, ledger: AuditLedger
) -> None:
    await _fill(ledger, 3)
    sink, mono = FakeSink("down"), Monotonic()
    fwd = _forwarder(storage, sink, mono)
    sink.down = True
    await fwd.tick()
    assert sink.batches == []
    assert await storage.get_meta("audit_forward:down") in (None, "0")
    assert _lag("down") == 4
    # Backoff: 1s, then 2s, 4s ... capped; not retried before it is due.
    assert [fwd.backoff(n) for n in (1, 2, 3, 7, 20)] == [1, 2, 4, 60, 60]
    sink.down = False
    await fwd.tick()
    assert sink.batches == []  # still backing off
    mono.now += 1.0
    await fwd.tick()
    assert sink.seqs == [1, 2, 3, 4]
    assert _lag("down") == 0


async def test_resumes_from_the_stored_cursor_after_a_restart(
    storage: Storage, ledger: AuditLedger
) -> None:
    await _fill(ledger, 5)
    first, mono = FakeSink(), Monotonic()
    fwd = _forwarder(storage, first, mono, owner="a")
    await fwd.tick()
    assert first.seqs == [1, 2, 3, 4]
    await storage.release_lease("audit.forward.siem", "a")  # the process stops
    again = FakeSink()
    restarted = _forwarder(storage, again, mono, owner="b")
    while await restarted.tick():
        pass
    assert again.seqs == [5, 6]


async def test_syslog_batches_count_only_once_a_later_connection_worked(
    storage: Storage, ledger: AuditLedger
) -> None:
    # A receiver that read a batch and died looks like one that handled it: the batch is
    # confirmed (cursor stored) only when a later connection succeeds, else it is sent again.
    await _fill(ledger, 2)
    sink, mono = FakeSink("syslog", acknowledges=False), Monotonic()
    fwd = _forwarder(storage, sink, mono)
    assert await fwd.tick()  # 1..3 sent, not confirmed
    assert sink.seqs == [1, 2, 3]
    assert await storage.get_meta("audit_forward:syslog") in (None, "0")
    sink.down = True  # the receiver had died: the next connection fails
    await _fill(ledger, 1)
    await fwd.tick()
    sink.down = False
    mono.now += 1.0
    await fwd.tick()
    assert sink.seqs == [1, 2, 3, 1, 2, 3, 4]  # everything unconfirmed, again
    assert await storage.get_meta("audit_forward:syslog") in (None, "0")
    await fwd.tick()  # nothing new: an empty probe connection confirms
    assert sink.batches[-1] == []
    assert await storage.get_meta("audit_forward:syslog") == "4"
    assert _lag("syslog") == 0
    assert not await fwd.tick()  # idle: no more connections


async def test_only_the_leader_forwards(storage: Storage, ledger: AuditLedger) -> None:
    await _fill(ledger, 2)
    one, two, mono = FakeSink(), FakeSink(), Monotonic()
    a, b = _forwarder(storage, one, mono, owner="a"), _forwarder(storage, two, mono, owner="b")
    await a.tick()
    await b.tick()
    assert one.seqs == [1, 2, 3]
    assert two.batches == []


async def test_recording_does_not_wait_for_a_sink(storage: Storage, ledger: AuditLedger) -> None:
    # The ledger has no reference to the forwarder: with every sink down, records commit.
    sink, mono = FakeSink(), Monotonic()
    sink.down = True
    fwd = _forwarder(storage, sink, mono)
    await _fill(ledger, 3)
    await fwd.tick()
    seq = await ledger.record({"who": "spiffe://td/w", "what": "secret.get"})
    assert seq == 5


@pytest.mark.parametrize(
    ("sinks", "message"),
    [
        ({"siem": {"url": "http://siem.example/x"}}, "must start with syslog+tls:// or https://"),
        ({"siem": {"url": "syslog://siem.example:514"}}, "must start with syslog+tls://"),
        ({"siem": {"url": "syslog+tls://siem.example"}}, "needs a host and a port"),
        ({"siem": {"url": "https://"}}, "needs a host"),
        ({"Bad Name": {"url": "https://siem.example/"}}, "must match"),
        ({"siem": {"url": "https://siem.example/", "cafile": "x"}}, "unknown key 'cafile'"),
        ({"siem": "https://siem.example/"}, "must be a table"),
        ({"h": {"url": "https://h.example/", "server_name": "x"}}, "for syslog+tls sinks only"),
    ],
)
def test_bad_sinks_are_refused(sinks: dict[str, object], message: str) -> None:
    with pytest.raises(InvalidArgument, match=re.escape(message)):
        audit_sinks(sinks, Path("/etc/broker"))


def test_good_sinks_are_read() -> None:
    sinks = audit_sinks(
        {
            "siem": {"url": "syslog+tls://127.0.0.1:6514", "ca_file": "siem-ca.pem"},
            "hook": {"url": "https://hooks.example/audit", "timeout": "3s"},
        },
        Path("/etc/broker"),
    )
    assert [(s.name, s.scheme) for s in sinks] == [("siem", "syslog+tls"), ("hook", "https")]
    assert sinks[0].ca_file == Path("/etc/broker/siem-ca.pem")
    assert sinks[1].timeout.total_seconds() == 3
