"""Operator login through the real gRPC pipeline against a real OpenID provider (node
oidc-provider, see tests/fixtures/oidc_provider.py): ID token + CSR on the attestation port ->
operator SVID with the person's roles; every bad token refused with one clear line, audited,
nothing issued; logout and revocation stop a certificate on the next call; roles reach the
policy; the two-person rule needs two different people; break-glass is bound to a person."""

from __future__ import annotations

import base64
import datetime as dt
import hashlib
import hmac
import json
import secrets as random
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import grpc
import jwt
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from broker.api._proto import (
    access_pb2,
    access_pb2_grpc,
    audit_pb2,
    audit_pb2_grpc,
    ca_pb2,
    ca_pb2_grpc,
    operators_pb2,
    operators_pb2_grpc,
    secrets_pb2,
    secrets_pb2_grpc,
)
from broker.api.server.serving import serve_application
from broker.app import Application
from broker.config import OperatorsConfig
from broker.operators.roles import operator_claims_of
from broker.storage.factory import open_storage
from ca.clock import FakeClock
from ca.keys import SoftwareBackend
from ca.x509svid import spiffe_id_of
from tests.fixtures.oidc_provider import OTHER_CLIENT_ID, OidcProvider, code_flow_token

from .conftest import CORRELATION_HEADER, TRUST_DOMAIN, BrokerHarness, Identity, make_config

REF = "secret://payments/prod/card-vault"
ROLE_MAP = {
    "admin": ("broker-admins",),
    "approver": ("broker-approvers",),
    "auditor": ("broker-auditors",),
    "security": ("broker-security",),
}


def operator_id(name: str) -> str:
    return f"spiffe://{TRUST_DOMAIN}/broker/operator/{name}"


@dataclass
class Served:
    harness: BrokerHarness
    attest_port: int
    provider: OidcProvider

    @property
    def app(self) -> Application:
        return self.harness.app

    @property
    def clock(self) -> FakeClock:
        return self.harness.clock

    def login_stub(self) -> Any:
        creds = grpc.ssl_channel_credentials(root_certificates=self.harness.bundle_pem)
        channel = grpc.aio.secure_channel(
            f"127.0.0.1:{self.attest_port}",
            creds,
            options=[("grpc.ssl_target_name_override", "localhost")],
        )
        self.harness._channels.append(channel)
        return operators_pb2_grpc.OperatorsStub(channel)

    async def login(
        self, user: str, *, mfa: bool = True, ttl: int = 0, cid: str = ""
    ) -> tuple[Identity, Any]:
        token, nonce = code_flow_token(self.provider, user, mfa=mfa)
        return await self.login_with(token, nonce, ttl=ttl, cid=cid)

    async def login_with(
        self, token: str, nonce: str, *, ttl: int = 0, cid: str = ""
    ) -> tuple[Identity, Any]:
        key = ec.generate_private_key(ec.SECP256R1())
        response = await self.login_stub().Login(
            operators_pb2.LoginRequest(id_token=token, nonce=nonce, csr=_csr(key), ttl_seconds=ttl),
            metadata=((CORRELATION_HEADER, cid or random.token_hex(8)),),
        )
        certs = _split(response.cert_chain)
        chain = b"".join(c.public_bytes(serialization.Encoding.PEM) for c in certs)
        key_pem = key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        return Identity(
            str(spiffe_id_of(certs[0])), chain, key_pem, certs[0].serial_number
        ), response

    def operators(self, identity: Identity) -> Any:
        return operators_pb2_grpc.OperatorsStub(self.harness.channel(identity))

    def access(self, identity: Identity) -> Any:
        return access_pb2_grpc.AccessStub(self.harness.channel(identity))

    def secrets(self, identity: Identity) -> Any:
        return secrets_pb2_grpc.SecretsStub(self.harness.channel(identity))


def _csr(key: ec.EllipticCurvePrivateKey) -> bytes:
    csr = x509.CertificateSigningRequestBuilder().subject_name(x509.Name([]))
    return csr.sign(key, hashes.SHA256()).public_bytes(serialization.Encoding.DER)


def _split(blob: bytes) -> list[x509.Certificate]:
    from broker.api.client.operators import _split_der

    return _split_der(blob)


def cid(name: str) -> tuple[tuple[str, str], ...]:
    return ((CORRELATION_HEADER, name),)


# People reading prod/pii secrets give a justification (secrets.justification_required).
JUSTIFIED = (("x-broker-justification", "INC-42 card vault restore"),)


async def refused(call: Awaitable[Any]) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await call
    return info.value


Factory = Callable[..., Awaitable[Served]]


@pytest.fixture
async def served_factory(tmp_path: Path, oidc_provider: OidcProvider) -> AsyncIterator[Factory]:
    started: list[Served] = []

    async def start(**server: Any) -> Served:
        directory = tmp_path / f"broker-{len(started)}"
        directory.mkdir()
        config = make_config(directory, **server)
        operators = OperatorsConfig(
            issuer=oidc_provider.issuer, client_id="broker-cli", roles=ROLE_MAP
        )
        operators.validate()
        config = replace(config, operators=operators)
        storage = await open_storage(config.storage.resolved_dsn())
        clock = FakeClock(dt.datetime.now(dt.UTC))
        app = Application(config, SoftwareBackend(), storage, clock)
        await app.start()
        result = await serve_application(app)
        assert result.attest_port, "login runs on the attestation port"
        harness = BrokerHarness(
            app, result.server, result.port, result.credentials, clock, storage, directory
        )
        served = Served(harness, result.attest_port, oidc_provider)
        started.append(served)
        return served

    try:
        yield start
    finally:
        for served in reversed(started):
            await served.harness.close_channels()
            await served.harness.server.stop(grace=None)
            await served.app.close()


@pytest.fixture
async def served(served_factory: Factory) -> Served:
    return await served_factory()


async def _sessions(served: Served) -> list[Any]:
    return await served.app.operators.list_sessions(include_inactive=True)


# -- the happy path ----------------------------------------------------------------------------


async def test_login_with_mfa_issues_an_operator_svid_with_roles(served: Served) -> None:
    token, nonce = code_flow_token(served.provider, "alice")
    alice, response = await served.login_with(token, nonce, cid="login-alice")
    leaf = _split(response.cert_chain)[0]
    assert str(spiffe_id_of(leaf)) == operator_id("alice")
    assert leaf.not_valid_after_utc - served.clock.now() <= dt.timedelta(hours=1)
    claims = operator_claims_of(leaf)
    assert claims is not None and claims.roles == {"admin", "approver"}
    assert response.session.roles == ["admin", "approver"]
    assert list(response.session.amr) == ["pwd", "otp"]
    # the chain verifies against the bundle the broker publishes
    issuer = _split(response.cert_chain)[1]
    issuer.public_key().verify(  # type: ignore[union-attr]
        leaf.signature, leaf.tbs_certificate_bytes, ec.ECDSA(leaf.signature_hash_algorithm)
    )

    event = await served.harness.event_for("login-alice")
    assert (event["decision"], event["outcome"]) == ("allow", "OK")
    assert event["details"]["subject"] == "alice"
    assert event["details"]["amr"] == ["pwd", "otp"]
    assert event["details"]["roles"] == ["admin", "approver"]
    ledger = json.dumps(await served.harness.events())
    assert token not in ledger and token.split(".")[2] not in ledger  # never the token

    me = await served.operators(alice).WhoAmI(operators_pb2.WhoAmIRequest())
    assert (me.subject, list(me.roles)) == ("alice", ["admin", "approver"])
    # an admin administers: CA status and policy
    status = await ca_pb2_grpc.CertificateAuthorityStub(served.harness.channel(alice)).GetStatus(
        ca_pb2.GetStatusRequest()
    )
    assert status.trust_domain == TRUST_DOMAIN
    listed = await served.operators(alice).ListOperators(operators_pb2.ListOperatorsRequest())
    assert [s.subject for s in listed.sessions] == ["alice"]


# -- bad input ----------------------------------------------------------------------------------


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _forge(header: dict[str, Any], claims: dict[str, Any], sign: Callable[[bytes], bytes]) -> str:
    head = _b64(json.dumps(header).encode()) + "." + _b64(json.dumps(claims).encode())
    return head + "." + _b64(sign(head.encode()))


def _parts(token: str) -> tuple[dict[str, Any], dict[str, Any]]:
    return jwt.get_unverified_header(token), jwt.decode(token, options={"verify_signature": False})


async def _case(served: Served, case: str, other: OidcProvider) -> tuple[str, str, int, str]:
    """(token, nonce, ttl seconds, the expected message fragment) for one bad-input case."""
    provider = served.provider
    if case == "expired":
        token, nonce = code_flow_token(provider, "alice")
        served.clock.advance(hours=2)
        return token, nonce, 0, "has expired"
    if case == "not-yet-valid":
        token, nonce = code_flow_token(provider, "alice")
        served.clock.advance(hours=-1)
        return token, nonce, 0, "issued in the future"
    if case == "wrong-audience":
        token, nonce = code_flow_token(provider, "alice", client_id=OTHER_CLIENT_ID)
        return token, nonce, 0, "not meant for this broker"
    if case == "other-provider":
        token, nonce = code_flow_token(other, "alice")
        return token, nonce, 0, "not the configured provider"
    if case == "wrong-issuer":
        token, nonce = code_flow_token(provider, "alice")
        header, claims = _parts(token)
        claims["iss"] = provider.issuer + "/evil"
        key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        forged = jwt.encode(claims, key, algorithm="RS256", headers={"kid": header["kid"]})
        return forged, nonce, 0, "not the configured provider"
    if case == "alg-none":
        token, nonce = code_flow_token(provider, "alice")
        _, claims = _parts(token)
        return _forge({"alg": "none", "typ": "JWT"}, claims, lambda _: b""), nonce, 0, "'none'"
    if case == "hs256-with-public-key":
        token, nonce = code_flow_token(provider, "alice")
        header, claims = _parts(token)
        public = jwt.PyJWK.from_dict(provider.jwks()["keys"][0]).key
        pem = public.public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
        forged = _forge(
            {"alg": "HS256", "kid": header["kid"]},
            claims,
            lambda msg: hmac.new(pem, msg, hashlib.sha256).digest(),
        )
        return forged, nonce, 0, "'HS256' is not allowed"
    if case == "unknown-kid":
        token, nonce = code_flow_token(provider, "alice")
        _, claims = _parts(token)
        key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        forged = jwt.encode(claims, key, algorithm="RS256", headers={"kid": "rotated-away"})
        return forged, nonce, 0, "not among the provider's signing keys"
    if case == "tampered-claims":
        token, nonce = code_flow_token(provider, "bob")
        header, claims = _parts(token)
        claims["groups"] = ["broker-admins"]
        head = _b64(json.dumps(header).encode()) + "." + _b64(json.dumps(claims).encode())
        return head + "." + token.split(".")[2], nonce, 0, "signature does not verify"
    if case == "wrong-nonce":
        token, _ = code_flow_token(provider, "alice")
        return token, "not-the-nonce-i-sent", 0, "nonce does not match"
    if case == "no-mfa":
        token, nonce = code_flow_token(provider, "bob", mfa=False)
        return token, nonce, 0, "login needs MFA"
    if case == "no-second-factor-at-all":
        token, nonce = code_flow_token(provider, "carol")
        return token, nonce, 0, "login needs MFA"
    if case == "sub-with-path-characters":
        token, nonce = code_flow_token(provider, "mallory/../alice")
        return token, nonce, 0, "not allowed in an operator identity"
    if case == "ttl-over-8h":
        token, nonce = code_flow_token(provider, "alice")
        return token, nonce, 9 * 3600, "at most 8h"
    raise AssertionError(case)


_CODES = {
    "no-mfa": grpc.StatusCode.PERMISSION_DENIED,
    "no-second-factor-at-all": grpc.StatusCode.PERMISSION_DENIED,
    "ttl-over-8h": grpc.StatusCode.INVALID_ARGUMENT,
}


@pytest.mark.parametrize(
    "case",
    [
        "expired",
        "not-yet-valid",
        "wrong-audience",
        "wrong-issuer",
        "other-provider",
        "alg-none",
        "hs256-with-public-key",
        "unknown-kid",
        "tampered-claims",
        "wrong-nonce",
        "no-mfa",
        "no-second-factor-at-all",
        "sub-with-path-characters",
        "ttl-over-8h",
    ],
)
async def test_bad_tokens_are_refused_audited_and_issue_nothing(
    served: Served, other_oidc_provider: OidcProvider, case: str
) -> None:
    token, nonce, ttl, fragment = await _case(served, case, other_oidc_provider)
    err = await refused(served.login_with(token, nonce, ttl=ttl, cid=f"bad-{case}"))
    assert err.code() == _CODES.get(case, grpc.StatusCode.UNAUTHENTICATED), err.details()
    message = err.details() or ""
    assert fragment in message and "\n" not in message and "Traceback" not in message
    event = await served.harness.event_for(f"bad-{case}")
    assert event["outcome"] == err.code().name
    assert event["what"] == "operator.login"
    assert fragment in event["error"]
    assert token not in json.dumps(event)
    assert await _sessions(served) == []  # nothing issued


async def test_a_refused_login_says_who_tried(served: Served) -> None:
    token, nonce = code_flow_token(served.provider, "bob", mfa=False)
    err = await refused(served.login_with(token, nonce, cid="bob-no-mfa"))
    assert err.code() == grpc.StatusCode.PERMISSION_DENIED
    event = await served.harness.event_for("bob-no-mfa")
    assert event["details"]["subject"] == "bob" and event["details"]["amr"] == ["pwd"]
    assert event["outcome"] == "PERMISSION_DENIED" and "login needs MFA" in event["error"]
    assert token not in json.dumps(event)


async def test_a_token_logs_in_once(served: Served) -> None:
    token, nonce = code_flow_token(served.provider, "alice")
    await served.login_with(token, nonce)
    err = await refused(served.login_with(token, nonce, cid="replay"))
    assert err.code() == grpc.StatusCode.UNAUTHENTICATED
    assert "used for a login already" in (err.details() or "")
    assert (await served.harness.event_for("replay"))["outcome"] == "UNAUTHENTICATED"
    assert len(await _sessions(served)) == 1


async def test_unknown_kid_refreshes_the_jwks_once(served: Served) -> None:
    """A kid the broker has not seen makes it fetch the JWKS again; a made-up kid right after
    does not hammer the provider (one fetch per refresh interval)."""
    await served.login("alice")
    keys = served.app.operators.verifier.keys
    fetched = keys.fetches
    token, nonce = code_flow_token(served.provider, "bob")
    _, claims = _parts(token)
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    forged = jwt.encode(claims, key, algorithm="RS256", headers={"kid": "made-up-0"})
    await refused(served.login_with(forged, nonce))
    assert keys.fetches == fetched  # fetched moments ago: not again
    served.clock.advance(seconds=31)
    for kid in ("made-up-1", "made-up-2"):
        forged = jwt.encode(claims, key, algorithm="RS256", headers={"kid": kid})
        err = await refused(served.login_with(forged, nonce))
        assert "not among the provider's signing keys" in (err.details() or "")
    assert keys.fetches == fetched + 1
    # the real token (a kid the broker knows) still logs in without another fetch
    await served.login_with(token, nonce)
    assert keys.fetches == fetched + 1


# -- logout, revocation ---------------------------------------------------------------------------


async def test_logout_denies_the_certificate_on_the_next_call(served: Served) -> None:
    alice, _ = await served.login("alice")
    stub = served.operators(alice)
    out = await stub.Logout(operators_pb2.LogoutRequest())
    assert out.revoked_at.seconds > 0
    err = await refused(stub.WhoAmI(operators_pb2.WhoAmIRequest()))
    assert err.code() == grpc.StatusCode.PERMISSION_DENIED
    assert "denylist" in (err.details() or "")
    # a fresh login works again
    again, _ = await served.login("alice")
    me = await served.operators(again).WhoAmI(operators_pb2.WhoAmIRequest())
    assert me.subject == "alice"


async def test_operator_revoke_by_subject_and_serial(served: Served) -> None:
    alice, _ = await served.login("alice")
    erin, _ = await served.login("erin")  # security
    bob, _ = await served.login("bob")  # approver
    dave, _ = await served.login("dave")  # auditor: may list, not revoke
    err = await refused(
        served.operators(dave).RevokeOperator(operators_pb2.RevokeOperatorRequest(target="bob"))
    )
    assert err.code() == grpc.StatusCode.PERMISSION_DENIED
    assert (await served.operators(bob).WhoAmI(operators_pb2.WhoAmIRequest())).subject == "bob"

    revoked = await served.operators(erin).RevokeOperator(
        operators_pb2.RevokeOperatorRequest(target="alice")
    )
    assert [r.subject for r in revoked.revoked] == ["alice"]
    err = await refused(served.operators(alice).WhoAmI(operators_pb2.WhoAmIRequest()))
    assert err.code() == grpc.StatusCode.PERMISSION_DENIED

    await served.operators(erin).RevokeOperator(
        operators_pb2.RevokeOperatorRequest(target=format(bob.serial, "x"))
    )
    err = await refused(served.operators(bob).WhoAmI(operators_pb2.WhoAmIRequest()))
    assert err.code() == grpc.StatusCode.PERMISSION_DENIED
    listed = await served.operators(dave).ListOperators(operators_pb2.ListOperatorsRequest())
    assert sorted(s.subject for s in listed.sessions) == ["dave", "erin"]
    missing = await refused(
        served.operators(erin).RevokeOperator(operators_pb2.RevokeOperatorRequest(target="zed"))
    )
    assert missing.code() == grpc.StatusCode.NOT_FOUND


# -- roles in policy ------------------------------------------------------------------------------


async def test_roles_decide_what_an_operator_may_do(served: Served) -> None:
    dave, _ = await served.login("dave")  # auditor
    bob, _ = await served.login("bob")  # approver
    audit = audit_pb2_grpc.AuditStub(served.harness.channel(dave))
    await audit.Verify(audit_pb2.VerifyAuditRequest())
    ca = ca_pb2_grpc.CertificateAuthorityStub(served.harness.channel(dave))
    err = await refused(ca.Rotate(ca_pb2.RotateRequest(force=True), metadata=cid("dave-rotate")))
    assert err.code() == grpc.StatusCode.PERMISSION_DENIED
    assert "auditor" in (err.details() or "")
    event = await served.harness.event_for("dave-rotate")
    assert event["decision"] == "deny" and event["who"] == operator_id("dave")
    err = await refused(
        audit_pb2_grpc.AuditStub(served.harness.channel(bob)).Verify(audit_pb2.VerifyAuditRequest())
    )
    assert err.code() == grpc.StatusCode.PERMISSION_DENIED
    # the Rego input carries the roles
    alice, _ = await served.login("alice")
    leaf_pem = (
        alice.chain_pem.split(b"-----END CERTIFICATE-----")[0] + b"-----END CERTIFICATE-----\n"
    )
    caller = served.app.authenticator.caller({"x509_pem_cert": [leaf_pem]})
    document = served.app.access.policy_input(caller, "ca.rotate", "")
    assert document["caller"]["roles"] == ["admin", "approver"]
    assert document["caller"]["subject"] == "alice"


async def _put_pii(served: Served, admin: Identity) -> bytes:
    value = random.token_hex(16).encode()
    await served.secrets(admin).Put(
        secrets_pb2.PutSecretRequest(
            reference=REF,
            value=value,
            owner="payments",
            classification="pii",
            rotation_period_seconds=90 * 86400,
        )
    )
    return value


async def test_prod_pii_needs_two_different_people(served: Served) -> None:
    alice, _ = await served.login("alice")  # admin + approver
    value = await _put_pii(served, alice)
    request = await served.access(alice).RequestApproval(
        access_pb2.RequestApprovalRequest(action="secrets.get", resource=REF, justification="x")
    )
    # alice again, with a second login (a second certificate): still alice
    alice_again, _ = await served.login("alice")
    assert alice_again.serial != alice.serial
    err = await refused(
        served.access(alice_again).Approve(access_pb2.ApproveRequest(id=request.id))
    )
    assert err.code() == grpc.StatusCode.PERMISSION_DENIED
    err = await refused(
        served.secrets(alice).Get(secrets_pb2.GetSecretRequest(reference=REF), metadata=JUSTIFIED)
    )
    assert err.code() == grpc.StatusCode.PERMISSION_DENIED
    # dave is another person but only an auditor: may not approve
    dave, _ = await served.login("dave")
    err = await refused(served.access(dave).Approve(access_pb2.ApproveRequest(id=request.id)))
    assert err.code() == grpc.StatusCode.PERMISSION_DENIED
    # the configured bootstrap identity is whoever holds its certificate file: no approver
    err = await refused(
        served.access(served.harness.operator).Approve(access_pb2.ApproveRequest(id=request.id))
    )
    assert err.code() == grpc.StatusCode.PERMISSION_DENIED
    assert "logged in with MFA" in (err.details() or "")
    # bob, another person with the approver role
    bob, _ = await served.login("bob")
    approved = await served.access(bob).Approve(access_pb2.ApproveRequest(id=request.id))
    assert approved.approved_by == operator_id("bob")
    got = await served.secrets(alice).Get(
        secrets_pb2.GetSecretRequest(reference=REF), metadata=JUSTIFIED
    )
    assert got.value == value


async def test_breakglass_is_bound_to_a_logged_in_person(served: Served) -> None:
    alice, _ = await served.login("alice")
    bob, _ = await served.login("bob")
    await _put_pii(served, alice)
    # the configured bootstrap identity is nobody in particular: no break-glass for it
    bootstrap = served.harness.operator
    request = await served.access(bootstrap).RequestApproval(
        access_pb2.RequestApprovalRequest(action="secrets.get", resource=REF, justification="x")
    )
    await served.access(bob).Approve(access_pb2.ApproveRequest(id=request.id))
    err = await refused(
        served.access(bootstrap).IssueBreakGlass(
            access_pb2.IssueBreakGlassRequest(approval_id=request.id, ttl_seconds=3600)
        )
    )
    assert err.code() == grpc.StatusCode.PERMISSION_DENIED
    assert "logged in with MFA" in (err.details() or "")

    request = await served.access(alice).RequestApproval(
        access_pb2.RequestApprovalRequest(action="secrets.get", resource=REF, justification="y")
    )
    await served.access(bob).Approve(access_pb2.ApproveRequest(id=request.id))
    issued = await served.access(alice).IssueBreakGlass(
        access_pb2.IssueBreakGlassRequest(approval_id=request.id, ttl_seconds=3600)
    )
    pem = serialization.Encoding.PEM
    chain = b"".join(x509.load_der_x509_certificate(c).public_bytes(pem) for c in issued.cert_chain)
    key = serialization.load_der_private_key(issued.private_key, None).private_bytes(
        pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    glass = Identity(issued.record.spiffe_id, chain, key, 0)
    await served.secrets(glass).Get(
        secrets_pb2.GetSecretRequest(reference=REF), metadata=cid("bg") + JUSTIFIED
    )
    event = await served.harness.event_for("bg")
    assert event["flags"]["breakglass_operator"] == operator_id("alice")


async def test_login_is_rate_limited_and_audited(served_factory: Factory) -> None:
    served = await served_factory(rate_limit_rps=0.001, rate_limit_burst=2)
    for _ in range(2):
        await refused(served.login_with("x.y.z", ""))
    err = await refused(served.login_with("x.y.z", "", cid="limited"))
    assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    event = await served.harness.event_for("limited")
    assert (event["decision"], event["outcome"]) == ("deny", "RESOURCE_EXHAUSTED")
