"""The fake engine keeps the parts of the engine contract (broker/database/engine.py) that the
lease tests rely on. It does not run tests/contract/test_database_engine.py: that suite logs in
as the users it creates, over the wire, which a fake cannot stand in for."""

from __future__ import annotations

import datetime as dt

import pytest

from broker.database.engine import AdminLoginRefused, EngineUnavailable, NewUser, StatementFailed
from broker.database.template import Template
from tests.fixtures.fakeengine import FakeDatabase

T0 = dt.datetime(2026, 3, 1, 12, 0, tzinfo=dt.UTC)
CREATION = Template.parse("CREATE ROLE {{name}} WITH LOGIN PASSWORD {{password}};", "postgresql")


async def test_create_renew_revoke_and_revoke_is_idempotent() -> None:
    db = FakeDatabase()
    engine = db.open("postgresql", "postgresql://admin@db/app", db.admin_password)
    await engine.verify()
    await engine.create_user(CREATION, NewUser("v_a", "pw-1", T0))
    assert await engine.user_exists("v_a")
    await engine.renew_user("v_a", T0 + dt.timedelta(hours=1))
    assert db.users["v_a"].expiration == T0 + dt.timedelta(hours=1)
    await engine.revoke_user("v_a")
    await engine.revoke_user("v_a")  # already gone: still succeeds
    assert not await engine.user_exists("v_a")


async def test_refused_statements_leave_no_user_and_a_wrong_password_is_refused() -> None:
    db = FakeDatabase(refuse_statements="permission denied")
    engine = db.open("postgresql", "postgresql://admin@db/app", db.admin_password)
    with pytest.raises(StatementFailed, match="permission denied"):
        await engine.create_user(CREATION, NewUser("v_b", "pw-2", T0))
    assert db.users == {}
    wrong = db.open("postgresql", "postgresql://admin@db/app", "not-the-password")
    with pytest.raises(AdminLoginRefused):
        await wrong.verify()


async def test_unreachable_and_root_rotation() -> None:
    db = FakeDatabase()
    engine = db.open("postgresql", "postgresql://admin@db/app", db.admin_password)
    old = db.open("postgresql", "postgresql://admin@db/app", db.admin_password)
    await engine.rotate_root("new-root-password")
    await engine.verify()  # the rotating session stays logged in
    with pytest.raises(AdminLoginRefused):  # a login with the old password is refused
        await old.verify()
    await db.open("postgresql", "postgresql://admin@db/app", "new-root-password").verify()
    db.up = False
    with pytest.raises(EngineUnavailable):
        await engine.user_exists("v_c")
