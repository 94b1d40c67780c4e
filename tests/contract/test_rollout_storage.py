"""The rollout repository contract (one unfinished rollout per secret, compare-and-set steps,
consumers' reads and reports, a refused start forgotten), run against SQLite and PostgreSQL."""

from __future__ import annotations

import dataclasses
import datetime as dt
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from broker.storage import open_storage
from broker.storage.rollouts import RolloutRecord, RolloutRepository, RolloutState
from broker.storage.sql import SqlStorage

T0 = dt.datetime(2026, 3, 1, 12, 0, 0, 123456, tzinfo=dt.UTC)
REF = "secret://payments/prod/stripe/api-key"
POD = "spiffe://example.org/acme/prod/payments/pod-1"


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
async def repo(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[RolloutRepository]:
    if request.param == "sqlite":
        dsn = f"sqlite://{tmp_path / 'broker.db'}"
    else:
        dsn = request.getfixturevalue("pg_dsn")
    storage = await open_storage(dsn)
    assert isinstance(storage, SqlStorage)
    await storage.migrate()
    try:
        yield storage.rollouts()
    finally:
        await storage.close()


def rollout(rollout_id: str = "rollout-1", ref: str = REF, **kw: object) -> RolloutRecord:
    base = RolloutRecord(
        id=rollout_id,
        tenant="acme",
        ref=ref,
        from_version=3,
        to_version=None,
        state=RolloutState.PENDING,
        stages=(10, 50, 100),
        stage=0,
        stage_opened_at=T0,
        bake_seconds=300,
        max_failures=1,
        failures=0,
        health_check="http://127.0.0.1:8080/healthz",
        check_passed=None,
        checked_at=None,
        check_detail="",
        started_at=T0,
        deadline=T0 + dt.timedelta(hours=24),
        finished_at=None,
        reason="",
        started_by="spiffe://example.org/broker/operator/alice",
        ticket="SEC-12",
    )
    return dataclasses.replace(base, **kw)  # type: ignore[arg-type]


async def test_one_unfinished_rollout_per_secret(repo: RolloutRepository) -> None:
    assert await repo.insert(rollout())
    assert await repo.get("rollout-1") == rollout()
    assert not await repo.insert(rollout("rollout-2"))  # the same secret: refused
    assert await repo.get("rollout-2") is None
    assert await repo.insert(rollout("rollout-3", "secret://payments/prod/other"))
    assert await repo.active("acme", REF) == rollout()
    assert await repo.active("beta", REF) is None
    assert [r.id for r in await repo.unfinished()] == ["rollout-1", "rollout-3"]
    # Once finished, a new rollout of the secret may start; latest is the newest.
    done = rollout(state=RolloutState.ABORTED, finished_at=T0, reason="aborted by an operator")
    assert await repo.update(rollout(), done)
    later = rollout("rollout-4", started_at=T0 + dt.timedelta(minutes=1))
    assert await repo.insert(later)
    assert await repo.active("acme", REF) == later
    assert await repo.latest("acme", REF) == later


async def test_steps_are_compare_and_set(repo: RolloutRepository) -> None:
    await repo.insert(rollout())
    running = rollout(
        state=RolloutState.RUNNING, to_version=4, approver="approval ap-1", check_passed=True,
        checked_at=T0, check_detail="HTTP 200",
    )  # fmt: skip
    assert await repo.update(rollout(), running)
    assert await repo.get("rollout-1") == running
    # A writer that read the pending row loses: nothing changes.
    assert not await repo.update(rollout(), rollout(state=RolloutState.ABORTED))
    counted = dataclasses.replace(running, failures=1)
    assert await repo.update(running, counted)
    assert not await repo.update(running, dataclasses.replace(running, stage=1))
    assert await repo.get("rollout-1") == counted


async def test_consumers_reads_and_reports(repo: RolloutRepository) -> None:
    await repo.insert(rollout())
    await repo.served("rollout-1", POD, 1, 3, T0)
    await repo.reported("rollout-1", POD, 1, 4, False, "stripe: 401", T0 + dt.timedelta(1))
    await repo.served("rollout-1", POD, 1, 4, T0 + dt.timedelta(2))
    [consumer] = await repo.consumers("rollout-1")
    assert (consumer.identity, consumer.stage, consumer.served_version) == (POD, 1, 4)
    assert (consumer.reported_version, consumer.healthy, consumer.detail) == (
        4,
        False,
        "stripe: 401",
    )
    assert consumer.read_at == T0 + dt.timedelta(2)
    assert consumer.reported_at == T0 + dt.timedelta(1)
    assert await repo.consumer("rollout-1", POD) == consumer
    assert await repo.consumer("rollout-1", POD + "-other") is None


async def test_a_refused_start_is_forgotten_only_while_pending(repo: RolloutRepository) -> None:
    await repo.insert(rollout())
    await repo.served("rollout-1", POD, 0, 3, T0)
    await repo.delete_pending("rollout-1")
    assert await repo.get("rollout-1") is None and await repo.consumers("rollout-1") == []
    running = rollout("rollout-2", state=RolloutState.RUNNING, to_version=4)
    await repo.insert(running)
    await repo.delete_pending("rollout-2")
    assert await repo.get("rollout-2") == running
