"""Dynamic database credentials: connections, roles, credentials with leases, and their
revocation (on request and by the reaper).

Invariant 4 (ARCHITECTURE.md): a lease is written ("pending") before its user exists, made
"active" once the user is created, and rolled back when creation fails. A lease carries what
is needed to revoke its user (connection, username, revocation statements), so removing its
role never orphans a user. Anything that may have left a user behind without an active lease
(a database that went away mid-creation, a crash, a lost race with the reaper) moves the lease
to "revoking", which the reaper finishes, with backoff. After `max_attempts` failures the lease
is "irrevocable": alerted (log event, audit event, metric, hook) and still retried at the
capped backoff until the user is gone, since nothing else ends it (MariaDB has no VALID UNTIL).

The admin password of a connection is stored only sealed (`broker.envelope`, tenant
`_system`, associated data binding the connection name) and is never returned by any method.
Root rotation writes a recovery record (the new password, sealed) before changing the password
on the database, so a crash mid-rotation never loses the admin login that works; `recover`
settles it.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import functools
import logging
import re
import secrets
import string
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, replace
from typing import Any, Final, TypeVar

from broker.audit import AuditEvent
from broker.database.engine import (
    AdminLoginRefused,
    Engine,
    EngineFactory,
    EngineUnavailable,
    NewUser,
    StatementFailed,
    open_engine,
    parse_dsn,
)
from broker.database.template import Template
from broker.dsn import password_in_dsn, redact, without_password
from broker.envelope import SYSTEM_TENANT, Envelope, SealedBlob, aad
from broker.errors import (
    AlreadyExists,
    BrokerError,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    Unavailable,
)
from broker.storage.database import (
    ConnectionRecord,
    DatabaseRepository,
    LeaseRecord,
    LeaseState,
    RecoveryRecord,
    RoleRecord,
)
from ca.clock import Clock
from ca.errors import IntegrityError

__all__ = [
    "CHARSETS",
    "CredentialService",
    "DatabaseSettings",
    "IssuedCredentials",
    "ReapResult",
    "RoleSpec",
    "revocation_backoff",
]

log = logging.getLogger(__name__)
_T = TypeVar("_T")

_NAME: Final = re.compile(r"^[a-z0-9][a-z0-9_-]{0,62}$")
_USERNAME_VARS: Final = re.compile(r"\{\{\s*([a-z_]+)\s*\}\}")
_USERNAME_ALLOWED: Final = frozenset({"role", "holder", "random", "unix_time"})
DEFAULT_USERNAME_TEMPLATE: Final = "v_{{role}}_{{random}}"
_RANDOM_LEN: Final = 10
CHARSETS: Final = {
    "alphanumeric": string.ascii_letters + string.digits,
    "alphanumeric-symbols": string.ascii_letters + string.digits + "-_.~!#%^*+=",
}
MAX_TTL_CEILING: Final = dt.timedelta(days=31)


@dataclass(frozen=True)
class DatabaseSettings:
    """How leases are reaped. `creation_timeout`: how long a lease may stay pending before the
    reaper treats its creation as failed (the engine call itself is bounded by half of it)."""

    reaper_interval: float = 1.0
    creation_timeout: dt.timedelta = dt.timedelta(seconds=30)
    max_attempts: int = 8  # failed attempts before a lease is "irrevocable" (alerted, retried)
    backoff_base: dt.timedelta = dt.timedelta(seconds=2)
    backoff_max: dt.timedelta = dt.timedelta(minutes=5)
    revoke_concurrency: int = 16
    reap_batch: int = 256


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


@dataclass(frozen=True)
class IssuedCredentials:
    username: str
    password: str
    lease: LeaseRecord

    @property
    def lease_duration(self) -> int:
        return int((self.lease.expires_at - self.lease.created_at).total_seconds())

    @property
    def renewable(self) -> bool:
        return self.lease.expires_at < self.lease.max_expires_at


@dataclass(frozen=True)
class ReapResult:
    revoked: list[LeaseRecord]
    failed: list[tuple[LeaseRecord, str]]


Auditor = Callable[[Mapping[str, Any]], Awaitable[object]]
# Called once when a lease becomes irrevocable (e.g. to page someone).
IrrevocableHook = Callable[[LeaseRecord], Awaitable[None]]


def revocation_backoff(attempts: int, settings: DatabaseSettings) -> dt.timedelta:
    """How long after its `attempts`-th failed attempt a revocation is tried again: doubling
    from `backoff_base`, capped at `backoff_max` (also for irrevocable leases, which are retried
    at that cap for as long as their user may exist)."""
    delay: dt.timedelta = settings.backoff_base * int(2 ** min(max(attempts, 0), 20))
    return min(delay, settings.backoff_max)


def _check_name(name: str, what: str) -> str:
    if not _NAME.fullmatch(name):
        raise InvalidArgument(
            f"invalid {what} name {name!r}: use 1-63 lowercase letters, digits, '-' or '_', "
            "starting with a letter or digit"
        )
    return name


def _charset(spec: str) -> str:
    chars = CHARSETS.get(spec, spec)
    if len(set(chars)) < 10 or not all(c.isascii() and c.isprintable() and c != " " for c in chars):
        raise InvalidArgument(
            f"password charset must be {' or '.join(CHARSETS)}, or at least 10 distinct "
            "printable ASCII characters (no spaces)"
        )
    return chars


@functools.lru_cache(maxsize=256)
def _parsed(source: str, plugin: str) -> Template:
    """Parsed statements (validated when the role was added), cached per text."""
    return Template.parse(source, plugin)


def _password_aad(connection: str) -> bytes:
    return aad("db.connection", connection, "admin-password")


def _recovery_aad(connection: str) -> bytes:
    return aad("db.root-recovery", connection, "admin-password")


def _random_suffix() -> str:
    alphabet = string.ascii_lowercase + string.digits
    return "".join(secrets.choice(alphabet) for _ in range(_RANDOM_LEN))


def _sanitize(text: str) -> str:
    return re.sub(r"[^a-z0-9_]", "_", text.lower())


class CredentialService:
    """Connections, roles, credentials and leases over a `DatabaseRepository`; engines are opened
    through `engines` (one per connection, kept open)."""

    def __init__(
        self,
        store: DatabaseRepository,
        envelope: Envelope,
        clock: Clock,
        *,
        engines: EngineFactory = open_engine,
        settings: DatabaseSettings | None = None,
        audit: Auditor | None = None,
        notify: IrrevocableHook | None = None,
    ) -> None:
        self._store = store
        self._notify = notify
        self._envelope = envelope
        self._clock = clock
        self._open_engine = engines
        self.settings = settings or DatabaseSettings()
        self._audit = audit
        self._engines: dict[str, Engine] = {}
        self._engine_lock = asyncio.Lock()

    @property
    def store(self) -> DatabaseRepository:
        return self._store

    def now(self) -> dt.datetime:
        return self._clock.now()

    async def close(self) -> None:
        engines, self._engines = self._engines, {}
        for engine in engines.values():
            try:
                await engine.close()
            except Exception:
                log.exception("closing a database engine failed")

    # -- sealed admin passwords (broker.envelope.SealedStore) ------------------------------------

    async def rewrap(self, envelope: Envelope, tenant: str, new_label: str) -> int:
        if tenant != SYSTEM_TENANT:
            return 0
        count = 0
        for table, key, blob_bytes in await self._store.sealed_blobs(new_label):
            blob = SealedBlob.from_bytes(blob_bytes)
            new = envelope.rewrap(blob, new_label).to_bytes()
            if await self._store.replace_blob(table, key, blob_bytes, new, new_label):
                count += 1
        return count

    async def kek_in_use(self, label: str) -> bool:
        return await self._store.label_in_use(label)

    async def _seal(self, password: str, associated: bytes) -> SealedBlob:
        return await self._envelope.seal(SYSTEM_TENANT, password.encode(), associated)

    async def _reseal_if_stale(
        self, table: str, key: str, blob: SealedBlob, password: str, associated: bytes
    ) -> None:
        """After storing `blob`: if a KEK rotation made a new generation current meanwhile
        (and so may not have seen this blob before destroying the old KEK), store the value
        sealed under the current KEK instead (compare-and-set over `blob`)."""
        fresh = await self._envelope.reseal_if_stale(
            SYSTEM_TENANT, blob, password.encode(), associated
        )
        if fresh is not None:
            await self._store.replace_blob(
                table, key, blob.to_bytes(), fresh.to_bytes(), fresh.kek_label
            )

    def _open(self, blob: bytes, associated: bytes) -> str:
        try:
            return self._envelope.open(SealedBlob.from_bytes(blob), associated).decode()
        except IntegrityError as exc:
            raise FailedPrecondition(f"stored admin password does not verify: {exc}") from None

    # -- connections ------------------------------------------------------------------------------

    async def add_connection(
        self, name: str, plugin: str, dsn: str, password: str, *, verify: bool = True
    ) -> ConnectionRecord:
        """Store a connection (admin password sealed). `verify` connects first. Raises
        InvalidArgument, AlreadyExists, FailedPrecondition / Unavailable (verification)."""
        _check_name(name, "connection")
        parse_dsn(plugin, dsn)
        if not password:
            raise InvalidArgument("the admin password is empty")
        if await self._store.get_connection(name) is not None:
            raise AlreadyExists(f"connection {name!r} already exists")
        if verify:
            engine = self._open_engine(plugin, dsn, password)
            try:
                await engine.verify()
            finally:
                await engine.close()
        blob = await self._seal(password, _password_aad(name))
        record = ConnectionRecord(
            name, plugin, dsn, blob.to_bytes(), blob.kek_label, self._clock.now()
        )
        try:
            await self._store.insert_connection(record)
        except AlreadyExists:
            raise AlreadyExists(f"connection {name!r} already exists") from None
        await self._reseal_if_stale("db_connections", name, blob, password, _password_aad(name))
        return await self.connection(name)

    async def connection(self, name: str) -> ConnectionRecord:
        record = await self._store.get_connection(name)
        if record is None:
            raise NotFound(f"no connection named {name!r}")
        return record

    async def list_connections(self) -> list[ConnectionRecord]:
        return await self._store.list_connections()

    async def remove_connection(self, name: str) -> None:
        if not await self._store.delete_connection(name):
            raise NotFound(f"no connection named {name!r}")
        await self._drop_engine(name)

    async def _drop_engine(self, name: str) -> None:
        async with self._engine_lock:
            engine = self._engines.pop(name, None)
        if engine is not None:
            await engine.close()

    async def _engine(self, name: str) -> Engine:
        engine = self._engines.get(name)
        if engine is not None:
            return engine
        async with self._engine_lock:
            engine = self._engines.get(name)
            if engine is None:
                await self._recover(name)
                record = await self.connection(name)
                password = self._open(record.sealed_password, _password_aad(name))
                engine = self._open_engine(record.plugin, record.dsn, password)
                self._engines[name] = engine
        return engine

    async def _on_engine(self, name: str, op: Callable[[Engine], Awaitable[_T]]) -> _T:
        """op(engine of `name`); when the admin login is refused (another broker process
        rotated the password), reopen the engine with the stored password and try once more."""
        engine = await self._engine(name)
        try:
            return await op(engine)
        except AdminLoginRefused:
            async with self._engine_lock:
                if self._engines.get(name) is engine:
                    del self._engines[name]
            await engine.close()
            return await op(await self._engine(name))

    async def rotate_root(self, name: str) -> ConnectionRecord:
        """Change the admin password to a fresh random one (never shown to anyone)."""
        engine = await self._engine(name)
        new_password = "".join(secrets.choice(CHARSETS["alphanumeric"]) for _ in range(40))
        blob = await self._seal(new_password, _recovery_aad(name))
        # Write-ahead: should we crash after the database changed the password, the new one
        # is in the recovery record.
        await self._store.put_recovery(
            RecoveryRecord(name, blob.to_bytes(), blob.kek_label, self._clock.now())
        )
        await self._reseal_if_stale(
            "db_root_recovery", name, blob, new_password, _recovery_aad(name)
        )
        try:
            await engine.rotate_root(new_password)
        except StatementFailed:
            await self._store.delete_recovery(name)  # refused: the old password stays
            raise
        # EngineUnavailable propagates with the record kept: `recover` settles it later.
        await self._finish_rotation(name, new_password)
        return await self.connection(name)

    async def _finish_rotation(self, name: str, new_password: str) -> None:
        await self._store_password(name, new_password)
        async with self._engine_lock:
            old = self._engines.pop(name, None)
        if old is not None:
            await old.close()

    async def _recover(self, name: str) -> None:
        """Settle an interrupted root rotation: keep whichever password the database takes.
        Leaves the record in place while the database cannot be reached."""
        record = await self._store.get_recovery(name)
        if record is None:
            return
        connection = await self.connection(name)
        new_password = self._open(record.sealed_password, _recovery_aad(name))
        probe = self._open_engine(connection.plugin, connection.dsn, new_password)
        try:
            await probe.verify()
        except StatementFailed:
            log.warning("root rotation of %s did not happen; keeping the old password", name)
            await self._store.delete_recovery(name)
            return
        finally:
            await probe.close()
        log.warning("finishing an interrupted root rotation of %s", name)
        await self._store_password(name, new_password)

    async def _store_password(self, name: str, password: str) -> None:
        """The new admin password, sealed, in place of the old; the recovery record goes."""
        sealed = await self._seal(password, _password_aad(name))
        await self._store.finish_rotation(
            name, sealed.to_bytes(), sealed.kek_label, self._clock.now()
        )
        await self._reseal_if_stale("db_connections", name, sealed, password, _password_aad(name))

    async def scrub_stored_dsns(self) -> int:
        """Remove the password from any connection DSN stored before DSN passwords were
        refused (the engines take the sealed admin password, which wins over the DSN's).
        Returns how many were cleaned; a DSN that cannot be cleaned is logged (redacted)."""
        cleaned = 0
        for connection in await self._store.list_connections():
            if password_in_dsn(connection.dsn) is None:
                continue
            clean = without_password(connection.dsn)
            if clean is None or not await self._store.replace_dsn(
                connection.name, connection.dsn, clean
            ):
                log.error(
                    "connection %s has a password in its stored DSN %s that could not be "
                    "removed: remove and re-add the connection",
                    connection.name,
                    redact(connection.dsn),
                )
                continue
            await self._drop_engine(connection.name)
            log.warning(
                "removed a password from the stored DSN of connection %s (now %s); rotate its "
                "admin password (broker db connection rotate-root %s): it was stored in clear",
                connection.name,
                clean,
                connection.name,
            )
            cleaned += 1
        return cleaned

    async def recover_all(self) -> None:
        """Settle every interrupted root rotation (at startup); failures are logged."""
        try:
            await self.scrub_stored_dsns()
        except BrokerError as exc:
            log.warning("cleaning stored DSNs: %s", exc)
        for connection in await self._store.list_connections():
            try:
                await self._recover(connection.name)
            except BrokerError as exc:
                log.warning("root rotation recovery of %s: %s", connection.name, exc)

    # -- roles ----------------------------------------------------------------------------------

    async def add_role(self, spec: RoleSpec) -> RoleRecord:
        _check_name(spec.name, "role")
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
        _charset(spec.password_charset)
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
        )
        for value, what in (
            (record.owner, "owner"),
            (record.tenant, "tenant"),
            (record.environment, "environment"),
        ):
            _check_name(value, what)
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

    # -- credentials ----------------------------------------------------------------------------

    def _username(self, role: RoleRecord, holder: str, limit: int) -> str:
        random = _random_suffix()
        service = holder.rstrip("/").rsplit("/", 1)[-1]
        values = {
            "role": role.name,
            "holder": service,
            "unix_time": str(int(self._clock.now().timestamp())),
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

    async def issue(
        self, role: RoleRecord, holder: str, ttl: dt.timedelta | None = None
    ) -> IssuedCredentials:
        """Create a database user for `holder` under a lease. Raises InvalidArgument (TTL),
        FailedPrecondition (the statements failed; nothing is left), Unavailable (database
        down; the lease, if any user may exist, is handed to the reaper)."""
        if ttl is None:
            ttl = dt.timedelta(seconds=role.default_ttl)
        max_ttl = dt.timedelta(seconds=role.max_ttl)
        if ttl < dt.timedelta(seconds=1) or ttl % dt.timedelta(seconds=1):
            raise InvalidArgument("TTL must be a whole number of seconds, at least 1s")
        if ttl > max_ttl:
            raise InvalidArgument(
                f"requested TTL {int(ttl.total_seconds())}s exceeds the max TTL "
                f"{role.max_ttl}s of role {role.name!r}"
            )
        engine = await self._engine(role.connection)  # cached: no lookup per request
        creation = _parsed(role.creation, engine.plugin)
        rollback = _parsed(role.rollback, engine.plugin) if role.rollback is not None else None
        chars = _charset(role.password_charset)
        password = "".join(secrets.choice(chars) for _ in range(role.password_length))
        now = self._clock.now()
        lease = LeaseRecord(
            id=f"db/{role.name}/{secrets.token_hex(12)}",
            role=role.name,
            connection=role.connection,
            plugin=engine.plugin,
            username=self._username(role, holder, engine.max_username_length),
            holder=holder,
            state=LeaseState.PENDING,
            revocation=role.revocation,
            created_at=now,
            expires_at=now + ttl,
            max_expires_at=now + max_ttl,
            due_at=now + self.settings.creation_timeout,
        )
        await self._store.insert_lease(lease)  # before the user exists
        user = NewUser(lease.username, password, lease.expires_at)
        try:
            await asyncio.wait_for(
                self._on_engine(role.connection, lambda e: e.create_user(creation, user, rollback)),
                self.settings.creation_timeout.total_seconds() / 2,
            )
        except StatementFailed:
            # Rolled back by the engine: no user. Drop the lease (or, if the rollback itself
            # could not be confirmed, let the reaper make sure).
            if await engine_user_gone(engine, lease.username):
                await self._store.delete_lease(lease.id)
            else:
                await self._hand_to_reaper(lease)
            raise
        except (EngineUnavailable, TimeoutError) as exc:
            await self._hand_to_reaper(lease)  # a user may or may not exist
            if isinstance(exc, TimeoutError):
                raise Unavailable(
                    f"creating the user on {role.connection!r} timed out; the lease is revoked"
                ) from None
            raise
        except BaseException:
            await asyncio.shield(self._hand_to_reaper(lease))
            raise
        if not await self._store.activate_lease(lease.id):
            # The reaper took the lease (creation ran past its deadline): undo the user.
            await self._revoke_quietly(engine, lease)
            raise Unavailable("creating the user took too long; it was revoked, try again")
        active = replace(lease, state=LeaseState.ACTIVE, due_at=lease.expires_at)
        return IssuedCredentials(lease.username, password, active)

    async def _hand_to_reaper(self, lease: LeaseRecord) -> None:
        await self._store.begin_revocation(
            lease.id, self._clock.now(), from_states=(LeaseState.PENDING, LeaseState.ACTIVE)
        )

    async def _revoke_quietly(self, engine: Engine, lease: LeaseRecord) -> None:
        try:
            await engine.revoke_user(lease.username, self._revocation(lease))
        except BrokerError as exc:
            log.warning("revoking %s after a lost race failed: %s", lease.id, exc)

    # -- leases ---------------------------------------------------------------------------------

    async def lease(self, lease_id: str) -> LeaseRecord:
        record = await self._store.get_lease(lease_id)
        if record is None:
            raise NotFound(f"no lease {lease_id!r}")
        return record

    async def list_leases(self, prefix: str = "", limit: int = 1000) -> list[LeaseRecord]:
        return await self._store.list_leases(prefix, limit)

    async def renew(self, lease: LeaseRecord, increment: dt.timedelta | None = None) -> LeaseRecord:
        """Extend an active lease by `increment` from now (default: the role's default TTL),
        never past its max TTL. Raises FailedPrecondition when it is not active or expired."""
        now = self._clock.now()
        if lease.state != "active":
            raise FailedPrecondition(f"lease {lease.id} is {lease.state}; it cannot be renewed")
        if lease.expires_at <= now:
            raise FailedPrecondition(f"lease {lease.id} has expired")
        if increment is None:
            role = await self._store.get_role(lease.role)
            if role is None:
                raise FailedPrecondition(
                    f"role {lease.role!r} was removed: give --increment to renew"
                )
            increment = dt.timedelta(seconds=role.default_ttl)
        if increment < dt.timedelta(seconds=1) or increment % dt.timedelta(seconds=1):
            raise InvalidArgument("increment must be a whole number of seconds, at least 1s")
        expires_at = min(now + increment, lease.max_expires_at)

        def move(e: Engine) -> Awaitable[None]:
            return e.renew_user(lease.username, expires_at)

        if expires_at > lease.expires_at:
            await self._on_engine(lease.connection, move)  # the database barrier first
        if not await self._store.extend_lease(lease.id, expires_at):
            raise FailedPrecondition(f"lease {lease.id} is no longer active")
        if expires_at < lease.expires_at:
            await self._on_engine(lease.connection, move)
        return replace(lease, expires_at=expires_at, due_at=expires_at)

    def _revocation(self, lease: LeaseRecord) -> Template | None:
        if lease.revocation is None:
            return None
        return _parsed(lease.revocation, lease.plugin)

    def _backoff(self, attempts: int) -> dt.timedelta:
        return revocation_backoff(attempts, self.settings)

    async def revoke(self, lease: LeaseRecord) -> None:
        """Revoke now: end the user's sessions, drop it, delete the lease. On failure the lease
        stays "revoking" for the reaper and the error is raised."""
        claimed = await self._store.begin_revocation(
            lease.id,
            self._clock.now() + self._backoff(lease.attempts),
            from_states=tuple(LeaseState),
        )
        if claimed is None:
            raise NotFound(f"no lease {lease.id!r}")
        await self._revoke_claimed(claimed)

    async def _revoke_claimed(self, lease: LeaseRecord) -> None:
        try:
            revocation = self._revocation(lease)
            await self._on_engine(
                lease.connection, lambda e: e.revoke_user(lease.username, revocation)
            )
        except BrokerError as exc:
            attempts = lease.attempts + 1
            give_up = attempts >= self.settings.max_attempts
            retry_at = self._clock.now() + self._backoff(attempts)
            await self._store.revocation_failed(lease.id, retry_at, str(exc), give_up=give_up)
            if give_up and lease.state != "irrevocable":
                await self._irrevocable(replace(lease, attempts=attempts), str(exc), retry_at)
            raise
        await self._store.delete_lease(lease.id)

    async def revoke_prefix(self, prefix: str) -> tuple[int, list[str]]:
        """Revoke every lease whose id starts with `prefix` ("db/" for all); returns
        (revoked, errors)."""
        if not prefix.startswith("db/"):
            raise InvalidArgument("a lease prefix starts with db/ (db/ROLE/ for one role)")
        revoked, errors = 0, []
        seen: set[str] = set()
        while True:
            leases = [
                lease
                for lease in await self._store.list_leases(prefix, 500 + len(seen))
                if lease.id not in seen
            ]
            if not leases:
                break
            for lease in leases:
                seen.add(lease.id)
                try:
                    await self.revoke(lease)
                    revoked += 1
                except NotFound:
                    continue  # revoked by someone else meanwhile
                except BrokerError as exc:
                    errors.append(f"{lease.id}: {exc}")
        return revoked, errors

    # -- the reaper -----------------------------------------------------------------------------

    async def reap_once(self) -> ReapResult:
        """Revoke every lease that is due: expired, pending past its creation deadline, or
        waiting for a retry. Runs revocations concurrently (settings.revoke_concurrency)."""
        now = self._clock.now()
        due = await self._store.due_leases(now, self.settings.reap_batch)
        result = ReapResult([], [])
        if not due:
            return result
        gate = asyncio.Semaphore(self.settings.revoke_concurrency)

        async def one(lease: LeaseRecord) -> None:
            async with gate:
                claimed = await self._store.begin_revocation(
                    lease.id,
                    now + self._backoff(lease.attempts),
                    from_states=tuple(LeaseState),
                    due_before=now,
                )
                if claimed is None:
                    return  # renewed, revoked or activated meanwhile
                try:
                    await self._revoke_claimed(claimed)
                except BrokerError as exc:
                    result.failed.append((claimed, str(exc)))
                    await self._audit_reaper(claimed, "revoke-failed", str(exc))
                    return
                result.revoked.append(claimed)
                await self._audit_reaper(claimed, "revoked", "")

        await asyncio.gather(*(one(lease) for lease in due))
        return result

    async def _irrevocable(self, lease: LeaseRecord, error: str, retry_at: dt.datetime) -> None:
        """Alert, once per lease, that its user may outlive it: an error log event, an audit
        event and the `notify` hook. The reaper keeps retrying it (capped backoff)."""
        log.error(
            "lease %s is irrevocable after %d attempts (user %s on %s may still log in); "
            "retrying every %ds at most: %s",
            lease.id,
            lease.attempts,
            lease.username,
            lease.connection,
            int(self.settings.backoff_max.total_seconds()),
            error,
            extra={"event": "lease.irrevocable", "lease_id": lease.id},
        )
        await self._audit_reaper(
            replace(lease, state=LeaseState.IRREVOCABLE),
            "irrevocable",
            error,
            what="lease.irrevocable",
            extra={"attempts": lease.attempts, "next_attempt_at": retry_at.isoformat()},
        )
        if self._notify is not None:
            try:
                await self._notify(replace(lease, state=LeaseState.IRREVOCABLE, last_error=error))
            except Exception:  # a broken hook must not stop the reaper
                log.exception("the irrevocable-lease hook failed for %s", lease.id)

    async def _audit_reaper(
        self,
        lease: LeaseRecord,
        outcome: str,
        error: str,
        *,
        what: str = "lease.expire",
        extra: Mapping[str, Any] | None = None,
    ) -> None:
        if self._audit is None:
            return
        event = AuditEvent(
            when=self._clock.now(),
            who="broker/lease-reaper",
            what=what,
            resource=lease.id,
            where="broker",
            correlation_id=f"reaper-{secrets.token_hex(8)}",
            rule="lease-expiry",
            decision="allow",
            reason=f"lease was {lease.state} and due",
            outcome=outcome,
            details={
                "lease_id": lease.id,
                "role": lease.role,
                "username": lease.username,
                **(extra or {}),
            },
            error=error or None,
        )
        try:
            await self._audit(event.to_dict())
        except BrokerError as exc:
            log.warning("audit of reaper event for %s failed: %s", lease.id, exc)


async def engine_user_gone(engine: Engine, username: str) -> bool:
    try:
        return not await engine.user_exists(username)
    except BrokerError:
        return False
