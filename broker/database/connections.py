"""Database connections: the admin ("root") login of each target database, its engine, and
root rotation with recovery (OpenBao's `connection` part of the database engine).

The admin password of a connection is stored only sealed (`broker.envelope`, tenant
`_system`, associated data binding the connection name) and is never returned by any method.
Root rotation writes a recovery record (the new password, sealed) before changing the password
on the database, so a crash mid-rotation never loses the admin login that works; `recover`
settles it. Engines are opened once per connection and kept open; `on_engine` reopens one
whose admin login was refused (another broker process rotated the password).
"""

from __future__ import annotations

import asyncio
import logging
import string
from collections.abc import Awaitable, Callable
from typing import Final, TypeVar

from broker.database.engine import (
    AdminLoginRefused,
    Engine,
    EngineFactory,
    StatementFailed,
    open_engine,
    parse_dsn,
)
from broker.database.names import check_name
from broker.dsn import password_in_dsn, redact, without_password
from broker.envelope import SYSTEM_TENANT, Envelope, SealedBlob, aad
from broker.errors import AlreadyExists, BrokerError, FailedPrecondition, InvalidArgument, NotFound
from broker.passwords import RandomBytes, generate_password, system_random
from broker.storage.database import ConnectionRecord, DatabaseRepository, RecoveryRecord
from ca.clock import Clock
from ca.errors import IntegrityError

__all__ = ["Connections", "sealed_password_aad"]

log = logging.getLogger(__name__)
_T = TypeVar("_T")

_ROOT_ALPHABET: Final = string.ascii_letters + string.digits
_ROOT_LENGTH: Final = 40


def _password_aad(connection: str) -> bytes:
    return aad("db.connection", connection, "admin-password")


def _recovery_aad(connection: str) -> bytes:
    return aad("db.root-recovery", connection, "admin-password")


def sealed_password_aad(table: str, key: str) -> bytes | None:
    """The associated data of an admin password from `DatabaseRepository.sealed_blobs`
    (tables db_connections and db_root_recovery); None for the other tables."""
    if table == "db_connections":
        return _password_aad(key)
    if table == "db_root_recovery":
        return _recovery_aad(key)
    return None


class Connections:
    """Connections over a `DatabaseRepository`, their sealed admin passwords (a
    `broker.envelope.SealedStore`) and one open engine per connection (`engines` opens them)."""

    def __init__(
        self,
        store: DatabaseRepository,
        envelope: Envelope,
        clock: Clock,
        *,
        engines: EngineFactory = open_engine,
        random: RandomBytes = system_random,
    ) -> None:
        self._random = random  # the key backend's generator
        self._store = store
        self._envelope = envelope
        self._clock = clock
        self._open_engine = engines
        self._engines: dict[str, Engine] = {}
        self._engine_lock = asyncio.Lock()

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
        check_name(name, "connection")
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
        await self.drop_engine(name)

    async def drop_engine(self, name: str) -> None:
        async with self._engine_lock:
            engine = self._engines.pop(name, None)
        if engine is not None:
            await engine.close()

    async def engine(self, name: str) -> Engine:
        """The open engine of connection `name` (opened on first use, after settling an
        interrupted root rotation). Raises NotFound."""
        engine = self._engines.get(name)
        if engine is not None:
            return engine
        async with self._engine_lock:
            engine = self._engines.get(name)
            if engine is None:
                await self.recover(name)
                record = await self.connection(name)
                password = self._open(record.sealed_password, _password_aad(name))
                engine = self._open_engine(record.plugin, record.dsn, password)
                self._engines[name] = engine
        return engine

    async def on_engine(self, name: str, op: Callable[[Engine], Awaitable[_T]]) -> _T:
        """op(engine of `name`); when the admin login is refused (another broker process
        rotated the password), reopen the engine with the stored password and try once more."""
        engine = await self.engine(name)
        try:
            return await op(engine)
        except AdminLoginRefused:
            async with self._engine_lock:
                if self._engines.get(name) is engine:
                    del self._engines[name]
            await engine.close()
            return await op(await self.engine(name))

    async def rotate_root(self, name: str) -> ConnectionRecord:
        """Change the admin password to a fresh random one (never shown to anyone)."""
        engine = await self.engine(name)
        new_password = generate_password(self._random, _ROOT_LENGTH, _ROOT_ALPHABET)
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

    async def recover(self, name: str) -> None:
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
            await self.drop_engine(connection.name)
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
                await self.recover(connection.name)
            except BrokerError as exc:
                log.warning("root rotation recovery of %s: %s", connection.name, exc)
