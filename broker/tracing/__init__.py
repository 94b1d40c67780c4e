"""OpenTelemetry traces of the broker (docs/observability.md, "Traces").

Off unless an OTLP endpoint is configured (`[tracing] endpoint`, `BROKER_OTLP_ENDPOINT` or
`OTEL_EXPORTER_OTLP_ENDPOINT`): then nothing here is even imported on the request path, the
pipeline keeps its plain path and no interface is wrapped. When on:

- `provider.Tracing`: the SDK tracer provider, its batch exporter (built in `broker.api.otlp`,
  the gRPC side) and the id generator that lets a caller's correlation id be the trace id;
- the request pipeline opens one SERVER span per RPC (`broker.api.server.pipeline`), whose
  trace id is the correlation id written to the ledger;
- the interfaces under it are wrapped where they are built, not instrumented inside:
  `storage.TracedBackend` (every storage transaction), `keys.traced_keys` (HSM sign, MAC,
  wrap, unwrap, random), `engines.traced_engines` (target database users). Their spans are
  only made inside a sampled request, never as orphan traces of background jobs.

Attributes never carry a secret reference or value: a reference appears only as
`secret.ref_sha256` (hex SHA-256, as in the ledger). This package imports no grpc.
"""
