"""Static database roles against a real PostgreSQL cluster and a real MariaDB server: the
password the broker stores and the one the database takes agree after adding, after an
on-demand (personnel-change) rotation and after a crash mid-rotation; an application session
opened before keeps working throughout; a connection with the new password works and one with
any earlier password is refused."""

from __future__ import annotations

import datetime as dt
import secrets
from collections.abc import AsyncIterator, Mapping
from pathlib import Path
from typing import Any

import pytest

from broker.database.credentials import CredentialService
from broker.database.engine import NewUser
from broker.database.static import StaticRoleSpec
from broker.envelope import Envelope
from broker.errors import FailedPrecondition, InvalidArgument
from broker.policy import Action, Authorize, Caller, Decision, DefaultPolicy
from broker.storage import open_storage
from broker.storage.sql import SqlStorage
from ca.clock import SystemClock
from ca.keys.software import SoftwareBackend
from tests.fixtures.dbtargets import Target, target_for

WEB = Caller(
    "spiffe://example.org/acme/prod/web",
    False,
    {"tenant": "acme", "environment": "prod", "service": "web"},
)
STATEMENTS = {
    "postgresql": "ALTER ROLE {{name}} WITH PASSWORD {{password}}",
    "mysql": "ALTER USER {{name}}@'%' IDENTIFIED BY {{password}}",
}


class Crash(BaseException):
    pass


def authorize(resource: str, attributes: Mapping[str, str] | None = None, /) -> Decision:
    decision = DefaultPolicy([]).decide(WEB, Action.DB_CREDS, resource, attributes=attributes)
    assert decision.allowed, decision.reason
    return decision


ALLOW: Authorize = authorize


@pytest.fixture(params=["postgresql", "mysql"])
async def target(request: pytest.FixtureRequest) -> AsyncIterator[Target]:
    async with target_for(request.param, request) as value:
        yield value


@pytest.fixture
async def storage(tmp_path: Path) -> AsyncIterator[SqlStorage]:
    value = await open_storage(f"sqlite://{tmp_path / 'broker.db'}")
    assert isinstance(value, SqlStorage)
    await value.migrate()
    yield value
    await value.close()


async def _app_user(target: Target) -> tuple[str, str]:
    """An application user created by a person, who knows its password."""
    name, password = f"app_{secrets.token_hex(4)}", secrets.token_urlsafe(18)
    engine = target.engine()
    try:
        await engine.create_user(
            target.template(target.creation.replace(" VALID UNTIL {{expiration}}", "")),
            NewUser(name, password, dt.datetime.now(dt.UTC) + dt.timedelta(days=3650)),
        )
    finally:
        await engine.close()
    return name, password


def _service(storage: SqlStorage, envelope: Envelope, store: Any = None) -> CredentialService:
    return CredentialService(store or storage.database(), envelope, SystemClock())


async def test_a_personnel_change_rotation_while_the_application_keeps_working(
    target: Target, storage: SqlStorage
) -> None:
    username, known = await _app_user(target)
    app = await target.login(username, known)  # the application's open connection
    envelope = Envelope(SoftwareBackend(), storage)
    service = _service(storage, envelope)
    try:
        await service.add_connection("main", target.plugin, target.dsn, target.password)
        role = await service.static.add(
            StaticRoleSpec("app", "main", username, owner="web", tenant="acme", environment="prod")
        )
        assert role.version == 1
        assert not await target.can_login(username, known)  # the person's password is gone
        first = await service.static.credentials("app", WEB, ALLOW)
        assert await target.can_login(username, first.password)
        assert await target.alive(app)

        await service.static.rotate("app", "personnel-change", actor="alice")
        second = await service.static.credentials("app", WEB, ALLOW)
        assert second.role.version == 2 and second.password != first.password
        assert await target.can_login(username, second.password)
        assert not await target.can_login(username, first.password)
        assert await target.alive(app), "an open application session survives the rotation"
        reconnected = await target.login(username, second.password)
        assert await target.alive(reconnected)
        await target.close_session(reconnected)
    finally:
        await target.close_session(app)
        await service.close()


async def test_rotation_statements_are_used(target: Target, storage: SqlStorage) -> None:
    username, _ = await _app_user(target)
    envelope = Envelope(SoftwareBackend(), storage)
    service = _service(storage, envelope)
    try:
        await service.add_connection("main", target.plugin, target.dsn, target.password)
        await service.static.add(
            StaticRoleSpec(
                "app", "main", username, owner="web", rotation_statements=STATEMENTS[target.plugin]
            )
        )
        web = Caller(
            "spiffe://example.org/default/dev/web",
            False,
            {"tenant": "default", "environment": "dev", "service": "web"},
        )

        def allow(resource: str, attributes: Mapping[str, str] | None = None, /) -> Decision:
            return DefaultPolicy([]).decide(web, Action.DB_CREDS, resource, attributes=attributes)

        creds = await service.static.credentials("app", web, allow)
        assert await target.can_login(username, creds.password)
    finally:
        await service.close()


async def test_a_crash_after_the_database_changed_is_rolled_forward(
    target: Target, storage: SqlStorage
) -> None:
    username, _ = await _app_user(target)
    envelope = Envelope(SoftwareBackend(), storage)
    service = _service(storage, envelope)
    await service.add_connection("main", target.plugin, target.dsn, target.password)
    await service.static.add(
        StaticRoleSpec("app", "main", username, owner="web", tenant="acme", environment="prod")
    )
    before = await service.static.credentials("app", WEB, ALLOW)
    await service.close()

    class Dying:
        def __getattr__(self, name: str) -> Any:
            real = getattr(storage.database(), name)
            if name != "finish_static_rotation":
                return real

            async def die(*args: Any, **kwargs: Any) -> bool:
                raise Crash(name)  # the database has the new password; storage does not

            return die

    dying = _service(storage, envelope, Dying())
    with pytest.raises(Crash):
        await dying.static.rotate("app", "scheduled")
    await dying.close()
    assert not await target.can_login(username, before.password)  # the database did change

    restarted = _service(storage, envelope)
    try:
        await restarted.recover_all()
        assert await storage.database().get_static_intent("app") is None
        after = await restarted.static.credentials("app", WEB, ALLOW)
        assert after.role.version == 2
        assert await target.can_login(username, after.password)
    finally:
        await restarted.close()


async def test_bad_input_changes_nothing_on_the_database(
    target: Target, storage: SqlStorage
) -> None:
    username, known = await _app_user(target)
    envelope = Envelope(SoftwareBackend(), storage)
    service = _service(storage, envelope)
    try:
        await service.add_connection("main", target.plugin, target.dsn, target.password)
        with pytest.raises(FailedPrecondition, match="has no user"):
            await service.static.add(StaticRoleSpec("ghost", "main", "no_such_user_here"))
        with pytest.raises(InvalidArgument):
            await service.static.add(StaticRoleSpec("x", "main", f"{username}'; DROP USER x"))
        injected = STATEMENTS[target.plugin] + "; DROP TABLE items"
        with pytest.raises(InvalidArgument, match="may only be ALTER"):
            await service.static.add(
                StaticRoleSpec("app", "main", username, rotation_statements=injected)
            )
        assert await storage.database().list_static_roles() == []
        assert await target.can_login(username, known)  # untouched
    finally:
        await service.close()
