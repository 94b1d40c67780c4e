"""Dynamic database credentials as one service: the facade the API, the reaper and the app wire
up, over the three parts OpenBao's database engine also has:

- `broker.database.connections`: connections, their sealed admin passwords, engines, root
  rotation and its recovery;
- `broker.database.roles`: roles (statements, TTLs, username and password shape, owner);
- `broker.database.leases`: credentials under leases, renewal, revocation and the reaper's round,
  with the authorization of whoever asks (`broker.policy.Authorize`);
- `broker.database.static`: static roles (existing users whose password the broker rotates),
  reached as `CredentialService.static`.

Every method delegates; the contracts (what is raised, what is idempotent) are on the parts.
"""

from __future__ import annotations

import datetime as dt
import logging
from collections.abc import Callable

from broker.database.connections import Connections
from broker.database.engine import EngineFactory, open_engine
from broker.database.leases import (
    Auditor,
    DatabaseSettings,
    IrrevocableHook,
    IssuedCredentials,
    Leases,
    ReapResult,
    revocation_backoff,
)
from broker.database.roles import CHARSETS, Roles, RoleSpec
from broker.database.static import StaticRoles
from broker.envelope import Envelope
from broker.errors import BrokerError
from broker.passwords import RandomBytes, system_random
from broker.policy import Authorize, Caller
from broker.storage.database import ConnectionRecord, DatabaseRepository, LeaseRecord, RoleRecord
from ca.clock import Clock

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


class CredentialService:
    """Connections, roles, credentials and leases over one `DatabaseRepository`; engines are opened
    through `engines` (one per connection, kept open). A `broker.envelope.SealedStore` (the
    connections' admin passwords)."""

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
        random: RandomBytes = system_random,
    ) -> None:
        self._store = store
        self._clock = clock
        self.connections = Connections(store, envelope, clock, engines=engines, random=random)
        self.roles = Roles(store, clock)
        # Static roles: existing users whose password the broker rotates (`random` is the
        # key backend's generator, as for every password the broker makes).
        self.static = StaticRoles(
            store, self.connections, envelope, clock, random=random, audit=audit
        )
        self.leases = Leases(
            store,
            self.connections,
            self.roles,
            clock,
            settings or DatabaseSettings(),
            audit=audit,
            notify=notify,
            random=random,
        )

    @property
    def settings(self) -> DatabaseSettings:
        """The leases' settings (replaceable, e.g. by a test lowering `max_attempts`)."""
        return self.leases.settings

    @settings.setter
    def settings(self, value: DatabaseSettings) -> None:
        self.leases.settings = value

    @property
    def store(self) -> DatabaseRepository:
        return self._store

    def now(self) -> dt.datetime:
        return self._clock.now()

    async def close(self) -> None:
        await self.connections.close()

    # -- sealed admin passwords (broker.envelope.SealedStore) ------------------------------------

    async def rewrap(self, envelope: Envelope, tenant: str, new_label: str) -> int:
        return await self.connections.rewrap(envelope, tenant, new_label)

    async def kek_in_use(self, label: str) -> bool:
        return await self.connections.kek_in_use(label)

    # -- connections ------------------------------------------------------------------------------

    async def add_connection(
        self, name: str, plugin: str, dsn: str, password: str, *, verify: bool = True
    ) -> ConnectionRecord:
        return await self.connections.add_connection(name, plugin, dsn, password, verify=verify)

    async def connection(self, name: str) -> ConnectionRecord:
        return await self.connections.connection(name)

    async def list_connections(self) -> list[ConnectionRecord]:
        return await self.connections.list_connections()

    async def remove_connection(self, name: str) -> None:
        await self.connections.remove_connection(name)

    async def rotate_root(self, name: str) -> ConnectionRecord:
        """Rotate the admin password, then every static role of the connection (whoever had
        the admin login could have read or set their passwords). A static role that fails to
        rotate is logged and left due, so the scheduled job retries it."""
        record = await self.connections.rotate_root(name)
        for role in await self.static.on_connection(name):
            try:
                await self.static.rotate(
                    role.name, "root rotation", actor="broker/root-rotation", trigger="root"
                )
            except BrokerError as exc:
                log.warning("rotating static role %s after root rotation: %s", role.name, exc)
        return record

    async def recover_all(self) -> None:
        await self.connections.recover_all()
        await self.static.settle_all()

    # -- roles ----------------------------------------------------------------------------------

    async def add_role(self, spec: RoleSpec) -> RoleRecord:
        return await self.roles.add_role(spec)

    async def role(self, name: str) -> RoleRecord:
        return await self.roles.role(name)

    async def list_roles(self) -> list[RoleRecord]:
        return await self.roles.list_roles()

    async def remove_role(self, name: str) -> None:
        await self.roles.remove_role(name)

    # -- credentials and leases -----------------------------------------------------------------

    async def issue(
        self,
        role: str,
        caller: Caller,
        authorize: Authorize,
        ttl: dt.timedelta | None = None,
    ) -> IssuedCredentials:
        return await self.leases.issue(role, caller, authorize, ttl)

    async def list_leases(self, prefix: str = "", limit: int = 1000) -> list[LeaseRecord]:
        return await self.leases.list_leases(prefix, limit)

    async def renew(
        self, lease_id: str, authorize: Authorize, increment: dt.timedelta | None = None
    ) -> LeaseRecord:
        return await self.leases.renew(lease_id, authorize, increment)

    async def revoke(
        self,
        lease_id: str,
        authorize: Authorize,
        *,
        loaded: Callable[[LeaseRecord], object] | None = None,
    ) -> LeaseRecord:
        return await self.leases.revoke(lease_id, authorize, loaded=loaded)

    async def revoke_prefix(self, prefix: str, authorize: Authorize) -> tuple[int, list[str]]:
        return await self.leases.revoke_prefix(prefix, authorize)

    async def reap_once(self) -> ReapResult:
        return await self.leases.reap_once()
