"""Storage for operator logins: the operator certificates `broker login` issued (serial,
subject, roles, expiry, revocation) and the ID tokens already used (migration 0006).

`OperatorRepository`; `SqlOperatorRepository` runs over the same `Backend` as `SqlStorage`
(`storage.operators()`). Methods own their transaction; datetimes must
be aware. `use_token` is the replay guard: an insert that fails when the key is taken.
"""

from __future__ import annotations

import datetime as dt
import json
from dataclasses import dataclass
from typing import Final, Protocol

from broker.errors import AlreadyExists
from broker.storage.backend import Backend, Row, require_aware

__all__ = ["OperatorRepository", "OperatorSessionRecord", "SqlOperatorRepository"]

_COLUMNS: Final = (
    "serial, subject, spiffe_id, issuer, roles, amr, issued_at, expires_at, revoked_at"
)


@dataclass(frozen=True)
class OperatorSessionRecord:
    serial: str  # hex, lower case, no leading zeros (as the denylist writes serials)
    subject: str
    spiffe_id: str
    issuer: str
    roles: tuple[str, ...]
    amr: tuple[str, ...]
    issued_at: dt.datetime
    expires_at: dt.datetime
    revoked_at: dt.datetime | None = None

    def active(self, now: dt.datetime) -> bool:
        return self.revoked_at is None and now < self.expires_at


class OperatorRepository(Protocol):
    async def insert_session(self, record: OperatorSessionRecord) -> None:
        """Raises `AlreadyExists` when the serial is taken."""
        ...

    async def list_sessions(
        self, active_at: dt.datetime | None = None
    ) -> list[OperatorSessionRecord]:
        """All sessions (newest first), or only those not revoked and unexpired at `active_at`."""
        ...

    async def get_session(self, serial: str) -> OperatorSessionRecord | None: ...

    async def revoke_session(self, serial: str, at: dt.datetime) -> bool:
        """False when absent or already revoked."""
        ...

    async def use_token(self, key: str, expires_at: dt.datetime, now: dt.datetime) -> bool:
        """Record an ID token (by nonce or hash) as used; False when it was used before."""
        ...


class SqlOperatorRepository:
    """`OperatorRepository` over a `broker.storage.backend.Backend`; build it with
    `storage.operators()`."""

    def __init__(self, backend: Backend) -> None:
        self._b = backend

    def _ts(self, value: dt.datetime) -> object:
        return self._b.encode_ts(require_aware(value))

    async def insert_session(self, record: OperatorSessionRecord) -> None:
        async with self._b.transaction(write=True) as tx:
            await tx.execute(
                f"INSERT INTO operator_sessions ({_COLUMNS}) "  # noqa: S608 (constant)
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                record.serial,
                record.subject,
                record.spiffe_id,
                record.issuer,
                json.dumps(list(record.roles)),
                json.dumps(list(record.amr)),
                self._ts(record.issued_at),
                self._ts(record.expires_at),
                None,
            )

    async def list_sessions(
        self, active_at: dt.datetime | None = None
    ) -> list[OperatorSessionRecord]:
        """All sessions (newest first), or only those not revoked and unexpired at `active_at`."""
        async with self._b.transaction(write=False) as tx:
            if active_at is None:
                rows = await tx.fetch(
                    f"SELECT {_COLUMNS} FROM operator_sessions "  # noqa: S608 (constant)
                    "ORDER BY issued_at DESC, serial"
                )
            else:
                rows = await tx.fetch(
                    f"SELECT {_COLUMNS} FROM operator_sessions "  # noqa: S608 (constant)
                    "WHERE revoked_at IS NULL AND expires_at > ? ORDER BY issued_at DESC, serial",
                    self._ts(active_at),
                )
        return [self._record(r) for r in rows]

    async def get_session(self, serial: str) -> OperatorSessionRecord | None:
        async with self._b.transaction(write=False) as tx:
            row = await tx.fetchrow(
                f"SELECT {_COLUMNS} FROM operator_sessions WHERE serial = ?",  # noqa: S608
                serial,
            )
        return None if row is None else self._record(row)

    async def revoke_session(self, serial: str, at: dt.datetime) -> bool:
        """False when absent or already revoked."""
        async with self._b.transaction(write=True) as tx:
            row = await tx.fetchrow(
                "UPDATE operator_sessions SET revoked_at = ? "
                "WHERE serial = ? AND revoked_at IS NULL RETURNING serial",
                self._ts(at),
                serial,
            )
        return row is not None

    async def use_token(self, key: str, expires_at: dt.datetime, now: dt.datetime) -> bool:
        """Record an ID token (by nonce or hash) as used; False when it was used before.
        Expired records are dropped on the way (a token past its expiry is refused anyway)."""
        try:
            async with self._b.transaction(write=True) as tx:
                await tx.execute(
                    "DELETE FROM operator_used_tokens WHERE expires_at < ?", self._ts(now)
                )
                await tx.execute(
                    "INSERT INTO operator_used_tokens (key, expires_at) VALUES (?, ?)",
                    key,
                    self._ts(expires_at),
                )
        except AlreadyExists:
            return False
        return True

    def _record(self, r: Row) -> OperatorSessionRecord:
        ts = self._b.decode_ts
        return OperatorSessionRecord(
            r[0],
            r[1],
            r[2],
            r[3],
            tuple(json.loads(r[4])),
            tuple(json.loads(r[5])),
            ts(r[6]),
            ts(r[7]),
            None if r[8] is None else ts(r[8]),
        )
