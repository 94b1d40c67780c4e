"""Root CA rotation through the real gRPC pipeline: the operator's Rotate(root) call, the bundle
and status it leaves, the refusals (wrong caller, rotation in progress, contradicting fields),
the audit records, the compromised-root notification, and the agent's sync carrying the
cross-certificates."""

from __future__ import annotations

import datetime as dt
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from broker.api._proto import ca_pb2, ca_pb2_grpc
from broker.api.server.serving import serve_application
from broker.app import Application
from broker.config import NotificationsConfig, NotifyChannel
from broker.storage.factory import open_storage
from ca.bundle import TrustBundle
from ca.clock import FakeClock
from ca.keys import SoftwareBackend
from ca.spiffeid import SpiffeId
from tests.fixtures.webhook import WebhookReceiver
from tests.integration.conftest import make_config
from tests.integration.test_identity import OPERATOR_ID, WEB_ID, Served, _chain, _key_pem


@dataclass
class Harness:
    state: Served
    webhook: WebhookReceiver

    def ca(self, spiffe_id: str = OPERATOR_ID) -> Any:
        from cryptography.hazmat.primitives.asymmetric import ec

        key = ec.generate_private_key(ec.SECP256R1())
        leaf, issuer = self.state.app.ca.issue_internal(
            SpiffeId.parse(spiffe_id), key.public_key(), dt.timedelta(hours=1)
        )
        creds = grpc.ssl_channel_credentials(
            root_certificates=self.state.bundle,
            private_key=_key_pem(key),
            certificate_chain=_chain(leaf, issuer),
        )
        channel = grpc.aio.secure_channel(
            f"127.0.0.1:{self.state.served.port}",
            creds,
            options=[("grpc.ssl_target_name_override", "localhost")],
        )
        self.state.channels.append(channel)
        return ca_pb2_grpc.CertificateAuthorityStub(channel)


@pytest.fixture
async def h(tmp_path: Path, webhook: WebhookReceiver) -> AsyncIterator[Harness]:
    config = make_config(tmp_path)
    channel = NotifyChannel("oncall", webhook.url, webhook.ca_file, events=("ca.root_compromised",))
    config = replace(config, notifications=NotificationsConfig(channels=(channel,)))
    store = await open_storage(config.storage.resolved_dsn())
    app = Application(config, SoftwareBackend(), store, FakeClock(dt.datetime.now(dt.UTC)))
    await app.start()
    served = await serve_application(app)
    state = Served(app, served, FakeClock(), [])
    try:
        yield Harness(state, webhook)
    finally:
        for ch in state.channels:
            await ch.close()
        await served.server.stop(grace=None)
        await app.close()


def _roots(response: Any) -> list[x509.Certificate]:
    return list(TrustBundle.from_jwks(response.trust_domain, response.jwks).x509_authorities)


async def _rotations(h: Harness) -> list[dict[str, Any]]:
    await h.state.app.ledger.drain()
    return [e for e in await h.state.events() if e.get("what") == "ca.rotate"]


async def test_a_planned_root_rotation_publishes_both_roots_and_is_audited(h: Harness) -> None:
    ca = h.ca()
    before = await ca.GetBundle(ca_pb2.GetBundleRequest())
    response = await ca.Rotate(ca_pb2.RotateRequest(root=True, activate_after_seconds=600))
    assert response.actions[0].startswith("prepared root root-2")
    assert response.status.root_phase == "publishing"
    after = await ca.GetBundle(ca_pb2.GetBundleRequest())
    assert after.sequence > before.sequence
    assert len(_roots(after)) == 2 and _roots(before)[0] in _roots(after)
    assert after.pem.count("BEGIN CERTIFICATE") == 2
    (event,) = await _rotations(h)
    assert event["outcome"] == "OK" and event["details"]["root"] is True
    assert event["details"]["compromised"] is False

    # A second one while this one is in progress: refused, clearly, and nothing changes.
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await ca.Rotate(ca_pb2.RotateRequest(root=True))
    assert refused.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "already in progress" in (refused.value.details() or "")
    assert "Traceback" not in (refused.value.details() or "")
    assert (await ca.GetBundle(ca_pb2.GetBundleRequest())).sequence == after.sequence
    status = await ca.GetStatus(ca_pb2.GetStatusRequest())
    assert status.root_phase == "publishing"
    assert [e["outcome"] for e in await _rotations(h)] == ["OK", "FAILED_PRECONDITION"]
    assert h.webhook.requests == []  # a planned rotation pages nobody


@pytest.mark.parametrize(
    "request_",
    [
        ca_pb2.RotateRequest(root=True, force=True),
        ca_pb2.RotateRequest(compromised=True),
        ca_pb2.RotateRequest(activate_after_seconds=5),
        ca_pb2.RotateRequest(root=True, compromised=True, activate_after_seconds=5),
    ],
)
async def test_contradicting_rotation_fields_are_refused(h: Harness, request_: Any) -> None:
    ca = h.ca()
    before = await ca.GetStatus(ca_pb2.GetStatusRequest())
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await ca.Rotate(request_)
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert await ca.GetStatus(ca_pb2.GetStatusRequest()) == before


async def test_a_workload_cannot_rotate_the_root(h: Harness) -> None:
    ca = h.ca(WEB_ID)
    admin = h.ca()
    before = await admin.GetBundle(ca_pb2.GetBundleRequest())
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await ca.Rotate(ca_pb2.RotateRequest(root=True, compromised=True))
    assert refused.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert await admin.GetBundle(ca_pb2.GetBundleRequest()) == before
    assert h.webhook.requests == []


async def test_a_compromised_root_leaves_the_bundle_at_once_and_pages(h: Harness) -> None:
    ca = h.ca()
    (old_root,) = _roots(await ca.GetBundle(ca_pb2.GetBundleRequest()))
    response = await ca.Rotate(ca_pb2.RotateRequest(root=True, compromised=True))
    assert "removed root root-1 from the bundle" in response.actions
    (new_root,) = h.state.app.ca.bundle().x509_authorities  # at once
    assert new_root != old_root
    await h.state.app.ledger.drain()
    await h.state.app.notifier.drain()
    [(headers, body)] = h.webhook.requests
    note = json.loads(body)
    assert note["kind"] == "ca.root_compromised"
    assert note["details"]["runbook"] == "docs/runbooks/compromised-root-key.md"
    assert "removed root root-1 from the bundle" in note["details"]["actions"]
    assert headers["X-Broker-Signature"] == h.state.app.notifier.sign(body)
    # A certificate issued under the old hierarchy is refused from now on (not only once the
    # TLS material is renewed), whatever the method...
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await ca.GetStatus(ca_pb2.GetStatusRequest())
    assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert "replaced as compromised" in (refused.value.details() or "")
    kids, grace = h.state.app.ca.replaced_issuers()
    assert kids and grace  # ...but agents may sync and renew during the grace
    # Once the serving certificate is renewed (the background job does it on a bundle
    # change), it chains to the new root through the cross-certificate; a new identity works.
    material = h.state.app.serving_material()
    assert material.chain_pem.count(b"BEGIN CERTIFICATE") == 3
    assert old_root.public_bytes(serialization.Encoding.PEM) in material.client_roots_pem
    h.state.served.credentials.update(material)
    status = await h.ca().GetStatus(ca_pb2.GetStatusRequest())
    assert status.root_phase == "steady"
    # Agents are sent the new root vouched for by the old one (to reach the broker again).
    (cross,) = [x509.load_der_x509_certificate(d) for d in h.state.app.ca.root_cross_certificates()]
    assert cross.issuer == old_root.subject and cross.public_key() == new_root.public_key()
