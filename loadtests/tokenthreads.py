"""``python -m loadtests.tokenthreads``: ECDSA signatures per second from several threads
through `Pkcs11Backend` on a fresh SoftHSM2 token, for several session-pool sizes.

Measures what the pool buys (or costs) with the module in process; see docs/keys.md. Not a
test: numbers depend on the machine and its load.
"""

from __future__ import annotations

import argparse
import os
import secrets
import tempfile
import threading
import time
from pathlib import Path

from broker.softhsm import configure_process, init_token
from ca.keys import KeyKind
from ca.keys.pkcs11 import Pkcs11Backend
from loadtests.durations import seconds


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--sessions", default="1,2,4,8", help="pool sizes to try")
    p.add_argument("--threads", type=int, default=8)
    p.add_argument("--seconds", type=seconds, default=3.0)
    p.add_argument("--rounds", type=int, default=2)
    args = p.parse_args()
    with tempfile.TemporaryDirectory(prefix="tokenthreads-") as tmp:
        pin = secrets.token_hex(8).encode()
        configure_process(init_token(Path(tmp), "bench", pin, secrets.token_hex(8).encode()))
        for _ in range(args.rounds):
            for sessions in (int(s) for s in args.sessions.split(",")):
                backend = Pkcs11Backend("bench", pin, sessions=sessions)
                try:
                    if not backend.has_key("k"):
                        backend.create_key("k", KeyKind.EC_P256)
                    print(
                        f"sessions={sessions}: {_rate(backend, args):,.0f} signatures/s "
                        f"({args.threads} threads, thread-safe module: {backend.thread_safe})"
                    )
                finally:
                    backend.close()


def _rate(backend: Pkcs11Backend, args: argparse.Namespace) -> float:
    digest = os.urandom(32)
    stop = time.monotonic() + args.seconds
    counts = [0] * args.threads

    def work(i: int) -> None:
        while time.monotonic() < stop:
            backend._sign_digest("k", digest)
            counts[i] += 1

    threads = [threading.Thread(target=work, args=(i,)) for i in range(args.threads)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return sum(counts) / float(args.seconds)


if __name__ == "__main__":
    main()
