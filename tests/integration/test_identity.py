"""Workload identity through the real gRPC pipeline (in-process server, real TLS): attestation
on the server-authenticated port, renewal and the denylist over mTLS, entry minting only by the
parent agent, join-token refusals, and what the audit ledger records."""

from __future__ import annotations

import datetime as dt
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from broker.api._proto import ca_pb2, ca_pb2_grpc, identity_pb2, identity_pb2_grpc
from broker.api.server.serving import AppServer, serve_application
from broker.app import Application
from broker.policy import Caller
from broker.storage.factory import open_storage
from ca.clock import FakeClock
from ca.keys import SoftwareBackend
from tests.integration.conftest import OPERATOR_ID, TRUST_DOMAIN, Identity, make_config

AGENT_ID = f"spiffe://{TRUST_DOMAIN}/agents/node1"
WEB_ID = f"spiffe://{TRUST_DOMAIN}/acme/prod/web"
# Entries here are not about production: an operator creates dev ones alone (an entry for a prod
# ID needs a second operator, tests/integration/test_identity_issuance.py).
DEV_WEB_ID = f"spiffe://{TRUST_DOMAIN}/acme/dev/web"


@dataclass
class Served:
    app: Application
    served: AppServer
    clock: FakeClock
    channels: list[grpc.aio.Channel]

    @property
    def bundle(self) -> bytes:
        return self.app.ca.trust_bundle_pem()

    def _options(self) -> list[tuple[str, Any]]:
        return [("grpc.ssl_target_name_override", "localhost")]

    def attest_stub(self) -> Any:
        creds = grpc.ssl_channel_credentials(root_certificates=self.bundle)
        channel = grpc.aio.secure_channel(
            f"127.0.0.1:{self.served.attest_port}", creds, options=self._options()
        )
        self.channels.append(channel)
        return identity_pb2_grpc.WorkloadIdentityStub(channel)

    def stub(self, chain_pem: bytes, key_pem: bytes) -> Any:
        creds = grpc.ssl_channel_credentials(
            root_certificates=self.bundle, private_key=key_pem, certificate_chain=chain_pem
        )
        channel = grpc.aio.secure_channel(
            f"127.0.0.1:{self.served.port}", creds, options=self._options()
        )
        self.channels.append(channel)
        return identity_pb2_grpc.WorkloadIdentityStub(channel)

    def operator(self) -> Any:
        key = ec.generate_private_key(ec.SECP256R1())
        from ca.spiffeid import SpiffeId

        leaf, issuer = self.app.ca.issue_internal(
            SpiffeId.parse(OPERATOR_ID), key.public_key(), dt.timedelta(hours=1)
        )
        ident = Identity(OPERATOR_ID, _chain(leaf, issuer), _key_pem(key), leaf.serial_number)
        return self.stub(ident.chain_pem, ident.key_pem)

    async def events(self) -> list[dict[str, Any]]:
        records = await self.app.storage.read_audit(after_seq=0, limit=100_000)
        return [json.loads(r.event) for r in records]


def _chain(*certs: x509.Certificate) -> bytes:
    return b"".join(c.public_bytes(serialization.Encoding.PEM) for c in certs)


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def _csr(key: ec.EllipticCurvePrivateKey) -> bytes:
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([]))
        .sign(key, hashes.SHA256())
    )
    return csr.public_bytes(serialization.Encoding.DER)


def _pem_chain(chain_der: Any) -> bytes:
    return _chain(*(x509.load_der_x509_certificate(c) for c in chain_der))


@pytest.fixture
async def broker(tmp_path: Path) -> AsyncIterator[Served]:
    config = make_config(tmp_path)
    storage = await open_storage(config.storage.resolved_dsn())
    clock = FakeClock(dt.datetime.now(dt.UTC))
    app = Application(config, SoftwareBackend(), storage, clock)
    await app.start()
    served = await serve_application(app)
    assert served.attest_port, "the attestation port must be up"
    state = Served(app, served, clock, [])
    try:
        yield state
    finally:
        for channel in state.channels:
            await channel.close()
        await served.server.stop(grace=None)
        await app.close()


async def _attested(broker: Served) -> tuple[Any, bytes, bytes, Any]:
    """Create a token as operator, attest with it; returns (response, chain, key, stub)."""
    op = broker.operator()
    token = await op.CreateJoinToken(identity_pb2.CreateJoinTokenRequest(spiffe_id=AGENT_ID))
    key = ec.generate_private_key(ec.SECP256R1())
    response = await broker.attest_stub().Attest(
        identity_pb2.AttestRequest(join_token=token.token, csr=_csr(key))
    )
    chain = _pem_chain(response.cert_chain)
    return response, chain, _key_pem(key), broker.stub(chain, _key_pem(key))


async def test_join_token_attestation_issues_an_svid_for_the_agents_key(broker: Served) -> None:
    _, chain, key_pem, _ = await _attested(broker)
    leaf = x509.load_pem_x509_certificates(chain)[0]
    san = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.UniformResourceIdentifier) == [AGENT_ID]
    key = serialization.load_pem_private_key(key_pem, None)
    assert leaf.public_key() == key.public_key()  # type: ignore[union-attr]
    events = await broker.events()
    attest = [e for e in events if e["what"] == "agent.attest"][-1]
    assert attest["decision"] == "allow" and attest["who"].startswith("bootstrap:")
    assert attest["details"]["spiffe_id"] == AGENT_ID
    assert attest["resource"].startswith("join-token:sha256:")


async def test_a_reused_token_is_refused_and_changes_nothing(broker: Served) -> None:
    op = broker.operator()
    token = await op.CreateJoinToken(identity_pb2.CreateJoinTokenRequest(spiffe_id=AGENT_ID))
    stub = broker.attest_stub()
    csr = _csr(ec.generate_private_key(ec.SECP256R1()))
    await stub.Attest(identity_pb2.AttestRequest(join_token=token.token, csr=csr))
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await stub.Attest(identity_pb2.AttestRequest(join_token=token.token, csr=csr))
    assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
    events = await broker.events()
    denied = [e for e in events if e["what"] == "agent.attest" and e["outcome"] != "OK"]
    assert len(denied) == 1 and "details" not in denied[0]
    assert token.token not in json.dumps(events)  # only a hash of the token is logged


async def test_expired_and_forged_tokens_are_refused(broker: Served) -> None:
    op = broker.operator()
    token = await op.CreateJoinToken(
        identity_pb2.CreateJoinTokenRequest(spiffe_id=AGENT_ID, ttl_seconds=60)
    )
    broker.clock.advance(seconds=61)
    stub = broker.attest_stub()
    csr = _csr(ec.generate_private_key(ec.SECP256R1()))
    for credential in (token.token, token.token[:-2] + "xx", "bjt_" + "A" * 43):
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await stub.Attest(identity_pb2.AttestRequest(join_token=credential, csr=csr))
        assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
        assert "unknown, expired or already used" in (err.value.details() or "")


async def test_only_attest_is_admitted_without_a_client_certificate(broker: Served) -> None:
    stub = broker.attest_stub()
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await stub.CreateJoinToken(identity_pb2.CreateJoinTokenRequest(spiffe_id=AGENT_ID))
    assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await stub.SyncAgent(identity_pb2.SyncAgentRequest())
    assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED


async def test_an_agent_cannot_create_tokens_or_entries(broker: Served) -> None:
    _, _, _, agent = await _attested(broker)
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await agent.CreateJoinToken(identity_pb2.CreateJoinTokenRequest(spiffe_id=AGENT_ID))
    assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await agent.CreateEntry(
            identity_pb2.Entry(spiffe_id=WEB_ID, parent_id=AGENT_ID, selectors=["unix:uid:1"])
        )
    assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED


async def test_agents_mint_only_for_their_own_entries(broker: Served) -> None:
    op = broker.operator()
    mine = await op.CreateEntry(
        identity_pb2.Entry(spiffe_id=DEV_WEB_ID, parent_id=AGENT_ID, selectors=["unix:uid:1000"])
    )
    theirs = await op.CreateEntry(
        identity_pb2.Entry(
            spiffe_id=f"spiffe://{TRUST_DOMAIN}/acme/dev/db",
            parent_id=f"spiffe://{TRUST_DOMAIN}/agents/node2",
            selectors=["unix:uid:1000"],
            x509_ttl_seconds=300,
        )
    )
    _, _, _, agent = await _attested(broker)
    sync = await agent.SyncAgent(identity_pb2.SyncAgentRequest())
    assert [e.id for e in sync.entries] == [mine.id]
    assert sync.trust_domain == TRUST_DOMAIN and sync.bundle_sequence >= 1
    csr = _csr(ec.generate_private_key(ec.SECP256R1()))
    svid = await agent.MintEntryX509(identity_pb2.MintEntryX509Request(entry_id=mine.id, csr=csr))
    assert svid.spiffe_id == DEV_WEB_ID
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await agent.MintEntryX509(identity_pb2.MintEntryX509Request(entry_id=theirs.id, csr=csr))
    assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await agent.MintEntryJWT(
            identity_pb2.MintEntryJWTRequest(entry_id=theirs.id, audience=["x"])
        )
    assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED
    jwt_svid = await agent.MintEntryJWT(
        identity_pb2.MintEntryJWTRequest(entry_id=mine.id, audience=["db"])
    )
    assert jwt_svid.spiffe_id == DEV_WEB_ID and jwt_svid.token.count(".") == 2


async def test_entry_ttls_are_bounded_by_ca_policy(broker: Served) -> None:
    """Refused when created (issue 15: an entry that can never be minted is not stored), and
    still bounded when minted after the policy changed."""
    op = broker.operator()
    before = await broker.app.storage.identity().list_entries(None)
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await op.CreateEntry(
            identity_pb2.Entry(
                spiffe_id=DEV_WEB_ID,
                parent_id=AGENT_ID,
                selectors=["unix:uid:1000"],
                x509_ttl_seconds=30 * 24 * 3600,
            )
        )
    assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert "720h" in (err.value.details() or "")  # the policy's own message
    assert await broker.app.storage.identity().list_entries(None) == before

    entry = await op.CreateEntry(
        identity_pb2.Entry(
            spiffe_id=DEV_WEB_ID,
            parent_id=AGENT_ID,
            selectors=["unix:uid:1000"],
            x509_ttl_seconds=2 * 3600,
        )
    )
    current = json.loads(broker.app.ca.policy_document().document)
    rules = [{**rule, "x509_max_ttl": "1h"} for rule in current["rules"]]
    await broker.app.ca.set_policy(
        json.dumps({**current, "rules": rules}), Caller(OPERATOR_ID, True, {})
    )
    _, _, _, agent = await _attested(broker)
    csr = _csr(ec.generate_private_key(ec.SECP256R1()))
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await agent.MintEntryX509(identity_pb2.MintEntryX509Request(entry_id=entry.id, csr=csr))
    assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED


async def test_entries_the_policy_forbids_duplicates_and_tiny_ttls_are_refused(
    broker: Served,
) -> None:
    """Issue 15: `--dns` the policy forbids, an identical second entry and a few-second TTL
    are refused at create with the reason, and nothing is stored."""
    op = broker.operator()
    base = dict(spiffe_id=DEV_WEB_ID, parent_id=AGENT_ID, selectors=["unix:uid:1000"])
    first = await op.CreateEntry(identity_pb2.Entry(**base))
    stored = await broker.app.storage.identity().list_entries(None)
    cases = [
        (dict(dns_names=["web.internal"]), grpc.StatusCode.PERMISSION_DENIED, "web.internal"),
        ({}, grpc.StatusCode.ALREADY_EXISTS, first.id),
        (dict(selectors=["unix:uid:1000"]), grpc.StatusCode.ALREADY_EXISTS, first.id),
        (dict(x509_ttl_seconds=4), grpc.StatusCode.INVALID_ARGUMENT, "at least 30s"),
        (dict(jwt_ttl_seconds=1), grpc.StatusCode.INVALID_ARGUMENT, "at least 30s"),
    ]
    for change, code, text in cases:
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await op.CreateEntry(identity_pb2.Entry(**{**base, **change}))
        assert err.value.code() == code, change
        assert text in (err.value.details() or ""), (change, err.value.details())
    assert await broker.app.storage.identity().list_entries(None) == stored
    # another selector set is another entry
    assert (
        await op.CreateEntry(identity_pb2.Entry(**{**base, "selectors": ["unix:uid:1001"]}))
    ).id != first.id


async def test_renewal_over_mtls_then_the_denylist_stops_it(broker: Served) -> None:
    response, _, _, agent = await _attested(broker)
    # Before any denial the agent may self-mint its own ID through the CA API.
    ca = ca_pb2_grpc.CertificateAuthorityStub(broker.channels[-1])  # the agent's channel
    assert (await ca.MintX509SVID(ca_pb2.MintX509SVIDRequest(spiffe_id=AGENT_ID))).spiffe_id
    renewed = await agent.RenewAgent(
        identity_pb2.RenewAgentRequest(csr=_csr(ec.generate_private_key(ec.SECP256R1())))
    )
    assert renewed.spiffe_id == AGENT_ID and renewed.serial != response.serial
    op = broker.operator()
    denied = await op.DenySVID(identity_pb2.DenySVIDRequest(target=response.serial))
    assert denied.kind == "serial"
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await agent.RenewAgent(
            identity_pb2.RenewAgentRequest(csr=_csr(ec.generate_private_key(ec.SECP256R1())))
        )
    assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await agent.SyncAgent(identity_pb2.SyncAgentRequest())
    assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED
    # Nor can the denied certificate "renew" by self-minting through the CA API.
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await ca.MintX509SVID(ca_pb2.MintX509SVIDRequest(spiffe_id=AGENT_ID))
    assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert "denylist" in (err.value.details() or "")
    # Deny the ID: a fresh token for it no longer attests either.
    await op.DenySVID(identity_pb2.DenySVIDRequest(target=AGENT_ID))
    token = await op.CreateJoinToken(identity_pb2.CreateJoinTokenRequest(spiffe_id=AGENT_ID))
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await broker.attest_stub().Attest(
            identity_pb2.AttestRequest(
                join_token=token.token, csr=_csr(ec.generate_private_key(ec.SECP256R1()))
            )
        )
    assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED


async def test_bad_entries_are_refused(broker: Served) -> None:
    op = broker.operator()
    for entry in (
        identity_pb2.Entry(spiffe_id=WEB_ID, parent_id=AGENT_ID, selectors=[]),
        identity_pb2.Entry(spiffe_id=WEB_ID, parent_id=AGENT_ID, selectors=["k8s:ns:x"]),
        identity_pb2.Entry(spiffe_id=WEB_ID, parent_id=AGENT_ID, selectors=["unix:uid:abc"]),
        identity_pb2.Entry(
            spiffe_id="spiffe://other.org/x", parent_id=AGENT_ID, selectors=["unix:uid:1"]
        ),
        identity_pb2.Entry(
            spiffe_id=f"spiffe://{TRUST_DOMAIN}/broker/server",
            parent_id=AGENT_ID,
            selectors=["unix:uid:1"],
        ),
    ):
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await op.CreateEntry(entry)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    listed = await op.ListEntries(identity_pb2.ListEntriesRequest())
    assert list(listed.entries) == []


async def test_jwt_attestation_through_the_rpc(broker: Served) -> None:
    import jwt as pyjwt
    from cryptography.hazmat.primitives.asymmetric import rsa

    issuer_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    jwk = json.loads(pyjwt.algorithms.RSAAlgorithm.to_jwk(issuer_key.public_key()))
    jwk["kid"] = "k1"
    op = broker.operator()
    await op.AddAttestor(
        identity_pb2.Attestor(
            name="ci",
            issuer="https://ci.example",
            audience="broker",
            jwks_json=json.dumps({"keys": [jwk]}),
            template="spiffe://{td}/ci/{repository}",
        )
    )
    now = int(dt.datetime.now(dt.UTC).timestamp())

    def token(**over: Any) -> str:
        claims = {"iss": "https://ci.example", "aud": "broker", "exp": now + 300}
        claims.update(repository="shop", **over)
        return pyjwt.encode(claims, issuer_key, algorithm="RS256", headers={"kid": "k1"})

    stub = broker.attest_stub()
    csr = _csr(ec.generate_private_key(ec.SECP256R1()))
    svid = await stub.Attest(identity_pb2.AttestRequest(jwt=token(), csr=csr))
    assert svid.spiffe_id == f"spiffe://{TRUST_DOMAIN}/ci/shop"
    for bad in (token(aud="other"), token(iss="https://evil.example"), token(exp=now - 5)):
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await stub.Attest(identity_pb2.AttestRequest(jwt=bad, csr=csr))
        assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
    events = [e for e in await broker.events() if e["what"] == "agent.attest"]
    assert [e["outcome"] for e in events] == ["OK"] + ["UNAUTHENTICATED"] * 3
    assert all(e["resource"].startswith("jwt:sha256:") for e in events)
