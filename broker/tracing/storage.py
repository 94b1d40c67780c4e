"""Spans for storage: a `Backend` wrapper, so every repository of every feature is traced at
the one seam they share (`broker.storage.backend`), without a line in the repositories.

One span per transaction (`storage.write` / `storage.read`), named after nothing a caller
chose: attributes are the dialect (`db.system.name`), the first statement's verb and table
(`db.operation.name`, `db.collection.name`, from the SQL text, which holds `?` placeholders,
never values) and the number of statements. Outside a request the backend is called straight
through.
"""

from __future__ import annotations

import datetime as dt
import re
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from typing import Any, TypeVar

from opentelemetry import trace
from opentelemetry.trace import SpanKind

from broker.storage.backend import Backend, Row, Tx
from broker.tracing.spans import child_span, in_request

__all__ = ["TracedBackend"]

_T = TypeVar("_T")
_VERB_TABLE = re.compile(
    r"^\s*(?:WITH\b.*?\)\s*)?(SELECT|INSERT|UPDATE|DELETE|UPSERT|REPLACE)\b"
    r"(?:.*?\b(?:FROM|INTO|UPDATE)\s+([A-Za-z_][A-Za-z0-9_]*))?",
    re.IGNORECASE | re.DOTALL,
)
_SYSTEM = {"sqlite": "sqlite", "postgresql": "postgresql"}


def _summary(sql: str) -> tuple[str, str]:
    """(verb, table) of a statement, '' where they cannot be told."""
    m = _VERB_TABLE.match(sql)
    if m is None:
        return sql.split(None, 1)[0].upper() if sql.strip() else "", ""
    verb = m.group(1).upper()
    table = m.group(2) or ""
    if verb == "UPDATE" and not table:
        after = sql.split(None, 2)
        table = after[1] if len(after) > 1 else ""
    return verb, table


class _TracedTx(Tx):
    """Passes every call to the transaction; notes the first statement and counts them."""

    def __init__(self, inner: Tx, span: trace.Span) -> None:
        self._inner = inner
        self._span = span
        self._count = 0

    def _note(self, sql: str) -> None:
        self._count += 1
        if self._count == 1:
            verb, table = _summary(sql)
            self._span.set_attribute("db.operation.name", verb)
            if table:
                self._span.set_attribute("db.collection.name", table)

    def finish(self) -> None:
        self._span.set_attribute("broker.storage.statements", self._count)

    async def execute(self, sql: str, *args: object) -> None:
        self._note(sql)
        await self._inner.execute(sql, *args)

    async def executemany(self, sql: str, rows: Sequence[Sequence[object]]) -> None:
        self._note(sql)
        await self._inner.executemany(sql, rows)

    async def fetch(self, sql: str, *args: object) -> list[Row]:
        self._note(sql)
        return await self._inner.fetch(sql, *args)

    async def fetchrow(self, sql: str, *args: object) -> Row | None:
        self._note(sql)
        return await self._inner.fetchrow(sql, *args)

    async def lock(self, key: int) -> None:
        await self._inner.lock(key)

    async def run_script(self, script: str) -> None:
        self._note(script)
        await self._inner.run_script(script)

    async def table_exists(self, name: str) -> bool:
        return await self._inner.table_exists(name)


class TracedBackend(Backend):
    """`inner` with a span per transaction inside a request (see the module docstring)."""

    def __init__(self, inner: Backend, tracer: trace.Tracer) -> None:
        self._inner = inner
        self._tracer = tracer
        self.dialect = inner.dialect
        self.supports_write_sync = inner.supports_write_sync
        self._system = _SYSTEM.get(inner.dialect, inner.dialect)

    def __repr__(self) -> str:
        return repr(self._inner)

    @property
    def inner(self) -> Backend:
        return self._inner

    @asynccontextmanager
    async def transaction(self, *, write: bool) -> AsyncIterator[Tx]:
        if not in_request():
            async with self._inner.transaction(write=write) as tx:
                yield tx
            return
        attributes = {"db.system.name": self._system, "broker.storage.write": write}
        name = "storage.write" if write else "storage.read"
        with child_span(self._tracer, name, attributes, SpanKind.CLIENT) as span:
            async with self._inner.transaction(write=write) as tx:
                traced = _TracedTx(tx, span)
                try:
                    yield traced
                finally:
                    traced.finish()

    async def run_write_sync(self, fn: Callable[[Any], _T]) -> _T:
        if not in_request():
            return await self._inner.run_write_sync(fn)
        attributes = {"db.system.name": self._system, "broker.storage.write": True}
        with child_span(self._tracer, "storage.write", attributes, SpanKind.CLIENT):
            return await self._inner.run_write_sync(fn)

    def encode_ts(self, value: dt.datetime) -> object:
        return self._inner.encode_ts(value)

    def decode_ts(self, value: Any) -> dt.datetime:
        return self._inner.decode_ts(value)

    async def close(self) -> None:
        await self._inner.close()

    def __getattr__(self, name: str) -> Any:
        # Dialect-specific extras some callers use (e.g. PostgresBackend.fail).
        return getattr(self._inner, name)
