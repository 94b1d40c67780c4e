"""The audit ledger: chain + MAC verification finds every kind of tampering; writes fail closed."""

from __future__ import annotations

import asyncio
import json
import sqlite3
from collections.abc import AsyncIterator, Sequence
from pathlib import Path

import pytest

from broker.audit import AuditLedger, canonical_json
from broker.errors import AuditWriteFailed, StorageError
from broker.storage.factory import open_storage
from broker.storage.interface import Sealer, Storage
from ca.keys import SoftwareBackend


@pytest.fixture
def db(tmp_path: Path) -> Path:
    return tmp_path / "broker.db"


@pytest.fixture
async def storage(db: Path) -> AsyncIterator[Storage]:
    store = await open_storage(f"sqlite:///{db}")
    await store.migrate()
    yield store
    await store.close()


@pytest.fixture
async def ledger(storage: Storage) -> AsyncIterator[AuditLedger]:
    led = AuditLedger(storage, SoftwareBackend())
    led.ensure_key()
    led.start()
    yield led
    await led.stop()


async def _fill(ledger: AuditLedger, n: int) -> list[int]:
    seqs = await asyncio.gather(
        *(ledger.record({"who": f"spiffe://td/s/{i}", "what": "svid.mint"}) for i in range(n))
    )
    await ledger.drain()  # the head record is written after the requests are answered
    return list(seqs)


def _tamper(db: Path, sql: str, *args: object) -> None:
    with sqlite3.connect(db) as conn:
        for (name,) in conn.execute("SELECT name FROM sqlite_master WHERE type = 'trigger'"):
            conn.execute(f'DROP TRIGGER "{name}"')  # an attacker with file access can
        conn.execute(sql, args)


async def test_concurrent_records_form_one_intact_chain(ledger: AuditLedger) -> None:
    seqs = await _fill(ledger, 200)
    assert sorted(seqs) == list(range(1, 201))
    result = await ledger.verify(page=37)
    assert result.intact, result.reason
    assert result.entries == 200
    tail = await ledger.tail(5)
    assert [r.seq for r in tail] == [196, 197, 198, 199, 200]


async def test_events_are_canonical_json(ledger: AuditLedger) -> None:
    await ledger.record({"b": 1, "a": "é"})
    (record,) = await ledger.tail(1)
    assert record.event == canonical_json({"a": "é", "b": 1}) == '{"a":"é","b":1}'


async def test_altered_event_is_found(ledger: AuditLedger, db: Path) -> None:
    await _fill(ledger, 10)
    forged = json.dumps({"who": "spiffe://td/s/4", "what": "nothing to see"})
    _tamper(db, "UPDATE audit SET event = ? WHERE seq = 5", forged)
    result = await ledger.verify()
    assert not result.intact
    assert result.first_broken_seq == 5
    assert "altered" in result.reason


async def test_deleted_entry_is_found(ledger: AuditLedger, db: Path) -> None:
    await _fill(ledger, 10)
    _tamper(db, "DELETE FROM audit WHERE seq = 7")
    result = await ledger.verify()
    assert (result.intact, result.first_broken_seq, result.entries) == (False, 7, 6)
    assert "missing" in result.reason


async def test_entries_cut_off_the_end_are_found(ledger: AuditLedger, db: Path) -> None:
    await _fill(ledger, 10)
    assert (await ledger.verify()).intact
    _tamper(db, "DELETE FROM audit WHERE seq > 8")
    result = await ledger.verify()
    assert (result.intact, result.first_broken_seq, result.entries) == (False, 9, 8)
    assert "cut off" in result.reason


async def test_group_mac_covers_every_entry_and_stripping_it_is_found(
    ledger: AuditLedger, db: Path
) -> None:
    await _fill(ledger, 50)
    with sqlite3.connect(db) as conn:
        macs = [m for (m,) in conn.execute("SELECT mac FROM audit ORDER BY seq")]
    assert macs[-1] != b""  # the last entry of the last group is always MACed
    assert sum(1 for m in macs if m) < len(macs)  # grouped: not every entry needs its own
    _tamper(db, "UPDATE audit SET mac = zeroblob(0) WHERE seq = 50")
    result = await ledger.verify()
    assert not result.intact
    assert "not covered by any MAC" in result.reason


async def test_recomputed_hash_without_the_key_is_found(ledger: AuditLedger, db: Path) -> None:
    """An attacker who rewrites an event and recomputes the chain hashes still cannot MAC."""
    await _fill(ledger, 3)
    from broker.audit import chain_hash

    with sqlite3.connect(db) as conn:
        prev = conn.execute("SELECT entry_hash FROM audit WHERE seq = 2").fetchone()[0]
    forged = canonical_json({"who": "spiffe://td/s/2", "what": "forged"})
    _tamper(
        db,
        "UPDATE audit SET event = ?, entry_hash = ? WHERE seq = 3",
        forged,
        chain_hash(prev, 3, forged),
    )
    result = await ledger.verify()
    assert (result.intact, result.first_broken_seq) == (False, 3)
    assert "MAC" in result.reason


async def test_truncated_tail_relinked_is_found(ledger: AuditLedger, db: Path) -> None:
    await _fill(ledger, 5)
    _tamper(db, "UPDATE audit SET prev_hash = zeroblob(32) WHERE seq = 4")
    result = await ledger.verify()
    assert (result.intact, result.first_broken_seq) == (False, 4)
    assert "link" in result.reason


async def test_ledger_verified_with_another_key_fails(
    storage: Storage, ledger: AuditLedger
) -> None:
    await _fill(ledger, 2)
    other = AuditLedger(storage, SoftwareBackend())
    other.ensure_key()
    result = await other.verify()
    assert not result.intact
    assert "invalid MAC" in result.reason
    first_maced = next(r.seq for r in await storage.read_audit() if r.mac)
    assert result.first_broken_seq == first_maced


class _BrokenStorage:
    """A storage whose audit append fails, as a full disk or a lost database would."""

    def __init__(self, inner: Storage) -> None:
        self._inner = inner

    async def append_audit(
        self, events: Sequence[str], seal: Sealer, head: object = None
    ) -> list[int]:
        raise StorageError("disk full")

    def __getattr__(self, name: str) -> object:
        return getattr(self._inner, name)


async def test_write_failure_fails_every_waiting_request(storage: Storage) -> None:
    led = AuditLedger(_BrokenStorage(storage), SoftwareBackend())  # type: ignore[arg-type]
    led.ensure_key()
    led.start()
    try:
        results = await asyncio.gather(
            *(led.record({"n": i}) for i in range(5)), return_exceptions=True
        )
        assert all(isinstance(r, AuditWriteFailed) for r in results)
    finally:
        await led.stop()
    assert await storage.audit_tail(10) == []


async def test_record_before_start_is_refused(storage: Storage) -> None:
    led = AuditLedger(storage, SoftwareBackend())
    with pytest.raises(AuditWriteFailed):
        await led.record({"n": 1})
