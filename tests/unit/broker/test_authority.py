"""The CA service: bootstrap, rotation on a fake clock, issuance under CA policy, restarts."""

from __future__ import annotations

import datetime as dt
import json
from collections.abc import AsyncIterator
from pathlib import Path

import jwt
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from broker.authority import CAService, CAServiceConfig
from broker.errors import InvalidArgument
from broker.policy import Caller
from broker.storage.factory import open_storage
from broker.storage.interface import Storage
from ca.bundle import TrustBundle
from ca.clock import FakeClock
from ca.errors import CAError, InvalidCSR, InvalidPolicy, InvalidTTL, PolicyViolation
from ca.keys import SoftwareBackend
from ca.x509svid import verify_chain

TD = "example.org"
OPERATOR = Caller("spiffe://example.org/broker/operator/ops", True, roles=frozenset({"admin"}))
WEB = "spiffe://example.org/acme/prod/web"
START = dt.datetime(2026, 3, 1, tzinfo=dt.UTC)


@pytest.fixture
async def storage(tmp_path: Path) -> AsyncIterator[Storage]:
    store = await open_storage(f"sqlite:///{tmp_path / 'broker.db'}")
    await store.migrate()
    yield store
    await store.close()


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock(START)


@pytest.fixture
def keys() -> SoftwareBackend:
    return SoftwareBackend()


def _service(keys: SoftwareBackend, storage: Storage, clock: FakeClock) -> CAService:
    config = CAServiceConfig(
        trust_domain=TD, backend_uri="software:", issuing_ttl=dt.timedelta(days=7)
    )
    return CAService(config, keys, storage, clock)


@pytest.fixture
async def ca(keys: SoftwareBackend, storage: Storage, clock: FakeClock) -> CAService:
    service = _service(keys, storage, clock)
    await service.bootstrap()
    return service


def _chain(issued_chain: list[bytes]) -> list[x509.Certificate]:
    return [x509.load_der_x509_certificate(d) for d in issued_chain]


def _bundle(ca: CAService) -> TrustBundle:
    return TrustBundle.from_jwks(TD, ca.bundle().jwks)


async def test_bootstrap_creates_root_and_active_issuing_ca(ca: CAService) -> None:
    status = await ca.status()
    states = {(a.kind, a.state) for a in status.authorities}
    assert states == {("root", "active"), ("issuing", "active")}
    assert status.trust_domain == TD
    assert status.bundle_sequence >= 1
    bundle = _bundle(ca)
    assert len(bundle.x509_authorities) == 1
    assert len(bundle.jwt_authorities) == 1
    assert bundle.sequence == status.bundle_sequence


async def test_restart_keeps_the_same_ca(
    ca: CAService, keys: SoftwareBackend, storage: Storage, clock: FakeClock
) -> None:
    before = await ca.status()
    again = _service(keys, storage, clock)
    await again.bootstrap()
    after = await again.status()
    assert [a.fingerprint_sha256 for a in after.authorities] == [
        a.fingerprint_sha256 for a in before.authorities
    ]
    assert again.bundle().jwks == ca.bundle().jwks


async def test_mint_with_generated_key_verifies_against_bundle(
    ca: CAService, clock: FakeClock
) -> None:
    issued = await ca.mint_x509(
        WEB, ttl=dt.timedelta(minutes=30), csr=None, key_type=None, dns_names=(), caller=OPERATOR
    )
    leaf, *intermediates = _chain(issued.chain_der)
    verify_chain(leaf, intermediates, ca.bundle().x509_authorities, clock.now(), trust_domain=TD)
    assert leaf.not_valid_after_utc == clock.now() + dt.timedelta(minutes=30)
    assert issued.private_key_der is not None
    key = serialization.load_der_private_key(issued.private_key_der, None)
    assert key.public_key().public_numbers() == leaf.public_key().public_numbers()  # type: ignore[union-attr]
    assert issued.serial == format(leaf.serial_number, "x")


async def test_mint_from_csr_keeps_the_workload_key(ca: CAService) -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([]))
        .sign(key, hashes.SHA256())
        .public_bytes(serialization.Encoding.PEM)
    )
    issued = await ca.mint_x509(
        WEB, ttl=None, csr=csr, key_type=None, dns_names=(), caller=OPERATOR
    )
    leaf = _chain(issued.chain_der)[0]
    assert issued.private_key_der is None
    assert leaf.public_key().public_numbers() == key.public_key().public_numbers()  # type: ignore[union-attr]
    # policy default TTL: 1 h
    lifetime = leaf.not_valid_after_utc - leaf.not_valid_before_utc
    assert dt.timedelta(hours=1) <= lifetime <= dt.timedelta(hours=1, minutes=1)


@pytest.mark.parametrize(
    ("spiffe_id", "ttl", "error", "message"),
    [
        ("spiffe://example.org/acme/../web", None, InvalidArgument, "'..'"),
        ("spiffe://example.org/acme//web", None, InvalidArgument, "empty"),
        ("spiffe://other.org/acme/prod/web", None, InvalidArgument, "not in"),
        ("spiffe://example.org/" + "a" * 2100, None, InvalidArgument, "2048"),
        ("spiffe://example.org/a b", None, InvalidArgument, "not allowed"),
        ("spiffe://example.org", None, InvalidArgument, "no path"),
        ("spiffe://example.org/broker/server", None, PolicyViolation, "reserved"),
        (WEB, dt.timedelta(0), InvalidTTL, "must be positive"),
        (WEB, dt.timedelta(seconds=-60), InvalidTTL, "must be positive"),
        (WEB, dt.timedelta(hours=25), PolicyViolation, "24h"),
    ],
)
async def test_bad_requests_are_refused(
    ca: CAService, spiffe_id: str, ttl: dt.timedelta | None, error: type[Exception], message: str
) -> None:
    with pytest.raises(error, match=message):
        await ca.mint_x509(
            spiffe_id, ttl=ttl, csr=None, key_type=None, dns_names=(), caller=OPERATOR
        )


@pytest.mark.parametrize(
    "csr",
    [
        b"",
        b"garbage",
        b"-----BEGIN CERTIFICATE REQUEST-----\nMIIB\n-----END CERTIFICATE REQUEST-----\n",
        b"0" * 20000,
    ],
)
async def test_bad_csrs_are_refused(ca: CAService, csr: bytes) -> None:
    with pytest.raises(InvalidCSR):
        await ca.mint_x509(WEB, ttl=None, csr=csr, key_type=None, dns_names=(), caller=OPERATOR)


async def test_csr_with_broken_signature_is_refused(ca: CAService) -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    der = bytearray(
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([]))
        .sign(key, hashes.SHA256())
        .public_bytes(serialization.Encoding.DER)
    )
    der[-3] ^= 0x01  # inside the signature
    with pytest.raises(InvalidCSR, match="signature"):
        await ca.mint_x509(
            WEB, ttl=None, csr=bytes(der), key_type=None, dns_names=(), caller=OPERATOR
        )


async def test_jwt_svid_verifies_with_bundle_key(ca: CAService, clock: FakeClock) -> None:
    issued = await ca.mint_jwt(WEB, ("db",), ttl=dt.timedelta(minutes=5), caller=OPERATOR)
    header = jwt.get_unverified_header(issued.token)
    assert header == {"alg": "ES256", "kid": issued.kid, "typ": "JWT"}
    public = _bundle(ca).jwt_authorities[issued.kid]
    claims = jwt.decode(
        issued.token,
        public,
        algorithms=["ES256"],
        audience="db",  # type: ignore[arg-type]
        options={"verify_exp": False},
    )
    assert claims["sub"] == WEB
    assert claims["exp"] == int((clock.now() + dt.timedelta(minutes=5)).timestamp())
    with pytest.raises(InvalidArgument, match="audience"):
        await ca.mint_jwt(WEB, (), ttl=None, caller=OPERATOR)
    with pytest.raises(PolicyViolation):
        await ca.mint_jwt(WEB, ("db",), ttl=dt.timedelta(hours=2), caller=OPERATOR)


async def test_policy_set_validates_whole_document_and_limits_requests(ca: CAService) -> None:
    doc = {
        "rules": [
            {
                "pattern": "spiffe://example.org/acme/prod/*",
                "x509_default_ttl": "10m",
                "x509_max_ttl": "1h",
                "jwt_default_ttl": "1m",
                "jwt_max_ttl": "5m",
                "key_types": ["ec-p256"],
            }
        ]
    }
    version = await ca.set_policy(json.dumps(doc), OPERATOR)
    assert version == 1
    assert ca.policy_document().author == OPERATOR.spiffe_id
    with pytest.raises(PolicyViolation, match="1h"):
        await ca.mint_x509(
            WEB, ttl=dt.timedelta(hours=2), csr=None, key_type=None, dns_names=(), caller=OPERATOR
        )
    with pytest.raises(PolicyViolation, match="no CA policy rule"):
        await ca.mint_x509(
            "spiffe://example.org/acme/dev/web",
            ttl=None,
            csr=None,
            key_type=None,
            dns_names=(),
            caller=OPERATOR,
        )
    with pytest.raises(PolicyViolation, match="ec-p256"):
        await ca.mint_x509(
            WEB, ttl=None, csr=None, key_type="ec-p384", dns_names=(), caller=OPERATOR
        )
    # refused documents change nothing
    for bad in (
        "not json",
        "[]",
        json.dumps({"rules": [{"pattern": "x"}]}),
        json.dumps({"rules": doc["rules"], "extra": 1}),
    ):
        with pytest.raises((InvalidPolicy, CAError)):
            await ca.set_policy(bad, OPERATOR)
    assert ca.policy_document().version == 1


async def test_policy_whose_max_ttl_outlives_rotation_is_refused(
    keys: SoftwareBackend, storage: Storage, clock: FakeClock
) -> None:
    config = CAServiceConfig(
        trust_domain=TD, backend_uri="software:", issuing_ttl=dt.timedelta(days=1)
    )
    service = CAService(config, keys, storage, clock)
    await service.bootstrap()  # the built-in policy adapts: at most 4 h for a 1-day CA
    with pytest.raises(PolicyViolation, match="4h"):
        await service.mint_x509(
            WEB,
            ttl=dt.timedelta(hours=5),
            csr=None,
            key_type=None,
            dns_names=(),
            caller=OPERATOR,
        )
    doc = {
        "rules": [
            {"pattern": "spiffe://example.org/**", "x509_max_ttl": "24h", "x509_default_ttl": "1h"}
        ]
    }
    with pytest.raises(InvalidPolicy):
        await service.set_policy(json.dumps(doc), OPERATOR)
    assert service.policy_document().version == 0


async def test_scheduled_rotation_publishes_before_signing_and_keeps_old_svids_valid(
    ca: CAService, clock: FakeClock
) -> None:
    first = await ca.mint_x509(
        WEB, ttl=dt.timedelta(hours=24), csr=None, key_type=None, dns_names=(), caller=OPERATOR
    )
    first_jwt = await ca.mint_jwt(WEB, ("db",), ttl=dt.timedelta(hours=1), caller=OPERATOR)
    seq0 = ca.bundle().sequence

    clock.advance(days=3.6)  # past 1/2 of the 7-day issuing CA
    assert await ca.rotate() == ["prepared issuing-2"]
    status = await ca.status()
    prepared = next(a for a in status.authorities if a.id == "issuing-2")
    assert prepared.state == "prepared"
    assert prepared.jwt_kid in _bundle(ca).jwt_authorities  # published before it signs
    assert ca.bundle().sequence > seq0
    still_old = await ca.mint_jwt(WEB, ("db",), ttl=None, caller=OPERATOR)
    assert still_old.kid == first_jwt.kid

    clock.advance(days=2.3)  # past 5/6
    assert await ca.rotate() == ["activated issuing-2", "retired issuing-1"]
    second = await ca.mint_x509(
        WEB, ttl=dt.timedelta(hours=1), csr=None, key_type=None, dns_names=(), caller=OPERATOR
    )
    new_jwt = await ca.mint_jwt(WEB, ("db",), ttl=None, caller=OPERATOR)
    assert new_jwt.kid == prepared.jwt_kid
    assert first_jwt.kid in _bundle(ca).jwt_authorities  # retired, still published
    roots = ca.bundle().x509_authorities
    for issued in (second,):
        leaf, *rest = _chain(issued.chain_der)
        verify_chain(leaf, rest, roots, clock.now(), trust_domain=TD)
    assert _chain(second.chain_der)[1] != _chain(first.chain_der)[1]

    clock.advance(days=1.2)  # the old issuing CA has expired: dropped, keys destroyed
    done = await ca.rotate()
    assert "expired issuing-1" in done
    assert first_jwt.kid not in _bundle(ca).jwt_authorities


async def test_forced_rotation_and_every_valid_svid_still_verifies(
    ca: CAService, clock: FakeClock
) -> None:
    issued = [
        await ca.mint_x509(
            WEB,
            ttl=dt.timedelta(hours=2),
            csr=None,
            key_type=None,
            dns_names=(),
            caller=OPERATOR,
        )
    ]
    for _ in range(3):
        done = await ca.rotate(force=True)
        assert any(line.startswith("activated") for line in done)
        issued.append(
            await ca.mint_x509(
                WEB,
                ttl=dt.timedelta(hours=2),
                csr=None,
                key_type=None,
                dns_names=(),
                caller=OPERATOR,
            )
        )
        clock.advance(minutes=10)
        for svid in issued:
            leaf, *rest = _chain(svid.chain_der)
            verify_chain(leaf, rest, ca.bundle().x509_authorities, clock.now(), trust_domain=TD)
    actives = [
        a for a in (await ca.status()).authorities if a.kind == "issuing" and a.state == "active"
    ]
    assert len(actives) == 1
    assert actives[0].generation == 4


async def test_rotation_state_survives_restart(
    ca: CAService, keys: SoftwareBackend, storage: Storage, clock: FakeClock
) -> None:
    await ca.rotate(force=True)
    again = _service(keys, storage, clock)
    await again.bootstrap()
    before = {(a.id, a.state) for a in (await ca.status()).authorities}
    after = {(a.id, a.state) for a in (await again.status()).authorities}
    assert before == after
    token = await again.mint_jwt(WEB, ("db",), ttl=None, caller=OPERATOR)
    assert token.kid == next(
        a.jwt_kid
        for a in (await again.status()).authorities
        if a.kind == "issuing" and a.state == "active"
    )


async def test_ca_keys_never_leave_the_backend(ca: CAService, tmp_path: Path) -> None:
    """No private key material in storage: the journal holds labels and certificates only."""
    await ca.mint_x509(WEB, ttl=None, csr=None, key_type=None, dns_names=(), caller=OPERATOR)
    data = (tmp_path / "broker.db").read_bytes()
    assert b"PRIVATE KEY" not in data
    for record in await ca._storage.list_authorities():
        signer = ca._keys.signer(record.key_label)
        with pytest.raises(Exception):  # noqa: B017 - any refusal will do
            signer.private_bytes(
                serialization.Encoding.DER,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
