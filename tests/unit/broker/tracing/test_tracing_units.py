"""broker.tracing without a server: the [tracing] config and its environment, the key-backend
wrapper offering exactly the wrapped backend's powers, spans only inside a request, the
storage summary holding no values, and correlation ids as trace ids."""

from __future__ import annotations

import asyncio
import concurrent.futures
import datetime as dt
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from opentelemetry import trace
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from broker.config import config_from_document
from broker.errors import InvalidArgument
from broker.tracing.provider import Tracing, open_tracing
from broker.tracing.settings import TracingConfig, tracing_config, tracing_env
from broker.tracing.storage import _summary
from ca.errors import CapabilityMissing
from ca.keys import KeyKind
from ca.keys.backend import data_key_wrapper, mac_signer
from ca.keys.executor import token_call
from ca.keys.software import SoftwareBackend
from tests.unit.ca.keys.test_backend import SignOnly

BASE = {
    "trust_domain": "example.org",
    "storage": {"dsn": "sqlite:///x.db"},
    "keys": {"uri": "software:"},
}


@pytest.fixture
def exporter() -> InMemorySpanExporter:
    return InMemorySpanExporter()


@pytest.fixture
def tracing(exporter: InMemorySpanExporter) -> Iterator[Tracing]:
    tracing = open_tracing(TracingConfig(endpoint="http://127.0.0.1:1"), exporter)
    yield tracing
    tracing.close()


def spans(tracing: Tracing, exporter: InMemorySpanExporter) -> list[str]:
    tracing.provider.force_flush()
    return [s.name for s in exporter.get_finished_spans()]


def test_the_tracing_table_is_read_and_checked(tmp_path: Path) -> None:
    config = config_from_document(
        {
            **BASE,
            "tracing": {
                "endpoint": "https://otel.example.net:4317",
                "ca_file": "otel-ca.pem",
                "sample_ratio": 0.25,
                "service_name": "broker-eu",
                "timeout": "3s",
            },
        },
        tmp_path,
    )
    t = config.tracing
    assert t.enabled and not t.insecure and t.ca_file == tmp_path / "otel-ca.pem"
    assert t.sample_ratio == 0.25 and t.service_name == "broker-eu"
    assert t.timeout == dt.timedelta(seconds=3)
    assert not config_from_document(BASE, tmp_path).tracing.enabled  # off by default


@pytest.mark.parametrize(
    ("table", "message"),
    [
        ({"endpoint": "grpc://collector:4317"}, "http://HOST:PORT or https://HOST:PORT"),
        ({"endpoint": "http://user:pw@collector:4317"}, "must not carry credentials"),
        ({"endpoint": "http://collector:port"}, "invalid port"),
        ({"sample_ratio": 1.5}, "between 0 and 1"),
        ({"sample_ratio": "all"}, "between 0 and 1"),
        ({"headers": "x"}, "unknown key 'headers'"),
        ({"timeout": "soon"}, "tracing.timeout"),
    ],
)
def test_bad_tracing_tables_are_refused(table: dict[str, object], message: str) -> None:
    with pytest.raises(InvalidArgument, match=message):
        tracing_config(table, Path("."))


def test_the_environment_decides_the_endpoint() -> None:
    none = TracingConfig()
    filed = TracingConfig(endpoint="http://file:4317")
    assert tracing_env(none, {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://std:4317"}).endpoint == (
        "http://std:4317"
    )
    assert tracing_env(none, {"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://t:1"}).endpoint == (
        "http://t:1"
    )
    # the config file beats the generic standard variable; BROKER_OTLP_ENDPOINT beats both
    assert tracing_env(filed, {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://std:4317"}) == filed
    env = {"BROKER_OTLP_ENDPOINT": "http://b:4317", "OTEL_EXPORTER_OTLP_ENDPOINT": "http://s:1"}
    assert tracing_env(filed, env).endpoint == "http://b:4317"
    assert not tracing_env(filed, {"OTEL_SDK_DISABLED": "true"}).enabled
    with pytest.raises(InvalidArgument):
        tracing_env(none, {"BROKER_OTLP_ENDPOINT": "collector:4317"})


def test_the_key_wrapper_has_exactly_the_powers_of_the_backend(tracing: Tracing) -> None:
    bare = tracing.keys(SignOnly())  # type: ignore[arg-type]
    with pytest.raises(CapabilityMissing):
        mac_signer(bare)
    with pytest.raises(CapabilityMissing):
        data_key_wrapper(bare)
    soft = tracing.keys(SoftwareBackend())
    assert mac_signer(soft) is soft and data_key_wrapper(soft) is soft


def test_key_spans_are_made_inside_a_request_only(
    tracing: Tracing, exporter: InMemorySpanExporter
) -> None:
    keys = tracing.keys(SoftwareBackend())
    keys.create_key("notify", KeyKind.HMAC_SHA256)
    keys.create_key("ca", KeyKind.EC_P256)
    mac_signer(keys).mac("notify", b"outside")
    assert spans(tracing, exporter) == []  # no orphan trace for work outside a request
    with tracing.tracer.start_as_current_span("request"):
        tag = mac_signer(keys).mac("notify", b"inside")
        signature = keys.signer("ca").sign(b"tbs", ec.ECDSA(hashes.SHA256()))
    keys.public_key("ca").verify(signature, b"tbs", ec.ECDSA(hashes.SHA256()))
    assert len(tag) == 32
    tracing.provider.force_flush()
    finished = {s.name: s for s in exporter.get_finished_spans()}
    assert set(finished) == {"hsm.mac", "hsm.sign", "request"}
    request = finished["request"]
    assert request.context is not None
    for name in ("hsm.mac", "hsm.sign"):
        parent = finished[name].parent
        assert parent is not None and parent.span_id == request.context.span_id
    assert (finished["hsm.mac"].attributes or {})["broker.key.label"] == "notify"


def test_token_calls_on_the_backends_threads_keep_the_requests_trace(
    tracing: Tracing, exporter: InMemorySpanExporter
) -> None:
    inner = SoftwareBackend()
    inner.create_key("notify", KeyKind.HMAC_SHA256)
    pool = concurrent.futures.ThreadPoolExecutor(1)
    inner.executor = pool  # type: ignore[attr-defined]  # as Pkcs11Backend has
    keys = tracing.keys(inner)
    thread_names: list[str] = []

    def mac() -> bytes:
        thread_names.append(threading.current_thread().name)
        return mac_signer(keys).mac("notify", b"x")

    async def main() -> None:
        with tracing.tracer.start_as_current_span("request"):
            await token_call(keys, mac)

    asyncio.run(main())
    pool.shutdown()
    assert thread_names and thread_names[0] != threading.current_thread().name
    tracing.provider.force_flush()
    finished = {s.name: s for s in exporter.get_finished_spans()}
    parent = finished["hsm.mac"].parent
    assert parent is not None and finished["request"].context is not None
    assert parent.span_id == finished["request"].context.span_id


@pytest.mark.parametrize(
    ("sql", "summary"),
    [
        ("SELECT value FROM secrets WHERE ref_hash = ?", ("SELECT", "secrets")),
        ("INSERT INTO audit (seq, event) VALUES (?, ?)", ("INSERT", "audit")),
        ("UPDATE leases SET state = ? WHERE id = ?", ("UPDATE", "leases")),
        ("DELETE FROM grants WHERE expires_at < ?", ("DELETE", "grants")),
        ("BEGIN IMMEDIATE", ("BEGIN", "")),
    ],
)
def test_a_storage_span_names_the_statement_by_verb_and_table(
    sql: str, summary: tuple[str, str]
) -> None:
    assert _summary(sql) == summary


def test_a_correlation_id_shaped_like_a_trace_id_is_the_new_traces_id(tracing: Tracing) -> None:
    from broker.tracing.server import RequestSpans

    wanted = "4bf92f3577b34da6a3ce929d0e0e4736"
    with RequestSpans(tracing.tracer).serve("/svc/M", {}, wanted) as call:
        assert call.correlation_id == wanted
        assert format(trace.get_current_span().get_span_context().trace_id, "032x") == wanted
    with RequestSpans(tracing.tracer).serve("/svc/M", {}, "") as call:
        assert len(call.correlation_id) == 32 and call.correlation_id != wanted
