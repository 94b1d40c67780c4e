"""The agent across root rotations: it follows bundles received over its authenticated link,
re-mints what no longer verifies at once, accepts a wholesale root replacement only when a
trusted root vouches for the new one, and keeps what it trusts in its trust store."""

from __future__ import annotations

import datetime as dt
import os
import random
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from broker.agent import Agent, SyncResult
from broker.agenttrust import TrustStore, needs_remint, vouched_for
from ca.bundle import TrustBundle
from ca.clock import FakeClock
from ca.rootrotation import cross_sign
from ca.x509svid import LeafIssuer, build_intermediate, build_root
from tests.unit.broker.test_agent import DB, START, TD, WEB, FakeCA, FakeLink, _inline


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock(START)


class KeyedCA(FakeCA):
    """A FakeCA that keeps its root key (to cross-sign with it)."""

    def __init__(self, clock: FakeClock) -> None:
        super().__init__(clock)
        self.root_key = ec.generate_private_key(ec.SECP256R1())
        self.root = build_root(
            self.root_key, TD, START - dt.timedelta(days=1), dt.timedelta(days=365)
        )
        key = ec.generate_private_key(ec.SECP256R1())
        self.issuing = build_intermediate(
            self.root_key, self.root, key.public_key(), TD, START - dt.timedelta(days=1),
            dt.timedelta(days=30),
        )  # fmt: skip
        self.issuer = LeafIssuer(key, self.issuing)
        self.extra_roots: list[x509.Certificate] = []

    def bundle(self) -> bytes:
        return TrustBundle(
            trust_domain=TD,
            x509_authorities=[*self.extra_roots, self.root],
            jwt_authorities={"k1": self.jwt_key.public_key()},
            sequence=self.sequence,
        ).to_jwks_json()


class CrossLink(FakeLink):
    def __init__(self, ca: FakeCA) -> None:
        super().__init__(ca, [WEB, DB])
        self.cross: tuple[bytes, ...] = ()

    def sync(self) -> SyncResult:
        result = super().sync()
        return SyncResult(
            result.entries,
            result.trust_domain,
            result.bundle_jwks,
            result.bundle_sequence,
            root_cross=self.cross,
        )


def _pem(*certs: x509.Certificate) -> bytes:
    return b"".join(c.public_bytes(serialization.Encoding.PEM) for c in certs)


def _der(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.DER)


def _agent(link: FakeLink, clock: FakeClock, store: TrustStore) -> Agent:
    return Agent(
        link,
        clock,
        trust_anchors=store.roots,
        sync_interval=5,
        rng=random.Random(7),
        blocking=_inline,
        trust_store=store,
    )


def _issuers(agent: Agent) -> set[x509.Certificate]:
    return {x509.load_der_x509_certificate(s.chain_der[1]) for s in agent.snapshot.svids.values()}


async def test_a_compromised_root_replaced_with_a_vouched_root_is_followed_at_once(
    clock: FakeClock, tmp_path: Path
) -> None:
    old = KeyedCA(clock)
    link = CrossLink(old)
    store = TrustStore(_pem(old.root), tmp_path / "trust.pem")
    agent = _agent(link, clock, store)
    await agent.step()
    assert len(agent.snapshot.svids) == 2 and _issuers(agent) == {old.issuing}

    new = KeyedCA(clock)  # the broker's new root; the old one left the bundle at once
    new.sequence = 2
    link.ca = new
    link.cross = (_der(cross_sign(old.root_key, old.root, new.root)),)
    link.calls.clear()
    clock.advance(seconds=5)
    await agent.step()
    assert agent.trust_anchors == (new.root,)
    assert link.roots == _pem(new.root)  # the link verifies the broker with the new root
    # The agent renewed its own identity first, then re-minted every workload SVID.
    assert link.calls[:2] == ["sync", "renew"]
    assert link.calls.count("mint_x509") == 2
    assert _issuers(agent) == {new.issuing}
    for svid in agent.snapshot.svids.values():
        assert not needs_remint(svid.chain_der, [new.root], clock.now(), TD)
        assert needs_remint(svid.chain_der, [old.root], clock.now(), TD)
    # Kept for a restart: the store holds only the new root.
    assert x509.load_pem_x509_certificates((tmp_path / "trust.pem").read_bytes()) == [new.root]
    restarted = TrustStore(_pem(old.root), tmp_path / "trust.pem", pinned_mtime=0.0)
    assert restarted.roots == (new.root,)


async def test_a_replacement_vouched_for_by_an_untrusted_key_is_refused_and_changes_nothing(
    clock: FakeClock, tmp_path: Path
) -> None:
    old = KeyedCA(clock)
    link = CrossLink(old)
    store = TrustStore(_pem(old.root), tmp_path / "trust.pem")
    agent = _agent(link, clock, store)
    await agent.step()
    before = agent.snapshot
    evil, impostor = KeyedCA(clock), KeyedCA(clock)
    evil.sequence = 2
    link.ca = evil
    # A cross-certificate made with a key the agent does not trust (same name as the root).
    link.cross = (_der(cross_sign(impostor.root_key, impostor.root, evil.root)),)
    clock.advance(seconds=5)
    await agent.step()
    assert agent.trust_anchors == (old.root,) and link.roots is None
    assert agent.snapshot.bundle is before.bundle
    assert agent.snapshot.svids == before.svids
    assert not (tmp_path / "trust.pem").exists()


async def test_a_planned_rotation_is_followed_and_survives_a_restart(
    clock: FakeClock, tmp_path: Path
) -> None:
    old = KeyedCA(clock)
    link = CrossLink(old)
    store = TrustStore(_pem(old.root), tmp_path / "trust.pem")
    agent = _agent(link, clock, store)
    await agent.step()
    held = dict(agent.snapshot.svids)

    new = KeyedCA(clock)
    old.extra_roots = [new.root]  # publishing: both roots, the old one still signs
    old.sequence = 2
    clock.advance(seconds=5)
    await agent.step()
    assert set(agent.trust_anchors) == {old.root, new.root}
    assert agent.snapshot.svids == held  # they still verify: nothing re-minted
    stored = x509.load_pem_x509_certificates((tmp_path / "trust.pem").read_bytes())
    assert set(stored) == {old.root, new.root}

    # A restarted agent (same --bundle file, older than the store) trusts both roots, and so
    # follows the broker when the old root is retired (no cross-certificate needed).
    again = _agent(link, clock, TrustStore(_pem(old.root), tmp_path / "trust.pem"))
    assert set(again.trust_anchors) == {old.root, new.root}
    new.sequence = 3
    link.ca = new
    clock.advance(seconds=5)
    await again.step()
    assert again.trust_anchors == (new.root,)
    assert _issuers(again) == {new.issuing}


def test_the_operators_newer_bundle_file_wins_and_a_foreign_store_is_ignored(
    clock: FakeClock, tmp_path: Path
) -> None:
    old, new = KeyedCA(clock), KeyedCA(clock)
    path = tmp_path / "trust.pem"
    path.write_bytes(_pem(old.root))
    os.utime(path, (1000, 1000))
    assert TrustStore(_pem(new.root), path, pinned_mtime=2000).roots == (new.root,)
    assert TrustStore(_pem(new.root), path, pinned_mtime=500).roots == (old.root,)
    foreign_key = ec.generate_private_key(ec.SECP256R1())
    foreign = build_root(foreign_key, "evil.org", START, dt.timedelta(days=1))
    path.write_bytes(_pem(foreign))
    assert TrustStore(_pem(new.root), path).roots == (new.root,)
    path.write_bytes(b"not a certificate")
    assert TrustStore(_pem(new.root), path).roots == (new.root,)


def test_vouched_for_needs_a_valid_cross_certificate_from_a_valid_trusted_root(
    clock: FakeClock,
) -> None:
    old, new = KeyedCA(clock), KeyedCA(clock)
    cross = _der(cross_sign(old.root_key, old.root, new.root))
    now = START
    assert vouched_for([new.root], [cross], [old.root], now)
    assert not vouched_for([new.root], [], [old.root], now)
    assert not vouched_for([new.root], [cross], [new.root], now)  # the issuer is not trusted
    assert not vouched_for([old.root], [cross], [old.root], now)  # not about this root
    assert not vouched_for([new.root], [cross], [old.root], now + dt.timedelta(days=400))
    assert not vouched_for([new.root], [b"junk"], [old.root], now)
