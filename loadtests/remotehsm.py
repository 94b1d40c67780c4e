"""``python -m loadtests remote-hsm``: SVID-from-CSR throughput with the HSM across a network.

A model of a network HSM built inside this machine, by hand (root, iproute2, tc, socat,
p11-kit, SoftHSM2); not a test. For each added round-trip time:

1. a fresh SoftHSM2 token, exported by ``p11-kit server`` (Unix socket) inside its own network
   namespace;
2. a veth pair between that namespace and this one, private addresses only on that pair
   (10.231.N.1/30 here, .2 there); ``socat`` in the namespace forwards TCP to the server's
   socket, and ``socat`` here offers a Unix socket that forwards over TCP to it;
3. the added delay: ``tc qdisc ... netem delay`` is what one would use, but this sandbox's
   kernel has no netem ("Specified qdisc kind is unknown", no kernel modules to load), so a
   small delay relay (threads, `time.sleep` precision) sits on the TCP path and holds every
   chunk half the RTT in each direction; ``--netem`` uses tc instead where it exists;
4. ``python -m loadtests run --scenario svid-csr`` with its dev broker told (BROKER_KEYS_URI,
   P11_KIT_SERVER_ADDRESS) to load ``p11-kit-client.so`` and use that token.

Everything made is removed at the end, also on failure. The table printed (and
``DIR/remote-hsm.json``) gives req/s, p50/p99 and the ratio to the no-delay run.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import queue
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from broker.softhsm import SOFTHSM_MODULE, init_token
from loadtests.durations import seconds

__all__ = ["add_parser", "run"]

_TOKEN = "remote-broker"


def add_parser(sub: Any) -> None:
    p = sub.add_parser("remote-hsm", help="SVID-from-CSR with the HSM behind a delayed network")
    p.add_argument("--delays", default="0,1,2,5", help="added RTTs in ms (default 0,1,2,5)")
    p.add_argument("--concurrency", type=int, default=32)
    p.add_argument("--duration", type=seconds, default=10.0)
    p.add_argument("--broker-workers", type=int, default=1)
    p.add_argument("--report", required=True, help="directory for the results")
    p.add_argument("--netem", action="store_true", help="delay with tc netem, not the relay")


def _sh(*argv: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, check=check, capture_output=True, text=True)


def _require() -> str:
    for tool in ("ip", "tc", "socat", "p11-kit"):
        if shutil.which(tool) is None:
            raise SystemExit(f"remote-hsm: {tool} is not installed")
    client = sorted(Path("/usr/lib").glob("*/pkcs11/p11-kit-client.so"))
    if not client:
        raise SystemExit(
            "remote-hsm: p11-kit-client.so not found (apt-get install p11-kit-modules)"
        )
    return str(client[0])


@contextlib.contextmanager
def _network(tag: int) -> Iterator[tuple[str, str, str]]:
    """(namespace, host-side veth, namespace address)."""
    ns, here, there = f"bhsm{tag}", f"bh{tag}a", f"bh{tag}b"
    subnet = 10 + tag % 200
    try:
        _sh("ip", "netns", "add", ns)
        _sh("ip", "link", "add", here, "type", "veth", "peer", "name", there)
        _sh("ip", "link", "set", there, "netns", ns)
        _sh("ip", "addr", "add", f"10.231.{subnet}.1/30", "dev", here)
        _sh("ip", "link", "set", here, "up")
        _sh("ip", "netns", "exec", ns, "ip", "addr", "add", f"10.231.{subnet}.2/30", "dev", there)
        _sh("ip", "netns", "exec", ns, "ip", "link", "set", there, "up")
        _sh("ip", "netns", "exec", ns, "ip", "link", "set", "lo", "up")
        yield ns, here, f"10.231.{subnet}.2"
    finally:
        _sh("ip", "link", "del", here, check=False)
        _sh("ip", "netns", "del", ns, check=False)


def _delay(ns: str, here: str, rtt_ms: float) -> None:
    there = here[:-1] + "b"
    half = f"{rtt_ms / 2:g}ms"
    _sh("tc", "qdisc", "replace", "dev", here, "root", "netem", "delay", half)
    _sh(
        "ip",
        "netns",
        "exec",
        ns,
        "tc",
        "qdisc",
        "replace",
        "dev",
        there,
        "root",
        "netem",
        "delay",
        half,
    )


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _wait_port(port: int, process: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + 15
    while True:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                return
        except OSError:
            if process.poll() is not None or time.monotonic() > deadline:
                raise SystemExit("remote-hsm: delay relay did not start") from None
            time.sleep(0.02)


def _connect_rtt_ms(address: str) -> float:
    """Median time of a TCP connect to the HSM side (one round trip), in ms."""
    times = []
    for _ in range(5):
        started = time.perf_counter()
        with socket.create_connection((address, 5500), timeout=5):
            times.append((time.perf_counter() - started) * 1000)
    return round(sorted(times)[2], 3)


def _wait_for(path: Path, process: subprocess.Popen[bytes], what: str) -> None:
    deadline = time.monotonic() + 15
    while not path.exists():
        if process.poll() is not None or time.monotonic() > deadline:
            raise SystemExit(f"remote-hsm: {what} did not start")
        time.sleep(0.02)


def _one(rtt: float, args: argparse.Namespace, client: str, work: Path, tag: int) -> dict[str, Any]:
    hsm = work / f"hsm-{tag}"
    hsm.mkdir()
    pin = secrets.token_hex(16)
    conf = init_token(hsm, _TOKEN, pin.encode(), secrets.token_hex(16).encode())
    pin_file = hsm / "pin"
    pin_file.write_text(pin)
    pin_file.chmod(0o600)
    procs: list[subprocess.Popen[bytes]] = []
    try:
        with _network(tag) as (ns, here, address):
            inner, outer = hsm / "server.sock", hsm / "client.sock"
            env = os.environ | {"SOFTHSM2_CONF": str(conf)}
            procs.append(
                subprocess.Popen(
                    [
                        "ip",
                        "netns",
                        "exec",
                        ns,
                        "p11-kit",
                        "server",
                        "-f",
                        "--provider",
                        SOFTHSM_MODULE,
                        "-n",
                        str(inner),
                        f"pkcs11:token={_TOKEN}",
                    ],
                    env=env,
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.DEVNULL,
                )
            )
            _wait_for(inner, procs[-1], "p11-kit server")
            procs.append(
                subprocess.Popen(
                    [
                        "ip",
                        "netns",
                        "exec",
                        ns,
                        "socat",
                        f"TCP-LISTEN:5500,bind={address},fork,reuseaddr,nodelay",
                        f"UNIX-CONNECT:{inner}",
                    ],
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.DEVNULL,
                )
            )
            time.sleep(0.3)
            target = f"{address}:5500"
            if not args.netem:
                relay_port = _free_port()
                procs.append(
                    subprocess.Popen(
                        [
                            sys.executable,
                            "-m",
                            "loadtests.remotehsm",
                            "relay",
                            str(relay_port),
                            address,
                            "5500",
                            str(rtt / 2),
                        ],
                        stdout=subprocess.DEVNULL,
                    )
                )
                _wait_port(relay_port, procs[-1])
                target = f"127.0.0.1:{relay_port}"
            procs.append(
                subprocess.Popen(
                    ["socat", f"UNIX-LISTEN:{outer},fork", f"TCP:{target},nodelay"],
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.DEVNULL,
                )
            )
            _wait_for(outer, procs[-1], "socat")
            if rtt > 0 and args.netem:
                _delay(ns, here, rtt)
            measured = _connect_rtt_ms(address)
            report = Path(args.report) / f"rtt-{rtt:g}ms"
            run_env = os.environ | {
                "BROKER_KEYS_URI": f"pkcs11:token={_TOKEN}?module-path={client}",
                "BROKER_KEYS_PIN_SOURCE": f"file:{pin_file}",
                "P11_KIT_SERVER_ADDRESS": f"unix:path={outer}",
            }
            argv = [
                sys.executable,
                "-m",
                "loadtests",
                "run",
                "--scenario",
                "svid-csr",
                "--concurrency",
                str(args.concurrency),
                "--duration",
                str(args.duration),
                "--broker-workers",
                str(args.broker_workers),
                "--report",
                str(report),
            ]
            done = subprocess.run(argv, env=run_env, capture_output=True, text=True)
            if done.returncode != 0:
                raise SystemExit(
                    f"remote-hsm: load run failed at {rtt} ms:\n"
                    f"{done.stdout[-3000:]}{done.stderr[-3000:]}"
                )
            data = json.loads((report / "report.json").read_text())
            row = _row(data)
            row.update(rtt_ms=rtt, measured_tcp_connect_ms=measured)
            return row
    finally:
        for process in reversed(procs):
            process.terminate()
            with contextlib.suppress(subprocess.TimeoutExpired):
                process.wait(timeout=5)
            if process.poll() is None:
                process.kill()


def _row(data: dict[str, Any]) -> dict[str, Any]:
    runs = [r for r in data.get("runs", []) if r.get("target") == "broker"]
    if not runs:
        raise SystemExit("remote-hsm: no broker run in the report")
    r = runs[-1]
    latency = r.get("latency_ms", {})
    return {
        "throughput": r.get("throughput_rps"),
        "p50_ms": latency.get("p50"),
        "p99_ms": latency.get("p99"),
        "errors": r.get("error_count"),
        "server_cpu_ms_per_request": r.get("server_cpu_ms_per_request"),
    }


def run(args: argparse.Namespace) -> int:
    if os.geteuid() != 0:
        raise SystemExit("remote-hsm: needs root (ip netns, tc)")
    client = _require()
    delays = [float(d) for d in args.delays.split(",")]
    Path(args.report).mkdir(parents=True, exist_ok=True)
    rows = []
    with tempfile.TemporaryDirectory(prefix="remote-hsm-") as tmp:
        for n, rtt in enumerate(delays):
            rows.append(_one(rtt, args, client, Path(tmp), os.getpid() % 50 * 4 + n))
            print(f"[remote-hsm] rtt +{rtt:g} ms: {rows[-1]}", flush=True)
    base = rows[0]["throughput"] or 1.0
    print("\nadded RTT   req/s    p50 ms   p99 ms   x no-delay")
    for row in rows:
        print(
            f"{row['rtt_ms']:>6g} ms {row['throughput']:>8.1f} {row['p50_ms']:>8.2f} "
            f"{row['p99_ms']:>8.2f}   {row['throughput'] / base:>6.2f}"
        )
    (Path(args.report) / "remote-hsm.json").write_text(json.dumps(rows, indent=2))
    return 0


# -- the delay relay (a separate process: `python -m loadtests.remotehsm relay ...`) ------------


def _relay_direction(src: socket.socket, dst: socket.socket, delay: float) -> None:
    chunks: queue.Queue[tuple[float, bytes]] = queue.Queue()

    def send() -> None:
        while True:
            due, data = chunks.get()
            wait = due - time.monotonic()
            if wait > 0:
                time.sleep(wait)
            if not data:
                with contextlib.suppress(OSError):
                    dst.shutdown(socket.SHUT_WR)
                return
            try:
                dst.sendall(data)
            except OSError:
                return

    sender = threading.Thread(target=send, daemon=True)
    sender.start()
    while True:
        try:
            data = src.recv(65536)
        except OSError:
            data = b""
        chunks.put((time.monotonic() + delay, data))
        if not data:
            break
    sender.join()


def _relay(port: int, host: str, target_port: int, one_way_ms: float) -> None:
    delay = one_way_ms / 1000
    listener = socket.create_server(("127.0.0.1", port))
    while True:
        client, _ = listener.accept()
        upstream = socket.create_connection((host, target_port))
        for sock in (client, upstream):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        for src, dst in ((client, upstream), (upstream, client)):
            threading.Thread(target=_relay_direction, args=(src, dst, delay), daemon=True).start()


if __name__ == "__main__" and sys.argv[1:2] == ["relay"]:
    _relay(int(sys.argv[2]), sys.argv[3], int(sys.argv[4]), float(sys.argv[5]))
