"""The OTLP/gRPC span exporter of `broker.tracing` (here because it is a gRPC client: only
`broker.api` imports grpc).

`http://HOST:PORT` exports in plaintext (a collector on loopback or a sidecar);
`https://HOST:PORT` over TLS, checking the collector's certificate against `ca_file` (or the
system's CAs). The standard `OTEL_EXPORTER_OTLP_HEADERS` variable still adds headers (e.g. a
collector's token), read by the exporter itself, so no token sits in the broker's config.
"""

from __future__ import annotations

from urllib.parse import urlsplit

import grpc
from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter

from broker.errors import InvalidArgument
from broker.tracing.settings import TracingConfig

__all__ = ["span_exporter"]


def span_exporter(config: TracingConfig) -> OTLPSpanExporter:
    """The exporter to `config.endpoint`; InvalidArgument when its CA file cannot be read."""
    parts = urlsplit(config.endpoint)
    target = parts.netloc
    timeout = config.timeout.total_seconds()
    if config.insecure:
        return OTLPSpanExporter(endpoint=target, insecure=True, timeout=timeout)
    roots = None
    if config.ca_file is not None:
        try:
            roots = config.ca_file.read_bytes()
        except OSError as exc:
            raise InvalidArgument(
                f"tracing.ca_file {config.ca_file}: {exc.strerror or exc}"
            ) from None
    credentials = grpc.ssl_channel_credentials(root_certificates=roots)
    return OTLPSpanExporter(
        endpoint=target, insecure=False, credentials=credentials, timeout=timeout
    )
