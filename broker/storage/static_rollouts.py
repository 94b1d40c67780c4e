"""Storage for staged rollouts of a static database role (migration 0013): per role, its two
login users and, while a rollout runs, which of them gets the new password and that password,
sealed. The rollout itself (stages, consumers) is a row of `rollouts` (reference `db:ROLE`).

`SqlStaticRolloutRepository` runs over the same `Backend` as `SqlStorage`
(`storage.static_rollouts()`). Methods own their transaction; datetimes must be aware.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass

from broker.storage.backend import Backend, require_aware

__all__ = ["SqlStaticRolloutRepository", "StaticPair"]


@dataclass(frozen=True)
class StaticPair:
    name: str
    first_user: str  # the user the role was added with
    second_user: str  # the one the broker creates for rollouts
    target_user: str  # while a rollout runs: the user that gets the new password, else ''
    rollout_id: str
    version: int  # the role's version the new password becomes
    sealed_password: bytes | None
    kek_label: str | None

    def other(self, username: str) -> str:
        return self.second_user if username == self.first_user else self.first_user


class SqlStaticRolloutRepository:
    _COLUMNS = (
        "name, first_user, second_user, target_user, rollout_id, version, sealed_password, "
        "kek_label"
    )

    def __init__(self, backend: Backend) -> None:
        self._b = backend

    async def get(self, name: str) -> StaticPair | None:
        async with self._b.transaction(write=False) as tx:
            row = await tx.fetchrow(
                f"SELECT {self._COLUMNS} FROM db_static_rollouts WHERE name = ?",  # noqa: S608
                name,
            )
        if row is None:
            return None
        name, first, second, target, rollout_id, version, blob, label = row
        return StaticPair(
            name=str(name),
            first_user=str(first),
            second_user=str(second),
            target_user=str(target),
            rollout_id=str(rollout_id),
            version=int(version),
            sealed_password=None if blob is None else bytes(blob),
            kek_label=None if label is None else str(label),
        )

    async def begin(self, pair: StaticPair) -> bool:
        """Write the intent of a rollout (target user, sealed password); False when one is
        already written for the role."""
        async with self._b.transaction(write=True) as tx:
            await tx.execute(
                "INSERT INTO db_static_rollouts (name, first_user, second_user) "
                "VALUES (?, ?, ?) ON CONFLICT DO NOTHING",
                pair.name,
                pair.first_user,
                pair.second_user,
            )
            row = await tx.fetchrow(
                "UPDATE db_static_rollouts SET first_user = ?, second_user = ?, "
                "target_user = ?, rollout_id = ?, version = ?, sealed_password = ?, "
                "kek_label = ? WHERE name = ? AND target_user = '' RETURNING name",
                pair.first_user,
                pair.second_user,
                pair.target_user,
                pair.rollout_id,
                pair.version,
                pair.sealed_password,
                pair.kek_label,
                pair.name,
            )
        return row is not None

    async def clear(self, name: str, rollout_id: str) -> None:
        """The rollout is over (rolled back or refused): forget its password."""
        async with self._b.transaction(write=True) as tx:
            await tx.execute(
                "UPDATE db_static_rollouts SET target_user = '', rollout_id = '', "
                "sealed_password = NULL, kek_label = NULL WHERE name = ? AND rollout_id = ?",
                name,
                rollout_id,
            )

    async def complete(
        self,
        name: str,
        rollout_id: str,
        username: str,
        version: int,
        sealed_password: bytes,
        kek_label: str,
        at: dt.datetime,
        next_rotation_at: dt.datetime,
    ) -> bool:
        """The role's user becomes `username` with the new password, as `version`, and the
        rollout's intent goes, in one transaction; False when it was finished already."""
        async with self._b.transaction(write=True) as tx:
            gone = await tx.fetchrow(
                "UPDATE db_static_rollouts SET target_user = '', rollout_id = '', "
                "sealed_password = NULL, kek_label = NULL WHERE name = ? AND rollout_id = ? "
                "RETURNING name",
                name,
                rollout_id,
            )
            if gone is None:
                return False
            await tx.execute(
                "UPDATE db_static_roles SET username = ?, sealed_password = ?, kek_label = ?, "
                "version = ?, rotated_at = ?, next_rotation_at = ? WHERE name = ?",
                username,
                bytes(sealed_password),
                kek_label,
                version,
                self._b.encode_ts(require_aware(at)),
                self._b.encode_ts(require_aware(next_rotation_at)),
                name,
            )
        return True
