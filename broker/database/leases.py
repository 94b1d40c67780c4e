"""Leases of dynamic database credentials: issue, renew, revoke, and the reaper's round
(OpenBao's lease part of the database engine).

Invariant 4 (ARCHITECTURE.md): a lease is written ("pending") before its user exists, made
"active" once the user is created, and rolled back when creation fails. A lease carries what
is needed to revoke its user (connection, username, revocation statements), so removing its
role never orphans a user. Anything that may have left a user behind without an active lease
(a database that went away mid-creation, a crash, a lost race with the reaper) moves the lease
to "revoking", which the reaper finishes, with backoff. After `max_attempts` failures the lease
is "irrevocable": alerted (log event, audit event, metric, hook) and still retried at the
capped backoff until the user is gone, since nothing else ends it (MariaDB has no VALID UNTIL).

Who may obtain a credential or act on a lease is decided here, through the `Authorize` port
(`broker.policy`), once the role or lease is loaded; an unknown role or lease is decided as one
nobody owns, so a workload cannot tell it from one it may not use.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
import secrets
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, replace
from typing import Any

from broker.audit import AuditEvent
from broker.database.connections import Connections
from broker.database.engine import Engine, EngineUnavailable, NewUser, StatementFailed
from broker.database.roles import Roles, charset, render_username, statements
from broker.database.template import Template
from broker.errors import BrokerError, FailedPrecondition, InvalidArgument, NotFound, Unavailable
from broker.passwords import RandomBytes, generate_password, system_random
from broker.policy import Action, Authorize, Caller, decide_absent, opaque_refusals
from broker.storage.database import DatabaseRepository, LeaseRecord, LeaseState, RoleRecord
from ca.clock import Clock

__all__ = [
    "Auditor",
    "DatabaseSettings",
    "IrrevocableHook",
    "IssuedCredentials",
    "Leases",
    "ReapResult",
    "engine_user_gone",
    "revocation_backoff",
]

log = logging.getLogger(__name__)

# What a workload refused a role is told, whether the role exists or not (the audit event
# keeps the real reason), so role names cannot be probed.
ROLE_REFUSAL = (
    f"{Action.DB_CREDS} refused: there is no such role for this caller, or it may not use it "
    "(an operator can grant access with 'broker grant create')"
)


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
class IssuedCredentials:
    username: str
    password: str
    lease: LeaseRecord


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


def role_attributes(role: RoleRecord) -> dict[str, str]:
    """What the policy decides a credential request on: the role's owner, tenant, environment
    and data classification (prod + pii: the two-person rule, as for secrets)."""
    return {
        "tenant": role.tenant,
        "environment": role.environment,
        "owner": role.owner,
        "classification": role.classification,
    }


class Leases:
    """Credentials and their leases over a `DatabaseRepository`, creating and dropping users through
    `connections`' engines."""

    def __init__(
        self,
        store: DatabaseRepository,
        connections: Connections,
        roles: Roles,
        clock: Clock,
        settings: DatabaseSettings,
        *,
        audit: Auditor | None = None,
        notify: IrrevocableHook | None = None,
        random: RandomBytes = system_random,
    ) -> None:
        self._random = random
        self._store = store
        self._connections = connections
        self._roles = roles
        self._clock = clock
        self.settings = settings
        self._audit = audit
        self._notify = notify

    # -- credentials ----------------------------------------------------------------------------

    async def authorized_role(self, name: str, caller: Caller, authorize: Authorize) -> RoleRecord:
        """Role `name`, once `authorize` allowed `caller` to obtain its credentials. An unknown
        role is decided as one nobody owns: a workload is refused exactly as for a role it may
        not use (same code, same message), an operator learns it is absent (NotFound)."""
        authorize = opaque_refusals(authorize, caller, ROLE_REFUSAL)
        role = await self._store.get_role(name)
        if role is None:
            unowned = {"tenant": "", "environment": "", "owner": ""}
            decide_absent(authorize, name, unowned, NotFound(f"no role named {name!r}"))
        authorize(role.name, role_attributes(role))
        return role

    async def issue(
        self,
        role_name: str,
        caller: Caller,
        authorize: Authorize,
        ttl: dt.timedelta | None = None,
    ) -> IssuedCredentials:
        """Create a database user for `caller` under a lease of role `role_name`, if
        `authorize` allows (see `authorized_role`). Raises PermissionDenied, NotFound (an
        unknown role, to operators), InvalidArgument (TTL), FailedPrecondition (the statements
        failed; nothing is left), Unavailable (database down; the lease, if any user may exist,
        is handed to the reaper)."""
        role = await self.authorized_role(role_name, caller, authorize)
        return await self.create(role, caller.spiffe_id, ttl)

    async def create(
        self, role: RoleRecord, holder: str, ttl: dt.timedelta | None = None
    ) -> IssuedCredentials:
        """The lease state machine of one credential, for a role already authorized: the lease
        is inserted "pending" before the user exists, then made "active"; see the module
        docstring for every way out. Raises as `issue` (but PermissionDenied)."""
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
        engine = await self._connections.engine(role.connection)  # cached: no lookup per request
        creation = statements(role.creation, engine.plugin)
        rollback = statements(role.rollback, engine.plugin) if role.rollback is not None else None
        chars = charset(role.password_charset)
        password = generate_password(self._random, role.password_length, chars)
        now = self._clock.now()
        lease = LeaseRecord(
            id=f"db/{role.name}/{secrets.token_hex(12)}",
            role=role.name,
            connection=role.connection,
            plugin=engine.plugin,
            username=render_username(role, holder, engine.max_username_length, now),
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
                self._connections.on_engine(
                    role.connection, lambda e: e.create_user(creation, user, rollback)
                ),
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

    async def authorized_lease(self, lease_id: str, authorize: Authorize) -> LeaseRecord:
        """Lease `lease_id`, once `authorize` allowed the caller to act on it (its holder).
        An unknown lease is decided as one nobody holds: refused like someone else's lease,
        or (operators) NotFound."""
        lease = await self._store.get_lease(lease_id)
        if lease is None:
            decide_absent(authorize, lease_id, {"holder": ""}, NotFound(f"no lease {lease_id!r}"))
        authorize(lease.id, {"holder": lease.holder, "role": lease.role})
        return lease

    async def list_leases(self, prefix: str = "", limit: int = 1000) -> list[LeaseRecord]:
        return await self._store.list_leases(prefix, limit)

    async def renew(
        self, lease_id: str, authorize: Authorize, increment: dt.timedelta | None = None
    ) -> LeaseRecord:
        """Extend lease `lease_id`, if `authorize` allows (see `authorized_lease`), by
        `increment` from now (default: the role's default TTL), never past its max TTL. Raises
        PermissionDenied, NotFound (to operators), FailedPrecondition when it is not active or
        expired."""
        return await self._renew(await self.authorized_lease(lease_id, authorize), increment)

    async def _renew(self, lease: LeaseRecord, increment: dt.timedelta | None) -> LeaseRecord:
        now = self._clock.now()
        if lease.state != LeaseState.ACTIVE:
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
            await self._connections.on_engine(lease.connection, move)  # the database barrier first
        if not await self._store.extend_lease(lease.id, expires_at):
            raise FailedPrecondition(f"lease {lease.id} is no longer active")
        if expires_at < lease.expires_at:
            await self._connections.on_engine(lease.connection, move)
        return replace(lease, expires_at=expires_at, due_at=expires_at)

    def _revocation(self, lease: LeaseRecord) -> Template | None:
        if lease.revocation is None:
            return None
        return statements(lease.revocation, lease.plugin)

    def _backoff(self, attempts: int) -> dt.timedelta:
        return revocation_backoff(attempts, self.settings)

    async def revoke(
        self,
        lease_id: str,
        authorize: Authorize,
        *,
        loaded: Callable[[LeaseRecord], object] | None = None,
    ) -> LeaseRecord:
        """Revoke lease `lease_id` now, if `authorize` allows (see `authorized_lease`); returns
        it as it was. `loaded` sees the lease once authorized, before anything changes (for the
        audit event, which then names it even when revocation fails). Raises PermissionDenied,
        NotFound, and the engine's error (the lease stays "revoking" for the reaper)."""
        lease = await self.authorized_lease(lease_id, authorize)
        if loaded is not None:
            loaded(lease)
        await self._revoke(lease)
        return lease

    async def revoke_record(self, lease: LeaseRecord) -> None:
        """Revoke `lease` now, already decided by the caller (`broker.revocation`: an operator
        ending everything of an identity). Raises NotFound (gone meanwhile) and the engine's
        error (the lease stays "revoking" for the reaper)."""
        await self._revoke(lease)

    async def _revoke(self, lease: LeaseRecord) -> None:
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
            await self._connections.on_engine(
                lease.connection, lambda e: e.revoke_user(lease.username, revocation)
            )
        except BrokerError as exc:
            attempts = lease.attempts + 1
            give_up = attempts >= self.settings.max_attempts
            retry_at = self._clock.now() + self._backoff(attempts)
            await self._store.revocation_failed(lease.id, retry_at, str(exc), give_up=give_up)
            if give_up and lease.state != LeaseState.IRREVOCABLE:
                await self._irrevocable(replace(lease, attempts=attempts), str(exc), retry_at)
            raise
        await self._store.delete_lease(lease.id)

    async def revoke_prefix(self, prefix: str, authorize: Authorize) -> tuple[int, list[str]]:
        """Revoke every lease whose id starts with `prefix` ("db/" for all), if `authorize`
        allows it for leases of no one in particular (holders revoke one lease at a time);
        returns (revoked, errors)."""
        authorize(prefix, {"holder": ""})
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
                    await self._revoke(lease)
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
