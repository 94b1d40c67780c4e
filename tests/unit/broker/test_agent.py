"""The agent's logic against a fake broker and a fake clock: attestation, half-life renewal
with jitter, entry matching, caching through a broker outage, backoff, bundle pushes, files."""

from __future__ import annotations

import asyncio
import dataclasses
import datetime as dt
import json
import os
import random
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.hashes import SHA256

from broker.agent import (
    Agent,
    AgentEntry,
    AgentSVID,
    FileDelivery,
    JWTResult,
    SyncResult,
    renew_at,
)
from broker.errors import InvalidArgument, PermissionDenied, Unauthenticated, Unavailable
from ca.bundle import TrustBundle
from ca.clock import FakeClock
from ca.jwtsvid import mint_jwt_svid
from ca.spiffeid import SpiffeId
from ca.x509svid import LeafIssuer, build_intermediate, build_root

TD = "example.org"
AGENT_ID = f"spiffe://{TD}/agents/node1"
WEB = AgentEntry("e-web", f"spiffe://{TD}/acme/prod/web", frozenset({"unix:uid:1000"}))
DB = AgentEntry("e-db", f"spiffe://{TD}/acme/prod/db", frozenset({"unix:uid:1001", "unix:gid:5"}))
START = dt.datetime(2026, 5, 1, 12, 0, tzinfo=dt.UTC)


class FakeCA:
    def __init__(self, clock: FakeClock) -> None:
        self.clock = clock
        root_key = ec.generate_private_key(ec.SECP256R1())
        self.root = build_root(root_key, TD, START - dt.timedelta(days=1), dt.timedelta(days=365))
        key = ec.generate_private_key(ec.SECP256R1())
        self.issuing = build_intermediate(
            root_key,
            self.root,
            key.public_key(),
            TD,
            START - dt.timedelta(days=1),
            dt.timedelta(days=30),
        )
        self.issuer = LeafIssuer(key, self.issuing)
        self.jwt_key = ec.generate_private_key(ec.SECP256R1())
        self.sequence = 1
        self.backdate = dt.timedelta(0)  # the broker's CA backdates notBefore (clock skew)

    def bundle(self) -> bytes:
        return TrustBundle(
            trust_domain=TD,
            x509_authorities=[self.root],
            jwt_authorities={"k1": self.jwt_key.public_key()},
            sequence=self.sequence,
            refresh_hint_seconds=60,
        ).to_jwks_json()

    def issue(self, spiffe_id: str, csr_der: bytes, ttl: dt.timedelta) -> AgentSVID:
        csr = x509.load_der_x509_csr(csr_der)
        cert = self.issuer.issue(
            csr.public_key(),
            SpiffeId.parse(spiffe_id),
            self.clock.now(),
            ttl,
            backdate=self.backdate,
        )
        der = (
            cert.public_bytes(serialization.Encoding.DER),
            self.issuing.public_bytes(serialization.Encoding.DER),
        )
        return AgentSVID(spiffe_id, der, cert.not_valid_after_utc, cert.not_valid_before_utc)


class FakeLink:
    def __init__(self, ca: FakeCA, entries: list[AgentEntry]) -> None:
        self.ca = ca
        self.entries = entries
        self.down = False
        self.calls: list[str] = []
        self.identity: bytes | None = None
        self.roots: bytes | None = None
        self.ttl = dt.timedelta(minutes=10)
        # What an impostor (or a compromised path) would change:
        self.bundle_jwks: bytes | None = None  # instead of the CA's bundle
        self.trust_domain = TD
        self.attest_ca: FakeCA | None = None  # who signs the agent's SVID
        self.mint_ca: FakeCA | None = None  # who signs workload SVIDs
        self.mint_as: str | None = None  # the ID put into workload SVIDs
        self.mint_key: ec.EllipticCurvePrivateKey | None = None  # the key certified instead
        self.jwt_key: ec.EllipticCurvePrivateKey | None = None  # who signs JWT-SVIDs
        self.refuse: dict[str, str] = {}  # entry id -> why the CA refuses to mint for it

    def _check(self, name: str) -> None:
        self.calls.append(name)
        if self.down:
            raise Unavailable("connection refused")

    def attest(self, csr_der: bytes) -> AgentSVID:
        self._check("attest")
        return (self.attest_ca or self.ca).issue(AGENT_ID, csr_der, dt.timedelta(hours=1))

    def use_identity(self, chain_pem: bytes, key_pem: bytes) -> None:
        self.identity = chain_pem

    def use_roots(self, roots_pem: bytes) -> None:
        self.roots = roots_pem

    def renew(self, csr_der: bytes) -> AgentSVID:
        self._check("renew")
        return self.ca.issue(AGENT_ID, csr_der, dt.timedelta(hours=1))

    def sync(self) -> SyncResult:
        self._check("sync")
        return SyncResult(
            list(self.entries),
            self.trust_domain,
            self.bundle_jwks or self.ca.bundle(),
            self.ca.sequence,
        )

    def mint_x509(self, entry_id: str, csr_der: bytes) -> AgentSVID:
        self._check("mint_x509")
        if entry_id in self.refuse:
            raise PermissionDenied(self.refuse[entry_id])
        entry = next(e for e in self.entries if e.id == entry_id)
        if self.mint_key is not None:
            csr_der = _csr_for(self.mint_key)
        issued = (self.mint_ca or self.ca).issue(self.mint_as or entry.spiffe_id, csr_der, self.ttl)
        return dataclasses.replace(issued, spiffe_id=entry.spiffe_id)

    def mint_jwt(self, entry_id: str, audience: Sequence[str]) -> JWTResult:
        self._check("mint_jwt")
        entry = next(e for e in self.entries if e.id == entry_id)
        svid = mint_jwt_svid(
            self.jwt_key or self.ca.jwt_key,
            SpiffeId.parse(entry.spiffe_id),
            list(audience),
            self.ca.clock.now(),
            dt.timedelta(minutes=5),
            kid="k1",
        )
        return JWTResult(entry.spiffe_id, svid.token, svid.expires_at)

    def close(self) -> None:
        pass


def _csr_for(key: ec.EllipticCurvePrivateKey) -> bytes:
    csr = x509.CertificateSigningRequestBuilder().subject_name(x509.Name([])).sign(key, SHA256())
    return csr.public_bytes(serialization.Encoding.DER)


async def _inline(fn: Callable[..., Any], *args: Any) -> Any:
    return fn(*args)


Blocking = Callable[..., Awaitable[Any]]


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock(START)


@pytest.fixture
def link(clock: FakeClock) -> FakeLink:
    return FakeLink(FakeCA(clock), [WEB, DB])


@pytest.fixture
def agent(link: FakeLink, clock: FakeClock) -> Agent:
    return Agent(
        link,
        clock,
        trust_anchors=[link.ca.root],
        sync_interval=5,
        rng=random.Random(7),
        blocking=_inline,
    )


def test_renewal_is_at_half_life_within_ten_percent_jitter() -> None:
    rng = random.Random(1)
    life = dt.timedelta(hours=1)
    points = [renew_at(START, START + life, rng) - START for _ in range(2000)]
    assert min(points) >= life * 0.45 and max(points) <= life * 0.55
    assert max(points) - min(points) > life * 0.08  # it does jitter


async def test_first_step_attests_syncs_and_mints_for_every_entry(
    agent: Agent, link: FakeLink
) -> None:
    await agent.step()
    assert link.calls[:2] == ["attest", "sync"]
    assert link.calls.count("mint_x509") == 2
    assert agent.agent_id == AGENT_ID and link.identity is not None
    assert agent.ready.is_set()
    [svid] = agent.svids_for({"unix:uid:1000", "unix:gid:7"})
    assert svid.spiffe_id == WEB.spiffe_id
    leaf = x509.load_der_x509_certificate(svid.chain_der[0])
    key = serialization.load_der_private_key(svid.key_der, None)
    assert leaf.public_key() == key.public_key()  # type: ignore[union-attr]


async def test_every_selector_of_an_entry_must_match(agent: Agent) -> None:
    await agent.step()
    with pytest.raises(PermissionDenied):
        agent.svids_for({"unix:uid:1001"})  # DB also needs gid 5
    assert [s.spiffe_id for s in agent.svids_for({"unix:uid:1001", "unix:gid:5"})] == [DB.spiffe_id]
    with pytest.raises(PermissionDenied):
        agent.svids_for({"unix:uid:0"})


async def test_before_attestation_callers_get_unavailable(agent: Agent, link: FakeLink) -> None:
    link.down = True
    delay = await agent.step()
    assert delay == 1.0
    with pytest.raises(Unavailable):
        agent.svids_for({"unix:uid:1000"})


async def test_workload_svids_renew_at_half_life(
    agent: Agent, link: FakeLink, clock: FakeClock
) -> None:
    await agent.step()
    before = agent.svids_for({"unix:uid:1000"})[0]
    clock.advance(minutes=4)  # 40 % of 10 minutes: not yet
    await agent.step()
    assert agent.svids_for({"unix:uid:1000"})[0] == before
    clock.advance(minutes=2)  # 60 %: past any jittered half-life
    await agent.step()
    after = agent.svids_for({"unix:uid:1000"})[0]
    assert after.chain_der != before.chain_der and after.key_der != before.key_der


async def test_the_agent_renews_its_own_svid_without_reattesting(
    agent: Agent, link: FakeLink, clock: FakeClock
) -> None:
    await agent.step()
    clock.advance(minutes=34)
    await agent.step()
    assert link.calls.count("attest") == 1 and link.calls.count("renew") == 1


async def test_an_outage_serves_the_cache_then_backs_off_then_expires(
    agent: Agent, link: FakeLink, clock: FakeClock
) -> None:
    await agent.step()
    held = agent.svids_for({"unix:uid:1000"})[0]
    link.down = True
    clock.advance(minutes=6)  # renewal due, broker down
    delays = []
    for _ in range(4):
        delays.append(await agent.step())
        clock.advance(seconds=delays[-1])
    assert delays == [1.0, 2.0, 4.0, 8.0]
    assert agent.svids_for({"unix:uid:1000"})[0] == held  # still served while valid
    clock.set(held.expires_at + dt.timedelta(seconds=1))
    await agent.step()
    with pytest.raises(Unavailable):
        agent.svids_for({"unix:uid:1000"})
    link.down = False
    clock.advance(seconds=60)
    await agent.step()
    assert agent.svids_for({"unix:uid:1000"})[0].expires_at > clock.now()


async def test_bundle_and_entry_changes_bump_the_version_and_wake_watchers(
    agent: Agent, link: FakeLink, clock: FakeClock
) -> None:
    await agent.step()
    version = agent.snapshot.version
    waiter = asyncio.create_task(agent.wait_change(version))
    await asyncio.sleep(0)
    assert not waiter.done()
    link.ca.sequence += 1  # e.g. a prepared CA generation's key was published
    clock.advance(seconds=5)
    await agent.step()
    snapshot = await asyncio.wait_for(waiter, 1)
    assert snapshot.bundle_sequence == link.ca.sequence
    link.entries = [WEB]
    clock.advance(seconds=5)
    await agent.step()
    with pytest.raises(PermissionDenied):
        agent.svids_for({"unix:uid:1001", "unix:gid:5"})


async def test_jwt_svids_are_cached_and_validate_against_the_bundle(
    agent: Agent, link: FakeLink, clock: FakeClock
) -> None:
    await agent.step()
    [first] = await agent.jwt_svids({"unix:uid:1000"}, ["db"])
    [again] = await agent.jwt_svids({"unix:uid:1000"}, ["db"])
    assert first == again and link.calls.count("mint_jwt") == 1
    sub, claims = agent.validate_jwt(first.token, "db")
    assert sub == WEB.spiffe_id and claims["aud"] in ("db", ["db"])
    with pytest.raises(PermissionDenied):
        await agent.jwt_svids({"unix:uid:1000"}, ["db"], spiffe_id=DB.spiffe_id)
    clock.advance(minutes=3)  # past half of the 5-minute JWT
    await agent.jwt_svids({"unix:uid:1000"}, ["db"])
    assert link.calls.count("mint_jwt") == 2


async def test_file_delivery_writes_atomically_with_a_private_key(
    link: FakeLink, clock: FakeClock, tmp_path: Path
) -> None:
    marker = tmp_path / "rotated"
    delivery = FileDelivery(
        tmp_path / "out", frozenset({"unix:uid:1000"}), on_rotate=f"touch {marker}"
    )
    agent = Agent(
        link,
        clock,
        trust_anchors=[link.ca.root],
        rng=random.Random(3),
        blocking=_inline,
        delivery=delivery,
    )
    await agent.step()
    out = tmp_path / "out"
    assert os.stat(out / "key.pem").st_mode & 0o777 == 0o600
    leaf = x509.load_pem_x509_certificates((out / "svid.pem").read_bytes())[0]
    key = serialization.load_pem_private_key((out / "key.pem").read_bytes(), None)
    assert leaf.public_key() == key.public_key()  # type: ignore[union-attr]
    assert x509.load_pem_x509_certificates((out / "bundle.pem").read_bytes())[0] == link.ca.root
    assert marker.exists()
    marker.unlink()
    clock.advance(minutes=6)
    await agent.step()
    assert marker.exists()
    assert x509.load_pem_x509_certificates((out / "svid.pem").read_bytes())[0] != leaf
    assert not [p for p in out.iterdir() if p.name.startswith(".")]  # no temp files left


# -- trust: whoever answers is not trusted for it (issue 20, finding 5) ------------------------


def _bundle_of(*cas: FakeCA, sequence: int, td: str = TD) -> bytes:
    return TrustBundle(
        trust_domain=td,
        x509_authorities=[ca.root for ca in cas],
        jwt_authorities={f"k{i}": ca.jwt_key.public_key() for i, ca in enumerate(cas)},
        sequence=sequence,
    ).to_jwks_json()


def _delivering_agent(link: FakeLink, clock: FakeClock, out: Path) -> Agent:
    delivery = FileDelivery(out, frozenset({"unix:uid:1000"}))
    return Agent(
        link,
        clock,
        trust_anchors=[link.ca.root],
        rng=random.Random(5),
        blocking=_inline,
        delivery=delivery,
    )


def test_an_unusable_pinned_bundle_is_refused(link: FakeLink, clock: FakeClock) -> None:
    with pytest.raises(InvalidArgument, match="pinned bundle"):
        Agent(link, clock, trust_anchors=[], blocking=_inline)


async def test_a_foreign_bundle_at_the_first_sync_is_refused_and_nothing_is_served(
    link: FakeLink, clock: FakeClock, tmp_path: Path
) -> None:
    link.bundle_jwks = _bundle_of(FakeCA(clock), sequence=9)  # "evilca" root and JWT key
    agent = _delivering_agent(link, clock, tmp_path / "out")
    assert await agent.step() == 1.0  # the round failed: backoff
    assert agent.snapshot.bundle is None and not agent.snapshot.svids
    assert "mint_x509" not in link.calls and link.roots is None
    assert not (tmp_path / "out").exists()
    with pytest.raises(Unavailable):
        agent.svids_for({"unix:uid:1000"})


async def test_a_bundle_replacing_every_trusted_root_is_refused_and_changes_nothing(
    link: FakeLink, clock: FakeClock, tmp_path: Path
) -> None:
    agent = _delivering_agent(link, clock, tmp_path / "out")
    await agent.step()
    before = agent.snapshot
    written = (tmp_path / "out" / "bundle.pem").read_bytes()
    evil = FakeCA(clock)
    link.bundle_jwks = _bundle_of(evil, sequence=2)
    link.ca.sequence = 2
    clock.advance(seconds=6)
    await agent.step()
    assert agent.snapshot.bundle is before.bundle
    assert agent.trust_anchors == (link.ca.root,) and link.roots is None
    assert agent.svids_for({"unix:uid:1000"})  # still served: they verify
    assert (tmp_path / "out" / "bundle.pem").read_bytes() == written
    jwks = json.loads(agent.snapshot.jwt_bundle_json)
    assert [k["kid"] for k in jwks["keys"]] == ["k1"]  # not the attacker's JWT key


async def test_a_bundle_for_another_trust_domain_is_refused(
    agent: Agent, link: FakeLink, clock: FakeClock
) -> None:
    await agent.step()
    link.trust_domain = "evil.org"
    link.bundle_jwks = _bundle_of(FakeCA(clock), sequence=2, td="evil.org")
    link.ca.sequence = 2
    clock.advance(seconds=6)
    await agent.step()
    assert agent.snapshot.bundle is not None
    assert agent.snapshot.bundle.trust_domain == TD and agent.snapshot.bundle_sequence == 1


async def test_a_new_root_is_taken_while_a_trusted_root_stays_and_svids_must_verify(
    agent: Agent, link: FakeLink, clock: FakeClock
) -> None:
    await agent.step()
    held = agent.svids_for({"unix:uid:1000"})[0]
    new = FakeCA(clock)
    link.bundle_jwks = _bundle_of(link.ca, new, sequence=2)  # the next root, published early
    link.ca.sequence = 2
    clock.advance(seconds=6)
    await agent.step()
    assert agent.trust_anchors == (link.ca.root, new.root)
    assert link.roots is not None and len(x509.load_pem_x509_certificates(link.roots)) == 2
    assert agent.svids_for({"unix:uid:1000"})[0] == held  # still verifies via the old root
    # The old root leaves the bundle: SVIDs chaining only to it are no longer served, and
    # new ones from the old CA are refused.
    link.bundle_jwks = _bundle_of(new, sequence=3)
    link.ca.sequence = 3
    clock.advance(seconds=6)
    await agent.step()
    assert agent.trust_anchors == (new.root,)
    with pytest.raises(Unavailable):
        agent.svids_for({"unix:uid:1000"})
    link.ca, link.mint_ca = new, new  # the broker now signs under the new root
    clock.advance(seconds=60)
    await agent.step()
    assert agent.svids_for({"unix:uid:1000"})[0].spiffe_id == WEB.spiffe_id


async def test_an_agent_svid_from_a_foreign_ca_is_refused(
    agent: Agent, link: FakeLink, clock: FakeClock
) -> None:
    link.attest_ca = FakeCA(clock)
    await agent.step()
    assert agent.agent_id is None and link.identity is None
    assert link.calls == ["attest"]


@pytest.mark.parametrize("attack", ["foreign CA", "another ID", "another key"])
async def test_workload_svids_that_do_not_verify_are_never_served(
    link: FakeLink, clock: FakeClock, tmp_path: Path, attack: str
) -> None:
    if attack == "foreign CA":
        link.mint_ca = FakeCA(clock)
    elif attack == "another ID":
        link.mint_as = f"spiffe://{TD}/acme/prod/admin"
    else:
        link.mint_key = ec.generate_private_key(ec.SECP256R1())
    agent = _delivering_agent(link, clock, tmp_path / "out")
    assert await agent.step() == 1.0
    assert agent.snapshot.bundle is not None and not agent.snapshot.svids
    with pytest.raises(Unavailable):
        agent.svids_for({"unix:uid:1000"})
    assert not (tmp_path / "out").exists()
    assert not agent.ready.is_set()


async def test_a_jwt_svid_signed_by_a_foreign_key_is_refused_and_not_cached(
    agent: Agent, link: FakeLink
) -> None:
    await agent.step()
    link.jwt_key = ec.generate_private_key(ec.SECP256R1())  # same kid, another key
    for _ in range(2):
        with pytest.raises(Unauthenticated, match="does not validate"):
            await agent.jwt_svids({"unix:uid:1000"}, ["db"])
    assert link.calls.count("mint_jwt") == 2


async def test_jwt_cache_survives_a_new_jwt_key_and_is_dropped_when_a_key_leaves(
    agent: Agent, link: FakeLink, clock: FakeClock
) -> None:
    await agent.step()
    await agent.jwt_svids({"unix:uid:1000"}, ["db"])
    prepared = FakeCA(clock)
    both = TrustBundle(
        trust_domain=TD,
        x509_authorities=[link.ca.root],
        jwt_authorities={"k1": link.ca.jwt_key.public_key(), "k2": prepared.jwt_key.public_key()},
        sequence=2,
    )
    link.bundle_jwks, link.ca.sequence = both.to_jwks_json(), 2
    clock.advance(seconds=6)
    await agent.step()
    await agent.jwt_svids({"unix:uid:1000"}, ["db"])
    assert link.calls.count("mint_jwt") == 1  # still cached: its key is still published
    only_new = TrustBundle(
        trust_domain=TD,
        x509_authorities=[link.ca.root],
        jwt_authorities={"k2": prepared.jwt_key.public_key()},
        sequence=3,
    )
    link.bundle_jwks, link.ca.sequence = only_new.to_jwks_json(), 3
    link.jwt_key = prepared.jwt_key
    clock.advance(seconds=6)
    await agent.step()
    with pytest.raises(Unauthenticated):  # the fake still says kid k1: refused, not cached
        await agent.jwt_svids({"unix:uid:1000"}, ["db"])
    assert link.calls.count("mint_jwt") == 2


# -- resilience (issue 15): one failing entry, short SVIDs, health -----------------------------


async def test_a_failing_entry_never_delays_the_others_or_the_bundle(
    agent: Agent, link: FakeLink, clock: FakeClock, caplog: pytest.LogCaptureFixture
) -> None:
    refusal = "DNS name 'web.internal' is not allowed for this SPIFFE ID by CA policy"
    link.refuse[WEB.id] = refusal
    assert await agent.step() == 1.0  # the failing entry's own retry, not a round backoff
    assert [s.spiffe_id for s in agent.svids_for({"unix:uid:1001", "unix:gid:5"})] == [DB.spiffe_id]
    state, reasons = agent.health()
    assert state == "degraded" and reasons == [f"entry {WEB.id}: {refusal}"]

    # A rotation publishes a new bundle: it reaches subscribers within the sync interval
    # although the entry keeps failing (its retries back off on their own: 2, 4, 8 ... s).
    syncs = link.calls.count("sync")
    link.ca.sequence += 1
    elapsed = 0.0
    while True:
        delay = await agent.step()
        if agent.snapshot.bundle_sequence == link.ca.sequence:
            break
        clock.advance(seconds=delay)
        elapsed += delay
        assert elapsed <= 5.0, "the bundle waited for the failing entry"
    for _ in range(30):  # a minute of rounds
        clock.advance(seconds=await agent.step())
    assert link.calls.count("sync") >= syncs + 12  # every 5 s, whatever the entry does
    mints = link.calls.count("mint_x509")
    assert mints < 2 + 12  # the failing entry backs off: not a mint per round

    del link.refuse[WEB.id]
    caplog.clear()
    with caplog.at_level("INFO", logger="broker.agent"):
        for _ in range(70):
            clock.advance(seconds=await agent.step())
            if agent.health()[0] == "ready":
                break
    assert agent.health() == ("ready", [])
    assert [s.spiffe_id for s in agent.svids_for({"unix:uid:1000"})] == [WEB.spiffe_id]
    assert any("minted again after" in r.getMessage() for r in caplog.records)


async def test_a_short_svid_is_renewed_at_half_its_life_from_arrival_not_from_not_before(
    agent: Agent, link: FakeLink, clock: FakeClock
) -> None:
    """A 30 s SVID with notBefore backdated 60 s: half-life from notBefore lies in the past,
    which made the agent re-mint at every round (82 times in 45 s)."""
    link.ca.backdate = dt.timedelta(seconds=60)
    link.ttl = dt.timedelta(seconds=30)
    await agent.step()
    mints = link.calls.count("mint_x509")
    held = agent.svids_for({"unix:uid:1000"})[0]
    assert held.not_before < clock.now() - dt.timedelta(seconds=59)
    assert held.renew_at >= clock.now() + dt.timedelta(seconds=13)
    for _ in range(12):  # 12 s of one-second rounds: nothing due
        clock.advance(seconds=1)
        await agent.step()
    assert link.calls.count("mint_x509") == mints
    clock.advance(seconds=5)  # past 55 % of 30 s after arrival
    await agent.step()
    assert link.calls.count("mint_x509") == mints + 2  # both entries, once


async def test_health_is_starting_then_ready_then_degraded_in_an_outage(
    agent: Agent, link: FakeLink, clock: FakeClock
) -> None:
    state, reasons = agent.health()
    assert state == "starting" and reasons
    await agent.step()
    assert agent.health() == ("ready", [])
    link.down = True
    clock.advance(seconds=5)
    await agent.step()
    state, reasons = agent.health()
    assert state == "degraded"
    assert reasons == ["broker rounds failing (1): connection refused"]
