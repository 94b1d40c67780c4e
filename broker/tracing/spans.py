"""Child spans for the wrapped interfaces: made only inside a recording span (a sampled
request), so a background job's storage reads or a checkpoint's MAC never become traces of
their own, and a call outside any request costs one context look-up."""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any

from opentelemetry import trace
from opentelemetry.trace import Span, SpanKind, Status, StatusCode

__all__ = ["child_span", "in_request"]


def in_request() -> bool:
    """Whether a recording span is current (the wrappers trace only then)."""
    return trace.get_current_span().is_recording()


@contextmanager
def child_span(
    tracer: trace.Tracer,
    name: str,
    attributes: Mapping[str, Any],
    kind: SpanKind = SpanKind.INTERNAL,
) -> Iterator[Span]:
    """A span under the current one; an exception marks it failed with the exception's type
    only (never its message, which may quote what a database or token said)."""
    with tracer.start_as_current_span(
        name,
        kind=kind,
        attributes=attributes,
        record_exception=False,
        set_status_on_exception=False,
    ) as span:
        try:
            yield span
        except BaseException as exc:
            span.set_status(Status(StatusCode.ERROR, type(exc).__name__))
            span.set_attribute("error.type", type(exc).__name__)
            raise
