"""Traces through the real pipeline, in process: one SERVER span per RPC whose trace id is the
ledger's correlation id (a caller's W3C traceparent continued, a trace-shaped x-correlation-id
adopted), child spans for storage and the key backend under it, `secret.ref_sha256` and never
the reference or the value in any attribute; refusals traced with their status and caller;
and without tracing, a caller's traceparent still names the call in the ledger."""

from __future__ import annotations

import asyncio
import hashlib
import os
import threading
from collections.abc import Iterator
from typing import Any

import grpc
import pytest
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export import SpanExporter, SpanExportResult
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from broker.api._proto import ca_pb2, secrets_pb2, secrets_pb2_grpc
from broker.tracing.provider import Tracing, open_tracing
from broker.tracing.settings import TracingConfig

from .conftest import CORRELATION_HEADER, BrokerFactory, BrokerHarness

REF = "secret://payments/prod/stripe/api-key"
OWNER = "spiffe://example.org/default/prod/payments"
STRANGER = "spiffe://example.org/default/prod/web"
GET = "broker.v1.Secrets/Get"


@pytest.fixture
def exporter() -> Iterator[InMemorySpanExporter]:
    exporter = InMemorySpanExporter()
    yield exporter
    exporter.shutdown()


@pytest.fixture
def tracing(exporter: InMemorySpanExporter) -> Iterator[Tracing]:
    tracing = open_tracing(TracingConfig(endpoint="http://127.0.0.1:1"), exporter)
    yield tracing
    tracing.close()


@pytest.fixture
async def traced(broker_factory: BrokerFactory, tracing: Tracing) -> BrokerHarness:
    return await broker_factory(tracing=tracing)


def finished(tracing: Tracing, exporter: InMemorySpanExporter) -> list[ReadableSpan]:
    tracing.provider.force_flush()
    return list(exporter.get_finished_spans())


def hexid(value: int, width: int = 32) -> str:
    return format(value, f"0{width}x")


def texts(span: ReadableSpan) -> str:
    parts = [span.name, str(span.status.description or "")]
    parts += [f"{k}={v}" for k, v in (span.attributes or {}).items()]
    for event in span.events:
        parts.append(event.name)
        parts += [f"{k}={v}" for k, v in (event.attributes or {}).items()]
    return "\n".join(parts)


def descendants(spans: list[ReadableSpan], root: ReadableSpan) -> list[ReadableSpan]:
    assert root.context is not None
    ids = {root.context.span_id}
    out: list[ReadableSpan] = []
    grew = True
    while grew:
        grew = False
        for span in spans:
            if span.parent is not None and span.parent.span_id in ids and span not in out:
                assert span.context is not None
                ids.add(span.context.span_id)
                out.append(span)
                grew = True
    return out


async def put_secret(broker: BrokerHarness) -> bytes:
    value = f"whsec_{os.urandom(16).hex()}".encode()
    await secrets_pb2_grpc.SecretsStub(broker.channel(broker.operator)).Put(
        secrets_pb2.PutSecretRequest(
            reference=REF,
            value=value,
            owner="payments",
            classification="confidential",
            rotation_period_seconds=90 * 86400,
        )
    )
    return value


async def test_a_secret_get_continues_the_callers_trace_with_storage_and_hsm_spans_under_it(
    traced: BrokerHarness, tracing: Tracing, exporter: InMemorySpanExporter
) -> None:
    value = await put_secret(traced)
    trace_id, parent_id = os.urandom(16).hex(), os.urandom(8).hex()
    owner = traced.identity(OWNER)
    stub = secrets_pb2_grpc.SecretsStub(traced.channel(owner))
    response = await stub.Get(
        secrets_pb2.GetSecretRequest(reference=REF),
        metadata=(("traceparent", f"00-{trace_id}-{parent_id}-01"),),
    )
    assert response.value == value

    event = await traced.event_for(trace_id)  # the ledger's correlation id is the trace id
    assert event["method"] == "/" + GET and event["decision"] == "allow"
    spans = finished(tracing, exporter)
    servers = [s for s in spans if s.name == GET]
    assert len(servers) == 1
    server = servers[0]
    assert server.context is not None and server.parent is not None
    assert hexid(server.context.trace_id) == trace_id
    assert hexid(server.parent.span_id, 16) == parent_id  # continued, not a new trace
    attributes = dict(server.attributes or {})
    assert attributes["rpc.system"] == "grpc"
    assert attributes["rpc.service"] == "broker.v1.Secrets"
    assert attributes["rpc.method"] == "Get"
    assert attributes["rpc.grpc.status_code"] == 0 and attributes["broker.status"] == "OK"
    assert attributes["broker.caller.spiffe_id"] == OWNER
    assert attributes["broker.decision"] == "allow"
    assert attributes["secret.ref_sha256"] == hashlib.sha256(REF.encode()).hexdigest()

    under = descendants(spans, server)
    names = {s.name for s in under}
    assert "storage.read" in names or "storage.write" in names, names
    assert "hsm.unwrap" in names or "hsm.mac" in names, names  # the data key, the row MAC
    assert "audit.record" in names, names
    assert all(hexid(s.context.trace_id) == trace_id for s in under if s.context)
    storage = next(s for s in under if s.name.startswith("storage."))
    assert (storage.attributes or {})["db.system.name"] == "sqlite"

    # Nothing anywhere in the trace names the secret or holds its value.
    for span in [server, *under]:
        text = texts(span)
        assert REF not in text and "stripe" not in text, span.name
        assert value.decode() not in text, span.name


async def test_a_trace_shaped_correlation_id_becomes_the_trace_id_and_a_new_call_gets_its_own(
    traced: BrokerHarness, tracing: Tracing, exporter: InMemorySpanExporter
) -> None:
    ca = traced.ca()
    wanted = os.urandom(16).hex()
    await ca.GetStatus(ca_pb2.GetStatusRequest(), metadata=((CORRELATION_HEADER, wanted),))
    call = ca.GetStatus(ca_pb2.GetStatusRequest())
    await call
    fresh = dict(await call.trailing_metadata())[CORRELATION_HEADER]
    spans = [s for s in finished(tracing, exporter) if s.name.endswith("/GetStatus")]
    ids = {hexid(s.context.trace_id) for s in spans if s.context}
    assert ids == {wanted, fresh}
    assert all(s.parent is None for s in spans)  # roots: no caller's trace
    assert (await traced.event_for(wanted))["outcome"] == "OK"
    assert (await traced.event_for(fresh))["outcome"] == "OK"


async def test_another_correlation_id_stays_in_the_ledger_and_on_the_span(
    traced: BrokerHarness, tracing: Tracing, exporter: InMemorySpanExporter
) -> None:
    await traced.ca().GetStatus(
        ca_pb2.GetStatusRequest(), metadata=((CORRELATION_HEADER, "deploy-42"),)
    )
    event = await traced.event_for("deploy-42")
    assert event["outcome"] == "OK"
    (span,) = [s for s in finished(tracing, exporter) if s.name.endswith("/GetStatus")]
    assert (span.attributes or {})["broker.correlation_id"] == "deploy-42"


async def test_a_refused_get_is_traced_with_its_status_and_caller_and_no_reference(
    traced: BrokerHarness, tracing: Tracing, exporter: InMemorySpanExporter
) -> None:
    value = await put_secret(traced)
    stranger = traced.identity(STRANGER)
    stub = secrets_pb2_grpc.SecretsStub(traced.channel(stranger))
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await stub.Get(secrets_pb2.GetSecretRequest(reference=REF))
    assert info.value.code() == grpc.StatusCode.PERMISSION_DENIED
    spans = finished(tracing, exporter)
    (server,) = [s for s in spans if s.name == GET]
    attributes: dict[str, Any] = dict(server.attributes or {})
    assert attributes["rpc.grpc.status_code"] == grpc.StatusCode.PERMISSION_DENIED.value[0]
    assert attributes["broker.status"] == "PERMISSION_DENIED"
    assert attributes["broker.caller.spiffe_id"] == STRANGER
    assert attributes["broker.decision"] == "deny"
    assert server.context is not None
    event = await traced.event_for(hexid(server.context.trace_id))
    assert event["decision"] == "deny"
    for span in [server, *descendants(spans, server)]:
        assert REF not in texts(span) and value.decode() not in texts(span)


async def test_background_work_makes_no_orphan_traces(
    traced: BrokerHarness, tracing: Tracing, exporter: InMemorySpanExporter
) -> None:
    await traced.app.ca.sync()  # storage reads outside any request
    await traced.app.access.sync()
    assert finished(tracing, exporter) == []


async def test_without_tracing_a_callers_traceparent_names_the_call_in_the_ledger(
    broker: BrokerHarness,
) -> None:
    assert broker.app.tracing is None
    trace_id = os.urandom(16).hex()
    await broker.ca().GetStatus(
        ca_pb2.GetStatusRequest(),
        metadata=(("traceparent", f"00-{trace_id}-{os.urandom(8).hex()}-01"),),
    )
    assert (await broker.event_for(trace_id))["outcome"] == "OK"


class HangingExporter(SpanExporter):
    """A collector that takes the first batch and never answers until released."""

    def __init__(self) -> None:
        self.entered = threading.Event()
        self.release = threading.Event()
        self.batches = 0
        self.stopped = False

    def export(self, spans: Any) -> SpanExportResult:
        self.batches += 1
        self.entered.set()
        self.release.wait(60)
        return SpanExportResult.SUCCESS

    def shutdown(self) -> None:
        self.stopped = True
        self.release.set()


async def test_a_hanging_collector_never_holds_up_a_request_or_a_stop(
    broker_factory: BrokerFactory,
) -> None:
    exporter = HangingExporter()
    tracing = open_tracing(
        TracingConfig(endpoint="http://127.0.0.1:1"), exporter, schedule_delay_millis=1
    )
    broker = await broker_factory(tracing=tracing)
    ca = broker.ca()
    await ca.GetStatus(ca_pb2.GetStatusRequest())
    assert await asyncio.to_thread(exporter.entered.wait, 30)  # the exporter is now stuck
    for _ in range(20):  # answered while the export hangs (and spans queue up)
        status = await ca.GetStatus(ca_pb2.GetStatusRequest())
        assert status.trust_domain
    assert not exporter.release.is_set() and exporter.batches == 1
    # Stopping does not wait for the hung export beyond its flush bound: close() ends it.
    await asyncio.to_thread(tracing.close, 0.2)
    assert exporter.stopped


# -- server streams: the agents' sync (WatchAgent) ---------------------------------------------

WATCH = "broker.v1.WorkloadIdentity/WatchAgent"


@pytest.fixture
async def traced_identity(tmp_path: Any, tracing: Tracing) -> Any:
    """The identity tests' in-process broker (attestation port, agents), traced."""
    import datetime as dt

    from broker.api.server.serving import serve_application
    from broker.app import Application
    from broker.storage.factory import open_storage
    from ca.clock import FakeClock
    from ca.keys import SoftwareBackend
    from tests.integration.conftest import make_config
    from tests.integration.test_identity import Served

    config = make_config(tmp_path)
    backend = tracing.keys(SoftwareBackend())
    storage = tracing.storage(await open_storage(config.storage.resolved_dsn()))
    app = Application(config, backend, storage, FakeClock(dt.datetime.now(dt.UTC)), tracing=tracing)
    await app.start()
    served = await serve_application(app)
    state = Served(app, served, app.clock, [])  # type: ignore[arg-type]
    try:
        yield state
    finally:
        for channel in state.channels:
            await channel.close()
        await served.server.stop(grace=None)
        await app.close()


async def test_an_agents_sync_stream_is_one_span_ended_with_the_messages_it_pushed(
    traced_identity: Any, tracing: Tracing, exporter: InMemorySpanExporter
) -> None:
    from broker.api._proto import identity_pb2
    from tests.integration.test_identity import AGENT_ID, DEV_WEB_ID, _attested

    broker = traced_identity
    _, _, _, agent = await _attested(broker)
    trace_id = os.urandom(16).hex()
    stream = agent.WatchAgent(
        identity_pb2.WatchAgentRequest(agent_id=AGENT_ID),
        metadata=((CORRELATION_HEADER, trace_id),),
    )
    await asyncio.wait_for(stream.read(), 20)  # the full sync
    op = broker.operator()
    entry = await op.CreateEntry(
        identity_pb2.Entry(spiffe_id=DEV_WEB_ID, parent_id=AGENT_ID, selectors=["unix:uid:7"])
    )
    pushed = await asyncio.wait_for(stream.read(), 20)
    assert [e.id for e in pushed.entries] == [entry.id]
    # Open while the stream runs: no span for it yet.
    assert [s for s in finished(tracing, exporter) if s.name == WATCH] == []

    stream.cancel()  # the agent goes away: the stream ends, and its span with it
    for _ in range(200):
        watch = [s for s in finished(tracing, exporter) if s.name == WATCH]
        if watch:
            break
        await asyncio.sleep(0.05)  # waiting for the server to see the cancellation
    assert len(watch) == 1
    span = watch[0]
    assert span.context is not None and hexid(span.context.trace_id) == trace_id
    attributes = dict(span.attributes or {})
    assert attributes["rpc.service"] == "broker.v1.WorkloadIdentity"
    assert attributes["rpc.method"] == "WatchAgent"
    assert attributes["broker.stream.messages_sent"] == 2
    assert attributes["broker.status"] == "CANCELLED"
    assert attributes["broker.caller.spiffe_id"] == AGENT_ID
    assert attributes["broker.decision"] == "allow"
    # The audited opening carries the span's trace id as its correlation id.
    opened = [e for e in await broker.events() if e["method"].endswith("/WatchAgent")]
    assert [e["correlation_id"] for e in opened] == [trace_id]
    # Counts only: no entry id, selector or SPIFFE ID it pushed is on the span.
    text = texts(span)
    assert entry.id not in text and "unix:uid:7" not in text and DEV_WEB_ID not in text


async def test_a_refused_sync_stream_is_traced_with_its_status(
    traced_identity: Any, tracing: Tracing, exporter: InMemorySpanExporter
) -> None:
    from broker.api._proto import identity_pb2
    from tests.integration.test_identity import _attested

    broker = traced_identity
    _, _, _, agent = await _attested(broker)
    other = "spiffe://example.org/agents/node2"
    stream = agent.WatchAgent(identity_pb2.WatchAgentRequest(agent_id=other))
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await asyncio.wait_for(stream.read(), 20)
    assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED
    watch = [s for s in finished(tracing, exporter) if s.name == WATCH]
    assert len(watch) == 1
    attributes = dict(watch[0].attributes or {})
    assert attributes["broker.status"] == "PERMISSION_DENIED"
    assert attributes["broker.decision"] == "deny"
    assert attributes["broker.stream.messages_sent"] == 0
    assert other not in texts(watch[0])
