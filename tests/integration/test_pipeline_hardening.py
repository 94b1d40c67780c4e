"""Attacks on the request pipeline and the transport (issue 20, findings 2, 9, 10 and 14),
repeated against a real in-process server over mTLS: cancelled calls that change state are
audited, floods of refusals cost the ledger one row per caller and interval, oversized
messages on the attestation port are refused before they are read, denylisted callers are
audited by name, out-of-range durations and storage conflicts give the right status codes."""

from __future__ import annotations

import asyncio
import json
import socket
import sqlite3
from collections.abc import Awaitable, Callable
from typing import Any

import grpc
import pytest
from prometheus_client import REGISTRY

from broker.api._proto import (
    access_pb2,
    access_pb2_grpc,
    ca_pb2,
    identity_pb2,
    identity_pb2_grpc,
    secrets_pb2,
    secrets_pb2_grpc,
)

from .conftest import (
    CORRELATION_HEADER,
    OPERATOR_ID,
    WORKLOAD_ID,
    BrokerFactory,
    BrokerHarness,
)

TIMEOUT = 10.0
PUT = "/broker.v1.Secrets/Put"
CREATE_GRANT = "/broker.v1.Access/CreateGrant"
GRANTEE = "spiffe://example.org/default/prod/web"


def cid(name: str) -> tuple[tuple[str, str], ...]:
    return ((CORRELATION_HEADER, name),)


def put_request(ref: str) -> Any:
    return secrets_pb2.PutSecretRequest(
        reference=ref,
        value=b"not-a-real-value",
        owner="payments",
        classification="confidential",
        rotation_period_seconds=90 * 86400,
    )


def grant_request(ref: str, why: str) -> Any:
    return access_pb2.CreateGrantRequest(
        grantee=GRANTEE, action="secrets.get", resource=ref, ttl_seconds=1800, justification=why
    )


def rows(b: BrokerHarness, table: str) -> int:
    with sqlite3.connect(b.tmp_path / "broker.db") as db:
        return int(db.execute(f"SELECT count(*) FROM {table}").fetchone()[0])


async def eventually(check: Callable[[], Awaitable[bool]], what: str, bound: float = 20.0) -> None:
    """Polls `check` until it holds; fails after a generous bound (never a timing claim)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + bound
    while not await check():
        if loop.time() > deadline:
            pytest.fail(f"not within {bound:.0f} s: {what}")
        await asyncio.sleep(0.02)


def counter(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


async def refused(call: Awaitable[Any]) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await call
    return info.value


# -- finding 2: cancelled requests are audited ------------------------------------------------


def hold_writes(
    monkeypatch: pytest.MonkeyPatch, repo: Any, name: str, gate: asyncio.Event
) -> list[int]:
    """Make `repo.name` wait for `gate` once it has written, so that a deadline surely passes
    between the change and its audit event (the window the attack hit); returns a list whose
    length counts the writes done."""
    original, entered = getattr(repo, name), []

    async def held(*args: Any, **kwargs: Any) -> Any:
        result = await original(*args, **kwargs)
        entered.append(1)
        await gate.wait()
        return result

    monkeypatch.setattr(repo, name, held)
    return entered


async def test_calls_cancelled_by_tiny_deadlines_leave_one_event_per_change(
    broker: BrokerHarness, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The attack: 150 Secrets/Put with deadlines from 4 ms and 60 CreateGrant from 3 ms (in
    process the tiniest expire before the servicer runs, so they grow, and a few have 2 s so that
    some surely reach their write even on a loaded machine), the writes
    held until every client has given up. Every stored secret and every stored grant has an
    event saying it took effect."""
    secrets = secrets_pb2_grpc.SecretsStub(broker.channel(broker.operator))
    access = access_pb2_grpc.AccessStub(broker.channel(broker.operator))
    await secrets.Put(put_request("secret://payments/prod/target"), timeout=TIMEOUT)  # warm up
    await access.ListGrants(access_pb2.ListGrantsRequest(all=True), timeout=TIMEOUT)
    secrets_before, grants_before = rows(broker, "secrets"), rows(broker, "access_grants")
    gate = asyncio.Event()
    puts_held = hold_writes(monkeypatch, broker.app.secrets.repository, "insert_secret", gate)
    grants_held = hold_writes(monkeypatch, broker.app.access._repo, "insert_grant", gate)

    async def attempt(call: Awaitable[Any]) -> str:
        try:
            await call
        except grpc.aio.AioRpcError as err:
            return err.code().name
        return "OK"

    codes = await asyncio.gather(
        *(
            attempt(
                secrets.Put(
                    put_request(f"secret://payments/prod/k{i}"),
                    timeout=2.0 if i >= 145 else 0.004 * (1 + i),
                )
            )
            for i in range(150)
        ),
        *(
            attempt(
                access.CreateGrant(
                    grant_request("secret://payments/prod/target", f"INC-{i}"),
                    timeout=2.0 if i >= 55 else 0.009 * (1 + i),
                )
            )
            for i in range(60)
        ),
    )
    assert set(codes) <= {"DEADLINE_EXCEEDED", "CANCELLED"}, codes
    assert puts_held and grants_held, "no call reached its write: the attack did not happen"
    gate.set()

    async def applied(method: str) -> list[dict[str, Any]]:
        return [
            e
            for e in await broker.events()
            if e["method"] == method
            and (e["outcome"] == "OK" or e.get("effect") == "applied")
            and e["correlation_id"]
        ]

    async def balanced() -> bool:
        puts = len(await applied(PUT)) - 1  # the warm-up
        grants = len(await applied(CREATE_GRANT))
        return (puts, grants) == (
            rows(broker, "secrets") - secrets_before,
            rows(broker, "access_grants") - grants_before,
        )

    await eventually(balanced, "every stored secret and grant has an event")
    events = [e for e in await broker.events() if e["method"] in (PUT, CREATE_GRANT)]
    for event in events:
        if event["outcome"] in ("DEADLINE_EXCEEDED", "CANCELLED"):
            assert event["effect"] in ("applied", "none"), event
        else:
            assert "effect" not in event and event["outcome"] == "OK", event
    assert len(events) <= 1 + 150 + 60


async def test_a_put_whose_deadline_passes_mid_write_is_stored_and_audited_as_such(
    broker: BrokerHarness, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The race made certain: the write is held until the client has seen DEADLINE_EXCEEDED
    (or has cancelled); the change then completes and its event says so."""
    gate = asyncio.Event()
    entered = hold_writes(monkeypatch, broker.app.secrets.repository, "insert_secret", gate)
    secrets = secrets_pb2_grpc.SecretsStub(broker.channel(broker.operator))
    call = secrets.Put(put_request("secret://payments/prod/late"), metadata=cid("late-put"))
    await eventually(lambda: _true(entered), "the first put reaches its write")
    err = await refused(
        secrets.Put(put_request("secret://payments/prod/later"), metadata=cid("later"), timeout=0.2)
    )
    assert err.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    call.cancel()  # the first caller goes away while its write is held
    assert rows(broker, "secrets") == 2  # both changed state before their callers went away
    gate.set()

    async def both_recorded() -> bool:
        ids = {e["correlation_id"] for e in await broker.events()}
        return {"late-put", "later"} <= ids

    await eventually(both_recorded, "events for the cancelled puts")
    late, later = await broker.event_for("late-put"), await broker.event_for("later")
    assert (late["outcome"], late["effect"], late["decision"]) == ("CANCELLED", "applied", "allow")
    assert (later["outcome"], later["effect"]) == ("DEADLINE_EXCEEDED", "applied")
    assert rows(broker, "secrets") == 2


async def _true(entered: list[int]) -> bool:
    return bool(entered)


# -- finding 9: floods ------------------------------------------------------------------------


async def test_a_rate_limited_flood_costs_one_ledger_row_per_interval_and_is_counted(
    broker_factory: BrokerFactory,
) -> None:
    import datetime as dt

    b = await broker_factory(
        rate_limit_rps=1.0,
        rate_limit_burst=1.0,
        refusal_audit_interval=dt.timedelta(seconds=10),
    )
    ca = b.ca()
    await ca.GetBundle(ca_pb2.GetBundleRequest(), timeout=TIMEOUT)
    before_rows = len(await b.events())
    before_metric = counter("broker_refusals_total", reason="rate_limit")

    flood = 300
    for _ in range(flood):
        err = await refused(ca.GetBundle(ca_pb2.GetBundleRequest(), timeout=TIMEOUT))
        assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    events = (await b.events())[before_rows:]
    assert len(events) == 1, events  # not 300
    first = events[0]
    assert (first["outcome"], first["who"]) == ("RESOURCE_EXHAUSTED", OPERATOR_ID)
    assert first["sampled"] == {"interval_seconds": 10.0, "previous_interval_refusals": 0}
    assert counter("broker_refusals_total", reason="rate_limit") - before_metric == flood

    b.clock.advance(10.0)  # next interval: its first refusal carries the previous count
    await ca.GetBundle(ca_pb2.GetBundleRequest(), timeout=TIMEOUT)  # one token back
    await refused(ca.GetBundle(ca_pb2.GetBundleRequest(), timeout=TIMEOUT))
    refusals = [e for e in (await b.events())[before_rows:] if e["decision"] == "deny"]
    assert len(refusals) == 2, refusals
    assert refusals[-1]["sampled"]["previous_interval_refusals"] == flood


async def test_unauthenticated_flood_on_the_attestation_port_is_sampled_per_peer(
    broker: BrokerHarness,
) -> None:
    attest_port = broker.attest_port
    creds = grpc.ssl_channel_credentials(root_certificates=broker.bundle_pem)
    channel = grpc.aio.secure_channel(
        f"127.0.0.1:{attest_port}", creds, options=[("grpc.ssl_target_name_override", "localhost")]
    )
    stub = identity_pb2_grpc.WorkloadIdentityStub(channel)
    before_rows = len(await broker.events())
    before_metric = counter("broker_refusals_total", reason="unauthenticated")
    try:
        for _ in range(200):
            err = await refused(
                stub.CreateJoinToken(
                    identity_pb2.CreateJoinTokenRequest(spiffe_id=WORKLOAD_ID), timeout=TIMEOUT
                )
            )
            assert err.code() == grpc.StatusCode.UNAUTHENTICATED
    finally:
        await channel.close()
    events = (await broker.events())[before_rows:]
    assert len(events) == 1, events
    assert events[0]["who"] == "unauthenticated" and events[0]["sampled"]
    assert counter("broker_refusals_total", reason="unauthenticated") - before_metric == 200


async def test_oversized_message_on_the_attestation_port_is_refused_unread(
    broker: BrokerHarness,
) -> None:
    creds = grpc.ssl_channel_credentials(root_certificates=broker.bundle_pem)
    channel = grpc.aio.secure_channel(
        f"127.0.0.1:{broker.attest_port}",
        creds,
        options=[("grpc.ssl_target_name_override", "localhost")],
    )
    stub = identity_pb2_grpc.WorkloadIdentityStub(channel)
    before = len(await broker.events())
    try:
        # 200 KiB: under the main port's limit, over the attestation port's 64 KiB
        big = identity_pb2.AttestRequest(join_token="bjt_x", csr=b"\0" * (200 << 10))
        err = await refused(stub.Attest(big, timeout=TIMEOUT))
        assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        small = identity_pb2.AttestRequest(join_token="bjt_" + "A" * 43, csr=b"\0" * 1000)
        err = await refused(stub.Attest(small, timeout=TIMEOUT))
        assert err.code() == grpc.StatusCode.UNAUTHENTICATED  # the port still serves
    finally:
        await channel.close()
    # The oversized message never reached the pipeline: only the small attempt is audited.
    assert [e["what"] for e in (await broker.events())[before:]] == ["agent.attest"]


async def test_oversized_message_on_the_main_port_is_refused(broker: BrokerHarness) -> None:
    limit = broker.app.config.server.max_message_bytes
    ca = broker.ca()
    before = len(await broker.events())
    # Over the limit by more than the transport's slack: refused by gRPC, unread and unaudited.
    request = ca_pb2.MintX509SVIDRequest(spiffe_id=WORKLOAD_ID, csr=b"\0" * (2 * limit))
    err = await refused(ca.MintX509SVID(request, timeout=TIMEOUT))
    assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert len(await broker.events()) == before
    # Just over it: refused (and audited) by the pipeline, saying what the limit is.
    request = ca_pb2.MintX509SVIDRequest(spiffe_id=WORKLOAD_ID, csr=b"\0" * (limit + 100))
    err = await refused(ca.MintX509SVID(request, metadata=cid("big"), timeout=TIMEOUT))
    assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "limit" in (err.details() or "")
    assert (await broker.event_for("big"))["outcome"] == "RESOURCE_EXHAUSTED"
    assert (await ca.GetBundle(ca_pb2.GetBundleRequest(), timeout=TIMEOUT)).pem


# -- finding 10: idle connections ------------------------------------------------------------


async def test_idle_connections_that_never_handshake_are_closed_and_clients_still_served(
    broker_factory: BrokerFactory,
) -> None:
    import datetime as dt

    b = await broker_factory(handshake_timeout=dt.timedelta(milliseconds=500))
    loop = asyncio.get_running_loop()
    idle: list[socket.socket] = []
    try:
        for _ in range(200):
            sock = socket.create_connection(("127.0.0.1", b.port))
            sock.setblocking(False)
            idle.append(sock)
        # A real client is served while they sit there.
        assert (await b.ca().GetBundle(ca_pb2.GetBundleRequest(), timeout=TIMEOUT)).pem

        async def closed(sock: socket.socket) -> bool:
            try:
                data = await asyncio.wait_for(loop.sock_recv(sock, 1), 0.05)
            except TimeoutError:
                return False
            except OSError:
                return True
            return data == b""

        async def all_closed() -> bool:
            states = await asyncio.gather(*(closed(s) for s in idle))
            return all(states)

        await eventually(all_closed, "idle connections closed by the handshake timeout", 30.0)
    finally:
        for sock in idle:
            sock.close()


# -- finding 14 (parts) --------------------------------------------------------------------


async def test_denylisted_caller_is_audited_by_name_serial_and_method(
    broker: BrokerHarness,
) -> None:
    workload = broker.identity(WORKLOAD_ID)
    serial = format(workload.serial, "x")
    operator = identity_pb2_grpc.WorkloadIdentityStub(broker.channel(broker.operator))
    denied = await operator.DenySVID(identity_pb2.DenySVIDRequest(target=serial))
    assert denied.kind == "serial"
    err = await refused(
        broker.ca(workload).GetBundle(
            ca_pb2.GetBundleRequest(), metadata=cid("denied"), timeout=TIMEOUT
        )
    )
    assert err.code() == grpc.StatusCode.PERMISSION_DENIED
    event = await broker.event_for("denied")
    assert event["who"] == WORKLOAD_ID and event["serial"] == serial
    assert event["method"] == "/broker.v1.CertificateAuthority/GetBundle"
    assert event["decision"] == "deny" and "denylist" in event["reason"]


@pytest.mark.parametrize("ttl", [2**63 - 1, -(2**63)])
async def test_out_of_range_durations_are_invalid_argument_everywhere(
    broker: BrokerHarness, ttl: int
) -> None:
    ca = broker.ca()
    secrets = secrets_pb2_grpc.SecretsStub(broker.channel(broker.operator))
    access = access_pb2_grpc.AccessStub(broker.channel(broker.operator))
    identity = identity_pb2_grpc.WorkloadIdentityStub(broker.channel(broker.operator))
    before = len(await broker.events())
    calls = [
        ca.MintX509SVID(ca_pb2.MintX509SVIDRequest(spiffe_id=WORKLOAD_ID, ttl_seconds=ttl)),
        secrets.Put(
            secrets_pb2.PutSecretRequest(
                reference="secret://payments/prod/ttl",
                value=b"v",
                owner="payments",
                classification="confidential",
                rotation_period_seconds=ttl,
            )
        ),
        access.CreateGrant(
            access_pb2.CreateGrantRequest(
                grantee=GRANTEE,
                action="secrets.get",
                resource="secret://payments/prod/ttl",
                ttl_seconds=ttl,
                justification="x",
            )
        ),
        identity.CreateJoinToken(
            identity_pb2.CreateJoinTokenRequest(spiffe_id=WORKLOAD_ID, ttl_seconds=ttl)
        ),
    ]
    for call in calls:
        err = await refused(call)
        assert err.code() == grpc.StatusCode.INVALID_ARGUMENT, err.details()
        assert "ttl_seconds" in (err.details() or "") or "period_seconds" in (err.details() or "")
        assert "out of range" in (err.details() or "")
    assert rows(broker, "secrets") == 0 and rows(broker, "access_grants") == 0
    assert rows(broker, "join_tokens") == 0
    events = (await broker.events())[before:]
    assert [e["outcome"] for e in events] == ["INVALID_ARGUMENT"] * len(calls)


def attestor(name: str) -> Any:
    from cryptography.hazmat.primitives.asymmetric import ec
    from jwt.algorithms import ECAlgorithm

    jwk = json.loads(ECAlgorithm.to_jwk(ec.generate_private_key(ec.SECP256R1()).public_key()))
    jwk["kid"] = name
    return identity_pb2.Attestor(
        name=name,
        issuer="https://ci.example",
        audience="broker",
        jwks_json=json.dumps({"keys": [jwk]}),
        template="spiffe://{td}/ci/{repository}",
    )


async def test_storage_conflict_text_never_reaches_the_client(broker: BrokerHarness) -> None:
    """Two attestors with one issuer: the second breaks a UNIQUE constraint. The client gets
    ALREADY_EXISTS with a message of ours; the table and column stay on the server."""
    operator = identity_pb2_grpc.WorkloadIdentityStub(broker.channel(broker.operator))
    await operator.AddAttestor(attestor("ci"), timeout=TIMEOUT)
    err = await refused(
        operator.AddAttestor(attestor("ci-two"), metadata=cid("dup"), timeout=TIMEOUT)
    )
    details = err.details() or ""
    assert err.code() == grpc.StatusCode.ALREADY_EXISTS, details
    assert "already exists" in details
    for leak in ("UNIQUE", "constraint", "attestors", "sqlite"):
        assert leak not in details
        assert leak not in (await broker.event_for("dup")).get("error", "")
    listed = await operator.ListAttestors(identity_pb2.ListAttestorsRequest(), timeout=TIMEOUT)
    assert [a.name for a in listed.attestors] == ["ci"]


def idle_from(host: str, port: int, count: int) -> list[socket.socket]:
    """`count` TCP connections from source address `host` that never send a byte."""
    socks = []
    for _ in range(count):
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.bind((host, 0))
        sock.connect(("127.0.0.1", port))
        sock.setblocking(False)
        socks.append(sock)
    return socks


async def is_closed(sock: socket.socket) -> bool:
    loop = asyncio.get_running_loop()
    try:
        data = await asyncio.wait_for(loop.sock_recv(sock, 1), 0.05)
    except TimeoutError:
        return False
    except OSError:
        return True
    return data == b""


async def attest_once(b: BrokerHarness, correlation_id: str) -> grpc.aio.AioRpcError:
    creds = grpc.ssl_channel_credentials(root_certificates=b.bundle_pem)
    channel = grpc.aio.secure_channel(
        f"127.0.0.1:{b.attest_port}",
        creds,
        options=[("grpc.ssl_target_name_override", "localhost")],
    )
    try:
        stub = identity_pb2_grpc.WorkloadIdentityStub(channel)
        request = identity_pb2.AttestRequest(join_token="bjt_" + "A" * 43, csr=b"\0" * 100)
        return await refused(stub.Attest(request, metadata=cid(correlation_id), timeout=TIMEOUT))
    finally:
        await channel.close()


async def test_one_peer_cannot_hold_more_than_its_share_of_the_attestation_port(
    broker_factory: BrokerFactory,
) -> None:
    import datetime as dt

    b = await broker_factory(max_connections_per_peer=5, handshake_timeout=dt.timedelta(minutes=5))
    assert b.attest_port
    before = counter("broker_refusals_total", reason="connection_cap")
    held = idle_from("127.0.0.2", b.attest_port, 5)
    over = idle_from("127.0.0.2", b.attest_port, 20)
    try:

        async def over_cap_closed() -> bool:
            return all(await asyncio.gather(*(is_closed(s) for s in over)))

        await eventually(over_cap_closed, "connections over the per-peer cap closed at once")
        assert not any(await asyncio.gather(*(is_closed(s) for s in held)))
        assert counter("broker_refusals_total", reason="connection_cap") - before == 20
        # Another peer is served meanwhile, and is audited under its own address.
        err = await attest_once(b, "other-peer")
        assert err.code() == grpc.StatusCode.UNAUTHENTICATED
        event = await b.event_for("other-peer")
        assert event["who"] == "bootstrap:127.0.0.1", event
        assert event["where"].startswith("ipv4:127.0.0.1:"), event
    finally:
        for sock in held + over:
            sock.close()


async def test_the_attestation_gate_closes_connections_that_send_nothing(
    broker_factory: BrokerFactory,
) -> None:
    import datetime as dt

    b = await broker_factory(handshake_timeout=dt.timedelta(milliseconds=300))
    assert b.attest_port
    idle = idle_from("127.0.0.3", b.attest_port, 30)
    try:

        async def all_closed() -> bool:
            return all(await asyncio.gather(*(is_closed(s) for s in idle)))

        await eventually(all_closed, "idle attestation connections closed", 30.0)
        assert (await attest_once(b, "after-idle")).code() == grpc.StatusCode.UNAUTHENTICATED
    finally:
        for sock in idle:
            sock.close()


async def test_the_main_port_can_be_gated_too(broker_factory: BrokerFactory) -> None:
    b = await broker_factory(connection_gate="all", max_connections_per_peer=3)
    held = idle_from("127.0.0.4", b.port, 3)
    over = idle_from("127.0.0.4", b.port, 3)
    try:
        await eventually(
            lambda: _all_closed(over), "main-port connections over the per-peer cap closed"
        )
        ca = b.ca()
        response = await ca.GetBundle(
            ca_pb2.GetBundleRequest(), metadata=cid("gated"), timeout=TIMEOUT
        )
        assert response.pem
        event = await b.event_for("gated")
        assert event["who"] == OPERATOR_ID and event["where"].startswith("ipv4:127.0.0.1:")
    finally:
        for sock in held + over:
            sock.close()


async def _all_closed(socks: list[socket.socket]) -> bool:
    return all(await asyncio.gather(*(is_closed(s) for s in socks)))
