"""Two `broker serve` replicas (one SoftHSM2 token, one CA) on the Patroni cluster through the
multi-host DSN, under a steady X.509-SVID mint load from clients that know both addresses, while
(a) the PostgreSQL primary is killed -9, (b) a broker replica is killed -9, (c) etcd is stopped
for 6 s. Figures per fault are printed as `HA-FIGURES` lines (run with -s); the assertions are
about correctness: `broker audit verify` passes, every SVID a client received is in the ledger
exactly once as an allowed mint, and the lease reaper's leader lease is held by the survivor.

Beside those clients, the load generator runs its `mixed` scenario (X.509-SVIDs from CSRs,
JWT-SVIDs, secret reads, interleaved) against both replicas (`python -m loadtests run --server
A,B`) through fault (a); its report gives that load's failed requests, longest gap and time to
recover (`HA-FIGURES replicas mixed-loadtest`).
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import json
import os
import subprocess
import sys
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
from broker.api.client.database import DatabaseClient
from broker.api.client.secrets import SecretsClient
from tests.e2e.conftest import BrokerCli, BrokerProcess
from tests.fixtures.dbtargets import CREATION, Target, pg_target
from tests.fixtures.patroni import PatroniCluster
from tests.fixtures.postgres import PgCluster
from tests.fixtures.softhsm import SoftHsmToken

pytestmark = [pytest.mark.ha, pytest.mark.e2e]

TD = "ha.example"
OPERATOR = f"spiffe://{TD}/broker/operator/ops"
WORKERS = 4
REAPER_LEASE = "db.lease-reaper"
ROLE = "hadb"
CREDS_TTL = 8  # short, so the reaper revokes while the faults happen


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
        CAClient(BrokerClient(t, credentials)) for t in targets[index % 2 :] + targets[: index % 2]
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


@dataclass
class Leases:
    lock: threading.Lock = field(default_factory=threading.Lock)
    issued: dict[str, str] = field(default_factory=dict)  # lease id -> username
    failed: int = 0


def _db_worker(
    targets: list[str], credentials: ClientCredentials, leases: Leases, stop: threading.Event
) -> None:
    """Dynamic database users with an 8 s lease, one after another, on either replica."""
    clients = [DatabaseClient(BrokerClient(t, credentials)) for t in targets]
    while not stop.is_set():
        for client in clients:
            try:
                creds = client.creds(ROLE, ttl_seconds=CREDS_TTL)
            except ClientError as exc:
                if exc.code_name in ("UNAVAILABLE", "DEADLINE_EXCEEDED"):
                    continue
                raise
            with leases.lock:
                leases.issued[creds.lease.id] = creds.username
            break
        else:
            with leases.lock:
                leases.failed += 1
            time.sleep(0.2)
            continue
        time.sleep(0.1)


@dataclass
class Secrets:
    lock: threading.Lock = field(default_factory=threading.Lock)
    stored: dict[str, bytes] = field(default_factory=dict)  # reference -> value
    failed: int = 0


def _secret_worker(
    targets: list[str], credentials: ClientCredentials, stored: Secrets, stop: threading.Event
) -> None:
    """A new wrapped secret (version 1) every 0.2 s on either replica: each acknowledged
    write must be readable afterwards, with its value."""
    clients = [SecretsClient(BrokerClient(t, credentials)) for t in targets]
    n = 0
    while not stop.is_set():
        n += 1
        reference, value = f"secret://ha/dev/s{n}", os.urandom(24)
        for client in clients:
            try:
                client.put(
                    reference, owner="ha", classification="internal",
                    rotation_period_seconds=86400, value=value,
                )  # fmt: skip
            except ClientError as exc:
                if exc.code_name in ("UNAVAILABLE", "DEADLINE_EXCEEDED"):
                    continue
                if exc.code_name == "ALREADY_EXISTS":  # an earlier try committed after all
                    with stored.lock:
                        stored.stored[reference] = value
                    break
                raise
            with stored.lock:
                stored.stored[reference] = value
            break
        else:
            with stored.lock:
                stored.failed += 1
            time.sleep(0.2)
            continue
        time.sleep(0.2)


async def _lease_rows(dsn: str) -> list[tuple[str, str, str]]:
    conn = await asyncpg.connect(dsn)
    try:
        rows = await conn.fetch("SELECT id, username, state FROM db_leases")
    finally:
        await conn.close()
    return [(str(r[0]), str(r[1]), str(r[2])) for r in rows]


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


MIXED_DURATION = 45  # the mixed load's measured seconds: steady state, fault (a), recovery
MIXED_WARMUP = 2


def _start_mixed_load(targets: list[str], data_dir: Path, report: Path) -> subprocess.Popen[str]:
    """`python -m loadtests run --scenario mixed` against every replica, as a separate
    process (its own gRPC channels, round_robin over the replicas). The per-request timeout is
    the SDK's default deadline (30 s), long enough to ride out a failover."""
    argv = [
        sys.executable, "-m", "loadtests", "run", "--scenario", "mixed",
        "--server", ",".join(targets), "--data-dir", str(data_dir),
        "--concurrency", "4", "--processes", "1", "--csr-pool", "64",
        "--duration", str(MIXED_DURATION), "--warmup", str(MIXED_WARMUP),
        "--timeout", "30", "--report", str(report),
    ]  # fmt: skip
    root = Path(__file__).resolve().parents[2]
    with (report.parent / "loadtests.log").open("w") as log:  # the child keeps its own copy
        return subprocess.Popen(argv, cwd=root, stdout=log, stderr=subprocess.STDOUT, text=True)


async def _bench_mints(dsn: str) -> list[str]:
    """The serials of the load generator's X.509-SVIDs in the ledger (allowed mints)."""
    conn = await asyncpg.connect(dsn)
    try:
        rows = await conn.fetch("SELECT event FROM audit WHERE event LIKE '%/bench-%'")
    finally:
        await conn.close()
    serials = []
    for (text,) in rows:
        event = json.loads(text)
        serial = event.get("details", {}).get("serial")
        if event.get("what") == "svid.mint" and event.get("outcome") == "OK" and serial:
            serials.append(serial)
    return serials


def mixed_figures(run: dict[str, Any], fault_wall: float) -> dict[str, Any]:
    """From one run of the load generator's report: requests, failed (by kind), the longest
    run of seconds in which no request that started then succeeded, the slowest request, and
    the seconds from the fault until the load was back to half its rate before it."""
    ops = run["operations"]
    seconds = len(next(iter(ops.values()))["ok_per_s"]) if ops else 0
    ok_per_s = [sum(op["ok_per_s"][i] for op in ops.values()) for i in range(seconds)]
    start = dt.datetime.fromisoformat(run["started_at"]).timestamp() + run["warmup_s"]
    fault_s = max(0, int(fault_wall - start))
    longest = current = 0
    for count in ok_per_s:
        current = current + 1 if count == 0 else 0
        longest = max(longest, current)
    before = sorted(ok_per_s[:fault_s]) or [0]
    usual = before[len(before) // 2]
    recovered = next(
        (i - fault_s for i in range(fault_s + 1, seconds) if ok_per_s[i] >= max(1, usual / 2)),
        None,
    )
    failed = int(run["error_count"])
    total = int(run["requests_ok"]) + failed
    return {
        "requests": total,
        "failed": failed,
        "failed_by_kind": run["errors"],
        "availability_pct": round(100 * (total - failed) / max(total, 1), 3),
        "by_operation": {
            name: {"ok": op["requests_ok"], "failed": op["error_count"]} for name, op in ops.items()
        },
        "fault_at_s": fault_s,
        "ok_per_s_before_fault_median": usual,
        "longest_gap_s": longest,  # 1 s resolution, by the second a request started
        "slowest_request_ms": run["latency_ms"].get("max"),
        "recovered_after_s": recovered,
    }


@pytest.fixture
def db_target(pg_cluster: PgCluster) -> Iterator[tuple[Target, asyncio.AbstractEventLoop]]:
    """A target database for dynamic users on the session's plain PostgreSQL (the database
    the credentials are for, not the broker's own storage)."""
    loop = asyncio.new_event_loop()
    gen = pg_target(pg_cluster)
    target = loop.run_until_complete(gen.__anext__())
    try:
        yield target, loop
    finally:
        with contextlib.suppress(StopAsyncIteration):
            loop.run_until_complete(gen.__anext__())
        loop.close()


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
    db_target: tuple[Target, asyncio.AbstractEventLoop],
    tmp_path: Path,
) -> None:
    processes, dsn = replicas
    target, target_loop = db_target
    first = processes[0]
    cli = BrokerCli(first, tmp_path)
    admin_password = tmp_path / "admin-password"
    admin_password.write_text(target.password + "\n")
    admin_password.chmod(0o600)
    creation = tmp_path / "creation.sql"
    creation.write_text(target.sql(CREATION["postgresql"]))
    cli.ok(
        "db", "connection", "add", "main", "--plugin", "postgresql", "--dsn", target.dsn,
        "--password-file", str(admin_password),
    )  # fmt: skip
    cli.ok(
        "db", "role", "add", ROLE, "--connection", "main", "--creation-statements",
        str(creation), "--max-ttl", "1h",
    )  # fmt: skip
    data = first.data_dir
    credentials = ClientCredentials(
        (data / "operator" / "svid.pem").read_bytes(),
        (data / "operator" / "key.pem").read_bytes(),
        (data / "bundle.pem").read_bytes(),
    )
    outcomes, stop = Outcomes(), threading.Event()
    targets = [p.address for p in processes]
    mixed_report = tmp_path / "mixed-load"
    mixed = _start_mixed_load(targets, data, mixed_report)
    threads = [
        threading.Thread(target=_worker, args=(i, targets, credentials, outcomes, stop))
        for i in range(WORKERS)
    ]
    leases, stored = Leases(), Secrets()
    threads.append(threading.Thread(target=_db_worker, args=(targets, credentials, leases, stop)))
    threads.append(
        threading.Thread(target=_secret_worker, args=(targets, credentials, stored, stop))
    )
    for thread in threads:
        thread.start()
    figures: dict[str, dict[str, Any]] = {}
    try:
        # The mixed load is running once its SVIDs reach the ledger (keys made, checks done).
        deadline = time.monotonic() + 240
        while len(asyncio.run(_bench_mints(dsn))) < 20:
            assert mixed.poll() is None, (mixed_report.parent / "loadtests.log").read_text()
            assert time.monotonic() < deadline, "the mixed load never started"
            time.sleep(0.5)
        time.sleep(4)  # steady state
        # (a) the PostgreSQL primary dies.
        t_a = time.monotonic()
        fault_wall = time.time()
        old = patroni_cluster.kill_primary()
        new = patroni_cluster.wait_primary(90)
        time.sleep(6)
        t_b = time.monotonic()
        figures[f"a-primary-killed({old.name}->{new.name})"] = outcomes.window(t_a, t_b)
        mixed.wait(timeout=MIXED_DURATION + 120)  # its window ends; then the report
        loadtest_log = (mixed_report.parent / "loadtests.log").read_text()
        assert mixed.returncode in (0, 1), loadtest_log[-4000:]  # 1: errors above its limit
        mixed_run = json.loads((mixed_report / "report.json").read_text())["runs"][0]
        figures["a-mixed-loadtest"] = mixed_figures(mixed_run, fault_wall)
        patroni_cluster.restart(old)  # re-cloned from the new primary
        patroni_cluster.wait_replicas(2, 180)  # before etcd goes away (it must not mid-clone)

        # (b) a broker replica dies; the survivor must lead the reaper within TTL + interval.
        t_b = time.monotonic()
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
        if mixed.poll() is None:
            mixed.kill()
            mixed.wait(timeout=30)
        for thread in threads:
            thread.join(timeout=60)
    for name, values in figures.items():
        print(f"\nHA-FIGURES replicas {name} {json.dumps(values)}")

    # Afterwards: the ledger verifies, every SVID a client holds was audited, once.
    cli.ok("audit", "verify")
    ledger = asyncio.run(_ledger_mints(dsn))
    received = [serial for _, serial in outcomes.ok]
    assert received, "no SVID was issued at all"
    missing = set(received) - set(ledger)
    assert not missing, f"{len(missing)} SVIDs issued without their audit entry"
    assert len(ledger) == len(set(ledger)), "a serial was audited twice"
    assert len(received) == len(set(received)), "a client received the same serial twice"

    # Every acknowledged secret is there, with its value.
    assert stored.stored, "no secret was stored"
    reader = SecretsClient(BrokerClient(first.address, credentials))
    for reference, value in stored.stored.items():
        read = reader.get(reference, purpose="ha-check")
        assert (read.value, read.version) == (value, 1), reference
    figures["secrets"] = {"stored": len(stored.stored), "failed": stored.failed}
    # The mixed load's SVIDs: at least as many allowed mints for its identities in the ledger
    # as the load counted successes (its warm-up adds more), each serial once: none was issued
    # without its audit entry, none twice.
    bench = asyncio.run(_bench_mints(dsn))
    csr_ok = mixed_run["operations"]["svid-csr"]["requests_ok"]
    assert csr_ok > 0, "the mixed load minted nothing"
    assert len(bench) >= csr_ok, f"{csr_ok} SVIDs from the mixed load, {len(bench)} audited"
    assert len(bench) == len(set(bench)), "a serial of the mixed load was audited twice"
    # The secret the mixed load read throughout is still there, unchanged.
    sample = json.loads((mixed_report / "report.json").read_text())["targets"]["broker"]
    sample = sample["sample_secret-get"]
    read = reader.get("secret://bench/dev/api-key", purpose="ha-check")
    assert (len(read.value), read.version) == (sample["value_bytes"], sample["version"])
    print(f"\nHA-FIGURES replicas secrets {json.dumps(figures['secrets'])}")

    # Leases against users in the target database: no user without a lease (orphan), no
    # issued lease lost; then every lease runs out and the reaper drops every user.
    assert leases.issued, "no database credential was issued"
    prefix = f"v_{ROLE}_"
    rows = asyncio.run(_lease_rows(dsn))
    users = set(target_loop.run_until_complete(target.users_like(prefix)))
    by_id = {lease_id: (user, state) for lease_id, user, state in rows}
    assert users <= {user for user, _ in by_id.values()}, "a database user has no lease"
    for lease_id, user in leases.issued.items():
        if user in users:  # still there: its lease must be too
            assert lease_id in by_id, f"lease {lease_id} lost while {user} exists"
    deadline = time.monotonic() + 90
    while rows or users:
        assert time.monotonic() < deadline, f"not reaped: leases {rows}, users {sorted(users)}"
        time.sleep(1)
        rows = asyncio.run(_lease_rows(dsn))
        users = set(target_loop.run_until_complete(target.users_like(prefix)))
    figures["leases"] = {"issued": len(leases.issued), "failed": leases.failed}
    print(f"\nHA-FIGURES replicas db-leases {json.dumps(figures['leases'])}")
    log_tail = "\n".join(first.stderr_text().splitlines()[-40:])
    try:
        code = first.stop()  # SIGTERM: a clean stop after all of the above
    except BaseException:
        print(f"--- replica0 stderr before its stop ---\n{log_tail}")
        print(f"--- after ---\n{first.stderr_text()[-4000:]}")
        raise
    assert code == 0, first.stderr_text()[-4000:]
    patroni_cluster.wait_replicas(2, 180)
