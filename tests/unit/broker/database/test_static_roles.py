"""Static database roles on the fake clock against the in-memory engine
(tests/fixtures/fakeengine.py) and a SQLite store: adding rotates at once, credentials go to
the owner only, bad input is refused with nothing changed, and a rotation that crashes at any
step is rolled forward so the stored password and the database's agree.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from broker.database.credentials import CredentialService
from broker.database.static import StaticRoleSpec
from broker.envelope import Envelope
from broker.errors import (
    AlreadyExists,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    PermissionDenied,
    Unavailable,
)
from broker.policy import Action, Authorize, Caller, Decision, DefaultPolicy
from broker.storage import open_storage
from broker.storage.database import DatabaseRepository, StaticRoleRecord
from broker.storage.sql import SqlStorage
from ca.clock import FakeClock
from ca.keys.software import SoftwareBackend
from tests.fixtures.fakeengine import FakeDatabase, FakeUser

T0 = dt.datetime(2026, 3, 1, 12, 0, 0, tzinfo=dt.UTC)
WEB = "spiffe://example.org/acme/prod/web"
OTHER = "spiffe://example.org/acme/prod/billing"


class Crash(BaseException):
    """The broker process dies here (kill -9): nothing after it runs, no handler sees it."""


def caller(spiffe_id: str = WEB, *, operator: bool = False) -> Caller:
    parts = spiffe_id.split("/")
    attributes = {"tenant": parts[3], "environment": parts[4], "service": parts[5]}
    return Caller(spiffe_id, operator, {} if operator else attributes, roles=frozenset({"admin"}))


def authorizer(who: Caller) -> Authorize:
    policy = DefaultPolicy([])

    def authorize(resource: str, attributes: Mapping[str, str] | None = None, /) -> Decision:
        decision = policy.decide(who, Action.DB_CREDS, resource, attributes=attributes)
        if not decision.allowed:
            raise PermissionDenied(decision.reason)
        return decision

    return authorize


class CrashingStore:
    """The storage, dying before or after one chosen write."""

    def __init__(self, inner: DatabaseRepository, method: str, when: str) -> None:
        self._inner = inner
        self._method = method
        self._when = when

    def __getattr__(self, name: str) -> Any:
        real = getattr(self._inner, name)
        if name != self._method:
            return real

        async def dying(*args: Any, **kwargs: Any) -> Any:
            if self._when == "before":
                raise Crash(name)
            await real(*args, **kwargs)
            raise Crash(name)

        return dying


@dataclass
class World:
    clock: FakeClock
    db: FakeDatabase
    storage: SqlStorage
    envelope: Envelope
    service: CredentialService
    audit: list[Mapping[str, Any]]

    def restarted(self, store: Any = None) -> CredentialService:
        """Another broker process over the same storage and database (after a crash)."""
        return CredentialService(
            store or self.storage.database(), self.envelope, self.clock, engines=self.db.open
        )

    async def stored(self, name: str = "app") -> StaticRoleRecord:
        record = await self.storage.database().get_static_role(name)
        assert record is not None
        return record


async def _audit(events: list[Mapping[str, Any]], event: Mapping[str, Any]) -> None:
    events.append(event)


@pytest.fixture
async def world(tmp_path: Path) -> AsyncIterator[World]:
    storage = await open_storage(f"sqlite://{tmp_path / 'broker.db'}")
    assert isinstance(storage, SqlStorage)
    await storage.migrate()
    clock = FakeClock(T0)
    db = FakeDatabase()
    db.users["app_user"] = FakeUser("initial-known-to-a-person", T0 + dt.timedelta(days=999))
    envelope = Envelope(SoftwareBackend(), storage)
    events: list[Mapping[str, Any]] = []
    service = CredentialService(
        storage.database(),
        envelope,
        clock,
        engines=db.open,
        audit=lambda event: _audit(events, event),
    )
    await service.add_connection("main", "postgresql", "postgresql://admin@db/app", "root-password")
    try:
        yield World(clock, db, storage, envelope, service, events)
    finally:
        await service.close()
        await storage.close()


def spec(**changes: Any) -> StaticRoleSpec:
    values: dict[str, Any] = {
        "name": "app",
        "connection": "main",
        "username": "app_user",
        "rotation_period": dt.timedelta(days=30),
        "owner": "web",
        "tenant": "acme",
        "environment": "prod",
    }
    values.update(changes)
    return StaticRoleSpec(**values)


async def test_adding_rotates_at_once_and_the_owner_reads_what_the_database_takes(
    world: World,
) -> None:
    record = await world.service.static.add(spec())
    assert record.version == 1
    assert record.next_rotation_at == T0 + dt.timedelta(days=30)
    password = world.db.users["app_user"].password
    assert password != "initial-known-to-a-person"  # nobody but the broker knows it now
    assert len(password) == 32
    creds = await world.service.static.credentials("app", caller(), authorizer(caller()))
    assert (creds.username, creds.password, creds.role.version) == ("app_user", password, 1)
    assert [e["what"] for e in world.audit] == ["db.static-role.rotate"]
    assert world.audit[0]["outcome"] == "rotated"
    details = world.audit[0]["details"]
    assert (details["before"], details["after"], details["trigger"]) == (0, 1, "manual")
    assert password not in repr(world.audit)


async def test_passwords_come_from_the_random_source_given(world: World) -> None:
    drawn: list[int] = []

    def counting(n: int) -> bytes:
        drawn.append(n)
        return bytes(range(n % 256)) * (n // 256) + bytes(range(n % 256))

    service = CredentialService(
        world.storage.database(),
        world.envelope,
        world.clock,
        engines=world.db.open,
        random=counting,
    )
    await service.static.add(spec())
    assert drawn  # the backend's generator, not the process's
    await service.close()


async def test_another_service_is_refused_and_cannot_tell_an_absent_role(world: World) -> None:
    await world.service.static.add(spec())
    other = caller(OTHER)
    with pytest.raises(PermissionDenied) as present:
        await world.service.static.credentials("app", other, authorizer(other))
    with pytest.raises(PermissionDenied) as absent:
        await world.service.static.credentials("nope", other, authorizer(other))
    assert str(present.value) == str(absent.value)
    assert "web" not in str(absent.value) and "nope" not in str(absent.value)
    operator = caller("spiffe://example.org/broker/operator/alice", operator=True)
    with pytest.raises(NotFound, match="no static role named 'nope'"):
        await world.service.static.credentials("nope", operator, authorizer(operator))


async def test_on_demand_rotation_changes_the_password_and_the_version(world: World) -> None:
    await world.service.static.add(spec())
    first = world.db.users["app_user"].password
    world.clock.advance(days=1)
    record = await world.service.static.rotate("app", "personnel-change", actor="alice")
    assert record.version == 2
    assert record.next_rotation_at == T0 + dt.timedelta(days=31)
    assert world.db.users["app_user"].password != first
    creds = await world.service.static.credentials("app", caller(), authorizer(caller()))
    assert creds.password == world.db.users["app_user"].password


@pytest.mark.parametrize(
    ("changes", "error", "text"),
    [
        ({"connection": "nope"}, NotFound, "no connection named 'nope'"),
        ({"username": "ghost"}, FailedPrecondition, "has no user 'ghost'"),
        ({"username": "x'; DROP ROLE admin; --"}, InvalidArgument, "invalid database username"),
        ({"username": 'a"b'}, InvalidArgument, "invalid database username"),
        ({"name": "Bad Name"}, InvalidArgument, "invalid static role name"),
        ({"owner": "we;b"}, InvalidArgument, "invalid owner name"),
        ({"rotation_period": dt.timedelta(minutes=5)}, InvalidArgument, "between 1h and 366d"),
        ({"rotation_period": dt.timedelta(days=400)}, InvalidArgument, "between 1h and 366d"),
        (
            {"rotation_statements": "ALTER ROLE {{name}} SUPERUSER"},
            InvalidArgument,
            "must use both",
        ),
        (
            {
                "rotation_statements": (
                    "DROP ROLE {{name}}; ALTER ROLE {{name}} PASSWORD {{password}}"
                )
            },
            InvalidArgument,
            "may only be ALTER ROLE",
        ),
        (
            {"rotation_statements": "ALTER ROLE {{name}} PASSWORD '{{password}}x'"},
            InvalidArgument,
            "rotation statements",
        ),
        (
            {"rotation_statements": "ALTER ROLE {{name}} VALID UNTIL {{expiration}} {{password}}"},
            InvalidArgument,
            "only use {{name}} and {{password}}",
        ),
    ],
)
async def test_bad_input_is_refused_and_nothing_changes(
    world: World, changes: dict[str, Any], error: type[Exception], text: str
) -> None:
    before = world.db.users["app_user"].password
    with pytest.raises(error, match=_escape(text)):
        await world.service.static.add(spec(**changes))
    assert await world.storage.database().list_static_roles() == []
    assert world.db.users["app_user"].password == before
    assert not [c for c in world.db.calls if c.startswith("set-password")]


def _escape(text: str) -> str:
    import re

    return re.escape(text)


async def test_a_second_role_for_the_same_user_or_name_is_refused(world: World) -> None:
    await world.service.static.add(spec())
    password = world.db.users["app_user"].password
    with pytest.raises(AlreadyExists):
        await world.service.static.add(spec())
    with pytest.raises(AlreadyExists):
        await world.service.static.add(spec(name="app2"))
    assert world.db.users["app_user"].password == password
    assert [r.name for r in await world.storage.database().list_static_roles()] == ["app"]


async def test_unknown_role_rotate_and_delete_are_not_found(world: World) -> None:
    with pytest.raises(NotFound):
        await world.service.static.rotate("nope", "x")
    with pytest.raises(NotFound):
        await world.service.static.remove("nope")


async def test_a_user_dropped_meanwhile_fails_the_rotation_and_keeps_the_old_password(
    world: World,
) -> None:
    await world.service.static.add(spec())
    before = await world.stored()
    del world.db.users["app_user"]
    with pytest.raises(FailedPrecondition):
        await world.service.static.rotate("app", "scheduled")
    after = await world.stored()
    assert after == before
    assert await world.storage.database().get_static_intent("app") is None
    assert world.audit[-1]["outcome"] == "failed"


async def test_deleting_a_connection_with_static_roles_is_refused(world: World) -> None:
    await world.service.static.add(spec())
    with pytest.raises(FailedPrecondition, match="static roles app"):
        await world.service.remove_connection("main")
    await world.service.static.remove("app")
    await world.service.remove_connection("main")


# -- a crash at every step of a rotation ----------------------------------------------------------

CRASH_POINTS = [
    ("put_static_intent", "before"),  # nothing written yet
    ("put_static_intent", "after"),  # intent written, database untouched
    ("set_password", "before"),  # the engine call starts, the database unchanged
    ("set_password", "lost"),  # the database changed, the answer lost
    ("finish_static_rotation", "before"),  # the database changed, not stored
    ("finish_static_rotation", "after"),  # stored, the process dies before returning
]


@pytest.mark.parametrize(("step", "when"), CRASH_POINTS)
async def test_a_crash_at_any_step_is_rolled_forward_and_both_sides_agree(
    world: World, step: str, when: str
) -> None:
    await world.service.static.add(spec())
    old_version = (await world.stored()).version
    store: Any = None
    if step == "set_password":
        if when == "before":

            async def die(username: str) -> None:
                raise Crash("set_password")

            world.db.before_set_password = die
        else:
            world.db.lose_set_password_answer = True
    else:
        store = CrashingStore(world.storage.database(), step, when)
    dying = world.restarted(store)
    with pytest.raises((Crash, Unavailable)):
        await dying.static.rotate("app", "personnel-change")
    world.db.before_set_password = None
    world.db.lose_set_password_answer = False

    # A new process: its startup settles whatever was in flight.
    fresh = world.restarted()
    await fresh.recover_all()
    assert await world.storage.database().get_static_intent("app") is None
    record = await world.stored()
    assert record.version in (old_version, old_version + 1)
    if step != "put_static_intent":  # the intent was written: rolled forward, not dropped
        assert record.version == old_version + 1
    creds = await fresh.static.credentials("app", caller(), authorizer(caller()))
    assert creds.password == world.db.users["app_user"].password
    # And the next rotation works as usual.
    again = await fresh.static.rotate("app", "after the crash")
    assert again.version == record.version + 1
    creds = await fresh.static.credentials("app", caller(), authorizer(caller()))
    assert creds.password == world.db.users["app_user"].password
    await dying.close()
    await fresh.close()


async def test_a_rotation_in_flight_is_settled_before_credentials_are_read(world: World) -> None:
    await world.service.static.add(spec())
    world.db.up = False
    with pytest.raises(Unavailable):
        await world.service.static.rotate("app", "scheduled")
    assert await world.storage.database().get_static_intent("app") is not None
    with pytest.raises(Unavailable):  # never a password the database may not take
        await world.service.static.credentials("app", caller(), authorizer(caller()))
    world.db.up = True
    creds = await world.service.static.credentials("app", caller(), authorizer(caller()))
    assert creds.password == world.db.users["app_user"].password
    assert creds.role.version == 2


async def test_root_rotation_rotates_the_connections_static_roles(world: World) -> None:
    await world.service.static.add(spec())
    before = world.db.users["app_user"].password
    await world.service.rotate_root("main")
    assert (await world.stored()).version == 2
    assert world.db.users["app_user"].password != before
    creds = await world.service.static.credentials("app", caller(), authorizer(caller()))
    assert creds.password == world.db.users["app_user"].password


async def test_kek_rotation_reaches_static_role_passwords(world: World) -> None:
    await world.service.static.add(spec())
    label = (await world.stored()).kek_label
    assert label is not None
    assert await world.service.kek_in_use(label)
    blobs = await world.storage.database().sealed_blobs("another-label")
    assert ("db_static_roles", "app") in {(t, k) for t, k, _ in blobs}


# -- scheduled rotation ---------------------------------------------------------------------------


def _rotations(outcome: str) -> float:
    from prometheus_client import REGISTRY

    value = REGISTRY.get_sample_value(
        "broker_rotation_total", {"kind": "static-role", "outcome": outcome}
    )
    return value or 0.0


async def test_the_scheduled_job_rotates_what_is_due_and_only_as_leader(world: World) -> None:
    from broker.database.scheduler import StaticRotationJob

    await world.service.static.add(spec())
    leader = StaticRotationJob(world.service.static, world.storage, world.clock, owner="a")
    other = StaticRotationJob(world.service.static, world.storage, world.clock, owner="b")
    nothing = await leader.tick()
    assert nothing is not None and nothing.rotated == []  # not due yet
    assert await other.tick() is None  # the leader lease is held
    before = world.db.users["app_user"].password
    successes = _rotations("success")
    world.clock.advance(days=30)
    result = await leader.tick()
    assert result is not None and result.rotated == ["app"]
    assert world.db.users["app_user"].password != before
    assert (await world.stored()).next_rotation_at == T0 + dt.timedelta(days=60)
    assert _rotations("success") == successes + 1
    assert world.audit[-1]["who"] == "broker/static-rotation"


async def test_a_failed_scheduled_rotation_stays_due_and_is_retried(world: World) -> None:
    from broker.database.scheduler import StaticRotationJob

    await world.service.static.add(spec())
    job = StaticRotationJob(
        world.service.static, world.storage, world.clock, retry_after=dt.timedelta(minutes=1)
    )
    world.clock.advance(days=31)
    failures = _rotations("failure")
    del world.db.users["app_user"]  # refused: nothing changes
    result = await job.tick()
    assert result is not None and [name for name, _ in result.failed] == ["app"]
    assert _rotations("failure") == failures + 1
    assert (await world.stored()).version == 1
    world.db.users["app_user"] = FakeUser("restored", T0)
    again = await job.tick()
    assert again is not None and again.rotated == [] and again.failed == []  # backing off
    world.clock.advance(minutes=2)
    done = await job.tick()
    assert done is not None and done.rotated == ["app"]
    creds = await world.service.static.credentials("app", caller(), authorizer(caller()))
    assert creds.password == world.db.users["app_user"].password


async def test_the_scheduled_job_rolls_forward_an_intent_left_in_flight(world: World) -> None:
    from broker.database.scheduler import StaticRotationJob

    await world.service.static.add(spec())
    world.db.lose_set_password_answer = True
    with pytest.raises(Unavailable):
        await world.service.static.rotate("app", "manual")
    world.db.lose_set_password_answer = False
    job = StaticRotationJob(world.service.static, world.storage, world.clock)
    result = await job.tick()
    assert result is not None and result.settled == ["app"]
    assert await world.storage.database().get_static_intent("app") is None
    creds = await world.service.static.credentials("app", caller(), authorizer(caller()))
    assert creds.password == world.db.users["app_user"].password
