"""The static-role rollout storage (migration 0013): a role's user pair, one rollout intent at
a time, cleared on rollback, and the switch of the role's user and password on completion in
one step that happens once -- run against SQLite and PostgreSQL."""

from __future__ import annotations

import dataclasses
import datetime as dt
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from broker.storage import open_storage
from broker.storage.database import ConnectionRecord, StaticRoleRecord
from broker.storage.sql import SqlStorage
from broker.storage.static_rollouts import StaticPair

T0 = dt.datetime(2026, 3, 1, 12, 0, 0, tzinfo=dt.UTC)


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
async def storage(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[SqlStorage]:
    if request.param == "sqlite":
        dsn = f"sqlite://{tmp_path / 'broker.db'}"
    else:
        dsn = request.getfixturevalue("pg_dsn")
    store = await open_storage(dsn)
    assert isinstance(store, SqlStorage)
    await store.migrate()
    try:
        yield store
    finally:
        await store.close()


def intent(rollout_id: str = "rollout-1", **changes: object) -> StaticPair:
    base = StaticPair(
        "app", "app_user", "app_user_b", "app_user_b", rollout_id, 2, b"\x01sealed", "kek-1"
    )
    return dataclasses.replace(base, **changes)  # type: ignore[arg-type]


async def test_one_intent_at_a_time_and_rollback_clears_it(storage: SqlStorage) -> None:
    pairs = storage.static_rollouts()
    assert await pairs.get("app") is None
    assert await pairs.begin(intent())
    assert not await pairs.begin(intent("rollout-2"))  # one at a time
    assert await pairs.get("app") == intent()
    await pairs.clear("app", "rollout-other")  # another rollout's clear changes nothing
    assert await pairs.get("app") == intent()
    await pairs.clear("app", "rollout-1")
    cleared = await pairs.get("app")
    assert cleared == intent("", target_user="", sealed_password=None, kek_label=None)
    assert cleared is not None and cleared.other("app_user") == "app_user_b"
    assert await pairs.begin(intent("rollout-2"))


async def test_completion_switches_the_role_once(storage: SqlStorage) -> None:
    database = storage.database()
    await database.insert_connection(
        ConnectionRecord("main", "postgresql", "postgresql://admin@db/app", b"\x01", "kek-1", T0)
    )
    await database.insert_static_role(
        StaticRoleRecord(
            name="app",
            connection="main",
            username="app_user",
            owner="web",
            tenant="acme",
            environment="prod",
            rotation_period=86400,
            rotation_statements=None,
            sealed_password=b"\x01old",
            kek_label="kek-1",
            version=1,
            rotated_at=T0,
            next_rotation_at=T0,
            created_at=T0,
        )
    )
    pairs = storage.static_rollouts()
    assert await pairs.begin(intent())
    later = T0 + dt.timedelta(hours=1)
    args = ("app", "rollout-1", "app_user_b", 2, b"\x01new", "kek-2", later, later)
    assert await pairs.complete(*args)
    assert not await pairs.complete(*args)  # finished already
    role = await database.get_static_role("app")
    assert role is not None
    assert (role.username, role.version, role.sealed_password, role.kek_label) == (
        "app_user_b",
        2,
        b"\x01new",
        "kek-2",
    )
    pair = await pairs.get("app")
    assert pair is not None and (pair.target_user, pair.sealed_password) == ("", None)
