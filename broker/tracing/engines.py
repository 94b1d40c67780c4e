"""Spans for the database engines (the target databases where dynamic users are created):
the engine factory handed to the credential service is wrapped, and each engine it opens
traces its calls inside a request as `db-engine.<call>` (CLIENT spans) with the plugin as
`db.system.name`. No user name, password or statement text is recorded."""

from __future__ import annotations

import datetime as dt
from typing import Any

from opentelemetry import trace
from opentelemetry.trace import SpanKind

from broker.database.engine import Engine, EngineFactory, NewUser
from broker.database.template import Template
from broker.tracing.spans import child_span, in_request

__all__ = ["TracedEngine", "traced_engines"]

_SYSTEMS = {"postgresql": "postgresql", "mysql": "mysql"}


class TracedEngine:
    def __init__(self, inner: Engine, tracer: trace.Tracer) -> None:
        self._inner = inner
        self._tracer = tracer
        self.plugin = inner.plugin
        self.max_username_length = inner.max_username_length

    def _span(self, call: str) -> Any:
        if not in_request():
            return _Nothing()
        return child_span(
            self._tracer,
            f"db-engine.{call}",
            {"db.system.name": _SYSTEMS.get(self.plugin, self.plugin), "db.operation.name": call},
            SpanKind.CLIENT,
        )

    async def verify(self) -> None:
        with self._span("verify"):
            await self._inner.verify()

    async def create_user(
        self, creation: Template, user: NewUser, rollback: Template | None = None
    ) -> None:
        with self._span("create_user"):
            await self._inner.create_user(creation, user, rollback)

    async def renew_user(self, username: str, expiration: dt.datetime) -> None:
        with self._span("renew_user"):
            await self._inner.renew_user(username, expiration)

    async def revoke_user(self, username: str, revocation: Template | None = None) -> None:
        with self._span("revoke_user"):
            await self._inner.revoke_user(username, revocation)

    async def user_exists(self, username: str) -> bool:
        with self._span("user_exists"):
            return await self._inner.user_exists(username)

    async def set_password(
        self, username: str, password: str, statements: Template | None = None
    ) -> None:
        with self._span("set_password"):
            await self._inner.set_password(username, password, statements)

    async def rotate_root(self, new_password: str) -> None:
        with self._span("rotate_root"):
            await self._inner.rotate_root(new_password)

    async def close(self) -> None:
        await self._inner.close()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)


class _Nothing:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> None:
        return None


def traced_engines(factory: EngineFactory, tracer: trace.Tracer | None) -> EngineFactory:
    """`factory` whose engines trace their calls; `factory` itself when tracing is off."""
    if tracer is None:
        return factory
    traced_tracer = tracer

    def open_traced(plugin: str, dsn: str, password: str) -> Engine:
        return TracedEngine(factory(plugin, dsn, password), traced_tracer)

    return open_traced
