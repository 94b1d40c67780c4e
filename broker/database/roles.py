"""Database roles: what a credential is (the statements that create, revoke and roll back its
user, its TTLs, its username and password shape) and who may obtain it (owner, tenant,
environment). OpenBao's `role` part of the database engine.

Statements are validated when a role is added; `statements` parses them again on use (cached
per text). Removing a role never orphans a user: each lease keeps its own revocation
statements.
"""

from __future__ import annotations

import datetime as dt
import functools
import re
import secrets
import string
from dataclasses import dataclass
from typing import Final

from broker.database.names import check_name
from broker.database.template import Template
from broker.errors import AlreadyExists, InvalidArgument, NotFound
from broker.storage.database import DatabaseRepository, RoleRecord
from ca.clock import Clock

__all__ = [
    "CHARSETS",
    "DEFAULT_USERNAME_TEMPLATE",
    "MAX_TTL_CEILING",
    "RoleSpec",
    "Roles",
    "charset",
    "render_username",
    "statements",
]

_USERNAME_VARS: Final = re.compile(r"\{\{\s*([a-z_]+)\s*\}\}")
_USERNAME_ALLOWED: Final = frozenset({"role", "holder", "random", "unix_time"})
DEFAULT_USERNAME_TEMPLATE: Final = "v_{{role}}_{{random}}"
_RANDOM_LEN: Final = 10
CHARSETS: Final = {
    "alphanumeric": string.ascii_letters + string.digits,
    "alphanumeric-symbols": string.ascii_letters + string.digits + "-_.~!#%^*+=",
}
MAX_TTL_CEILING: Final = dt.timedelta(days=31)
CLASSIFICATIONS: Final = ("public", "internal", "confidential", "pii")  # as for secrets


@dataclass(frozen=True)
class RoleSpec:
    name: str
    connection: str
    creation: str
    revocation: str | None = None
    rollback: str | None = None
    default_ttl: dt.timedelta = dt.timedelta(hours=1)
    max_ttl: dt.timedelta = dt.timedelta(hours=24)
    username_template: str = DEFAULT_USERNAME_TEMPLATE
    owner: str = ""
    tenant: str = ""
    environment: str = ""
    password_length: int = 32
    password_charset: str = "alphanumeric"  # noqa: S105 (a charset name)
    classification: str = ""  # public, internal, confidential, pii
    rotation_period: dt.timedelta | None = None


def charset(spec: str) -> str:
    """The characters of password charset `spec` (a name in CHARSETS, or the characters
    themselves). Raises InvalidArgument."""
    chars = CHARSETS.get(spec, spec)
    if len(set(chars)) < 10 or not all(c.isascii() and c.isprintable() and c != " " for c in chars):
        raise InvalidArgument(
            f"password charset must be {' or '.join(CHARSETS)}, or at least 10 distinct "
            "printable ASCII characters (no spaces)"
        )
    return chars


@functools.lru_cache(maxsize=256)
def statements(source: str, plugin: str) -> Template:
    """Parsed statements (validated when the role was added), cached per text."""
    return Template.parse(source, plugin)


def _random_suffix() -> str:
    alphabet = string.ascii_lowercase + string.digits
    return "".join(secrets.choice(alphabet) for _ in range(_RANDOM_LEN))


def _sanitize(text: str) -> str:
    return re.sub(r"[^a-z0-9_]", "_", text.lower())


def render_username(role: RoleRecord, holder: str, limit: int, now: dt.datetime) -> str:
    """A fresh username from the role's template for `holder` (its last path segment), at most
    `limit` characters: when too long, the rendered name is cut and the random part kept."""
    random = _random_suffix()
    service = holder.rstrip("/").rsplit("/", 1)[-1]
    values = {
        "role": role.name,
        "holder": service,
        "unix_time": str(int(now.timestamp())),
    }

    def render(random_value: str) -> str:
        return _USERNAME_VARS.sub(
            lambda m: random_value if m[1] == "random" else _sanitize(values[m[1]]),
            role.username_template,
        )

    name = render(random)
    if len(name) > limit:
        name = render("")[: limit - _RANDOM_LEN - 1] + "_" + random
    return name


class Roles:
    """Roles over a `DatabaseRepository`."""

    def __init__(self, store: DatabaseRepository, clock: Clock) -> None:
        self._store = store
        self._clock = clock

    async def add_role(self, spec: RoleSpec) -> RoleRecord:
        """Validate and store a role. Raises InvalidArgument, NotFound (its connection),
        AlreadyExists."""
        check_name(spec.name, "role")
        connection = await self._store.get_connection(spec.connection)
        if connection is None:
            raise NotFound(f"no connection named {spec.connection!r}")
        creation = Template.parse(spec.creation, connection.plugin, what="creation statements")
        if "name" not in creation.variables():
            raise InvalidArgument("creation statements must use {{name}}")
        for text, what in (
            (spec.revocation, "revocation statements"),
            (spec.rollback, "rollback statements"),
        ):
            if text is not None:
                parsed = Template.parse(text, connection.plugin, what=what)
                if parsed.variables() - {"name"}:
                    raise InvalidArgument(f"{what} may only use {{{{name}}}}")
        for ttl, what in ((spec.default_ttl, "default TTL"), (spec.max_ttl, "max TTL")):
            if ttl < dt.timedelta(seconds=1) or ttl % dt.timedelta(seconds=1):
                raise InvalidArgument(f"{what} must be a whole number of seconds, at least 1s")
        if spec.max_ttl > MAX_TTL_CEILING:
            raise InvalidArgument(f"max TTL may be at most {MAX_TTL_CEILING.days} days")
        if spec.default_ttl > spec.max_ttl:
            raise InvalidArgument("the default TTL exceeds the max TTL")
        self._check_username_template(spec.username_template)
        if not 16 <= spec.password_length <= 128:
            raise InvalidArgument("password length must be between 16 and 128")
        charset(spec.password_charset)
        if spec.classification not in ("", *CLASSIFICATIONS):
            raise InvalidArgument(
                f"classification {spec.classification!r} is not one of {', '.join(CLASSIFICATIONS)}"
            )
        period = spec.rotation_period
        if period is not None and (
            period % dt.timedelta(seconds=1) or not dt.timedelta(hours=1) <= period
        ):
            raise InvalidArgument("rotation period must be whole seconds, at least 1h")
        record = RoleRecord(
            name=spec.name,
            connection=spec.connection,
            owner=spec.owner or spec.name,
            tenant=spec.tenant or "default",
            environment=spec.environment or "dev",
            creation=spec.creation,
            revocation=spec.revocation,
            rollback=spec.rollback,
            default_ttl=int(spec.default_ttl.total_seconds()),
            max_ttl=int(spec.max_ttl.total_seconds()),
            username_template=spec.username_template,
            password_length=spec.password_length,
            password_charset=spec.password_charset,
            created_at=self._clock.now(),
            classification=spec.classification,
            rotation_period=None if period is None else int(period.total_seconds()),
        )
        for value, what in (
            (record.owner, "owner"),
            (record.tenant, "tenant"),
            (record.environment, "environment"),
        ):
            check_name(value, what)
        try:
            await self._store.insert_role(record)
        except AlreadyExists:
            raise AlreadyExists(f"role {spec.name!r} already exists") from None
        return record

    @staticmethod
    def _check_username_template(template: str) -> None:
        if len(template) > 128:
            raise InvalidArgument("username template is longer than 128 characters")
        found = _USERNAME_VARS.findall(template)
        unknown = set(found) - _USERNAME_ALLOWED
        if unknown:
            raise InvalidArgument(
                f"username template: unknown placeholder {{{{{sorted(unknown)[0]}}}}} (known: "
                + ", ".join("{{" + v + "}}" for v in sorted(_USERNAME_ALLOWED))
                + ")"
            )
        if "random" not in found:
            raise InvalidArgument("username template must contain {{random}} (names are unique)")
        rest = _USERNAME_VARS.sub("", template)
        if not re.fullmatch(r"[A-Za-z0-9_-]*", rest):
            raise InvalidArgument(
                "username template: only letters, digits, '_' and '-' outside placeholders"
            )

    async def role(self, name: str) -> RoleRecord:
        record = await self._store.get_role(name)
        if record is None:
            raise NotFound(f"no role named {name!r}")
        return record

    async def list_roles(self) -> list[RoleRecord]:
        return await self._store.list_roles()

    async def remove_role(self, name: str) -> None:
        """Remove a role; its live leases keep what they need to be revoked."""
        if not await self._store.delete_role(name):
            raise NotFound(f"no role named {name!r}")
