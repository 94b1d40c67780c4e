"""Workload API through `broker agent`: agent start to first SVID, then FetchX509SVID and
FetchJWTSVID latency at N concurrent callers, served from the agent's cache.

    .venv/bin/python -m loadtests.agent [--callers 32] [--duration 10] [--warmup 2]
        [--processes 4] [--report FILE]

Starts `broker serve --dev` and, after a join token and one registration entry for this uid,
`broker agent` (both subprocesses in a temp dir, stopped at the end). "Start to first SVID" is
the wall time from spawning the agent to the first FetchX509SVID answer on its socket (it
includes the interpreter start, attestation, sync and the first mint). The load: `--callers`
callers spread over `--processes` worker processes, each caller with its own connection to the
socket, either back to back (a closed loop: the figure is the agent's saturation latency) or
paced at `--rates` requests per second per caller (an open loop, latency measured from each
call's scheduled time); a FetchX509SVID call opens the stream and reads the first message.
Every answer is checked (the SPIFFE ID), so an error cannot pass as a fast reply.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import multiprocessing
import os
import platform
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from loadtests.durations import seconds

TD = "broker.local"
HEADER = (("workload.spiffe.io", "true"),)
AGENT_CPUS = {0}
LOAD_CPUS = tuple(range(1, os.cpu_count() or 2))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _cli(data: Path, port: int, *args: str) -> str:
    env = {**os.environ, "BROKER_ADDR": f"127.0.0.1:{port}", "BROKER_DATA_DIR": str(data)}
    out = subprocess.run(
        [sys.executable, "-m", "broker.cli", *args],
        capture_output=True,
        text=True,
        env=env,
        check=True,
        timeout=60,
    )
    return out.stdout.strip()


def _wait_line(proc: subprocess.Popen[str], needle: str, timeout: float) -> str:
    assert proc.stdout is not None
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if needle in line:
            return line.strip()
        if not line and proc.poll() is not None:
            break
    raise RuntimeError(f"no {needle!r} line from {proc.args!r}")


@contextlib.contextmanager
def _process(args: list[str], **kw: Any) -> Iterator[subprocess.Popen[str]]:
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, text=True, **kw)
    try:
        yield proc
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _first_svid(socket_path: Path, deadline: float) -> float:
    import grpc

    from broker.api._proto import workload_pb2, workload_pb2_grpc

    while time.monotonic() < deadline:
        if socket_path.exists():
            with grpc.insecure_channel(f"unix:{socket_path}") as channel:
                stub = workload_pb2_grpc.SpiffeWorkloadAPIStub(channel)
                try:
                    stream = stub.FetchX509SVID(
                        workload_pb2.X509SVIDRequest(), metadata=HEADER, timeout=5
                    )
                    if next(iter(stream)).svids:
                        stream.cancel()
                        return time.monotonic()
                except grpc.RpcError:
                    pass
        time.sleep(0.005)
    raise RuntimeError("no SVID from the agent in time")


async def _caller(
    socket_path: str,
    kind: str,
    until: float,
    warm_until: float,
    out: list[float],
    rate: float = 0.0,
) -> int:
    import grpc

    from broker.api._proto import workload_pb2, workload_pb2_grpc

    errors = 0
    async with grpc.aio.insecure_channel(f"unix:{socket_path}") as channel:
        stub = workload_pb2_grpc.SpiffeWorkloadAPIStub(channel)
        interval = 1.0 / rate if rate else 0.0
        # Paced callers start at random phases, so they do not all fire at once.
        next_at = time.monotonic() + (random.random() * interval if rate else 0.0)
        while True:
            if rate:
                pause = next_at - time.monotonic()
                if pause > 0:
                    await asyncio.sleep(pause)
                started = next_at  # latency from the scheduled time (no coordinated omission)
                next_at += interval
            else:
                started = time.monotonic()
            if started >= until:
                return errors
            try:
                if kind == "x509":
                    call = stub.FetchX509SVID(workload_pb2.X509SVIDRequest(), metadata=HEADER)
                    message = await call.read()
                    call.cancel()
                    ok = message.svids[0].spiffe_id.startswith(f"spiffe://{TD}/")
                else:
                    reply = await stub.FetchJWTSVID(
                        workload_pb2.JWTSVIDRequest(audience=["bench"]), metadata=HEADER
                    )
                    ok = reply.svids[0].spiffe_id.startswith(f"spiffe://{TD}/")
            except grpc.RpcError:
                ok = False
            elapsed = time.monotonic() - started
            if not ok:
                errors += 1
            elif started >= warm_until:
                out.append(elapsed)


def _worker(
    socket_path: str,
    kind: str,
    callers: int,
    start: float,
    warmup: float,
    duration: float,
    conn: Any,
    rate: float = 0.0,
    cpus: tuple[int, ...] = (),
) -> None:
    if cpus:
        os.sched_setaffinity(0, cpus)
    try:
        import uvloop

        uvloop.install()
    except ImportError:
        pass
    samples: list[float] = []

    async def main() -> int:
        delay = start - time.monotonic()
        if delay > 0:
            await asyncio.sleep(delay)
        warm_until = start + warmup
        until = warm_until + duration
        results = await asyncio.gather(
            *(_caller(socket_path, kind, until, warm_until, samples, rate) for _ in range(callers))
        )
        return sum(results)

    errors = asyncio.run(main())
    conn.send((samples, errors))
    conn.close()


def _baseline_server(path: str, seconds: float, cpus: tuple[int, ...] = ()) -> None:
    """A bare grpc.aio Workload API server answering FetchJWTSVID with a constant: the ceiling
    of Python gRPC on this machine, with no proxy, no matching and no agent."""
    import grpc

    from broker.api._proto import workload_pb2, workload_pb2_grpc

    if cpus:
        os.sched_setaffinity(0, cpus)

    class Constant(workload_pb2_grpc.SpiffeWorkloadAPIServicer):
        """Serves FetchJWTSVID only; the generated base answers UNIMPLEMENTED to the rest."""

        async def FetchJWTSVID(self, request: Any, context: Any) -> Any:
            return workload_pb2.JWTSVIDResponse(
                svids=[workload_pb2.JWTSVID(spiffe_id=f"spiffe://{TD}/baseline", svid="a.b.c")]
            )

    async def serve() -> None:
        server = grpc.aio.server()
        # The stubs declare every RPC abstract; at run time the base class implements them.
        servicer = Constant()  # type: ignore[abstract]
        workload_pb2_grpc.add_SpiffeWorkloadAPIServicer_to_server(servicer, server)
        server.add_insecure_port(f"unix:{path}")
        await server.start()
        await asyncio.sleep(seconds)
        await server.stop(None)

    with contextlib.suppress(ImportError):
        import uvloop

        uvloop.install()
    asyncio.run(serve())


def _baseline(tmp: Path, args: argparse.Namespace) -> dict[str, Any]:
    path = tmp / "baseline.sock"
    seconds = args.warmup + args.duration + 30
    proc = multiprocessing.get_context("spawn").Process(
        target=_baseline_server,
        args=(str(path), seconds, tuple(AGENT_CPUS) if args.pin else ()),
    )
    proc.start()
    try:
        deadline = time.monotonic() + 30
        while not path.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        run = _load(
            path, "jwt", args.callers, args.processes, args.warmup, args.duration, 0.0,
            LOAD_CPUS if args.pin else (),
        )  # fmt: skip
        run["operation"] = "baseline: bare grpc.aio FetchJWTSVID"
        return run
    finally:
        proc.terminate()
        proc.join()


def _percentile(sorted_values: list[float], q: float) -> float:
    if not sorted_values:
        return float("nan")
    index = min(len(sorted_values) - 1, max(0, round(q * (len(sorted_values) - 1))))
    return sorted_values[index]


def _load(
    socket_path: Path,
    kind: str,
    callers: int,
    processes: int,
    warmup: float,
    duration: float,
    rate: float = 0.0,
    cpus: tuple[int, ...] = (),
) -> dict[str, Any]:
    ctx = multiprocessing.get_context("spawn")
    start = time.monotonic() + 2.0
    shares = [
        callers // processes + (1 if i < callers % processes else 0) for i in range(processes)
    ]
    pipes, procs = [], []
    for share in shares:
        if share == 0:
            continue
        parent, child = ctx.Pipe()
        p = ctx.Process(
            target=_worker,
            args=(str(socket_path), kind, share, start, warmup, duration, child, rate, cpus),
        )
        p.start()
        pipes.append(parent)
        procs.append(p)
    samples: list[float] = []
    errors = 0
    for parent in pipes:
        got, errs = parent.recv()
        samples.extend(got)
        errors += errs
    for p in procs:
        p.join()
    samples.sort()
    ms = [s * 1000 for s in samples]
    return {
        "operation": "FetchX509SVID" if kind == "x509" else "FetchJWTSVID",
        "callers": callers,
        "per_caller_rate": rate or "back to back",
        "requests": len(ms),
        "errors": errors,
        "rps": round(len(ms) / duration, 1),
        "p50_ms": round(_percentile(ms, 0.50), 3),
        "p95_ms": round(_percentile(ms, 0.95), 3),
        "p99_ms": round(_percentile(ms, 0.99), 3),
        "max_ms": round(ms[-1], 3) if ms else None,
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--callers", type=int, default=32)
    p.add_argument("--processes", type=int, default=4)
    p.add_argument("--duration", type=seconds, default=10.0)
    p.add_argument("--warmup", type=seconds, default=2.0)
    p.add_argument("--starts", type=int, default=3, help="agent starts to time")
    p.add_argument(
        "--rates",
        default="0,20",
        help="per-caller request rates to run, comma-separated (0 = back to back) [0,20]",
    )
    p.add_argument("--report", type=Path)
    p.add_argument(
        "--pin",
        action="store_true",
        help="pin the agent to CPU 0 and the load processes to the other CPUs",
    )
    p.add_argument(
        "--baseline",
        action="store_true",
        help="also drive a bare grpc.aio server (constant answers) the same way, for reference",
    )
    args = p.parse_args(argv)
    tmp = Path(tempfile.mkdtemp(prefix="loadtests-agent-"))
    data, port = tmp / "data", _free_port()
    env = {**os.environ, "BROKER_RATE_LIMIT_RPS": "100000", "BROKER_RATE_LIMIT_BURST": "100000"}
    report: dict[str, Any] = {
        "machine": {
            "cpus": os.cpu_count(),
            "loadavg_before": os.getloadavg(),
            "python": platform.python_version(),
            "platform": platform.platform(),
        },
        "starts": [],
        "runs": [],
    }
    try:
        serve = [sys.executable, "-m", "broker.cli", "serve", "--dev", "--data-dir", str(data),
                 "--listen", f"127.0.0.1:{port}"]  # fmt: skip
        with _process(serve, env=env, stderr=subprocess.DEVNULL) as broker:
            line = _wait_line(broker, "listening", 120)
            attest = line.split("attestation on ", 1)[1].rstrip(")")
            _cli(data, port, "entry", "create", "--spiffe-id", f"spiffe://{TD}/bench/web",
                 "--parent-id", f"spiffe://{TD}/agents/bench", "--selector",
                 f"unix:uid:{os.getuid()}")  # fmt: skip
            for i in range(args.starts):
                token = _cli(
                    data, port, "token", "create", "--spiffe-id", f"spiffe://{TD}/agents/bench"
                )
                sock = tmp / f"agent-{i}.sock"
                agent_args = [sys.executable, "-m", "broker.cli", "agent", "--server",
                              f"127.0.0.1:{port}", "--attest-server", attest, "--bundle",
                              str(data / "bundle.pem"), "--join-token", token,
                              "--socket", str(sock)]  # fmt: skip
                spawned = time.monotonic()
                with _process(agent_args, stderr=subprocess.DEVNULL) as agent:
                    if args.pin:
                        os.sched_setaffinity(agent.pid, AGENT_CPUS)
                    first = _first_svid(sock, spawned + 60)
                    report["starts"].append(round(first - spawned, 3))
                    print(f"agent start to first SVID: {first - spawned:.3f} s", file=sys.stderr)
                    if i == args.starts - 1:
                        for rate in (float(r) for r in args.rates.split(",")):
                            for kind in ("x509", "jwt"):
                                run = _load(
                                    sock, kind, args.callers, args.processes, args.warmup,
                                    args.duration, rate, LOAD_CPUS if args.pin else (),
                                )  # fmt: skip
                                report["runs"].append(run)
                                print(json.dumps(run), file=sys.stderr)
        if args.baseline:
            run = _baseline(tmp, args)
            report["runs"].append(run)
            print(json.dumps(run), file=sys.stderr)
        report["machine"]["loadavg_after"] = os.getloadavg()
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    text = json.dumps(report, indent=2)
    print(text)
    if args.report:
        args.report.write_text(text)
    return 0 if all(r["errors"] == 0 and r["requests"] > 0 for r in report["runs"]) else 1


if __name__ == "__main__":
    sys.exit(main())
