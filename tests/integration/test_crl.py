"""Revocation relying parties can see: `broker svid deny <serial>` puts the serial on a CRL
signed by the issuing CA (through the key backend), the agent receives it at its next sync
(seconds) and the Workload API serves it in the `crl` fields."""

from __future__ import annotations

import asyncio
import datetime as dt
import os
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from cryptography import x509

from broker.api.server.serving import serve_application
from broker.api.workload import selectors_of
from broker.app import Application
from broker.storage.factory import open_storage
from ca.clock import FakeClock
from ca.crl import revoked_serials
from ca.keys import SoftwareBackend
from tests.integration.conftest import make_config
from tests.integration.test_broker_identity import (
    AGENT_ID,
    WEB_ID,
    Broker,
    _agent,
    _workload_api,
    identity_client,
)


@pytest.fixture
async def broker(tmp_path: Path) -> AsyncIterator[Broker]:
    config = make_config(tmp_path)
    storage = await open_storage(config.storage.resolved_dsn())
    app = Application(config, SoftwareBackend(), storage, FakeClock(dt.datetime.now(dt.UTC)))
    await app.start()
    served = await serve_application(app)
    try:
        yield Broker(app, served, app.clock)  # type: ignore[arg-type]
    finally:
        await served.server.stop(grace=None)
        await app.close()


async def test_a_denied_serial_reaches_the_workload_api_as_a_signed_crl(
    broker: Broker, tmp_path: Path
) -> None:
    client = broker.operator_client()
    try:
        token = await asyncio.to_thread(lambda: identity_client(client).create_join_token(AGENT_ID))
        await asyncio.to_thread(
            lambda: identity_client(client).create_entry(
                WEB_ID, AGENT_ID, sorted(selectors_of(os.getuid(), os.getgid()))
            )
        )
        agent, link = _agent(broker, broker.bundle_pem, tmp_path / "out", token.token)
        try:
            await agent.step()
            [svid] = agent.svids_for(selectors_of(os.getuid(), os.getgid()))
            leaf = x509.load_der_x509_certificate(svid.chain_der[0])
            issuing = x509.load_der_x509_certificate(svid.chain_der[1])
            [empty] = agent.snapshot.crl  # one issuing CA, nothing denied yet
            assert revoked_serials(empty) == set()

            await asyncio.to_thread(
                lambda: identity_client(client).deny(format(leaf.serial_number, "x"))
            )
            broker.clock.advance(seconds=5)  # the agent's sync interval
            await agent.step()
            [crl_der] = agent.snapshot.crl
            crl = x509.load_der_x509_crl(crl_der)
            assert crl.is_signature_valid(issuing.public_key())  # type: ignore[arg-type]
            assert crl.issuer == issuing.subject
            assert revoked_serials(crl_der) == {leaf.serial_number}

            answers = await _workload_api(agent, tmp_path)
            assert list(answers["x509"].crl) == [crl_der]
            assert list(answers["x509-bundles"].crl) == [crl_der]
        finally:
            link.close()
    finally:
        client.close()
