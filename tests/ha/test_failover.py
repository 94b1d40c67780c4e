"""Failover under load on the real Patroni cluster (tests/fixtures/patroni.py): two storage
"replicas" (two pools on the multi-host DSN, two audit ledgers sharing one key backend, as two
broker processes share one HSM) write the ledger and hold a leader lease while the PostgreSQL
primary is killed with SIGKILL, then while etcd (the DCS) is stopped and restarted.

Each test prints one `HA-FIGURES` line (run with -s to see it): requests failed, the longest gap
between two successful writes, the time from the fault to the first success after it. The
assertions are about correctness, never about time: every acknowledged write is in the ledger
exactly once, the ledger verifies, and the leader lease has one holder.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import pytest

from broker.audit import AuditLedger
from broker.errors import BrokerError
from broker.storage.factory import open_storage
from broker.storage.interface import Storage
from ca.keys import SoftwareBackend
from tests.fixtures.patroni import PatroniCluster

pytestmark = pytest.mark.ha

WORKERS_PER_REPLICA = 4
LEASE_TTL = 5.0


@dataclass
class Load:
    acked: set[tuple[str, int]] = field(default_factory=set)
    attempted: int = 0
    failed: int = 0
    successes: list[float] = field(default_factory=list)
    errors: dict[str, int] = field(default_factory=dict)
    reads: Load | None = None  # the readers beside the writers

    def figures(self, fault_at: float) -> dict[str, Any]:
        times = sorted(self.successes)
        gaps = [(b - a, b) for a, b in itertools.pairwise(times)]
        # Recovery: the end of the longest gap that ends after the fault (writes already in
        # flight may still land a few ms after it).
        after = max(((gap, end) for gap, end in gaps if end > fault_at), default=None)
        return {
            "requests": self.attempted,
            "failed": self.failed,
            "availability_pct": round(100 * (1 - self.failed / max(self.attempted, 1)), 3),
            "longest_gap_s": round(max((gap for gap, _ in gaps), default=0.0), 2),
            "recovered_after_s": round(after[1] - fault_at, 2) if after else None,
            "errors": self.errors,
            **({"reads": self.reads.figures(fault_at)} if self.reads is not None else {}),
        }


async def _worker(name: str, ledger: AuditLedger, load: Load, stop: asyncio.Event) -> None:
    n = 0
    while not stop.is_set():
        n += 1  # a new request id per attempt: a failed request is never re-sent as the same
        load.attempted += 1
        try:
            await ledger.record({"who": name, "what": "svid.mint", "n": n})
        except BrokerError as exc:
            load.failed += 1
            kind = type(exc).__name__
            if "while committing" in str(exc):
                kind += ":commit-lost"
            elif "no writable primary" in str(exc):
                kind += ":no-primary-in-time"
            load.errors[kind] = load.errors.get(kind, 0) + 1
            await asyncio.sleep(0.1)  # the client's backoff
            continue
        load.acked.add((name, n))
        load.successes.append(time.monotonic())
        await asyncio.sleep(0.01)


async def _reader(storage: Storage, load: Load, stop: asyncio.Event) -> None:
    """Reads (the ledger's head) in a loop: a read that loses its server is re-run by the
    storage on the new primary within `primary_wait`, so few should fail."""
    while not stop.is_set():
        load.attempted += 1
        try:
            await storage.audit_tail(1)
        except BrokerError as exc:
            load.failed += 1
            kind = type(exc).__name__
            load.errors[kind] = load.errors.get(kind, 0) + 1
            await asyncio.sleep(0.1)
            continue
        load.successes.append(time.monotonic())
        await asyncio.sleep(0.02)


async def _leader(
    name: str, storage: Storage, holders: list[tuple[float, str]], stop: asyncio.Event
) -> None:
    from ca.clock import SystemClock

    clock = SystemClock()
    while not stop.is_set():
        try:
            now = clock.now()
            if await storage.try_lease("ha-test-leader", name, LEASE_TTL, now):
                holders.append((now.timestamp(), name))
        except BrokerError:
            pass
        await asyncio.sleep(0.5)


async def _open_replicas(dsn: str, count: int = 2) -> tuple[list[Storage], list[AuditLedger]]:
    keys = SoftwareBackend()
    storages, ledgers = [], []
    for _ in range(count):
        storage = await open_storage(dsn)
        await storage.migrate()
        ledger = AuditLedger(storage, keys)
        await ledger.open()
        ledger.start()
        storages.append(storage)
        ledgers.append(ledger)
    return storages, ledgers


async def _run_fault(
    cluster: PatroniCluster, fault: Callable[[], None], *, before: float = 3.0, settle: float = 4.0
) -> tuple[Load, float, list[tuple[float, str]], list[Storage], list[AuditLedger]]:
    dsn = cluster.create_database(f"ha_{uuid.uuid4().hex[:12]}")
    storages, ledgers = await _open_replicas(dsn)
    load, stop, holders = Load(), asyncio.Event(), []
    reads = Load()
    tasks = [asyncio.create_task(_reader(storage, reads, stop)) for storage in storages]
    tasks += [
        asyncio.create_task(_worker(f"r{r}w{w}", ledger, load, stop))
        for r, ledger in enumerate(ledgers)
        for w in range(WORKERS_PER_REPLICA)
    ]
    tasks += [
        asyncio.create_task(_leader(f"replica-{r}", s, holders, stop))
        for r, s in enumerate(storages)
    ]
    await asyncio.sleep(before)
    fault_at = time.monotonic()
    await asyncio.to_thread(fault)
    # Load until writes succeed again (bounded), then a little more.
    limit = fault_at + 90
    while time.monotonic() < limit and not [t for t in load.successes if t > fault_at + 0.5]:
        await asyncio.sleep(0.2)
    await asyncio.sleep(settle)
    stop.set()
    await asyncio.gather(*tasks)
    load.reads = reads
    return load, fault_at, holders, storages, ledgers


async def _check_ledger(load: Load, storages: list[Storage], ledgers: list[AuditLedger]) -> None:
    verification = await ledgers[0].verify()
    assert verification.intact, verification.reason
    seen: dict[tuple[str, int], int] = {}
    for record in await _all_records(storages[0]):
        event = json.loads(record.event)
        key = (event.get("who"), event.get("n"))
        seen[key] = seen.get(key, 0) + 1
    lost = [key for key in load.acked if key not in seen]
    assert not lost, f"{len(lost)} acknowledged ledger entries lost in the failover: {lost[:5]}"
    twice = [key for key, count in seen.items() if count > 1]
    assert not twice, f"entries written twice: {twice[:5]}"


async def _close(storages: list[Storage], ledgers: list[AuditLedger]) -> None:
    for ledger in ledgers:
        await ledger.stop()
    for storage in storages:
        await storage.close()


async def test_primary_killed_under_load(patroni_cluster: PatroniCluster) -> None:
    cluster = patroni_cluster
    old = cluster.wait_primary()
    load, fault_at, holders, storages, ledgers = await _run_fault(cluster, cluster.kill_primary)
    try:
        figures = load.figures(fault_at)
        new = cluster.wait_primary()
        print(f"\nHA-FIGURES primary-killed {old.name}->{new.name} {json.dumps(figures)}")
        assert new.name != old.name
        assert figures["recovered_after_s"] is not None, (
            f"no write succeeded after the kill: {figures}"
        )
        assert figures["reads"]["recovered_after_s"] is not None, "no read after the kill"
        await _check_ledger(load, storages, ledgers)
        # The leader lease never had two holders at once (it moves only after its TTL).
        _assert_one_holder(holders)
    finally:
        await _close(storages, ledgers)
        cluster.restart(old)
        await asyncio.to_thread(cluster.wait_replicas, 2, 180)


async def test_etcd_leader_stopped_under_load(patroni_cluster: PatroniCluster) -> None:
    """etcd (the DCS) is lost for 6 s, then comes back: Patroni keeps the primary while its
    leader key's TTL (10 s) runs, so writes go on; nothing is lost."""
    cluster = patroni_cluster
    cluster.wait_replicas(2, 180)

    def outage() -> None:
        cluster.stop_etcd()
        time.sleep(6)  # the outage itself (a fault's duration, not a timing assertion)
        cluster.start_etcd()

    load, fault_at, holders, storages, ledgers = await _run_fault(cluster, outage)
    try:
        figures = load.figures(fault_at)
        print(f"\nHA-FIGURES etcd-stopped-6s {json.dumps(figures)}")
        assert figures["recovered_after_s"] is not None
        await _check_ledger(load, storages, ledgers)
        _assert_one_holder(holders)
    finally:
        await _close(storages, ledgers)
        await asyncio.to_thread(cluster.wait_primary, 120)


def _assert_one_holder(holders: list[tuple[float, str]]) -> None:
    """A new holder got the lease only after the previous holder's last grant had expired
    (the times are the `now` each grant was asked with, one wall clock): never two leaders."""
    assert holders, "no replica ever held the leader lease"
    holders.sort()
    for (t0, a), (t1, b) in itertools.pairwise(holders):
        if a != b:
            assert t1 >= t0 + LEASE_TTL, f"{b} took the lease {t1 - t0:.2f} s after {a}'s grant"


async def _all_records(storage: Storage) -> list[Any]:
    records: list[Any] = []
    while True:
        page = await storage.read_audit(after_seq=records[-1].seq if records else 0, limit=1000)
        if not page:
            return records
        records += page


_VICTIM = """
import asyncio, datetime as dt, os, sys
from broker.storage.factory import open_storage

async def main():
    storage = await open_storage(os.environ["HA_DSN"])
    while True:
        now = dt.datetime.now(dt.UTC)
        if await storage.try_lease("ha-test-leader", "victim", float(sys.argv[1]), now):
            print(now.timestamp(), flush=True)
        await asyncio.sleep(0.5)

asyncio.run(main())
"""


async def test_leader_lease_moves_after_a_replica_is_killed(
    patroni_cluster: PatroniCluster,
) -> None:
    """(b) kill -9 a broker replica holding the leader lease: the survivor leads within
    TTL + its polling interval, never before the victim's last lease ran out."""
    import os
    import signal
    import subprocess
    import sys

    cluster = patroni_cluster
    cluster.wait_primary()
    dsn = cluster.create_database(f"ha_{uuid.uuid4().hex[:12]}")
    storage = await open_storage(dsn)
    await storage.migrate()
    victim = subprocess.Popen(
        [sys.executable, "-c", _VICTIM, str(LEASE_TTL)],
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "HA_DSN": dsn},
    )
    try:
        assert victim.stdout is not None
        first = await asyncio.wait_for(asyncio.to_thread(victim.stdout.readline), 60)
        assert first.strip(), "the victim replica never took the lease"
        from ca.clock import SystemClock

        clock = SystemClock()
        assert not await storage.try_lease("ha-test-leader", "survivor", LEASE_TTL, clock.now())
        await asyncio.sleep(1.0)  # let it renew at least once more
        victim.send_signal(signal.SIGKILL)
        victim.wait(timeout=30)
        killed_at = clock.now().timestamp()
        renewals = [float(line) for line in [first, *victim.stdout.read().split()] if line]
        taken = None
        while taken is None and clock.now().timestamp() < killed_at + 60:
            now = clock.now()
            if await storage.try_lease("ha-test-leader", "survivor", LEASE_TTL, now):
                taken = now.timestamp()
            else:
                await asyncio.sleep(0.5)
        assert taken is not None, "the survivor never took the leader lease"
        assert taken >= max(renewals) + LEASE_TTL  # never two leaders
        print(
            "\nHA-FIGURES replica-killed "
            + json.dumps(
                {"lease_ttl_s": LEASE_TTL, "leader_moved_after_s": round(taken - killed_at, 2)}
            )
        )
    finally:
        if victim.poll() is None:
            victim.kill()
            victim.wait(timeout=30)
        if victim.stdout is not None:
            victim.stdout.close()
        await storage.close()
