"""Forwarding the audit ledger to outside receivers (a SIEM): sinks and the leader-held job.

docs/observability.md describes what is sent, the guarantees (in order, at least once, resumed
after a restart from a cursor in storage) and what a receiver must do (deduplicate by `seq`)."""

from broker.forwarding.forwarder import AuditForwarder, forward_record
from broker.forwarding.sinks import Sink, SinkError, SyslogTlsSink, WebhookSink, open_sink

__all__ = [
    "AuditForwarder",
    "Sink",
    "SinkError",
    "SyslogTlsSink",
    "WebhookSink",
    "forward_record",
    "open_sink",
]
