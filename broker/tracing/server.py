"""The SERVER span of one RPC, opened and closed by the request pipeline
(`broker.api.server.pipeline`), which passes plain values in: this module imports no grpc.

Trace id and correlation id are one (see `provider`):
- a caller's W3C `traceparent` is continued: its trace id is the correlation id;
- else a caller's `x-correlation-id` shaped like a trace id (32 lower-case hex digits, not all
  zero) becomes the trace id;
- else a caller's other `x-correlation-id` stays the ledger's correlation id, as without
  tracing, and is put on the span as `broker.correlation_id` (the trace gets a fresh id);
- else the new trace's id is the correlation id.

A server stream (the agents' WatchAgent sync) gets one span for the whole stream, ended when the
stream ends, with `broker.stream.messages_sent`.

Attributes: `rpc.system`, `rpc.service`, `rpc.method`, `rpc.grpc.status_code` (and
`broker.status`, its name), the caller (`broker.caller.spiffe_id`, `broker.caller.minted_by`
for an SVID an operator minted, `broker.caller.subject` for a person who logged in),
`broker.decision`, and for a call about a secret `secret.ref_sha256` (hex SHA-256 of the
reference, as in the ledger). Never a reference, a value, a request or an error text.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any

from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.trace import SpanKind, Status, StatusCode
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from broker.tracing.provider import CorrelationIds

__all__ = ["RequestSpan", "RequestSpans", "trace_id_of"]

_TRACE_ID = re.compile(r"^[0-9a-f]{32}$")
_PROPAGATOR = TraceContextTextMapPropagator()
# gRPC codes that are the server's fault (OpenTelemetry's RPC conventions for servers).
_SERVER_ERRORS = frozenset(
    {"UNKNOWN", "DEADLINE_EXCEEDED", "UNIMPLEMENTED", "INTERNAL", "UNAVAILABLE", "DATA_LOSS"}
)
_CODES = {
    "OK": 0,
    "CANCELLED": 1,
    "UNKNOWN": 2,
    "INVALID_ARGUMENT": 3,
    "DEADLINE_EXCEEDED": 4,
    "NOT_FOUND": 5,
    "ALREADY_EXISTS": 6,
    "PERMISSION_DENIED": 7,
    "RESOURCE_EXHAUSTED": 8,
    "FAILED_PRECONDITION": 9,
    "ABORTED": 10,
    "OUT_OF_RANGE": 11,
    "UNIMPLEMENTED": 12,
    "INTERNAL": 13,
    "UNAVAILABLE": 14,
    "DATA_LOSS": 15,
    "UNAUTHENTICATED": 16,
}


def trace_id_of(headers: Mapping[str, str]) -> str | None:
    """The trace id (32 hex digits) of a valid `traceparent` among `headers`, or None."""
    if "traceparent" not in headers:
        return None
    ctx = trace.get_current_span(_PROPAGATOR.extract(headers)).get_span_context()
    return format(ctx.trace_id, "032x") if ctx.is_valid else None


class RequestSpan:
    """The span of one call, and its correlation id."""

    def __init__(self, span: trace.Span, correlation_id: str) -> None:
        self.span = span
        self.correlation_id = correlation_id

    def finish(
        self,
        status: str,
        *,
        who: str = "",
        minted_by: str = "",
        subject: str = "",
        decision: str = "",
        ref_sha256: str = "",
    ) -> None:
        span = self.span
        if not span.is_recording():
            return
        span.set_attribute("rpc.grpc.status_code", _CODES.get(status, 2))
        span.set_attribute("broker.status", status)
        if who:
            span.set_attribute("broker.caller.spiffe_id", who)
        if minted_by:
            span.set_attribute("broker.caller.minted_by", minted_by)
        if subject:
            span.set_attribute("broker.caller.subject", subject)
        if decision:
            span.set_attribute("broker.decision", decision)
        if ref_sha256:
            span.set_attribute("secret.ref_sha256", ref_sha256)
        if status in _SERVER_ERRORS:
            span.set_status(Status(StatusCode.ERROR, status))

    def messages_sent(self, count: int) -> None:
        """A server stream's span: how many messages it pushed (a count, never their content)."""
        if self.span.is_recording():
            self.span.set_attribute("broker.stream.messages_sent", count)


class RequestSpans:
    """Opens the SERVER span of each RPC (`serve`) and the pipeline's own steps (`step`)."""

    def __init__(self, tracer: trace.Tracer) -> None:
        self._tracer = tracer

    @contextmanager
    def serve(
        self, method: str, headers: Mapping[str, str], client_correlation_id: str
    ) -> Iterator[RequestSpan]:
        """The call's span, current for the block. `client_correlation_id` is the caller's
        `x-correlation-id` when the pipeline accepts its form, else ""."""
        parent = _PROPAGATOR.extract(headers) if "traceparent" in headers else None
        continued = (
            parent is not None and trace.get_current_span(parent).get_span_context().is_valid
        )
        wanted = 0
        if not continued and _TRACE_ID.match(client_correlation_id):
            wanted = int(client_correlation_id, 16)
        service, _, name = method.lstrip("/").rpartition("/")
        attributes: dict[str, Any] = {
            "rpc.system": "grpc",
            "rpc.service": service,
            "rpc.method": name,
        }
        with CorrelationIds.wanted(wanted):
            span = self._tracer.start_span(
                method.lstrip("/"),
                context=parent if continued else None,
                kind=SpanKind.SERVER,
                attributes=attributes,
                record_exception=False,
                set_status_on_exception=False,
            )
        trace_id = format(span.get_span_context().trace_id, "032x")
        correlation_id = trace_id
        if client_correlation_id and not continued and not wanted:
            correlation_id = client_correlation_id
            span.set_attribute("broker.correlation_id", client_correlation_id)
        token = otel_context.attach(trace.set_span_in_context(span))
        try:
            yield RequestSpan(span, correlation_id)
        finally:
            otel_context.detach(token)
            span.end()

    @contextmanager
    def step(self, name: str) -> Iterator[None]:
        """A span for one of the pipeline's own steps (e.g. the audit write)."""
        with self._tracer.start_as_current_span(
            name, record_exception=False, set_status_on_exception=False
        ):
            yield
