"""Sinks: deliver one batch of forwarded records, and return only once the receiver has them.

- `syslog+tls://HOST:PORT`: each record is an RFC 5424 message, octet-counted as RFC 5425 says,
  over TLS verified against the sink's CA file. Syslog has no acknowledgement, so a batch is
  delivered on one connection that the broker then closes (TLS close_notify) and waits for the
  receiver to close in turn: a receiver closes cleanly only after reading every byte before the
  close (one that dies with bytes unread resets the connection instead). The batch counts as
  delivered only on that clean close; anything else is a failure and the batch is sent again.
- `https://...`: one POST of the batch as JSON lines (`application/x-ndjson`); delivered on a
  2xx answer.

Both run the blocking I/O in a worker thread with the sink's timeout, so a receiver that hangs
costs the forwarder a timeout, never a request.
"""

from __future__ import annotations

import asyncio
import http.client
import socket
import ssl
import urllib.parse
from collections.abc import Sequence
from typing import Protocol

from broker.config import AuditSink

__all__ = ["Sink", "SinkError", "SyslogTlsSink", "WebhookSink", "open_sink", "tls_context"]


class SinkError(Exception):
    """A batch was not delivered (the message says why, without the records)."""


class Sink(Protocol):
    name: str
    # True when a delivered batch is known to be handled (an HTTP 2xx); False for syslog, whose
    # batches the forwarder confirms only on a later successful connection.
    acknowledges: bool

    async def deliver(self, messages: Sequence[tuple[str, bytes]]) -> None:
        """Deliver (syslog line, JSON line) pairs in order, or raise SinkError."""
        ...


def tls_context(ca_file: object) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=None if ca_file is None else str(ca_file))
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    return ctx


def _octet_frame(message: str) -> bytes:
    data = message.encode()
    return str(len(data)).encode() + b" " + data


class SyslogTlsSink:
    acknowledges = False

    def __init__(self, config: AuditSink) -> None:
        self.name = config.name
        hostport = config.url.partition("://")[2].split("/", 1)[0]
        host, _, port = hostport.rpartition(":")
        self._host = host.strip("[]")
        self._port = int(port)
        self._server_name = config.server_name or self._host
        self._timeout = config.timeout.total_seconds()
        self._ctx = tls_context(config.ca_file)

    async def deliver(self, messages: Sequence[tuple[str, bytes]]) -> None:
        payload = b"".join(_octet_frame(line) for line, _ in messages)
        await asyncio.to_thread(self._send, payload)

    def _send(self, payload: bytes) -> None:
        try:
            raw = socket.create_connection((self._host, self._port), timeout=self._timeout)
        except OSError as exc:
            raise SinkError(f"cannot connect to {self._host}:{self._port}: {exc}") from None
        try:
            tls = self._ctx.wrap_socket(raw, server_hostname=self._server_name)
        except (OSError, ssl.SSLError) as exc:
            raw.close()
            raise SinkError(f"TLS with {self._host}:{self._port} failed: {exc}") from None
        try:
            tls.sendall(payload)
            self._await_close(tls)
        except SinkError:
            raise
        except (OSError, ssl.SSLError) as exc:
            raise SinkError(f"sending to {self._host}:{self._port} failed: {exc}") from None
        finally:
            tls.close()

    @staticmethod
    def _await_close(tls: ssl.SSLSocket) -> None:
        """Send close_notify and wait for the receiver to close. rsyslog answers with a bare
        EOF, which is also what a receiver killed after reading our bytes leaves: so this only
        tells a reset (bytes unread) or a hang from the rest; the forwarder confirms the batch
        on a later connection."""
        try:
            tls.unwrap()
        except (ssl.SSLZeroReturnError, ssl.SSLEOFError):
            return
        except TimeoutError:
            raise SinkError("the receiver did not close the connection in time") from None
        except (OSError, ssl.SSLError) as exc:
            raise SinkError(f"the receiver did not close the session cleanly: {exc}") from None


class WebhookSink:
    acknowledges = True

    def __init__(self, config: AuditSink) -> None:
        self.name = config.name
        self._url = urllib.parse.urlsplit(config.url)
        self._timeout = config.timeout.total_seconds()
        self._ctx = tls_context(config.ca_file)

    async def deliver(self, messages: Sequence[tuple[str, bytes]]) -> None:
        body = b"".join(line + b"\n" for _, line in messages)
        await asyncio.to_thread(
            post,
            self._url,
            body,
            {"Content-Type": "application/x-ndjson"},
            self._ctx,
            self._timeout,
        )


def post(
    url: urllib.parse.SplitResult,
    body: bytes,
    headers: dict[str, str],
    ctx: ssl.SSLContext,
    timeout: float,
) -> int:
    """POST `body` over HTTPS; the status on 2xx, SinkError otherwise (never the body)."""
    conn = http.client.HTTPSConnection(
        url.hostname or "", url.port or 443, timeout=timeout, context=ctx
    )
    try:
        path = url.path or "/"
        if url.query:
            path += "?" + url.query
        conn.request("POST", path, body=body, headers=headers)
        answer = conn.getresponse()
        answer.read()
        if not 200 <= answer.status < 300:
            raise SinkError(f"{url.hostname} answered {answer.status} {answer.reason}")
        return answer.status
    except (OSError, http.client.HTTPException, ssl.SSLError) as exc:
        raise SinkError(f"POST to {url.hostname} failed: {exc}") from None
    finally:
        conn.close()


def open_sink(config: AuditSink) -> Sink:
    if config.scheme == "syslog+tls":
        return SyslogTlsSink(config)
    return WebhookSink(config)
