"""SQLite backend: the embedded default, one file in the data dir, shared by the broker processes
of one machine.

Two connections per `Storage`, each with its own worker thread (aiosqlite): a writer, used one
transaction at a time, and a `query_only` reader, so reads never queue behind a write that waits
for another process's lock. The file is in WAL mode (readers and the writer do not block each
other), every write is a `BEGIN IMMEDIATE` transaction (it takes the database's write lock up
front, so two processes cannot both read the audit head and fork the chain, and SQLite's busy
handler applies: a deferred transaction that upgrades to a writer gets SQLITE_BUSY immediately),
and a writer waits for a lock held by another process (up to `busy_timeout`) with async retries
rather than SQLite's sleeping busy handler (see `SqliteBackend._begin_immediate`).

Durability: `synchronous=FULL` by default. In WAL mode, NORMAL skips the fsync of the WAL at each
commit: a committed transaction survives a crash of the broker but may be rolled back by a power
loss or an OS crash (the file stays consistent). That would break two invariants: an audit event
acknowledged before a request is answered (5) and a lease written before its database user
exists (4) could vanish. FULL fsyncs the WAL at every commit. Measured on the development VM
(fsync ~0.1 ms; a disk without a write cache pays more), one `append_audit` per event: FULL
~2,000-2,500 appends/s, NORMAL ~4,300-5,200/s; batches of 32 events: FULL ~42,000 events/s,
NORMAL ~75,000/s. Batching amortises the fsync; the audit ledger and the lease table are worth
it. `sqlite:///path.db?synchronous=normal` opts out where losing the last commits on power loss is
acceptable (throwaway dev instances).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import datetime as dt
import os
import random
import sqlite3
import threading
import time
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, Final, NoReturn, TypeVar

import aiosqlite

from broker.errors import StorageConflict, StorageError
from broker.storage.backend import Backend, Row, Tx, require_aware
from broker.storage.sql import SqlStorage

__all__ = ["MIN_SQLITE_VERSION", "SYNCHRONOUS_MODES", "SqliteBackend", "open_sqlite"]

MIN_SQLITE_VERSION: Final = (3, 37, 0)  # STRICT tables (3.37), RETURNING (3.35)
SYNCHRONOUS_MODES: Final = ("FULL", "NORMAL")
DEFAULT_BUSY_TIMEOUT_MS: Final = 10_000

_EPOCH: Final = dt.datetime(1970, 1, 1, tzinfo=dt.UTC)
_MICROSECOND: Final = dt.timedelta(microseconds=1)
_UNIQUE_ERRORS: Final = frozenset({"SQLITE_CONSTRAINT_UNIQUE", "SQLITE_CONSTRAINT_PRIMARYKEY"})
_FOREIGN_KEYS: Final = "PRAGMA foreign_keys = ON"
_BUSY_ERRORS: Final = frozenset({"SQLITE_BUSY", "SQLITE_LOCKED"})
_T = TypeVar("_T")


def _raise(exc: BaseException) -> NoReturn:
    if isinstance(exc, sqlite3.IntegrityError) and (
        getattr(exc, "sqlite_errorname", None) in _UNIQUE_ERRORS
    ):
        raise StorageConflict(f"sqlite: {exc}") from exc
    if isinstance(exc, ValueError):  # aiosqlite: "Connection closed" / "no active connection"
        raise StorageError("sqlite: the storage is closed") from exc
    raise StorageError(f"sqlite: {exc}") from exc


def split_script(script: str) -> list[str]:
    """Split a migration script into complete statements (`executescript` would commit)."""
    statements: list[str] = []
    pending = ""
    for line in script.splitlines(keepends=True):
        pending += line
        if sqlite3.complete_statement(pending):
            statements.append(pending.strip())
            pending = ""
    leftover = [ln for ln in pending.splitlines() if ln.strip() and not ln.strip().startswith("--")]
    if leftover:
        raise ValueError(f"incomplete SQL statement at the end of the script: {pending!r}")
    return statements


class _SqliteTx(Tx):
    def __init__(self, conn: aiosqlite.Connection, *, write: bool) -> None:
        self._conn = conn
        self._write = write

    async def execute(self, sql: str, *args: object) -> None:
        try:
            await self._conn.execute_fetchall(sql, args)
        except (sqlite3.Error, ValueError) as exc:
            _raise(exc)

    async def executemany(self, sql: str, rows: Sequence[Sequence[object]]) -> None:
        try:
            async with self._conn.executemany(sql, rows):
                pass
        except (sqlite3.Error, ValueError) as exc:
            _raise(exc)

    async def fetch(self, sql: str, *args: object) -> list[Row]:
        try:
            return [tuple(row) for row in await self._conn.execute_fetchall(sql, args)]
        except (sqlite3.Error, ValueError) as exc:
            _raise(exc)

    async def lock(self, key: int) -> None:
        # BEGIN IMMEDIATE already holds the database's only write lock, across processes.
        if not self._write:
            raise RuntimeError("lock() needs a write transaction")

    async def run_script(self, script: str) -> None:
        for statement in split_script(script):
            await self.execute(statement)

    async def table_exists(self, name: str) -> bool:
        row = await self.fetchrow(
            "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = ?", name
        )
        return row is not None


class SqliteBackend(Backend):
    dialect = "sqlite"

    supports_write_sync = True

    def __init__(
        self,
        path: Path,
        writer: aiosqlite.Connection,
        reader: aiosqlite.Connection,
        busy_timeout_ms: int = DEFAULT_BUSY_TIMEOUT_MS,
        synchronous: str = "FULL",
    ) -> None:
        self.path = path
        self.busy_timeout_ms = busy_timeout_ms
        self._synchronous = synchronous
        # A third connection, owned by one thread, for single-hop write transactions
        # (`run_write_sync`). It shares `_write_lock` with the aiosqlite writer.
        self._sync_thread = concurrent.futures.ThreadPoolExecutor(1, "sqlite-sync-writer")
        self._sync_conn: sqlite3.Connection | None = None
        self._writer: aiosqlite.Connection | None = writer
        self._reader: aiosqlite.Connection | None = reader
        self._write_lock = asyncio.Lock()
        self._read_lock = asyncio.Lock()

    def __repr__(self) -> str:
        return f"SqliteBackend({str(self.path)!r})"

    @asynccontextmanager
    async def transaction(self, *, write: bool) -> AsyncIterator[Tx]:
        async with self._write_lock if write else self._read_lock:
            conn = self._writer if write else self._reader
            if conn is None:
                raise StorageError("sqlite: the storage is closed")
            tx = _SqliteTx(conn, write=write)
            if not write:
                yield tx
                return
            try:
                # Inside the try: if we are cancelled between attempts, the ROLLBACK below is
                # harmless; if cancelled while BEGIN runs, the ROLLBACK queued after it undoes it.
                await self._begin_immediate(tx)
                yield tx
                await tx.execute("COMMIT")
            except BaseException:
                with contextlib.suppress(StorageError):  # e.g. the transaction is already gone
                    await tx.execute("ROLLBACK")
                raise

    async def _begin_immediate(self, tx: _SqliteTx) -> None:
        """Take the database's write lock, waiting for another process without blocking.

        The writer connection has busy_timeout 0: SQLite's own busy handler would sleep in the
        connection's thread for 1, 2, 5, ... 100 ms between attempts, which under contention
        from another broker process added hundreds of milliseconds to requests. Here a busy
        lock is retried after short, jittered asyncio sleeps (0.2 ms growing to 5 ms) until
        `busy_timeout_ms` has passed; the event loop keeps serving meanwhile.
        """
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.busy_timeout_ms / 1000
        delay = 0.0002
        while True:
            try:
                await tx.execute("BEGIN IMMEDIATE")
                return
            except StorageError as exc:
                cause = exc.__cause__
                busy = isinstance(cause, sqlite3.OperationalError) and (
                    getattr(cause, "sqlite_errorname", "") in _BUSY_ERRORS or "locked" in str(cause)
                )
                if not busy or loop.time() >= deadline:
                    raise
            await asyncio.sleep(delay * (0.5 + random.random()))  # noqa: S311 - jitter only
            delay = min(delay * 1.5, 0.005)

    async def run_write_sync(self, fn: Callable[[Any], _T]) -> _T:
        """Run `fn(connection)` inside BEGIN IMMEDIATE ... COMMIT on the sync writer's thread,
        in one hop from the event loop; waiting for another process's lock happens on that
        thread (short sleeps), never on the loop. Rolls back and raises StorageError (or what
        `fn` raised) on failure."""
        async with self._write_lock:
            if self._writer is None:
                raise StorageError("sqlite: the storage is closed")
            cancelled = threading.Event()
            job = asyncio.get_running_loop().run_in_executor(
                self._sync_thread, self._sync_transaction, fn, cancelled
            )
            try:
                return await asyncio.shield(job)
            except asyncio.CancelledError:
                # The thread cannot be interrupted: tell it to roll back unless it is already
                # committing, and keep the write lock until it is done with the connection.
                cancelled.set()
                await asyncio.wait({job})
                raise

    def _sync_transaction(self, fn: Callable[[Any], _T], cancelled: threading.Event) -> _T:
        conn = self._sync_conn
        if conn is None:
            conn = self._sync_conn = sqlite3.connect(
                self.path, isolation_level=None, check_same_thread=False
            )
            for pragma in (
                "PRAGMA busy_timeout = 0",
                f"PRAGMA synchronous = {self._synchronous}",
                _FOREIGN_KEYS,
            ):
                conn.execute(pragma)
        deadline = time.monotonic() + self.busy_timeout_ms / 1000
        delay = 0.0002
        while True:
            if cancelled.is_set():
                raise StorageError("sqlite: cancelled while waiting for the write lock")
            try:
                conn.execute("BEGIN IMMEDIATE")
                break
            except sqlite3.OperationalError as exc:
                busy = getattr(exc, "sqlite_errorname", "") in _BUSY_ERRORS or "locked" in str(exc)
                if not busy or time.monotonic() >= deadline:
                    _raise(exc)
            time.sleep(delay * (0.5 + random.random()))  # noqa: S311 - jitter only
            delay = min(delay * 1.5, 0.002)
        try:
            result = fn(conn)
            if cancelled.is_set():
                raise StorageError("sqlite: cancelled; rolled back")
            conn.execute("COMMIT")
        except BaseException as exc:
            with contextlib.suppress(sqlite3.Error):
                conn.execute("ROLLBACK")
            if isinstance(exc, sqlite3.Error):
                _raise(exc)
            raise
        return result

    def encode_ts(self, value: dt.datetime) -> int:
        return (require_aware(value) - _EPOCH) // _MICROSECOND

    def decode_ts(self, value: Any) -> dt.datetime:
        return _EPOCH + dt.timedelta(microseconds=int(value))

    async def close(self) -> None:
        async with self._write_lock, self._read_lock:
            if self._sync_conn is not None:
                sync_conn, self._sync_conn = self._sync_conn, None
                await asyncio.get_running_loop().run_in_executor(self._sync_thread, sync_conn.close)
            self._sync_thread.shutdown(wait=False)
            conns = [c for c in (self._writer, self._reader) if c is not None]
            self._writer = self._reader = None
            for conn in conns:
                with contextlib.suppress(sqlite3.Error):
                    await conn.close()


def _create_file(path: Path) -> Path:
    """Create the database file (mode 0600) unless it exists; its directory must exist."""
    file = path.absolute()
    if not file.parent.is_dir():
        raise StorageError(f"sqlite: directory {str(file.parent)!r} does not exist")
    try:
        fd = os.open(file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        return file
    except OSError as exc:
        raise StorageError(f"sqlite: cannot create {str(file)!r}: {exc.strerror}") from exc
    os.close(fd)
    return file


async def _connect(
    path: Path, pragmas: Sequence[str], lock_wait: float = DEFAULT_BUSY_TIMEOUT_MS / 1000
) -> aiosqlite.Connection:
    """Connect and apply `pragmas`. A pragma that finds the file locked is retried until
    `lock_wait` seconds: when two processes open a new file at once, switching it to WAL can return
    SQLITE_BUSY without going through the busy handler."""
    conn = await aiosqlite.connect(str(path), isolation_level=None)
    deadline = asyncio.get_running_loop().time() + lock_wait
    try:
        for pragma in pragmas:
            while True:
                try:
                    await conn.execute_fetchall(pragma)
                    break
                except sqlite3.OperationalError as exc:
                    if "locked" not in str(exc) or asyncio.get_running_loop().time() > deadline:
                        raise
                    await asyncio.sleep(0.01)
    except BaseException:
        await conn.close()
        raise
    return conn


async def open_sqlite(
    path: str | os.PathLike[str],
    *,
    synchronous: str = "FULL",
    busy_timeout_ms: int = DEFAULT_BUSY_TIMEOUT_MS,
) -> SqlStorage:
    """Open (creating it, mode 0600, if missing) the SQLite database file at `path`, whose
    directory must exist. Runs no migration. Raises StorageError if it cannot."""
    if sqlite3.sqlite_version_info < MIN_SQLITE_VERSION:
        raise StorageError(
            f"sqlite: this broker needs SQLite >= {'.'.join(map(str, MIN_SQLITE_VERSION))}, "
            f"Python is linked against {sqlite3.sqlite_version}"
        )
    sync = synchronous.upper()
    if sync not in SYNCHRONOUS_MODES:
        raise ValueError(f"synchronous must be one of {SYNCHRONOUS_MODES}, not {synchronous!r}")
    if busy_timeout_ms < 0:
        raise ValueError("busy_timeout_ms must not be negative")
    file = await asyncio.to_thread(_create_file, Path(path))
    busy = f"PRAGMA busy_timeout = {int(busy_timeout_ms)}"
    writer: aiosqlite.Connection | None = None
    try:
        # busy_timeout first: switching to WAL needs a lock another process may hold.
        writer = await _connect(
            file,
            [busy, "PRAGMA journal_mode = WAL", f"PRAGMA synchronous = {sync}", _FOREIGN_KEYS],
        )
        mode = next(iter(await writer.execute_fetchall("PRAGMA journal_mode")))[0]
        if str(mode).lower() != "wal":
            raise StorageError(f"sqlite: {str(file)!r} cannot use WAL (journal_mode={mode})")
        reader = await _connect(
            file,
            [busy, f"PRAGMA synchronous = {sync}", "PRAGMA query_only = ON", _FOREIGN_KEYS],
        )
        # From now on the writer waits for locks in SqliteBackend._begin_immediate instead.
        await writer.execute("PRAGMA busy_timeout = 0")
    except BaseException as exc:
        if writer is not None:
            await writer.close()
        if isinstance(exc, sqlite3.Error):
            raise StorageError(f"sqlite: cannot open {str(file)!r}: {exc}") from exc
        raise
    return SqlStorage(SqliteBackend(file, writer, reader, int(busy_timeout_ms), sync))
