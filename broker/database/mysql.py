"""MySQL/MariaDB engine: PyMySQL run off the event loop, on a small pool of admin connections
(one thread per connection).

Identifiers are backtick-quoted, string literals escaped by the connection (which knows whether
the server runs with NO_BACKSLASH_ESCAPES). MySQL commits DDL such as CREATE USER at once, so
a failed creation runs the rollback statements (default: the default revocation). Revocation
locks the account, kills its connections, then drops every `user`@`host` of that name.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import hashlib
import queue
import re
import threading
import time
import urllib.parse
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Final, TypeVar

import pymysql
import pymysql.constants.CLIENT
import pymysql.cursors

from broker.database.engine import (
    AdminLoginRefused,
    EngineUnavailable,
    NewUser,
    StatementFailed,
    scrub,
)
from broker.database.template import Template

__all__ = ["MySQLEngine", "native_password_hash", "quote_ident"]

_T = TypeVar("_T")
CONNECT_TIMEOUT: Final = 5
IO_TIMEOUT: Final = 15
POOL_SIZE: Final = 4
# Client-side errors meaning the server is gone (as opposed to refusing a statement).
_LOST: Final = frozenset({2002, 2003, 2006, 2013, 2055, 1040, 1053})
_NO_SUCH_THREAD: Final = 1094
_PING_AFTER: Final = 5.0  # seconds idle after which a pooled connection is checked first


def quote_ident(value: str) -> str:
    return "`" + value.replace("`", "``") + "`"


def native_password_hash(password: str) -> str:
    """mysql_native_password's stored form: `*` + upper-case hex SHA1(SHA1(password))."""
    inner = hashlib.sha1(password.encode("utf-8")).digest()  # noqa: S324 (the protocol's hash)
    return "*" + hashlib.sha1(inner).hexdigest().upper()  # noqa: S324


def _last_result(cursor: Any, statements: list[str]) -> list[tuple[Any, ...]]:
    """Send `statements` in one round trip (the connection allows several per query; the
    server stops at the first failure, raised here as every result is read) and return the
    rows of the last one."""
    cursor.execute(";\n".join(statements))
    rows: list[tuple[Any, ...]] = list(cursor.fetchall() or ())
    while cursor.nextset():
        rows = list(cursor.fetchall() or ())
    return rows


class MySQLEngine:
    plugin = "mysql"
    max_username_length = 32

    def __init__(self, dsn: str, password: str, *, pool_size: int = POOL_SIZE) -> None:
        parts = urllib.parse.urlsplit(dsn)
        query = dict(urllib.parse.parse_qsl(parts.query))
        self._dsn = dsn
        self._password = password
        self._kwargs: dict[str, Any] = {
            "user": urllib.parse.unquote(parts.username or ""),
            "password": password,
            "database": urllib.parse.unquote(parts.path.lstrip("/")) or None,
            "connect_timeout": CONNECT_TIMEOUT,
            "read_timeout": IO_TIMEOUT,
            "write_timeout": IO_TIMEOUT,
            "autocommit": True,
            "charset": "utf8mb4",
            "client_flag": pymysql.constants.CLIENT.MULTI_STATEMENTS,
        }
        if "unix_socket" in query:
            self._kwargs["unix_socket"] = query["unix_socket"]
        else:
            self._kwargs["host"] = parts.hostname or "localhost"
            self._kwargs["port"] = parts.port or 3306
        self._where = query.get("unix_socket") or f"{parts.hostname}:{parts.port or 3306}"
        self._idle: queue.LifoQueue[tuple[Any, float]] = queue.LifoQueue()
        self._executor = ThreadPoolExecutor(pool_size, thread_name_prefix="mysql-engine")
        self._closed = threading.Event()

    def __repr__(self) -> str:
        return f"MySQLEngine({self._dsn!r})"

    async def _run(self, fn: Callable[[Any], _T], *secrets: str) -> _T:
        """Run fn(connection) on a pool thread; map driver errors to the engine's errors."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, self._with_connection, fn, secrets)

    def _with_connection(self, fn: Callable[[Any], _T], secrets: tuple[str, ...]) -> _T:
        if self._closed.is_set():
            raise EngineUnavailable("the mysql engine is closed")
        conn = None
        try:
            try:
                conn, idle_since = self._idle.get_nowait()
                if time.monotonic() - idle_since > _PING_AFTER:
                    conn.ping(reconnect=False)  # the server may have restarted since
            except queue.Empty:
                conn = pymysql.connect(**self._kwargs)
            result = fn(conn)
        except pymysql.err.MySQLError as exc:
            code = exc.args[0] if exc.args and isinstance(exc.args[0], int) else 0
            message = scrub(
                str(exc.args[1] if len(exc.args) > 1 else exc), self._password, *secrets
            )
            if conn is not None:
                conn.close()  # its state is unknown after an error
            if code in _LOST or isinstance(exc, pymysql.err.InterfaceError) or code == 0:
                raise EngineUnavailable(
                    f"mysql at {self._where} is unavailable: {message}"
                ) from None
            if code in (1045, 1044, 1698):
                raise AdminLoginRefused(f"mysql refused the admin login: {message}") from None
            raise StatementFailed(f"mysql refused a statement ({code}): {message}") from None
        except OSError as exc:
            if conn is not None:
                conn.close()
            raise EngineUnavailable(f"mysql at {self._where} is unavailable: {exc}") from None
        except BaseException:
            if conn is not None:
                conn.close()
            raise
        self._idle.put((conn, time.monotonic()))
        return result

    @staticmethod
    def _render(conn: Any, template: Template, values: dict[str, str]) -> list[str]:
        return template.render(values, quote_ident, conn.escape)

    async def verify(self) -> None:
        def check(conn: Any) -> None:
            with conn.cursor() as cursor:
                cursor.execute("SELECT 1")

        await self._run(check)

    async def create_user(
        self, creation: Template, user: NewUser, rollback: Template | None = None
    ) -> None:
        values = {
            "name": user.username,
            "password": user.password,
            "expiration": user.expiration.astimezone(dt.UTC).strftime("%Y-%m-%d %H:%M:%S"),
        }

        def create(conn: Any) -> None:
            # One round trip: the statements in one transaction, sent together (the
            # connection allows several statements per query; the server stops at the first
            # failure, and every result is read so an error in any of them is raised).
            statements = ["BEGIN", *self._render(conn, creation, values), "COMMIT"]
            try:
                with conn.cursor() as cursor:
                    cursor.execute(";\n".join(statements))
                    while cursor.nextset():
                        pass
            except BaseException:
                conn.rollback()
                raise

        try:
            await self._run(create, user.password)
        except StatementFailed:
            # DDL commits at once in MySQL: undo whatever got through.
            try:
                if rollback is not None:

                    def undo(conn: Any) -> None:
                        with conn.cursor() as cursor:
                            for statement in self._render(conn, rollback, values):
                                cursor.execute(statement)

                    await self._run(undo, user.password)
                await self.revoke_user(user.username)
            except (StatementFailed, EngineUnavailable):
                pass  # best effort; the lease (revoking) makes the reaper finish the job
            raise

    async def renew_user(self, username: str, expiration: dt.datetime) -> None:
        return None  # MySQL has no login expiry by time; the reaper is the barrier

    @staticmethod
    def _hosts(conn: Any, username: str) -> list[str]:
        with conn.cursor() as cursor:
            cursor.execute("SELECT Host FROM mysql.user WHERE User = %s", (username,))
            return [str(row[0]) for row in cursor.fetchall()]

    async def user_exists(self, username: str) -> bool:
        return bool(await self._run(lambda conn: self._hosts(conn, username)))

    async def revoke_user(self, username: str, revocation: Template | None = None) -> None:
        def revoke(conn: Any) -> None:
            # Three round trips in the usual case (was 5 with one host and no session): the
            # hosts; the locks and the sessions to kill, sent together; the drops (or the
            # role's revocation statements) and the check that the user is gone, sent
            # together. KILLs go one by one, only when the user has sessions, since a session
            # that ended meanwhile (error 1094) is not a failure.
            hosts = self._hosts(conn, username)
            if not hosts:
                return
            user = quote_ident(username)
            with conn.cursor() as cursor:
                locks = [f"ALTER USER {user}@{conn.escape(host)} ACCOUNT LOCK" for host in hosts]
                sessions = cursor.mogrify(
                    "SELECT ID FROM information_schema.PROCESSLIST WHERE USER = %s", (username,)
                )
                threads = _last_result(cursor, [*locks, sessions])
                for (thread_id,) in threads:
                    try:
                        cursor.execute(f"KILL CONNECTION {int(thread_id)}")
                    except pymysql.err.MySQLError as exc:
                        if not exc.args or exc.args[0] != _NO_SUCH_THREAD:
                            raise
                if revocation is None:
                    drops = [f"DROP USER IF EXISTS {user}@{conn.escape(host)}" for host in hosts]
                else:
                    values = {"name": username, "password": "", "expiration": ""}
                    drops = self._render(conn, revocation, values)
                check = cursor.mogrify("SELECT Host FROM mysql.user WHERE User = %s", (username,))
                left = _last_result(cursor, [*drops, check])
            if left:
                raise StatementFailed(f"the revocation statements left user {username!r} in place")

        await self._run(revoke)

    async def set_password(
        self, username: str, password: str, statements: Template | None = None
    ) -> None:
        """Default: every `user`@`host` of that name gets the password; on MariaDB a
        mysql_native_password account gets it as its hash only (as `rotate_root` does), so the
        general log never holds it; other plugins take the text (the server hashes it)."""
        hashed = native_password_hash(password)

        def change(conn: Any) -> None:
            mariadb = "mariadb" in conn.get_server_info().lower()
            with conn.cursor() as cursor:
                cursor.execute("SELECT Host, plugin FROM mysql.user WHERE User = %s", (username,))
                accounts = [(str(r[0]), str(r[1] or "")) for r in cursor.fetchall()]
                if not accounts:
                    raise StatementFailed(f"mysql has no user named {username!r}")
                if statements is not None:
                    values = {"name": username, "password": password, "expiration": ""}
                    script = self._render(conn, statements, values)
                else:
                    user = quote_ident(username)
                    script = []
                    for host, plugin in accounts:
                        account = f"{user}@{conn.escape(host)}"
                        if mariadb and plugin in ("", "mysql_native_password"):
                            script.append(f"SET PASSWORD FOR {account} = {conn.escape(hashed)}")
                        else:
                            script.append(
                                f"ALTER USER {account} IDENTIFIED BY {conn.escape(password)}"
                            )
                _last_result(cursor, script)

        await self._run(change, password, hashed)

    async def create_second_user(self, original: str, second: str, password: str) -> None:
        """Staged rollout of a static role: a second user `second`, at every host `original`
        has, with `original`'s grants (its `SHOW GRANTS`, each re-aimed at `second`; a line
        that does not name `original`@host exactly once is refused, nothing is guessed) and
        the password `password` (on MariaDB as its mysql_native_password hash). Idempotent: a
        `second` that exists already gets the grants again and the password. Raises
        StatementFailed when `original` does not exist."""
        hashed = native_password_hash(password)

        def create(conn: Any) -> None:
            mariadb = "mariadb" in conn.get_server_info().lower()
            hosts = self._hosts(conn, original)
            if not hosts:
                raise StatementFailed(f"mysql has no user named {original!r}")
            existing = set(self._hosts(conn, second))
            script = []
            with conn.cursor() as cursor:
                for host in hosts:
                    source = f"{quote_ident(original)}@{quote_ident(host)}"
                    target = f"{quote_ident(second)}@{conn.escape(host)}"
                    if mariadb:
                        secret = f"IDENTIFIED BY PASSWORD {conn.escape(hashed)}"
                    else:
                        secret = f"IDENTIFIED BY {conn.escape(password)}"
                    if host in existing:
                        script.append(f"ALTER USER {target} {secret} ACCOUNT UNLOCK")
                    else:
                        script.append(f"CREATE USER {target} {secret}")
                    cursor.execute(f"SHOW GRANTS FOR {quote_ident(original)}@{conn.escape(host)}")
                    for (line,) in cursor.fetchall():
                        grant = str(line)
                        grant = re.sub(r" IDENTIFIED (BY PASSWORD|VIA) .*$", "", grant)
                        # GRANT ... TO `app`@`host`; MariaDB also lists the default role as
                        # SET DEFAULT ROLE `r` FOR `app`@`host`.
                        marker = " FOR " if grant.startswith("SET DEFAULT ROLE ") else " TO "
                        if (
                            not grant.startswith(("GRANT ", "SET DEFAULT ROLE "))
                            or grant.count(f"{marker}{source}") != 1
                        ):
                            raise StatementFailed(
                                f"cannot copy a grant of {original!r}@{host!r}: it does not "
                                "name the user exactly once"
                            )
                        script.append(
                            grant.replace(
                                f"{marker}{source}",
                                f"{marker}{quote_ident(second)}@{conn.escape(host)}",
                            )
                        )
                _last_result(cursor, script)

        await self._run(create, password, hashed)

    async def rotate_root(self, new_password: str) -> None:
        """For a mysql_native_password admin (the common case, and MariaDB's default) the new
        password is sent only as its hash (`*` + SHA1(SHA1(password)), the stored form), so the
        general log and the processlist never hold it. Other plugins (caching_sha2_password,
        ed25519) take the text: the server hashes it (and MySQL masks it in its logs; MariaDB
        does not). See docs/database.md."""
        hashed = native_password_hash(new_password)

        def rotate(conn: Any) -> None:
            mariadb = "mariadb" in conn.get_server_info().lower()
            with conn.cursor() as cursor:
                cursor.execute(
                    "SELECT plugin FROM mysql.user WHERE CONCAT(User, '@', Host) = CURRENT_USER()"
                )
                row = cursor.fetchone()
                plugin = str(row[0]) if row and row[0] is not None else ""
                if plugin in ("", "mysql_native_password"):
                    if mariadb:
                        # MariaDB accepts ALTER USER CURRENT_USER() ... and silently changes
                        # nothing (10.11); SET PASSWORD with the hash works.
                        cursor.execute(f"SET PASSWORD = {conn.escape(hashed)}")
                    else:
                        cursor.execute(
                            "ALTER USER CURRENT_USER() IDENTIFIED WITH mysql_native_password "
                            f"AS {conn.escape(hashed)}"
                        )
                elif mariadb:
                    cursor.execute(f"SET PASSWORD = PASSWORD({conn.escape(new_password)})")
                else:
                    cursor.execute(
                        f"ALTER USER CURRENT_USER() IDENTIFIED BY {conn.escape(new_password)}"
                    )

        await self._run(rotate, new_password, hashed)

    async def close(self) -> None:
        self._closed.set()
        await asyncio.get_running_loop().run_in_executor(None, self._shutdown)

    def _shutdown(self) -> None:
        self._executor.shutdown(wait=True, cancel_futures=True)
        while True:
            try:
                conn, _ = self._idle.get_nowait()
            except queue.Empty:
                return
            with contextlib.suppress(Exception):  # closing a dead connection
                conn.close()
