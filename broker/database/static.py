"""Static database roles: users that already exist on a target database (application users,
analytics readers) whose password the broker rotates -- when added, on their rotation period
(the leader-held `StaticRotationJob`), on demand, and after the connection's root rotation --
and hands to the owning service only.

Rotation is write-ahead, as root rotation is (`broker.database.connections`):

1. the new password (from the key backend's random generator) is sealed and written as the
   role's *intent*, with the version it becomes; at most one intent per role;
2. the engine sets it on the database (`Engine.set_password`: idempotent, sessions stay open);
3. the password is stored sealed as the role's current one and the intent dropped, in one
   transaction.

A crash (or a database that went away) between 1 and 3 leaves the intent: `settle` rolls it
forward -- it sets the intent's password again and finishes -- before anything else reads or
rotates the role (credentials, rotation, the scheduled job, startup). So afterwards the
stored password and the database's always agree, and the password given out is the one the
database takes. A database that refuses the statement (the user was dropped, the statements
fail) changes nothing: the intent goes, the old password stays.

Who may read the credentials is decided through the `Authorize` port, as for dynamic roles:
an unknown static role is decided as one nobody owns.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
import os
import re
import signal
import string
import time
import uuid
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any, Final

from broker import metrics
from broker.audit import AuditEvent
from broker.database.connections import Connections
from broker.database.engine import EngineUnavailable, StatementFailed
from broker.database.names import check_name
from broker.database.template import Template
from broker.envelope import SYSTEM_TENANT, Envelope, SealedBlob, aad
from broker.errors import (
    AlreadyExists,
    BrokerError,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    Unavailable,
)
from broker.passwords import RandomBytes, generate_password, system_random
from broker.policy import Action, Authorize, Caller, decide_absent, opaque_refusals
from broker.storage.database import DatabaseRepository, StaticIntentRecord, StaticRoleRecord
from ca.clock import Clock
from ca.errors import IntegrityError

__all__ = [
    "MAX_ROTATION_PERIOD",
    "MIN_ROTATION_PERIOD",
    "RotationObserver",
    "StaticCredentials",
    "StaticRoleSpec",
    "StaticRoles",
    "check_username",
    "resource_name",
    "sealed_password_aad",
]

log = logging.getLogger(__name__)

MIN_ROTATION_PERIOD: Final = dt.timedelta(hours=1)
MAX_ROTATION_PERIOD: Final = dt.timedelta(days=366)
PASSWORD_LENGTH: Final = 32
_ALPHABET: Final = string.ascii_letters + string.digits
# Existing users: what PostgreSQL and MySQL accept unquoted, plus '.', '-' and '$' (common in
# service accounts). Anything else (quotes, spaces, ';', NUL) is refused outright.
_USERNAME: Final = re.compile(r"^[A-Za-z_][A-Za-z0-9_.$-]{0,62}$")
# Rotation statements change a password, nothing else.
_ROTATION_STATEMENT: Final = re.compile(r"^\s*(ALTER\s+(ROLE|USER)|SET\s+PASSWORD)\b", re.I)
REFUSAL: Final = (
    f"{Action.DB_CREDS} refused: there is no such static role for this caller, or it may not use it"
)

# Test-only crash hook: with BROKER_TEST_CRASH_AT=<step> in its environment at start, the
# process sends itself SIGKILL at that step of a static-role rotation (intent-written,
# database-set, stored); tests/e2e/test_static_role_crash_e2e.py restarts it and checks the
# roll-forward. Inert when unset (the default).
_CRASH_AT: Final = os.environ.get("BROKER_TEST_CRASH_AT", "")
CRASH_STEPS: Final = ("intent-written", "database-set", "stored")


def _crash_point(step: str) -> None:
    if step == _CRASH_AT:
        os.kill(os.getpid(), signal.SIGKILL)


# Called after every rotation attempt: (trigger, outcome "success"/"failure", seconds).
RotationObserver = Callable[[str, str, float], None]
Auditor = Callable[[Mapping[str, Any]], Awaitable[object]]


@dataclass(frozen=True)
class StaticRoleSpec:
    name: str
    connection: str
    username: str
    rotation_period: dt.timedelta = dt.timedelta(days=30)
    rotation_statements: str | None = None
    owner: str = ""
    tenant: str = ""
    environment: str = ""


@dataclass(frozen=True)
class StaticCredentials:
    role: StaticRoleRecord
    password: str

    @property
    def username(self) -> str:
        return self.role.username


def check_username(username: str) -> str:
    if not _USERNAME.fullmatch(username):
        raise InvalidArgument(
            f"invalid database username {username!r}: 1-63 letters, digits, '_', '.', '$' or "
            "'-', starting with a letter or '_'"
        )
    return username


def _password_aad(role: str) -> bytes:
    return aad("db.static-role", role, "password")


def sealed_password_aad(table: str, key: str) -> bytes | None:
    """The associated data of a stored static-role password from
    `DatabaseRepository.sealed_blobs` (table db_static_roles); None for the other tables
    (a rotation intent's names its version, which that listing does not carry)."""
    return _password_aad(key) if table == "db_static_roles" else None


def _intent_aad(role: str, version: int) -> bytes:
    return aad("db.static-intent", role, str(version))


def resource_name(role: str) -> str:
    """What policy, grants and the audit ledger call a static role: `static/NAME` (role names
    hold no '/', so it never names a dynamic role)."""
    return f"static/{role}"


def static_attributes(role: StaticRoleRecord) -> dict[str, str]:
    return {"tenant": role.tenant, "environment": role.environment, "owner": role.owner}


class StaticRoles:
    """Static roles over a `DatabaseRepository`, their engines through `connections`, their
    passwords sealed with `envelope` and drawn from `random` (the key backend's generator)."""

    def __init__(
        self,
        store: DatabaseRepository,
        connections: Connections,
        envelope: Envelope,
        clock: Clock,
        *,
        random: RandomBytes = system_random,
        audit: Auditor | None = None,
        observe: RotationObserver | None = None,
    ) -> None:
        self._store = store
        self._connections = connections
        self._envelope = envelope
        self._clock = clock
        self._random = random
        self._audit = audit
        self.observe = observe
        self._locks: dict[str, asyncio.Lock] = {}
        # Whether a staged rollout of the role runs (set by the app when rollouts are on):
        # the role's password then must not change until it is over.
        self.rollout_running: Callable[[StaticRoleRecord], Awaitable[bool]] | None = None

    def _lock(self, name: str) -> asyncio.Lock:
        return self._locks.setdefault(name, asyncio.Lock())

    # -- administration -------------------------------------------------------------------------

    async def add(self, spec: StaticRoleSpec, *, actor: str = "operator") -> StaticRoleRecord:
        """Validate, check that the user exists, store, and rotate at once (so from then on
        only the broker knows the password). Raises InvalidArgument, NotFound (connection),
        AlreadyExists, FailedPrecondition (no such user; the database refused), Unavailable.
        A refused first rotation leaves nothing stored."""
        check_name(spec.name, "static role")
        check_username(spec.username)
        for value, what in ((spec.owner, "owner"), (spec.tenant, "tenant")):
            if value:
                check_name(value, what)
        if spec.environment:
            check_name(spec.environment, "environment")
        period = spec.rotation_period
        if period % dt.timedelta(seconds=1) or not (
            MIN_ROTATION_PERIOD <= period <= MAX_ROTATION_PERIOD
        ):
            raise InvalidArgument(
                "rotation period must be whole seconds between 1h and 366d (e.g. 30d)"
            )
        connection = await self._store.get_connection(spec.connection)
        if connection is None:
            raise NotFound(f"no connection named {spec.connection!r}")
        if spec.rotation_statements is not None:
            check_rotation_statements(spec.rotation_statements, connection.plugin)
        if await self._store.get_static_role(spec.name) is not None:
            raise AlreadyExists(f"static role {spec.name!r} already exists")
        exists = await self._connections.on_engine(
            spec.connection, lambda engine: engine.user_exists(spec.username)
        )
        if not exists:
            raise FailedPrecondition(
                f"connection {spec.connection!r} has no user {spec.username!r}: create it first"
            )
        now = self._clock.now()
        record = StaticRoleRecord(
            name=spec.name,
            connection=spec.connection,
            username=spec.username,
            owner=spec.owner or spec.name,
            tenant=spec.tenant or "default",
            environment=spec.environment or "dev",
            rotation_period=int(period.total_seconds()),
            rotation_statements=spec.rotation_statements,
            sealed_password=None,
            kek_label=None,
            version=0,
            rotated_at=None,
            next_rotation_at=now,
            created_at=now,
        )
        await self._store.insert_static_role(record)
        try:
            return await self.rotate(spec.name, "added", actor=actor)
        except Unavailable:
            raise  # the intent stays: the role is settled once the database is back
        except BrokerError:
            await self._store.delete_static_role(spec.name)  # refused: nothing is kept
            raise

    async def role(self, name: str) -> StaticRoleRecord:
        record = await self._store.get_static_role(name)
        if record is None:
            raise NotFound(f"no static role named {name!r}")
        return record

    async def list_roles(self, owner: str | None = None) -> list[StaticRoleRecord]:
        return await self._store.list_static_roles(owner)

    async def in_flight(self, name: str) -> bool:
        return await self._store.get_static_intent(name) is not None

    async def remove(self, name: str) -> StaticRoleRecord:
        """Forget the role (the database user keeps its last password, which nobody else
        knows). Raises NotFound."""
        async with self._lock(name):
            record = await self.role(name)
            if self.rollout_running is not None and await self.rollout_running(record):
                raise FailedPrecondition(
                    f"a staged rollout of static role {name!r} is running: abort it first "
                    f"('broker rollout abort db:{name}')"
                )
            if not await self._store.delete_static_role(name):
                raise NotFound(f"no static role named {name!r}")
        self._locks.pop(name, None)
        return record

    # -- credentials ----------------------------------------------------------------------------

    async def credentials(
        self, name: str, caller: Caller, authorize: Authorize
    ) -> StaticCredentials:
        """The current username and password, once `authorize` allowed `caller` (the role's
        owner, by policy). An unknown role is refused as one nobody owns. A rotation in flight
        is settled first, so the password given is the one the database takes."""
        authorize = opaque_refusals(authorize, caller, REFUSAL)
        record = await self._store.get_static_role(name)
        if record is None:
            unowned = {"tenant": "", "environment": "", "owner": ""}
            absent = NotFound(f"no static role named {name!r}")
            decide_absent(authorize, resource_name(name), unowned, absent)
        authorize(resource_name(record.name), static_attributes(record))
        async with self._lock(name):
            await self._settle(name)
            record = await self.role(name)
        if record.sealed_password is None:
            raise FailedPrecondition(f"static role {name!r} has not been rotated yet")
        password = self._open(record.sealed_password, _password_aad(name))
        return StaticCredentials(record, password)

    # -- rotation -------------------------------------------------------------------------------

    async def rotate(
        self, name: str, reason: str, *, actor: str = "operator", trigger: str = "manual"
    ) -> StaticRoleRecord:
        """Rotate now (see the module docstring). Raises NotFound, FailedPrecondition (the
        database refused: nothing changed), Unavailable (the intent stays and is settled
        later)."""
        started = time.monotonic()
        try:
            async with self._lock(name):
                record = await self.role(name)
                if self.rollout_running is not None and await self.rollout_running(record):
                    raise FailedPrecondition(
                        f"a staged rollout of static role {name!r} is running: its password "
                        f"changes when it completes; see 'broker rollout status db:{name}'"
                    )
                await self._settle(name)
                record = await self.role(name)
                version = record.version + 1
                password = generate_password(self._random, PASSWORD_LENGTH, _ALPHABET)
                blob = await self._seal(password, _intent_aad(name, version))
                intent = StaticIntentRecord(
                    name, blob.to_bytes(), blob.kek_label, version, reason[:200], self._clock.now()
                )
                if not await self._store.put_static_intent(intent):
                    raise FailedPrecondition(f"a rotation of static role {name!r} is in flight")
                _crash_point("intent-written")
                await self._reseal_if_stale(
                    "db_static_intents", name, blob, password, _intent_aad(name, version)
                )
                record = await self._apply(record, password, version)
        except BrokerError as exc:
            self._observed(trigger, "failure", started)
            await self._record(name, "db.static-role.rotate", "failed", actor, reason, str(exc))
            raise
        self._observed(trigger, "success", started)
        await self._record(
            name,
            "db.static-role.rotate",
            "rotated",
            actor,
            reason,
            None,
            version=record.version,
            before=record.version - 1,
            after=record.version,
            trigger=trigger,
        )
        return record

    async def settle(self, name: str) -> bool:
        """Roll forward a rotation left in flight (crash, database away); True when one was
        finished. Raises Unavailable while the database cannot be reached."""
        async with self._lock(name):
            return await self._settle(name)

    async def settle_all(self) -> int:
        """Settle every role with an intent (at startup); failures are logged."""
        settled = 0
        for record in await self._store.due_static_roles(self._clock.now(), 10_000):
            if await self._store.get_static_intent(record.name) is None:
                continue
            try:
                settled += await self.settle(record.name)
            except BrokerError as exc:
                log.warning("settling the rotation of static role %s: %s", record.name, exc)
        return settled

    async def _settle(self, name: str) -> bool:
        intent = await self._store.get_static_intent(name)
        if intent is None:
            return False
        record = await self.role(name)
        password = self._open(intent.sealed_password, _intent_aad(name, intent.version))
        log.warning("finishing an interrupted rotation of static role %s", name)
        await self._apply(record, password, intent.version)
        return True

    async def _apply(
        self, record: StaticRoleRecord, password: str, version: int
    ) -> StaticRoleRecord:
        """Steps 2 and 3: set the intent's password on the database, then store it."""
        name = record.name
        statements = (
            None
            if record.rotation_statements is None
            else Template.parse(record.rotation_statements, await self._plugin(record))
        )
        try:
            await self._connections.on_engine(
                record.connection,
                lambda engine: engine.set_password(record.username, password, statements),
            )
        except EngineUnavailable:
            raise  # the intent stays; rolled forward later
        except StatementFailed:
            await self._store.delete_static_intent(name, version)  # refused: nothing changed
            raise
        _crash_point("database-set")
        sealed = await self._seal(password, _password_aad(name))
        now = self._clock.now()
        next_at = now + dt.timedelta(seconds=record.rotation_period)
        await self._store.finish_static_rotation(
            name, version, sealed.to_bytes(), sealed.kek_label, now, next_at
        )
        _crash_point("stored")
        await self._reseal_if_stale("db_static_roles", name, sealed, password, _password_aad(name))
        return await self.role(name)

    async def _reseal_if_stale(
        self, table: str, name: str, blob: SealedBlob, password: str, associated: bytes
    ) -> None:
        """After storing `blob`: if a KEK rotation made a new KEK current meanwhile (and may
        not have seen this blob before retiring the old one), store it sealed under the current
        KEK instead (compare-and-set), as `Connections` does."""
        fresh = await self._envelope.reseal_if_stale(
            SYSTEM_TENANT, blob, password.encode(), associated
        )
        if fresh is not None:
            await self._store.replace_blob(
                table, name, blob.to_bytes(), fresh.to_bytes(), fresh.kek_label
            )

    async def _plugin(self, record: StaticRoleRecord) -> str:
        connection = await self._store.get_connection(record.connection)
        if connection is None:
            raise NotFound(f"no connection named {record.connection!r}")
        return connection.plugin

    async def due(self, limit: int = 100) -> list[StaticRoleRecord]:
        return await self._store.due_static_roles(self._clock.now(), limit)

    async def on_connection(self, connection: str) -> list[StaticRoleRecord]:
        return [r for r in await self._store.list_static_roles() if r.connection == connection]

    # -- sealing, audit, metrics ----------------------------------------------------------------

    async def _seal(self, password: str, associated: bytes) -> SealedBlob:
        return await self._envelope.seal(SYSTEM_TENANT, password.encode(), associated)

    def _open(self, blob: bytes, associated: bytes) -> str:
        try:
            return self._envelope.open(SealedBlob.from_bytes(blob), associated).decode()
        except IntegrityError as exc:
            raise FailedPrecondition(
                f"stored static-role password does not verify: {exc}"
            ) from None

    def _observed(self, trigger: str, outcome: str, started: float) -> None:
        seconds = time.monotonic() - started
        metrics.record_rotation("static-role", outcome, seconds)
        if self.observe is not None:
            self.observe(trigger, outcome, seconds)

    async def _record(
        self,
        name: str,
        what: str,
        outcome: str,
        actor: str,
        reason: str,
        error: str | None,
        **details: Any,
    ) -> None:
        if self._audit is None:
            return
        event = AuditEvent(
            when=self._clock.now(),
            who=actor,
            what=what,
            resource=name,
            where="broker",
            correlation_id=f"static-{uuid.uuid4().hex[:16]}",
            rule="static-role-rotation",
            decision="allow",
            reason=reason[:200],
            outcome=outcome,
            error=error,
            details=details or None,
        )
        await self._audit(event.to_dict())


def check_rotation_statements(source: str, plugin: str) -> Template:
    """Parse rotation statements: `{{name}}` and `{{password}}` only, both used, and every
    statement an ALTER ROLE / ALTER USER / SET PASSWORD. Raises InvalidArgument."""
    template = Template.parse(source, plugin, what="rotation statements")
    variables = template.variables()
    if variables - {"name", "password"}:
        raise InvalidArgument("rotation statements may only use {{name}} and {{password}}")
    if variables != {"name", "password"}:
        raise InvalidArgument("rotation statements must use both {{name}} and {{password}}")
    for statement in template.statements:
        head = next((p for p in statement if isinstance(p, str) and p.strip()), "")
        if not isinstance(statement[0], str) or not _ROTATION_STATEMENT.match(head):
            raise InvalidArgument(
                "rotation statements may only be ALTER ROLE, ALTER USER or SET PASSWORD statements"
            )
    return template
