"""Issue 20 finding 6 on the fake clock: a lease whose revocation keeps failing becomes
"irrevocable" (alerted once: log event, audit event, hook, metric) and is still retried with
capped exponential backoff until its user is gone."""

from __future__ import annotations

import datetime as dt
import logging
from collections.abc import AsyncIterator, Mapping
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import REGISTRY

from broker.database.credentials import CredentialService, DatabaseSettings, revocation_backoff
from broker.database.engine import EngineUnavailable
from broker.database.reaper import LeaseReaper
from broker.storage import open_storage
from broker.storage.database import ConnectionRecord, LeaseRecord
from ca.clock import FakeClock

T0 = dt.datetime(2026, 3, 1, 12, 0, 0, tzinfo=dt.UTC)


def test_backoff_doubles_then_stays_at_the_cap() -> None:
    settings = DatabaseSettings()  # 2 s doubling, capped at 5 min
    delays = [int(revocation_backoff(n, settings).total_seconds()) for n in range(1, 13)]
    assert delays == [4, 8, 16, 32, 64, 128, 256, 300, 300, 300, 300, 300]
    assert revocation_backoff(10**9, settings) == dt.timedelta(minutes=5)
    custom = DatabaseSettings(
        backoff_base=dt.timedelta(seconds=1), backoff_max=dt.timedelta(seconds=30)
    )
    assert [revocation_backoff(n, custom).total_seconds() for n in (0, 3, 5, 40)] == [1, 8, 30, 30]


class FlakyEngine:
    """A database that is down until `up` is set; then it drops the user."""

    plugin = "mysql"
    max_username_length = 32

    def __init__(self) -> None:
        self.up = False
        self.users = {"v_app_1"}
        self.attempts = 0

    async def revoke_user(self, username: str, revocation: object = None) -> None:
        self.attempts += 1
        if not self.up:
            raise EngineUnavailable("mysql at 127.0.0.1:3306 is unavailable: timed out")
        self.users.discard(username)

    async def close(self) -> None:
        return None


@pytest.fixture
async def setup(tmp_path: Path) -> AsyncIterator[tuple[CredentialService, FakeClock, Any]]:
    storage = await open_storage(f"sqlite://{tmp_path / 'broker.db'}")
    await storage.migrate()
    store = storage.database()
    clock = FakeClock(T0)
    engine = FlakyEngine()
    audited: list[Mapping[str, Any]] = []
    notified: list[LeaseRecord] = []

    async def audit(event: Mapping[str, Any]) -> None:
        audited.append(event)

    async def notify(lease: LeaseRecord) -> None:
        notified.append(lease)

    service = CredentialService(
        store,
        None,  # type: ignore[arg-type]
        clock,
        engines=lambda plugin, dsn, password: engine,  # type: ignore[arg-type, return-value]
        audit=audit,
        notify=notify,
    )
    await store.insert_connection(
        ConnectionRecord("main", "mysql", "mysql://root@db/app", b"sealed", "kek.1", T0)
    )
    await store.insert_lease(
        LeaseRecord(
            "db/app/1", "app", "main", "mysql", "v_app_1", "spiffe://x/acme/prod/web", "active",
            None, T0 - dt.timedelta(seconds=5), T0 + dt.timedelta(seconds=5),
            T0 + dt.timedelta(hours=1), T0 + dt.timedelta(seconds=5),
        )
    )  # fmt: skip
    service.connections._engines["main"] = engine  # type: ignore[assignment]  # opened (no envelope here)
    context = {"engine": engine, "audited": audited, "notified": notified, "storage": storage}
    yield service, clock, context
    await storage.close()


async def test_irrevocable_lease_is_retried_with_capped_backoff_until_the_user_is_gone(
    setup: tuple[CredentialService, FakeClock, Any], caplog: pytest.LogCaptureFixture
) -> None:
    service, clock, ctx = setup
    engine, store = ctx["engine"], service.store
    reaper = LeaseReaper(service, ctx["storage"], clock, interval=1.0)
    clock.advance(seconds=6)  # the 5 s lease has expired; the database is down
    gaps: list[int] = []
    last_try = clock.now()
    # Six hours of outage, the reaper ticking every second of fake time (sampled: jump to the
    # next due time, and check that nothing happens one second before it).
    while clock.now() < T0 + dt.timedelta(hours=6):
        before = engine.attempts
        with caplog.at_level(logging.ERROR, logger="broker.database.leases"):
            result = await reaper.tick()
        assert engine.attempts == before + 1, f"a due lease was not retried: {result}"
        gaps.append(int((clock.now() - last_try).total_seconds()))
        last_try = clock.now()
        row = await store.get_lease("db/app/1")
        assert row is not None
        clock.advance(seconds=int((row.due_at - clock.now()).total_seconds()) - 1)
        await reaper.tick()
        assert engine.attempts == before + 1, "retried before its backoff elapsed"
        clock.advance(seconds=1)
    row = await store.get_lease("db/app/1")
    assert row is not None and row.state == "irrevocable"
    assert row.attempts == len(gaps) > 60  # never given up
    assert "unavailable" in (row.last_error or "")
    assert gaps[1:9] == [4, 8, 16, 32, 64, 128, 256, 300] and set(gaps[9:]) == {300}
    assert "v_app_1" in engine.users
    # Alerted exactly once: hook, audit event, error log event; the gauge counts it.
    assert [n.id for n in ctx["notified"]] == ["db/app/1"]
    assert ctx["notified"][0].state == "irrevocable"
    alerts = [e for e in ctx["audited"] if e["what"] == "lease.irrevocable"]
    assert len(alerts) == 1 and alerts[0]["details"]["attempts"] == 8
    assert "next_attempt_at" in alerts[0]["details"]
    logged = [r for r in caplog.records if getattr(r, "event", "") == "lease.irrevocable"]
    assert len(logged) == 1 and "may still log in" in logged[0].getMessage()
    gauge = REGISTRY.get_sample_value("broker_leases_irrevocable", {"kind": "database"})
    assert gauge == 1

    # The database comes back: the next retry (at most 5 min later) drops the user.
    engine.up = True
    clock.advance(minutes=5)
    result = await reaper.tick()
    assert result is not None and [r.id for r in result.revoked] == ["db/app/1"]
    assert engine.users == set()
    assert await store.get_lease("db/app/1") is None
    assert REGISTRY.get_sample_value("broker_leases_irrevocable", {"kind": "database"}) == 0
    revoked = [e for e in ctx["audited"] if e.get("outcome") == "revoked"]
    assert revoked and revoked[-1]["reason"] == "lease was irrevocable and due"
