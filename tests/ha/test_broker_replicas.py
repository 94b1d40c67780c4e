"""Two `broker serve` replicas (one SoftHSM2 token, one CA) on the Patroni cluster through the
multi-host DSN, under a steady X.509-SVID mint load from clients that know both addresses, while
(a) the PostgreSQL primary is killed -9, (b) a broker replica is killed -9, (c) etcd is stopped
for 6 s. Figures per fault are printed as `HA-FIGURES` lines (run with -s); the assertions are
about correctness: `broker audit verify` passes, every SVID a client received is in the ledger
exactly once as an allowed mint, and the lease reaper's leader lease is held by the survivor.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import asyncpg
import pytest

from broker.api.client.base import BrokerClient, ClientCredentials, ClientError
from broker.api.client.ca import CAClient
from tests.e2e.conftest import BrokerCli, BrokerProcess
from tests.fixtures.patroni import PatroniCluster
from tests.fixtures.softhsm import SoftHsmToken

pytestmark = [pytest.mark.ha, pytest.mark.e2e]

TD = "ha.example"
OPERATOR = f"spiffe://{TD}/broker/operator/ops"
WORKERS = 4
REAPER_LEASE = "db.lease-reaper"


def _config(home: Path, dsn: str, token: SoftHsmToken) -> Path:
    parts = urlsplit(dsn)
    password_file = home / "db-password"
    password_file.write_text(parts.password or "")
    password_file.chmod(0o600)
    hosts = parts.netloc.rpartition("@")[2]
    bare = parts._replace(netloc=f"{parts.username}@{hosts}").geturl()
    path = home / "broker.toml"
    path.write_text(
        f"""
trust_domain = "{TD}"
data_dir = "{home / "data"}"

[storage]
dsn = "{bare}"
password_file = "{password_file}"

[keys]
uri = "pkcs11:token={token.token_label}?module-path={token.module_path}"
pin_source = "file:{token.pin_file}"

[server]
operators = ["{OPERATOR}"]
rate_limit_rps = 10000
"""
    )
    return path


@dataclass
class Outcomes:
    lock: threading.Lock = field(default_factory=threading.Lock)
    ok: list[tuple[float, str]] = field(default_factory=list)  # (monotonic, serial)
    failed: list[tuple[float, str]] = field(default_factory=list)  # (monotonic, code)

    def window(self, start: float, end: float) -> dict[str, Any]:
        with self.lock:
            oks = sorted(t for t, _ in self.ok if start <= t < end)
            fails = [code for t, code in self.failed if start <= t < end]
        gaps = [(b - a, b) for a, b in zip([start, *oks], oks, strict=False)]
        longest = max(gaps, default=(0.0, start))
        codes: dict[str, int] = {}
        for code in fails:
            codes[code] = codes.get(code, 0) + 1
        total = len(oks) + len(fails)
        return {
            "requests": total,
            "failed": len(fails),
            "availability_pct": round(100 * len(oks) / max(total, 1), 3),
            "longest_gap_s": round(longest[0], 2),
            "recovered_after_s": round(longest[1] - start, 2),
            "failed_codes": codes,
        }


def _worker(
    index: int,
    targets: list[str],
    credentials: ClientCredentials,
    outcomes: Outcomes,
    stop: threading.Event,
) -> None:
    """Mint dev SVIDs in a loop; prefer one replica, fail over to the other on UNAVAILABLE or
    a broker that does not answer (a client with two addresses)."""
    clients = [
        CAClient(BrokerClient(t, credentials, timeout=10.0))
        for t in targets[index % 2 :] + targets[: index % 2]
    ]
    n = 0
    while not stop.is_set():
        n += 1
        spiffe_id = f"spiffe://{TD}/fleet/dev/w{index}-{n}"
        code = ""
        for client in clients:
            try:
                svid = client.mint_x509(spiffe_id, ttl_seconds=600)
            except ClientError as exc:
                code = exc.code_name
                if exc.code_name in ("UNAVAILABLE", "DEADLINE_EXCEEDED"):
                    continue
                break
            with outcomes.lock:
                outcomes.ok.append((time.monotonic(), svid.serial))
            code = ""
            break
        if code:
            with outcomes.lock:
                outcomes.failed.append((time.monotonic(), code))
            time.sleep(0.2)  # backoff
        else:
            time.sleep(0.02)


async def _ledger_mints(dsn: str) -> list[str]:
    conn = await asyncpg.connect(dsn)
    try:
        rows = await conn.fetch("SELECT event FROM audit ORDER BY seq")
    finally:
        await conn.close()
    serials = []
    for (text,) in rows:
        event = json.loads(text)
        if event.get("what") == "svid.mint" and event.get("outcome") == "OK":
            serial = event.get("details", {}).get("serial")
            if serial:
                serials.append(serial)
    return serials


async def _reaper_lease(dsn: str) -> tuple[str, float] | None:
    conn = await asyncpg.connect(dsn)
    try:
        row = await conn.fetchrow(
            "SELECT owner, extract(epoch FROM expires_at) FROM leases_lock WHERE name = $1",
            REAPER_LEASE,
        )
    finally:
        await conn.close()
    return None if row is None else (str(row[0]), float(row[1]))


@pytest.fixture
def replicas(
    patroni_cluster: PatroniCluster, softhsm_env: Any, tmp_path: Path
) -> Iterator[tuple[list[BrokerProcess], str]]:
    patroni_cluster.wait_replicas(2, 180)
    token = softhsm_env.new_token()
    dsn = patroni_cluster.create_database("broker_ha")
    processes = []
    for i in range(2):
        home = tmp_path / f"replica{i}"
        home.mkdir()
        processes.append(
            BrokerProcess(
                home / "data",
                home,
                ["--config", str(_config(home, dsn, token))],
                {"SOFTHSM2_CONF": str(token.conf_path)},
            )
        )
    try:
        for process in processes:  # the first creates the CA; the second finds it
            process.start()
        yield processes, dsn
    finally:
        for process in processes:
            process.ensure_stopped()


def test_two_replicas_ride_out_database_broker_and_etcd_failures(
    patroni_cluster: PatroniCluster,
    replicas: tuple[list[BrokerProcess], str],
    tmp_path: Path,
) -> None:
    processes, dsn = replicas
    first = processes[0]
    data = first.data_dir
    credentials = ClientCredentials(
        (data / "operator" / "svid.pem").read_bytes(),
        (data / "operator" / "key.pem").read_bytes(),
        (data / "bundle.pem").read_bytes(),
    )
    outcomes, stop = Outcomes(), threading.Event()
    targets = [p.address for p in processes]
    threads = [
        threading.Thread(target=_worker, args=(i, targets, credentials, outcomes, stop))
        for i in range(WORKERS)
    ]
    for thread in threads:
        thread.start()
    figures: dict[str, dict[str, Any]] = {}
    try:
        time.sleep(4)  # steady state
        # (a) the PostgreSQL primary dies.
        t_a = time.monotonic()
        old = patroni_cluster.kill_primary()
        new = patroni_cluster.wait_primary(90)
        time.sleep(6)
        t_b = time.monotonic()
        figures[f"a-primary-killed({old.name}->{new.name})"] = outcomes.window(t_a, t_b)
        patroni_cluster.restart(old)  # re-clones in the background

        # (b) a broker replica dies; the survivor must lead the reaper within TTL + interval.
        before = asyncio.run(_reaper_lease(dsn))
        processes[1]._kill()  # SIGKILL
        killed_wall = time.time()
        moved_after = None
        while time.monotonic() < t_b + 30:
            lease = asyncio.run(_reaper_lease(dsn))
            # Renewed after the kill by a live replica: its expiry lies beyond the kill + TTL.
            if lease is not None and lease[1] > killed_wall + 5.0:
                moved_after = round(time.time() - killed_wall, 2)
                break
            time.sleep(0.25)
        time.sleep(4)
        t_c = time.monotonic()
        figures["b-broker-replica-killed"] = {
            **outcomes.window(t_b, t_c),
            "reaper_lease_renewed_by_survivor_after_s": moved_after,
            "killed_replica_held_it": before is not None
            and asyncio.run(_reaper_lease(dsn)) is not None
            and before[0] != asyncio.run(_reaper_lease(dsn))[0],  # type: ignore[index]
        }
        assert moved_after is not None, "no live replica renewed the reaper's leader lease"

        # (c) etcd, the DCS, is lost for 6 s.
        patroni_cluster.stop_etcd()
        time.sleep(6)
        patroni_cluster.start_etcd()
        time.sleep(6)
        t_end = time.monotonic()
        figures["c-etcd-stopped-6s"] = outcomes.window(t_c, t_end)
        figures["whole-run"] = outcomes.window(t_a - 4, t_end)
    finally:
        stop.set()
        for thread in threads:
            thread.join(timeout=60)
    for name, values in figures.items():
        print(f"\nHA-FIGURES replicas {name} {json.dumps(values)}")

    # Afterwards: the ledger verifies, every SVID a client holds was audited, once.
    cli = BrokerCli(first, tmp_path)
    cli.ok("audit", "verify")
    ledger = asyncio.run(_ledger_mints(dsn))
    received = [serial for _, serial in outcomes.ok]
    assert received, "no SVID was issued at all"
    missing = set(received) - set(ledger)
    assert not missing, f"{len(missing)} SVIDs issued without their audit entry"
    assert len(ledger) == len(set(ledger)), "a serial was audited twice"
    assert len(received) == len(set(received)), "a client received the same serial twice"
    assert first.stop() == 0, first.stderr_text()
    patroni_cluster.wait_replicas(2, 180)
