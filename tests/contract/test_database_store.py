"""The database-credentials repository contract, run against SQLite and PostgreSQL."""

from __future__ import annotations

import datetime as dt
from collections.abc import AsyncIterator
from dataclasses import replace
from pathlib import Path

import pytest

from broker.errors import AlreadyExists, FailedPrecondition
from broker.storage import open_storage
from broker.storage.database import (
    ConnectionRecord,
    DatabaseRepository,
    LeaseRecord,
    LeaseState,
    RecoveryRecord,
    RoleRecord,
    StaticIntentRecord,
    StaticRoleRecord,
)

T0 = dt.datetime(2026, 3, 1, 12, 0, 0, 123456, tzinfo=dt.UTC)


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
async def store(
    request: pytest.FixtureRequest, tmp_path: Path
) -> AsyncIterator[DatabaseRepository]:
    if request.param == "sqlite":
        dsn = f"sqlite://{tmp_path / 'broker.db'}"
    else:
        dsn = request.getfixturevalue("pg_dsn")
    storage = await open_storage(dsn)
    await storage.migrate()
    yield storage.database()
    await storage.close()


def connection(name: str = "main", label: str = "kek._system.1") -> ConnectionRecord:
    return ConnectionRecord(name, "postgresql", "postgresql://u@h/db", b"\x00sealed", label, T0)


def role(name: str = "app", connection: str = "main") -> RoleRecord:
    return RoleRecord(
        name,
        connection,
        "web",
        "acme",
        "prod",
        "CREATE ROLE {{name}}",
        None,
        "DROP ROLE x",
        600,
        3600,
        "v_{{role}}_{{random}}",
        32,
        "alphanumeric",
        T0,
    )


def lease(lease_id: str = "db/app/1", username: str = "v_app_1", **kw: object) -> LeaseRecord:
    base = LeaseRecord(
        lease_id,
        "app",
        "main",
        "postgresql",
        username,
        "spiffe://x/a/b/c",
        "pending",
        None,
        T0,
        T0 + dt.timedelta(minutes=10),
        T0 + dt.timedelta(hours=1),
        T0 + dt.timedelta(seconds=30),
    )
    return replace(base, **kw)  # type: ignore[arg-type]


async def test_connections_roles_and_their_dependencies(store: DatabaseRepository) -> None:
    await store.insert_connection(connection())
    with pytest.raises(AlreadyExists):
        await store.insert_connection(connection())
    assert await store.get_connection("main") == connection()
    with pytest.raises(FailedPrecondition):
        await store.insert_role(role(connection="absent"))
    await store.insert_role(role())
    with pytest.raises(AlreadyExists):
        await store.insert_role(role())
    assert await store.get_role("app") == role()
    with pytest.raises(FailedPrecondition, match="roles"):
        await store.delete_connection("main")
    assert await store.delete_role("app")
    await store.insert_lease(lease())
    with pytest.raises(FailedPrecondition, match="lease"):
        await store.delete_connection("main")
    assert await store.delete_lease("db/app/1")
    assert await store.delete_connection("main")
    assert not await store.delete_connection("main")
    assert await store.list_connections() == []


async def test_lease_states_are_stored_as_before_and_read_as_lease_states(
    store: DatabaseRepository,
) -> None:
    await store.insert_lease(lease(state=LeaseState.PENDING))
    assert await store.activate_lease("db/app/1")
    record = await store.get_lease("db/app/1")
    assert record is not None
    assert type(record.state) is LeaseState
    assert record.state == LeaseState.ACTIVE == "active"
    claimed = await store.begin_revocation(
        "db/app/1", T0, from_states=(LeaseState.PENDING, LeaseState.ACTIVE)
    )
    assert claimed is not None and claimed.state is LeaseState.REVOKING
    with pytest.raises(ValueError, match="lease states must be among"):
        await store.begin_revocation("db/app/1", T0, from_states=("bogus",))  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="lease state must be one of"):
        await store.insert_lease(lease("db/app/2", "v_app_2", state="bogus"))
    assert [r.id for r in await store.list_leases()] == ["db/app/1"]


async def test_lease_lifecycle_is_compare_and_set(store: DatabaseRepository) -> None:
    await store.insert_lease(lease())
    with pytest.raises(AlreadyExists):
        await store.insert_lease(lease(username="other"))  # same id
    with pytest.raises(AlreadyExists):
        await store.insert_lease(lease("db/app/2"))  # same user on the same connection
    assert not await store.extend_lease("db/app/1", T0 + dt.timedelta(minutes=20))  # pending
    assert await store.activate_lease("db/app/1")
    assert not await store.activate_lease("db/app/1")
    active = await store.get_lease("db/app/1")
    assert active is not None and active.state == "active" and active.due_at == active.expires_at
    later = T0 + dt.timedelta(minutes=20)
    assert await store.extend_lease("db/app/1", later)
    # the reaper claims only what is due
    assert await store.due_leases(T0 + dt.timedelta(minutes=19), 10) == []
    assert [x.id for x in await store.due_leases(later, 10)] == ["db/app/1"]
    assert (
        await store.begin_revocation("db/app/1", later, from_states=("active",), due_before=T0)
        is None
    )
    claimed = await store.begin_revocation(
        "db/app/1", later + dt.timedelta(seconds=2), from_states=("active",), due_before=later
    )
    assert claimed is not None and claimed.state == "revoking"
    assert await store.begin_revocation("db/app/1", later, from_states=("active",)) is None
    await store.revocation_failed(
        "db/app/1", later + dt.timedelta(seconds=4), "down", give_up=False
    )
    failed = await store.get_lease("db/app/1")
    assert failed is not None and (failed.attempts, failed.last_error) == (1, "down")
    await store.revocation_failed("db/app/1", later, "still down", give_up=True)
    assert (await store.get_lease("db/app/1")).state == "irrevocable"  # type: ignore[union-attr]
    assert await store.irrevocable_count() == 1
    # Irrevocable leases are still due (retried until the user is gone, issue 20 #6), and
    # claiming one for another try keeps it irrevocable (still alerted).
    assert await store.due_leases(later - dt.timedelta(seconds=1), 10) == []
    assert [x.id for x in await store.due_leases(later, 10)] == ["db/app/1"]
    again = await store.begin_revocation(
        "db/app/1", later + dt.timedelta(minutes=5), from_states=("irrevocable",), due_before=later
    )
    assert again is not None and again.state == "irrevocable"
    assert await store.due_leases(later + dt.timedelta(minutes=4), 10) == []
    assert await store.delete_lease("db/app/1")
    assert await store.irrevocable_count() == 0
    assert await store.get_lease("db/app/1") is None


async def test_list_by_prefix(store: DatabaseRepository) -> None:
    for i, prefix in enumerate(["db/app/", "db/app/", "db/apple/", "db/b/"]):
        await store.insert_lease(lease(f"{prefix}{i}", f"u{i}"))
    assert [x.id for x in await store.list_leases("db/app/")] == ["db/app/0", "db/app/1"]
    assert len(await store.list_leases("db/")) == 4
    assert len(await store.list_leases("")) == 4
    assert await store.list_leases("db/app%") == []  # no LIKE wildcards


async def test_recovery_records_and_sealed_blobs(store: DatabaseRepository) -> None:
    await store.insert_connection(connection())
    await store.put_recovery(RecoveryRecord("main", b"new", "kek._system.1", T0))
    await store.put_recovery(RecoveryRecord("main", b"newer", "kek._system.1", T0))
    assert (await store.get_recovery("main")).sealed_password == b"newer"  # type: ignore[union-attr]
    assert {t for t, _, _ in await store.sealed_blobs("kek._system.2")} == {
        "db_connections",
        "db_root_recovery",
    }
    assert await store.label_in_use("kek._system.1")
    await store.finish_rotation("main", b"final", "kek._system.2", T0)
    assert await store.get_recovery("main") is None
    record = await store.get_connection("main")
    assert record is not None and record.sealed_password == b"final" and record.rotated_at == T0
    assert not await store.label_in_use("kek._system.1")
    assert not await store.replace_blob("db_connections", "main", b"stale", b"x", "kek._system.3")
    assert await store.replace_blob("db_connections", "main", b"final", b"x", "kek._system.3")


async def test_lease_stats(store: DatabaseRepository) -> None:
    assert await store.lease_stats(T0) == (0, None)
    await store.insert_lease(lease("db/app/1", "u1"))  # pending, due T0 + 30 s
    await store.insert_lease(lease("db/app/2", "u2", due_at=T0 + dt.timedelta(seconds=5)))
    assert await store.lease_stats(T0) == (2, None)
    later = T0 + dt.timedelta(seconds=40)
    assert await store.lease_stats(later) == (2, T0 + dt.timedelta(seconds=5))
    await store.revocation_failed("db/app/2", later, "x", give_up=True)  # irrevocable: ignored
    assert await store.lease_stats(later) == (2, T0 + dt.timedelta(seconds=30))


# -- static roles (issue 12) ----------------------------------------------------------------------


def static_role(name: str = "app", username: str = "app_user") -> StaticRoleRecord:
    return StaticRoleRecord(
        name, "main", username, "web", "acme", "prod", 30 * 86400, None, None, None, 0, None, T0, T0
    )


def intent(role: str = "app", version: int = 1) -> StaticIntentRecord:
    return StaticIntentRecord(role, b"\x00new", "kek._system.1", version, "added", T0)


async def test_static_roles_round_trip_and_unique_users(store: DatabaseRepository) -> None:
    with pytest.raises(FailedPrecondition):
        await store.insert_static_role(static_role())  # no connection yet
    await store.insert_connection(connection())
    await store.insert_static_role(static_role())
    assert await store.get_static_role("app") == static_role()
    with pytest.raises(AlreadyExists):
        await store.insert_static_role(static_role())
    with pytest.raises(AlreadyExists):
        await store.insert_static_role(static_role("other"))  # same user
    await store.insert_static_role(static_role("b", "b_user"))
    assert [r.name for r in await store.list_static_roles()] == ["app", "b"]
    assert [r.name for r in await store.list_static_roles("nobody")] == []
    with pytest.raises(FailedPrecondition, match="static roles"):
        await store.delete_connection("main")
    assert await store.delete_static_role("b")
    assert not await store.delete_static_role("b")


async def test_static_intent_is_written_once_and_finished_once(store: DatabaseRepository) -> None:
    await store.insert_connection(connection())
    await store.insert_static_role(static_role())
    assert await store.put_static_intent(intent())
    assert not await store.put_static_intent(intent(version=2))  # one in flight at a time
    assert not await store.put_static_intent(intent("absent"))
    assert await store.get_static_intent("app") == intent()
    later = T0 + dt.timedelta(days=30)
    assert [r.name for r in await store.due_static_roles(T0 - dt.timedelta(days=1), 10)] == ["app"]
    assert await store.finish_static_rotation("app", 1, b"\x00cur", "kek._system.1", T0, later)
    assert not await store.finish_static_rotation("app", 1, b"\x00cur", "kek._system.1", T0, later)
    record = await store.get_static_role("app")
    assert record is not None
    assert (record.version, record.sealed_password, record.next_rotation_at) == (
        1,
        b"\x00cur",
        later,
    )
    assert await store.get_static_intent("app") is None
    assert await store.due_static_roles(T0, 10) == []
    assert [r.name for r in await store.due_static_roles(later, 10)] == ["app"]
    blobs = await store.sealed_blobs("kek._system.2")
    assert ("db_static_roles", "app") in {(t, k) for t, k, _ in blobs}
    assert await store.label_in_use("kek._system.1")
    assert await store.replace_blob("db_static_roles", "app", b"\x00cur", b"\x00new2", "kek.2")
    assert await store.put_static_intent(intent(version=2))
    await store.delete_static_intent("app", 2)
    assert await store.get_static_intent("app") is None
    assert await store.put_static_intent(intent(version=2))
    assert await store.delete_static_role("app")  # its intent goes with it
    assert await store.get_static_intent("app") is None
