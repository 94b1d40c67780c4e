"""``python -m loadtests.servermodels``: grpc.aio (on uvloop, as the broker serves) against the
sync gRPC server with a thread pool, on the same unary workload shape, over TLS.

Each request runs `--work-us` of Python CPU in the handler (the broker's request pipeline is
Python: authenticate, authorize, audit, servicer) and, with `--token-us`, a blocking wait that
releases the GIL as a token call does (on the aio server through a small executor, as the
broker does; on the sync server inline in its worker thread). Clients: 2 processes of grpc.aio
callers. Reports req/s, p99 and server CPU per request. Not a test; see docs/keys.md.
"""

from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
import datetime as dt
import multiprocessing
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from loadtests import procs
from loadtests.durations import seconds

_METHOD = "/bench.Bench/Call"


def _busy(us: float) -> None:
    end = time.perf_counter() + us / 1e6
    while time.perf_counter() < end:
        pass


def _cert(directory: Path) -> tuple[Path, Path]:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=1))
        .not_valid_after(now + dt.timedelta(hours=1))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost")]), critical=False)
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = directory / "cert.pem", directory / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return cert_path, key_path


def _serve(model: str, port: int, cert: Path, key: Path, work: float, token: float) -> None:
    import grpc

    creds = grpc.ssl_server_credentials([(key.read_bytes(), cert.read_bytes())])
    if model == "sync":

        def call(request: bytes, context: object) -> bytes:
            _busy(work)
            if token:
                time.sleep(token / 1e6)
            return b"ok"

        handler = grpc.method_handlers_generic_handler(
            "bench.Bench", {"Call": grpc.unary_unary_rpc_method_handler(call)}
        )
        server = grpc.server(concurrent.futures.ThreadPoolExecutor(max_workers=32))
        server.add_generic_rpc_handlers((handler,))
        server.add_secure_port(f"127.0.0.1:{port}", creds)
        server.start()
        print("ready", flush=True)
        server.wait_for_termination()
        return

    import uvloop

    pool = concurrent.futures.ThreadPoolExecutor(max_workers=2)

    async def acall(request: bytes, context: object) -> bytes:
        _busy(work)
        if token:
            await asyncio.get_running_loop().run_in_executor(pool, time.sleep, token / 1e6)
        return b"ok"

    async def main() -> None:
        handler = grpc.method_handlers_generic_handler(
            "bench.Bench", {"Call": grpc.unary_unary_rpc_method_handler(acall)}
        )
        server = grpc.aio.server()
        server.add_generic_rpc_handlers((handler,))
        server.add_secure_port(f"127.0.0.1:{port}", creds)
        await server.start()
        print("ready", flush=True)
        await server.wait_for_termination()

    uvloop.run(main())


def _client(port: int, cert: bytes, concurrency: int, seconds: float, out: object) -> None:
    import grpc

    async def main() -> list[float]:
        creds = grpc.ssl_channel_credentials(root_certificates=cert)
        channels = [grpc.aio.secure_channel(f"localhost:{port}", creds) for _ in range(2)]
        calls = [c.unary_unary(_METHOD) for c in channels]
        latencies: list[float] = []
        stop = time.monotonic() + seconds

        async def user(i: int) -> None:
            call = calls[i % len(calls)]
            while time.monotonic() < stop:
                started = time.perf_counter()
                await call(b"x", timeout=30)
                latencies.append(time.perf_counter() - started)

        await asyncio.gather(*(user(i) for i in range(concurrency)))
        for c in channels:
            await c.close()
        return latencies

    out.put(asyncio.run(main()))  # type: ignore[attr-defined]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _measure(args: argparse.Namespace, model: str, work: float, directory: Path) -> str:
    cert, key = _cert(directory)
    port = _free_port()
    server = subprocess.Popen(
        [sys.executable, "-m", "loadtests.servermodels", "serve", model, str(port), str(cert),
         str(key), str(work), str(args.token_us)],
        stdout=subprocess.PIPE,
        text=True,
    )  # fmt: skip
    try:
        assert server.stdout is not None and server.stdout.readline().strip() == "ready"
        ctx = multiprocessing.get_context("spawn")
        queue = ctx.Queue()
        # warm-up, then the measured window
        for seconds in (1.0, args.seconds):
            cpu0 = procs.cpu_seconds([server.pid])
            workers = [
                ctx.Process(
                    target=_client,
                    args=(port, cert.read_bytes(), args.concurrency // 2, seconds, queue),
                )
                for _ in range(2)
            ]
            for w in workers:
                w.start()
            latencies = [x for _ in workers for x in queue.get()]
            for w in workers:
                w.join()
            cpu = procs.cpu_seconds([server.pid]) - cpu0
        latencies.sort()
        rps = len(latencies) / args.seconds
        p99 = latencies[int(len(latencies) * 0.99)] * 1000
        return (
            f"{model:>5} work {work:>5g} us token {args.token_us:>5g} us: {rps:8.0f} req/s, "
            f"p99 {p99:7.1f} ms, server CPU {cpu / len(latencies) * 1000:.3f} ms/request"
        )
    finally:
        server.terminate()
        server.wait()


def main() -> None:
    if sys.argv[1:2] == ["serve"]:
        model, port, cert, key, work, token = sys.argv[2:8]
        _serve(model, int(port), Path(cert), Path(key), float(work), float(token))
        return
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--work-us", default="0,300", help="Python CPU per request, µs")
    p.add_argument("--token-us", type=float, default=0.0, help="GIL-free wait per request, µs")
    p.add_argument("--concurrency", type=int, default=32)
    p.add_argument("--seconds", type=seconds, default=8.0)
    p.add_argument("--rounds", type=int, default=2)
    args = p.parse_args()
    with tempfile.TemporaryDirectory(prefix="servermodels-") as tmp:
        for _ in range(args.rounds):
            for work_us in (float(w) for w in args.work_us.split(",")):
                for model in ("aio", "sync"):
                    print(_measure(args, model, work_us, Path(tmp)), flush=True)


if __name__ == "__main__":
    main()
