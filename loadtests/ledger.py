"""Audit ledger append throughput: SQLite storage, the audit MAC key in a SoftHSM2 token.

    python -m loadtests.ledger [--entries 20000] [--concurrency 32] [--software]

Appends `--entries` events through `AuditLedger.record`, `--concurrency` requests in flight at a
time (so the writer commits them in groups, as under load), and prints entries per second, the
number of committed groups, the HSM MAC calls made per group and the process CPU time per entry
(steadier than wall time on a shared machine). Everything lives in a temporary
directory (its own SoftHSM2 configuration and token) removed at the end.
"""

from __future__ import annotations

import argparse
import asyncio
import secrets
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from broker.audit import AuditLedger
from broker.storage.factory import open_storage
from ca.keys import KeyBackend, SoftwareBackend
from ca.keys.backend import mac_signer

__all__ = ["main"]


class _CountingKeys:
    """Counts and times `mac` calls on a key backend; everything else is passed through."""

    def __init__(self, inner: KeyBackend) -> None:
        self._inner = inner
        self.macs = 0
        self.mac_seconds = 0.0

    def mac(self, label: str, data: bytes) -> bytes:
        self.macs += 1
        started = time.perf_counter()
        try:
            return mac_signer(self._inner).mac(label, data)
        finally:
            self.mac_seconds += time.perf_counter() - started

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)


def _softhsm_backend(directory: Path) -> KeyBackend:
    from broker.softhsm import SOFTHSM_MODULE, configure_process, init_token, write_config
    from ca.keys.pkcs11 import Pkcs11Backend

    configure_process(write_config(directory))
    pin = secrets.token_hex(8).encode()
    init_token(directory, "ledger-bench", pin, secrets.token_hex(8).encode())
    return Pkcs11Backend("ledger-bench", pin, module_path=SOFTHSM_MODULE)


async def _run(directory: Path, entries: int, concurrency: int, software: bool) -> dict[str, Any]:
    keys = _CountingKeys(SoftwareBackend() if software else _softhsm_backend(directory / "hsm"))
    storage = await open_storage(f"sqlite:///{directory / 'broker.db'}")
    await storage.migrate()
    ledger = AuditLedger(storage, keys)  # type: ignore[arg-type]
    await _prepare(ledger)
    ledger.start()
    before, mac_before = keys.macs, keys.mac_seconds
    groups_before = await _groups(storage)
    event = {"who": "spiffe://bench/ns/default/sa/web", "what": "svid.mint", "outcome": "OK"}
    started, cpu_started = time.perf_counter(), time.process_time()
    done = 0
    while done < entries:
        batch = min(concurrency, entries - done)
        await asyncio.gather(*(ledger.record({**event, "n": done + i}) for i in range(batch)))
        done += batch
    await ledger.drain()
    elapsed = time.perf_counter() - started
    cpu = time.process_time() - cpu_started
    macs = keys.macs - before
    mac_seconds = keys.mac_seconds - mac_before
    groups = await _groups(storage) - groups_before
    verify_started = time.perf_counter()
    result = await ledger.verify()
    verify_seconds = time.perf_counter() - verify_started
    await ledger.stop()
    await storage.close()
    keys.close()
    return {
        "entries": entries,
        "concurrency": concurrency,
        "seconds": elapsed,
        "entries_per_second": entries / elapsed,
        "cpu_us_per_entry": cpu / entries * 1e6,
        "groups": groups,
        "hsm_macs_per_group": macs / groups if groups else 0.0,
        "hsm_mac_us_per_group": mac_seconds / groups * 1e6 if groups else 0.0,
        "verify_intact": result.intact,
        "verify_seconds": verify_seconds,
    }


async def _prepare(ledger: AuditLedger) -> None:
    # The ledger's own start-up step: older versions have `ensure_key`, newer ones `open`.
    opener = getattr(ledger, "open", None)
    if opener is not None:
        await opener()
    else:
        ledger.ensure_key()


async def _groups(storage: Any) -> int:
    count = 0
    after = 0
    while True:
        records = await storage.read_audit(after_seq=after, limit=5000)
        if not records:
            return count
        count += sum(1 for r in records if r.mac)
        after = records[-1].seq


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m loadtests.ledger", description=__doc__)
    parser.add_argument("--entries", type=int, default=20000)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--software", action="store_true", help="software MAC key, no SoftHSM2")
    args = parser.parse_args(argv)
    if args.entries < 1 or args.concurrency < 1:
        print("ledger: --entries and --concurrency must be positive", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory(prefix="ledger-bench-") as tmp:
        report = asyncio.run(_run(Path(tmp), args.entries, args.concurrency, args.software))
    print(
        f"{report['entries']} entries, concurrency {report['concurrency']}: "
        f"{report['entries_per_second']:,.0f} entries/s ({report['seconds']:.2f} s, "
        f"{report['cpu_us_per_entry']:.0f} us CPU per entry), "
        f"{report['groups']} groups, {report['hsm_macs_per_group']:.2f} HSM MACs per group "
        f"({report['hsm_mac_us_per_group']:.0f} us); "
        f"verify {'intact' if report['verify_intact'] else 'BROKEN'} "
        f"in {report['verify_seconds']:.2f} s"
    )
    return 0 if report["verify_intact"] else 1


if __name__ == "__main__":
    sys.exit(main())
