"""Passwords never travel inside a DSN: the broker's storage DSN and every database connection's
DSN are refused when they carry one, and any DSN shown, returned, audited or stored is redacted
first (defence in depth, should one get past the check).

A DSN carries a password when its authority has `user:password@`, or when a query (or fragment)
parameter names one: `password`, `sslpassword`, `passfile`, `passwd`, `pwd`, ... in any case and
any percent-encoding (drivers decode parameter names: asyncpg takes `?password=` and
`?passfile=`, and passes unknown names on as server settings). The password goes by file or
environment variable instead (`--password-file`, `storage.password_file` / `password_env`).
"""

from __future__ import annotations

import urllib.parse
from typing import Final

__all__ = ["REDACTED", "is_secret_param", "password_in_dsn", "redact", "without_password"]

REDACTED: Final = "***"
# Substrings of a (decoded, lowercased) parameter name that mark its value as a secret.
_SECRET_MARKS: Final = ("pass", "pwd", "secret")
_MAX_DECODE: Final = 4


def _decoded(text: str) -> str:
    """`text` percent-decoded until stable (bounded): `pass%2577ord` is still `password`."""
    for _ in range(_MAX_DECODE):
        decoded = urllib.parse.unquote_plus(text)
        if decoded == text:
            break
        text = decoded
    return text


def is_secret_param(name: str) -> bool:
    """True when a DSN parameter called `name` (raw or encoded) holds a secret."""
    key = "".join(_decoded(name).split()).lower()
    return any(mark in key for mark in _SECRET_MARKS)


def _params(text: str) -> list[tuple[str, str]]:
    pairs = []
    for piece in text.replace(";", "&").split("&"):
        key, _, value = piece.partition("=")
        if key:
            pairs.append((key, value))
    return pairs


def password_in_dsn(dsn: str) -> str | None:
    """Where `dsn` carries a password (a short phrase for an error message), or None."""
    try:
        parts = urllib.parse.urlsplit(dsn)
    except ValueError:
        return "an unparseable authority"
    rest = dsn.partition("://")[2]
    if "@" not in parts.netloc and "@" in rest.split("?", 1)[0].split("#", 1)[0]:
        return "a user part that cannot be parsed (an unescaped '/' in a password?)"
    userinfo, at, _ = parts.netloc.rpartition("@")
    if at and ":" in _decoded(userinfo):
        return "a password after the user name (user:password@)"
    for where, text in (("query", parts.query), ("fragment", parts.fragment)):
        for key, _ in _params(text):
            if is_secret_param(key):
                return f"a {_decoded(key)!r} parameter in its {where}"
    return None


def redact(dsn: str) -> str:
    """`dsn` with every password replaced by `***`, safe to print, return, audit or store.
    A DSN we cannot parse is replaced by its scheme alone."""
    try:
        parts = urllib.parse.urlsplit(dsn)
    except ValueError:
        return "<unparseable DSN>"
    rest = dsn.partition("://")[2]
    if "@" not in parts.netloc and "@" in rest.split("?", 1)[0].split("#", 1)[0]:
        return f"{parts.scheme}://{REDACTED}"
    netloc = parts.netloc
    userinfo, at, hosts = netloc.rpartition("@")
    if at and ":" in _decoded(userinfo):
        user = _decoded(userinfo).partition(":")[0]
        netloc = f"{urllib.parse.quote(user, safe='')}:{REDACTED}@{hosts}"

    def clean(text: str) -> str:
        out = []
        for piece in text.split("&"):
            if any(is_secret_param(key) for key, _ in _params(piece)):
                piece = f"{piece.partition('=')[0]}={REDACTED}"
            out.append(piece)
        return "&".join(out)

    query, fragment = clean(parts.query), clean(parts.fragment)
    if (netloc, query, fragment) == (parts.netloc, parts.query, parts.fragment):
        return dsn
    return (
        f"{parts.scheme}://{netloc}{parts.path}"
        + (f"?{query}" if "?" in dsn else "")
        + (f"#{fragment}" if parts.fragment else "")
    )


def without_password(dsn: str) -> str | None:
    """`dsn` with every password removed (the user part's, and secret parameters dropped), for
    cleaning up a DSN stored before passwords were refused; None when it cannot be parsed."""
    try:
        parts = urllib.parse.urlsplit(dsn)
    except ValueError:
        return None
    rest = dsn.partition("://")[2]
    if "@" not in parts.netloc and "@" in rest.split("?", 1)[0].split("#", 1)[0]:
        return None
    userinfo, at, hosts = parts.netloc.rpartition("@")
    netloc = parts.netloc
    if at and ":" in _decoded(userinfo):
        user = _decoded(userinfo).partition(":")[0]
        netloc = f"{urllib.parse.quote(user, safe='')}@{hosts}"

    def keep(text: str) -> str:
        pieces = [p for p in text.split("&") if not any(is_secret_param(k) for k, _ in _params(p))]
        return "&".join(pieces)

    query, fragment = keep(parts.query), keep(parts.fragment)
    cleaned = (
        f"{parts.scheme}://{netloc}{parts.path}"
        + (f"?{query}" if query else "")
        + (f"#{fragment}" if fragment else "")
    )
    return cleaned if password_in_dsn(cleaned) is None else None
