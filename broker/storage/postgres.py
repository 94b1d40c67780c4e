"""PostgreSQL backend: production, several broker replicas over one database, through an asyncpg
pool.

Write transactions run at READ COMMITTED. What must not race between replicas is made atomic in
the database: `append_audit` takes `pg_advisory_xact_lock(AUDIT_LOCK_KEY)` before it reads the
chain's head (each statement then sees every earlier commit), `migrate` takes
`MIGRATION_LOCK_KEY`, `put_policy` takes `POLICY_LOCK_KEY` before it picks the next version, and
`try_lease` and `increment_counter` are single upserts (atomic under READ COMMITTED).
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import functools
import re
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from typing import Any, Final, NoReturn

import asyncpg

from broker.errors import StorageConflict, StorageError
from broker.storage.backend import Backend, Row, Tx, require_aware
from broker.storage.factory import dsn_secrets, redact_dsn, scrub
from broker.storage.sql import SqlStorage

__all__ = ["PostgresBackend", "open_postgres", "qmark_to_numbered"]

DEFAULT_CONNECT_TIMEOUT: Final = 10.0
_CLOSE_TIMEOUT: Final = 10.0
# What a lost or failing server looks like from asyncpg.
_DB_ERRORS: Final = (asyncpg.PostgresError, asyncpg.InterfaceError, OSError, TimeoutError)
_QMARK: Final = re.compile(r"\?")


@functools.lru_cache(maxsize=512)
def qmark_to_numbered(sql: str) -> str:
    """Rewrite `?` placeholders as `$1`, `$2`, ... (our SQL has no `?` inside literals)."""
    counter = iter(range(1, 10_000))
    return _QMARK.sub(lambda _: f"${next(counter)}", sql)


class _PgTx(Tx):
    def __init__(self, backend: PostgresBackend, conn: Any, *, write: bool) -> None:
        self._backend = backend
        self._conn = conn
        self._write = write

    async def execute(self, sql: str, *args: object) -> None:
        try:
            await self._conn.execute(qmark_to_numbered(sql), *args)
        except _DB_ERRORS as exc:
            self._backend.fail(exc)

    async def executemany(self, sql: str, rows: Sequence[Sequence[object]]) -> None:
        try:
            await self._conn.executemany(qmark_to_numbered(sql), rows)
        except _DB_ERRORS as exc:
            self._backend.fail(exc)

    async def fetch(self, sql: str, *args: object) -> list[Row]:
        try:
            records = await self._conn.fetch(qmark_to_numbered(sql), *args)
        except _DB_ERRORS as exc:
            self._backend.fail(exc)
        return [tuple(record) for record in records]

    async def lock(self, key: int) -> None:
        if not self._write:
            raise RuntimeError("lock() needs a write transaction")
        await self.execute("SELECT pg_advisory_xact_lock(?)", key)

    async def run_script(self, script: str) -> None:
        try:
            await self._conn.execute(script)  # no arguments: simple protocol, many statements
        except _DB_ERRORS as exc:
            self._backend.fail(exc)

    async def table_exists(self, name: str) -> bool:
        row = await self.fetchrow("SELECT to_regclass(?::text) IS NOT NULL", name)
        return bool(row and row[0])


class PostgresBackend(Backend):
    dialect = "postgresql"

    def __init__(self, pool: Any, dsn: str) -> None:
        self._pool: Any | None = pool
        self.redacted_dsn = redact_dsn(dsn)
        self._secrets = dsn_secrets(dsn)

    def __repr__(self) -> str:
        return f"PostgresBackend({self.redacted_dsn!r})"

    def fail(self, exc: BaseException) -> NoReturn:
        """Re-raise a driver error as StorageConflict or StorageError, password scrubbed."""
        if isinstance(exc, asyncpg.UniqueViolationError):
            raise StorageConflict(f"postgresql: {scrub(str(exc), self._secrets)}") from exc
        text = scrub(f"{type(exc).__name__}: {exc}", self._secrets)
        raise StorageError(f"postgresql ({self.redacted_dsn}): {text}") from exc

    @asynccontextmanager
    async def transaction(self, *, write: bool) -> AsyncIterator[Tx]:
        pool = self._pool
        if pool is None:
            raise StorageError("postgresql: the storage is closed")
        try:
            conn = await pool.acquire()
        except _DB_ERRORS as exc:
            self.fail(exc)
        try:
            tx = _PgTx(self, conn, write=write)
            if not write:
                yield tx
                return
            transaction = conn.transaction()
            try:
                await transaction.start()
            except _DB_ERRORS as exc:
                self.fail(exc)
            try:
                yield tx
            except BaseException:
                with contextlib.suppress(*_DB_ERRORS):
                    await transaction.rollback()
                raise
            try:
                await transaction.commit()
            except _DB_ERRORS as exc:
                self.fail(exc)
        finally:
            await pool.release(conn)

    def encode_ts(self, value: dt.datetime) -> dt.datetime:
        return require_aware(value)

    def decode_ts(self, value: Any) -> dt.datetime:
        if not isinstance(value, dt.datetime):
            raise StorageError(f"postgresql: expected a timestamptz, got {type(value).__name__}")
        if value.tzinfo is None:
            # asyncpg maps datetime.max/min (aware, UTC) to +/-infinity and back to naive values.
            return value.replace(tzinfo=dt.UTC)
        return value.astimezone(dt.UTC)

    async def close(self) -> None:
        pool, self._pool = self._pool, None
        if pool is None:
            return
        try:
            await asyncio.wait_for(pool.close(), _CLOSE_TIMEOUT)
        except TimeoutError:
            pool.terminate()


async def open_postgres(
    dsn: str,
    *,
    min_size: int = 1,
    max_size: int = 10,
    connect_timeout: float = DEFAULT_CONNECT_TIMEOUT,
) -> SqlStorage:
    """Open an asyncpg pool on `dsn` (one connection made now, so a wrong address, password or
    database fails here). Runs no migration. Raises StorageError with the DSN redacted."""
    secrets = dsn_secrets(dsn)
    try:
        pool = await asyncpg.create_pool(
            dsn,
            min_size=min_size,
            max_size=max_size,
            timeout=connect_timeout,
        )
    except Exception as exc:
        text = scrub(f"{type(exc).__name__}: {exc}", secrets)
        raise StorageError(f"cannot connect to PostgreSQL at {redact_dsn(dsn)}: {text}") from None
    return SqlStorage(PostgresBackend(pool, dsn))
