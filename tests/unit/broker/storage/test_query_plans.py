"""What grows with the tables (issue 18, item 5): the queries the periodic jobs run every
round (the lease reaper every second, the secret janitor) are served by an index, not by a
scan of the whole table. SQLite's own query planner is asked (EXPLAIN QUERY PLAN) about the
statements the store really sends, captured as they go to the driver."""

from __future__ import annotations

import datetime as dt
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiosqlite
import pytest

from broker.secrets import MetadataMac
from broker.storage import open_storage
from broker.storage.sql import SqlStorage
from ca.keys import SoftwareBackend

T0 = dt.datetime(2026, 1, 1, tzinfo=dt.UTC)


@pytest.fixture
async def storage(tmp_path: Path) -> AsyncIterator[SqlStorage]:
    storage = await open_storage(f"sqlite://{tmp_path / 'broker.db'}")
    await storage.migrate()
    assert isinstance(storage, SqlStorage)
    yield storage
    await storage.close()


@pytest.fixture
def plans(monkeypatch: pytest.MonkeyPatch) -> dict[str, list[str]]:
    """SQL text of every SELECT sent from now on -> SQLite's plan for it."""
    seen: dict[str, list[str]] = {}
    original = aiosqlite.Connection.execute_fetchall

    async def recording(self: aiosqlite.Connection, sql: str, parameters: Any = None) -> Any:
        if sql.lstrip().upper().startswith("SELECT"):
            rows = await original(self, "EXPLAIN QUERY PLAN " + sql, parameters)
            seen[sql] = [str(row[3]) for row in rows]
        return await original(self, sql, parameters)

    monkeypatch.setattr(aiosqlite.Connection, "execute_fetchall", recording)
    return seen


def _full_scans(plan: list[str]) -> list[str]:
    """Steps that read a whole table (or a whole index) or sort: what grows with the rows."""
    return [step for step in plan if step.startswith("SCAN ") or "TEMP B-TREE" in step]


async def test_the_reaper_rounds_walk_indexes_not_the_lease_table(
    storage: SqlStorage, plans: dict[str, list[str]]
) -> None:
    store = storage.database()
    await store.due_leases(T0, 100)
    await store.irrevocable_count()
    await store.lease_stats(T0)
    lease_queries = {sql: plan for sql, plan in plans.items() if "db_leases" in sql}
    assert len(lease_queries) >= 3, lease_queries
    for sql, plan in lease_queries.items():
        if sql.strip() == "SELECT COUNT(*) FROM db_leases":
            continue  # the active-leases metric: the one figure that counts every row
        assert _full_scans(plan) == [], (sql, plan)


async def test_the_janitor_finds_deleted_secrets_through_an_index(
    storage: SqlStorage, plans: dict[str, list[str]]
) -> None:
    await storage.secrets(MetadataMac(SoftwareBackend())).destroy_deleted(T0)
    queries = {sql: plan for sql, plan in plans.items() if "state = 'deleted'" in sql}
    assert queries, plans
    for sql, plan in queries.items():
        assert _full_scans(plan) == [], (sql, plan)
