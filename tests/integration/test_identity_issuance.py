"""Identity issuance attacks over real mTLS, in process (issue 20 findings 3, 4, 7, 13, 14 and
issue 11 item 5), each repeated against the broker and answered with a refusal that issued
nothing:

- a denied entry ID gets no SVIDs through its agent;
- an operator cannot become a production workload without a second operator, neither directly
  nor by proxy (a registration entry for an agent they attested, an attestor with their own
  keys), and an SVID an operator minted reads as that operator for the two-person rule;
- a self-minted chain ends with its root and dies with it when the root's serial is denied;
- no SVID (nor the operator certificate) is valid for more than 24 h, backdate included;
- a JWT attestation token works once;
- nobody mints an operator's (or the broker's own) identity.
"""

from __future__ import annotations

import datetime as dt
import json
import secrets as random
from pathlib import Path
from typing import Any

import grpc
import jwt as pyjwt
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from broker.api._proto import (
    access_pb2,
    access_pb2_grpc,
    ca_pb2,
    identity_pb2,
    identity_pb2_grpc,
    secrets_pb2,
    secrets_pb2_grpc,
)
from broker.attestation import attestor_resource
from broker.config import CAConfig, Config, KeysConfig, ServerConfig, StorageConfig
from broker.errors import InvalidArgument
from ca.x509svid import Lineage

from .conftest import (
    CORRELATION_HEADER,
    OPERATOR_ID,
    TRUST_DOMAIN,
    BrokerFactory,
    BrokerHarness,
    Identity,
)

BOB = f"spiffe://{TRUST_DOMAIN}/broker/operator/bob"
AGENT_ID = f"spiffe://{TRUST_DOMAIN}/agents/node1"
DEV_WORKLOAD = f"spiffe://{TRUST_DOMAIN}/default/dev/dwl"
WEB = f"spiffe://{TRUST_DOMAIN}/default/prod/web"
WEB_REF = "secret://web/prod/pii"
DAY = dt.timedelta(hours=24)


@pytest.fixture
async def broker(broker_factory: BrokerFactory) -> BrokerHarness:
    return await broker_factory(operators=(OPERATOR_ID, BOB))


def cid(name: str) -> tuple[tuple[str, str], ...]:
    return ((CORRELATION_HEADER, name),)


async def refused(call: Any) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await call
    return info.value


def identity_stub(broker: BrokerHarness, who: Identity | None = None) -> Any:
    return identity_pb2_grpc.WorkloadIdentityStub(broker.channel(who or broker.operator))


def access_stub(broker: BrokerHarness, who: Identity | None = None) -> Any:
    return access_pb2_grpc.AccessStub(broker.channel(who or broker.operator))


def secrets_stub(broker: BrokerHarness, who: Identity | None = None) -> Any:
    return secrets_pb2_grpc.SecretsStub(broker.channel(who or broker.operator))


def _csr(key: ec.EllipticCurvePrivateKey) -> bytes:
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([]))
        .sign(key, hashes.SHA256())
    )
    return csr.public_bytes(serialization.Encoding.DER)


def as_identity(response: Any) -> Identity:
    """The SVID a MintX509SVID response returned (broker-generated key) as an mTLS identity."""
    certs = [x509.load_der_x509_certificate(c) for c in response.cert_chain]
    key = serialization.load_der_private_key(response.private_key, None)
    key_pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    chain = b"".join(c.public_bytes(serialization.Encoding.PEM) for c in certs)
    return Identity(response.spiffe_id, chain, key_pem, certs[0].serial_number)


def leaf(response: Any) -> x509.Certificate:
    return x509.load_der_x509_certificate(response.cert_chain[0])


def jwt_exp(token: str) -> dt.datetime:
    claims = pyjwt.decode(token, options={"verify_signature": False})
    return dt.datetime.fromtimestamp(claims["exp"], dt.UTC)


async def approve(broker: BrokerHarness, requester: Identity, action: str, resource: str) -> str:
    """`requester` asks, Bob (the second operator) approves; returns the approval id."""
    request = await access_stub(broker, requester).RequestApproval(
        access_pb2.RequestApprovalRequest(
            action=action, resource=resource, justification="INC-7 restore web"
        )
    )
    bob = broker.identity(BOB)
    await access_stub(broker, bob).Approve(access_pb2.ApproveRequest(id=request.id))
    return str(request.id)


async def issued_serials(broker: BrokerHarness) -> list[str]:
    """Every serial the ledger says was issued (details.serial of allowed calls)."""
    return [
        e["details"]["serial"]
        for e in await broker.events()
        if e.get("details", {}).get("serial") and e["outcome"] == "OK"
    ]


# -- finding 3: the entry's own ID on the denylist ---------------------------------------------


async def test_a_denied_entry_id_gets_no_svid_through_its_agent(broker: BrokerHarness) -> None:
    op = identity_stub(broker)
    entry = await op.CreateEntry(
        identity_pb2.Entry(spiffe_id=DEV_WORKLOAD, parent_id=AGENT_ID, selectors=["unix:uid:1"])
    )
    agent = identity_stub(broker, broker.identity(AGENT_ID))
    key = ec.generate_private_key(ec.SECP256R1())
    first = await agent.MintEntryX509(
        identity_pb2.MintEntryX509Request(entry_id=entry.id, csr=_csr(key))
    )
    assert first.spiffe_id == DEV_WORKLOAD
    await op.DenySVID(identity_pb2.DenySVIDRequest(target=DEV_WORKLOAD))
    before = await issued_serials(broker)

    err = await refused(
        agent.MintEntryX509(
            identity_pb2.MintEntryX509Request(entry_id=entry.id, csr=_csr(key)),
            metadata=cid("x509-after-deny"),
        )
    )
    assert err.code() == grpc.StatusCode.PERMISSION_DENIED
    assert "denylist" in (err.details() or "")
    err = await refused(
        agent.MintEntryJWT(
            identity_pb2.MintEntryJWTRequest(entry_id=entry.id, audience=["db"]),
            metadata=cid("jwt-after-deny"),
        )
    )
    assert err.code() == grpc.StatusCode.PERMISSION_DENIED
    for name in ("x509-after-deny", "jwt-after-deny"):
        event = await broker.event_for(name)
        assert event["outcome"] == "PERMISSION_DENIED"
        assert "serial" not in event.get("details", {})
        assert "kid" not in event.get("details", {})
    assert await issued_serials(broker) == before
    # The agent itself is not denied: its sync still works.
    assert [e.id for e in (await agent.SyncAgent(identity_pb2.SyncAgentRequest())).entries] == [
        entry.id
    ]


# -- finding 4: an operator becoming a production workload -------------------------------------


async def put_web_pii(broker: BrokerHarness) -> bytes:
    value = random.token_hex(16).encode()
    await secrets_stub(broker).Put(
        secrets_pb2.PutSecretRequest(
            reference=WEB_REF,
            value=value,
            owner="web",
            classification="pii",
            rotation_period_seconds=90 * 86400,
        )
    )
    return value


async def test_entry_ids_cannot_be_probed_by_an_agent(broker: BrokerHarness) -> None:
    """An agent asking for an entry that does not exist is refused exactly as for another
    agent's entry (same code, same message, both audited as refusals); only an operator learns
    that it is absent. Issue 17: the rule databases and secrets follow."""
    op = identity_stub(broker)
    other = await op.CreateEntry(
        identity_pb2.Entry(
            spiffe_id=DEV_WORKLOAD, parent_id=f"{AGENT_ID}-other", selectors=["unix:uid:1"]
        )
    )
    agent = identity_stub(broker, broker.identity(AGENT_ID))
    key = ec.generate_private_key(ec.SECP256R1())
    before = await issued_serials(broker)

    answers = []
    for name, entry_id in (("probe-other", other.id), ("probe-absent", "no-such-entry-id")):
        err = await refused(
            agent.MintEntryX509(
                identity_pb2.MintEntryX509Request(entry_id=entry_id, csr=_csr(key)),
                metadata=cid(name),
            )
        )
        answers.append((err.code(), err.details()))
        event = await broker.event_for(name)
        assert event["outcome"] == "PERMISSION_DENIED"
        assert event["decision"] == "deny"
    assert answers[0] == answers[1]
    assert answers[0][0] == grpc.StatusCode.PERMISSION_DENIED
    err = await refused(
        agent.MintEntryJWT(
            identity_pb2.MintEntryJWTRequest(entry_id="no-such-entry-id", audience=["db"])
        )
    )
    assert (err.code(), err.details()) == answers[0]
    assert await issued_serials(broker) == before

    err = await refused(
        op.MintEntryX509(identity_pb2.MintEntryX509Request(entry_id="no-such-entry-id"))
    )
    assert err.code() == grpc.StatusCode.NOT_FOUND


async def test_an_operator_cannot_mint_a_prod_identity_alone(broker: BrokerHarness) -> None:
    await put_web_pii(broker)
    ca = broker.ca()
    before = await issued_serials(broker)
    err = await refused(
        ca.MintX509SVID(ca_pb2.MintX509SVIDRequest(spiffe_id=WEB), metadata=cid("mint-web"))
    )
    assert err.code() == grpc.StatusCode.PERMISSION_DENIED
    assert "second operator" in (err.details() or "")
    event = await broker.event_for("mint-web")
    assert (event["decision"], event["rule"], event["resource"]) == ("deny", "two-person", WEB)
    err = await refused(ca.MintJWTSVID(ca_pb2.MintJWTSVIDRequest(spiffe_id=WEB, audience=["x"])))
    assert err.code() == grpc.StatusCode.PERMISSION_DENIED
    assert await issued_serials(broker) == before
    # Nor by proxy: a join token bound to the prod ID would hand its holder that identity.
    op = identity_stub(broker)
    err = await refused(
        op.CreateJoinToken(
            identity_pb2.CreateJoinTokenRequest(spiffe_id=WEB), metadata=cid("token-web")
        )
    )
    assert err.code() == grpc.StatusCode.PERMISSION_DENIED
    assert "second operator" in (err.details() or "")
    assert "token" not in (await broker.event_for("token-web")).get("details", {})
    approval = await approve(broker, broker.operator, "token.create", WEB)
    token = await op.CreateJoinToken(
        identity_pb2.CreateJoinTokenRequest(spiffe_id=WEB), metadata=cid("token-approved")
    )
    assert token.spiffe_id == WEB
    assert (await broker.event_for("token-approved"))["flags"] == {"approval": approval}
    # Non-production identities stay an operator's to mint alone.
    assert (await op.CreateJoinToken(identity_pb2.CreateJoinTokenRequest(spiffe_id=AGENT_ID))).token
    dev = await ca.MintX509SVID(ca_pb2.MintX509SVIDRequest(spiffe_id=DEV_WORKLOAD))
    assert dev.spiffe_id == DEV_WORKLOAD
    assert Lineage.of(leaf(dev)) == Lineage(
        minted_by=OPERATOR_ID, ancestors=(format(broker.operator.serial, "x"),)
    )


async def test_an_operator_minted_svid_reads_as_the_operator(broker: BrokerHarness) -> None:
    """The attack of finding 4, repeated: mint web's identity, read web's prod pii secret."""
    value = await put_web_pii(broker)
    approval = await approve(broker, broker.operator, "svid.mint", WEB)
    minted = await broker.ca().MintX509SVID(
        ca_pb2.MintX509SVIDRequest(spiffe_id=WEB), metadata=cid("mint-approved")
    )
    event = await broker.event_for("mint-approved")
    assert event["flags"] == {"approval": approval}
    assert Lineage.of(leaf(minted)).minted_by == OPERATOR_ID  # type: ignore[union-attr]
    fake_web = as_identity(minted)

    # The real web workload reads its secret; the operator-minted web does not.
    assert (
        await secrets_stub(broker, broker.identity(WEB)).Get(
            secrets_pb2.GetSecretRequest(reference=WEB_REF)
        )
    ).value == value
    err = await refused(
        secrets_stub(broker, fake_web).Get(
            secrets_pb2.GetSecretRequest(reference=WEB_REF), metadata=cid("read-minted")
        )
    )
    assert err.code() == grpc.StatusCode.PERMISSION_DENIED
    event = await broker.event_for("read-minted")
    assert (event["who"], event["rule"], event["minted_by"]) == (WEB, "two-person", OPERATOR_ID)
    # Its own approval request, approved by the operator who minted it, does not count.
    request = await access_stub(broker, fake_web).RequestApproval(
        access_pb2.RequestApprovalRequest(
            action="secrets.get", resource=WEB_REF, justification="looks legit"
        )
    )
    await access_stub(broker).Approve(access_pb2.ApproveRequest(id=request.id))
    err = await refused(
        secrets_stub(broker, fake_web).Get(secrets_pb2.GetSecretRequest(reference=WEB_REF))
    )
    assert err.code() == grpc.StatusCode.PERMISSION_DENIED
    # Nor does self-minting launder the mark: the child is the operator's too.
    child = await broker.ca(fake_web).MintX509SVID(ca_pb2.MintX509SVIDRequest(spiffe_id=WEB))
    assert Lineage.of(leaf(child)).minted_by == OPERATOR_ID  # type: ignore[union-attr]
    err = await refused(
        secrets_stub(broker, as_identity(child)).Get(
            secrets_pb2.GetSecretRequest(reference=WEB_REF)
        )
    )
    assert err.code() == grpc.StatusCode.PERMISSION_DENIED
    # Exactly as for the operator itself: with the operator's approval by a second person the
    # read goes through (once).
    read = await approve(broker, broker.operator, "secrets.get", WEB_REF)
    response = await secrets_stub(broker, fake_web).Get(
        secrets_pb2.GetSecretRequest(reference=WEB_REF), metadata=cid("read-approved")
    )
    assert response.value == value
    event = await broker.event_for("read-approved")
    assert (event["flags"], event["minted_by"]) == ({"approval": read}, OPERATOR_ID)
    err = await refused(
        secrets_stub(broker, fake_web).Get(secrets_pb2.GetSecretRequest(reference=WEB_REF))
    )
    assert err.code() == grpc.StatusCode.PERMISSION_DENIED
    # A minted SVID is no operator: it cannot approve.
    pending = await access_stub(broker).RequestApproval(
        access_pb2.RequestApprovalRequest(action="secrets.get", resource=WEB_REF, justification="x")
    )
    err = await refused(
        access_stub(broker, fake_web).Approve(access_pb2.ApproveRequest(id=pending.id))
    )
    assert err.code() == grpc.StatusCode.PERMISSION_DENIED


# -- finding 4, by proxy: an entry for an agent the operator controls, an attestor with own keys --


def agent_identity(response: Any, key: ec.EllipticCurvePrivateKey) -> Identity:
    """The SVID an Attest response returned for `key` (the agent's CSR) as an mTLS identity."""
    certs = [x509.load_der_x509_certificate(c) for c in response.cert_chain]
    key_pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    chain = b"".join(c.public_bytes(serialization.Encoding.PEM) for c in certs)
    return Identity(response.spiffe_id, chain, key_pem, certs[0].serial_number)


async def own_agent(broker: BrokerHarness) -> Identity:
    """What the operator can do alone: a join token for a non-prod agent ID, attested."""
    token = await identity_stub(broker).CreateJoinToken(
        identity_pb2.CreateJoinTokenRequest(spiffe_id=AGENT_ID)
    )
    key = ec.generate_private_key(ec.SECP256R1())
    svid = await identity_stub(broker).Attest(
        identity_pb2.AttestRequest(join_token=token.token, csr=_csr(key))
    )
    assert svid.spiffe_id == AGENT_ID
    return agent_identity(svid, key)


async def test_an_operator_cannot_hand_a_prod_identity_to_their_agent_alone(
    broker: BrokerHarness,
) -> None:
    op = identity_stub(broker)
    agent = identity_stub(broker, await own_agent(broker))
    before = await issued_serials(broker)
    web_entry = identity_pb2.Entry(spiffe_id=WEB, parent_id=AGENT_ID, selectors=["unix:uid:1000"])

    err = await refused(op.CreateEntry(web_entry, metadata=cid("entry-web")))
    assert err.code() == grpc.StatusCode.PERMISSION_DENIED
    details = err.details() or ""
    assert "second operator" in details
    assert f"broker approval request --action entry.admin --resource {WEB}" in details
    event = await broker.event_for("entry-web")
    assert (event["decision"], event["rule"], event["resource"]) == ("deny", "two-person", WEB)
    assert "entry_id" not in event.get("details", {})
    # Nothing stored, so the agent has nothing to serve or mint.
    assert list((await op.ListEntries(identity_pb2.ListEntriesRequest())).entries) == []
    assert list((await agent.SyncAgent(identity_pb2.SyncAgentRequest())).entries) == []
    assert await issued_serials(broker) == before

    # The operator's own approval request does not count until a second operator approves it.
    pending = await access_stub(broker).RequestApproval(
        access_pb2.RequestApprovalRequest(
            action="entry.admin", resource=WEB, justification="node1 serves web"
        )
    )
    err = await refused(access_stub(broker).Approve(access_pb2.ApproveRequest(id=pending.id)))
    assert err.code() == grpc.StatusCode.PERMISSION_DENIED
    err = await refused(op.CreateEntry(web_entry))
    assert err.code() == grpc.StatusCode.PERMISSION_DENIED
    assert list((await op.ListEntries(identity_pb2.ListEntriesRequest())).entries) == []

    # With Bob's approval: allowed, once.
    await access_stub(broker, broker.identity(BOB)).Approve(
        access_pb2.ApproveRequest(id=pending.id)
    )
    entry = await op.CreateEntry(web_entry, metadata=cid("entry-approved"))
    event = await broker.event_for("entry-approved")
    assert event["flags"] == {"approval": pending.id}
    assert event["details"] == {"parent_id": AGENT_ID, "entry_id": entry.id}
    synced = (await agent.SyncAgent(identity_pb2.SyncAgentRequest())).entries
    assert [e.id for e in synced] == [entry.id]
    key = ec.generate_private_key(ec.SECP256R1())
    minted = await agent.MintEntryX509(
        identity_pb2.MintEntryX509Request(entry_id=entry.id, csr=_csr(key))
    )
    assert minted.spiffe_id == WEB
    err = await refused(op.CreateEntry(web_entry, metadata=cid("entry-again")))
    assert err.code() == grpc.StatusCode.PERMISSION_DENIED
    assert (await broker.event_for("entry-again"))["rule"] == "two-person"
    assert [e.id for e in (await op.ListEntries(identity_pb2.ListEntriesRequest())).entries] == [
        entry.id
    ]
    # Non-production entries stay an operator's to create alone.
    dev = await op.CreateEntry(
        identity_pb2.Entry(spiffe_id=DEV_WORKLOAD, parent_id=AGENT_ID, selectors=["unix:uid:1"])
    )
    assert dev.spiffe_id == DEV_WORKLOAD


async def test_an_approval_another_worker_used_first_stores_no_entry(
    broker: BrokerHarness, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Single use across workers: this worker still holds the approval in memory while another
    one has used it. The entry takes effect once stored, so the use must be settled before the
    entry is stored, not after (when only the answer could be withheld)."""
    op = identity_stub(broker)
    approval = await approve(broker, broker.operator, "entry.admin", WEB)

    async def not_yet() -> None:  # this worker has not picked up the other's use yet
        return None

    monkeypatch.setattr(broker.app.access, "sync", not_yet)
    other_worker = broker.app.storage.access()
    assert await other_worker.consume_approval(approval, broker.clock.now())
    err = await refused(
        op.CreateEntry(
            identity_pb2.Entry(spiffe_id=WEB, parent_id=AGENT_ID, selectors=["unix:uid:1000"]),
            metadata=cid("entry-raced"),
        )
    )
    assert err.code() == grpc.StatusCode.PERMISSION_DENIED
    assert "already used" in (err.details() or "")
    assert list((await op.ListEntries(identity_pb2.ListEntriesRequest())).entries) == []
    event = await broker.event_for("entry-raced")
    assert event["outcome"] == "PERMISSION_DENIED"
    assert "entry_id" not in event.get("details", {})


async def test_an_operator_cannot_add_a_prod_capable_attestor_alone(
    broker: BrokerHarness,
) -> None:
    """Their own signing keys and a template whose environment is a claim: any prod identity
    for a token they sign themselves."""
    op = identity_stub(broker)
    own_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    jwk = json.loads(pyjwt.algorithms.RSAAlgorithm.to_jwk(own_key.public_key()))
    jwk["kid"] = "k1"
    jwks = json.dumps({"keys": [jwk]})
    template = "spiffe://{td}/default/{env}/{svc}"
    definition = identity_pb2.Attestor(
        name="mine", issuer="https://mine.example", audience="broker", jwks_json=jwks,
        template=template,
    )  # fmt: skip
    resource = attestor_resource(
        "mine", "https://mine.example", "broker", jwks, template, ("RS256", "ES256")
    )
    now = int(dt.datetime.now(dt.UTC).timestamp())

    def token(jti: str) -> str:
        claims = {"iss": "https://mine.example", "aud": "broker", "exp": now + 300, "jti": jti}
        claims |= {"env": "prod", "svc": "web"}
        return pyjwt.encode(claims, own_key, algorithm="RS256", headers={"kid": "k1"})

    before = await issued_serials(broker)
    err = await refused(op.AddAttestor(definition, metadata=cid("attestor-mine")))
    assert err.code() == grpc.StatusCode.PERMISSION_DENIED
    details = err.details() or ""
    assert "second operator" in details
    assert f"broker approval request --action attestor.admin --resource {resource}" in details
    event = await broker.event_for("attestor-mine")
    assert (event["decision"], event["rule"], event["resource"]) == (
        "deny",
        "two-person",
        resource,
    )
    assert list((await op.ListAttestors(identity_pb2.ListAttestorsRequest())).attestors) == []
    csr = _csr(ec.generate_private_key(ec.SECP256R1()))
    err = await refused(op.Attest(identity_pb2.AttestRequest(jwt=token("t1"), csr=csr)))
    assert err.code() == grpc.StatusCode.UNAUTHENTICATED
    assert await issued_serials(broker) == before

    # Bob approves this definition; the same name with other keys is not what he approved.
    approval = await approve(broker, broker.operator, "attestor.admin", resource)
    other_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    other_jwk = json.loads(pyjwt.algorithms.RSAAlgorithm.to_jwk(other_key.public_key()))
    other_jwk["kid"] = "k1"
    swapped = identity_pb2.Attestor()
    swapped.CopyFrom(definition)
    swapped.jwks_json = json.dumps({"keys": [other_jwk]})
    err = await refused(op.AddAttestor(swapped))
    assert err.code() == grpc.StatusCode.PERMISSION_DENIED
    assert list((await op.ListAttestors(identity_pb2.ListAttestorsRequest())).attestors) == []

    added = await op.AddAttestor(definition, metadata=cid("attestor-approved"))
    assert added.name == "mine"
    event = await broker.event_for("attestor-approved")
    assert (event["resource"], event["flags"]) == (resource, {"approval": approval})
    svid = await op.Attest(identity_pb2.AttestRequest(jwt=token("t2"), csr=csr))
    assert svid.spiffe_id == WEB  # what the approval was for: the keys' holder becomes prod/web

    # Single use: removed and added again, it needs a new approval.
    await op.RemoveAttestor(identity_pb2.RemoveAttestorRequest(name="mine"))
    err = await refused(op.AddAttestor(definition, metadata=cid("attestor-again")))
    assert err.code() == grpc.StatusCode.PERMISSION_DENIED
    assert (await broker.event_for("attestor-again"))["rule"] == "two-person"
    assert list((await op.ListAttestors(identity_pb2.ListAttestorsRequest())).attestors) == []

    # A template that can only yield dev identities stays an operator's to add alone.
    dev_only = identity_pb2.Attestor()
    dev_only.CopyFrom(definition)
    dev_only.template = "spiffe://{td}/default/dev/{svc}"
    assert (await op.AddAttestor(dev_only)).template == dev_only.template


# -- finding 7: a self-minted chain outlives its root ------------------------------------------


async def test_a_self_minted_chain_ends_and_dies_with_its_root(broker: BrokerHarness) -> None:
    root = broker.identity(DEV_WORKLOAD, ttl=dt.timedelta(minutes=10))
    root_not_after = x509.load_pem_x509_certificate(root.chain_pem).not_valid_after_utc
    child = await broker.ca(root).MintX509SVID(
        ca_pb2.MintX509SVIDRequest(spiffe_id=DEV_WORKLOAD, ttl_seconds=86400)
    )
    assert leaf(child).not_valid_after_utc <= root_not_after
    token = await broker.ca(root).MintJWTSVID(
        ca_pb2.MintJWTSVIDRequest(spiffe_id=DEV_WORKLOAD, audience=["db"], ttl_seconds=3600)
    )
    assert jwt_exp(token.token) <= root_not_after
    second = as_identity(child)
    grandchild = await broker.ca(second).MintX509SVID(
        ca_pb2.MintX509SVIDRequest(spiffe_id=DEV_WORKLOAD, ttl_seconds=86400)
    )
    assert leaf(grandchild).not_valid_after_utc <= root_not_after
    third = as_identity(grandchild)
    root_serial = format(root.serial, "x")
    assert root_serial in Lineage.of(leaf(grandchild)).ancestors  # type: ignore[union-attr]
    # Renewal does not lift the cap a self-minted chain carries.
    renewed = await identity_stub(broker, third).RenewAgent(
        identity_pb2.RenewAgentRequest(csr=_csr(ec.generate_private_key(ec.SECP256R1())))
    )
    assert leaf(renewed).not_valid_after_utc <= root_not_after

    await identity_stub(broker).DenySVID(identity_pb2.DenySVIDRequest(target=root_serial))
    before = await issued_serials(broker)
    for who in (second, third):
        err = await refused(
            broker.ca(who).MintX509SVID(
                ca_pb2.MintX509SVIDRequest(spiffe_id=DEV_WORKLOAD, ttl_seconds=86400)
            )
        )
        assert err.code() == grpc.StatusCode.PERMISSION_DENIED
        assert "denylist" in (err.details() or "")
        err = await refused(
            broker.ca(who).MintJWTSVID(
                ca_pb2.MintJWTSVIDRequest(spiffe_id=DEV_WORKLOAD, audience=["db"])
            )
        )
        assert err.code() == grpc.StatusCode.PERMISSION_DENIED
        err = await refused(
            identity_stub(broker, who).RenewAgent(
                identity_pb2.RenewAgentRequest(csr=_csr(ec.generate_private_key(ec.SECP256R1())))
            )
        )
        assert err.code() == grpc.StatusCode.PERMISSION_DENIED
    assert await issued_serials(broker) == before


async def test_denying_an_agents_serial_denies_its_renewals(broker: BrokerHarness) -> None:
    """Renewal records the serial it was made through too; the agent paths check the lineage
    in storage as well (another worker's in-memory denylist may lag a few seconds)."""
    agent = broker.identity(AGENT_ID)
    key = ec.generate_private_key(ec.SECP256R1())
    renewed = await identity_stub(broker, agent).RenewAgent(
        identity_pb2.RenewAgentRequest(csr=_csr(key))
    )
    assert Lineage.of(leaf(renewed)) == Lineage(ancestors=(format(agent.serial, "x"),))
    chain = b"".join(
        x509.load_der_x509_certificate(c).public_bytes(serialization.Encoding.PEM)
        for c in renewed.cert_chain
    )
    key_pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    second = Identity(AGENT_ID, chain, key_pem, leaf(renewed).serial_number)
    assert (
        await identity_stub(broker, second).SyncAgent(identity_pb2.SyncAgentRequest()) is not None
    )
    await identity_stub(broker).DenySVID(
        identity_pb2.DenySVIDRequest(target=format(agent.serial, "x"))
    )
    err = await refused(identity_stub(broker, second).SyncAgent(identity_pb2.SyncAgentRequest()))
    assert err.code() == grpc.StatusCode.PERMISSION_DENIED
    # As a worker whose in-memory denylist has not caught up yet: storage refuses it too.
    broker.app.workloads.denylist.replace([])
    err = await refused(identity_stub(broker, second).SyncAgent(identity_pb2.SyncAgentRequest()))
    assert err.code() == grpc.StatusCode.PERMISSION_DENIED
    assert "minted through" in (err.details() or "")


# -- finding 13: 24 h means 24 h ---------------------------------------------------------------


async def test_no_certificate_is_valid_for_more_than_24h(broker: BrokerHarness) -> None:
    minted = await broker.ca().MintX509SVID(
        ca_pb2.MintX509SVIDRequest(spiffe_id=DEV_WORKLOAD, ttl_seconds=86400)
    )
    cert = leaf(minted)
    assert cert.not_valid_after_utc - cert.not_valid_before_utc == DAY
    # The operator certificate (server_cert_ttl 24h by default) too.
    broker.app.write_operator_identity()
    operator = x509.load_pem_x509_certificate(
        (broker.app.config.operator_dir / "svid.pem").read_bytes()
    )
    assert operator.not_valid_after_utc - operator.not_valid_before_utc <= DAY
    assert broker.app.config.server.server_cert_ttl == DAY


# -- finding 14: a JWT attestation token works once ---------------------------------------------


async def test_an_attestation_jwt_cannot_be_replayed(broker: BrokerHarness) -> None:
    issuer_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    jwk = json.loads(pyjwt.algorithms.RSAAlgorithm.to_jwk(issuer_key.public_key()))
    jwk["kid"] = "k1"
    await identity_stub(broker).AddAttestor(
        identity_pb2.Attestor(
            name="ci",
            issuer="https://ci.example",
            audience="broker",
            jwks_json=json.dumps({"keys": [jwk]}),
            template="spiffe://{td}/ci/{repository}",
        )
    )
    now = int(dt.datetime.now(dt.UTC).timestamp())

    def token(**claims: Any) -> str:
        body = {
            "iss": "https://ci.example",
            "aud": "broker",
            "exp": now + 300,
            "repository": "shop",
        }
        body.update(claims)
        return pyjwt.encode(body, issuer_key, algorithm="RS256", headers={"kid": "k1"})

    # Attest is admitted on the mTLS port too (the token in the request is the credential).
    stub = identity_stub(broker)
    for name, first in (("jti", token(jti="run-1")), ("no-jti", token())):
        csr = _csr(ec.generate_private_key(ec.SECP256R1()))
        assert (await stub.Attest(identity_pb2.AttestRequest(jwt=first, csr=csr))).serial
        before = await issued_serials(broker)
        err = await refused(
            stub.Attest(identity_pb2.AttestRequest(jwt=first, csr=csr), metadata=cid(name))
        )
        assert err.code() == grpc.StatusCode.UNAUTHENTICATED
        assert "already used" in (err.details() or "")
        assert await issued_serials(broker) == before
        event = await broker.event_for(name)
        assert event["outcome"] == "UNAUTHENTICATED"
        assert "serial" not in event.get("details", {})
    # A new token (another jti) still attests.
    csr = _csr(ec.generate_private_key(ec.SECP256R1()))
    svid = await stub.Attest(identity_pb2.AttestRequest(jwt=token(jti="run-2"), csr=csr))
    assert svid.spiffe_id == f"spiffe://{TRUST_DOMAIN}/ci/shop"


# -- issue 11 item 5: nobody mints an operator --------------------------------------------------


def test_operator_ids_outside_the_reserved_prefix_are_refused(tmp_path: Path) -> None:
    def config(*operators: str) -> Config:
        return Config(
            trust_domain=TRUST_DOMAIN,
            data_dir=tmp_path,
            storage=StorageConfig(dsn=f"sqlite:///{tmp_path / 'b.db'}"),
            keys=KeysConfig(uri="software:"),
            ca=CAConfig(),
            server=ServerConfig(operators=operators),
        )

    for outside in (
        f"spiffe://{TRUST_DOMAIN}/ops/bob",
        f"spiffe://{TRUST_DOMAIN}/broker/bob",
        f"spiffe://{TRUST_DOMAIN}/broker/operator",
        f"spiffe://{TRUST_DOMAIN}/default/prod/bob",
    ):
        with pytest.raises(InvalidArgument, match="reserved prefix"):
            config(OPERATOR_ID, outside).validate()
    assert config(OPERATOR_ID, BOB).validate().server.operators == (OPERATOR_ID, BOB)


async def test_nobody_mints_an_operator_or_the_broker(broker: BrokerHarness) -> None:
    """The bypass of issue 11, repeated: alice mints bob's ID. Refused at the first step, by
    every route that issues, and nothing is issued."""
    ca = broker.ca()  # alice
    op = identity_stub(broker)
    before = await issued_serials(broker)
    reserved = (BOB, f"spiffe://{TRUST_DOMAIN}/broker/server", f"spiffe://{TRUST_DOMAIN}/broker")
    for target in reserved:
        err = await refused(ca.MintX509SVID(ca_pb2.MintX509SVIDRequest(spiffe_id=target)))
        assert err.code() == grpc.StatusCode.PERMISSION_DENIED
        assert "reserved" in (err.details() or "")
        err = await refused(
            ca.MintJWTSVID(ca_pb2.MintJWTSVIDRequest(spiffe_id=target, audience=["x"]))
        )
        assert err.code() == grpc.StatusCode.PERMISSION_DENIED
        err = await refused(
            op.CreateEntry(
                identity_pb2.Entry(spiffe_id=target, parent_id=AGENT_ID, selectors=["unix:uid:1"])
            )
        )
        assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
        err = await refused(
            op.CreateJoinToken(identity_pb2.CreateJoinTokenRequest(spiffe_id=target))
        )
        assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    # A workload cannot either, nor can an attestor be set up to make operators.
    workload = broker.ca(broker.identity(DEV_WORKLOAD))
    err = await refused(workload.MintX509SVID(ca_pb2.MintX509SVIDRequest(spiffe_id=BOB)))
    assert err.code() == grpc.StatusCode.PERMISSION_DENIED
    issuer_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    jwk = json.loads(pyjwt.algorithms.RSAAlgorithm.to_jwk(issuer_key.public_key()))
    jwk["kid"] = "k1"
    err = await refused(
        op.AddAttestor(
            identity_pb2.Attestor(
                name="sso",
                issuer="https://sso.example",
                audience="broker",
                jwks_json=json.dumps({"keys": [jwk]}),
                template="spiffe://{td}/broker/operator/{sub}",
            )
        )
    )
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert list((await op.ListAttestors(identity_pb2.ListAttestorsRequest())).attestors) == []
    assert list((await op.ListEntries(identity_pb2.ListEntriesRequest())).entries) == []
    assert await issued_serials(broker) == before
