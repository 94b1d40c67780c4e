"""broker.metrics: the config key and its env override, the endpoint, and multiprocess mode
(samples written by several processes are served summed by one endpoint)."""

from __future__ import annotations

import multiprocessing
import os
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from broker import metrics
from broker.config import Config, KeysConfig, ServerConfig, StorageConfig, apply_env
from broker.errors import InvalidArgument


def _config(**server: object) -> Config:
    return Config(
        trust_domain="example.org",
        data_dir=Path("/tmp/x"),
        storage=StorageConfig(dsn="sqlite:///tmp/x.db"),
        keys=KeysConfig(uri="software:"),
        server=ServerConfig(operators=("spiffe://example.org/broker/operator/op",), **server),  # type: ignore[arg-type]
    )


def _scrape(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as resp:
        return resp.read().decode()


def test_metrics_are_off_by_default_and_set_by_env() -> None:
    assert _config().server.metrics_listen == ""
    cfg = apply_env(_config(), {"BROKER_METRICS_LISTEN": "127.0.0.1:9464"})
    assert cfg.validate().server.metrics_listen == "127.0.0.1:9464"
    with pytest.raises(InvalidArgument, match="HOST:PORT"):
        apply_env(_config(), {"BROKER_METRICS_LISTEN": "9464"}).validate()


def test_endpoint_serves_this_process_registry() -> None:
    metrics.record_anomaly("unit-test-burst")
    metrics.set_active_leases("unit-test", 7)
    metrics.set_reaper_lag("unit-test", -3.0)  # never negative
    metrics.record_sdk_cache("unit-test", hit=True)
    metrics.record_sdk_cache("unit-test", hit=False)
    served = metrics.serve_metrics("127.0.0.1:0")
    try:
        text = _scrape(served.port)
    finally:
        served.close()
    assert 'broker_anomalies_total{kind="unit-test-burst"} 1.0' in text
    assert 'broker_active_leases{kind="unit-test"} 7.0' in text
    assert 'broker_reaper_lag_seconds{kind="unit-test"} 0.0' in text
    assert 'broker_sdk_cache_requests_total{kind="unit-test",result="hit"} 1.0' in text
    assert "broker_rpc_duration_seconds" in text  # declared even before the first RPC


def _worker(n: int) -> None:
    # A spawned process inherits PROMETHEUS_MULTIPROC_DIR from its parent's environment at
    # start, before anything imports prometheus-client: as a broker worker does.
    for _ in range(n):
        metrics.observe_rpc("/broker.v1.CertificateAuthority/MintJWTSVID", "OK", 0.002)


def test_multiprocess_mode_sums_the_workers(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(metrics.MULTIPROC_ENV, str(tmp_path))
    ctx = multiprocessing.get_context("spawn")
    procs = [ctx.Process(target=_worker, args=(n,)) for n in (3, 4)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    assert len(list(tmp_path.glob("histogram_*.db"))) == 2  # one file per worker
    served = metrics.serve_metrics("127.0.0.1:0")
    try:
        text = _scrape(served.port)
    finally:
        served.close()
    line = next(
        ln
        for ln in text.splitlines()
        if ln.startswith("broker_rpc_duration_seconds_count{")
        and 'code="OK"' in ln
        and "MintJWTSVID" in ln
    )
    assert line.endswith(" 7.0")


def test_multiprocess_dir_is_fresh_and_exported(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(metrics.MULTIPROC_ENV, raising=False)
    path = metrics.multiprocess_dir()
    try:
        assert os.environ[metrics.MULTIPROC_ENV] == str(path)
        assert path.is_dir() and not any(path.iterdir())
    finally:
        monkeypatch.delenv(metrics.MULTIPROC_ENV)
        path.rmdir()


def _probe(port: int, path: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=10) as resp:
            return resp.status, resp.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def test_probes_beside_metrics_need_no_credentials(monkeypatch: pytest.MonkeyPatch) -> None:
    """/healthz: alive; /readyz: 200 when no reason is given, 503 with the reasons otherwise;
    a readiness check that raises is a reason, not a crash of the endpoint."""
    monkeypatch.delenv(metrics.MULTIPROC_ENV, raising=False)  # this process's registry
    reasons: list[str] = []
    served = metrics.serve_metrics("127.0.0.1:0", readiness=lambda: reasons)
    try:
        assert _probe(served.port, "/healthz") == (200, "ok\n")
        assert _probe(served.port, "/readyz") == (200, "ready\n")
        reasons.extend(["shutting down", "audit ledger failed its integrity check"])
        assert _probe(served.port, "/readyz") == (
            503,
            "not ready: shutting down; audit ledger failed its integrity check\n",
        )
        assert _probe(served.port, "/healthz") == (200, "ok\n")  # alive all the same
        assert "broker_rpc_duration_seconds" in _scrape(served.port)
    finally:
        served.close()

    def broken() -> list[str]:
        raise RuntimeError("boom")

    served = metrics.serve_metrics("127.0.0.1:0", readiness=broken)
    try:
        status, text = _probe(served.port, "/readyz")
    finally:
        served.close()
    assert (status, text) == (503, "not ready: readiness check failed: RuntimeError\n")
