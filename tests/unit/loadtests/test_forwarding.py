"""`run --forward`: the sink handed to the dev broker through BROKER_AUDIT_SINKS is one the
broker's config accepts, and refuses what it would refuse; the sink's figures are read from
the broker's /metrics text."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path
from typing import Any

import pytest

from broker.config import apply_env, config_from_document
from broker.errors import InvalidArgument
from loadtests.cli import _resolve, build_parser
from loadtests.forwarding import SINK, scrape_sink, sinks_env

BASE = {"trust_domain": "e.org", "storage": {"dsn": "sqlite:///x.db"}, "keys": {"uri": "software:"}}


def test_the_sink_reaches_the_broker_config_through_the_environment(tmp_path: Path) -> None:
    config = config_from_document(BASE, tmp_path)
    env = sinks_env("syslog+tls://127.0.0.1:6514", tmp_path / "ca.pem")
    (sink,) = apply_env(config, env).audit.sinks
    assert sink.name == SINK and sink.url == "syslog+tls://127.0.0.1:6514"
    assert sink.ca_file == tmp_path / "ca.pem"
    assert apply_env(config, {"BROKER_AUDIT_SINKS": ""}).audit.sinks == ()


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ('siem = { url = "tcp://10.0.0.1:514" }', "must start with syslog"),
        ('siem = { url = "syslog+tls://siem" }', "a port"),
        ("siem = {", "not TOML"),
        ('Bad_Name = { url = "https://x" }', "must match"),
    ],
)
def test_a_bad_sink_in_the_environment_is_refused(value: str, message: str) -> None:
    config = config_from_document(BASE, Path("."))
    with pytest.raises(InvalidArgument, match=message):
        apply_env(config, {"BROKER_AUDIT_SINKS": value})


def test_forward_is_refused_with_a_running_server_or_an_unknown_kind() -> None:
    parser = build_parser()
    for argv in (
        ["run", "--scenario", "mixed", "--report", "/tmp/x", "--forward", "tcp://x:1"],
        [
            "run", "--scenario", "mixed", "--report", "/tmp/x", "--forward", "syslog+tls",
            "--server", "127.0.0.1:8443", "--data-dir", "/tmp/d",
        ],
    ):  # fmt: skip
        with pytest.raises(SystemExit, match="--forward"):
            _resolve(parser.parse_args(argv))


METRICS = b"""# TYPE broker_audit_forward_lag_entries gauge
broker_audit_forward_lag_entries{sink="loadtest"} 42.0
broker_audit_forward_lag_entries{sink="other"} 7.0
# TYPE broker_audit_forwarded_entries_total counter
broker_audit_forwarded_entries_total{sink="loadtest"} 1500.0
# TYPE broker_audit_forward_failures_total counter
broker_audit_forward_failures_total{sink="loadtest"} 2.0
"""


@pytest.fixture
def metrics_url() -> Iterator[str]:
    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(200)
            self.end_headers()
            self.wfile.write(METRICS)

        def log_message(self, *args: Any) -> None:
            pass

    server = HTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/metrics"
    finally:
        server.shutdown()
        server.server_close()


def test_the_sinks_lag_and_counts_are_read_from_metrics(metrics_url: str) -> None:
    assert scrape_sink(metrics_url) == (42.0, 1500.0, 2.0)
    assert scrape_sink(metrics_url, "other") == (7.0, 0.0, 0.0)
