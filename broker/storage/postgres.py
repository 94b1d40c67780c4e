"""PostgreSQL backend: production, several broker replicas over one database, through an asyncpg
pool.

Write transactions run at READ COMMITTED. What must not race between replicas is made atomic in
the database: `append_audit` takes `pg_advisory_xact_lock(AUDIT_LOCK_KEY)` before it reads the
chain's head (each statement then sees every earlier commit), `migrate` takes
`MIGRATION_LOCK_KEY`, `put_policy` takes `POLICY_LOCK_KEY` before it picks the next version, and
`try_lease` and `increment_counter` are single upserts (atomic under READ COMMITTED).

High availability: the DSN may list several hosts (`postgresql://u@h1:p1,h2:p2,h3:p3/db?
target_session_attrs=read-write`, asyncpg tries them in order and keeps the one that accepts
writes). When the primary is lost (a connection dies, or a server answers "read-only" because it
was demoted) every pooled connection is expired, so the next transaction connects afresh and
lands on the new primary. Taking a connection and starting a write transaction is retried until
a writable primary answers or `primary_wait` seconds pass: nothing has run yet, so that retry is
always safe. A read (`transaction(write=False)`: autocommit, one SELECT at a time) whose
statement lost its server is run again on a fresh connection, within the same `primary_wait`
counted from its first loss: the failed statement returned nothing to the caller and changed
nothing, so running it again on the new primary is idempotent (with synchronous replication the
new primary has every commit the old one acknowledged, so the retry sees no older state than
the caller's earlier reads did). A write transaction that fails after it started is NOT retried
here: its effects may be half-done in the caller (a signed certificate, a created database
user), so the caller fails with `StorageError` (UNAVAILABLE), and nothing it wrote was
committed. With no writable primary within `primary_wait`, `StorageUnavailable` carries a
retry-after hint.
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

from broker.errors import (
    StorageCommitUnknown,
    StorageConflict,
    StorageError,
    StorageUnavailable,
)
from broker.storage.backend import Backend, Row, Tx, require_aware
from broker.storage.factory import dsn_secrets, redact_dsn, scrub
from broker.storage.sql import SqlStorage

__all__ = ["PostgresBackend", "open_postgres", "qmark_to_numbered"]

DEFAULT_CONNECT_TIMEOUT: Final = 10.0
#: How long a transaction waits for a writable primary before it gives up (a Patroni failover
#: with its default TTL of 30 s takes longer; the client retries after the hint).
DEFAULT_PRIMARY_WAIT: Final = 5.0
#: The retry-after hint given with StorageUnavailable.
RETRY_AFTER: Final = 5.0
_RETRY_PAUSE: Final = 0.25
_ROLLBACK_TIMEOUT: Final = 5.0
#: The longest one statement may take (asyncpg's command_timeout): a server that stops
#: answering mid-statement (a silent network partition) fails the request instead of hanging
#: it until TCP gives up (~15 min).
DEFAULT_COMMAND_TIMEOUT: Final = 15.0
_CLOSE_TIMEOUT: Final = 10.0
# What a lost or failing server looks like from asyncpg.
_DB_ERRORS: Final = (
    asyncpg.PostgresError,
    asyncpg.InterfaceError,
    asyncpg.TargetServerAttributeNotMatched,  # a multi-host DSN with no read-write host
    asyncpg.InternalClientError,  # a connection left mid-operation by a lost server
    OSError,
    TimeoutError,
)
# What says "this server is gone or no longer the primary": the pool must reconnect.
_LOST: Final = (
    asyncpg.PostgresConnectionError,  # SQLSTATE class 08
    asyncpg.ConnectionDoesNotExistError,
    asyncpg.ReadOnlySQLTransactionError,  # 25006: a demoted primary
    asyncpg.AdminShutdownError,  # 57P01
    asyncpg.CrashShutdownError,  # 57P02
    asyncpg.CannotConnectNowError,  # 57P03: starting up, shutting down or in recovery
    asyncpg.InterfaceError,
    asyncpg.TargetServerAttributeNotMatched,  # every host answers, none is the primary
    # "cannot switch to state N; another operation is in progress": a pooled connection whose
    # last operation the lost server never finished (seen in a failover: a secret write got
    # INTERNAL). Raised before anything is sent; the connection is closed and replaced.
    asyncpg.InternalClientError,
    OSError,
    TimeoutError,
)
_QMARK: Final = re.compile(r"\?")
# A statement that is safe to run again after it lost its server: a plain query, nothing in it
# that writes or advances a sequence (a read transaction never writes, this keeps it so).
_PURE_READ: Final = re.compile(r"^\s*(SELECT|WITH)\b", re.IGNORECASE)
_WRITES: Final = re.compile(
    r"\b(INSERT|UPDATE|DELETE|MERGE|nextval|setval|pg_advisory\w*|FOR\s+UPDATE|FOR\s+SHARE)\b",
    re.IGNORECASE,
)
#: The shortest statement timeout given to a re-run read (what is left of `primary_wait`).
_MIN_RETRY_TIMEOUT: Final = 0.5


def _rerunnable(sql: str) -> bool:
    return bool(_PURE_READ.match(sql)) and not _WRITES.search(sql)


@functools.lru_cache(maxsize=512)
def qmark_to_numbered(sql: str) -> str:
    """Rewrite `?` placeholders as `$1`, `$2`, ... (our SQL has no `?` inside literals)."""
    counter = iter(range(1, 10_000))
    return _QMARK.sub(lambda _: f"${next(counter)}", sql)


class _PgTx(Tx):
    def __init__(self, backend: PostgresBackend, pool: Any, conn: Any, *, write: bool) -> None:
        self._backend = backend
        self._pool = pool
        #: The connection in use; None once a read's reconnect failed (nothing to release).
        self.conn: Any | None = conn
        self._write = write
        self._deadline: float | None = None  # a read's retry window, from its first loss
        self._timeout: float | None = None  # a re-run statement's timeout (None: the pool's)

    @property
    def _conn(self) -> Any:
        if self.conn is None:
            raise StorageUnavailable(
                "postgresql: this read lost its server", retry_after=RETRY_AFTER
            )
        return self.conn

    async def _reconnect(self, exc: BaseException) -> None:
        """A read lost its server: close its connection and take a fresh one (through the
        multi-host DSN, to the current primary) within what is left of `primary_wait` since
        the read's first loss; past it, fail as any lost server does (StorageUnavailable)."""
        backend = self._backend
        backend.lost_primary()
        loop = asyncio.get_running_loop()
        now = loop.time()
        again = self._deadline is not None
        if self._deadline is None:
            self._deadline = now + backend.primary_wait
        if self._deadline - now <= (_RETRY_PAUSE if again else 0):
            backend.fail(exc)
        conn, self.conn = self.conn, None
        if conn is not None:
            await backend.release(self._pool, conn, lost=True)
        if again:  # the fresh connection died too: pause as taking a connection does
            await asyncio.sleep(_RETRY_PAUSE)
        remaining = max(self._deadline - loop.time(), 0.05)
        backend.read_retries += 1
        self.conn, _ = await backend.begin(self._pool, write=False, wait=remaining)
        self._timeout = max(self._deadline - loop.time(), _MIN_RETRY_TIMEOUT)

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
        query = qmark_to_numbered(sql)
        while True:
            try:
                if self._timeout is None:
                    records = await self._conn.fetch(query, *args)
                else:
                    records = await self._conn.fetch(query, *args, timeout=self._timeout)
            except _DB_ERRORS as exc:
                if self._write or not isinstance(exc, _LOST) or not _rerunnable(sql):
                    self._backend.fail(exc)
                await self._reconnect(exc)  # idempotent: the read returned and changed nothing
                continue
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

    def __init__(self, pool: Any, dsn: str, *, primary_wait: float = DEFAULT_PRIMARY_WAIT) -> None:
        self._pool: Any | None = pool
        self.redacted_dsn = redact_dsn(dsn)
        self._secrets = dsn_secrets(dsn)
        self.primary_wait = primary_wait
        #: How many times a lost primary made the pool reconnect (for tests and metrics).
        self.reconnects = 0
        #: How many reads were run again on a fresh connection after losing their server.
        self.read_retries = 0
        self._expiring: asyncio.Task[None] | None = None

    def lost_primary(self) -> None:
        """Expire every pooled connection (once per loss): the next acquire reconnects through
        the multi-host DSN and finds the current primary."""
        pool = self._pool
        if pool is None or (self._expiring is not None and not self._expiring.done()):
            return
        self.reconnects += 1
        with contextlib.suppress(RuntimeError):  # no running loop: nothing to expire
            self._expiring = asyncio.get_running_loop().create_task(pool.expire_connections())

    async def begin(self, pool: Any, *, write: bool, wait: float | None = None) -> tuple[Any, Any]:
        """A connection (and, for writes, its started transaction), retried on a lost primary
        until `wait` (default `primary_wait`) passes. Safe: nothing of the caller's has run
        yet."""
        loop = asyncio.get_running_loop()
        window = self.primary_wait if wait is None else wait
        deadline = loop.time() + window
        while True:
            conn = None
            try:
                remaining = max(deadline - loop.time(), 0.05)
                conn = await pool.acquire(timeout=remaining)
                if not write:
                    return conn, None
                transaction = conn.transaction()
                await asyncio.wait_for(transaction.start(), remaining)
                return conn, transaction
            except _DB_ERRORS as exc:
                if conn is not None:
                    await self.release(pool, conn, lost=isinstance(exc, _LOST))
                if not isinstance(exc, _LOST):
                    self.fail(exc)
                self.lost_primary()
                if loop.time() + _RETRY_PAUSE >= deadline:
                    text = scrub(f"{type(exc).__name__}: {exc}", self._secrets)
                    raise StorageUnavailable(
                        f"postgresql ({self.redacted_dsn}): no writable primary within "
                        f"{self.primary_wait:g} s: {text}",
                        retry_after=RETRY_AFTER,
                    ) from exc
                await asyncio.sleep(_RETRY_PAUSE)

    def __repr__(self) -> str:
        return f"PostgresBackend({self.redacted_dsn!r})"

    def fail(self, exc: BaseException, *, committing: bool = False) -> NoReturn:
        """Re-raise a driver error as StorageConflict or StorageError, password scrubbed. A
        lost server before COMMIT was sent is StorageUnavailable (nothing was committed: safe
        to run the whole transaction again); during COMMIT it is StorageCommitUnknown."""
        if isinstance(exc, _LOST):
            self.lost_primary()
            text = scrub(f"{type(exc).__name__}: {exc}", self._secrets)
            if committing:
                raise StorageCommitUnknown(
                    f"postgresql ({self.redacted_dsn}): the server was lost during COMMIT; the "
                    f"transaction may or may not have committed: {text}"
                ) from exc
            raise StorageUnavailable(
                f"postgresql ({self.redacted_dsn}): the server was lost; nothing of this "
                f"transaction was committed: {text}",
                retry_after=RETRY_AFTER,
            ) from exc
        if isinstance(exc, asyncpg.UniqueViolationError):
            raise StorageConflict(f"postgresql: {scrub(str(exc), self._secrets)}") from exc
        text = scrub(f"{type(exc).__name__}: {exc}", self._secrets)
        raise StorageError(f"postgresql ({self.redacted_dsn}): {text}") from exc

    @asynccontextmanager
    async def transaction(self, *, write: bool) -> AsyncIterator[Tx]:
        pool = self._pool
        if pool is None:
            raise StorageError("postgresql: the storage is closed")
        conn, transaction = await self.begin(pool, write=write)
        lost = False
        tx = _PgTx(self, pool, conn, write=write)
        try:
            if not write:
                try:
                    yield tx
                except (StorageUnavailable, StorageCommitUnknown):
                    lost = True
                    raise
                return
            try:
                yield tx
            except BaseException as exc:
                lost = isinstance(exc, StorageUnavailable | StorageCommitUnknown)
                if not lost:
                    try:  # bounded: a silently partitioned server would never answer
                        await asyncio.wait_for(transaction.rollback(), _ROLLBACK_TIMEOUT)
                    except (*_DB_ERRORS, asyncio.CancelledError):
                        lost = True
                raise
            try:
                await transaction.commit()
            except _DB_ERRORS as exc:
                lost = isinstance(exc, _LOST)
                self.fail(exc, committing=True)
        finally:
            if tx.conn is not None:  # a read may have moved to a fresh connection
                await self.release(pool, tx.conn, lost=lost)

    async def release(self, pool: Any, conn: Any, *, lost: bool) -> None:
        """Give `conn` back to the pool; a connection to a lost server is closed first (its
        socket may never answer again), so the pool replaces it and release cannot hang."""
        if lost:
            with contextlib.suppress(Exception):
                conn.terminate()
        with contextlib.suppress(*_DB_ERRORS):
            await asyncio.wait_for(pool.release(conn), _CLOSE_TIMEOUT)

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
    primary_wait: float = DEFAULT_PRIMARY_WAIT,
    command_timeout: float | None = DEFAULT_COMMAND_TIMEOUT,
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
            command_timeout=command_timeout,
        )
    except Exception as exc:
        text = scrub(f"{type(exc).__name__}: {exc}", secrets)
        raise StorageError(f"cannot connect to PostgreSQL at {redact_dsn(dsn)}: {text}") from None
    return SqlStorage(PostgresBackend(pool, dsn, primary_wait=primary_wait))
