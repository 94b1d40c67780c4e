"""The access repository contract (grants, approvals, break-glass, the change counter), run
against SQLite and PostgreSQL."""

from __future__ import annotations

import asyncio
import datetime as dt
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from broker.errors import AlreadyExists
from broker.storage import open_storage
from broker.storage.access import (
    AccessRepository,
    ApprovalRecord,
    BreakGlassRecord,
    GrantRecord,
)
from broker.storage.sql import SqlStorage

T0 = dt.datetime(2026, 3, 1, 12, 0, 0, 123456, tzinfo=dt.UTC)
HOUR = dt.timedelta(hours=1)
ALICE = "spiffe://example.org/broker/operator/alice"
BOB = "spiffe://example.org/broker/operator/bob"
WEB = "spiffe://example.org/acme/prod/web"


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
async def repo(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[AccessRepository]:
    if request.param == "sqlite":
        dsn = f"sqlite://{tmp_path / 'broker.db'}"
    else:
        dsn = request.getfixturevalue("pg_dsn")
    storage = await open_storage(dsn)
    assert isinstance(storage, SqlStorage)
    await storage.migrate()
    try:
        yield storage.access()
    finally:
        await storage.close()


def grant(grant_id: str, expires: dt.datetime = T0 + HOUR) -> GrantRecord:
    return GrantRecord(grant_id, WEB, "secrets.get", "secret://x", "INC-1", ALICE, T0, expires)


def approval(approval_id: str, requester: str = ALICE) -> ApprovalRecord:
    return ApprovalRecord(
        approval_id, requester, "secrets.get", "secret://x", "INC-2", T0, T0 + HOUR
    )


def breakglass(record_id: str, approval_id: str, operator: str = ALICE) -> BreakGlassRecord:
    return BreakGlassRecord(
        record_id,
        operator,
        approval_id,
        f"spiffe://example.org/broker/breakglass/{record_id}",
        "secrets.get",
        "secret://x",
        T0,
        T0 + HOUR,
    )


async def test_grants_round_trip_filter_and_revoke_once(repo: AccessRepository) -> None:
    assert await repo.access_version() == 0
    await repo.insert_grant(grant("g1"))
    await repo.insert_grant(grant("g2", T0 + dt.timedelta(minutes=5)))
    assert await repo.access_version() == 2
    assert await repo.get_grant("g1") == grant("g1")
    assert await repo.get_grant("nope") is None
    with pytest.raises(AlreadyExists):
        await repo.insert_grant(grant("g1"))
    later = T0 + dt.timedelta(minutes=5)
    assert [g.id for g in await repo.list_grants(active_at=later)] == ["g1"]
    assert [g.id for g in await repo.list_grants()] == ["g1", "g2"]
    assert await repo.revoke_grant("g1", BOB, later) is True
    assert await repo.revoke_grant("g1", BOB, later) is False
    assert await repo.revoke_grant("nope", BOB, later) is False
    revoked = await repo.get_grant("g1")
    assert revoked is not None and revoked.revoked_by == BOB and revoked.revoked_at == later
    assert await repo.list_grants(active_at=T0) == [grant("g2", T0 + dt.timedelta(minutes=5))]
    assert await repo.access_version() == 3


async def test_approve_is_compare_and_set_and_never_by_the_requester(
    repo: AccessRepository,
) -> None:
    await repo.insert_approval(approval("a1"))
    assert await repo.approve("a1", ALICE, T0) is False  # the requester
    assert await repo.consume_approval("a1", T0) is False  # not approved yet
    assert await repo.approve("a1", BOB, T0 + HOUR) is False  # expired
    assert await repo.approve("a1", BOB, T0) is True
    assert await repo.approve("a1", BOB, T0) is False  # already approved
    stored = await repo.get_approval("a1")
    assert stored is not None and stored.approved_by == BOB
    assert stored.state(T0) == "approved"
    assert [a.id for a in await repo.list_approvals(active_at=T0)] == ["a1"]


async def test_an_approval_is_consumed_once_even_under_concurrency(
    repo: AccessRepository,
) -> None:
    await repo.insert_approval(approval("a2"))
    await repo.approve("a2", BOB, T0)
    results = await asyncio.gather(*(repo.consume_approval("a2", T0) for _ in range(8)))
    assert sorted(results) == [False] * 7 + [True]
    assert await repo.list_approvals(active_at=T0) == []
    used = await repo.get_approval("a2")
    assert used is not None and used.state(T0) == "used"


async def test_breakglass_consumes_its_approval_in_the_same_transaction(
    repo: AccessRepository,
) -> None:
    await repo.insert_approval(approval("a3"))
    assert await repo.insert_breakglass(breakglass("b1", "a3")) is False  # pending approval
    assert await repo.get_breakglass("b1") is None
    await repo.approve("a3", BOB, T0)
    assert await repo.insert_breakglass(breakglass("b1", "a3", operator=BOB)) is False  # not BOB's
    assert await repo.insert_breakglass(breakglass("b1", "a3")) is True
    assert await repo.insert_breakglass(breakglass("b2", "a3")) is False  # approval spent
    assert await repo.get_breakglass("b2") is None
    assert [b.id for b in await repo.list_breakglass(active_at=T0)] == ["b1"]


async def test_breakglass_is_used_once_and_revoked_once(repo: AccessRepository) -> None:
    await repo.insert_approval(approval("a4"))
    await repo.approve("a4", BOB, T0)
    await repo.insert_breakglass(breakglass("b3", "a4"))
    results = await asyncio.gather(*(repo.use_breakglass("b3", T0) for _ in range(6)))
    assert results.count(True) == 1
    assert await repo.list_breakglass(active_at=T0) == []
    assert await repo.revoke_breakglass("b3", T0) is True
    assert await repo.revoke_breakglass("b3", T0) is False
    stored = await repo.get_breakglass("b3")
    assert stored is not None and stored.state(T0) == "revoked"
    assert [b.id for b in await repo.list_breakglass()] == ["b3"]


async def test_expired_breakglass_cannot_be_used(repo: AccessRepository) -> None:
    await repo.insert_approval(approval("a5"))
    await repo.approve("a5", BOB, T0)
    await repo.insert_breakglass(breakglass("b4", "a5"))
    assert await repo.use_breakglass("b4", T0 + HOUR) is False
    assert await repo.list_breakglass(active_at=T0 + HOUR) == []


async def test_the_counter_moves_on_every_change(repo: AccessRepository) -> None:
    seen = [await repo.access_version()]
    await repo.insert_approval(approval("a6"))
    seen.append(await repo.access_version())
    await repo.approve("a6", BOB, T0)
    seen.append(await repo.access_version())
    await repo.bump_access_version()
    seen.append(await repo.access_version())
    assert seen == sorted(set(seen)) and len(seen) == 4
    await repo.approve("a6", BOB, T0)  # refused: the counter stays
    assert await repo.access_version() == seen[-1]
