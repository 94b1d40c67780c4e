"""Cost as the work grows (issue 18, item 5): the same benchmarks against an empty broker and
against one whose tables hold a large history.

    python -m loadtests preload --report DIR [--audit 1000000] [--secrets 100000]
        [--leases 100000] [--entries 10000] [--concurrency 32] [--duration 10] [--smoke]

1. starts a dev broker (SoftHSM2, SQLite) in a temp data dir and times its start (to the
   `listening` line); runs `secret-get` and `svid-csr` against it (`python -m loadtests run
   --server ...`, the dev operator's identity) and times `broker audit verify`;
2. stops it and preloads its database offline, in bulk (one transaction per few thousand rows,
   never one RPC per row): `--audit` ledger entries appended through the ledger's own group
   writer in groups of 1,000 (a valid hash chain, one HSM MAC per group, the head record
   updated: `broker audit verify` passes), `--secrets` secrets of one version each (metadata and
   version MACs made with the broker's metadata MAC key; the sealed value is a copy of the
   benchmark secret's, so those filler versions do not decrypt, nothing reads them),
   `--leases` live database leases (expiring in an hour; no database behind them, the reaper
   is not due before the run ends) and `--entries` registration entries;
3. starts it again on the preloaded data dir (start time), runs the same two benchmarks, times
   `broker audit verify` online and `broker audit verify --offline` with the broker stopped.

Prints a table (stdout) and writes DIR/preload.json. `--smoke` is the CI version: tens of rows,
1 s runs; it checks that everything works, it measures nothing.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import os
import sqlite3
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

from loadtests import procs
from loadtests.durations import seconds
from loadtests.targets.broker import DevBroker

__all__ = ["add_parser", "run"]

SCENARIOS = ("secret-get", "svid-csr")
AUDIT_GROUP = 1000
ROWS_PER_TX = 5000
SMOKE = {"audit": 50, "secrets": 20, "leases": 20, "entries": 10, "duration": 1.0}
_EPOCH = dt.datetime(1970, 1, 1, tzinfo=dt.UTC)


def add_parser(sub: Any) -> None:
    p = sub.add_parser("preload", help="secret get and SVID mint, empty vs preloaded tables")
    p.add_argument("--report", required=True, type=Path, help="directory for preload.json")
    p.add_argument("--audit", type=int, default=1_000_000, help="audit entries to add")
    p.add_argument("--secrets", type=int, default=100_000, help="secrets to add")
    p.add_argument("--leases", type=int, default=100_000, help="live leases to add")
    p.add_argument("--entries", type=int, default=10_000, help="registration entries to add")
    p.add_argument("--concurrency", type=int, default=32)
    p.add_argument("--duration", type=seconds, default=10.0, help="measured seconds per run")
    p.add_argument("--warmup", type=seconds, default=2.0)
    p.add_argument("--smoke", action="store_true", help="tens of rows, 1 s runs (CI)")
    p.add_argument("--keep-temp", action="store_true")


def _ts(value: dt.datetime) -> int:
    return (value - _EPOCH) // dt.timedelta(microseconds=1)


def _from_ts(value: int | None) -> dt.datetime | None:
    return None if value is None else _EPOCH + dt.timedelta(microseconds=int(value))


# -- the broker and the benchmarks ------------------------------------------------------------


def _start(data_dir: Path) -> tuple[DevBroker, float]:
    broker = DevBroker(data_dir)
    started = time.monotonic()
    broker.start()
    return broker, time.monotonic() - started


def _bench(broker: DevBroker, args: argparse.Namespace, scenario: str, out: Path) -> dict[str, Any]:
    argv = [
        sys.executable,
        "-m",
        "loadtests",
        "run",
        "--scenario",
        scenario,
        "--server",
        broker.address,
        "--data-dir",
        str(broker.data_dir),
        "--server-pid",
        str(broker.pid),
        "--concurrency",
        str(args.concurrency),
        "--duration",
        str(args.duration),
        "--warmup",
        str(args.warmup),
        "--report",
        str(out),
    ]
    if args.smoke:
        argv.append("--smoke")
    res = subprocess.run(argv, capture_output=True, text=True, timeout=600, check=False)
    if res.returncode != 0:
        raise procs.StartupError(
            f"loadtests run {scenario} failed ({res.returncode}): {res.stderr}"
        )
    runs = json.loads((out / "report.json").read_text())["runs"]
    run = next(r for r in runs if r["target"] == "broker")
    lat = run["latency_ms"]
    return {
        "throughput_rps": run["throughput_rps"],
        "p50_ms": lat["p50"],
        "p99_ms": lat["p99"],
        "errors": run.get("errors", {}),
        "server_cpu_ms_per_request": run.get("server_cpu_ms_per_request"),
    }


def _verify(data_dir: Path, address: str | None) -> dict[str, Any]:
    argv = [sys.executable, "-m", "broker.cli", "audit", "verify", "--data-dir", str(data_dir)]
    argv += ["--server", address] if address else ["--offline"]
    env = {k: v for k, v in os.environ.items() if not k.startswith("BROKER_")}
    started = time.monotonic()
    res = subprocess.run(argv, capture_output=True, text=True, timeout=3600, env=env, check=False)
    took = time.monotonic() - started
    return {
        "seconds": round(took, 2),
        "exit": res.returncode,
        "output": (res.stdout.strip() or res.stderr.strip()).splitlines()[:2],
    }


# -- the preload --------------------------------------------------------------------------------


async def _preload_audit(data_dir: Path, count: int) -> float:
    from broker.audit import AuditLedger, canonical_json
    from broker.daemon import ServeOptions, build_config
    from broker.storage.factory import open_storage
    from ca.clock import SystemClock
    from ca.keys import open_backend

    config = build_config(ServeOptions(dev=True, data_dir=data_dir))
    keys = open_backend(config.keys.uri, config.keys.pin_source)
    storage = await open_storage(config.storage.resolved_dsn())
    started = time.monotonic()
    try:
        ledger = AuditLedger(storage, keys, clock=SystemClock())
        await ledger.open()
        template = json.loads((await storage.audit_tail(1))[0].event)
        written = 0
        while written < count:
            n = min(AUDIT_GROUP, count - written)
            events = [
                canonical_json({**template, "preload": written + i, "request_id": uuid.uuid4().hex})
                for i in range(n)
            ]
            # The ledger's own group writer: one transaction, one HSM MAC, the head updated.
            await ledger._append(events, guard=None)  # offline bulk load
            written += n
    finally:
        await storage.close()
        keys.close()
    return time.monotonic() - started


def _preload_tables(
    data_dir: Path, n_secrets: int, n_leases: int, n_entries: int
) -> dict[str, float]:
    from broker.daemon import ServeOptions, build_config
    from broker.secrets import MetadataMac
    from broker.storage.secrets import SecretRecord, SecretState, VersionRecord
    from ca.keys import open_backend

    config = build_config(ServeOptions(dev=True, data_dir=data_dir))
    keys = open_backend(config.keys.uri, config.keys.pin_source)
    mac = MetadataMac(keys)
    db = sqlite3.connect(data_dir / "broker.db")  # `with db:` = one transaction per batch
    took: dict[str, float] = {}
    now = dt.datetime.now(dt.UTC)
    try:
        t0 = time.monotonic()
        tenant, svc, env, owner, cls, period, kek, sealed = db.execute(
            "SELECT s.tenant, s.service, s.environment, s.owner, s.classification, "
            "s.rotation_period_s, v.kek_label, v.sealed FROM secrets s JOIN secret_versions v "
            "ON v.tenant = s.tenant AND v.ref = s.ref LIMIT 1"
        ).fetchone()
        for start in range(0, n_secrets, ROWS_PER_TX):
            secret_rows, version_rows = [], []
            for i in range(start, min(start + ROWS_PER_TX, n_secrets)):
                ref = f"secret://{svc}/{env}/preload-{i}"
                rec = SecretRecord(
                    tenant, ref, svc, env, owner, cls, period, None, 1, SecretState.ACTIVE, now
                )
                ver = VersionRecord(1, kek, sealed, now)
                secret_rows.append(
                    (tenant, ref, svc, env, owner, cls, period, None, 1, "active", _ts(now),
                     None, None, mac.seal(rec))
                )  # fmt: skip
                version_rows.append(
                    (tenant, ref, 1, kek, sealed, _ts(now), None, None,
                     mac.seal_version(tenant, ref, ver))
                )  # fmt: skip
            with db:
                db.executemany(
                    "INSERT INTO secrets (tenant, ref, service, environment, owner, "
                    "classification, rotation_period_s, last_rotated, current_version, state, "
                    "created_at, revoked_at, deleted_at, meta_mac) "
                    "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    secret_rows,
                )
                db.executemany(
                    "INSERT INTO secret_versions (tenant, ref, version, kek_label, sealed, "
                    "created_at, retire_at, revoked_at, state_mac) "
                    "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    version_rows,
                )
        took["secrets"] = time.monotonic() - t0

        t0 = time.monotonic()
        expires = _ts(now + dt.timedelta(hours=1))
        for start in range(0, n_leases, ROWS_PER_TX):
            rows: list[tuple[Any, ...]] = [
                (uuid.uuid4().hex, "preload-role", "preload-conn", "postgresql", f"v_pre_{i}",
                 "spiffe://dev.local/default/dev/preload", "active", None, _ts(now), expires,
                 expires, expires, 0, None)
                for i in range(start, min(start + ROWS_PER_TX, n_leases))
            ]  # fmt: skip
            with db:
                db.executemany(
                    "INSERT INTO db_leases (id, role, connection, plugin, username, holder, "
                    "state, revocation, created_at, expires_at, max_expires_at, due_at, "
                    "attempts, last_error) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    rows,
                )
        took["leases"] = time.monotonic() - t0

        t0 = time.monotonic()
        for start in range(0, n_entries, ROWS_PER_TX):
            rows = [
                (uuid.uuid4().hex, f"spiffe://dev.local/default/dev/preload-{i}",
                 f"spiffe://dev.local/spire/agent/node-{i % 100}",
                 json.dumps([f"unix:uid:{1000 + i}"]), 3600, 300, "[]", _ts(now))
                for i in range(start, min(start + ROWS_PER_TX, n_entries))
            ]  # fmt: skip
            with db:
                db.executemany(
                    "INSERT INTO registration_entries (id, spiffe_id, parent_id, selectors, "
                    "x509_ttl, jwt_ttl, dns_names, created_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                    rows,
                )
        took["entries"] = time.monotonic() - t0
    finally:
        db.close()
        keys.close()
    return took


def _counts(data_dir: Path) -> dict[str, int]:
    db = sqlite3.connect(data_dir / "broker.db")
    try:
        return {
            table: int(db.execute(f"SELECT count(*) FROM {table}").fetchone()[0])
            for table in ("audit", "secrets", "db_leases", "registration_entries")
        }
    finally:
        db.close()


# -- the command --------------------------------------------------------------------------------


def _phase(args: argparse.Namespace, data_dir: Path, out: Path, name: str) -> dict[str, Any]:
    broker, start_s = _start(data_dir)
    try:
        print(f"preload: {name}: broker ready in {start_s:.2f} s", file=sys.stderr, flush=True)
        result: dict[str, Any] = {"start_seconds": round(start_s, 2), "runs": {}}
        for scenario in SCENARIOS:
            result["runs"][scenario] = _bench(broker, args, scenario, out / f"{name}-{scenario}")
            print(f"preload: {name}: {scenario} {result['runs'][scenario]}", file=sys.stderr)
        result["audit_verify"] = _verify(data_dir, broker.address)
    finally:
        broker.stop()
    result["counts"] = _counts(data_dir)
    return result


def run(args: argparse.Namespace) -> int:
    if args.smoke:
        for key, value in SMOKE.items():
            setattr(args, key, value)
        args.concurrency = 2
        args.warmup = 0.5
    args.report.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix="broker-preload-"))
    data_dir = tmp / "data"
    report: dict[str, Any] = {
        "schema": "credential-broker/loadtest-preload/v1",
        "settings": {k: str(v) for k, v in vars(args).items()},
    }
    try:
        report["empty"] = _phase(args, data_dir, args.report, "empty")
        t0 = time.monotonic()
        took = {"audit": asyncio.run(_preload_audit(data_dir, args.audit))}
        took |= _preload_tables(data_dir, args.secrets, args.leases, args.entries)
        took["total"] = time.monotonic() - t0
        report["preload_seconds"] = {k: round(v, 2) for k, v in took.items()}
        print(f"preload: wrote rows in {took}", file=sys.stderr, flush=True)
        report["preloaded"] = _phase(args, data_dir, args.report, "preloaded")
        report["preloaded"]["audit_verify_offline"] = _verify(data_dir, None)
    except procs.StartupError as exc:
        print(f"preload: {exc}", file=sys.stderr)
        return 3
    finally:
        if not args.keep_temp:
            import shutil

            shutil.rmtree(tmp, ignore_errors=True)
    (args.report / "preload.json").write_text(json.dumps(report, indent=2) + "\n")
    print(_table(report))
    return 0 if _all_ok(report) else 1


def _all_ok(report: dict[str, Any]) -> bool:
    phases = (report["empty"], report["preloaded"])
    verifies = [p["audit_verify"] for p in phases] + [report["preloaded"]["audit_verify_offline"]]
    return all(v["exit"] == 0 for v in verifies)


def _table(report: dict[str, Any]) -> str:
    empty, full = report["empty"], report["preloaded"]
    lines = [
        f"rows after preload: {full['counts']}",
        "| | empty | preloaded | ratio |",
        "|---|---|---|---|",
        f"| broker start | {empty['start_seconds']} s | {full['start_seconds']} s | |",
    ]
    for scenario in SCENARIOS:
        a, b = empty["runs"][scenario], full["runs"][scenario]
        for key in ("throughput_rps", "p50_ms", "p99_ms", "server_cpu_ms_per_request"):
            ratio = f"{b[key] / a[key]:.2f}x" if a[key] and b[key] is not None else "-"
            lines.append(f"| {scenario} {key} | {a[key]} | {b[key]} | {ratio} |")
    ev, fv = empty["audit_verify"], full["audit_verify"]
    lines.append(
        f"| audit verify (online) | {ev['seconds']} s | {fv['seconds']} s, exit {fv['exit']} | |"
    )
    off = full["audit_verify_offline"]
    lines.append(f"| audit verify --offline | | {off['seconds']} s exit {off['exit']} | |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m loadtests.preload", description=__doc__)
    add_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["preload", *(argv if argv is not None else sys.argv[1:])])
    return run(args)


if __name__ == "__main__":
    raise SystemExit(main())
