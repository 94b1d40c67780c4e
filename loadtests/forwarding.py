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

import datetime as dt
import json
import shutil
import statistics
import subprocess
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


def _ca_and_server_cert(root: Path) -> tuple[Path, Path, Path]:
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    now = dt.datetime.now(dt.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "loadtests rsyslog CA")])
    ca = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(False, False, False, False, False, True, True, False, False), True
        )
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")]))
        .issuer_name(ca_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
            ),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .sign(ca_key, hashes.SHA256())
    )
    pem = serialization.Encoding.PEM
    paths = root / "ca.pem", root / "cert.pem", root / "key.pem"
    paths[0].write_bytes(ca.public_bytes(pem))
    paths[1].write_bytes(cert.public_bytes(pem))
    paths[2].write_bytes(
        key.private_bytes(pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    paths[2].chmod(0o600)
    return paths


class LocalRsyslog:
    """rsyslogd in the foreground with a TLS-only imtcp input on a free loopback port, writing
    each message's MSG (one forwarded record) as a line of `out`; a Direct main queue and
    omfile flushing per transaction, as the broker's own rsyslog tests run it."""

    def __init__(self, root: Path) -> None:
        self.root = root
        root.mkdir(parents=True, exist_ok=True)
        self.port = procs.free_port()
        self.url = f"syslog+tls://127.0.0.1:{self.port}"
        self.out = root / "received.log"
        self.ca_file, cert, key = _ca_and_server_cert(root)
        (root / "work").mkdir(exist_ok=True)
        self.conf = root / "rsyslog.conf"
        self.conf.write_text(
            f"""global(
  workDirectory="{root / "work"}"
  maxMessageSize="256k"
  defaultNetstreamDriver="gtls"
  defaultNetstreamDriverCAFile="{self.ca_file}"
  defaultNetstreamDriverCertFile="{cert}"
  defaultNetstreamDriverKeyFile="{key}"
)
main_queue(queue.type="Direct")
module(load="imtcp" streamDriver.name="gtls" streamDriver.mode="1" streamDriver.authMode="anon")
input(type="imtcp" address="127.0.0.1" port="{self.port}")
template(name="msgonly" type="string" string="%msg%\\n")
action(type="omfile" file="{self.out}" template="msgonly" flushOnTXEnd="on" asyncWriting="off")
"""
        )
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 20.0) -> None:
        binary = shutil.which("rsyslogd") or "/usr/sbin/rsyslogd"
        if not Path(binary).exists():
            raise procs.StartupError("rsyslogd is not installed (apt-get install rsyslog-gnutls)")
        log = (self.root / "rsyslogd.log").open("ab")
        self.proc = subprocess.Popen(
            [binary, "-n", "-f", str(self.conf), "-i", str(self.root / "rsyslogd.pid")],
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        deadline = time.monotonic() + timeout
        import socket

        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                text = (self.root / "rsyslogd.log").read_text(errors="replace")[-2000:]
                raise procs.StartupError(f"rsyslogd exited: {text}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.5):
                    return
            except OSError:
                time.sleep(0.05)
        raise procs.StartupError("rsyslogd did not listen")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self.proc = None

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
