"""Prometheus metrics of one broker (prometheus-client), and the endpoint that serves them.

No grpc here: the request pipeline, the CA and the audit ledger call the `observe_*`
functions; other features call the `record_*`/`set_*` functions below (names and labels are
documented in docs/observability.md). Every function is cheap and never raises into a request.

Several worker processes (`server.workers > 1`): the supervisor points every worker at one
directory through PROMETHEUS_MULTIPROC_DIR *before* it starts them (prometheus-client picks
its value store at import), each worker writes its samples there (mmap files), and the
supervisor alone serves `/metrics` with a `MultiProcessCollector` that adds them up: one
scrape target, counts and histograms summed over the workers, gauges as documented per metric.
One process: the endpoint serves the process's own registry.

Labels never carry a secret, a credential or a caller-chosen string of unbounded variety:
`method` is the gRPC method path (a fixed set), `code` a gRPC status name, the rest fixed
words chosen here or by the calling feature.
"""

from __future__ import annotations

import os
import shutil
import socket
import tempfile
import threading
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from time import perf_counter
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, make_server

from prometheus_client import (
    REGISTRY,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    make_wsgi_app,
)
from prometheus_client.exposition import ThreadingWSGIServer

__all__ = [
    "MULTIPROC_ENV",
    "MetricsServer",
    "Readiness",
    "mark_worker_dead",
    "multiprocess_dir",
    "observe_audit_write",
    "observe_rotation",
    "observe_rpc",
    "record_anomaly",
    "record_audit_forward_failure",
    "record_audit_forwarded",
    "record_audit_integrity_failure",
    "record_key_rotation",
    "record_refusal",
    "record_rotation",
    "record_sdk_cache",
    "serve_metrics",
    "set_active_leases",
    "set_audit_forward_lag",
    "set_key_age",
    "set_reaper_lag",
    "set_secrets_due",
    "timed",
]

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"

# Seconds: sub-millisecond answers up to the 150 ms SLO and past it, then timeouts.
_LATENCY_BUCKETS = (
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.0075,
    0.01,
    0.015,
    0.02,
    0.03,
    0.05,
    0.075,
    0.1,
    0.15,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
)
_ROTATION_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)

RPC_DURATION = Histogram(
    "broker_rpc_duration_seconds",
    "Time from a unary RPC's arrival to its answer (audit write included), by method and "
    "gRPC status code",
    ["method", "code"],
    buckets=_LATENCY_BUCKETS,
)
AUDIT_WRITE_DURATION = Histogram(
    "broker_audit_write_duration_seconds",
    "Time to commit one audit event (queued, sealed and written), by outcome",
    ["outcome"],
    buckets=_LATENCY_BUCKETS,
)
AUDIT_INTEGRITY_FAILURES = Counter(
    "broker_audit_integrity_failures",
    "Times the audit writer refused to append because the ledger's tail did not match its "
    "MACed head (a cut-off or rewritten ledger); any increase needs an operator",
)
ROTATION_DURATION = Histogram(
    "broker_ca_rotation_duration_seconds",
    "CA rotation runs by trigger (schedule, forced) and outcome (rotated, noop, error)",
    ["trigger", "outcome"],
    buckets=_ROTATION_BUCKETS,
)
ROTATIONS = Counter(
    "broker_rotation",
    "Credential rotations (broker_rotation_total) by kind (static-role, ...) and outcome "
    "(success, failure); the rotation-success SLO is success / (success + failure)",
    ["kind", "outcome"],
)
CREDENTIAL_ROTATION_DURATION = Histogram(
    "broker_rotation_duration_seconds",
    "Time one credential rotation took (intent, database, store), by kind and outcome",
    ["kind", "outcome"],
    buckets=_ROTATION_BUCKETS,
)
SECRETS_DUE = Gauge(
    "broker_secrets_due",
    "Secrets past their rotation period whose value comes from a third party (the broker "
    "cannot remake it): rotate them (broker secrets due lists them)",
    multiprocess_mode="livemax",
)
SDK_CACHE = Counter(
    "broker_sdk_cache_requests",
    "Client SDK cache look-ups by kind of credential and result (hit, miss); "
    "hit rate = hit / (hit + miss)",
    ["kind", "result"],
)
# KMS keys and KEKs (issue 16), set by the leader-held key lifecycle job at each pass.
KEY_AGE = Gauge(
    "broker_key_age_seconds",
    "Age of the oldest current key version, by kind (kms, kek), purpose and classification",
    ["kind", "purpose", "classification"],
    multiprocess_mode="livemax",
)
KEY_ROTATIONS = Counter(
    "broker_key_rotation_total",
    "Scheduled key rotations by kind (kms, kek) and outcome (success, failure)",
    ["kind", "outcome"],
)
ACTIVE_LEASES = Gauge(
    "broker_active_leases",
    "Leases not yet ended, by kind (e.g. database, secret), as last counted by the reaper",
    ["kind"],
    multiprocess_mode="livemostrecent",
)
REAPER_LAG = Gauge(
    "broker_reaper_lag_seconds",
    "How long past its expiry the oldest unrevoked expired lease was at the reaper's last pass",
    ["kind"],
    multiprocess_mode="livemostrecent",
)
IRREVOCABLE_LEASES = Gauge(
    "broker_leases_irrevocable",
    "Leases whose revocation failed repeatedly (their user may still log in); the reaper keeps "
    "retrying them with capped backoff. Alert on > 0",
    ["kind"],
    multiprocess_mode="livemostrecent",
)
ANOMALIES = Counter(
    "broker_anomalies",
    "Anomalies detected (e.g. unusual access pattern, denied burst), by kind",
    ["kind"],
)
REFUSALS = Counter(
    "broker_refusals",
    "Requests refused before authorization, by reason (rate_limit, unauthenticated); every "
    "one is counted here, while the audit ledger gets a sample per caller and interval",
    ["reason"],
)
AUDIT_FORWARD_LAG = Gauge(
    "broker_audit_forward_lag_entries",
    "Committed audit entries not yet delivered to a sink (newest seq - the sink's cursor), "
    "by sink, as seen by the process leading that sink's forwarder",
    ["sink"],
    multiprocess_mode="livemax",
)
AUDIT_FORWARDED = Counter(
    "broker_audit_forwarded_entries",
    "Audit entries delivered to a sink, by sink",
    ["sink"],
)
AUDIT_FORWARD_FAILURES = Counter(
    "broker_audit_forward_failures",
    "Batches a sink did not take (down, refused, wrong certificate), by sink; retried with backoff",
    ["sink"],
)


AGENT_STREAMS = Gauge(
    "broker_agent_streams",
    "Agents' sync streams (WatchAgent) open on this broker",
    multiprocess_mode="livesum",
)


def _safe(fn: Any, *args: Any) -> None:
    # Metrics must never fail a request or a job.
    try:
        fn(*args)
    except Exception:  # pragma: no cover - prometheus-client does not raise on these
        return


def observe_rpc(method: str, code: str, seconds: float) -> None:
    _safe(lambda: RPC_DURATION.labels(method, code).observe(seconds))


def observe_audit_write(seconds: float, ok: bool) -> None:
    _safe(lambda: AUDIT_WRITE_DURATION.labels("ok" if ok else "error").observe(seconds))


def record_audit_integrity_failure() -> None:
    _safe(AUDIT_INTEGRITY_FAILURES.inc)


def observe_rotation(trigger: str, outcome: str, seconds: float) -> None:
    _safe(lambda: ROTATION_DURATION.labels(trigger, outcome).observe(seconds))


def record_rotation(kind: str, outcome: str, seconds: float) -> None:
    """One credential rotation (`kind` e.g. "static-role"; `outcome` "success"/"failure")."""
    _safe(lambda: ROTATIONS.labels(kind, outcome).inc())
    _safe(lambda: CREDENTIAL_ROTATION_DURATION.labels(kind, outcome).observe(seconds))


def set_secrets_due(count: int) -> None:
    """How many third-party secrets are past due (the scheduled rotation job, each round)."""
    _safe(lambda: SECRETS_DUE.set(max(0, count)))


def record_sdk_cache(kind: str, hit: bool) -> None:
    """One SDK cache look-up (call it from the client SDK: hit or miss)."""
    _safe(lambda: SDK_CACHE.labels(kind, "hit" if hit else "miss").inc())


def set_key_age(kind: str, purpose: str, classification: str, seconds: float) -> None:
    """The age of the oldest current version among keys of one kind/purpose/classification."""
    _safe(lambda: KEY_AGE.labels(kind, purpose, classification).set(max(0.0, seconds)))


def record_key_rotation(kind: str, outcome: str) -> None:
    """One scheduled rotation by the key lifecycle job: outcome "success" or "failure"."""
    _safe(lambda: KEY_ROTATIONS.labels(kind, outcome).inc())


def set_active_leases(kind: str, count: int) -> None:
    """The number of live leases of one kind (the reaper counts them at each pass)."""
    _safe(lambda: ACTIVE_LEASES.labels(kind).set(count))


def set_reaper_lag(kind: str, seconds: float) -> None:
    """How far behind the reaper is: now - expiry of the oldest expired lease still to revoke
    (0 when it is up to date)."""
    _safe(lambda: REAPER_LAG.labels(kind).set(max(0.0, seconds)))


def set_irrevocable_leases(kind: str, count: int) -> None:
    """The number of irrevocable leases of one kind (the reaper counts them at each pass)."""
    _safe(lambda: IRREVOCABLE_LEASES.labels(kind).set(count))


def record_anomaly(kind: str) -> None:
    """One detected anomaly of a fixed kind (never a caller-supplied string)."""
    _safe(lambda: ANOMALIES.labels(kind).inc())


def record_refusal(reason: str) -> None:
    """One request refused before authorization, for a fixed reason (never a caller string)."""
    _safe(lambda: REFUSALS.labels(reason).inc())


@contextmanager
def timed() -> Iterator[list[float]]:
    """`with timed() as t: ...` then `t[0]` holds the elapsed seconds."""
    out: list[float] = [0.0]
    started = perf_counter()
    try:
        yield out
    finally:
        out[0] = perf_counter() - started


# -- the endpoint ----------------------------------------------------------------------------


@dataclass
class MetricsServer:
    """A running /metrics endpoint; `close()` stops it (and removes a multiprocess dir it
    made)."""

    host: str
    port: int
    _server: Any
    _thread: threading.Thread
    _owned_dir: Path | None = None

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(5)
        if self._owned_dir is not None:
            shutil.rmtree(self._owned_dir, ignore_errors=True)


def multiprocess_dir() -> Path:
    """Make an empty directory for the workers' samples and point PROMETHEUS_MULTIPROC_DIR at
    it (in this process's environment, which spawned workers inherit). Call before starting
    the workers."""
    path = Path(tempfile.mkdtemp(prefix="broker-metrics-"))
    os.environ[MULTIPROC_ENV] = str(path)
    return path


#: Why a broker is not ready, or nothing when it is (see `serve_metrics`).
Readiness = Callable[[], Sequence[str]]

_PLAIN = [  # copied per answer: wsgiref adds Content-Length to the list it is given
    ("Content-Type", "text/plain; charset=utf-8"),
    ("Cache-Control", "no-store"),
]


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        """Probes every few seconds would drown the log."""


def _endpoint(registry: CollectorRegistry, readiness: Readiness | None) -> Any:
    """The WSGI app: /healthz (alive: this thread answers), /readyz (200 when `readiness`
    names no reason, else 503 with the reasons), anything else prometheus-client's /metrics.
    None of them needs credentials, and none says more than whether and why not."""
    metrics_app = make_wsgi_app(registry)

    def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        path = environ.get("PATH_INFO", "")
        if path == "/healthz":
            start_response("200 OK", list(_PLAIN))
            return [b"ok\n"]
        if path == "/readyz":
            try:
                reasons = list(readiness()) if readiness is not None else []
            except Exception as exc:  # a probe must answer, whatever the check did
                reasons = [f"readiness check failed: {type(exc).__name__}"]
            if reasons:
                start_response("503 Service Unavailable", list(_PLAIN))
                return [("not ready: " + "; ".join(reasons) + "\n").encode()]
            start_response("200 OK", list(_PLAIN))
            return [b"ready\n"]
        result: Iterable[bytes] = metrics_app(environ, start_response)
        return result

    return app


def serve_metrics(
    listen: str, *, owned_dir: Path | None = None, readiness: Readiness | None = None
) -> MetricsServer:
    """Serve /metrics, /healthz and /readyz on HOST:PORT (port 0 picks one) from a daemon
    thread; `readiness` says why the broker is not ready (nothing: ready).

    With PROMETHEUS_MULTIPROC_DIR set, serves the sum of every process writing there;
    otherwise this process's own registry. Raises OSError when the address is taken.
    """
    host, _, port = listen.rpartition(":")
    host = host.strip("[]")
    registry: CollectorRegistry = REGISTRY
    if os.environ.get(MULTIPROC_ENV):
        from prometheus_client import multiprocess

        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)  # type: ignore[no-untyped-call]

    class Server(ThreadingWSGIServer):
        address_family = socket.AF_INET6 if ":" in host else socket.AF_INET

    server = make_server(
        host, int(port), _endpoint(registry, readiness), Server, handler_class=_QuietHandler
    )
    thread = threading.Thread(target=server.serve_forever, name="metrics", daemon=True)
    thread.start()
    return MetricsServer(host, int(server.server_address[1]), server, thread, owned_dir)


def mark_worker_dead(pid: int) -> None:
    """Drop a stopped worker's live gauges (multiprocess mode)."""
    if os.environ.get(MULTIPROC_ENV):
        from prometheus_client import multiprocess

        _safe(multiprocess.mark_process_dead, pid)


def set_audit_forward_lag(sink: str, entries: int) -> None:
    """Entries committed but not yet delivered to one configured sink."""
    _safe(lambda: AUDIT_FORWARD_LAG.labels(sink).set(max(0, entries)))


def record_audit_forwarded(sink: str, count: int) -> None:
    _safe(lambda: AUDIT_FORWARDED.labels(sink).inc(count))


def record_audit_forward_failure(sink: str) -> None:
    _safe(lambda: AUDIT_FORWARD_FAILURES.labels(sink).inc())


def set_agent_streams(count: int) -> None:
    """How many agents hold a sync stream on this process."""
    _safe(lambda: AGENT_STREAMS.set(count))
