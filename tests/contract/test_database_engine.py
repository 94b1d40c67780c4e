"""The database engine contract: one suite, run against a throwaway PostgreSQL cluster and a
throwaway MariaDB server (both checking passwords over TCP)."""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import secrets
import urllib.parse
from collections.abc import AsyncIterator
from typing import Any

import asyncpg
import pytest

from broker.database.engine import (
    Engine,
    EngineUnavailable,
    NewUser,
    StatementFailed,
    open_engine,
)
from tests.fixtures import dbtargets
from tests.fixtures.dbtargets import Target, target_for

CREATION = {
    "postgresql": dbtargets.CREATION["postgresql"],
    "mysql": dbtargets.CREATION["mysql"],
}
FAILING = {
    "postgresql": "CREATE ROLE {{name}} WITH LOGIN PASSWORD {{password}};\n"
    "GRANT SELECT ON no_such_table TO {{name}};",
    "mysql": "CREATE USER {{name}}@'%' IDENTIFIED BY {{password}};\n"
    "GRANT SELECT ON no_such_db.no_such_table TO {{name}}@'%';",
}
ECHO_PASSWORD = {
    "postgresql": "CREATE ROLE {{name}} WITH LOGIN PASSWORD {{password}};\n"
    "SELECT CAST({{password}} AS integer);",
    "mysql": "CREATE USER {{name}}@'%' IDENTIFIED BY {{password}};\n"
    "SIGNAL SQLSTATE '45000' SET MESSAGE_TEXT = {{password}};",
}


@pytest.fixture(params=["postgresql", "mysql"])
async def target(request: pytest.FixtureRequest) -> AsyncIterator[Target]:
    async with target_for(request.param, request) as value:
        yield value


@pytest.fixture
async def engine(target: Target) -> AsyncIterator[Engine]:
    engine = target.engine()
    yield engine
    await engine.close()


def new_user(password: str | None = None, name: str | None = None) -> NewUser:
    return NewUser(
        name or f"v_{secrets.token_hex(6)}",
        password if password is not None else secrets.token_urlsafe(24),
        dt.datetime.now(dt.UTC) + dt.timedelta(hours=1),
    )


async def test_verify_and_a_wrong_password_is_refused(target: Target, engine: Engine) -> None:
    await engine.verify()
    wrong = target.engine("not-the-password")
    try:
        with pytest.raises(StatementFailed, match="refused the admin login"):
            await wrong.verify()
    finally:
        await wrong.close()


async def test_unreachable_database_is_unavailable(target: Target) -> None:
    with contextlib.closing(__import__("socket").socket()) as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]  # bound, not listening: connections are refused
        parts = urllib.parse.urlsplit(target.dsn)
        dsn = parts._replace(netloc=f"{parts.username}@127.0.0.1:{port}").geturl()
        engine = open_engine(target.plugin, dsn, target.password)
        try:
            with pytest.raises(EngineUnavailable):
                await engine.verify()
            with pytest.raises(EngineUnavailable):
                await engine.create_user(target.template(CREATION[target.plugin]), new_user())
        finally:
            await engine.close()


async def test_created_user_logs_in_and_has_the_grants(target: Target, engine: Engine) -> None:
    user = new_user()
    await engine.create_user(target.template(CREATION[target.plugin]), user)
    assert await engine.user_exists(user.username)
    session = await target.login(user.username, user.password)
    try:
        assert await target.alive(session)
    finally:
        await target.close_session(session)
    assert not await target.can_login(user.username, user.password + "x")


async def test_revoke_ends_sessions_drops_the_user_and_is_idempotent(
    target: Target, engine: Engine
) -> None:
    user = new_user()
    await engine.create_user(target.template(CREATION[target.plugin]), user)
    session = await target.login(user.username, user.password)
    assert await target.alive(session)
    await engine.revoke_user(user.username)
    try:
        assert not await target.alive(session), "revocation must end open sessions"
    finally:
        await target.close_session(session)
    assert not await target.exists(user.username)
    assert not await target.can_login(user.username, user.password)
    await engine.revoke_user(user.username)  # already gone: succeeds
    await engine.revoke_user("v_never_existed")


async def test_custom_revocation_statements_run(target: Target, engine: Engine) -> None:
    user = new_user()
    await engine.create_user(target.template(CREATION[target.plugin]), user)
    revocation = {
        "postgresql": "REVOKE ALL ON items FROM {{name}}; DROP ROLE {{name}};",
        "mysql": "DROP USER {{name}}@'%';",
    }[target.plugin]
    await engine.revoke_user(user.username, target.template(revocation))
    assert not await target.exists(user.username)


async def test_revocation_that_leaves_the_user_fails(target: Target, engine: Engine) -> None:
    user = new_user()
    await engine.create_user(target.template(CREATION[target.plugin]), user)
    with pytest.raises(StatementFailed, match="left"):
        await engine.revoke_user(user.username, target.template("SELECT 1"))
    assert await target.exists(user.username)
    await engine.revoke_user(user.username)
    assert not await target.exists(user.username)


async def test_failed_creation_leaves_no_user(target: Target, engine: Engine) -> None:
    user = new_user()
    with pytest.raises(StatementFailed) as failure:
        await engine.create_user(target.template(FAILING[target.plugin]), user)
    assert "no_such" in str(failure.value)
    assert user.password not in str(failure.value)
    assert not await target.exists(user.username)


async def test_the_password_never_appears_in_an_error(target: Target, engine: Engine) -> None:
    user = new_user(password="Zq9" + secrets.token_hex(12))
    with pytest.raises(StatementFailed) as failure:
        await engine.create_user(target.template(ECHO_PASSWORD[target.plugin]), user)
    assert user.password not in str(failure.value)
    assert user.password[:8] not in str(failure.value)
    assert not await target.exists(user.username)


@pytest.mark.parametrize(
    "password",
    [
        "a'b\"c`d\\e;f--g/*h*/i$$j",
        "'; DROP TABLE items; --",
        "\\'; SELECT 1; #",
    ],
)
async def test_hostile_passwords_are_quoted_not_executed(
    target: Target, engine: Engine, password: str
) -> None:
    user = new_user(password=password)
    await engine.create_user(target.template(CREATION[target.plugin]), user)
    assert await target.can_login(user.username, password)
    session = await target.login(user.username, password)
    try:
        assert await target.alive(session)  # and items still exists (the grant worked)
    finally:
        await target.close_session(session)
    await engine.revoke_user(user.username)
    assert not await target.exists(user.username)


async def test_hostile_usernames_are_quoted(target: Target, engine: Engine) -> None:
    name = "v_a\"b'c`d;e"
    user = new_user(name=name)
    await engine.create_user(target.template(CREATION[target.plugin]), user)
    assert await target.exists(name)
    await engine.revoke_user(name)
    assert not await target.exists(name)


async def test_vault_style_quoted_placeholders(target: Target, engine: Engine) -> None:
    text = {
        "postgresql": "CREATE ROLE \"{{name}}\" WITH LOGIN PASSWORD '{{password}}' "
        "VALID UNTIL '{{expiration}}';",
        "mysql": "CREATE USER '{{name}}'@'%' IDENTIFIED BY '{{password}}';"
        "GRANT SELECT ON {db}.items TO '{{name}}'@'%';",
    }[target.plugin]
    user = new_user(password="it's-" + secrets.token_hex(8))
    await engine.create_user(target.template(text), user)
    assert await target.can_login(user.username, user.password)
    await engine.revoke_user(user.username)


async def test_rotate_root_changes_the_admin_password(target: Target, engine: Engine) -> None:
    fresh = secrets.token_urlsafe(24)
    await engine.rotate_root(fresh)
    admin = urllib.parse.urlsplit(target.dsn).username
    assert admin is not None
    assert await target.can_login(admin, fresh)
    assert not await target.can_login(admin, target.password)
    rotated = target.engine(fresh)
    try:
        await rotated.verify()
    finally:
        await rotated.close()


async def test_renew_moves_the_database_side_expiry(target: Target, engine: Engine) -> None:
    user = new_user()
    await engine.create_user(target.template(CREATION[target.plugin]), user)
    later = user.expiration + dt.timedelta(hours=2)
    await engine.renew_user(user.username, later)
    if target.plugin == "postgresql":
        conn = await asyncpg.connect(
            host=target.host,
            port=target.port,
            user=urllib.parse.urlsplit(target.dsn).username,
            password=target.password,
            database=target.database,
        )
        try:
            until = await conn.fetchval(
                "SELECT rolvaliduntil FROM pg_roles WHERE rolname = $1", user.username
            )
        finally:
            await conn.close()
        assert abs((until - later).total_seconds()) < 1
    assert await target.can_login(user.username, user.password)
    await engine.revoke_user(user.username)


async def test_concurrent_creations_and_revocations_all_succeed(
    target: Target, engine: Engine
) -> None:
    # Concurrent GRANTs on one table make PostgreSQL fail with "tuple concurrently updated"
    # unless the engine serialises them; none of these may fail.
    users = [new_user() for _ in range(12)]
    creation = target.template(CREATION[target.plugin])
    await asyncio.gather(*(engine.create_user(creation, u) for u in users))
    for u in users:
        assert await target.exists(u.username)
    await asyncio.gather(*(engine.revoke_user(u.username) for u in users))
    for u in users:
        assert not await target.exists(u.username)


@pytest.mark.parametrize(
    "text",
    [
        "CREATE ROLE {{name}} WITH LOGIN PASSWORD {{password}}",  # no VALID UNTIL at all
        "CREATE ROLE {{name}} LOGIN PASSWORD {{password}} VALID UNTIL 'infinity'",
        "CREATE ROLE {{name}} LOGIN PASSWORD {{password}} VALID UNTIL {{expiration}};"
        "ALTER ROLE {{name}} VALID UNTIL 'infinity'",
    ],
)
async def test_postgresql_users_always_get_valid_until_the_lease_end(
    pg_cluster: Any, text: str
) -> None:
    from tests.fixtures.dbtargets import pg_target

    async for target in pg_target(pg_cluster):
        engine = target.engine()
        try:
            user = new_user()
            await engine.create_user(target.template(text), user)
            literal = "'" + user.username.replace("'", "''") + "'"
            until = pg_cluster.psql(
                "SELECT extract(epoch FROM rolvaliduntil)::bigint FROM pg_roles "
                f"WHERE rolname = {literal}"
            ).strip()
            assert int(until) == int(user.expiration.timestamp())
            await engine.revoke_user(user.username)
        finally:
            await engine.close()


@pytest.fixture
async def mysql_target(request: pytest.FixtureRequest) -> AsyncIterator[Target]:
    async with target_for("mysql", request) as value:
        yield value


async def test_mysql_round_trips_per_credential(
    mysql_target: Target, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Issue 18: a credential costs PyMySQL one query to create (the statements sent together
    in one transaction) and three to revoke (hosts; locks + sessions; drops + check), on a
    pooled connection (no new login per credential)."""
    import pymysql.connections

    sent: list[str] = []
    original = pymysql.connections.Connection.query

    def counting(self: Any, sql: Any, unbuffered: bool = False) -> Any:
        sent.append(sql if isinstance(sql, str) else sql.decode(errors="replace"))
        return original(self, sql, unbuffered)

    def watched() -> None:
        sent.clear()
        monkeypatch.setattr(pymysql.connections.Connection, "query", counting)
        monkeypatch.setattr(pymysql, "connect", _no_new_connection)

    engine = mysql_target.engine()
    try:
        await engine.verify()  # the pool's connection is made (and logged in) here
        user = new_user()
        watched()
        await engine.create_user(mysql_target.template(CREATION["mysql"]), user)
        monkeypatch.undo()
        assert len(sent) == 1, sent
        assert await mysql_target.exists(user.username)
        watched()
        await engine.revoke_user(user.username)
        monkeypatch.undo()
        assert len(sent) == 3, sent
        assert not await mysql_target.exists(user.username)
    finally:
        monkeypatch.undo()
        await engine.close()


def _no_new_connection(**kwargs: Any) -> Any:
    raise AssertionError("a credential opened a new admin connection instead of a pooled one")
