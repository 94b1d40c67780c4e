"""Reads that ride out a lost primary (broker/storage/postgres.py): a read whose statement lost
its server returned nothing and changed nothing, so it is run again on a fresh connection (the
pool expired, the multi-host DSN finds the new primary) within `primary_wait`; a write, a
statement that may write, or an error that is not a lost server is never run again.

A fake asyncpg pool and connections stand in for the database: the first connection dies
mid-statement, the next ones answer (or keep failing)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import asyncpg
import pytest

from broker.errors import StorageError, StorageUnavailable
from broker.storage.postgres import PostgresBackend

DSN_WORD = "pw-" + "Qr7k2"  # a made-up one, assembled so no credential-like literal sits here
DSN = "postgresql://broker:" + DSN_WORD + "@h1:5432,h2:5432/broker?target_session_attrs=read-write"


class FakeConn:
    """A pooled connection: `answer(query)` returns rows or raises."""

    def __init__(self, name: str, answer: Callable[[str], list[tuple[Any, ...]]]) -> None:
        self.name = name
        self._answer = answer
        self.queries: list[tuple[str, float | None]] = []
        self.terminated = False
        self.transactions = 0

    async def fetch(self, query: str, *args: object, timeout: float | None = None) -> list[Any]:
        self.queries.append((query, timeout))
        return self._answer(query)

    async def execute(self, query: str, *args: object) -> None:
        self.queries.append((query, None))
        self._answer(query)

    def transaction(self) -> FakeTransaction:
        self.transactions += 1
        return FakeTransaction()

    def terminate(self) -> None:
        self.terminated = True


class FakeTransaction:
    def __init__(self) -> None:
        self.committed = False
        self.rolled_back = False

    async def start(self) -> None:
        return None

    async def commit(self) -> None:
        self.committed = True

    async def rollback(self) -> None:
        self.rolled_back = True


class FakePool:
    """Hands out the given connections in order (the last one again when they run out)."""

    def __init__(self, conns: list[FakeConn]) -> None:
        self._conns = conns
        self.handed_out: list[FakeConn] = []
        self.released: list[FakeConn] = []
        self.expired = 0

    async def acquire(self, timeout: float | None = None) -> FakeConn:
        conn = self._conns[min(len(self.handed_out), len(self._conns) - 1)]
        self.handed_out.append(conn)
        return conn

    async def release(self, conn: FakeConn) -> None:
        self.released.append(conn)

    async def expire_connections(self) -> None:
        self.expired += 1


def lost(query: str) -> list[tuple[Any, ...]]:
    raise asyncpg.ConnectionDoesNotExistError("connection was closed in the middle of operation")


def rows(*values: Any) -> Callable[[str], list[tuple[Any, ...]]]:
    return lambda query: [(value,) for value in values]


async def test_a_read_that_lost_its_server_is_run_again_on_a_fresh_connection() -> None:
    dead, fresh = FakeConn("old-primary", lost), FakeConn("new-primary", rows("spiffe://a", 7))
    pool = FakePool([dead, fresh])
    backend = PostgresBackend(pool, DSN, primary_wait=5.0)

    async with backend.transaction(write=False) as tx:
        got = await tx.fetch("SELECT id FROM entries WHERE spiffe_id = ?", "spiffe://a")

    assert got == [("spiffe://a",), (7,)]
    assert dead.queries == [("SELECT id FROM entries WHERE spiffe_id = $1", None)]
    assert [q for q, _ in fresh.queries] == ["SELECT id FROM entries WHERE spiffe_id = $1"]
    # The re-run statement is bounded by what is left of the window, never by 15 s.
    timeout = fresh.queries[0][1]
    assert timeout is not None and 0 < timeout <= 5.0
    assert dead.terminated and not fresh.terminated  # the dead one is closed, not reused
    assert pool.released == [dead, fresh]  # each given back exactly once
    assert backend.read_retries == 1 and backend.reconnects == 1
    assert pool.expired == 1  # the whole pool was expired: the others are dead too


async def test_earlier_statements_of_the_read_are_not_run_again() -> None:
    calls = {"n": 0}

    def first_ok_then_lost(query: str) -> list[tuple[Any, ...]]:
        calls["n"] += 1
        if calls["n"] == 1:
            return [(1,)]
        return lost(query)

    dying, fresh = FakeConn("old", first_ok_then_lost), FakeConn("new", rows(2))
    pool = FakePool([dying, fresh])
    backend = PostgresBackend(pool, DSN)
    async with backend.transaction(write=False) as tx:
        assert await tx.fetch("SELECT 1") == [(1,)]
        assert await tx.fetch("SELECT 2") == [(2,)]
    assert [q for q, _ in dying.queries] == ["SELECT 1", "SELECT 2"]
    assert [q for q, _ in fresh.queries] == ["SELECT 2"]


async def test_a_read_with_no_primary_within_the_window_is_unavailable_with_retry_after() -> None:
    conns = [FakeConn(f"dead-{n}", lost) for n in range(50)]
    pool = FakePool(conns)
    backend = PostgresBackend(pool, DSN, primary_wait=0.6)

    with pytest.raises(StorageUnavailable) as info:
        async with backend.transaction(write=False) as tx:
            await tx.fetch("SELECT 1")

    assert info.value.retry_after == 5.0
    assert DSN_WORD not in str(info.value)
    assert backend.read_retries >= 1  # it did try again ...
    assert len(pool.handed_out) < len(conns)  # ... but not without end
    tried = pool.handed_out
    assert all(conn.terminated for conn in tried)
    assert sorted(map(id, pool.released)) == sorted(map(id, tried))  # none leaked


async def test_a_write_that_lost_its_server_is_not_run_again() -> None:
    dead, fresh = FakeConn("old", lost), FakeConn("new", rows(1))
    pool = FakePool([dead, fresh])
    backend = PostgresBackend(pool, DSN)

    with pytest.raises(StorageUnavailable, match="nothing of this transaction was committed"):
        async with backend.transaction(write=True) as tx:
            await tx.fetch("SELECT seq FROM audit ORDER BY seq DESC LIMIT 1")

    assert fresh.queries == [] and pool.handed_out == [dead]
    assert backend.read_retries == 0


@pytest.mark.parametrize(
    "sql",
    [
        "SELECT nextval('serials')",
        "SELECT * FROM leases WHERE id = ? FOR UPDATE",
        "WITH gone AS (DELETE FROM leases RETURNING id) SELECT id FROM gone",
        "INSERT INTO t VALUES (1) RETURNING id",
        "SELECT pg_advisory_lock(1)",
    ],
)
async def test_a_statement_that_may_write_is_not_run_again_even_in_a_read(sql: str) -> None:
    dead, fresh = FakeConn("old", lost), FakeConn("new", rows(1))
    pool = FakePool([dead, fresh])
    backend = PostgresBackend(pool, DSN)

    with pytest.raises(StorageUnavailable):
        async with backend.transaction(write=False) as tx:
            await tx.fetch(sql)

    assert fresh.queries == [] and backend.read_retries == 0


async def test_an_error_that_is_not_a_lost_server_is_not_run_again() -> None:
    def syntax_error(query: str) -> list[tuple[Any, ...]]:
        raise asyncpg.PostgresSyntaxError('syntax error at or near "SELEC"')

    broken, fresh = FakeConn("primary", syntax_error), FakeConn("other", rows(1))
    pool = FakePool([broken, fresh])
    backend = PostgresBackend(pool, DSN)

    with pytest.raises(StorageError) as info:
        async with backend.transaction(write=False) as tx:
            await tx.fetch("SELEC 1")

    assert not isinstance(info.value, StorageUnavailable)
    assert fresh.queries == [] and backend.read_retries == 0
    assert not broken.terminated and pool.released == [broken]


async def test_a_connection_left_mid_operation_is_replaced_not_an_internal_error() -> None:
    """Seen in a failover: a pooled connection whose last operation the lost server never
    finished refuses the next one ("another operation is in progress"); before, that escaped
    as an unexpected exception and the client got INTERNAL."""

    def stuck(query: str) -> list[tuple[Any, ...]]:
        raise asyncpg.InternalClientError(
            "cannot switch to state 12; another operation (2) is in progress"
        )

    broken, fresh = FakeConn("stuck", stuck), FakeConn("fresh", rows("kek-3"))
    pool = FakePool([broken, fresh])
    backend = PostgresBackend(pool, DSN)
    async with backend.transaction(write=False) as tx:
        assert await tx.fetch("SELECT value FROM meta WHERE key = ?", "k") == [("kek-3",)]
    assert broken.terminated and backend.read_retries == 1

    # In a write it is a lost server: UNAVAILABLE (nothing was sent), never INTERNAL.
    pool = FakePool([FakeConn("stuck", stuck)])
    backend = PostgresBackend(pool, DSN)
    with pytest.raises(StorageUnavailable):
        async with backend.transaction(write=True) as tx:
            await tx.execute("UPDATE meta SET value = ? WHERE key = ?", "v", "k")
