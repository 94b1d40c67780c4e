"""Client errors say which side failed (issue 15): an UNAVAILABLE the broker itself answered
(its storage, a database or HSM behind it) is not reported as a broker that cannot be
reached, and a broker that is down still is."""

from __future__ import annotations

import asyncio
import socket
from typing import Any

import pytest

from broker.api.client.base import BrokerClient, ClientCredentials, ClientError
from broker.api.client.ca import CAClient
from broker.cli.refusals import client_error_message

from .conftest import OPERATOR_ID, BrokerFactory, FailingAuditStorage


async def test_a_failure_behind_the_broker_is_reported_as_the_brokers_answer(
    broker_factory: BrokerFactory,
) -> None:
    wrappers: list[FailingAuditStorage] = []

    def wrap(storage: Any) -> FailingAuditStorage:
        wrappers.append(FailingAuditStorage(storage))
        return wrappers[0]

    b = await broker_factory(wrap_storage=wrap)
    ident = b.identity(OPERATOR_ID)
    client = BrokerClient(
        b.address, ClientCredentials(ident.chain_pem, ident.key_pem, b.bundle_pem)
    )
    try:
        assert (await asyncio.to_thread(CAClient(client).status)).trust_domain  # wiring works
        wrappers[0].fail_audit = True
        with pytest.raises(ClientError) as info:
            await asyncio.to_thread(CAClient(client).status)
    finally:
        wrappers[0].fail_audit = False
        client.close()
    error = info.value
    assert error.code_name == "UNAVAILABLE" and error.answered
    line = client_error_message(error, b.address)
    assert line.startswith(f"unavailable (the broker at {b.address} answered): "), line
    assert "audit" in line and "cannot reach" not in line


async def test_a_broker_that_is_down_is_still_unreachable(broker_factory: BrokerFactory) -> None:
    b = await broker_factory()
    ident = b.identity(OPERATOR_ID)
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        address = f"127.0.0.1:{probe.getsockname()[1]}"  # bound, not listening: refused
        client = BrokerClient(
            address, ClientCredentials(ident.chain_pem, ident.key_pem, b.bundle_pem), timeout=5
        )
        try:
            with pytest.raises(ClientError) as info:
                await asyncio.to_thread(CAClient(client).status)
        finally:
            client.close()
    assert info.value.code_name == "UNAVAILABLE" and not info.value.answered
    assert client_error_message(info.value, address).startswith(
        f"cannot reach the broker at {address}: "
    )


async def test_tls_server_name_checks_a_configured_server_name(
    broker_factory: BrokerFactory,
) -> None:
    """--tls-server-name: the broker's certificate must carry the given name (one of its
    server_names, e.g. a production host name without localhost); another name is refused."""
    b = await broker_factory(server_names=("broker.example.internal",))
    ident = b.identity(OPERATOR_ID)
    credentials = ClientCredentials(ident.chain_pem, ident.key_pem, b.bundle_pem)
    named = BrokerClient(b.address, credentials, server_name="broker.example.internal")
    try:
        assert (await asyncio.to_thread(CAClient(named).status)).trust_domain
    finally:
        named.close()
    wrong = BrokerClient(b.address, credentials, server_name="db.example.internal", timeout=5)
    try:
        with pytest.raises(ClientError) as info:
            await asyncio.to_thread(CAClient(wrong).status)
    finally:
        wrong.close()
    assert info.value.code_name == "UNAVAILABLE" and not info.value.answered
    assert "not the broker's" in info.value.message
