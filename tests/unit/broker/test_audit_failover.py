"""The ledger's writer during a database failover: an append that the storage reports as not
committed (StorageUnavailable: the primary was lost before COMMIT, or no primary answered) is
run again, so the request it audits succeeds once the new primary answers; an append whose
COMMIT was lost (StorageCommitUnknown) is never run again: its entries may already be there."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from broker.audit import AuditLedger
from broker.errors import AuditWriteFailed, StorageCommitUnknown, StorageUnavailable
from broker.storage.factory import open_storage
from broker.storage.interface import Storage
from ca.keys import SoftwareBackend


class _Failing:
    """A storage whose next `failures` appends raise `error` before touching the database."""

    def __init__(self, inner: Storage, error: Exception, failures: int) -> None:
        self._inner = inner
        self._error = error
        self.failures = failures
        self.calls = 0

    async def append_audit(self, *args: Any, **kwargs: Any) -> Any:
        self.calls += 1
        if self.failures > 0:
            self.failures -= 1
            raise self._error
        return await self._inner.append_audit(*args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)


@pytest.fixture
async def storage(tmp_path: Path) -> AsyncIterator[Storage]:
    store = await open_storage(f"sqlite:///{tmp_path / 'broker.db'}")
    await store.migrate()
    yield store
    await store.close()


async def _ledger(storage: Any) -> AuditLedger:
    ledger = AuditLedger(storage, SoftwareBackend())
    await ledger.open()
    ledger.start()
    return ledger


async def test_an_append_that_did_not_commit_is_retried_once_the_primary_is_back(
    storage: Storage,
) -> None:
    failing = _Failing(storage, StorageUnavailable("primary lost", retry_after=5), failures=0)
    ledger = await _ledger(failing)
    failing.failures, failing.calls = 2, 0
    try:
        before = len(await storage.read_audit())
        seq = await ledger.record({"who": "w", "what": "svid.mint", "n": 1})
        assert failing.calls == 3  # two failed attempts, then the one that committed
        records = await storage.read_audit()
        assert len(records) == before + 1 and records[-1].seq == seq
        assert '"n":1' in records[-1].event
        assert (await ledger.verify()).intact
    finally:
        await ledger.stop()


async def test_a_lost_commit_is_not_retried(storage: Storage) -> None:
    failing = _Failing(storage, StorageCommitUnknown("lost during COMMIT"), failures=0)
    ledger = await _ledger(failing)
    failing.failures, failing.calls = 5, 0
    try:
        before = await storage.read_audit()
        with pytest.raises(AuditWriteFailed, match="lost while committing"):
            await ledger.record({"who": "w", "what": "svid.mint"})
        assert failing.calls == 1
        assert await storage.read_audit() == before
    finally:
        await ledger.stop()


async def test_the_retry_is_bounded_and_says_when_to_come_back(storage: Storage) -> None:
    failing = _Failing(storage, StorageUnavailable("no primary", retry_after=5), failures=0)
    ledger = await _ledger(failing)
    failing.failures, failing.calls = 10**6, 0
    ledger.append_retry_budget = 0.6
    try:
        before = await storage.read_audit()
        with pytest.raises(AuditWriteFailed, match="retry after 5 s"):
            await ledger.record({"who": "w", "what": "svid.mint"})
        assert 1 < failing.calls < 10**6
        assert await storage.read_audit() == before
    finally:
        await ledger.stop()
