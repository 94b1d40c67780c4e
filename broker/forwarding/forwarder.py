"""The forwarder: per sink, a leader-held loop that reads committed ledger entries after the
sink's cursor (a meta row `audit_forward:<sink>`), delivers them in order, then moves the
cursor. It never touches the request path: the ledger commits as before and the forwarder reads
what was committed. A failed delivery leaves the cursor where it was and waits with capped
exponential backoff; after a restart the loop resumes from the stored cursor. Delivery is at
least once (a batch may arrive twice if the broker dies between delivery and cursor move):
receivers deduplicate by `seq`.

A sink that acknowledges (HTTPS: a 2xx answer) confirms a batch at once. Syslog over TLS has no
acknowledgement, and a receiver killed after reading a batch into memory but before handling
it looks, from the sender's side, exactly like one that handled it and closed. So a syslog
batch is only "sent" until a LATER connection to the receiver succeeds (the next batch, or an
empty probe connection when there is nothing new); only then does the stored cursor move past
it. Any failure rewinds to the stored cursor and sends the unconfirmed entries again."""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import socket
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass

from broker import metrics
from broker.forwarding.sinks import Sink, SinkError
from broker.storage.interface import AuditRecord, Storage
from ca.clock import Clock

__all__ = ["AuditForwarder", "forward_record", "syslog_message"]

log = logging.getLogger(__name__)

CURSOR_PREFIX = "audit_forward:"
LEASE_PREFIX = "audit.forward."
# RFC 5424 PRI: facility 13 (log audit) * 8 + severity 6 (informational).
_PRI = 13 * 8 + 6
_SD_ID = "audit@32473"  # 32473: the example enterprise number of RFC 5612


def forward_record(rec: AuditRecord) -> dict[str, object]:
    """What a receiver gets for one entry: the event as stored plus seq, prev_hash, hash, mac
    (hex / base64) so it can re-check the chain: hash = SHA-256(prev_hash || seq || event)."""
    return {
        "seq": rec.seq,
        "prev_hash": rec.prev_hash.hex(),
        "hash": rec.entry_hash.hex(),
        "mac": base64.b64encode(rec.mac).decode(),
        "event": rec.event,
    }


def _sd_escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("]", "\\]")


def syslog_message(rec: AuditRecord, hostname: str) -> str:
    """One RFC 5424 message: the structured data carries seq and hash, MSG is the JSON record."""
    try:
        when = str(json.loads(rec.event).get("when", "")) or "-"
    except (ValueError, AttributeError):
        when = "-"
    sd = f'[{_SD_ID} seq="{rec.seq}" hash="{_sd_escape(rec.entry_hash.hex())}"]'
    body = json.dumps(forward_record(rec), separators=(",", ":"), sort_keys=True)
    return f"<{_PRI}>1 {when} {hostname or '-'} broker - audit {sd} {body}"


@dataclass
class SinkState:
    sink: Sink
    cursor: int | None = None  # confirmed (stored); None: not read from storage yet
    sent: int = 0  # delivered but not yet confirmed (syslog), >= cursor
    failures: int = 0
    retry_at: float = 0.0
    delivered: int = 0
    last_error: str = ""


class AuditForwarder:
    """Forwards the ledger to every configured sink. `tick()` does one round for every sink
    that is due (tests drive it directly); `run()` loops until cancelled."""

    def __init__(
        self,
        storage: Storage,
        sinks: Sequence[Sink],
        clock: Clock,
        owner: str,
        *,
        batch: int = 500,
        interval: float = 1.0,
        max_backoff: float = 60.0,
        monotonic: Callable[[], float] | None = None,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ) -> None:
        self._storage = storage
        self._clock = clock
        self.owner = owner
        self._batch = batch
        self._interval = interval
        self._max_backoff = max_backoff
        self._monotonic = monotonic or (lambda: asyncio.get_running_loop().time())
        self._sleep = sleep
        self._hostname = socket.gethostname()
        self.states = {s.name: SinkState(s) for s in sinks}

    @property
    def lease_ttl(self) -> float:
        return max(30.0, self._interval * 10)

    def backoff(self, failures: int) -> float:
        """Seconds to wait after the n-th failure in a row: 1, 2, 4, ... capped."""
        return float(min(self._max_backoff, 2 ** max(0, failures - 1)))

    async def run(self) -> None:
        while True:
            try:
                busy = await self.tick()
            except Exception:
                log.exception("audit forwarding round failed; retrying")
                busy = False
            if not busy:
                await self._sleep(self._interval)

    async def tick(self) -> bool:
        """One round: for every sink due and led by this process, deliver the next batch.
        True when some sink delivered a full batch (more may be waiting)."""
        busy = False
        head = await self._head()
        for name, state in self.states.items():
            if self._monotonic() < state.retry_at:
                self._set_lag(name, head, state)
                continue
            lease = LEASE_PREFIX + name
            if not await self._storage.try_lease(
                lease, self.owner, self.lease_ttl, self._clock.now()
            ):
                state.cursor = None  # another process leads: re-read the cursor when we do
                continue
            busy = await self._round(name, state) or busy
            self._set_lag(name, await self._head(), state)
        return busy

    async def _head(self) -> int:
        tail = await self._storage.audit_tail(1)
        return tail[-1].seq if tail else 0

    def _set_lag(self, name: str, head: int, state: SinkState) -> None:
        if state.cursor is not None:
            metrics.set_audit_forward_lag(name, head - state.cursor)

    async def _round(self, name: str, state: SinkState) -> bool:
        if state.cursor is None:
            stored = await self._storage.get_meta(CURSOR_PREFIX + name)
            state.cursor = int(stored) if stored else 0
            state.sent = state.cursor
        acknowledges = getattr(state.sink, "acknowledges", True)
        records = await self._storage.read_audit(state.sent, self._batch)
        if not records and state.sent == state.cursor:
            return False
        messages = [
            (
                syslog_message(rec, self._hostname),
                json.dumps(forward_record(rec), separators=(",", ":"), sort_keys=True).encode(),
            )
            for rec in records
        ]
        try:
            await state.sink.deliver(messages)
        except SinkError as exc:
            state.sent = state.cursor  # send everything unconfirmed again
            state.failures += 1
            wait = self.backoff(state.failures)
            state.retry_at = self._monotonic() + wait
            state.last_error = str(exc)
            metrics.record_audit_forward_failure(name)
            log.warning(
                "audit sink %s: entries after %d not delivered (%s); retry in %.0fs",
                name,
                state.cursor,
                exc,
                wait,
            )
            return False
        state.failures, state.retry_at, state.last_error = 0, 0.0, ""
        # This connection worked: what was sent on earlier ones is confirmed.
        confirmed = state.sent
        if records:
            state.sent = records[-1].seq
            state.delivered += len(records)
            metrics.record_audit_forwarded(name, len(records))
        if acknowledges:
            confirmed = state.sent
        if confirmed != state.cursor:
            state.cursor = confirmed
            await self._storage.set_meta(CURSOR_PREFIX + name, str(state.cursor))
        return len(records) == self._batch or state.sent != state.cursor
