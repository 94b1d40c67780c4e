"""Revocation by person: every lease, grant and static-role password tied to an identity or an
owning service ended in one call, one audit record per object, and nothing else touched."""

from __future__ import annotations

import datetime as dt
from collections.abc import AsyncIterator, Mapping
from pathlib import Path
from typing import Any

import pytest

from broker.access import AccessControl
from broker.database.credentials import CredentialService, RoleSpec
from broker.database.static import StaticRoleSpec
from broker.envelope import Envelope
from broker.errors import InvalidArgument
from broker.policy import Action, Caller, DefaultPolicy
from broker.revocation import SubjectRevocation
from broker.storage import open_storage
from broker.storage.sql import SqlStorage
from ca.clock import FakeClock
from ca.keys.software import SoftwareBackend
from tests.fixtures.fakeengine import FakeDatabase, FakeUser

T0 = dt.datetime(2026, 3, 1, 12, 0, 0, tzinfo=dt.UTC)
WEB = "spiffe://example.org/acme/prod/web"
BILLING = "spiffe://example.org/acme/prod/billing"
ALICE = Caller("spiffe://example.org/broker/operator/alice", True, {}, roles=frozenset({"admin"}))


def _workload(spiffe_id: str) -> Caller:
    tenant, environment, service = spiffe_id.split("/")[3:6]
    return Caller(
        spiffe_id, False, {"tenant": tenant, "environment": environment, "service": service}
    )


def _allow(who: Caller) -> Any:
    policy = DefaultPolicy([])

    def authorize(resource: str, attributes: Mapping[str, str] | None = None, /) -> Any:
        decision = policy.decide(who, Action.DB_CREDS, resource, attributes=attributes)
        assert decision.allowed, decision.reason
        return decision

    return authorize


class World:
    def __init__(self, storage: SqlStorage, clock: FakeClock, db: FakeDatabase) -> None:
        self.storage, self.clock, self.db = storage, clock, db
        self.events: list[Mapping[str, Any]] = []

        async def record(event: Mapping[str, Any]) -> None:
            self.events.append(event)

        self.database = CredentialService(
            storage.database(), Envelope(SoftwareBackend(), storage), clock, engines=db.open
        )
        self.access = AccessControl(
            storage.access(), storage, clock, trust_domain="example.org", operators=[]
        )
        self.revocation = SubjectRevocation(self.database, self.access, clock, record)


@pytest.fixture
async def world(tmp_path: Path) -> AsyncIterator[World]:
    storage = await open_storage(f"sqlite://{tmp_path / 'broker.db'}")
    assert isinstance(storage, SqlStorage)
    await storage.migrate()
    db = FakeDatabase()
    db.users["web_app"] = FakeUser("x", T0)
    db.users["billing_app"] = FakeUser("y", T0)
    w = World(storage, FakeClock(T0), db)
    await w.access.load()
    await w.database.add_connection(
        "main", "postgresql", "postgresql://admin@db/app", "root-password"
    )
    for service in ("web", "billing"):
        await w.database.add_role(
            RoleSpec(
                service,
                "main",
                "CREATE ROLE {{name}} WITH LOGIN PASSWORD {{password}};",
                owner=service,
                tenant="acme",
                environment="prod",
            )
        )
        await w.database.static.add(
            StaticRoleSpec(
                f"{service}-app",
                "main",
                f"{service}_app",
                owner=service,
                tenant="acme",
                environment="prod",
            )
        )
    try:
        yield w
    finally:
        await w.database.close()
        await storage.close()


async def test_revoking_an_identity_ends_its_leases_grants_and_static_passwords(
    world: World,
) -> None:
    web, billing = _workload(WEB), _workload(BILLING)
    mine = await world.database.issue("web", web, _allow(web))
    theirs = await world.database.issue("billing", billing, _allow(billing))
    grant = await world.access.create_grant(
        ALICE, WEB, "secrets.get", "acme/prod/x", dt.timedelta(hours=1), "incident 7"
    )
    other_grant = await world.access.create_grant(
        ALICE, BILLING, "secrets.get", "acme/prod/x", dt.timedelta(hours=1), "incident 7"
    )
    web_password = world.db.users["web_app"].password
    billing_password = world.db.users["billing_app"].password

    report = await world.revocation.revoke(
        ALICE, identity=WEB, reason="personnel-change", ticket="HR-1"
    )
    assert report.leases == [mine.lease.id]
    assert report.grants == [grant.id]
    assert report.static_roles == ["web-app"]
    assert report.failed == []
    assert mine.username not in world.db.users
    assert world.db.users["web_app"].password != web_password
    # nothing of anyone else changed
    assert theirs.username in world.db.users
    assert world.db.users["billing_app"].password == billing_password
    assert [g.id for g in await world.access.list_grants()] == [other_grant.id]
    # one audit record per object
    assert [(e["what"], e["resource"]) for e in world.events] == [
        ("subject.revoke.lease", mine.lease.id),
        ("subject.revoke.grant", grant.id),
        ("subject.revoke.static-role", "web-app"),
    ]
    assert all(e["who"] == ALICE.spiffe_id for e in world.events)
    assert all("HR-1" in e["reason"] for e in world.events)
    assert web_password not in repr(world.events)


async def test_revoking_an_owner_covers_every_holder_of_its_roles(world: World) -> None:
    web = _workload(WEB)
    first = await world.database.issue("web", web, _allow(web))
    report = await world.revocation.revoke(ALICE, owner="web", reason="personnel-change")
    assert report.leases == [first.lease.id]
    assert report.static_roles == ["web-app"]
    again = await world.revocation.revoke(ALICE, owner="web", reason="personnel-change")
    assert again.leases == [] and again.grants == []  # idempotent (passwords rotate again)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"identity": WEB, "owner": "web", "reason": "personnel-change"},
        {"reason": "personnel-change"},
        {"identity": "not-a-spiffe-id", "reason": "personnel-change"},
        {"owner": "We b", "reason": "personnel-change"},
        {"owner": "web", "reason": "because"},
    ],
)
async def test_bad_subjects_are_refused_and_nothing_changes(
    world: World, kwargs: dict[str, str]
) -> None:
    before = {name: u.password for name, u in world.db.users.items()}
    with pytest.raises(InvalidArgument):
        await world.revocation.revoke(ALICE, **kwargs)
    assert {name: u.password for name, u in world.db.users.items()} == before
    assert world.events == []
