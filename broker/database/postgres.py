"""PostgreSQL engine: asyncpg with a small pool of admin connections.

Values are quoted with quote_ident / quote_literal semantics; every user also gets
`VALID UNTIL` its lease's end, a second barrier should the broker be gone when the lease ends.

Passwords never reach the server as text: `{{password}}` in creation statements and the new
admin password of `rotate_root` are sent as a SCRAM-SHA-256 verifier computed here (RFC 5802 /
7677, PostgreSQL's `SCRAM-SHA-256$iterations:salt$StoredKey:ServerKey`), so statement logs
(`log_statement = all`), pg_stat_activity and error reports only ever hold the verifier. The
server stores a verifier as given. `scram_iterations` (default 4096, what libpq and PostgreSQL
use) sets its cost; PostgreSQL still runs PBKDF2 over that count when the role is created, so
creation cost follows it (see docs/database.md). Passwords are broker-generated ASCII, for which
SASLprep is the identity.
Revocation first forbids new logins (NOLOGIN, committed), then terminates the user's sessions
(waiting for them to end), then drops the role (default: REASSIGN OWNED, DROP OWNED, DROP ROLE).
"""

from __future__ import annotations

import asyncio
import base64
import datetime as dt
import hashlib
import hmac
import re
import secrets as _secrets
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any, Final

import asyncpg

from broker.database.engine import (
    AdminLoginRefused,
    EngineUnavailable,
    NewUser,
    StatementFailed,
    scrub,
)
from broker.database.template import Template

__all__ = ["PostgresEngine", "quote_ident", "quote_literal"]

CONNECT_TIMEOUT: Final = 5.0
COMMAND_TIMEOUT: Final = 15.0
POOL_SIZE: Final = 8
_TERMINATE_WAIT_MS: Final = 5000
_RETRIES: Final = 8
_CREATES: Final = re.compile(r"\s*CREATE\s+(ROLE|USER)\b", re.IGNORECASE)
_DDL_LOCK: Final = 0x62726F6B6572_0D0C  # advisory lock key ("broker" + 0x0D0C) for retries
SCRAM_ITERATIONS: Final = 4096

_UNAVAILABLE = (
    OSError,
    asyncio.TimeoutError,
    asyncpg.exceptions.PostgresConnectionError,
    asyncpg.exceptions.CannotConnectNowError,
    asyncpg.exceptions.ConnectionDoesNotExistError,
    asyncpg.exceptions.InterfaceError,
    asyncpg.exceptions.TooManyConnectionsError,
    asyncpg.exceptions.AdminShutdownError,
)


class _Conflict(StatementFailed):
    """Two transactions changed the same catalog row (concurrent GRANTs on one table fail with
    "tuple concurrently updated"), a serialization failure or a deadlock: safe to retry."""


def _is_conflict(exc: BaseException) -> bool:
    if isinstance(
        exc, asyncpg.exceptions.SerializationError | asyncpg.exceptions.DeadlockDetectedError
    ):
        return True
    return isinstance(exc, asyncpg.exceptions.InternalServerError) and "concurrently" in str(exc)


def quote_ident(value: str) -> str:
    return '"' + value.replace('"', '""') + '"'


def quote_literal(value: str) -> str:
    """PostgreSQL's quote_literal: E'' with doubled backslashes when there is a backslash."""
    if "\\" in value:
        return "E'" + value.replace("\\", "\\\\").replace("'", "''") + "'"
    return "'" + value.replace("'", "''") + "'"


def scram_verifier(
    password: str, iterations: int = SCRAM_ITERATIONS, salt: bytes | None = None
) -> str:
    """PostgreSQL's stored form of `password` for SCRAM-SHA-256 (what `ALTER ROLE ... PASSWORD`
    computes server-side from the text), computed here so the text is never sent."""
    if not 1 <= iterations <= 10_000_000:
        raise ValueError("SCRAM iterations must be between 1 and 10,000,000")
    salt = _secrets.token_bytes(16) if salt is None else salt
    salted = hashlib.pbkdf2_hmac("sha256", password.encode("utf-8"), salt, iterations)
    client_key = hmac.digest(salted, b"Client Key", "sha256")
    stored_key = hashlib.sha256(client_key).digest()
    server_key = hmac.digest(salted, b"Server Key", "sha256")

    def b64(raw: bytes) -> str:
        return base64.b64encode(raw).decode("ascii")

    return f"SCRAM-SHA-256${iterations}:{b64(salt)}${b64(stored_key)}:{b64(server_key)}"


def _expiration(value: dt.datetime) -> str:
    return value.astimezone(dt.UTC).strftime("%Y-%m-%d %H:%M:%S+00")


class PostgresEngine:
    plugin = "postgresql"
    max_username_length = 63

    def __init__(
        self,
        dsn: str,
        password: str,
        *,
        pool_size: int = POOL_SIZE,
        scram_iterations: int = SCRAM_ITERATIONS,
    ) -> None:
        self._dsn = dsn
        self._password = password
        self._pool_size = pool_size
        self._iterations = scram_iterations
        self._pool: Any = None
        self._lock = asyncio.Lock()

    def __repr__(self) -> str:
        return f"PostgresEngine({self._dsn!r})"

    async def _get_pool(self) -> Any:
        if self._pool is None:
            async with self._lock:
                if self._pool is None:
                    self._pool = await asyncpg.create_pool(
                        self._dsn,
                        password=self._password,
                        min_size=1,
                        max_size=self._pool_size,
                        timeout=CONNECT_TIMEOUT,
                        command_timeout=COMMAND_TIMEOUT,
                        statement_cache_size=0,
                    )
        return self._pool

    @asynccontextmanager
    async def _connection(self, *secrets: str) -> AsyncIterator[Any]:
        """An admin connection; driver errors become EngineUnavailable / StatementFailed."""
        try:
            pool = await self._get_pool()
            async with pool.acquire(timeout=CONNECT_TIMEOUT) as conn:
                yield conn
        except (StatementFailed, EngineUnavailable):
            raise
        except asyncpg.exceptions.InvalidAuthorizationSpecificationError as exc:
            raise AdminLoginRefused(f"postgresql refused the admin login: {exc}") from None
        except _UNAVAILABLE as exc:
            await self._discard_pool()
            reason = scrub(str(exc) or type(exc).__name__, self._password, *secrets)
            raise EngineUnavailable(
                f"postgresql at {self._where()} is unavailable: {reason}"
            ) from None
        except asyncpg.PostgresError as exc:
            message = scrub(str(exc), self._password, *secrets)
            kind = _Conflict if _is_conflict(exc) else StatementFailed
            raise kind(f"postgresql refused a statement: {message}") from None

    async def _transaction(self, statements: list[str], *secrets: str) -> None:
        """Run `statements` as one transaction in ONE round trip (a multi-statement simple
        query is atomic: all or nothing). They first take a transaction-scoped advisory lock:
        user changes on one database queue up instead of failing on each other (concurrent
        GRANTs on one table fail with "tuple concurrently updated"). Conflicts that still occur
        (serialization failures, deadlocks) are retried."""
        # The lock goes after the leading CREATE ROLE/USER statements: they touch no shared
        # row (new names) and hash the password (SCRAM, the costly part), so they run in
        # parallel; the GRANTs after them queue. (Placement only affects speed: conflicts
        # are retried either way.)
        first = 0
        while first < len(statements) and _CREATES.match(statements[first]):
            first += 1
        lock = f"SELECT pg_advisory_xact_lock({_DDL_LOCK})"
        script = ";\n".join([*statements[:first], lock, *statements[first:]])
        for attempt in range(_RETRIES):
            try:
                async with self._connection(*secrets) as conn:
                    await conn.execute(script)
                return
            except _Conflict:
                if attempt + 1 == _RETRIES:
                    raise

    def _where(self) -> str:
        import urllib.parse

        parts = urllib.parse.urlsplit(self._dsn)
        return f"{parts.hostname}:{parts.port or 5432}"

    async def _discard_pool(self) -> None:
        pool, self._pool = self._pool, None
        if pool is not None:
            pool.terminate()

    async def verify(self) -> None:
        async with self._connection() as conn:
            await conn.fetchval("SELECT 1")

    async def create_user(
        self, creation: Template, user: NewUser, rollback: Template | None = None
    ) -> None:
        # PBKDF2 off the event loop (hashlib releases the GIL).
        verifier = await asyncio.to_thread(scram_verifier, user.password, self._iterations)
        values = {
            "name": user.username,
            "password": verifier,
            "expiration": _expiration(user.expiration),
        }
        statements = creation.render(values, quote_ident, quote_literal)
        # The second barrier, whatever the template says (unless its one VALID UNTIL already
        # is the lease's end: one catalog update less per credential).
        until = f"VALID UNTIL {quote_literal(values['expiration'])}"
        setting = [x for x in statements if "VALID UNTIL" in x.upper()]
        if not (len(setting) == 1 and until in setting[0]):
            statements.append(f"ALTER ROLE {quote_ident(user.username)} {until}")
        try:
            await self._transaction(statements, user.password, verifier)
        except StatementFailed:
            if rollback is not None:
                try:
                    async with (
                        self._connection(user.password, verifier) as conn,
                        conn.transaction(),
                    ):
                        for statement in rollback.render(values, quote_ident, quote_literal):
                            await conn.execute(statement)
                except (StatementFailed, EngineUnavailable):
                    pass  # the transaction was rolled back; the rollback is best effort
            raise

    async def renew_user(self, username: str, expiration: dt.datetime) -> None:
        async with self._connection() as conn:
            await conn.execute(
                f"ALTER ROLE {quote_ident(username)} "
                f"VALID UNTIL {quote_literal(_expiration(expiration))}"
            )

    async def user_exists(self, username: str) -> bool:
        async with self._connection() as conn:
            return bool(await conn.fetchval("SELECT 1 FROM pg_roles WHERE rolname = $1", username))

    async def revoke_user(self, username: str, revocation: Template | None = None) -> None:
        ident = quote_ident(username)
        async with self._connection() as conn:
            # None: no such role. REASSIGN/DROP OWNED need membership in the role (PostgreSQL
            # >= 16 grants it to the role's creator; before, CREATEROLE may grant it).
            member = await conn.fetchval(
                "SELECT pg_has_role(CURRENT_USER, oid, 'USAGE') FROM pg_roles WHERE rolname = $1",
                username,
            )
            if member is None:
                return
            # No new logins (committed at once), then end the sessions, waiting for them.
            await conn.execute(f"ALTER ROLE {ident} NOLOGIN")
            await conn.fetch(
                "SELECT pg_terminate_backend(pid, $2) FROM pg_stat_activity "
                "WHERE usename = $1 AND pid <> pg_backend_pid()",
                username,
                _TERMINATE_WAIT_MS,
            )
        if revocation is None:
            statements = [] if member else [f"GRANT {ident} TO CURRENT_USER"]
            statements += [
                f"REASSIGN OWNED BY {ident} TO CURRENT_USER",
                f"DROP OWNED BY {ident}",
                f"DROP ROLE IF EXISTS {ident}",
            ]
            await self._transaction(statements)
            return
        values = {"name": username, "password": "", "expiration": ""}
        await self._transaction(revocation.render(values, quote_ident, quote_literal))
        if await self.user_exists(username):
            raise StatementFailed(f"the revocation statements left role {username!r} in place")

    async def set_password(
        self, username: str, password: str, statements: Template | None = None
    ) -> None:
        """The password goes as its SCRAM verifier (as in `create_user`), never as text."""
        verifier = await asyncio.to_thread(scram_verifier, password, self._iterations)
        if not await self.user_exists(username):
            raise StatementFailed(f"postgresql has no role named {username!r}")
        if statements is None:
            script = [f"ALTER ROLE {quote_ident(username)} PASSWORD {quote_literal(verifier)}"]
        else:
            values = {"name": username, "password": verifier, "expiration": ""}
            script = statements.render(values, quote_ident, quote_literal)
        await self._transaction(script, password, verifier)

    async def create_second_user(self, original: str, second: str, password: str) -> None:
        """Staged rollout of a static role: a second login `second` with the privileges of
        `original` (a member of it: `CREATE ROLE second LOGIN IN ROLE original`, so it inherits
        the original's grants and memberships) and the password `password` (as its SCRAM
        verifier). Idempotent: a `second` that exists already only gets LOGIN and the
        password. Raises StatementFailed when `original` does not exist."""
        verifier = await asyncio.to_thread(scram_verifier, password, self._iterations)
        if not await self.user_exists(original):
            raise StatementFailed(f"postgresql has no role named {original!r}")
        target = quote_ident(second)
        if await self.user_exists(second):
            script = [f"ALTER ROLE {target} LOGIN PASSWORD {quote_literal(verifier)}"]
        else:
            script = [
                f"CREATE ROLE {target} LOGIN PASSWORD {quote_literal(verifier)} "
                f"IN ROLE {quote_ident(original)}"
            ]
        await self._transaction(script, password, verifier)

    async def rotate_root(self, new_password: str) -> None:
        verifier = await asyncio.to_thread(scram_verifier, new_password, self._iterations)
        async with self._connection(new_password, verifier) as conn:
            await conn.execute(f"ALTER ROLE CURRENT_USER PASSWORD {quote_literal(verifier)}")

    async def close(self) -> None:
        pool, self._pool = self._pool, None
        if pool is not None:
            try:
                await asyncio.wait_for(pool.close(), timeout=5)
            except (TimeoutError, *_UNAVAILABLE):
                pool.terminate()
