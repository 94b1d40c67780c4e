"""The audit ledger: append-only, hash-chained, each entry MACed with a key in the key backend.

Every request is recorded before it is answered (`AuditLedger.record` returns only once the
event is committed). Events from concurrent requests are written in groups, one transaction per
group, so the ledger's cost per request stays small under load; the chain is still strictly
sequential. If a write fails, every request in the group fails with `AuditWriteFailed`.

Chain: entry_hash = SHA-256(prev_hash || seq as 8 bytes big-endian || event JSON); the first
prev_hash is 32 zero bytes. The last entry of every committed group carries
mac = HMAC-SHA256(audit key, entry_hash); since each hash covers everything before it, that one
MAC (made inside the key backend) authenticates the whole group, and entries without a MAC must
be followed by one. A MACed head record (the newest seq, in the same transaction) catches
entries cut off the end.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import json
import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from broker import metrics
from broker.errors import AuditWriteFailed
from broker.storage.interface import AuditRecord, Sealer, Storage
from ca.keys import KeyBackend, KeyKind

__all__ = ["AuditLedger", "Verification", "canonical_json", "chain_hash"]

log = logging.getLogger(__name__)

GENESIS = bytes(32)
MAC_KEY_LABEL = "broker-audit-mac"
HEAD_KEY = "audit_head"
_MAX_GROUP = 256


def canonical_json(event: Mapping[str, Any]) -> str:
    return json.dumps(event, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def chain_hash(prev_hash: bytes, seq: int, event_json: str) -> bytes:
    return hashlib.sha256(prev_hash + seq.to_bytes(8, "big") + event_json.encode()).digest()


@dataclass(frozen=True)
class Verification:
    intact: bool
    entries: int
    first_broken_seq: int = 0
    reason: str = ""


@dataclass
class _Pending:
    event: str
    done: asyncio.Future[int]


class AuditLedger:
    """Owns the MAC key label and the group writer. Call `start()` inside the event loop."""

    def __init__(self, storage: Storage, keys: KeyBackend, mac_key_label: str = MAC_KEY_LABEL):
        self._storage = storage
        self._keys = keys
        self._label = mac_key_label
        self._queue: asyncio.Queue[_Pending] | None = None
        self._writer: asyncio.Task[None] | None = None

    def ensure_key(self) -> None:
        """Create the MAC key on first start. Idempotent."""
        if not self._keys.has_key(self._label):
            self._keys.create_key(self._label, KeyKind.HMAC_SHA256)

    def start(self) -> None:
        self._queue = asyncio.Queue()
        self._writer = asyncio.get_running_loop().create_task(self._run(), name="audit-writer")

    async def stop(self) -> None:
        """Finish writing what is queued, then stop the writer."""
        await self.drain()
        if self._writer is not None:
            self._writer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._writer
            self._writer = None

    async def record(self, event: Mapping[str, Any]) -> int:
        """Append one event and return its sequence number once committed.

        Raises AuditWriteFailed when the ledger cannot be written; the caller must then fail
        the request (fail closed).
        """
        if self._queue is None:
            raise AuditWriteFailed("audit ledger is not running; request refused")
        started = time.perf_counter()
        pending = _Pending(canonical_json(event), asyncio.get_running_loop().create_future())
        self._queue.put_nowait(pending)
        try:
            seq = await pending.done
        except BaseException:
            metrics.observe_audit_write(time.perf_counter() - started, ok=False)
            raise
        metrics.observe_audit_write(time.perf_counter() - started, ok=True)
        return seq

    def _sealer(self, count: int) -> Sealer:
        """A sealer for a group of `count` events: hashes every one, MACs only the last."""
        sealed = 0

        def seal(seq: int, prev_hash: bytes, event_json: str) -> tuple[bytes, bytes]:
            nonlocal sealed
            sealed += 1
            digest = chain_hash(prev_hash, seq, event_json)
            mac = self._keys.mac(self._label, digest) if sealed == count else b""
            return digest, mac

        return seal

    async def _run(self) -> None:
        assert self._queue is not None
        while True:
            group = [await self._queue.get()]
            while len(group) < _MAX_GROUP and not self._queue.empty():
                group.append(self._queue.get_nowait())
            try:
                events = [p.event for p in group]
                seqs = await self._storage.append_audit(
                    events, self._sealer(len(events)), self._head_record
                )
            except Exception as exc:  # every waiting request must learn of the failure
                log.error("audit write failed: %s", type(exc).__name__)
                failure = AuditWriteFailed("audit ledger write failed; request refused")
                for p in group:
                    if not p.done.done():
                        p.done.set_exception(failure)
                    self._queue.task_done()
                continue
            for p, seq in zip(group, seqs, strict=True):
                if not p.done.done():
                    p.done.set_result(seq)
                self._queue.task_done()

    async def drain(self) -> None:
        """Wait until everything recorded so far is written."""
        if self._queue is not None and self._writer is not None and not self._writer.done():
            await self._queue.join()

    def _head_record(self, seq: int) -> tuple[str, str]:
        """The MACed head record, written in the same transaction as the events: cutting
        entries off the end of the chain (which leaves the rest intact) is found by `verify`.
        With several processes the head may briefly lag the table; it is never ahead of it."""
        mac = self._keys.mac(self._label, b"audit-head:" + str(seq).encode()).hex()
        return HEAD_KEY, f"{seq}:{mac}"

    async def _head(self) -> int:
        value = await self._storage.get_meta(HEAD_KEY)
        if not value:
            return 0
        seq_text, _, mac = value.partition(":")
        expected = self._keys.mac(self._label, b"audit-head:" + seq_text.encode()).hex()
        if not seq_text.isdigit() or not hmac.compare_digest(mac, expected):
            return -1
        return int(seq_text)

    async def tail(self, limit: int) -> list[AuditRecord]:
        return await self._storage.audit_tail(limit)

    async def verify(self, page: int = 1000) -> Verification:
        """Walk the whole chain: contiguous seqs, linked hashes, recomputed hashes and MACs."""
        head = await self._head()
        prev_hash, expected_seq, count = GENESIS, 1, 0
        after = unauthenticated = 0
        while True:
            records = await self._storage.read_audit(after_seq=after, limit=page)
            if not records:
                break
            for rec in records:
                problem = self._check(rec, expected_seq, prev_hash)
                if problem:
                    return Verification(False, count, expected_seq, problem)
                # the first entry not yet followed by a MAC (0 once one covers it)
                unauthenticated = 0 if rec.mac else (unauthenticated or rec.seq)
                prev_hash, expected_seq, count = rec.entry_hash, expected_seq + 1, count + 1
            after = records[-1].seq
        if head < 0:
            return Verification(False, count, count + 1, "the recorded ledger head was altered")
        if head > count:
            return Verification(
                False,
                count,
                count + 1,
                f"entries {count + 1} to {head} were cut off the end of the ledger",
            )
        if unauthenticated:
            return Verification(
                False,
                count,
                unauthenticated,
                f"entries from {unauthenticated} on are not covered by any MAC",
            )
        return Verification(True, count)

    def _check(self, rec: AuditRecord, expected_seq: int, prev_hash: bytes) -> str:
        if rec.seq != expected_seq:
            return f"entry {expected_seq} is missing (next entry is {rec.seq})"
        if rec.prev_hash != prev_hash:
            return f"entry {rec.seq} does not link to entry {rec.seq - 1}"
        if not hmac.compare_digest(chain_hash(prev_hash, rec.seq, rec.event), rec.entry_hash):
            return f"entry {rec.seq} was altered: its hash does not match its content"
        if rec.mac and not hmac.compare_digest(
            self._keys.mac(self._label, rec.entry_hash), rec.mac
        ):
            return f"entry {rec.seq} has an invalid MAC"
        return ""
