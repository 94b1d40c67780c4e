"""The database engine boundary: one small interface, one implementation per plugin.

Engines create and drop users on a target database with its admin ("root") login. They know
nothing of leases, roles or storage: the credential service tells them what to run.

Errors: a database that cannot be reached raises `EngineUnavailable` (-> UNAVAILABLE); a
statement the database refuses raises `StatementFailed` (-> FAILED_PRECONDITION) with the
database's message, from which the password has been removed.
"""

from __future__ import annotations

import datetime as dt
import urllib.parse
from collections.abc import Callable
from dataclasses import dataclass
from typing import Final, Protocol

from broker.database.template import Template
from broker.dsn import password_in_dsn
from broker.errors import FailedPrecondition, InvalidArgument, Unavailable

__all__ = [
    "PLUGINS",
    "AdminLoginRefused",
    "Engine",
    "EngineFactory",
    "EngineUnavailable",
    "NewUser",
    "StatementFailed",
    "open_engine",
    "parse_dsn",
    "scrub",
]

PLUGINS: Final = ("postgresql", "mysql")


class EngineUnavailable(Unavailable):
    """The target database cannot be reached (down, refusing connections, timed out)."""


class StatementFailed(FailedPrecondition):
    """The target database refused a statement; the message is the database's, minus secrets."""


class AdminLoginRefused(StatementFailed):
    """The database refused the admin login (e.g. its password was rotated by another broker
    process): nothing was run."""


@dataclass(frozen=True)
class NewUser:
    username: str
    password: str
    expiration: dt.datetime


class Engine(Protocol):
    plugin: str
    max_username_length: int  # PostgreSQL 63 bytes, MySQL 32 characters (usernames are ASCII)

    async def verify(self) -> None:
        """Connect and run a trivial query. Raises EngineUnavailable / StatementFailed."""
        ...

    async def create_user(
        self, creation: Template, user: NewUser, rollback: Template | None = None
    ) -> None:
        """Run `creation` in one transaction. On failure nothing is left behind: the
        transaction is rolled back, then `rollback` (or, for DDL a database commits anyway, the
        default revocation) is run, and StatementFailed is raised."""
        ...

    async def renew_user(self, username: str, expiration: dt.datetime) -> None:
        """Move the database-side expiry (PostgreSQL VALID UNTIL); a no-op where there is
        none."""
        ...

    async def revoke_user(self, username: str, revocation: Template | None = None) -> None:
        """End the user's sessions and drop it (`revocation`, else the default statements).
        Idempotent: succeeds when the user is already gone. Raises StatementFailed when the
        user still exists afterwards."""
        ...

    async def user_exists(self, username: str) -> bool: ...

    async def set_password(
        self, username: str, password: str, statements: Template | None = None
    ) -> None:
        """Give the existing user `username` the password `password` (static roles), with
        `statements` (`{{name}}`, `{{password}}`) or the engine's default. Its open sessions
        stay open. Idempotent: setting the same password again changes nothing. Raises
        StatementFailed when there is no such user (nothing is run) or a statement fails."""
        ...

    async def create_second_user(self, original: str, second: str, password: str) -> None:
        """Staged rollout of a static role: a second login user `second` with the privileges
        of `original` and the password `password`. Idempotent. Raises StatementFailed when
        `original` does not exist or its privileges cannot be copied."""
        ...

    async def rotate_root(self, new_password: str) -> None:
        """Change the admin login's own password. The engine keeps using the old one until it
        is closed; open a new engine with the new password."""
        ...

    async def close(self) -> None: ...


EngineFactory = Callable[[str, str, str], Engine]  # (plugin, dsn, password) -> Engine


def parse_dsn(plugin: str, dsn: str) -> urllib.parse.SplitResult:
    """Check a connection DSN: the plugin's scheme, a user, and no password (the password goes
    by file). Raises InvalidArgument."""
    if plugin not in PLUGINS:
        raise InvalidArgument(f"unknown plugin {plugin!r}: use one of {', '.join(PLUGINS)}")
    schemes = ("postgresql", "postgres") if plugin == "postgresql" else ("mysql", "mariadb")
    where = password_in_dsn(dsn)
    if where is not None:
        raise InvalidArgument(
            f"the DSN must not carry a password (it has {where}): give the password with "
            "--password-file (it is stored encrypted and never returned)"
        )
    try:
        parts = urllib.parse.urlsplit(dsn)
        parts.port  # noqa: B018 (validates the port)
    except ValueError:  # its text quotes the DSN: never echo it
        raise InvalidArgument("invalid DSN: its host or port cannot be parsed") from None
    if parts.scheme not in schemes:
        raise InvalidArgument(f"a {plugin} DSN starts with {schemes[0]}://")
    if not parts.username:
        raise InvalidArgument("the DSN must name the admin user (scheme://USER@host/...)")
    if not parts.hostname and "host=" not in parts.query and "unix_socket=" not in parts.query:
        raise InvalidArgument("the DSN must name a host")
    return parts


def scrub(message: str, *secrets: str) -> str:
    """`message` without any of `secrets`; a message still holding a 6-character piece of one
    is replaced entirely (a truncated echo of a password is still a leak)."""
    text = " ".join(message.split())
    for secret in secrets:
        if secret:
            text = text.replace(secret, "[redacted]")
    for secret in secrets:
        for i in range(max(0, len(secret) - 5)):
            if secret[i : i + 6] in text:
                return "the database refused a statement (its message quoted a secret)"
    return text[:500]


def open_engine(
    plugin: str, dsn: str, password: str, *, scram_iterations: int | None = None
) -> Engine:
    """The engine for `plugin` (imports its driver lazily). `scram_iterations`: the cost of
    the SCRAM-SHA-256 verifiers the PostgreSQL engine sends instead of passwords (default
    4096)."""
    parse_dsn(plugin, dsn)
    if plugin == "postgresql":
        from broker.database.postgres import SCRAM_ITERATIONS, PostgresEngine

        return PostgresEngine(dsn, password, scram_iterations=scram_iterations or SCRAM_ITERATIONS)
    from broker.database.mysql import MySQLEngine

    return MySQLEngine(dsn, password)
