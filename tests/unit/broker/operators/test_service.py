"""OperatorService.login over real storage (SQLite) with keys made here: MFA by amr or acr
(a token without amr is refused), a person without a mapped role gets nothing, the lifetime
never outlasts the provider session, a configured subject claim names the operator, and a
refused login records nothing."""

from __future__ import annotations

import datetime as dt
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from broker.config import OperatorsConfig
from broker.errors import InvalidArgument, PermissionDenied, Unauthenticated
from broker.operators.roles import operator_claims_of
from broker.operators.service import OperatorService
from broker.storage import open_storage
from broker.storage.operators import OperatorRepository
from ca.clock import FakeClock
from ca.spiffeid import SpiffeId
from tests.unit.broker.operators.test_oidc import ISSUER, T0, Provider


@dataclass
class Issued:
    serial: str
    expires_at: dt.datetime
    chain_der: list[bytes]
    bundle_der: list[bytes] = field(default_factory=list)


class RecordingIssuer:
    """Stands in for the CA: signs with a throwaway key and remembers what it was asked."""

    def __init__(self, clock: FakeClock) -> None:
        self.clock = clock
        self.calls: list[tuple[str, dt.timedelta, x509.Certificate]] = []

    def issue_operator_svid(
        self, spiffe_id: SpiffeId, csr: bytes, ttl: dt.timedelta, login_extension: Any
    ) -> Issued:
        key = ec.generate_private_key(ec.SECP256R1())
        request = x509.load_der_x509_csr(csr)
        now = self.clock.now()
        cert = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([]))
            .issuer_name(x509.Name([x509.NameAttribute(x509.OID_COMMON_NAME, "ca")]))
            .public_key(request.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now)
            .not_valid_after(now + ttl)
            .add_extension(
                x509.SubjectAlternativeName([x509.UniformResourceIdentifier(spiffe_id.id_string)]),
                critical=True,
            )
            .add_extension(login_extension, critical=False)
            .sign(key, hashes.SHA256())
        )
        self.calls.append((spiffe_id.id_string, ttl, cert))
        der = cert.public_bytes(serialization.Encoding.DER)
        return Issued(format(cert.serial_number, "x"), now + ttl, [der])


def _csr() -> bytes:
    key = ec.generate_private_key(ec.SECP256R1())
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([]))
        .sign(key, hashes.SHA256())
    )
    return csr.public_bytes(serialization.Encoding.DER)


@dataclass
class Env:
    provider: Provider
    clock: FakeClock
    issuer: RecordingIssuer
    repo: OperatorRepository
    denied: list[str]

    def service(self, **overrides: Any) -> OperatorService:
        config = OperatorsConfig(
            issuer=ISSUER,
            client_id="broker",
            roles={"admin": ("ops",), "auditor": ("audit",)},
            **overrides,
        )
        config.validate()

        async def deny(serial: str) -> None:
            self.denied.append(serial)

        return OperatorService(
            config,
            self.issuer,
            self.repo,
            deny,
            self.clock,
            trust_domain="example.org",
            fetch=self.provider.fetch,
        )


@pytest.fixture
async def env(tmp_path: Path) -> AsyncIterator[Env]:
    storage = await open_storage(f"sqlite:///{tmp_path / 'broker.db'}")
    await storage.migrate()
    clock = FakeClock(T0)
    yield Env(
        Provider(),
        clock,
        RecordingIssuer(clock),
        storage.operators(),
        [],
    )
    await storage.close()


async def test_login_issues_with_roles_and_records_the_session(env: Env) -> None:
    svc = env.service()
    token = env.provider.token(groups=["ops", "audit"], auth_time=int(T0.timestamp()))
    result = await svc.login(token, "n-1", _csr(), None)
    spiffe_id, ttl, cert = env.issuer.calls[0]
    assert spiffe_id == "spiffe://example.org/broker/operator/alice"
    assert ttl == dt.timedelta(hours=1)
    claims = operator_claims_of(cert)
    assert claims is not None and claims.roles == {"admin", "auditor"}
    assert claims.amr == ("pwd", "otp")
    assert result.session.roles == ("admin", "auditor")
    assert [s.serial for s in await svc.list_sessions()] == [result.session.serial]


@pytest.mark.parametrize(
    ("claims", "error", "message"),
    [
        ({"amr": None}, PermissionDenied, "login needs MFA"),
        ({"amr": ["pwd"]}, PermissionDenied, "login needs MFA"),
        ({"amr": "otp"}, PermissionDenied, "login needs MFA"),  # not a list
        ({"groups": ["nobody"]}, PermissionDenied, "has no broker role"),
        ({"groups": None}, PermissionDenied, "has no broker role"),
        ({"sub": "x/../admin"}, Unauthenticated, "not allowed in an operator identity"),
        ({"sub": 42}, Unauthenticated, "must be a string"),
    ],
)
async def test_refused_logins_issue_and_record_nothing(
    env: Env, claims: dict[str, Any], error: type[Exception], message: str
) -> None:
    svc = env.service()
    token = env.provider.token(**({"groups": ["ops"]} | claims))
    with pytest.raises(error, match=message):
        await svc.login(token, "n-1", _csr(), None)
    assert env.issuer.calls == []
    assert await svc.list_sessions(include_inactive=True) == []


async def test_acr_counts_as_mfa_when_configured(env: Env) -> None:
    svc = env.service(mfa_acr=("urn:example:mfa",))
    token = env.provider.token(groups=["ops"], amr=None, acr="urn:example:mfa")
    await svc.login(token, "n-1", _csr(), None)
    assert len(env.issuer.calls) == 1
    token = env.provider.token(groups=["ops"], amr=None, acr="urn:example:pwd", nonce="n-2")
    with pytest.raises(PermissionDenied, match="login needs MFA"):
        await svc.login(token, "n-2", _csr(), None)


async def test_ttl_is_capped_by_the_session_and_the_maximum(env: Env) -> None:
    svc = env.service()
    auth_time = int(T0.timestamp()) - 7 * 3600  # signed in 7 h ago; session max 8 h
    token = env.provider.token(groups=["ops"], auth_time=auth_time)
    await svc.login(token, "n-1", _csr(), dt.timedelta(hours=4))
    assert env.issuer.calls[0][1] == dt.timedelta(hours=1)  # not beyond the session
    token = env.provider.token(groups=["ops"], nonce="n-2")
    with pytest.raises(InvalidArgument, match="at most 8h"):
        await svc.login(token, "n-2", _csr(), dt.timedelta(hours=9))
    token = env.provider.token(groups=["ops"], nonce="n-3", auth_time=auth_time - 3600)
    with pytest.raises(Unauthenticated, match=r"session .* is over"):
        await svc.login(token, "n-3", _csr(), None)
    assert len(env.issuer.calls) == 1


async def test_a_configured_subject_claim_names_the_operator(env: Env) -> None:
    svc = env.service(subject_claim="email")
    token = env.provider.token(groups=["ops"], email="alice.smith@example.org")
    await svc.login(token, "n-1", _csr(), None)
    assert (
        env.issuer.calls[0][0] == "spiffe://example.org/broker/operator/alice.smith_40example.org"
    )
    token = env.provider.token(groups=["ops"], nonce="n-2")  # no email claim
    with pytest.raises(Unauthenticated, match="no 'email' claim"):
        await svc.login(token, "n-2", _csr(), None)


async def test_a_bad_csr_does_not_spend_the_token(env: Env) -> None:
    svc = env.service()
    token = env.provider.token(groups=["ops"])
    with pytest.raises(Exception, match="CSR"):
        await svc.login(token, "n-1", b"not a csr", None)
    await svc.login(token, "n-1", _csr(), None)
    with pytest.raises(Unauthenticated, match="used for a login already"):
        await svc.login(token, "n-1", _csr(), None)


async def test_revoke_denies_serials(env: Env) -> None:
    svc = env.service()
    first = await svc.login(env.provider.token(groups=["ops"]), "n-1", _csr(), None)
    second = await svc.login(env.provider.token(groups=["ops"], nonce="n-2"), "n-2", _csr(), None)
    revoked = await svc.revoke("alice")
    assert {r.serial for r in revoked} == {first.session.serial, second.session.serial}
    assert sorted(env.denied) == sorted([first.session.serial, second.session.serial])
    assert await svc.list_sessions() == []
