"""Signed notifications to webhook channels when something an on-call person must know happens.

Kinds (broker.config.NOTIFICATION_KINDS) and what raises them — every one is seen where it is
already recorded: the ledger calls `Notifier.observe` after committing each event, and its
integrity hook calls `Notifier.integrity_failure`:

  secret.revoked            a `secrets.revoke` request that succeeded
  leases.revoked_by_prefix  a successful Leases/RevokePrefix request
  svid.denied               a successful `svid.deny` request
  breakglass.issued         a break-glass credential issued
  breakglass.used           any request allowed by a break-glass credential
  anomaly.detected          the anomaly detector's entry
  audit.verification_failed the ledger found its tail cut off or rewritten
  secret.due                a secret whose value comes from a third party passed its
                            rotation period (the scheduled rotation job, once per due date)
  ca.root_compromised       `broker ca rotate --root --compromised` replaced the roots

Each is POSTed as JSON to every channel that wants its kind, with
`X-Broker-Signature: sha256=<hex HMAC-SHA256 of the body>` under the key `broker-notify-mac`
in the key backend (it never leaves it; receivers get a copy only where the backend allows
export — otherwise verify through `broker` or give receivers a software key). Deliveries are
queued (the request never waits), retried with backoff, and recorded in the ledger as
`notification.delivered` or `notification.failed`.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import ssl
import urllib.parse
import uuid
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from broker.config import NotifyChannel
from broker.forwarding.sinks import SinkError, post, tls_context
from ca.clock import Clock
from ca.keys import KeyBackend, KeyKind, mac_signer

__all__ = ["NOTIFY_KEY_LABEL", "Notification", "Notifier", "classify", "verify_signature"]

log = logging.getLogger(__name__)

NOTIFY_KEY_LABEL = "broker-notify-mac"
SIGNATURE_HEADER = "X-Broker-Signature"

Post = Callable[[urllib.parse.SplitResult, bytes, dict[str, str], ssl.SSLContext, float], int]


def classify(event: Mapping[str, Any]) -> str | None:
    """The notification kind a committed ledger event raises, or None."""
    what, outcome = event.get("what"), event.get("outcome")
    if what == "anomaly.detected":
        return "anomaly.detected"
    if outcome != "OK" or event.get("decision", "allow") != "allow":
        return None
    if what == "secrets.revoke":
        return "secret.revoked"
    if what == "lease.revoke" and str(event.get("method", "")).endswith("/RevokePrefix"):
        return "leases.revoked_by_prefix"
    if what == "svid.deny":
        return "svid.denied"
    if what == "breakglass.issue":
        return "breakglass.issued"
    if what == "secret.due":
        return "secret.due"
    if what == "ca.rotate" and (event.get("details") or {}).get("compromised"):
        return "ca.root_compromised"
    if event.get("rule") == "break-glass":
        return "breakglass.used"
    return None


@dataclass(frozen=True)
class Notification:
    id: str
    kind: str
    when: str
    seq: int | None
    who: str = ""
    resource: str = ""
    details: Mapping[str, Any] = field(default_factory=dict)

    def body(self) -> bytes:
        return json.dumps(
            {
                "id": self.id,
                "kind": self.kind,
                "when": self.when,
                "audit_seq": self.seq,
                "who": self.who,
                "resource": self.resource,
                "details": dict(self.details),
            },
            separators=(",", ":"),
            sort_keys=True,
        ).encode()


def verify_signature(key: bytes, body: bytes, header: str) -> bool:
    """What a receiver does with a copy of the key: constant-time check of the header."""
    expected = "sha256=" + hmac.new(key, body, "sha256").hexdigest()
    return hmac.compare_digest(expected, header)


class Notifier:
    def __init__(
        self,
        channels: Sequence[NotifyChannel],
        keys: KeyBackend,
        clock: Clock,
        record: Callable[[Mapping[str, Any]], Awaitable[int]],
        *,
        retries: int = 5,
        max_backoff: float = 60.0,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
        poster: Post = post,
    ) -> None:
        self._channels = list(channels)
        self._keys = keys
        self._clock = clock
        self._record = record
        self._retries = retries
        self._max_backoff = max_backoff
        self._sleep = sleep
        self._post = poster
        self._contexts = {c.name: tls_context(c.ca_file) for c in self._channels}
        self._queue: asyncio.Queue[Notification] = asyncio.Queue(maxsize=10_000)
        self.dropped = 0

    @property
    def enabled(self) -> bool:
        return bool(self._channels)

    def ensure_key(self) -> None:
        if self._channels and not self._keys.has_key(NOTIFY_KEY_LABEL):
            self._keys.create_key(NOTIFY_KEY_LABEL, KeyKind.HMAC_SHA256)

    def sign(self, body: bytes) -> str:
        return "sha256=" + mac_signer(self._keys).mac(NOTIFY_KEY_LABEL, body).hex()

    # -- sources (never block) -----------------------------------------------------------

    def observe(self, seq: int, event: Mapping[str, Any]) -> None:
        kind = classify(event) if self._channels else None
        if kind is None:
            return
        details = {k: event[k] for k in ("method", "rule", "reason", "why") if event.get(k)}
        if kind == "secret.due" and isinstance(event.get("details"), Mapping):
            # Who must act and by when (tenant, owner, service, environment, version, due,
            # overdue_seconds): metadata the scheduled rotation job wrote, never a value.
            details.update(event["details"])
        if kind == "ca.root_compromised":
            details["actions"] = list((event.get("details") or {}).get("actions", []))[:20]
            details["runbook"] = "docs/runbooks/compromised-root-key.md"
        self._enqueue(
            Notification(
                id=uuid.uuid4().hex,
                kind=kind,
                when=str(event.get("when", "")) or self._clock.now().isoformat(),
                seq=seq,
                who=str(event.get("who", "")),
                resource=str(event.get("resource", "")),
                details=details,
            )
        )

    def integrity_failure(self, problem: str) -> None:
        if self._channels:
            self._enqueue(
                Notification(
                    id=uuid.uuid4().hex,
                    kind="audit.verification_failed",
                    when=self._clock.now().isoformat(),
                    seq=None,
                    details={"problem": problem, "runbook": "docs/runbooks/audit-gap.md"},
                )
            )

    def _enqueue(self, note: Notification) -> None:
        try:
            self._queue.put_nowait(note)
        except asyncio.QueueFull:
            self.dropped += 1
            log.error("notification queue full: %s dropped", note.kind)

    # -- delivery --------------------------------------------------------------------------

    def backoff(self, attempt: int) -> float:
        return float(min(self._max_backoff, 2 ** max(0, attempt - 1)))

    async def run(self) -> None:
        while True:
            note = await self._queue.get()
            await self.deliver(note)

    async def drain(self) -> None:
        """Deliver everything queued now (tests, shutdown)."""
        while not self._queue.empty():
            await self.deliver(self._queue.get_nowait())

    async def deliver(self, note: Notification) -> None:
        body = note.body()
        signature = self.sign(body)
        await asyncio.gather(
            *(
                self._deliver_to(channel, note, body, signature)
                for channel in self._channels
                if note.kind in channel.events
            )
        )

    async def _deliver_to(
        self, channel: NotifyChannel, note: Notification, body: bytes, signature: str
    ) -> None:
        url = urllib.parse.urlsplit(channel.url)
        headers = {
            "Content-Type": "application/json",
            SIGNATURE_HEADER: signature,
            "X-Broker-Notification-Id": note.id,
            "X-Broker-Notification-Kind": note.kind,
        }
        error = ""
        attempts = 0
        for attempt in range(1, self._retries + 2):
            attempts = attempt
            try:
                await asyncio.to_thread(
                    self._post,
                    url,
                    body,
                    headers,
                    self._contexts[channel.name],
                    channel.timeout.total_seconds(),
                )
            except SinkError as exc:
                error = str(exc)
                log.warning("notification %s to %s failed: %s", note.kind, channel.name, error)
                if attempt <= self._retries:
                    await self._sleep(self.backoff(attempt))
                continue
            error = ""
            break
        outcome = "failed" if error else "delivered"
        entry: dict[str, Any] = {
            "when": self._clock.now().isoformat(),
            "who": "broker",
            "what": f"notification.{outcome}",
            "resource": channel.name,
            "decision": "allow",
            "outcome": outcome,
            "details": {
                "notification": note.id,
                "kind": note.kind,
                "attempts": attempts,
                "audit_seq": note.seq,
            },
        }
        if error:
            entry["error"] = error[:500]
        try:
            await self._record(entry)
        except Exception as exc:  # the ledger may be the thing that failed
            log.error("notification %s not recorded in the ledger: %s", note.id, exc)
