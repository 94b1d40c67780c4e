"""Audit forwarding under load (`run --forward`): the dev broker forwards its ledger to a
syslog+tls sink while the scenario runs, and the run's notes get how fast entries reached the
sink and how far behind it was.

    --forward syslog+tls            start a local rsyslog (Debian rsyslog + rsyslog-gnutls) with
                                    a TLS input on a free loopback port and a CA of its own
    --forward syslog+tls://H:P      an existing receiver (--forward-ca FILE: its CA)
    --forward https://...           an existing JSON-lines webhook

The sink (named `loadtest`) reaches the broker through BROKER_AUDIT_SINKS. `ForwardWatch`
samples the broker's /metrics every `every` seconds from the window's start:
`broker_audit_forward_lag_entries{sink="loadtest"}` (committed entries not yet confirmed
delivered) and `broker_audit_forwarded_entries_total` (delivered); after the window it keeps
sampling until the lag is 0 (the drain). A local rsyslog also says how many records it wrote.
"""

from __future__ import annotations

import json
import shutil
import statistics
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any

from loadtests import procs

__all__ = ["SINK", "ForwardWatch", "LocalRsyslog", "sinks_env"]

SINK = "loadtest"


def sinks_env(url: str, ca_file: Path | None) -> dict[str, str]:
    """BROKER_AUDIT_SINKS for one sink named `loadtest` (TOML, see broker.config)."""
    table = f"url = {json.dumps(url)}"
    if ca_file is not None:
        table += f", ca_file = {json.dumps(str(ca_file))}"
    return {"BROKER_AUDIT_SINKS": f"{SINK} = {{ {table} }}"}


class LocalRsyslog:
    """The tests' rsyslog (`tests.fixtures.rsyslog.RsyslogServer`, as `tests/fixtures/` also
    gives the load tests their databases): rsyslogd in the foreground with a TLS-only imtcp
    input on a free loopback port and a CA of its own, writing each message's MSG (one
    forwarded record) as a line of `out`."""

    def __init__(self, root: Path) -> None:
        from tests.fixtures.rsyslog import RsyslogServer

        root.mkdir(parents=True, exist_ok=True)
        self._server = RsyslogServer(root)
        self.root = root
        self.port = self._server.port
        self.url = f"syslog+tls://127.0.0.1:{self.port}"
        self.out = self._server.out
        self.ca_file = self._server.ca_file

    def start(self, timeout: float = 20.0) -> None:
        if shutil.which("rsyslogd") is None and not Path("/usr/sbin/rsyslogd").exists():
            raise procs.StartupError("rsyslogd is not installed (apt-get install rsyslog-gnutls)")
        try:
            self._server.start(timeout)
        except RuntimeError as exc:
            raise procs.StartupError(str(exc)) from None

    def stop(self) -> None:
        self._server.stop()

    def received(self) -> tuple[int, int]:
        """(records written, distinct seqs among them)."""
        if not self.out.exists():
            return 0, 0
        seqs = set()
        count = 0
        for line in self.out.read_text(errors="replace").splitlines():
            line = line.strip()
            if not line:
                continue
            count += 1
            try:
                seqs.add(int(json.loads(line)["seq"]))
            except (ValueError, KeyError, TypeError):
                continue
        return count, len(seqs)


def scrape_sink(url: str, sink: str = SINK, timeout: float = 5.0) -> tuple[float, float, float]:
    """(lag entries, forwarded total, failures total) of `sink` from a /metrics endpoint."""
    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(url, timeout=timeout) as resp:  # loopback, our own broker
        text = resp.read().decode()
    lag = forwarded = failures = 0.0
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.labels.get("sink") != sink:
                continue
            if s.name == "broker_audit_forward_lag_entries":
                lag = s.value
            elif s.name == "broker_audit_forwarded_entries_total":
                forwarded = s.value
            elif s.name == "broker_audit_forward_failures_total":
                failures = s.value
    return lag, forwarded, failures


class ForwardWatch:
    """Samples the sink's lag and delivered count from the window's start (see the module
    docstring); `finish()` after the window returns the figures for the run's notes."""

    def __init__(self, metrics_url: str, every: float = 0.2, drain_limit: float = 60.0) -> None:
        self._url = metrics_url
        self._every = every
        self._drain_limit = drain_limit
        self._stop = threading.Event()
        self._samples: list[tuple[float, float, float, float]] = []  # t, lag, fwd, failures
        self._thread = threading.Thread(target=self._run, name="forward-watch", daemon=True)
        self._started = time.monotonic()
        self._thread.start()

    def _sample(self) -> tuple[float, float, float, float] | None:
        try:
            lag, forwarded, failures = scrape_sink(self._url)
        except OSError:
            return None
        return time.monotonic() - self._started, lag, forwarded, failures

    def _run(self) -> None:
        while not self._stop.is_set():
            sample = self._sample()
            if sample is not None:
                self._samples.append(sample)
            self._stop.wait(self._every)

    def finish(self) -> dict[str, Any]:
        self._stop.set()
        self._thread.join(5)
        window = [s for s in self._samples]
        ended = time.monotonic() - self._started
        drain_start = time.monotonic()
        drained_after: float | None = None
        last = self._sample()
        while last is not None and time.monotonic() - drain_start < self._drain_limit:
            if last[1] <= 0:
                drained_after = time.monotonic() - drain_start
                break
            time.sleep(self._every)
            last = self._sample()
        if not window:
            return {"error": "no /metrics sample"}
        lags = [s[1] for s in window]
        first, final = window[0], window[-1]
        seconds = max(1e-9, final[0] - first[0])
        forwarded = final[2] - first[2]
        return {
            "sink": SINK,
            "samples": len(window),
            "sample_every_s": self._every,
            "window_s": round(ended, 2),
            "forwarded_entries": int(forwarded),
            "forwarded_per_s": round(forwarded / seconds, 1),
            "lag_entries_max": int(max(lags)),
            "lag_entries_median": statistics.median(lags),
            "lag_entries_p95": sorted(lags)[min(len(lags) - 1, int(0.95 * len(lags)))],
            "failures": int(final[3] - first[3]),
            "drained_after_s": None if drained_after is None else round(drained_after, 2),
            "forwarded_total_after_drain": None if last is None else int(last[2]),
        }
