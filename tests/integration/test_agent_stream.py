"""The agents' sync stream (WatchAgent) through the real gRPC pipeline: the broker pushes the
full sync first, then a new one when an entry, the denylist or the bundle changes; opening the
stream is audited once, what it pushes is not; a denylisted agent's stream ends with
PERMISSION_DENIED (audited), and one agent cannot watch another's sync."""

from __future__ import annotations

import asyncio
from typing import Any

import grpc
import pytest
from prometheus_client import REGISTRY

from broker.api._proto import identity_pb2
from tests.integration.test_identity import (
    AGENT_ID,
    DEV_WEB_ID,
    TRUST_DOMAIN,
    Served,
    _attested,
    broker,
)

__all__ = ["broker"]


async def _next(stream: Any) -> identity_pb2.SyncAgentResponse:
    message: identity_pb2.SyncAgentResponse = await asyncio.wait_for(stream.read(), 20)
    return message


def _watch_events(events: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [e for e in events if e["method"].endswith("/WatchAgent")]


async def test_the_broker_pushes_entry_changes_and_audits_only_the_opening(
    broker: Served,
) -> None:
    _, _, _, agent = await _attested(broker)
    stream = agent.WatchAgent(identity_pb2.WatchAgentRequest(agent_id=AGENT_ID))
    first = await _next(stream)
    assert first.trust_domain == TRUST_DOMAIN and list(first.entries) == []
    assert not first.keepalive and first.bundle_sequence >= 1
    assert REGISTRY.get_sample_value("broker_agent_streams") == 1
    before = len(await broker.events())

    op = broker.operator()
    entry = await op.CreateEntry(
        identity_pb2.Entry(spiffe_id=DEV_WEB_ID, parent_id=AGENT_ID, selectors=["unix:uid:7"])
    )
    pushed = await _next(stream)
    assert [e.id for e in pushed.entries] == [entry.id]
    await op.DeleteEntry(identity_pb2.DeleteEntryRequest(id=entry.id))
    pushed = await _next(stream)
    assert list(pushed.entries) == []

    events = await broker.events()
    # The two entry changes are audited (operator RPCs); the two pushes are not.
    new = events[before:]
    assert [e["what"] for e in new] == ["entry.admin", "entry.admin"]
    opened = _watch_events(events)
    assert len(opened) == 1
    assert opened[0]["who"] == AGENT_ID and opened[0]["decision"] == "allow"
    assert opened[0]["outcome"] == "OK"
    stream.cancel()


async def test_a_change_seen_by_another_replica_is_pushed_after_the_fingerprint_poll(
    broker: Served,
) -> None:
    """Another replica's change reaches this one's subscribers through `observe` (the
    background loop's cheap poll): here the entry is written straight to storage."""
    _, _, _, agent = await _attested(broker)
    feed = broker.app.workloads.feed
    feed.observe(await broker.app.workloads.sync_fingerprint())
    stream = agent.WatchAgent(identity_pb2.WatchAgentRequest(agent_id=AGENT_ID))
    await _next(stream)
    from broker.storage.identity import EntryRecord

    record = EntryRecord(
        id="f" * 32,
        spiffe_id=DEV_WEB_ID,
        parent_id=AGENT_ID,
        selectors=("unix:uid:9",),
        x509_ttl=0,
        jwt_ttl=0,
        dns_names=(),
        created_at=broker.clock.now(),
    )
    await broker.app.storage.identity().insert_entry(record)  # as another replica would
    assert feed.observe(await broker.app.workloads.sync_fingerprint())
    pushed = await _next(stream)
    assert [e.id for e in pushed.entries] == [record.id]
    stream.cancel()


async def test_a_denylisted_agents_stream_ends_and_the_refusal_is_audited(
    broker: Served,
) -> None:
    response, _, _, agent = await _attested(broker)
    stream = agent.WatchAgent(identity_pb2.WatchAgentRequest(agent_id=AGENT_ID))
    await _next(stream)
    op = broker.operator()
    await op.DenySVID(identity_pb2.DenySVIDRequest(target=response.serial))
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await _next(stream)
    assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert "Traceback" not in (err.value.details() or "")
    refused = [e for e in _watch_events(await broker.events()) if e["decision"] == "deny"]
    assert len(refused) == 1 and refused[0]["outcome"] == "PERMISSION_DENIED"
    # A new stream is refused at its opening, audited too.
    again = agent.WatchAgent(identity_pb2.WatchAgentRequest(agent_id=AGENT_ID))
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await _next(again)
    assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert len([e for e in _watch_events(await broker.events()) if e["decision"] == "deny"]) == 2


async def test_an_agent_cannot_watch_another_agents_sync(broker: Served) -> None:
    _, _, _, agent = await _attested(broker)
    op = broker.operator()
    other = f"spiffe://{TRUST_DOMAIN}/agents/node2"
    await op.CreateEntry(
        identity_pb2.Entry(spiffe_id=DEV_WEB_ID, parent_id=other, selectors=["unix:uid:7"])
    )
    stream = agent.WatchAgent(identity_pb2.WatchAgentRequest(agent_id=other))
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await _next(stream)
    assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED
    refused = _watch_events(await broker.events())
    assert refused[-1]["decision"] == "deny" and refused[-1]["who"] == AGENT_ID
    assert refused[-1]["resource"] == other
