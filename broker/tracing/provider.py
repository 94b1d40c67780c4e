"""The tracer provider of one broker process, and where trace ids come from.

A trace id is the request's correlation id (the ledger's `correlation_id`): the pipeline
continues a caller's W3C `traceparent` when there is one; otherwise a caller's
`x-correlation-id` that has the form of a trace id (32 lower-case hex digits, not all zero)
becomes the new trace's id through `CorrelationIds`, and any other request gets a random one.
"""

from __future__ import annotations

import contextvars
import os
import socket
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from opentelemetry import trace
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter
from opentelemetry.sdk.trace.id_generator import RandomIdGenerator
from opentelemetry.sdk.trace.sampling import ParentBased, TraceIdRatioBased

from broker.tracing.settings import TracingConfig
from ca.keys import KeyBackend

if TYPE_CHECKING:
    from broker.storage import Storage
    from broker.tracing.server import RequestSpans

__all__ = ["INSTRUMENTATION", "CorrelationIds", "Tracing", "open_tracing"]

INSTRUMENTATION = "broker"

_WANTED: contextvars.ContextVar[int] = contextvars.ContextVar("broker_trace_id", default=0)


class CorrelationIds(RandomIdGenerator):
    """Random ids, except the trace id a request asked for with `wanted()` (its correlation
    id)."""

    def generate_trace_id(self) -> int:
        wanted = _WANTED.get()
        return wanted if wanted else super().generate_trace_id()

    @staticmethod
    @contextmanager
    def wanted(trace_id: int) -> Iterator[None]:
        token = _WANTED.set(trace_id)
        try:
            yield
        finally:
            _WANTED.reset(token)


@dataclass
class Tracing:
    """The process's tracing: `tracer` for the pipeline and the wrappers, `close()` flushes
    what is buffered and stops the exporter."""

    provider: TracerProvider
    tracer: trace.Tracer
    config: TracingConfig
    exporter: SpanExporter | None = None

    def close(self, flush_seconds: float = 3.0) -> None:
        """Export what is buffered, waiting at most `flush_seconds` (a collector that is down
        or hangs must not hold up a broker that is stopping), then stop."""
        # The SDK's force_flush exports in the calling thread and ignores its timeout: bound it.
        flusher = threading.Thread(
            target=self.provider.force_flush, name="trace-flush", daemon=True
        )
        flusher.start()
        flusher.join(flush_seconds)
        if self.exporter is not None:
            self.exporter.shutdown()  # ends an export still retrying
        self.provider.shutdown()

    def request_spans(self) -> RequestSpans:
        """What the request pipeline opens each RPC's SERVER span with."""
        from broker.tracing.server import RequestSpans

        return RequestSpans(self.tracer)

    def keys(self, keys: KeyBackend) -> KeyBackend:
        """`keys` behind spans (broker.tracing.keys)."""
        from broker.tracing.keys import traced_keys

        return traced_keys(keys, self.tracer)

    def storage(self, storage: Storage) -> Storage:
        """`storage` over its backend behind spans (broker.tracing.storage): a new
        `SqlStorage` on the same connection; build it before any repository."""
        from broker.storage.sql import SqlStorage
        from broker.tracing.storage import TracedBackend

        if not isinstance(storage, SqlStorage):
            return storage
        traced = SqlStorage(TracedBackend(storage.backend, self.tracer))
        traced.single_hop_writes = storage.single_hop_writes
        return traced


def open_tracing(config: TracingConfig, exporter: SpanExporter, **batch: Any) -> Tracing:
    """A tracer provider exporting through `exporter` in batches (the SDK's
    `OTEL_BSP_*` variables tune them; `batch` overrides), sampling new traces at
    `config.sample_ratio` and following a caller's sampling decision. It is not made the
    global provider: the broker hands its tracer to what it wraps."""
    resource = Resource.create(
        {
            "service.name": config.service_name,
            "service.instance.id": f"{socket.gethostname()}:{os.getpid()}",
        }
    )
    provider = TracerProvider(
        sampler=ParentBased(TraceIdRatioBased(config.sample_ratio)),
        resource=resource,
        id_generator=CorrelationIds(),
        shutdown_on_exit=False,
    )
    provider.add_span_processor(BatchSpanProcessor(exporter, **batch))
    return Tracing(provider, provider.get_tracer(INSTRUMENTATION), config, exporter)
