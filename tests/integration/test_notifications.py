"""Signed notifications to a local HTTPS receiver: raised from what the ledger commits, signed
with HMAC-SHA256 under a key in the key backend, retried on 500, given up on a hanging or
wrong-CA receiver, and every delivery recorded in the ledger. The audit stream's webhook sink
against the same receiver."""

from __future__ import annotations

import datetime as dt
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from broker.audit import AuditLedger
from broker.config import AuditSink, NotifyChannel
from broker.forwarding import AuditForwarder, WebhookSink
from broker.notifications import NOTIFY_KEY_LABEL, Notifier, classify, verify_signature
from broker.storage.factory import open_storage
from broker.storage.interface import Storage
from ca.clock import FakeClock
from ca.keys import SoftwareBackend, mac_signer
from tests.fixtures.webhook import WebhookReceiver
from tests.integration.conftest import make_config


@pytest.fixture
async def storage(tmp_path: Path) -> AsyncIterator[Storage]:
    store = await open_storage(f"sqlite:///{tmp_path / 'broker.db'}")
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


class Sleeps(list[float]):
    async def __call__(self, seconds: float) -> None:
        self.append(seconds)


def _notifier(
    ledger: AuditLedger,
    keys: SoftwareBackend,
    webhook: WebhookReceiver,
    *,
    ca: Path | None = None,
    retries: int = 3,
    timeout: float = 10.0,
    sleeps: Sleeps | None = None,
) -> Notifier:
    channel = NotifyChannel(
        "oncall",
        webhook.url,
        ca or webhook.ca_file,
        timeout=dt.timedelta(seconds=timeout),
    )
    notifier = Notifier(
        [channel],
        keys,
        FakeClock(),
        ledger.record,
        retries=retries,
        sleep=sleeps if sleeps is not None else Sleeps(),
    )
    notifier.ensure_key()
    ledger.add_commit_hook(notifier.observe)
    ledger.add_integrity_hook(notifier.integrity_failure)
    return notifier


def _event(what: str, **extra: Any) -> dict[str, Any]:
    return {
        "who": "spiffe://td/op/alice",
        "what": what,
        "resource": "prod/db",
        "decision": "allow",
        "outcome": "OK",
        **extra,
    }


async def _entries(storage: Storage, what: str) -> list[dict[str, object]]:
    found = []
    for rec in await storage.read_audit(0, 1000):
        event = json.loads(rec.event)
        if event.get("what") == what:
            found.append(event)
    return found


@pytest.mark.parametrize(
    ("event", "kind"),
    [
        (_event("secrets.revoke"), "secret.revoked"),
        (
            _event("lease.revoke", method="/broker.v1.Leases/RevokePrefix"),
            "leases.revoked_by_prefix",
        ),
        (_event("lease.revoke", method="/broker.v1.Leases/Revoke"), None),
        (_event("svid.deny"), "svid.denied"),
        (_event("breakglass.issue"), "breakglass.issued"),
        (_event("secrets.get", rule="break-glass"), "breakglass.used"),
        (
            {"what": "anomaly.detected", "decision": "flag", "outcome": "ANOMALY"},
            "anomaly.detected",
        ),
        (_event("secret.due"), "secret.due"),
        (_event("secret.due", outcome="failed"), None),
        (_event("secrets.revoke", outcome="PERMISSION_DENIED"), None),
        (_event("secrets.get"), None),
        (_event("ca.rotate", details={"compromised": True}), "ca.root_compromised"),
        (_event("ca.rotate", details={"root": True, "compromised": False}), None),
        (_event("ca.rotate", details={"compromised": True}, outcome="PERMISSION_DENIED"), None),
    ],
)
def test_what_raises_a_notification(event: dict[str, str], kind: str | None) -> None:
    assert classify(event) == kind


async def test_a_revocation_is_notified_signed_and_recorded(
    storage: Storage, ledger: AuditLedger, keys: SoftwareBackend, webhook: WebhookReceiver
) -> None:
    notifier = _notifier(ledger, keys, webhook)
    seq = await ledger.record(_event("secrets.revoke"))
    await ledger.record(_event("secrets.get"))  # not notified
    await notifier.drain()
    assert len(webhook.requests) == 1
    headers, body = webhook.requests[0]
    note = json.loads(body)
    assert note["kind"] == "secret.revoked"
    assert note["audit_seq"] == seq
    assert note["resource"] == "prod/db"
    signature = headers["X-Broker-Signature"]
    assert signature == "sha256=" + mac_signer(keys).mac(NOTIFY_KEY_LABEL, body).hex()
    # A receiver holding the key accepts it and refuses a changed body.
    key = keys._keys[NOTIFY_KEY_LABEL].secret  # the software backend holds the raw key
    assert verify_signature(key, body, signature)
    assert not verify_signature(key, body.replace(b"prod/db", b"prod/xx"), signature)
    [delivered] = await _entries(storage, "notification.delivered")
    assert delivered["resource"] == "oncall"
    assert delivered["details"] == {
        "notification": note["id"],
        "kind": "secret.revoked",
        "attempts": 1,
        "audit_seq": seq,
    }


async def test_a_receiver_answering_500_gets_retries(
    storage: Storage, ledger: AuditLedger, keys: SoftwareBackend, webhook: WebhookReceiver
) -> None:
    sleeps = Sleeps()
    notifier = _notifier(ledger, keys, webhook, sleeps=sleeps)
    webhook.fail_next(2)
    await ledger.record(_event("svid.deny"))
    await notifier.drain()
    assert [json.loads(b)["kind"] for _, b in webhook.requests] == ["svid.denied"]
    assert sleeps == [1.0, 2.0]
    [delivered] = await _entries(storage, "notification.delivered")
    assert delivered["details"]["attempts"] == 3  # type: ignore[index]


async def test_a_hanging_receiver_is_given_up_on_and_recorded(
    storage: Storage, ledger: AuditLedger, keys: SoftwareBackend, webhook: WebhookReceiver
) -> None:
    notifier = _notifier(ledger, keys, webhook, retries=1, timeout=0.5)
    webhook.hang.set()
    seq = await ledger.record(_event("breakglass.issue"))  # answered while the receiver hangs
    assert seq == 2
    await notifier.drain()
    assert webhook.requests == []
    [failed] = await _entries(storage, "notification.failed")
    assert failed["details"]["attempts"] == 2  # type: ignore[index]
    assert "timed out" in str(failed["error"])


async def test_a_receiver_with_a_certificate_from_another_ca_gets_nothing(
    storage: Storage, ledger: AuditLedger, keys: SoftwareBackend, webhook: WebhookReceiver
) -> None:
    notifier = _notifier(ledger, keys, webhook, ca=webhook.wrong_ca_file, retries=0)
    await ledger.record(_event("secrets.revoke"))
    await notifier.drain()
    assert webhook.requests == []
    [failed] = await _entries(storage, "notification.failed")
    assert "CERTIFICATE_VERIFY_FAILED" in str(failed["error"])


async def test_an_integrity_failure_is_notified(
    ledger: AuditLedger, keys: SoftwareBackend, webhook: WebhookReceiver
) -> None:
    notifier = _notifier(ledger, keys, webhook)
    notifier.integrity_failure("entries 7 to 9 were cut off the end")
    await notifier.drain()
    [(_, body)] = webhook.requests
    note = json.loads(body)
    assert note["kind"] == "audit.verification_failed"
    assert note["details"]["problem"] == "entries 7 to 9 were cut off the end"


async def test_the_audit_stream_to_a_webhook_sink(
    storage: Storage, ledger: AuditLedger, webhook: WebhookReceiver
) -> None:
    for i in range(4):
        await ledger.record(_event("secrets.get", resource=f"s{i}"))
    await ledger.drain()
    sink = WebhookSink(AuditSink("hook", webhook.url, webhook.ca_file))
    mono = [0.0]
    fwd = AuditForwarder(storage, [sink], FakeClock(), "a", batch=3, monotonic=lambda: mono[0])
    webhook.fail_next(1)
    await fwd.tick()
    assert webhook.requests == []
    assert await storage.get_meta("audit_forward:hook") is None
    mono[0] += 5
    while await fwd.tick():
        pass
    lines = [json.loads(x) for _, body in webhook.requests for x in body.splitlines()]
    assert [r["seq"] for r in lines] == [1, 2, 3, 4, 5]
    assert webhook.requests[0][0]["Content-Type"] == "application/x-ndjson"
    assert await storage.get_meta("audit_forward:hook") == "5"


async def test_an_svid_deny_through_the_server_is_notified(
    tmp_path: Path, webhook: WebhookReceiver
) -> None:
    """The whole wiring: Application with a configured channel, the real gRPC pipeline."""
    from dataclasses import replace

    from broker.api._proto import identity_pb2
    from broker.api.server.serving import serve_application
    from broker.app import Application
    from broker.config import NotificationsConfig
    from tests.integration.test_identity import WEB_ID, Served

    config = make_config(tmp_path)
    channel = NotifyChannel("oncall", webhook.url, webhook.ca_file, events=("svid.denied",))
    config = replace(config, notifications=NotificationsConfig(channels=(channel,)))
    store = await open_storage(config.storage.resolved_dsn())
    keys = SoftwareBackend()
    app = Application(config, keys, store, FakeClock(dt.datetime.now(dt.UTC)))
    await app.start()
    served = await serve_application(app)
    state = Served(app, served, FakeClock(), [])
    try:
        op = state.operator()
        await op.DenySVID(identity_pb2.DenySVIDRequest(target=WEB_ID))
        await app.ledger.drain()
        await app.notifier.drain()
        [(headers, body)] = webhook.requests
        note = json.loads(body)
        assert note["kind"] == "svid.denied"
        assert note["resource"] == WEB_ID
        assert headers["X-Broker-Signature"] == app.notifier.sign(body)
        [delivered] = await _entries(store, "notification.delivered")
        assert delivered["details"]["kind"] == "svid.denied"  # type: ignore[index]
    finally:
        for ch in state.channels:
            await ch.close()
        await served.server.stop(grace=None)
        await app.close()
