"""The lease state machine of dynamic database credentials, on the fake clock against the
in-memory engine (tests/fixtures/fakeengine.py) and a SQLite store: no database server.

Invariant 4: a lease is written "pending" before its user exists, and every user the broker
creates is dropped by its lease's end, whatever happens in between: a crash after the pending
insert, a creation that times out, a creation that loses the race to the reaper, a database
that refuses or goes away.
"""

from __future__ import annotations

import asyncio
import datetime as dt
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import pytest

from broker.database.credentials import (
    CredentialService,
    DatabaseSettings,
    IssuedCredentials,
    RoleSpec,
)
from broker.database.engine import EngineUnavailable, NewUser, StatementFailed
from broker.envelope import Envelope
from broker.errors import NotFound, PermissionDenied, Unavailable
from broker.policy import Authorize, Caller, Decision, DefaultPolicy
from broker.storage import open_storage
from broker.storage.database import LeaseRecord
from broker.storage.sql import SqlStorage
from ca.clock import FakeClock
from ca.keys.software import SoftwareBackend
from tests.fixtures.fakeengine import FakeDatabase, FakeUser

T0 = dt.datetime(2026, 3, 1, 12, 0, 0, tzinfo=dt.UTC)
WEB = "spiffe://example.org/acme/prod/web"
OTHER = "spiffe://example.org/acme/prod/billing"
CREATION = "CREATE ROLE {{name}} WITH LOGIN PASSWORD {{password}};"


@dataclass
class World:
    clock: FakeClock
    db: FakeDatabase
    storage: SqlStorage
    envelope: Envelope
    service: CredentialService

    def restarted(self) -> CredentialService:
        """Another broker process over the same storage and database (e.g. after a crash)."""
        return CredentialService(
            self.storage.database(),
            self.envelope,
            self.clock,
            engines=self.db.open,
            settings=self.service.settings,
        )

    async def leases(self) -> list[LeaseRecord]:
        return await self.storage.database().list_leases()


def _user(user: NewUser) -> FakeUser:
    return FakeUser(user.password, user.expiration)


def caller(spiffe_id: str = WEB, *, operator: bool = False) -> Caller:
    parts = spiffe_id.split("/")
    attributes = {"tenant": parts[3], "environment": parts[4], "service": parts[5]}
    return Caller(spiffe_id, operator, {} if operator else attributes, roles=frozenset({"admin"}))


def authorizer(who: Caller, action: str, decided: list[Decision]) -> Authorize:
    """What the request pipeline hands the domain: the policy's decision for this caller,
    raising PermissionDenied when refused (each decision kept, like the audit event)."""
    policy = DefaultPolicy([])

    def authorize(resource: str, attributes: Mapping[str, str] | None = None, /) -> Decision:
        decision = policy.decide(who, action, resource, attributes=attributes)
        decided.append(decision)
        if not decision.allowed:
            raise PermissionDenied(decision.reason)
        return decision

    return authorize


@pytest.fixture
async def world(tmp_path: Path) -> AsyncIterator[World]:
    storage = await open_storage(f"sqlite://{tmp_path / 'broker.db'}")
    assert isinstance(storage, SqlStorage)
    await storage.migrate()
    clock = FakeClock(T0)
    db = FakeDatabase()
    envelope = Envelope(SoftwareBackend(), storage)
    settings = DatabaseSettings(creation_timeout=dt.timedelta(seconds=30))
    service = CredentialService(
        storage.database(), envelope, clock, engines=db.open, settings=settings
    )
    await service.add_connection("main", "postgresql", "postgresql://admin@db/app", "root-password")
    await service.add_role(
        RoleSpec(
            "app",
            "main",
            CREATION,
            default_ttl=dt.timedelta(minutes=10),
            max_ttl=dt.timedelta(hours=1),
            owner="web",
            tenant="acme",
            environment="prod",
        )
    )
    try:
        yield World(clock, db, storage, envelope, service)
    finally:
        await service.close()
        await storage.close()


async def issue(world: World, who: Caller | None = None, role: str = "app") -> IssuedCredentials:
    who = who or caller()
    return await world.service.issue(role, who, authorizer(who, "db.creds", []))


async def test_the_lease_is_pending_before_the_user_exists_then_active(world: World) -> None:
    seen: list[tuple[str, bool]] = []

    async def before(user: NewUser) -> None:
        (lease,) = await world.leases()
        seen.append((lease.state, user.username in world.db.users))

    world.db.before_create = before
    issued = await issue(world)
    assert seen == [("pending", False)]
    (lease,) = await world.leases()
    assert lease.state == "active" and lease.due_at == lease.expires_at
    assert lease.expires_at == T0 + dt.timedelta(minutes=10)
    assert world.db.users[lease.username].expiration == lease.expires_at
    assert issued.lease == lease


async def test_a_crash_after_the_pending_insert_is_finished_by_the_reaper(world: World) -> None:
    """The process dies after the lease was written and the database created the user, before
    the lease became active: another process's reaper drops the user once the creation
    deadline has passed, not before."""
    created = asyncio.Event()
    frozen = asyncio.Event()  # never set: the first process never gets past this point

    async def before(user: NewUser) -> None:
        world.db.users[user.username] = _user(user)
        created.set()
        await frozen.wait()

    world.db.before_create = before
    crashed = asyncio.create_task(issue(world))
    await created.wait()
    (lease,) = await world.leases()
    assert lease.state == "pending" and lease.username in world.db.users

    survivor = world.restarted()
    try:
        world.clock.advance(seconds=29)
        assert (await survivor.reap_once()).revoked == []  # still within its creation deadline
        assert lease.username in world.db.users
        world.clock.advance(seconds=2)
        result = await survivor.reap_once()
        assert [r.id for r in result.revoked] == [lease.id] and result.failed == []
        assert lease.username not in world.db.users
        assert await world.leases() == []
    finally:
        crashed.cancel()
        with pytest.raises(asyncio.CancelledError):
            await crashed
        await survivor.close()
    assert await world.leases() == [] and world.db.users == {}


async def test_a_creation_that_times_out_is_handed_to_the_reaper(world: World) -> None:
    """The database created the user but its answer never came: the request is refused
    (UNAVAILABLE), the lease goes to "revoking", and the reaper drops the user."""
    world.service.settings = DatabaseSettings(creation_timeout=dt.timedelta(milliseconds=20))
    never = asyncio.Event()

    async def before(user: NewUser) -> None:
        world.db.users[user.username] = _user(user)
        await never.wait()

    world.db.before_create = before
    with pytest.raises(Unavailable, match="timed out; the lease is revoked"):
        await issue(world)
    (lease,) = await world.leases()
    assert lease.state == "revoking" and lease.username in world.db.users
    world.db.before_create = None
    world.clock.advance(seconds=1)
    result = await world.service.reap_once()
    assert [r.id for r in result.revoked] == [lease.id]
    assert world.db.users == {} and await world.leases() == []


async def test_a_creation_that_loses_the_race_to_the_reaper_undoes_its_user(
    world: World,
) -> None:
    """Creation runs past its deadline (on the fake clock) and the reaper claims the pending
    lease meanwhile; when creation then succeeds the lease cannot become active, so the
    issuer drops the user it just made and refuses the request."""
    reaped: list[list[str]] = []

    async def before(user: NewUser) -> None:
        world.clock.advance(seconds=31)
        result = await world.service.reap_once()
        reaped.append([r.id for r in result.revoked])

    world.db.before_create = before
    with pytest.raises(Unavailable, match="took too long; it was revoked"):
        await issue(world)
    assert len(reaped) == 1 and len(reaped[0]) == 1  # the reaper took the pending lease
    assert world.db.users == {}  # created after the reaper's revocation, then undone
    assert await world.leases() == []
    (username,) = {c.split()[1] for c in world.db.calls if c.startswith("create ")}
    assert [c.split()[0] for c in world.db.calls if c.endswith(" " + username)] == [
        "create",  # started; the reaper ran while it was under way:
        "revoke",  # the reaper's (nothing to drop yet)
        "revoke",  # the issuer's, undoing the user created after the reaper took the lease
    ]


async def test_refused_statements_leave_neither_user_nor_lease(world: World) -> None:
    world.db.refuse_statements = 'relation "no_such_table" does not exist'
    with pytest.raises(StatementFailed, match="no_such_table"):
        await issue(world)
    assert world.db.users == {} and await world.leases() == []


async def test_a_database_gone_mid_creation_is_retried_by_the_reaper(world: World) -> None:
    async def before(user: NewUser) -> None:
        world.db.users[user.username] = _user(user)
        world.db.up = False
        raise EngineUnavailable("postgresql at fake:5432 is unavailable: reset")

    world.db.before_create = before
    with pytest.raises(EngineUnavailable):
        await issue(world)
    (lease,) = await world.leases()
    assert lease.state == "revoking"
    world.db.before_create = None
    world.clock.advance(seconds=1)
    result = await world.service.reap_once()
    assert result.revoked == [] and len(result.failed) == 1  # still down: retried later
    (lease,) = await world.leases()
    assert lease.attempts == 1 and lease.due_at == T0 + dt.timedelta(seconds=1 + 4)
    world.db.up = True
    world.clock.advance(seconds=4)
    assert [r.id for r in (await world.service.reap_once()).revoked] == [lease.id]
    assert world.db.users == {} and await world.leases() == []


async def test_expiry_renewal_and_revocation_by_the_holder_only(world: World) -> None:
    issued = await issue(world)
    lease = issued.lease
    web, other = caller(), caller(OTHER)
    decided: list[Decision] = []
    with pytest.raises(PermissionDenied):
        await world.service.renew(lease.id, authorizer(other, "lease.renew", decided))
    with pytest.raises(PermissionDenied):
        await world.service.revoke(lease.id, authorizer(other, "lease.revoke", decided))
    # an unknown lease is refused the same way (decided as nobody's)
    with pytest.raises(PermissionDenied) as unknown:
        await world.service.revoke("db/app/nope", authorizer(other, "lease.revoke", decided))
    assert str(unknown.value) == decided[1].reason
    assert [(await world.leases())[0].state] == ["active"]
    world.clock.advance(seconds=300)
    renewed = await world.service.renew(
        lease.id,
        authorizer(web, "lease.renew", decided),
        dt.timedelta(hours=2),
    )
    assert renewed.expires_at == lease.max_expires_at  # capped at the max TTL
    assert world.db.users[lease.username].expiration == renewed.expires_at
    world.clock.advance(seconds=3300)
    result = await world.service.reap_once()
    assert [r.id for r in result.revoked] == [lease.id]
    assert world.db.users == {} and await world.leases() == []


async def test_unknown_roles_cannot_be_told_from_refused_ones(world: World) -> None:
    """Issue 17: the same refusal for a role that does not exist and one the caller may not
    use; the decisions (for the audit event) keep the real reasons; nothing is created."""
    other = caller(OTHER)
    decided: list[Decision] = []
    with pytest.raises(PermissionDenied) as refused:
        await world.service.issue("app", other, authorizer(other, "db.creds", decided))
    with pytest.raises(PermissionDenied) as unknown:
        await world.service.issue("nope", other, authorizer(other, "db.creds", decided))
    assert str(refused.value) == str(unknown.value)
    assert "web" not in str(unknown.value) and "nope" not in str(unknown.value)
    assert [d.allowed for d in decided] == [False, False]
    assert "owning service 'web'" in decided[0].reason
    assert world.db.users == {} and await world.leases() == []
    operator = caller("spiffe://example.org/broker/operator/alice", operator=True)
    with pytest.raises(NotFound, match="no role named 'nope'"):
        await world.service.issue("nope", operator, authorizer(operator, "db.creds", []))


async def test_an_interrupted_root_rotation_keeps_the_password_that_works(world: World) -> None:
    """The database took the new admin password but the answer was lost: the recovery record
    (written first) holds it, and the next use of the connection settles it."""
    world.db.lose_rotation_answer = True
    with pytest.raises(EngineUnavailable):
        await world.service.rotate_root("main")
    store = world.storage.database()
    assert await store.get_recovery("main") is not None
    assert world.db.admin_password != "root-password"
    world.db.lose_rotation_answer = False
    restarted = world.restarted()
    try:
        issued = await restarted.issue("app", caller(), authorizer(caller(), "db.creds", []))
        assert issued.username in world.db.users
        assert await store.get_recovery("main") is None
    finally:
        await restarted.close()
