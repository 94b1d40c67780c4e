"""The gRPC request path end to end, in process: mTLS -> authenticate -> rate limit ->
authorize -> audit (fail closed) -> servicer -> status mapping (ARCHITECTURE.md, "The request
path" and invariants 3, 5 and 6)."""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import logging
import socket
import ssl
from collections.abc import Awaitable
from pathlib import Path
from typing import Any

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from prometheus_client import REGISTRY

from broker.api._proto import audit_pb2, ca_pb2, ca_pb2_grpc
from ca.x509svid import spiffe_id_of, verify_chain

from .conftest import (
    CORRELATION_HEADER,
    OPERATOR_ID,
    OTHER_WORKLOAD_ID,
    TRUST_DOMAIN,
    WORKLOAD_ID,
    BrokerFactory,
    BrokerHarness,
    FailingAuditStorage,
    leaf_of,
)

TIMEOUT = 10.0
# What an operator mints alone: a production identity needs a second operator's approval
# (tests/integration/test_identity_issuance.py).
DEV_WORKLOAD_ID = f"spiffe://{TRUST_DOMAIN}/acme/dev/web"
CA_SERVICE = "broker.v1.CertificateAuthority"
AUDIT_SERVICE = "broker.v1.Audit"


# -- helpers ----------------------------------------------------------------------------------


def cid(name: str) -> tuple[tuple[str, str], ...]:
    return ((CORRELATION_HEADER, name),)


async def refused(call: Awaitable[Any]) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await call
    return info.value


def assert_refusal(err: grpc.aio.AioRpcError, code: grpc.StatusCode, *fragments: str) -> str:
    """The status code is `code`, the message names each fragment, and no traceback or
    source location reaches the client (neither in details nor in trailing metadata)."""
    details = err.details() or ""
    assert err.code() == code, f"{err.code()} {details!r}"
    for fragment in fragments:
        assert fragment in details, f"{fragment!r} not in {details!r}"
    trailers = " ".join(f"{k}={v!r}" for k, v in (err.trailing_metadata() or ()))
    for text in (details, trailers, err.debug_error_string() or ""):
        assert "Traceback" not in text
        assert 'File "' not in text
    return details


def assert_denied_event(event: dict[str, Any], who: str, what: str, *reason: str) -> None:
    assert event["decision"] == "deny", event
    assert event["outcome"] == "PERMISSION_DENIED", event
    assert event["who"] == who, event
    assert event["what"] == what, event
    for fragment in reason:
        assert fragment in event["reason"], event
    assert "details" not in event, event


def make_csr(key: ec.EllipticCurvePrivateKey | None = None) -> bytes:
    key = key or ec.generate_private_key(ec.SECP256R1())
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([]))
        .sign(key, hashes.SHA256())
    )
    return csr.public_bytes(serialization.Encoding.DER)


def foreign_identity(spiffe_id: str) -> tuple[bytes, bytes]:
    """A root and an X.509-SVID-shaped leaf from a CA the broker has never heard of."""
    now = dt.datetime.now(dt.UTC)
    root_key = ec.generate_private_key(ec.SECP256R1())
    root_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "impostor root")])
    root = (
        x509.CertificateBuilder()
        .subject_name(root_name)
        .issuer_name(root_name)
        .public_key(root_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=False,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .sign(root_key, hashes.SHA256())
    )
    leaf_key = ec.generate_private_key(ec.SECP256R1())
    leaf = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([]))
        .issuer_name(root_name)
        .public_key(leaf_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(hours=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.UniformResourceIdentifier(spiffe_id)]),
            critical=True,
        )
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
        .sign(root_key, hashes.SHA256())
    )
    chain = leaf.public_bytes(serialization.Encoding.PEM) + root.public_bytes(
        serialization.Encoding.PEM
    )
    key_pem = leaf_key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    return chain, key_pem


# -- 1. operator mints an X.509-SVID ----------------------------------------------------------


@pytest.fixture(params=["software", "pkcs11"])
async def any_broker(request: pytest.FixtureRequest, broker_factory: BrokerFactory) -> Any:
    if request.param == "software":
        return await broker_factory()
    backend = request.getfixturevalue("pkcs11_backend")
    token = request.getfixturevalue("softhsm_token")
    return await broker_factory(keys=backend, keys_uri=f"pkcs11:token={token.token_label}")


async def test_operator_mints_x509_svid_that_verifies_and_is_audited(
    any_broker: BrokerHarness,
) -> None:
    b = any_broker
    ca = b.ca()
    call = ca.MintX509SVID(
        ca_pb2.MintX509SVIDRequest(spiffe_id=DEV_WORKLOAD_ID, ttl_seconds=600),
        metadata=cid("it-mint-0001"),
        timeout=TIMEOUT,
    )
    resp = await call
    assert (await call.trailing_metadata()).get(CORRELATION_HEADER) == "it-mint-0001"

    leaf = leaf_of(resp.cert_chain)
    intermediates = [x509.load_der_x509_certificate(d) for d in resp.cert_chain[1:]]
    bundle = await ca.GetBundle(ca_pb2.GetBundleRequest(), timeout=TIMEOUT)
    roots = x509.load_pem_x509_certificates(bundle.pem.encode())
    assert [r.public_bytes(serialization.Encoding.DER) for r in roots] == list(resp.bundle)
    verify_chain(leaf, intermediates, roots, b.clock.now(), trust_domain=TRUST_DOMAIN)
    assert spiffe_id_of(leaf).id_string == DEV_WORKLOAD_ID == resp.spiffe_id
    lifetime = leaf.not_valid_after_utc - b.clock.now()  # X.509 times have whole seconds
    assert dt.timedelta(seconds=599) < lifetime <= dt.timedelta(seconds=600)
    assert resp.expires_at.ToDatetime(dt.UTC) == leaf.not_valid_after_utc
    key = serialization.load_der_private_key(resp.private_key, password=None)
    assert key.public_key() == leaf.public_key()
    serial = format(leaf.serial_number, "x")
    assert resp.serial == serial

    event = await b.event_for("it-mint-0001")
    assert event["who"] == OPERATOR_ID
    assert event["what"] == "svid.mint"
    assert event["method"] == "/broker.v1.CertificateAuthority/MintX509SVID"
    assert event["resource"] == DEV_WORKLOAD_ID
    assert event["decision"] == "allow"
    assert event["outcome"] == "OK"
    assert event["correlation_id"] == "it-mint-0001"
    assert event["details"]["serial"] == serial
    assert event["details"]["key"] == "generated"
    assert "error" not in event
    assert resp.private_key.hex() not in str(event)  # the key is returned once, never logged

    verification = await b.audit().Verify(audit_pb2.VerifyAuditRequest(), timeout=TIMEOUT)
    assert verification.intact, verification.reason


async def test_invalid_correlation_id_is_replaced_not_echoed(broker: BrokerHarness) -> None:
    call = broker.ca().GetBundle(
        ca_pb2.GetBundleRequest(), metadata=cid("bad id with spaces"), timeout=TIMEOUT
    )
    await call
    generated = (await call.trailing_metadata()).get(CORRELATION_HEADER)
    assert generated and generated != "bad id with spaces"
    assert (await broker.event_for(generated))["outcome"] == "OK"


# -- 2. workloads mint only their own ID and administer nothing -------------------------------


async def test_workload_mints_only_its_own_identity(broker: BrokerHarness) -> None:
    workload = broker.identity(WORKLOAD_ID)
    ca = broker.ca(workload)

    own = await ca.MintX509SVID(
        ca_pb2.MintX509SVIDRequest(spiffe_id=WORKLOAD_ID, csr=make_csr()), timeout=TIMEOUT
    )
    assert spiffe_id_of(leaf_of(own.cert_chain)).id_string == WORKLOAD_ID
    assert own.private_key == b""  # the workload kept its key
    jwt = await ca.MintJWTSVID(
        ca_pb2.MintJWTSVIDRequest(spiffe_id=WORKLOAD_ID, audience=["db"]), timeout=TIMEOUT
    )
    assert jwt.spiffe_id == WORKLOAD_ID and jwt.token.count(".") == 2

    for name, call in (
        (
            "deny-x509",
            ca.MintX509SVID(
                ca_pb2.MintX509SVIDRequest(spiffe_id=OTHER_WORKLOAD_ID),
                metadata=cid("deny-x509"),
                timeout=TIMEOUT,
            ),
        ),
        (
            "deny-jwt",
            ca.MintJWTSVID(
                ca_pb2.MintJWTSVIDRequest(spiffe_id=OTHER_WORKLOAD_ID, audience=["db"]),
                metadata=cid("deny-jwt"),
                timeout=TIMEOUT,
            ),
        ),
    ):
        err = await refused(call)
        assert_refusal(err, grpc.StatusCode.PERMISSION_DENIED, WORKLOAD_ID, OTHER_WORKLOAD_ID)
        assert err.trailing_metadata().get(CORRELATION_HEADER) == name
        event = await broker.event_for(name)
        what = "svid.mint" if name == "deny-x509" else "jwt.mint"
        assert_denied_event(event, WORKLOAD_ID, what, WORKLOAD_ID, OTHER_WORKLOAD_ID)
        assert event["resource"] == OTHER_WORKLOAD_ID


async def test_workload_cannot_administer_and_nothing_changes(broker: BrokerHarness) -> None:
    operator_ca = broker.ca()
    status_before = await operator_ca.GetStatus(ca_pb2.GetStatusRequest(), timeout=TIMEOUT)
    policy_before = await operator_ca.GetPolicy(ca_pb2.GetPolicyRequest(), timeout=TIMEOUT)

    workload = broker.identity(WORKLOAD_ID)
    ca, audit = broker.ca(workload), broker.audit(workload)
    attempts = {
        "ca.rotate": ca.Rotate(
            ca_pb2.RotateRequest(force=True), metadata=cid("deny-rotate"), timeout=TIMEOUT
        ),
        "ca.policy.set": ca.SetPolicy(
            ca_pb2.SetPolicyRequest(document_json=policy_before.document_json),
            metadata=cid("deny-set-policy"),
            timeout=TIMEOUT,
        ),
        "audit.read": audit.Tail(
            audit_pb2.TailAuditRequest(limit=10), metadata=cid("deny-tail"), timeout=TIMEOUT
        ),
    }
    for action, call in attempts.items():
        err = await refused(call)
        assert_refusal(err, grpc.StatusCode.PERMISSION_DENIED, action, "reserved for operators")

    status_after = await operator_ca.GetStatus(ca_pb2.GetStatusRequest(), timeout=TIMEOUT)
    policy_after = await operator_ca.GetPolicy(ca_pb2.GetPolicyRequest(), timeout=TIMEOUT)
    assert status_after == status_before
    assert policy_after.version == policy_before.version == 0
    assert policy_after.document_json == policy_before.document_json

    for action, name in (
        ("ca.rotate", "deny-rotate"),
        ("ca.policy.set", "deny-set-policy"),
        ("audit.read", "deny-tail"),
    ):
        assert_denied_event(
            await broker.event_for(name), WORKLOAD_ID, action, "reserved for operators"
        )


# -- 3. transport-level authentication ------------------------------------------------------


async def test_client_certificate_from_another_ca_is_refused_unaudited(
    broker: BrokerHarness,
) -> None:
    before = len(await broker.events())
    chain, key = foreign_identity(WORKLOAD_ID)
    channel = broker.channel(None, chain_pem=chain, key_pem=key)
    err = await refused(
        ca_pb2_grpc.CertificateAuthorityStub(channel).MintX509SVID(
            ca_pb2.MintX509SVIDRequest(spiffe_id=WORKLOAD_ID), timeout=TIMEOUT
        )
    )
    assert_refusal(err, grpc.StatusCode.UNAVAILABLE)
    assert len(await broker.events()) == before


async def test_connection_without_client_certificate_is_refused(broker: BrokerHarness) -> None:
    before = len(await broker.events())
    channel = broker.channel(None)  # trusts the server, presents nothing
    health = health_pb2_grpc.HealthStub(channel)
    err = await refused(health.Check(health_pb2.HealthCheckRequest(service=""), timeout=TIMEOUT))
    assert_refusal(err, grpc.StatusCode.UNAVAILABLE)
    err = await refused(
        ca_pb2_grpc.CertificateAuthorityStub(channel).GetBundle(
            ca_pb2.GetBundleRequest(), timeout=TIMEOUT
        )
    )
    assert_refusal(err, grpc.StatusCode.UNAVAILABLE)
    assert len(await broker.events()) == before


# -- 4. rate limits -------------------------------------------------------------------------


async def test_rate_limit_is_per_identity_and_audited(broker_factory: BrokerFactory) -> None:
    b = await broker_factory(rate_limit_rps=1.0, rate_limit_burst=2.0)
    first = b.ca(b.identity(WORKLOAD_ID))
    second = b.ca(b.identity(OTHER_WORKLOAD_ID))

    for _ in range(2):
        await first.GetBundle(ca_pb2.GetBundleRequest(), timeout=TIMEOUT)
    err = await refused(
        first.GetBundle(ca_pb2.GetBundleRequest(), metadata=cid("limited"), timeout=TIMEOUT)
    )
    assert_refusal(err, grpc.StatusCode.RESOURCE_EXHAUSTED, "retry in", WORKLOAD_ID)

    for _ in range(2):  # another identity has its own bucket
        await second.GetBundle(ca_pb2.GetBundleRequest(), timeout=TIMEOUT)

    event = await b.event_for("limited")
    assert event["outcome"] == "RESOURCE_EXHAUSTED"
    assert event["decision"] == "deny"
    assert event["who"] == WORKLOAD_ID
    assert event["what"] == "ca.bundle.get"
    assert "retry in" in event["error"]

    b.clock.advance(1.0)  # one token back
    await first.GetBundle(ca_pb2.GetBundleRequest(), timeout=TIMEOUT)


# -- 5. the audit ledger fails closed ---------------------------------------------------------


async def test_audit_write_failure_fails_the_request(broker_factory: BrokerFactory) -> None:
    wrappers: list[FailingAuditStorage] = []

    def wrap(storage: Any) -> FailingAuditStorage:
        wrappers.append(FailingAuditStorage(storage))
        return wrappers[0]

    b = await broker_factory(wrap_storage=wrap)
    storage = wrappers[0]
    ca = b.ca()
    request = ca_pb2.MintX509SVIDRequest(spiffe_id=DEV_WORKLOAD_ID)
    assert (await ca.MintX509SVID(request, timeout=TIMEOUT)).cert_chain  # wiring works

    storage.fail_audit = True
    call = ca.MintX509SVID(request, metadata=cid("audit-down"), timeout=TIMEOUT)
    err = await refused(call)
    details = assert_refusal(err, grpc.StatusCode.UNAVAILABLE, "audit")
    assert "disk I/O" not in details  # the storage's own message stays on the server
    assert storage.failed_appends >= 1
    err = await refused(ca.GetBundle(ca_pb2.GetBundleRequest(), timeout=TIMEOUT))
    assert_refusal(err, grpc.StatusCode.UNAVAILABLE, "audit")

    storage.fail_audit = False
    assert all(e["correlation_id"] != "audit-down" for e in await b.events())
    assert (await ca.MintX509SVID(request, timeout=TIMEOUT)).cert_chain  # recovers


# -- 6. unexpected exceptions ---------------------------------------------------------------


class ExplodingCA:
    async def mint_x509(self, *args: Any, **kwargs: Any) -> Any:
        raise RuntimeError("boom secret-ish detail")


async def test_unexpected_exception_becomes_internal_without_details(
    broker_factory: BrokerFactory, caplog: pytest.LogCaptureFixture
) -> None:
    b = await broker_factory(ca_service=ExplodingCA())
    err = await refused(
        b.ca().MintX509SVID(
            ca_pb2.MintX509SVIDRequest(spiffe_id=DEV_WORKLOAD_ID),
            metadata=cid("it-internal-1"),
            timeout=TIMEOUT,
        )
    )
    details = assert_refusal(err, grpc.StatusCode.INTERNAL)
    assert details == "internal error; correlation id it-internal-1"
    assert err.trailing_metadata().get(CORRELATION_HEADER) == "it-internal-1"
    assert "boom" not in (err.debug_error_string() or "")
    assert "boom" not in " ".join(str(v) for _, v in err.trailing_metadata())

    event = await b.event_for("it-internal-1")
    assert event["outcome"] == "INTERNAL"
    assert event["decision"] == "allow"
    assert "boom" not in str(event)
    assert "details" not in event
    # ...while the server log has what an operator needs to find it
    logged = [r for r in caplog.records if "it-internal-1" in r.getMessage()]
    assert logged and logged[0].exc_info is not None


# -- 7. bounded message sizes ---------------------------------------------------------------


@pytest.mark.parametrize("kib", [70, 300])
async def test_oversized_request_is_refused(broker_factory: BrokerFactory, kib: int) -> None:
    """Over server.max_message_bytes (64 KiB): refused as RESOURCE_EXHAUSTED, whether by the
    pipeline (audited, not OK) or by the gRPC transport (never reaches the ledger)."""
    b = await broker_factory(max_message_bytes=64 * 1024)
    ca = b.ca()
    before = await b.events()
    err = await refused(
        ca.MintX509SVID(
            ca_pb2.MintX509SVIDRequest(spiffe_id=DEV_WORKLOAD_ID, csr=b"\x30" * (kib * 1024)),
            metadata=cid(f"too-big-{kib}"),
            timeout=TIMEOUT,
        )
    )
    details = assert_refusal(err, grpc.StatusCode.RESOURCE_EXHAUSTED)
    assert "65536" in details or "larger than max" in details, details
    new = (await b.events())[len(before) :]
    assert not [e for e in new if e["outcome"] == "OK"]
    for event in new:
        assert event["correlation_id"] == f"too-big-{kib}"
        assert event["outcome"] == "RESOURCE_EXHAUSTED"
        assert event["who"] == OPERATOR_ID
        assert "details" not in event
    await ca.GetBundle(ca_pb2.GetBundleRequest(), timeout=TIMEOUT)  # still serving


async def test_csr_over_the_csr_limit_is_invalid_argument(broker_factory: BrokerFactory) -> None:
    b = await broker_factory(max_message_bytes=64 * 1024)
    pem = x509.load_der_x509_csr(make_csr()).public_bytes(serialization.Encoding.PEM)
    csr = pem + b"\n" * (20 * 1024 - len(pem))  # a valid CSR, padded to 20 KiB
    err = await refused(
        b.ca().MintX509SVID(
            ca_pb2.MintX509SVIDRequest(spiffe_id=DEV_WORKLOAD_ID, csr=csr),
            metadata=cid("csr-20k"),
            timeout=TIMEOUT,
        )
    )
    assert_refusal(err, grpc.StatusCode.INVALID_ARGUMENT, "20480 bytes", "16384 bytes")
    event = await b.event_for("csr-20k")
    assert event["outcome"] == "INVALID_ARGUMENT"
    assert "details" not in event


# -- 8. health checking and reflection --------------------------------------------------------


async def test_health_and_reflection_over_mtls(broker: BrokerHarness) -> None:
    before = len(await broker.events())
    channel = broker.channel(broker.identity(WORKLOAD_ID))
    health = health_pb2_grpc.HealthStub(channel)
    for service in ("", CA_SERVICE, AUDIT_SERVICE):
        resp = await health.Check(health_pb2.HealthCheckRequest(service=service), timeout=TIMEOUT)
        assert resp.status == health_pb2.HealthCheckResponse.SERVING, service
    err = await refused(
        health.Check(health_pb2.HealthCheckRequest(service="no.such.Service"), timeout=TIMEOUT)
    )
    assert_refusal(err, grpc.StatusCode.NOT_FOUND)

    reflection = reflection_pb2_grpc.ServerReflectionStub(channel)
    call = reflection.ServerReflectionInfo(
        iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=TIMEOUT
    )
    names: set[str] = set()
    async for resp in call:
        names.update(s.name for s in resp.list_services_response.service)
    assert {CA_SERVICE, AUDIT_SERVICE} <= names
    assert len(await broker.events()) == before  # neither is written to the ledger


def _rpc_count(method: str, code: str) -> float:
    return (
        REGISTRY.get_sample_value(
            "broker_rpc_duration_seconds_count", {"method": method, "code": code}
        )
        or 0.0
    )


async def test_health_edges_pass_the_pipeline_cleanly(
    broker: BrokerHarness, caplog: pytest.LogCaptureFixture
) -> None:
    """Issue 15: Watch streams (it answers with context.write, not a generator: no TypeError
    reaches the client); an unknown service is NOT_FOUND without ERROR logs or a false
    INTERNAL in the metrics; reflection answers under grpc.reflection.v1 as well."""
    check = "/grpc.health.v1.Health/Check"
    internal_before = _rpc_count(check, "INTERNAL")
    not_found_before = _rpc_count(check, "NOT_FOUND")
    channel = broker.channel(broker.identity(WORKLOAD_ID))
    health = health_pb2_grpc.HealthStub(channel)

    watch = health.Watch(health_pb2.HealthCheckRequest(service=CA_SERVICE), timeout=TIMEOUT)
    first = await watch.read()
    assert first.status == health_pb2.HealthCheckResponse.SERVING
    watch.cancel()
    unknown = health.Watch(health_pb2.HealthCheckRequest(service="no.such.Service"))
    assert (await unknown.read()).status == health_pb2.HealthCheckResponse.SERVICE_UNKNOWN
    unknown.cancel()

    caplog.clear()
    with caplog.at_level("INFO"):
        err = await refused(
            health.Check(health_pb2.HealthCheckRequest(service="no.such.Service"), timeout=TIMEOUT)
        )
    assert err.code() == grpc.StatusCode.NOT_FOUND
    assert "Error" not in (err.details() or "") and "Traceback" not in (err.details() or "")
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert _rpc_count(check, "INTERNAL") == internal_before
    assert _rpc_count(check, "NOT_FOUND") == not_found_before + 1

    v1 = channel.stream_stream(
        "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo",
        request_serializer=reflection_pb2.ServerReflectionRequest.SerializeToString,
        response_deserializer=reflection_pb2.ServerReflectionResponse.FromString,
    )
    names: set[str] = set()
    async for resp in v1(
        iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=TIMEOUT
    ):
        names.update(s.name for s in resp.list_services_response.service)
    assert {CA_SERVICE, "grpc.reflection.v1.ServerReflection"} <= names


# -- 9. serving certificate renewal -----------------------------------------------------------


async def _served_certificate(b: BrokerHarness, tmp_path: Path) -> x509.Certificate:
    """Open a raw TLS connection (with a client certificate) and return the server's leaf."""
    ident = b.identity(WORKLOAD_ID)
    cert_file, key_file = tmp_path / "client.pem", tmp_path / "client.key"
    cert_file.write_bytes(ident.chain_pem)
    key_file.write_bytes(ident.key_pem)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.load_verify_locations(cadata=b.bundle_pem.decode())
    context.load_cert_chain(cert_file, key_file)
    context.set_alpn_protocols(["h2"])

    def handshake() -> bytes:
        with (
            socket.create_connection(("127.0.0.1", b.port), timeout=TIMEOUT) as sock,
            context.wrap_socket(sock, server_hostname="localhost") as tls,
        ):
            der = tls.getpeercert(binary_form=True)
        assert der is not None
        return der

    der = await asyncio.to_thread(handshake)  # a plain socket: close() does not wait for
    # the peer's close_notify (asyncio's SSL transport would, for up to 30 s)
    return x509.load_der_x509_certificate(der)


async def test_serving_certificate_renewal_reaches_new_connections(
    broker: BrokerHarness, tmp_path: Path
) -> None:
    old = await _served_certificate(broker, tmp_path)
    assert spiffe_id_of(old).id_string == f"spiffe://{TRUST_DOMAIN}/broker/server"
    existing = broker.ca()
    await existing.GetBundle(ca_pb2.GetBundleRequest(), timeout=TIMEOUT)

    material = broker.app.serving_material()
    new_serial = x509.load_pem_x509_certificates(material.chain_pem)[0].serial_number
    assert new_serial != old.serial_number
    broker.serving.update(material)

    assert (await _served_certificate(broker, tmp_path)).serial_number == new_serial
    await existing.GetBundle(ca_pb2.GetBundleRequest(), timeout=TIMEOUT)  # old connection
    fresh = await broker.ca().GetBundle(ca_pb2.GetBundleRequest(), timeout=TIMEOUT)
    assert fresh.trust_domain == TRUST_DOMAIN
    # and it stays the new one (the fetch hands out the update once, not forever)
    assert (await _served_certificate(broker, tmp_path)).serial_number == new_serial


# -- 10. bad input changes nothing ----------------------------------------------------------


def _broken_signature_csr() -> bytes:
    der = bytearray(make_csr())
    der[-1] ^= 0x01  # last byte of the ECDSA signature's s
    return bytes(der)


BAD_REQUESTS = {
    "dot-dot": (
        {"spiffe_id": "spiffe://example.org/acme/../web"},
        grpc.StatusCode.INVALID_ARGUMENT,
        ("'..'", "not allowed"),
    ),
    "empty-segment": (
        {"spiffe_id": "spiffe://example.org/acme//web"},
        grpc.StatusCode.INVALID_ARGUMENT,
        ("empty path segments",),
    ),
    "other-trust-domain": (
        {"spiffe_id": "spiffe://other.org/acme/prod/web"},
        grpc.StatusCode.INVALID_ARGUMENT,
        ("'other.org'", "not in 'example.org'"),
    ),
    "too-long": (
        {"spiffe_id": "spiffe://example.org/" + "a" * 2100},
        grpc.StatusCode.INVALID_ARGUMENT,
        ("over the limit of 2048 bytes",),
    ),
    "uppercase-scheme": (
        {"spiffe_id": "SPIFFE://example.org/acme/prod/web"},
        grpc.StatusCode.INVALID_ARGUMENT,
        ("lowercase 'spiffe://'",),
    ),
    "ttl-zero": (
        {"spiffe_id": DEV_WORKLOAD_ID, "ttl_seconds": 0},
        grpc.StatusCode.INVALID_ARGUMENT,
        ("TTL 0s must be positive",),
    ),
    "ttl-negative": (
        {"spiffe_id": DEV_WORKLOAD_ID, "ttl_seconds": -60},
        grpc.StatusCode.INVALID_ARGUMENT,
        ("TTL -1m must be positive",),
    ),
    "ttl-25h": (
        {"spiffe_id": DEV_WORKLOAD_ID, "ttl_seconds": 25 * 3600},
        grpc.StatusCode.PERMISSION_DENIED,
        ("25h", "24h"),
    ),
    "csr-bad-signature": (
        {"spiffe_id": DEV_WORKLOAD_ID, "csr": _broken_signature_csr()},
        grpc.StatusCode.INVALID_ARGUMENT,
        ("CSR signature does not verify",),
    ),
    "csr-truncated": (
        {"spiffe_id": DEV_WORKLOAD_ID, "csr": make_csr()[:60]},
        grpc.StatusCode.INVALID_ARGUMENT,
        ("malformed or truncated",),
    ),
    "csr-garbage": (
        {"spiffe_id": DEV_WORKLOAD_ID, "csr": b"\x00\x01garbage, not a CSR\xff"},
        grpc.StatusCode.INVALID_ARGUMENT,
        ("neither PEM", "nor DER"),
    ),
}


@pytest.mark.parametrize("case", list(BAD_REQUESTS))
async def test_bad_mint_request_is_refused_and_issues_nothing(
    broker: BrokerHarness, case: str
) -> None:
    fields, code, fragments = BAD_REQUESTS[case]
    ca = broker.ca()
    status_before = await ca.GetStatus(ca_pb2.GetStatusRequest(), timeout=TIMEOUT)
    err = await refused(
        ca.MintX509SVID(
            ca_pb2.MintX509SVIDRequest(**fields), metadata=cid(f"bad-{case}"), timeout=TIMEOUT
        )
    )
    details = assert_refusal(err, code, *fragments)
    assert len(details) < 600  # hostile input is not echoed in full

    event = await broker.event_for(f"bad-{case}")
    assert event["outcome"] == code.name != "OK"
    assert event["who"] == OPERATOR_ID
    assert "serial" not in event.get("details", {})
    assert event["error"] == details
    assert len(event["resource"]) <= 2100 + len("...(truncated)")
    assert await ca.GetStatus(ca_pb2.GetStatusRequest(), timeout=TIMEOUT) == status_before


async def test_dns_names_refused_unless_policy_allows_them(broker: BrokerHarness) -> None:
    workload = broker.identity(WORKLOAD_ID)
    err = await refused(
        broker.ca(workload).MintX509SVID(
            ca_pb2.MintX509SVIDRequest(spiffe_id=WORKLOAD_ID, dns_names=["bank.example.com"]),
            metadata=cid("dns-sans"),
            timeout=TIMEOUT,
        )
    )
    assert_refusal(err, grpc.StatusCode.PERMISSION_DENIED, "dns_names patterns")
    assert "serial" not in (await broker.event_for("dns-sans")).get("details", {})


# -- issue 20 finding 1: a broken ledger refuses requests before they act ---------------------


async def test_broken_ledger_refuses_requests_before_they_change_anything(
    broker: BrokerHarness,
) -> None:
    import sqlite3

    from broker import metrics

    ca = broker.ca()

    current = json.loads(broker.app.ca.policy_document().document)

    def policy(ttl: str) -> ca_pb2.SetPolicyRequest:
        rules = [{**current["rules"][0], "x509_max_ttl": ttl}, *current["rules"][1:]]
        return ca_pb2.SetPolicyRequest(document_json=json.dumps({**current, "rules": rules}))

    before = (await ca.SetPolicy(policy("2h"), timeout=TIMEOUT)).version  # a valid change
    alarms: list[str] = []
    broker.app.ledger.add_integrity_hook(alarms.append)
    failures = metrics.AUDIT_INTEGRITY_FAILURES._value.get()
    with sqlite3.connect(broker.tmp_path / "broker.db") as conn:  # cut the last entry off
        conn.execute("DROP TRIGGER audit_no_delete")
        conn.execute("DELETE FROM audit WHERE seq = (SELECT MAX(seq) FROM audit)")
    rows = len(await broker.events())

    # the first request after the cut learns it when its event is refused ...
    err = await refused(ca.GetStatus(ca_pb2.GetStatusRequest(), timeout=TIMEOUT))
    assert_refusal(err, grpc.StatusCode.FAILED_PRECONDITION, "audit ledger", "integrity")
    assert alarms and "cut off" in alarms[0]
    assert metrics.AUDIT_INTEGRITY_FAILURES._value.get() == failures + 1
    # ... and from then on requests are refused before the servicer acts
    err = await refused(ca.SetPolicy(policy("3h"), timeout=TIMEOUT))
    assert_refusal(err, grpc.StatusCode.FAILED_PRECONDITION, "audit ledger")
    assert broker.app.ca.policy_document().version == before
    assert "3h" not in broker.app.ca.policy_document().document
    verification = await broker.app.ledger.verify()
    assert not verification.intact and "cut off" in verification.reason
    assert len(await broker.events()) == rows  # nothing chained onto the cut tail
