"""The dialect seam under every SQL repository: a `Backend` (a connection or pool plus what
differs between dialects) handing out `Tx` transaction handles. SQLite implements it in
`sqlite.py`, PostgreSQL in `postgres.py`; the repositories (`sql.py` and one module per feature)
write their queries once against it. See `sql.py` for the conventions the queries follow.

A leaf module: it imports nothing else from `broker.storage`, so the feature modules and the
`Storage` protocol can all depend on it without a cycle.
"""

from __future__ import annotations

import abc
import datetime as dt
from collections.abc import Callable, Sequence
from contextlib import AbstractAsyncContextManager
from typing import Any, TypeVar

__all__ = ["Backend", "Row", "Tx", "require_aware"]

_T = TypeVar("_T")

Row = tuple[Any, ...]


class Tx(abc.ABC):
    """One transaction (write) or one connection's turn (read) on a backend."""

    @abc.abstractmethod
    async def execute(self, sql: str, *args: object) -> None: ...

    @abc.abstractmethod
    async def executemany(self, sql: str, rows: Sequence[Sequence[object]]) -> None: ...

    @abc.abstractmethod
    async def fetch(self, sql: str, *args: object) -> list[Row]: ...

    async def fetchrow(self, sql: str, *args: object) -> Row | None:
        rows = await self.fetch(sql, *args)
        return rows[0] if rows else None

    @abc.abstractmethod
    async def lock(self, key: int) -> None:
        """Block until this transaction is the only writer holding `key`; held until it ends."""

    @abc.abstractmethod
    async def run_script(self, script: str) -> None:
        """Run a migration script (several statements) inside this transaction."""

    @abc.abstractmethod
    async def table_exists(self, name: str) -> bool: ...


class Backend(abc.ABC):
    """A database connection (or pool) plus what differs between dialects."""

    dialect: str

    @abc.abstractmethod
    def transaction(self, *, write: bool) -> AbstractAsyncContextManager[Tx]:
        """`write=True`: a transaction that commits when the block ends normally and rolls back
        when it raises. `write=False`: autocommit reads, one statement at a time."""

    @abc.abstractmethod
    def encode_ts(self, value: dt.datetime) -> object: ...

    @abc.abstractmethod
    def decode_ts(self, value: Any) -> dt.datetime: ...

    @abc.abstractmethod
    async def close(self) -> None: ...

    # Optional power: run a synchronous function(connection) inside one write transaction on
    # the database's own thread, in a single hop from the event loop.
    supports_write_sync: bool = False

    async def run_write_sync(self, fn: Callable[[Any], _T]) -> _T:
        raise NotImplementedError(f"{self.dialect} has no synchronous write path")


def require_aware(value: dt.datetime) -> dt.datetime:
    """`value` in UTC; refuses naive datetimes."""
    if not isinstance(value, dt.datetime):
        raise TypeError(f"expected a datetime, got {type(value).__name__}")
    if value.tzinfo is None or value.utcoffset() is None:
        raise ValueError(f"naive datetime {value.isoformat()} refused: pass an aware UTC datetime")
    return value.astimezone(dt.UTC)
