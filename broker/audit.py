"""The audit ledger: append-only, hash-chained, every entry covered by a MAC from the key backend.

Every request is recorded before it is answered (`AuditLedger.record` returns only once the
event is committed). Events from concurrent requests are written in groups, one transaction per
group, so the ledger's cost per request stays small under load; the chain is still strictly
sequential. If a write fails, every request in the group fails with `AuditWriteFailed`.

Format (docs/ledger.md has the whole story, and what an attacker can and cannot do):

- chain: entry_hash = SHA-256(prev_hash || seq as 8 bytes big-endian || event JSON); the first
  prev_hash is 32 zero bytes;
- group MAC: ONE call to the key backend per committed group of entries first..last,
  G = HMAC(audit key, "broker-audit-group/2" || first || last || hash(last)). The last entry of
  the group stores mac = 0x02 || first (8 bytes) || HMAC-SHA256(G, "entry"); entries before it in
  the group have an empty mac. `verify` checks entry by entry that every entry lies inside a
  MACed group whose declared first entry is exactly where the previous group ended;
- head record (meta row `audit_head`, same transaction): "2:epoch:first:last:hash:tag" with
  tag = HMAC-SHA256(G, "head"): it MACs the last sequence AND hash, with the same backend call;
- the writer checks the newest entry against the head inside the append transaction and refuses
  to write (fail closed: `AuditIntegrityError`, a metric, the notification hook) when they
  disagree, so a cut-off or rewritten tail is never papered over by later requests; a missing
  head, or an empty ledger once initialised, is a broken ledger;
- epochs: a ledger runs under one MAC key per epoch (label `broker-audit-mac`, then
  `broker-audit-mac.2`, ...). Each epoch starts with a `ledger.epoch` entry signed with the
  checkpoint key. A missing or changed MAC key stops the broker at start (`LedgerStartRefused`)
  until an operator starts a new epoch on purpose (`broker audit new-epoch`);
- checkpoints: (epoch, seq, hash, time) signed with an EC key in the key backend
  (`broker-audit-checkpoint`), verifiable offline with its public key; an exported checkpoint
  witnesses the ledger's past even if the whole database is replaced.

Entries written before this format (a 32-byte mac = HMAC(key, entry_hash), head "seq:mac") are
still verified as they were, up to the first entry in the new format.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import datetime as dt
import hashlib
import hmac
import json
import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from broker import metrics
from broker.errors import (
    AuditIntegrityError,
    AuditWriteFailed,
    InvalidArgument,
    LedgerStartRefused,
    StorageCommitUnknown,
    StorageUnavailable,
)
from broker.storage.interface import AuditRecord, Sealer, Storage, TipGuard
from ca.clock import Clock, SystemClock
from ca.errors import CAError
from ca.keys import KeyBackend, KeyKind, mac_signer

__all__ = [
    "CHECKPOINT_KEY_LABEL",
    "AuditEvent",
    "AuditLedger",
    "Checkpoint",
    "CheckpointJob",
    "Verification",
    "canonical_json",
    "chain_hash",
    "mac_key_label",
    "parse_checkpoint",
]

log = logging.getLogger(__name__)

GENESIS = bytes(32)
MAC_KEY_LABEL = "broker-audit-mac"
CHECKPOINT_KEY_LABEL = "broker-audit-checkpoint"
HEAD_KEY = "audit_head"
CHECKPOINT_META = "audit_checkpoint"
EPOCH_EVENT = "ledger.epoch"
CHECKPOINT_EVENT = "ledger.checkpoint"
CHECKPOINT_FORMAT = "broker-audit-checkpoint/1"
RUNBOOK = "docs/ledger.md#key-loss-runbook"
_MAX_GROUP = 256
#: Seconds a group append is retried while the storage says nothing was committed.
DEFAULT_APPEND_RETRY_BUDGET = 12.0
_APPEND_RETRY_PAUSE = 0.25
_GROUP_DOMAIN = b"broker-audit-group/2\x00"
_MAC_V2 = 2
_V2_MAC_LEN = 1 + 8 + 32
_EPOCH_MARK = f'"what":"{EPOCH_EVENT}"'
_ECDSA = ec.ECDSA(hashes.SHA256())

IntegrityHook = Callable[[str], None]
# Called with (seq, event) after an entry is committed, on the recording task; must not block.
CommitHook = Callable[[int, Mapping[str, Any]], None]


@dataclass(frozen=True, slots=True)
class AuditEvent:
    """One entry of the ledger about a request or a background action, in the one shape every
    writer uses (the request pipeline, the lease reaper, the anomaly detector, the ledger's own
    epoch and checkpoint entries). `to_dict` is what the ledger stores: the fields from `when`
    to `outcome` always, the optional ones below only when set.

    `decision` is "allow", "deny" or "flag" (an anomaly); `outcome` is the gRPC status name of
    a request, or what a background action came to ("revoked", "ANOMALY", ...)."""

    when: dt.datetime
    who: str
    what: str
    resource: str
    decision: str
    outcome: str
    method: str = ""
    where: str = ""
    why: str = ""
    correlation_id: str = ""
    reason: str = ""
    rule: str = ""
    latency_ms: float | None = None
    error: str | None = None
    serial: str | None = None
    # Refusal sampling: one event per caller and interval stands for all its refusals.
    sampled: Mapping[str, Any] | None = None
    # A request whose client went away: did its change take effect (applied, none, unknown)?
    effect: str | None = None
    details: Mapping[str, Any] | None = None
    flags: Mapping[str, str] | None = None  # grant / approval / break-glass used
    minted_by: str | None = None

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "when": self.when.isoformat(timespec="microseconds"),
            "who": self.who,
            "what": self.what,
            "method": self.method,
            "resource": self.resource,
            "where": self.where,
            "why": self.why,
            "correlation_id": self.correlation_id,
            "decision": self.decision,
            "reason": self.reason,
            "rule": self.rule,
            "outcome": self.outcome,
        }
        for name in _OPTIONAL_FIELDS:
            value = getattr(self, name)
            if value is not None:
                out[name] = dict(value) if isinstance(value, Mapping) else value
        return out


_OPTIONAL_FIELDS = (
    "latency_ms",
    "error",
    "serial",
    "sampled",
    "effect",
    "details",
    "flags",
    "minted_by",
)


def canonical_json(event: Mapping[str, Any]) -> str:
    return json.dumps(event, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def chain_hash(prev_hash: bytes, seq: int, event_json: str) -> bytes:
    return hashlib.sha256(prev_hash + seq.to_bytes(8, "big") + event_json.encode()).digest()


def mac_key_label(epoch: int) -> str:
    """The MAC key of a ledger epoch (epoch 1 keeps the original label)."""
    return MAC_KEY_LABEL if epoch == 1 else f"{MAC_KEY_LABEL}.{epoch}"


def _group_message(first: int, last: int, last_hash: bytes) -> bytes:
    return _GROUP_DOMAIN + first.to_bytes(8, "big") + last.to_bytes(8, "big") + last_hash


def _tag(group_key: bytes, what: bytes) -> bytes:
    return hmac.new(group_key, what, hashlib.sha256).digest()


def _entry_mac(first: int, group_key: bytes) -> bytes:
    return bytes([_MAC_V2]) + first.to_bytes(8, "big") + _tag(group_key, b"entry")


def _head_value(epoch: int, first: int, last: int, last_hash: bytes, group_key: bytes) -> str:
    tag = _tag(group_key, b"head").hex()
    return f"{_MAC_V2}:{epoch}:{first}:{last}:{last_hash.hex()}:{tag}"


def _ledger_event(
    what: str, who: str, when: dt.datetime, reason: str, details: dict[str, Any]
) -> dict[str, Any]:
    """An event the ledger writes about itself, shaped like a request's event."""
    return AuditEvent(
        when=when,
        who=who,
        what=what,
        resource="audit",
        why=reason,
        correlation_id=f"{what}-{details.get('epoch', 0)}-{details.get('seq', 0)}",
        decision="allow",
        reason=reason,
        rule="ledger",
        outcome="OK",
        details=details,
    ).to_dict()


@dataclass(frozen=True)
class _Head:
    """A parsed head record. `legacy` heads carry only (seq, mac)."""

    epoch: int
    first: int
    last: int
    last_hash: bytes
    tag: bytes
    legacy: bool = False


def _parse_head(value: str) -> _Head | None:
    parts = value.split(":")
    try:
        if len(parts) == 6 and parts[0] == str(_MAC_V2):
            return _Head(
                int(parts[1]), int(parts[2]), int(parts[3]), bytes.fromhex(parts[4]),
                bytes.fromhex(parts[5]),
            )  # fmt: skip
        if len(parts) == 2 and parts[0].isdigit():
            return _Head(1, 0, int(parts[0]), b"", bytes.fromhex(parts[1]), legacy=True)
    except ValueError:
        return None
    return None


@dataclass(frozen=True)
class Verification:
    intact: bool
    entries: int
    first_broken_seq: int = 0
    reason: str = ""
    # Epoch boundaries, entries checked by hash chain only (their epoch's key is gone), a
    # checkpoint found or not: things an operator should read even when intact.
    notes: tuple[str, ...] = ()


@dataclass(frozen=True)
class Checkpoint:
    """A signed statement "entry `seq` of epoch `epoch` has hash `hash`" made at `time`."""

    epoch: int
    seq: int
    hash: bytes
    time: str
    key: str
    public_key_pem: str
    signature: bytes

    def payload(self) -> bytes:
        return canonical_json(
            {
                "format": CHECKPOINT_FORMAT,
                "epoch": self.epoch,
                "seq": self.seq,
                "hash": self.hash.hex(),
                "time": self.time,
            }
        ).encode()

    def to_json(self) -> str:
        doc = json.loads(self.payload())
        doc.update(
            key=self.key,
            public_key=self.public_key_pem,
            signature=base64.b64encode(self.signature).decode(),
        )
        return json.dumps(doc, sort_keys=True, indent=2) + "\n"

    def verify_signature(self) -> None:
        """Offline check with the public key carried in the checkpoint. Raises InvalidArgument."""
        try:
            public = serialization.load_pem_public_key(self.public_key_pem.encode())
        except ValueError:
            raise InvalidArgument("checkpoint: public_key is not a PEM public key") from None
        if not isinstance(public, ec.EllipticCurvePublicKey):
            raise InvalidArgument("checkpoint: public_key is not an EC key")
        try:
            public.verify(self.signature, self.payload(), _ECDSA)
        except InvalidSignature:
            raise InvalidArgument("checkpoint: the signature does not verify") from None


def parse_checkpoint(text: str) -> Checkpoint:
    """Parse an exported checkpoint (JSON) and check its signature offline.

    Raises InvalidArgument naming what is wrong. Does not say whether the key is the broker's:
    compare `public_key_pem` with the key you trust (the broker does, in `verify`)."""
    try:
        doc = json.loads(text)
        if not isinstance(doc, dict) or doc.get("format") != CHECKPOINT_FORMAT:
            raise InvalidArgument(f"checkpoint: not a {CHECKPOINT_FORMAT} document")
        checkpoint = Checkpoint(
            epoch=int(doc["epoch"]),
            seq=int(doc["seq"]),
            hash=bytes.fromhex(str(doc["hash"])),
            time=str(doc["time"]),
            key=str(doc["key"]),
            public_key_pem=str(doc["public_key"]),
            signature=base64.b64decode(str(doc["signature"]), validate=True),
        )
    except (ValueError, KeyError, TypeError) as exc:
        if isinstance(exc, InvalidArgument):
            raise
        raise InvalidArgument(f"checkpoint: malformed ({type(exc).__name__}: {exc})") from None
    if checkpoint.seq < 1 or checkpoint.epoch < 1 or len(checkpoint.hash) != 32:
        raise InvalidArgument("checkpoint: seq/epoch must be positive and hash 32 bytes")
    checkpoint.verify_signature()
    return checkpoint


class _TipMismatch(Exception):
    """Raised by the append guard: the newest entry and the head disagree."""

    def __init__(self, problem: str) -> None:
        super().__init__(problem)
        self.problem = problem


@dataclass
class _Pending:
    event: str
    done: asyncio.Future[int]


@dataclass
class _GroupSeal:
    """What the sealer of one group leaves for its head record."""

    first: int = 0
    last: int = 0
    last_hash: bytes = b""
    key: bytes = b""


@dataclass
class _Tip:
    """The newest entry and head this process last wrote or verified (skips re-checking)."""

    seq: int
    entry_hash: bytes
    mac: bytes
    head: str


@dataclass
class _Walk:
    epoch: int = 1
    label: str = MAC_KEY_LABEL
    key_present: bool = True
    pending_from: int = 0  # first entry not yet inside a MACed group (0: none)
    v2_seen: bool = False
    last_group: tuple[int, int, bytes, bytes] | None = None  # first, last, hash, group key
    hash_only_from: int = 0
    notes: list[str] = field(default_factory=list)


class AuditLedger:
    """Owns the ledger's keys and the group writer. `await open()`, then `start()` inside the
    event loop."""

    def __init__(
        self,
        storage: Storage,
        keys: KeyBackend,
        mac_key_label: str = MAC_KEY_LABEL,
        *,
        clock: Clock | None = None,
        on_integrity_failure: IntegrityHook | None = None,
    ):
        self._storage = storage
        #: How long a group append is retried while the storage reports that nothing was
        #: committed (a database failover); the request waits meanwhile.
        self.append_retry_budget = DEFAULT_APPEND_RETRY_BUDGET
        self._keys = mac_signer(keys)
        self._base_label = mac_key_label
        self._epoch = 1
        self._clock = clock or SystemClock()
        self._queue: asyncio.Queue[_Pending] | None = None
        self._writer: asyncio.Task[None] | None = None
        self._tip: _Tip | None = None
        self._broken = ""  # why the writer last refused; "" once an append succeeds again
        self._opened = False
        self._hooks: list[IntegrityHook] = []
        self._commit_hooks: list[CommitHook] = []
        if on_integrity_failure is not None:
            self._hooks.append(on_integrity_failure)

    # -- keys and epochs ----------------------------------------------------------------

    @property
    def epoch(self) -> int:
        return self._epoch

    def _label(self, epoch: int) -> str:
        return self._base_label if epoch == 1 else f"{self._base_label}.{epoch}"

    @property
    def _mac_label(self) -> str:
        return self._label(self._epoch)

    def add_integrity_hook(self, hook: IntegrityHook) -> None:
        """Called (with the reason, on the event loop's thread) every time the writer refuses
        to append to a broken ledger or a checkpoint finds it broken. Must not block."""
        self._hooks.append(hook)

    def add_commit_hook(self, hook: CommitHook) -> None:
        """Called with (seq, event) after each recorded event is committed (notifications).
        Must not block; an exception in it is logged, never given to the recorder."""
        self._commit_hooks.append(hook)

    async def open(self, *, new_epoch_reason: str | None = None, actor: str = "") -> None:
        """Check the ledger and its keys before anything is served. Idempotent.

        First start (no entries, no head, no MAC key): creates the MAC and checkpoint keys and
        writes the signed `ledger.epoch` entry of epoch 1. Later starts: the current epoch's MAC
        key must be present and the newest entry must match the MACed head; otherwise raises
        `LedgerStartRefused` naming the key and the runbook. With `new_epoch_reason` the
        operator starts a new epoch deliberately: a new MAC key, and a signed `ledger.epoch`
        entry chained onto whatever the ledger holds now, recording the reason and the state it
        was found in.
        """
        tip = await self._storage.audit_tail(1)
        head_value = await self._storage.get_meta(HEAD_KEY)
        head = _parse_head(head_value) if head_value else None
        if head is not None:
            self._epoch = head.epoch
        fresh = not tip and head_value is None
        if fresh and not self._keys.has_key(self._label(1)):
            self._ensure_checkpoint_key(first_start=True)
            self._keys.create_key(self._label(1), KeyKind.HMAC_SHA256)
            reason = " ".join((new_epoch_reason or "first start").split()) or "first start"
            await self._write_epoch(1, None, reason, actor or "broker", "new ledger")
            self._opened = True
            return
        if new_epoch_reason is not None:
            state = self._diagnose(tip[0] if tip else None, head_value)
            await self._new_epoch(new_epoch_reason, actor, state or "intact", head)
            self._opened = True
            return
        label = self._mac_label
        if not self._keys.has_key(label):
            raise LedgerStartRefused(
                f"the audit MAC key '{label}' is missing from the key backend "
                f"({self._keys.description}); the ledger cannot be verified or extended. "
                f"Restore the key, or start a new ledger epoch on purpose with "
                f"`broker audit new-epoch --reason TEXT` (see {RUNBOOK})"
            )
        problem = self._diagnose(tip[0] if tip else None, head_value)
        if problem:
            raise LedgerStartRefused(
                f"the audit ledger failed its start-up check: {problem}. Either the database "
                f"was altered or the audit MAC key '{label}' was changed; run `broker audit "
                f"verify --offline`, then follow {RUNBOOK}"
            )
        self._ensure_checkpoint_key()
        self._opened = True

    def _ensure_checkpoint_key(self, *, first_start: bool = False) -> None:
        if not self._keys.has_key(CHECKPOINT_KEY_LABEL):
            self._keys.create_key(CHECKPOINT_KEY_LABEL, KeyKind.EC_P256)
            if not first_start:  # checkpoints exported before were signed by another key
                log.warning("audit checkpoint key %s was missing: created", CHECKPOINT_KEY_LABEL)

    async def _highest_epoch(self, head: _Head | None) -> int:
        highest = head.epoch if head is not None else 1
        after = 0
        while True:
            records = await self._storage.read_audit(after_seq=after, limit=5000)
            if not records:
                break
            for rec in records:
                if _EPOCH_MARK in rec.event:
                    with contextlib.suppress(ValueError, TypeError):
                        highest = max(highest, int(json.loads(rec.event).get("epoch", 0)))
            after = records[-1].seq
        while self._keys.has_key(self._label(highest + 1)):
            highest += 1  # a key left by an interrupted new-epoch: never reuse its label
        return highest

    async def _new_epoch(self, reason: str, actor: str, state: str, head: _Head | None) -> None:
        reason = " ".join(reason.split())
        if not reason:
            raise InvalidArgument("a new ledger epoch needs a reason")
        self._ensure_checkpoint_key()
        epoch = await self._highest_epoch(head) + 1
        self._keys.create_key(self._label(epoch), KeyKind.HMAC_SHA256)
        await self._write_epoch(epoch, self._epoch, reason, actor or "operator", state)
        log.warning("audit ledger epoch %d started: %s (ledger was: %s)", epoch, reason, state)

    async def _write_epoch(
        self, epoch: int, previous: int | None, reason: str, actor: str, state: str
    ) -> None:
        body = _ledger_event(
            EPOCH_EVENT,
            actor,
            self._clock.now(),
            reason,
            {
                "epoch": epoch,
                "key": self._label(epoch),
                "previous_epoch": previous,
                "found": state,
            },
        )
        body["signature"] = self._sign(canonical_json(body).encode())
        self._epoch = epoch
        await self._append([canonical_json(body)], guard=None)

    def _sign(self, data: bytes) -> str:
        signer = self._keys.signer(CHECKPOINT_KEY_LABEL)
        return base64.b64encode(signer.sign(data, _ECDSA)).decode()

    def _check_epoch_signature(self, event: Mapping[str, Any]) -> bool:
        body = {k: v for k, v in event.items() if k != "signature"}
        try:
            signature = base64.b64decode(str(event.get("signature", "")), validate=True)
            self._keys.public_key(CHECKPOINT_KEY_LABEL).verify(
                signature, canonical_json(body).encode(), _ECDSA
            )
        except (ValueError, InvalidSignature, CAError):  # CAError: the checkpoint key is gone
            return False
        return True

    # -- writing ------------------------------------------------------------------------

    def ensure_key(self) -> None:
        """Create the MAC key if absent (tests and tools that bypass `open`)."""
        if not self._keys.has_key(self._mac_label):
            self._keys.create_key(self._mac_label, KeyKind.HMAC_SHA256)

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

    async def record(self, event: AuditEvent | Mapping[str, Any]) -> int:
        """Append one event and return its sequence number once committed.

        Raises AuditWriteFailed when the ledger cannot be written (AuditIntegrityError when
        the ledger's tail no longer matches its head); the caller must then fail the request
        (fail closed).
        """
        if self._queue is None:
            raise AuditWriteFailed("audit ledger is not running; request refused")
        started = time.perf_counter()
        if isinstance(event, AuditEvent):
            event = event.to_dict()
        pending = _Pending(canonical_json(event), asyncio.get_running_loop().create_future())
        self._queue.put_nowait(pending)
        try:
            seq = await pending.done
        except BaseException:
            metrics.observe_audit_write(time.perf_counter() - started, ok=False)
            raise
        metrics.observe_audit_write(time.perf_counter() - started, ok=True)
        for hook in self._commit_hooks:
            try:
                hook(seq, event)
            except Exception:
                log.exception("audit commit hook failed")
        return seq

    async def _append(self, events: list[str], *, guard: TipGuard | None) -> list[int]:
        sealed = _GroupSeal()
        seqs = await self._storage.append_audit(
            events, self._sealer(len(events), sealed), self._head_recorder(sealed), guard
        )
        self._broken = ""
        self._tip = _Tip(
            sealed.last,
            sealed.last_hash,
            _entry_mac(sealed.first, sealed.key),
            _head_value(self._epoch, sealed.first, sealed.last, sealed.last_hash, sealed.key),
        )
        return seqs

    async def _append_retrying(self, events: list[str]) -> list[int]:
        """`_append`, run again while the storage says nothing was committed (a database
        failover: StorageUnavailable), for at most `append_retry_budget` seconds. Safe: the
        failed attempt left no entry and `_append` changes this object only after a commit.
        A lost COMMIT (StorageCommitUnknown) is never retried: the entries may be there."""
        deadline = time.monotonic() + self.append_retry_budget
        while True:
            try:
                return await self._append(events, guard=self._guard())
            except StorageUnavailable as exc:
                if time.monotonic() + _APPEND_RETRY_PAUSE >= deadline:
                    raise
                log.warning("audit append not committed (%s); retrying", type(exc).__name__)
                await asyncio.sleep(_APPEND_RETRY_PAUSE)

    def _sealer(self, count: int, sealed: _GroupSeal) -> Sealer:
        """Hashes every event of the group; one backend MAC for the whole group, on the last."""
        done = 0

        def seal(seq: int, prev_hash: bytes, event_json: str) -> tuple[bytes, bytes]:
            nonlocal done
            done += 1
            if done == 1:
                sealed.first = seq
            digest = chain_hash(prev_hash, seq, event_json)
            if done < count:
                return digest, b""
            sealed.last, sealed.last_hash = seq, digest
            sealed.key = self._keys.mac(self._mac_label, _group_message(sealed.first, seq, digest))
            return digest, _entry_mac(sealed.first, sealed.key)

        return seal

    def _head_recorder(self, sealed: _GroupSeal) -> Callable[[int], tuple[str, str]]:
        def head(seq: int) -> tuple[str, str]:
            assert seq == sealed.last
            return HEAD_KEY, _head_value(
                self._epoch, sealed.first, sealed.last, sealed.last_hash, sealed.key
            )

        return head

    def _guard(self) -> TipGuard:
        return TipGuard(HEAD_KEY, self._check_tip)

    def _check_tip(self, tip: AuditRecord | None, head_value: str | None) -> None:
        known = self._tip
        if (
            known is not None
            and tip is not None
            and head_value == known.head
            and (tip.seq, tip.entry_hash, tip.mac) == (known.seq, known.entry_hash, known.mac)
        ):
            return  # exactly what this process wrote or verified last: nothing to recompute
        problem = self._diagnose(tip, head_value)
        if problem:
            # May run on the database thread: the alarm is raised by the writer, on the loop.
            raise _TipMismatch(problem)
        assert tip is not None and head_value is not None
        head = _parse_head(head_value)
        if head is not None:  # another process may have started a new epoch meanwhile
            self._epoch = head.epoch
        self._tip = _Tip(tip.seq, tip.entry_hash, tip.mac, head_value)

    def ensure_writable(self) -> None:
        """Raise AuditIntegrityError while the writer knows the ledger is broken, so that the
        request pipeline refuses a request BEFORE it acts (its event could not be recorded).
        Cheap (no I/O): the state is learnt from the last append, and cleared by the next one
        that passes the check (after an operator restored the ledger)."""
        if self._broken:
            raise AuditIntegrityError(
                "audit ledger failed its integrity check; request refused "
                f"(operators: broker audit verify, {RUNBOOK})"
            )

    def _integrity_failure(self, problem: str) -> None:
        self._broken = problem
        log.critical("audit ledger integrity failure, writes refused: %s", problem)
        metrics.record_audit_integrity_failure()
        for hook in self._hooks:
            try:
                hook(problem)
            except Exception:  # a notification must never change the refusal
                log.exception("audit integrity notification hook failed")

    def _diagnose(self, tip: AuditRecord | None, head_value: str | None) -> str:
        """Why the newest entry and the head record disagree ("" when they agree)."""
        if tip is None:
            if head_value is None:
                return "the ledger is empty although it was initialised (every entry deleted)"
            return "the head record names entries but the ledger is empty (entries deleted)"
        if head_value is None:
            return f"the head record is missing (newest entry is {tip.seq})"
        head = _parse_head(head_value)
        if head is None:
            return "the head record is malformed"
        label = self._label(head.epoch)
        if not self._keys.has_key(label):
            return f"the head names epoch {head.epoch} whose MAC key '{label}' is missing"
        if head.legacy:
            expected = self._keys.mac(label, b"audit-head:" + str(head.last).encode())
            if not hmac.compare_digest(head.tag, expected):
                return "the head record was altered (invalid MAC)"
            if head.last != tip.seq:
                return (
                    f"the head says entry {head.last} is the newest, the ledger ends at {tip.seq}"
                )
            if len(tip.mac) != 32 or not hmac.compare_digest(
                tip.mac, self._keys.mac(label, tip.entry_hash)
            ):
                return f"entry {tip.seq} has an invalid MAC"
            return ""
        group_key = self._keys.mac(label, _group_message(head.first, head.last, head.last_hash))
        if not hmac.compare_digest(head.tag, _tag(group_key, b"head")):
            return "the head record was altered (invalid MAC)"
        if head.last != tip.seq or head.last_hash != tip.entry_hash:
            if head.last > tip.seq:
                return f"entries {tip.seq + 1} to {head.last} were cut off the end of the ledger"
            return (
                f"the newest entry ({tip.seq}) is not the one the head record names "
                f"({head.last}): the tail was rewritten"
            )
        if not hmac.compare_digest(tip.mac, _entry_mac(head.first, group_key)):
            return f"entry {tip.seq} has an invalid MAC"
        return ""

    async def _run(self) -> None:
        assert self._queue is not None
        while True:
            group = [await self._queue.get()]
            while len(group) < _MAX_GROUP and not self._queue.empty():
                group.append(self._queue.get_nowait())
            try:
                seqs = await self._append_retrying([p.event for p in group])
            except Exception as exc:  # every waiting request must learn of the failure
                failure: AuditWriteFailed
                if isinstance(exc, _TipMismatch):
                    self._integrity_failure(exc.problem)
                    failure = AuditIntegrityError(
                        "audit ledger failed its integrity check; request refused "
                        f"(operators: broker audit verify, {RUNBOOK})"
                    )
                else:
                    log.error("audit write failed: %s", type(exc).__name__)
                    message = "audit ledger write failed; request refused"
                    if isinstance(exc, StorageCommitUnknown):
                        message += " (the database was lost while committing it; retry)"
                    elif isinstance(exc, StorageUnavailable):  # a failover: say when to retry
                        message += (
                            " (the database has no writable primary right now; retry after "
                            f"{max(1, round(exc.retry_after))} s)"
                        )
                    failure = AuditWriteFailed(message)
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

    # -- checkpoints --------------------------------------------------------------------

    async def make_checkpoint(self) -> Checkpoint:
        """Sign (epoch, seq, hash, time) of the newest entry, after checking it against the
        head; store it as the latest checkpoint and record a `ledger.checkpoint` event.
        Raises AuditIntegrityError when the tail does not match the head."""
        tip = await self._storage.audit_tail(1)
        head_value = await self._storage.get_meta(HEAD_KEY)
        problem = self._diagnose(tip[0] if tip else None, head_value)
        if problem:
            self._integrity_failure(problem)
            raise AuditIntegrityError(
                f"audit ledger failed its integrity check; no checkpoint made ({RUNBOOK})"
            )
        rec = tip[0]
        head = _parse_head(head_value or "")
        epoch = head.epoch if head is not None else self._epoch
        public = self._keys.public_key(CHECKPOINT_KEY_LABEL)
        unsigned = Checkpoint(
            epoch=epoch,
            seq=rec.seq,
            hash=rec.entry_hash,
            time=self._clock.now().isoformat().replace("+00:00", "Z"),
            key=CHECKPOINT_KEY_LABEL,
            public_key_pem=public.public_bytes(
                serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
            ).decode(),
            signature=b"",
        )
        signature = base64.b64decode(self._sign(unsigned.payload()))
        checkpoint = Checkpoint(**{**unsigned.__dict__, "signature": signature})
        await self._storage.set_meta(CHECKPOINT_META, checkpoint.to_json())
        if self._queue is not None:
            await self.record(
                _ledger_event(
                    CHECKPOINT_EVENT,
                    "broker",
                    self._clock.now(),
                    "signed checkpoint",
                    {"epoch": epoch, "seq": rec.seq, "hash": rec.entry_hash.hex()},
                )
            )
        return checkpoint

    async def latest_checkpoint(self) -> Checkpoint | None:
        value = await self._storage.get_meta(CHECKPOINT_META)
        if not value:
            return None
        try:
            return parse_checkpoint(value)
        except InvalidArgument:
            return None

    async def check_checkpoint(self, checkpoint: Checkpoint) -> str:
        """ "" when the ledger holds entry `checkpoint.seq` with `checkpoint.hash` and the
        checkpoint was signed by this broker's checkpoint key; otherwise why not."""
        try:
            checkpoint.verify_signature()
        except InvalidArgument as exc:
            return str(exc)
        ours = self._keys.public_key(CHECKPOINT_KEY_LABEL).public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
        if ours.decode().strip() != checkpoint.public_key_pem.strip():
            return "the checkpoint was not signed by this broker's checkpoint key"
        records = await self._storage.read_audit(after_seq=checkpoint.seq - 1, limit=1)
        if not records or records[0].seq != checkpoint.seq:
            return (
                f"the checkpoint witnesses entry {checkpoint.seq} (made {checkpoint.time}) "
                "but the ledger no longer has it: entries were cut off or the database was "
                "replaced"
            )
        if records[0].entry_hash != checkpoint.hash:
            return (
                f"entry {checkpoint.seq} differs from the one the checkpoint witnessed at "
                f"{checkpoint.time}: the ledger was rewritten or rolled back"
            )
        return ""

    # -- reading ------------------------------------------------------------------------

    async def tail(self, limit: int) -> list[AuditRecord]:
        return await self._storage.audit_tail(limit)

    async def verify(self, page: int = 1000, checkpoint: Checkpoint | None = None) -> Verification:
        """Walk the whole chain: contiguous seqs, linked hashes, recomputed hashes, every entry
        inside a MACed group, epoch records signed, the head matching the newest entry; with
        `checkpoint`, also that the ledger still holds the entry it witnessed. A failed
        verification is also handed to the integrity hooks (the notifier pages it)."""
        result = await self._verify(page, checkpoint)
        if not result.intact:
            for hook in self._hooks:
                try:
                    hook(f"verification failed at entry {result.first_broken_seq}: {result.reason}")
                except Exception:
                    log.exception("audit integrity hook failed")
        return result

    async def _verify(self, page: int, checkpoint: Checkpoint | None) -> Verification:
        walk = _Walk(label=self._label(1), key_present=self._keys.has_key(self._label(1)))
        walk.hash_only_from = 0 if walk.key_present else 1
        prev_hash, expected_seq, count = GENESIS, 1, 0
        last: AuditRecord | None = None
        while True:
            records = await self._storage.read_audit(after_seq=expected_seq - 1, limit=page)
            if not records:
                break
            # Hashing a page and its group MACs (token calls) takes tens of ms: off the event
            # loop, so a verify of a large ledger on a serving broker does not hold every
            # other request for that long, page after page. One page at a time: `walk` is
            # only ever touched by one thread.
            problem, done = await asyncio.to_thread(
                self._check_page, records, expected_seq, prev_hash, walk
            )
            if done:
                last = done[-1]
                prev_hash, expected_seq, count = last.entry_hash, last.seq + 1, count + len(done)
            if problem:
                return Verification(False, count, expected_seq, problem, tuple(walk.notes))
        notes = walk.notes
        if walk.hash_only_from:
            notes.append(
                f"entries {walk.hash_only_from} to {count} (epoch {walk.epoch}) are checked by "
                f"hash chain only: MAC key '{walk.label}' is not in the key backend"
            )
        broken = await self._verify_end(walk, last, count)
        if broken:
            return Verification(False, count, broken[0], broken[1], tuple(notes))
        if checkpoint is not None:
            problem = await self.check_checkpoint(checkpoint)
            if problem:
                return Verification(False, count, checkpoint.seq, problem, tuple(notes))
            notes.append(
                f"checkpoint of {checkpoint.time} (entry {checkpoint.seq}) is in the ledger"
            )
        return Verification(True, count, notes=tuple(notes))

    async def _verify_end(
        self, walk: _Walk, last: AuditRecord | None, count: int
    ) -> tuple[int, str] | None:
        if walk.pending_from:
            return (
                walk.pending_from,
                f"entries from {walk.pending_from} on are not covered by any MAC",
            )
        problem = self._diagnose(last, await self._storage.get_meta(HEAD_KEY))
        if problem:
            return count + 1 if last is None or "cut off" in problem else last.seq, problem
        return None

    def _check_page(
        self, records: list[AuditRecord], expected_seq: int, prev_hash: bytes, walk: _Walk
    ) -> tuple[str, list[AuditRecord]]:
        """(the first problem or "", the records checked good before it)."""
        for i, rec in enumerate(records):
            problem = self._check(rec, expected_seq, prev_hash, walk)
            if problem:
                return problem, records[:i]
            prev_hash, expected_seq = rec.entry_hash, rec.seq + 1
        return "", records

    def _check(self, rec: AuditRecord, expected_seq: int, prev_hash: bytes, walk: _Walk) -> str:
        if rec.seq != expected_seq:
            return f"entry {expected_seq} is missing (next entry is {rec.seq})"
        if rec.prev_hash != prev_hash:
            return f"entry {rec.seq} does not link to entry {rec.seq - 1}"
        if not hmac.compare_digest(chain_hash(prev_hash, rec.seq, rec.event), rec.entry_hash):
            return f"entry {rec.seq} was altered: its hash does not match its content"
        if _EPOCH_MARK in rec.event:
            problem = self._enter_epoch(rec, walk)
            if problem:
                return problem
        if not walk.pending_from:
            walk.pending_from = rec.seq
        if not rec.mac:
            return ""
        if len(rec.mac) == _V2_MAC_LEN and rec.mac[0] == _MAC_V2:
            first = int.from_bytes(rec.mac[1:9], "big")
            if first != walk.pending_from:
                return (
                    f"entry {rec.seq} has a MAC for entries {first} to {rec.seq}, but entries "
                    f"from {walk.pending_from} on are not covered"
                )
            walk.v2_seen = True
            walk.pending_from = 0
            if not walk.key_present:
                return ""
            key = self._keys.mac(walk.label, _group_message(first, rec.seq, rec.entry_hash))
            if not hmac.compare_digest(rec.mac, _entry_mac(first, key)):
                return f"entry {rec.seq} has an invalid MAC"
            walk.last_group = (first, rec.seq, rec.entry_hash, key)
            return ""
        if len(rec.mac) == 32 and not walk.v2_seen:  # the format before group MACs
            walk.pending_from = 0
            if walk.key_present and not hmac.compare_digest(
                self._keys.mac(walk.label, rec.entry_hash), rec.mac
            ):
                return f"entry {rec.seq} has an invalid MAC"
            return ""
        return f"entry {rec.seq} has an invalid MAC"

    def _epoch_signature(
        self, rec: AuditRecord, event: Mapping[str, Any], epoch: int, walk: _Walk
    ) -> str:
        """An epoch record must verify under the checkpoint key. If that key was lost and made
        anew, the record is still trusted through its epoch's MAC (checked with its group),
        which needs that epoch's MAC key: without either, it is refused."""
        if self._check_epoch_signature(event):
            return ""
        if self._keys.has_key(self._label(epoch)):
            walk.notes.append(
                f"entry {rec.seq} (start of epoch {epoch}) is not signed by the current "
                "checkpoint key (lost and made anew?); it is trusted through its MAC"
            )
            return ""
        return f"entry {rec.seq} (start of epoch {epoch}) has an invalid signature"

    def _enter_epoch(self, rec: AuditRecord, walk: _Walk) -> str:
        try:
            event = json.loads(rec.event)
        except ValueError:
            return f"entry {rec.seq} is not JSON"
        if not isinstance(event, dict) or event.get("what") != EPOCH_EVENT:
            return ""
        details = event.get("details")
        epoch = details.get("epoch") if isinstance(details, dict) else None
        if rec.seq == 1 and epoch == 1:
            return self._epoch_signature(rec, event, 1, walk)
        if not isinstance(epoch, int) or epoch <= walk.epoch:
            return f"entry {rec.seq} starts epoch {epoch!r} after epoch {walk.epoch}"
        if walk.pending_from:
            return f"entries from {walk.pending_from} on are not covered by any MAC"
        problem = self._epoch_signature(rec, event, epoch, walk)
        if problem:
            return problem
        if walk.hash_only_from:
            walk.notes.append(
                f"entries {walk.hash_only_from} to {rec.seq - 1} (epoch {walk.epoch}) are "
                f"checked by hash chain only: MAC key '{walk.label}' is not in the key backend"
            )
        assert isinstance(details, dict)
        walk.notes.append(
            f"epoch {epoch} begins at entry {rec.seq} ({event.get('when', '?')}, by "
            f"{event.get('who', '?')}): {event.get('reason', '')}; the ledger was found: "
            f"{details.get('found', '?')}"
        )
        walk.epoch = epoch
        walk.label = self._label(epoch)
        walk.key_present = self._keys.has_key(walk.label)
        walk.hash_only_from = 0 if walk.key_present else rec.seq
        walk.v2_seen = False
        return ""


CHECKPOINT_LEASE = "audit.checkpoint"


class CheckpointJob:
    """Makes a signed checkpoint every `interval`, in one process at a time (the leader lease
    `audit.checkpoint`, as the lease reaper does). `tick()` is cheap between checkpoints: it
    looks at the storage only when the interval since its last look has passed."""

    def __init__(
        self,
        ledger: AuditLedger,
        locks: Any,
        clock: Clock,
        interval: dt.timedelta,
        owner: str,
    ) -> None:
        self._ledger = ledger
        self._locks = locks
        self._clock = clock
        self.interval = interval
        self.owner = owner
        self._next_look: dt.datetime | None = None

    async def tick(self) -> Checkpoint | None:
        """Make a checkpoint if this process leads and the latest is older than `interval`.
        Returns it, or None. Raises what `make_checkpoint` raises (a broken ledger)."""
        now = self._clock.now()
        if self._next_look is not None and now < self._next_look:
            return None
        self._next_look = now + min(self.interval, dt.timedelta(minutes=1))
        ttl = max(self.interval.total_seconds() * 2, 120.0)
        if not await self._locks.try_lease(CHECKPOINT_LEASE, self.owner, ttl, now):
            return None
        latest = await self._ledger.latest_checkpoint()
        if latest is not None:
            with contextlib.suppress(ValueError):
                made = dt.datetime.fromisoformat(latest.time.replace("Z", "+00:00"))
                if now - made < self.interval:
                    return None
        checkpoint = await self._ledger.make_checkpoint()
        log.info("audit checkpoint made at entry %d", checkpoint.seq)
        return checkpoint
