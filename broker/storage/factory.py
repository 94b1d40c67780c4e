"""`open_storage(dsn)`: the one entry point that turns a DSN from the broker's configuration into a
`Storage`. It runs no migration; callers call `await storage.migrate()`.

DSNs:
    sqlite:///abs/path/broker.db          an absolute path (three slashes, then the path;
                                          sqlite:////abs/path/broker.db means the same)
    sqlite:relative/path/broker.db        relative to the working directory
    ...?synchronous=normal&busy_timeout=5000   optional SQLite settings (default FULL, 10000 ms)
    postgresql://user:pass@host:port/db   PostgreSQL through an asyncpg pool (also postgres://);
                                          every libpq-style parameter asyncpg understands works

A DSN's password never reaches a log or an error message: use `redact_dsn()` to show one.
"""

from __future__ import annotations

import urllib.parse
from collections.abc import Iterable
from pathlib import Path
from typing import Final

from broker.dsn import is_secret_param, redact
from broker.storage.interface import Storage

__all__ = ["SqliteTarget", "open_storage", "parse_sqlite_dsn", "redact_dsn", "scrub"]

REDACTED: Final = "***"
_SQLITE_PARAMS: Final = frozenset({"synchronous", "busy_timeout"})


def redact_dsn(dsn: str) -> str:
    """`dsn` with its password (in the authority part or a `password=` parameter) replaced by
    `***`, safe to log or put in an error message. Everything else is left as written."""
    try:
        parts = urllib.parse.urlsplit(dsn, allow_fragments=False)
    except ValueError:
        return "<unparseable DSN>"
    if _malformed_userinfo(dsn, parts.netloc):
        return f"{parts.scheme}://{REDACTED}"
    redacted = dsn
    userinfo, at, hosts = parts.netloc.rpartition("@")
    if at and ":" in userinfo:
        netloc = f"{userinfo.partition(':')[0]}:{REDACTED}@{hosts}"
        redacted = redacted.replace(f"//{parts.netloc}", f"//{netloc}", 1)
    if parts.query:
        pieces = []
        for piece in parts.query.split("&"):
            key, eq, _ = piece.partition("=")
            if eq and is_secret_param(key):
                piece = f"{key}={REDACTED}"
            pieces.append(piece)
        redacted = redacted.replace(f"?{parts.query}", "?" + "&".join(pieces), 1)
    return redact(redacted)  # also `;`-separated and fragment parameters


def _malformed_userinfo(dsn: str, netloc: str) -> bool:
    """An '@' after "//" that did not end up in the parsed authority: a password with an
    unescaped '/', '?' or '#' in it. We cannot tell where it ends, so treat it all as secret."""
    return "@" not in netloc and "@" in dsn.partition("://")[2]


def dsn_secrets(dsn: str) -> list[str]:
    """The secret strings in `dsn` (raw and percent-decoded), for `scrub()`."""
    found: list[str] = []
    try:
        parts = urllib.parse.urlsplit(dsn, allow_fragments=False)
    except ValueError:
        return found
    userinfo, at, _ = parts.netloc.rpartition("@")
    if at and ":" in userinfo:
        found.append(userinfo.partition(":")[2])
    elif _malformed_userinfo(dsn, parts.netloc):
        rest = dsn.partition("://")[2]
        found.append(rest[: rest.rfind("@")].partition(":")[2])
    for key, value in urllib.parse.parse_qsl(parts.query, keep_blank_values=True):
        if is_secret_param(key):
            found.append(value)
    found += [urllib.parse.unquote(s) for s in found]
    return sorted({s for s in found if s}, key=len, reverse=True)


def scrub(text: str, secrets: Iterable[str]) -> str:
    """`text` with every occurrence of each secret replaced by `***`."""
    for secret in secrets:
        if secret:
            text = text.replace(secret, REDACTED)
    return text


class SqliteTarget:
    """A parsed `sqlite:` DSN."""

    def __init__(self, path: Path, synchronous: str, busy_timeout_ms: int) -> None:
        self.path = path
        self.synchronous = synchronous
        self.busy_timeout_ms = busy_timeout_ms

    def __repr__(self) -> str:
        return (
            f"SqliteTarget(path={str(self.path)!r}, synchronous={self.synchronous!r}, "
            f"busy_timeout_ms={self.busy_timeout_ms})"
        )


def parse_sqlite_dsn(dsn: str) -> SqliteTarget:
    """Parse `sqlite:///abs/path.db` or `sqlite:rel/path.db` (optionally `?synchronous=normal|full`
    and `&busy_timeout=<ms>`). Raises ValueError with a message that names what is wrong."""
    from broker.storage.sqlite import DEFAULT_BUSY_TIMEOUT_MS, SYNCHRONOUS_MODES

    parts = urllib.parse.urlsplit(dsn)
    if parts.scheme.lower() != "sqlite":
        raise ValueError(f"not a sqlite DSN: {redact_dsn(dsn)}")
    if parts.netloc:
        raise ValueError(
            f"sqlite DSN {redact_dsn(dsn)!r} names a host; use sqlite:///absolute/path.db or "
            "sqlite:relative/path.db"
        )
    path = urllib.parse.unquote(parts.path)
    if path.startswith("//"):  # sqlite:////abs/path (SQLAlchemy's spelling) is absolute too
        path = "/" + path.lstrip("/")
    if not path or path.endswith("/"):
        raise ValueError(f"sqlite DSN {redact_dsn(dsn)!r} names no database file")
    if path == ":memory:":
        raise ValueError("in-memory SQLite is not supported: give a file path")
    synchronous, busy_timeout_ms = "FULL", DEFAULT_BUSY_TIMEOUT_MS
    for key, value in urllib.parse.parse_qsl(parts.query, keep_blank_values=True):
        if key not in _SQLITE_PARAMS:
            raise ValueError(
                f"unknown sqlite DSN parameter {key!r} (known: {', '.join(sorted(_SQLITE_PARAMS))})"
            )
        if key == "synchronous":
            synchronous = value.upper()
            if synchronous not in SYNCHRONOUS_MODES:
                raise ValueError(f"synchronous must be one of {SYNCHRONOUS_MODES}, not {value!r}")
        else:
            try:
                busy_timeout_ms = int(value)
            except ValueError:
                raise ValueError(f"busy_timeout must be milliseconds, not {value!r}") from None
            if busy_timeout_ms < 0:
                raise ValueError("busy_timeout must not be negative")
    return SqliteTarget(Path(path), synchronous, busy_timeout_ms)


async def open_storage(dsn: str) -> Storage:
    """Open the storage a DSN names (see the module docstring). Runs no migration.

    Raises ValueError for a malformed or unsupported DSN and `broker.errors.StorageError` when
    the database cannot be opened or reached; neither message contains the DSN's password.
    """
    scheme = dsn.partition(":")[0].lower()
    if scheme == "sqlite":
        from broker.storage.sqlite import open_sqlite

        target = parse_sqlite_dsn(dsn)
        return await open_sqlite(
            target.path, synchronous=target.synchronous, busy_timeout_ms=target.busy_timeout_ms
        )
    if scheme in ("postgresql", "postgres"):
        from broker.storage.postgres import open_postgres

        return await open_postgres(dsn)
    raise ValueError(
        f"unsupported storage DSN {redact_dsn(dsn)!r}: use sqlite:///path/broker.db or "
        "postgresql://user:password@host:port/dbname"
    )
