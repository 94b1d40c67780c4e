"""The audit ledger: chain + MAC verification finds every kind of tampering; writes fail closed.

Each ledger starts with its signed epoch record (entry 1), so n recorded events are entries
2..n+1."""

from __future__ import annotations

import asyncio
import base64
import datetime as dt
import json
import sqlite3
from collections.abc import AsyncIterator, Sequence
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization

from broker.audit import AuditLedger, Checkpoint, CheckpointJob, canonical_json, parse_checkpoint
from broker.errors import (
    AuditIntegrityError,
    AuditWriteFailed,
    InvalidArgument,
    LedgerStartRefused,
    StorageError,
)
from broker.storage.factory import open_storage
from broker.storage.interface import Sealer, Storage
from ca.clock import FakeClock
from ca.keys import KeyBackend, KeyKind, SoftwareBackend


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
def keys() -> SoftwareBackend:
    return SoftwareBackend()


@pytest.fixture
async def ledger(storage: Storage, keys: SoftwareBackend) -> AsyncIterator[AuditLedger]:
    led = AuditLedger(storage, keys)
    await led.open()
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
    assert sorted(seqs) == list(range(2, 202))
    result = await ledger.verify(page=37)
    assert result.intact, result.reason
    assert result.entries == 201
    tail = await ledger.tail(5)
    assert [r.seq for r in tail] == [197, 198, 199, 200, 201]


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
    for i in range(10):  # one group each: every entry ends a MACed group
        await ledger.record({"who": f"spiffe://td/s/{i}", "what": "svid.mint"})
    assert (await ledger.verify()).intact
    _tamper(db, "DELETE FROM audit WHERE seq > 8")
    result = await ledger.verify()
    assert (result.intact, result.first_broken_seq, result.entries) == (False, 9, 8)
    assert "entries 9 to 11 were cut off" in result.reason


async def test_entries_cut_off_inside_a_group_are_found(ledger: AuditLedger, db: Path) -> None:
    await _fill(ledger, 10)  # one group, entries 2..11, MACed on 11
    _tamper(db, "DELETE FROM audit WHERE seq > 8")
    result = await ledger.verify()
    assert (result.intact, result.first_broken_seq, result.entries) == (False, 2, 8)
    assert "not covered by any MAC" in result.reason


async def test_group_mac_covers_every_entry_and_stripping_it_is_found(
    ledger: AuditLedger, db: Path
) -> None:
    await _fill(ledger, 50)
    with sqlite3.connect(db) as conn:
        macs = [m for (m,) in conn.execute("SELECT mac FROM audit ORDER BY seq")]
    assert macs[-1] != b""  # the last entry of the last group is always MACed
    assert sum(1 for m in macs if m) < len(macs)  # grouped: not every entry needs its own
    _tamper(db, "UPDATE audit SET mac = zeroblob(0) WHERE seq = 51")
    result = await ledger.verify()
    assert not result.intact
    assert "not covered by any MAC" in result.reason


async def test_recomputed_hash_without_the_key_is_found(ledger: AuditLedger, db: Path) -> None:
    """An attacker who rewrites an event and recomputes the chain hashes still cannot MAC."""
    for i in range(3):  # one group each, so entry 4 is MACed on its own
        await ledger.record({"who": f"spiffe://td/s/{i}", "what": "svid.mint"})
    from broker.audit import chain_hash

    with sqlite3.connect(db) as conn:
        prev = conn.execute("SELECT entry_hash FROM audit WHERE seq = 3").fetchone()[0]
    forged = canonical_json({"who": "spiffe://td/s/2", "what": "forged"})
    _tamper(
        db,
        "UPDATE audit SET event = ?, entry_hash = ? WHERE seq = 4",
        forged,
        chain_hash(prev, 4, forged),
    )
    result = await ledger.verify()
    assert (result.intact, result.first_broken_seq) == (False, 4)
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
    other_keys = SoftwareBackend()
    other = AuditLedger(storage, other_keys)
    other.ensure_key()
    other._ensure_checkpoint_key()
    result = await other.verify()
    assert not result.intact
    assert "signature" in result.reason or "invalid MAC" in result.reason
    assert result.first_broken_seq == 1


class _BrokenStorage:
    """A storage whose audit append fails, as a full disk or a lost database would."""

    def __init__(self, inner: Storage) -> None:
        self._inner = inner

    async def append_audit(
        self, events: Sequence[str], seal: Sealer, head: object = None, guard: object = None
    ) -> list[int]:
        raise StorageError("disk full")

    def __getattr__(self, name: str) -> object:
        return getattr(self._inner, name)


async def test_write_failure_fails_every_waiting_request(storage: Storage) -> None:
    led = AuditLedger(_BrokenStorage(storage), SoftwareBackend())  # type: ignore[arg-type]
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


# -- issue 20, finding 1: the ledger must not forget what was cut off or rewritten --------------


def _rows(db: Path) -> list[tuple[object, ...]]:
    with sqlite3.connect(db) as conn:
        return list(conn.execute("SELECT seq, event, prev_hash, entry_hash, mac FROM audit"))


def _head(db: Path) -> str | None:
    with sqlite3.connect(db) as conn:
        row = conn.execute("SELECT value FROM meta WHERE key = 'audit_head'").fetchone()
    return None if row is None else str(row[0])


@pytest.fixture
def alarms(ledger: AuditLedger) -> list[str]:
    raised: list[str] = []
    ledger.add_integrity_hook(raised.append)
    return raised


def _integrity_failures() -> float:
    from broker import metrics

    return float(metrics.AUDIT_INTEGRITY_FAILURES._value.get())


async def _assert_writes_refused(ledger: AuditLedger, db: Path, alarms: list[str]) -> None:
    """A later request must not paper over the damage: refused, nothing written, detected."""
    rows, head, before = _rows(db), _head(db), _integrity_failures()
    with pytest.raises(AuditIntegrityError, match="integrity check"):
        await ledger.record({"who": "unauthenticated", "what": "Attest"})
    assert _rows(db) == rows and _head(db) == head
    assert alarms and _integrity_failures() == before + 1
    assert not (await ledger.verify()).intact
    assert not (await ledger.verify()).intact  # and stays so: verify is not appended


async def test_cut_off_tail_is_not_forgotten_by_later_requests(
    ledger: AuditLedger, db: Path, alarms: list[str]
) -> None:
    await _fill(ledger, 9)
    await ledger.record({"who": "spiffe://td/s/last", "what": "secrets.get"})  # entry 11
    _tamper(db, "DELETE FROM audit WHERE seq = 11")
    first = await ledger.verify()
    assert not first.intact and "entries 11 to 11 were cut off" in first.reason
    await _assert_writes_refused(ledger, db, alarms)
    assert "cut off" in alarms[0]


async def test_rewritten_rehashed_entry_with_blanked_macs_is_refused(
    ledger: AuditLedger, db: Path, alarms: list[str]
) -> None:
    from broker.audit import chain_hash

    await _fill(ledger, 10)
    rows = _rows(db)
    forged_rows, prev = [], bytes(rows[3][2])  # type: ignore[arg-type]
    for seq, event, _, _, _ in rows[3:]:  # rewrite entry 4's who, re-hash 4.., blank the MACs
        text = str(event)
        if seq == 4:
            text = canonical_json({**json.loads(text), "who": "spiffe://td/s/innocent"})
        digest = chain_hash(prev, int(seq), text)  # type: ignore[call-overload]
        forged_rows.append((text, prev, digest, seq))
        prev = digest
    with sqlite3.connect(db) as conn:
        conn.execute("DROP TRIGGER audit_no_update")
        conn.executemany(
            "UPDATE audit SET event = ?, prev_hash = ?, entry_hash = ?, mac = zeroblob(0) "
            "WHERE seq = ?",
            forged_rows,
        )
    result = await ledger.verify()
    assert not result.intact
    await _assert_writes_refused(ledger, db, alarms)


async def test_truncation_with_the_head_deleted_is_found(
    ledger: AuditLedger, db: Path, alarms: list[str]
) -> None:
    for i in range(5):
        await ledger.record({"who": f"spiffe://td/s/{i}", "what": "svid.mint"})
    _tamper(db, "DELETE FROM audit WHERE seq > 4")
    _tamper(db, "DELETE FROM meta WHERE key = 'audit_head'")
    result = await ledger.verify()
    assert not result.intact and "head record is missing" in result.reason
    await _assert_writes_refused(ledger, db, alarms)


async def test_deleting_every_row_is_found(
    ledger: AuditLedger, db: Path, alarms: list[str]
) -> None:
    await _fill(ledger, 5)
    _tamper(db, "DELETE FROM audit")
    assert not (await ledger.verify()).intact
    _tamper(db, "DELETE FROM meta WHERE key = 'audit_head'")
    result = await ledger.verify()
    assert (result.intact, result.entries) == (False, 0)
    assert "empty" in result.reason
    await _assert_writes_refused(ledger, db, alarms)


async def test_wiped_ledger_stops_a_restart(
    storage: Storage, keys: SoftwareBackend, ledger: AuditLedger, db: Path
) -> None:
    await _fill(ledger, 3)
    _tamper(db, "DELETE FROM audit")
    _tamper(db, "DELETE FROM meta WHERE key = 'audit_head'")
    with pytest.raises(LedgerStartRefused, match=r"docs/ledger\.md"):
        await AuditLedger(storage, keys).open()
    assert _rows(db) == [] and _head(db) is None


async def test_head_replaced_by_an_older_groups_values_is_found(
    ledger: AuditLedger, db: Path, alarms: list[str]
) -> None:
    """The head MACs sequence and hash with a tag no entry carries: an attacker who cuts the
    last group cannot rebuild the previous head from the rows."""
    for i in range(4):
        await ledger.record({"who": f"spiffe://td/s/{i}", "what": "svid.mint"})
    seq, _, _, digest, mac = _rows(db)[-2]
    mac = bytes(mac)  # type: ignore[arg-type]
    first = int.from_bytes(mac[1:9], "big")
    _tamper(db, "DELETE FROM audit WHERE seq = 5")
    _tamper(
        db,
        "UPDATE meta SET value = ? WHERE key = 'audit_head'",
        f"2:1:{first}:{seq}:{bytes(digest).hex()}:{mac[9:].hex()}",  # type: ignore[arg-type]
    )
    result = await ledger.verify()
    assert not result.intact and "head record was altered" in result.reason
    await _assert_writes_refused(ledger, db, alarms)


async def test_a_later_group_mac_does_not_cover_earlier_unmaced_entries(
    ledger: AuditLedger, db: Path
) -> None:
    for i in range(4):
        await ledger.record({"who": f"spiffe://td/s/{i}", "what": "svid.mint"})
    _tamper(db, "UPDATE audit SET mac = zeroblob(0) WHERE seq = 3")
    result = await ledger.verify()
    assert (result.intact, result.first_broken_seq) == (False, 4)
    assert "entries from 3 on are not covered" in result.reason


async def test_one_backend_mac_per_committed_group(storage: Storage) -> None:
    class Counting(SoftwareBackend):
        macs = 0

        def mac(self, label: str, data: bytes) -> bytes:
            Counting.macs += 1
            return super().mac(label, data)

    led = AuditLedger(storage, Counting())
    await led.open()
    led.start()
    try:
        Counting.macs = 0
        for _ in range(3):
            await _fill(led, 40)
        groups = sum(1 for r in await storage.read_audit(after_seq=1) if r.mac)
        assert Counting.macs == groups  # entry MAC and head record share one backend call
    finally:
        await led.stop()


# -- issue 20, finding 11: a lost or changed MAC key stops the broker; epochs are explicit --------


async def test_missing_mac_key_stops_the_start(
    storage: Storage, keys: SoftwareBackend, ledger: AuditLedger, db: Path
) -> None:
    await _fill(ledger, 3)
    await ledger.stop()
    rows, head = _rows(db), _head(db)
    keys.destroy_key("broker-audit-mac")
    with pytest.raises(LedgerStartRefused) as refused:
        await AuditLedger(storage, keys).open()
    assert "'broker-audit-mac' is missing" in str(refused.value)
    assert "docs/ledger.md" in str(refused.value) and "new-epoch" in str(refused.value)
    assert not keys.has_key("broker-audit-mac")  # not silently replaced
    assert _rows(db) == rows and _head(db) == head


async def test_changed_mac_key_stops_the_start_and_never_verifies(
    storage: Storage, keys: SoftwareBackend, ledger: AuditLedger, db: Path
) -> None:
    await _fill(ledger, 3)
    await ledger.stop()
    rows = _rows(db)
    keys.destroy_key("broker-audit-mac")
    keys.create_key("broker-audit-mac", KeyKind.HMAC_SHA256)  # a silent swap
    with pytest.raises(LedgerStartRefused, match="was changed"):
        await AuditLedger(storage, keys).open()
    result = await AuditLedger(storage, keys).verify()
    assert not result.intact and "invalid MAC" in result.reason
    assert _rows(db) == rows


async def test_new_epoch_is_recorded_signed_and_reported(
    storage: Storage, keys: SoftwareBackend, ledger: AuditLedger, db: Path
) -> None:
    await _fill(ledger, 3)
    await ledger.stop()
    keys.destroy_key("broker-audit-mac")
    led = AuditLedger(storage, keys)
    await led.open(new_epoch_reason="token lost in DC fire, INC-7", actor="alice")
    assert keys.has_key("broker-audit-mac.2") and not keys.has_key("broker-audit-mac")
    (record,) = await led.tail(1)
    event = json.loads(record.event)
    epoch = event["details"]["epoch"]
    assert (record.seq, event["what"], epoch, event["who"]) == (5, "ledger.epoch", 2, "alice")
    assert event["reason"] == "token lost in DC fire, INC-7" and event["signature"]
    led.start()
    try:
        await led.record({"who": "spiffe://td/s/after", "what": "svid.mint"})
    finally:
        await led.stop()
    result = await led.verify()
    assert result.intact, result.reason
    assert any("epoch 2 begins at entry 5" in n for n in result.notes)
    assert any("entries 1 to 4 (epoch 1) are checked by hash chain only" in n for n in result.notes)
    # a restart continues in epoch 2 without complaint
    again = AuditLedger(storage, keys)
    await again.open()
    assert again.epoch == 2


async def test_forged_epoch_record_is_found(
    storage: Storage, keys: SoftwareBackend, ledger: AuditLedger, db: Path
) -> None:
    await _fill(ledger, 2)
    await ledger.stop()
    keys.destroy_key("broker-audit-mac")
    led = AuditLedger(storage, keys)
    await led.open(new_epoch_reason="lost", actor="alice")
    (record,) = await led.tail(1)
    from broker.audit import chain_hash

    forged = canonical_json({**json.loads(record.event), "reason": "routine"})
    _tamper(
        db,
        "UPDATE audit SET event = ?, entry_hash = ? WHERE seq = ?",
        forged,
        chain_hash(record.prev_hash, record.seq, forged),
        record.seq,
    )
    result = await led.verify()
    assert not result.intact and result.first_broken_seq == record.seq


async def test_softhsm_key_removed_from_the_token_stops_the_start(
    pkcs11_backend: KeyBackend, tmp_path: Path
) -> None:
    """The attack as reported: remove the HMAC key object from the token and restart."""
    store = await open_storage(f"sqlite:///{tmp_path / 'hsm.db'}")
    await store.migrate()
    try:
        led = AuditLedger(store, pkcs11_backend)
        await led.open()
        led.start()
        await _fill(led, 5)
        await led.stop()
        pkcs11_backend.destroy_key("broker-audit-mac")
        with pytest.raises(LedgerStartRefused, match="'broker-audit-mac' is missing"):
            await AuditLedger(store, pkcs11_backend).open()
        assert not pkcs11_backend.has_key("broker-audit-mac")
        assert len(await store.read_audit()) == 6
    finally:
        await store.close()


# -- signed checkpoints: a witness of the past that survives the database ------------------------


def _snapshot(db: Path, to: Path) -> None:
    with sqlite3.connect(db) as src, sqlite3.connect(to) as dst:
        src.backup(dst)


async def test_checkpoint_detects_a_rollback_of_the_whole_database(
    tmp_path: Path, keys: SoftwareBackend
) -> None:
    db = tmp_path / "live.db"
    store = await open_storage(f"sqlite:///{db}")
    await store.migrate()
    led = AuditLedger(store, keys)
    await led.open()
    led.start()
    await _fill(led, 5)
    _snapshot(db, tmp_path / "old.db")  # an attacker keeps an older, consistent copy
    await _fill(led, 5)
    exported = (await led.make_checkpoint()).to_json()
    await led.stop()
    await store.close()
    for suffix in ("", "-wal", "-shm"):
        Path(f"{db}{suffix}").unlink(missing_ok=True)
    _snapshot(tmp_path / "old.db", db)  # ... and puts it back: the last entries vanish

    store = await open_storage(f"sqlite:///{db}")
    try:
        rolled_back = AuditLedger(store, keys)
        await rolled_back.open()  # consistent in itself: only a checkpoint can tell
        assert (await rolled_back.verify()).intact
        checkpoint = parse_checkpoint(exported)  # offline: format and signature
        result = await rolled_back.verify(checkpoint=checkpoint)
        assert (result.intact, result.first_broken_seq) == (False, checkpoint.seq)
        assert "no longer has it" in result.reason
    finally:
        await store.close()


async def test_checkpoint_verifies_and_detects_a_rewritten_entry(
    ledger: AuditLedger, db: Path
) -> None:
    await _fill(ledger, 4)
    checkpoint = parse_checkpoint((await ledger.make_checkpoint()).to_json())
    await ledger.drain()
    result = await ledger.verify(checkpoint=checkpoint)
    assert result.intact, result.reason
    assert any(f"(entry {checkpoint.seq}) is in the ledger" in n for n in result.notes)
    tail = json.loads((await ledger.tail(1))[0].event)
    assert tail["what"] == "ledger.checkpoint"  # making one is itself recorded
    _tamper(db, "UPDATE audit SET entry_hash = zeroblob(32) WHERE seq = ?", checkpoint.seq)
    assert "differs from the one the checkpoint witnessed" in (
        await ledger.check_checkpoint(checkpoint)
    )


async def test_forged_checkpoints_are_refused(ledger: AuditLedger) -> None:
    await _fill(ledger, 2)
    doc = json.loads((await ledger.make_checkpoint()).to_json())
    with pytest.raises(InvalidArgument, match="signature does not verify"):
        parse_checkpoint(json.dumps({**doc, "seq": doc["seq"] + 1}))
    with pytest.raises(InvalidArgument, match="not a broker-audit-checkpoint"):
        parse_checkpoint("{}")
    # a checkpoint that verifies under somebody else's key is not this broker's
    other = AuditLedger(ledger._storage, SoftwareBackend())
    other._ensure_checkpoint_key()
    foreign = Checkpoint(
        epoch=1,
        seq=doc["seq"],
        hash=bytes.fromhex(doc["hash"]),
        time=doc["time"],
        key="x",
        public_key_pem=other._keys.public_key("broker-audit-checkpoint")
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
        .decode(),
        signature=b"",
    )
    signed = Checkpoint(
        **{
            **foreign.__dict__,
            "signature": base64.b64decode(other._sign(foreign.payload())),
        }
    )
    parse_checkpoint(signed.to_json())  # well-formed and self-consistent ...
    assert "not signed by this broker" in await ledger.check_checkpoint(signed)


async def test_checkpoint_job_runs_on_the_leader_at_its_interval(
    storage: Storage, keys: SoftwareBackend
) -> None:
    clock = FakeClock()
    led = AuditLedger(storage, keys, clock=clock)
    await led.open()
    led.start()
    try:
        interval = dt.timedelta(minutes=30)
        job = CheckpointJob(led, storage, clock, interval, "a")
        other = CheckpointJob(led, storage, clock, interval, "b")
        first = await job.tick()
        assert first is not None
        assert await other.tick() is None  # not the leader
        assert await job.tick() is None  # not due yet
        clock.advance(minutes=31)
        second = await job.tick()
        assert second is not None and second.seq > first.seq
        latest = await led.latest_checkpoint()
        assert latest is not None and latest.seq == second.seq
    finally:
        await led.stop()


async def test_a_ledger_written_in_the_previous_format_keeps_verifying_and_continues(
    storage: Storage, keys: SoftwareBackend, db: Path
) -> None:
    """Upgrade: entries MACed the old way (HMAC of the last entry's hash per group, head
    "seq:mac") verify as before; new groups continue the chain in the new format."""
    from broker.audit import chain_hash

    keys.create_key("broker-audit-mac", KeyKind.HMAC_SHA256)

    def old_sealer(count: int) -> Sealer:
        done = 0

        def seal(seq: int, prev: bytes, event: str) -> tuple[bytes, bytes]:
            nonlocal done
            done += 1
            digest = chain_hash(prev, seq, event)
            return digest, keys.mac("broker-audit-mac", digest) if done == count else b""

        return seal

    def old_head(seq: int) -> tuple[str, str]:
        return (
            "audit_head",
            f"{seq}:{keys.mac('broker-audit-mac', f'audit-head:{seq}'.encode()).hex()}",
        )

    for group in (["a", "b", "c"], ["d"]):
        events = [canonical_json({"who": "old", "what": e}) for e in group]
        await storage.append_audit(events, old_sealer(len(events)), old_head)
    led = AuditLedger(storage, keys)
    await led.open()
    led.start()
    try:
        await _fill(led, 3)
    finally:
        await led.stop()
    result = await led.verify()
    assert (result.intact, result.entries) == (True, 7), result.reason
    # the old format is no excuse once the new one began: an old-style MAC there is refused
    last = (await storage.read_audit())[-1]
    old_style = keys.mac("broker-audit-mac", last.entry_hash)
    _tamper(db, "UPDATE audit SET mac = ? WHERE seq = ?", old_style, last.seq)
    result = await led.verify()
    assert (result.intact, result.first_broken_seq) == (False, last.seq)


async def test_a_lost_checkpoint_key_leaves_epoch_records_trusted_by_their_mac(
    storage: Storage, keys: SoftwareBackend, ledger: AuditLedger
) -> None:
    await _fill(ledger, 2)
    keys.destroy_key("broker-audit-checkpoint")
    result = await ledger.verify()  # no checkpoint key at all: reported, not a crash
    assert result.intact, result.reason
    assert any("not signed by the current checkpoint key" in n for n in result.notes)
    await ledger.stop()
    await AuditLedger(storage, keys).open()  # made anew at start, with a warning
    assert keys.has_key("broker-audit-checkpoint")
    assert (await ledger.verify()).intact


async def test_epoch_record_forged_for_a_key_that_does_not_exist_is_refused(
    storage: Storage, keys: SoftwareBackend, ledger: AuditLedger, db: Path
) -> None:
    """A fake 'epoch 2' pointing at a missing key would switch verify to hash-only checking:
    without the checkpoint key's signature it is refused."""
    await _fill(ledger, 2)
    await ledger.stop()
    (last,) = await storage.audit_tail(1)
    from broker.audit import chain_hash

    forged = canonical_json(
        {"what": "ledger.epoch", "who": "x", "details": {"epoch": 2}, "signature": "AAAA"}
    )
    _tamper(
        db,
        "INSERT INTO audit (seq, event, prev_hash, entry_hash, mac) VALUES (?, ?, ?, ?, x'')",
        last.seq + 1,
        forged,
        last.entry_hash,
        chain_hash(last.entry_hash, last.seq + 1, forged),
    )
    result = await AuditLedger(storage, keys).verify()
    assert (result.intact, result.first_broken_seq) == (False, last.seq + 1)
    assert "invalid signature" in result.reason


async def test_a_running_writer_follows_a_new_epoch_started_by_another_process(
    storage: Storage, keys: SoftwareBackend, ledger: AuditLedger
) -> None:
    await _fill(ledger, 2)
    other = AuditLedger(storage, keys)
    await other.open(new_epoch_reason="key rotation, CHG-9", actor="bob")
    await ledger.record({"who": "spiffe://td/s/after", "what": "svid.mint"})
    assert ledger.epoch == 2
    result = await ledger.verify()
    assert result.intact, result.reason
    assert any("epoch 2 begins" in n for n in result.notes)


async def test_new_epoch_flag_on_a_first_start_just_starts_epoch_one(
    storage: Storage, keys: SoftwareBackend
) -> None:
    led = AuditLedger(storage, keys)
    await led.open(new_epoch_reason="fresh install", actor="alice")
    assert led.epoch == 1 and not keys.has_key("broker-audit-mac.2")
    result = await led.verify()
    assert (result.intact, result.entries, result.notes) == (True, 1, ())


async def test_a_failed_verification_reaches_the_integrity_hooks(
    ledger: AuditLedger, db: Path
) -> None:
    # What pages `audit.verification_failed` (broker.notifications) when `audit verify` fails.
    seen: list[str] = []
    ledger.add_integrity_hook(seen.append)
    await _fill(ledger, 4)
    assert (await ledger.verify()).intact
    assert seen == []
    _tamper(db, "UPDATE audit SET event = ? WHERE seq = 3", '{"what":"forged"}')
    result = await ledger.verify()
    assert not result.intact
    assert seen == [f"verification failed at entry 3: {result.reason}"]
