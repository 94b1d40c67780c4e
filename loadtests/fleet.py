"""A fleet of simulated agents against one or two broker replicas (issue 19, item 6).

    python -m loadtests run --scenario fleet --agents 5000 --procs 4 --report DIR
        [--replicas 1|2] [--workloads 1] [--svid-ttl 120] [--hold 90] [--smoke]

1. starts `--replicas` `broker serve --config` processes on one storage (a SQLite file in a
   temp dir, software keys; each replica its own data dir and ports) and, as the bootstrap
   operator through the SDK, creates one join token per agent and `--workloads` registration
   entries per agent (X.509 TTL `--svid-ttl`);
2. measures each replica's RSS, then starts `--procs` worker processes; each runs its share of
   the agents on one asyncio loop, every agent as a real one does it over the wire: attest with
   its token (its own key), open its own mTLS connection with its SVID (agent i on replica
   i mod R), subscribe to its sync stream (`WatchAgent`), mint an X.509-SVID per entry (its own
   key and CSR) and renew each at half-life with +-10 % jitter (`broker.agent.renew_at`), for
   as long as the run lasts;
3. once every agent holds its stream and its SVIDs: the replicas' RSS again (memory per
   connected agent = RSS delta / agents), then `--hold` seconds of steady state (renewal
   latency; ledger entries written), then `broker ca rotate --force` and the time until every
   agent's stream delivered the new bundle (from the command's start);
4. prints a summary and writes DIR/fleet.json.

The simulated agents verify nothing (the real agent's checks are tested elsewhere); they count
errors, which the report shows. `--smoke` is the CI version: a handful of agents, short TTLs.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import os
import random
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

TD = "fleet.load"
OPERATOR = f"spiffe://{TD}/broker/operator/ops"
READY_TIMEOUT = 60.0


def add_arguments(r: argparse.ArgumentParser) -> None:
    """The fleet scenario's own options on `run` (ignored by the other scenarios)."""
    r.add_argument("--agents", type=int, default=None, help="fleet: simulated agents")
    r.add_argument("--procs", type=int, default=None, help="fleet: agent worker processes")
    r.add_argument("--replicas", type=int, default=1, choices=(1, 2), help="fleet: replicas")
    r.add_argument("--workloads", type=int, default=1, help="fleet: entries per agent")
    r.add_argument("--svid-ttl", type=int, default=120, help="fleet: X.509 TTL of entries, s")
    r.add_argument("--hold", type=float, default=90.0, help="fleet: steady-state seconds")


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _cpu_s(pid: int) -> float:
    """CPU seconds (user + system) the process has used."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


class Replica:
    def __init__(self, tmp: Path, name: str) -> None:
        self.data = tmp / name
        self.data.mkdir(mode=0o700)
        self.port = _free_port()
        self.attest_port = _free_port()
        self.config = tmp / f"{name}.toml"
        self.config.write_text(
            f'trust_domain = "{TD}"\ndata_dir = "{self.data}"\n\n'
            f'[storage]\ndsn = "sqlite:///{tmp / "shared.db"}"\n\n'
            f'[keys]\nuri = "software:path={tmp / "keys"}?pin-source=file:{tmp / "pin"}"\n\n'
            f'[server]\noperators = ["{OPERATOR}"]\n'
            f'attest_listen = "127.0.0.1:{self.attest_port}"\n'
        )
        self.log = open(tmp / f"{name}.stderr", "w")  # noqa: SIM115
        self.proc: subprocess.Popen[str] | None = None

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def attest_address(self) -> str:
        return f"127.0.0.1:{self.attest_port}"

    def start(self) -> None:
        env = {k: v for k, v in os.environ.items() if not k.startswith("BROKER_")}
        env.update(BROKER_RATE_LIMIT_RPS="100000", BROKER_RATE_LIMIT_BURST="100000")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "broker.cli", "serve", "--config", str(self.config),
             "--listen", self.address],
            stdout=subprocess.PIPE, stderr=self.log, stdin=subprocess.DEVNULL, text=True, env=env,
        )  # fmt: skip
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if "listening" not in line:
            raise RuntimeError(f"replica did not start: {line!r} (see {self.log.name})")

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
            self.proc = None
        self.log.close()


# -- the worker processes ------------------------------------------------------------------


def _worker(
    agents: list[tuple[str, str, str, str]], bundle: bytes, ttl_hint: float, out: Any
) -> None:
    """Run `agents` (agent id, join token, mTLS address, attestation address) until killed,
    sending ("ready"|"mint"|"bundle"|"error", ...) tuples to `out`."""
    try:
        import uvloop

        uvloop.install()
    except ImportError:  # pragma: no cover
        pass
    asyncio.run(_run_agents(agents, bundle, out))


async def _run_agents(agents: list[tuple[str, str, str, str]], bundle: bytes, out: Any) -> None:
    import grpc

    from broker.api._proto import identity_pb2_grpc
    from broker.api.client.base import channel_options

    options = channel_options(bundle)
    attest_channels: dict[str, Any] = {}
    for _, _, _, attest in agents:
        if attest not in attest_channels:
            creds = grpc.ssl_channel_credentials(root_certificates=bundle)
            attest_channels[attest] = identity_pb2_grpc.WorkloadIdentityStub(
                grpc.aio.secure_channel(attest, creds, options=options)
            )
    gate = asyncio.Semaphore(64)  # attestation in flight per process
    tasks = [
        asyncio.create_task(_agent(a, attest_channels[a[3]], bundle, options, gate, out))
        for a in agents
    ]
    await asyncio.gather(*tasks)


def _csr() -> tuple[Any, bytes]:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    key = ec.generate_private_key(ec.SECP256R1())
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([]))
        .sign(key, hashes.SHA256())
    )
    return key, csr.public_bytes(serialization.Encoding.DER)


async def _agent(
    agent: tuple[str, str, str, str],
    attest_stub: Any,
    bundle: bytes,
    options: Any,
    gate: asyncio.Semaphore,
    out: Any,
) -> None:
    import grpc
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization

    from broker.agent import renew_at
    from broker.api._proto import identity_pb2, identity_pb2_grpc
    from broker.api.timestamps import to_datetime

    agent_id, token, address, _ = agent
    rng = random.Random(agent_id)
    try:
        async with gate:
            key, csr = _csr()
            svid = await attest_stub.Attest(
                identity_pb2.AttestRequest(join_token=token, csr=csr), timeout=120
            )
        chain = b"".join(
            x509.load_der_x509_certificate(c).public_bytes(serialization.Encoding.PEM)
            for c in svid.cert_chain
        )
        key_pem = key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        creds = grpc.ssl_channel_credentials(
            root_certificates=bundle, private_key=key_pem, certificate_chain=chain
        )
        channel = grpc.aio.secure_channel(address, creds, options=options)
        stub = identity_pb2_grpc.WorkloadIdentityStub(channel)
        stream = stub.WatchAgent(identity_pb2.WatchAgentRequest(agent_id=agent_id))
        first = await stream.read()
        sequence = first.bundle_sequence
        entries = [e.id for e in first.entries]

        async def mint(entry_id: str, renewal: bool) -> float:
            """Mint; returns the seconds until its renewal is due."""
            _, csr = _csr()
            started = time.perf_counter()
            try:
                r = await stub.MintEntryX509(
                    identity_pb2.MintEntryX509Request(entry_id=entry_id, csr=csr), timeout=60
                )
            except grpc.RpcError as exc:
                out.put(("error", f"mint: {exc.code().name}: {exc.details()}"))  # type: ignore[attr-defined]
                return 5.0
            latency = time.perf_counter() - started
            out.put(("mint", renewal, latency, time.time()))
            leaf = x509.load_der_x509_certificate(r.cert_chain[0])
            import datetime as dt

            now = dt.datetime.now(dt.UTC)
            due = renew_at(max(leaf.not_valid_before_utc, now), to_datetime(r.expires_at), rng)
            return max(1.0, (due - now).total_seconds())

        async def keep(entry_id: str) -> None:
            wait = await mint(entry_id, False)
            while True:
                await asyncio.sleep(wait)
                wait = await mint(entry_id, True)

        keepers = [asyncio.create_task(keep(e)) for e in entries]
        out.put(("ready", agent_id, time.time()))
        try:
            while True:
                message = await stream.read()
                if message is grpc.aio.EOF:
                    out.put(("error", "the sync stream ended"))
                    return
                if message.keepalive:
                    continue
                if message.bundle_sequence != sequence:
                    sequence = message.bundle_sequence
                    out.put(("bundle", agent_id, sequence, time.time()))
        finally:
            for k in keepers:
                k.cancel()
    except grpc.RpcError as exc:
        out.put(("error", f"{exc.code().name}: {exc.details()}"))  # type: ignore[attr-defined]
    except Exception as exc:  # a simulated agent failing is counted, not fatal
        out.put(("error", f"{type(exc).__name__}: {exc}"))


# -- the parent ----------------------------------------------------------------------------


def _setup(replica: Replica, n_agents: int, workloads: int, ttl: int) -> list[tuple[str, str]]:
    """Tokens and entries through the SDK as the bootstrap operator: [(agent id, token)]."""
    from broker.api.client.base import BrokerClient, ClientCredentials
    from broker.api.client.identity import IdentityClient

    op = replica.data / "operator"
    creds = ClientCredentials(
        (op / "svid.pem").read_bytes(),
        (op / "key.pem").read_bytes(),
        (replica.data / "bundle.pem").read_bytes(),
    )
    client = BrokerClient(replica.address, creds, timeout=60)
    identity = IdentityClient(client)

    def one(i: int) -> tuple[str, str]:
        agent_id = f"spiffe://{TD}/agents/node-{i}"
        for w in range(workloads):
            identity.create_entry(
                f"spiffe://{TD}/fleet/dev/w{i}-{w}",
                agent_id,
                [f"unix:uid:{1000 + w}"],
                x509_ttl_seconds=ttl,
            )
        return agent_id, identity.create_join_token(agent_id, ttl_seconds=3600).token

    try:
        with ThreadPoolExecutor(8) as pool:
            return list(pool.map(one, range(n_agents)))
    finally:
        client.close()


def _percentiles(values: list[float]) -> dict[str, float]:
    if not values:
        return {}
    s = sorted(values)

    def q(p: float) -> float:
        return round(s[min(len(s) - 1, int(p * len(s)))] * 1000, 2)

    return {"count": len(s), "p50_ms": q(0.50), "p95_ms": q(0.95), "p99_ms": q(0.99),
            "max_ms": round(s[-1] * 1000, 2)}  # fmt: skip


def _ledger_rows(db: Path) -> int:
    """Rows in the audit ledger (read-only, beside the running replicas)."""
    import sqlite3

    with sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=30) as conn:
        return int(conn.execute("SELECT COUNT(*) FROM audit").fetchone()[0])


def run(args: argparse.Namespace) -> int:
    smoke = bool(getattr(args, "smoke", False))
    n = args.agents or (6 if smoke else 1000)
    procs = max(1, args.procs or (2 if smoke else 4))
    hold = 3.0 if smoke else args.hold
    ttl = max(30, args.svid_ttl if not smoke else 30)
    report_dir: Path = args.report
    report_dir.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix="fleet-"))
    (tmp / "pin").write_text("fleet-load-pin\n")
    (tmp / "pin").chmod(0o600)
    replicas = [Replica(tmp, f"r{i}") for i in range(args.replicas)]
    workers: list[Any] = []
    result: dict[str, Any] = {"agents": n, "procs": procs, "replicas": args.replicas,
                              "workloads_per_agent": args.workloads, "svid_ttl_s": ttl,
                              "hold_s": hold, "cpus": os.cpu_count()}  # fmt: skip
    try:
        for r in replicas:
            r.start()  # one after the other: the first creates the CA
        t0 = time.perf_counter()
        tokens = _setup(replicas[0], n, args.workloads, ttl)
        result["setup_s"] = round(time.perf_counter() - t0, 1)
        bundle = (replicas[0].data / "bundle.pem").read_bytes()
        rss_before = [_rss_kib(r.proc.pid) for r in replicas if r.proc]
        ctx = multiprocessing.get_context("spawn")
        out = ctx.Queue()
        spread = [replicas[i % len(replicas)] for i in range(len(tokens))]
        plan = [
            (aid, tok, r.address, r.attest_address)
            for (aid, tok), r in zip(tokens, spread, strict=True)
        ]
        for p in range(procs):
            w = ctx.Process(target=_worker, args=(plan[p::procs], bundle, ttl, out), daemon=True)
            w.start()
            workers.append(w)
        ready: set[str] = set()
        errors: list[str] = []
        mints: list[tuple[bool, float, float]] = []
        bundles: dict[str, float] = {}
        started = time.time()
        t_connect = time.perf_counter()

        def drain(until: float, done: Any = None) -> None:
            while time.time() < until and not (done and done()):
                try:
                    item = out.get(timeout=0.2)
                except Exception:  # queue.Empty
                    continue
                kind = item[0]
                if kind == "ready":
                    ready.add(item[1])
                elif kind == "mint":
                    mints.append((item[1], item[2], item[3]))
                elif kind == "bundle":
                    bundles.setdefault(item[1], item[3])
                else:
                    errors.append(item[1])

        first_mints = n * args.workloads
        drain(started + max(120.0, n / 20), lambda: len(ready) >= n and len(mints) >= first_mints)
        result["connected"] = len(ready)
        result["connect_all_s"] = round(time.perf_counter() - t_connect, 1)
        time.sleep(2)
        drain(time.time() + 0.5)
        rss_after = [_rss_kib(r.proc.pid) for r in replicas if r.proc]
        delta = sum(rss_after) - sum(rss_before)
        result["rss_kib_before"], result["rss_kib_after"] = rss_before, rss_after
        result["kib_per_agent"] = round(delta / max(1, len(ready)), 1)
        rows_before = _ledger_rows(tmp / "shared.db")
        cpu_before = [_cpu_s(r.proc.pid) for r in replicas if r.proc]
        hold_start = time.time()
        drain(hold_start + hold)
        rows_after = _ledger_rows(tmp / "shared.db")
        held = time.time() - hold_start
        cpu_after = [_cpu_s(r.proc.pid) for r in replicas if r.proc]
        renewals = [lat for renewal, lat, when in mints if renewal and when >= hold_start]
        steady = [lat for _, lat, when in mints if when >= hold_start]
        result["steady"] = {
            "seconds": round(held, 1),
            "mints": len(steady),
            "mints_per_s": round(len(steady) / held, 2),
            "renewal_latency": _percentiles(renewals),
            "mint_latency": _percentiles(steady),
            "ledger_rows": rows_after - rows_before,
            # Cores the replicas kept busy (CPU seconds / wall seconds), summed.
            "server_cores": round((sum(cpu_after) - sum(cpu_before)) / held, 3),
            "ledger_rows_per_agent_hour": round(
                (rows_after - rows_before) / max(1, len(ready)) * 3600 / held, 1
            ),
        }
        # The CA rotation, pushed to every agent.
        env = {k: v for k, v in os.environ.items() if not k.startswith("BROKER_")}
        env.update(BROKER_ADDR=replicas[0].address, BROKER_DATA_DIR=str(replicas[0].data))
        rotate_at = time.time()
        done = subprocess.run(
            [sys.executable, "-m", "broker.cli", "ca", "rotate", "--force"],
            capture_output=True, text=True, env=env, timeout=120, check=False,
        )  # fmt: skip
        rotated_cmd = time.time() - rotate_at
        if done.returncode != 0:
            errors.append(f"ca rotate --force: {done.stderr.strip()[:300]}")
        bundles.clear()
        drain(rotate_at + 120.0, lambda: len(bundles) >= len(ready))
        reached = sorted(t - rotate_at for t in bundles.values() if t >= rotate_at)
        result["rotation"] = {
            "command_s": round(rotated_cmd, 2),
            "agents_reached": len(reached),
            "all_reached_s": round(reached[-1], 2) if len(reached) >= len(ready) else None,
            "p50_s": round(reached[len(reached) // 2], 2) if reached else None,
            "last_s": round(reached[-1], 2) if reached else None,
        }
        drain(time.time() + 1)
        result["errors"] = len(errors)
        result["error_samples"] = sorted(set(errors))[:10]
    finally:
        for w in workers:
            w.kill()
        for r in replicas:
            r.stop()
    (report_dir / "fleet.json").write_text(json.dumps(result, indent=2))
    _print(result)
    if smoke:
        ok = result["connected"] == n and result["rotation"]["agents_reached"] == n
        return 0 if ok and not result["errors"] else 1
    return 0


def _print(r: dict[str, Any]) -> None:
    rot = r.get("rotation", {})
    st = r.get("steady", {})
    print(
        f"fleet: {r['connected']}/{r['agents']} agents over {r['procs']} processes, "
        f"{r['replicas']} replica(s); all connected in {r.get('connect_all_s')} s"
    )
    print(
        f"memory per connected agent: {r.get('kib_per_agent')} KiB (server RSS "
        f"{r.get('rss_kib_before')} -> {r.get('rss_kib_after')} KiB)"
    )
    print(
        f"steady state {st.get('seconds')} s: {st.get('mints_per_s')} mints/s, renewal "
        f"latency {st.get('renewal_latency')}, ledger {st.get('ledger_rows_per_agent_hour')} "
        f"rows/agent/hour, replicas busy {st.get('server_cores')} cores"
    )
    print(
        f"CA rotation pushed to {rot.get('agents_reached')} agents; all within "
        f"{rot.get('all_reached_s')} s (median {rot.get('p50_s')} s; the command took "
        f"{rot.get('command_s')} s)"
    )
    print(f"errors: {r.get('errors')} {r.get('error_samples')}")  # fmt: skip
