"""Root CA rotation on a fake clock: planned (publish, overlap, retire) and compromised."""

from __future__ import annotations

import datetime as dt
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from cryptography import x509

from broker.authority import CAService, CAServiceConfig, IssuedX509
from broker.errors import FailedPrecondition
from broker.policy import Caller
from broker.storage.factory import open_storage
from broker.storage.interface import Storage
from ca.clock import FakeClock
from ca.errors import CAError
from ca.keys import SoftwareBackend
from ca.rootrotation import RootPhase, RootView, phase_of, plan_roots
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


async def _mint(ca: CAService, hours: float = 1) -> IssuedX509:
    return await ca.mint_x509(
        WEB, ttl=dt.timedelta(hours=hours), csr=None, key_type=None, dns_names=(), caller=OPERATOR
    )


def _verifies(svid: IssuedX509, roots: list[x509.Certificate], now: dt.datetime) -> bool:
    leaf, *rest = [x509.load_der_x509_certificate(d) for d in svid.chain_der]
    try:
        verify_chain(leaf, rest, roots, now, trust_domain=TD)
    except CAError:
        return False
    return True


def _roots(ca: CAService) -> list[x509.Certificate]:
    return list(ca.bundle().x509_authorities)


async def _states(ca: CAService) -> dict[str, str]:
    return {a.id: a.state for a in (await ca.status()).authorities}


def test_plan_roots_is_pure_and_follows_the_phases() -> None:
    now = START
    steady = [RootView("root-1", "active")]
    assert phase_of(steady) is RootPhase.STEADY and plan_roots(now, steady) == []
    publishing = [*steady, RootView("root-2", "prepared", activate_at=now + dt.timedelta(1))]
    assert phase_of(publishing) is RootPhase.PUBLISHING
    assert plan_roots(now, publishing) == []  # not yet due
    (activate,) = plan_roots(now + dt.timedelta(days=1), publishing)
    assert (activate.id, getattr(activate, "retire", None)) == ("root-2", "root-1")
    overlap = [RootView("root-1", "retired", open_issuing=1), RootView("root-2", "active")]
    assert phase_of(overlap) is RootPhase.OVERLAP and plan_roots(now, overlap) == []
    done = [RootView("root-1", "retired", open_issuing=0), RootView("root-2", "active")]
    assert [a.id for a in plan_roots(now, done)] == ["root-1"]


async def test_planned_root_rotation_publishes_first_then_moves_issuing_then_retires(
    ca: CAService, clock: FakeClock, keys: SoftwareBackend
) -> None:
    (old_root,) = _roots(ca)
    seq0 = ca.bundle().sequence
    before = await _mint(ca, hours=24)

    done = await ca.rotate_root(activate_after=dt.timedelta(minutes=10))
    assert done[0].startswith("prepared root root-2")
    status = await ca.status()
    assert status.root_phase == "publishing"
    assert status.root_phase_until == START + dt.timedelta(minutes=10)
    roots = _roots(ca)
    assert len(roots) == 2 and roots[0] == old_root  # both roots published...
    assert ca.bundle().sequence > seq0
    assert "-----BEGIN CERTIFICATE-----" in ca.bundle().pem and ca.bundle().pem.count("BEGIN") == 2
    during = await _mint(ca)  # ...and the new one signs nothing yet
    assert _verifies(during, [old_root], clock.now())
    assert x509.load_der_x509_certificate(during.chain_der[1]).issuer == old_root.subject
    assert len(during.chain_der) == 2

    clock.advance(minutes=5)
    assert not any("root" in line for line in await ca.rotate())  # not yet due
    clock.advance(minutes=5)
    done = await ca.rotate()
    assert done[:2] == ["activated root root-2", "retired root root-1"]
    assert any(line.startswith("activated issuing-") for line in done)
    new_root = next(r for r in _roots(ca) if r != old_root)
    assert (await ca.status()).root_phase == "overlap"
    after = await _mint(ca)
    issuer = x509.load_der_x509_certificate(after.chain_der[1]).issuer
    assert issuer == new_root.subject  # issuing CAs moved under the new root
    # Everything minted at any point verifies against the bundle a client holds now...
    for svid in (before, during, after):
        assert _verifies(svid, _roots(ca), clock.now())
    # ...and a client that still holds only the old root verifies new SVIDs through the
    # cross-certificate in the chain; one that holds only the new root verifies the new ones.
    assert len(after.chain_der) == 3
    assert _verifies(after, [old_root], clock.now())
    assert _verifies(after, [new_root], clock.now())
    assert len(ca.root_cross_certificates()) == 2  # old by new, new by old

    # The old root stays published until its last issuing CA (7 days) and JWTs are gone.
    clock.advance(days=3)
    await ca.rotate()
    assert len(_roots(ca)) == 2
    status = await ca.status()
    assert status.root_phase == "overlap" and status.root_phase_until is not None
    clock.advance(days=4.1)
    done = await ca.rotate()
    assert "expired root root-1" in done
    assert _roots(ca) == [new_root]
    assert (await ca.status()).root_phase == "steady"
    assert ca.root_cross_certificates() == ()
    states = await _states(ca)
    assert states["root-1"] == "expired" and states["root-2"] == "active"
    label = next(r.key_label for r in ca.authorities.snapshot().records if r.id == "root-1")
    assert not keys.has_key(label)  # the old root's key is destroyed
    assert len((await _mint(ca)).chain_der) == 2


async def test_a_root_rotation_while_one_is_in_progress_is_refused_and_changes_nothing(
    ca: CAService, clock: FakeClock
) -> None:
    await ca.rotate_root(activate_after=dt.timedelta(minutes=10))
    states, sequence = await _states(ca), ca.bundle().sequence
    with pytest.raises(FailedPrecondition, match=r"already in progress.*publishing"):
        await ca.rotate_root()
    assert await _states(ca) == states and ca.bundle().sequence == sequence
    clock.advance(minutes=11)
    await ca.rotate()  # now in overlap: still refused
    states, sequence = await _states(ca), ca.bundle().sequence
    with pytest.raises(FailedPrecondition, match="overlap"):
        await ca.rotate_root()
    assert await _states(ca) == states and ca.bundle().sequence == sequence


async def test_a_negative_activation_delay_is_refused(ca: CAService) -> None:
    states = await _states(ca)
    with pytest.raises(FailedPrecondition, match="negative"):
        await ca.rotate_root(activate_after=dt.timedelta(seconds=-1))
    assert await _states(ca) == states


async def test_compromised_root_is_removed_at_once_and_issuing_replaced(
    ca: CAService, clock: FakeClock, keys: SoftwareBackend
) -> None:
    (old_root,) = _roots(ca)
    before = await _mint(ca, hours=24)
    old_records = ca.authorities.snapshot().records
    seq = ca.bundle().sequence

    done = await ca.rotate_root(compromised=True)
    assert "removed root root-1 from the bundle" in done
    assert "removed issuing-1" in done
    roots = _roots(ca)
    assert len(roots) == 1 and roots[0] != old_root  # only the new root, at once
    assert ca.bundle().sequence > seq
    assert not _verifies(before, roots, clock.now())  # what chains to the old root is out
    after = await _mint(ca)
    assert _verifies(after, roots, clock.now())
    # Workload SVIDs chain only to the new root (no cross-certificate from the old one).
    assert len(after.chain_der) == 2 and not _verifies(after, [old_root], clock.now())
    assert len(ca.chain_extra()) == 1  # only the broker's serving chain carries it
    states = await _states(ca)
    assert states["root-1"] == "expired" and states["issuing-1"] == "expired"
    assert states["root-2"] == "active" and (await ca.status()).root_phase == "steady"
    for record in old_records:  # no key of the old hierarchy is left to sign with
        assert not keys.has_key(record.key_label)
    # The JWT key of the replaced issuing CA left the bundle too.
    (old_kid,) = [r.jwt_kid for r in old_records if r.kind == "issuing" and r.jwt_kid]
    assert old_kid not in ca.bundle().jwks.decode()
    # The new root is vouched for by the old one (so agents can still reach the broker)
    # for the issuing CA TTL at most.
    (cross,) = ca.root_cross_certificates()
    cert = x509.load_der_x509_certificate(cross)
    assert cert.issuer == old_root.subject and cert.subject == roots[0].subject
    assert cert.not_valid_after_utc <= clock.now() + dt.timedelta(days=7)


async def test_compromised_during_a_planned_rotation_replaces_both_roots(
    ca: CAService, clock: FakeClock
) -> None:
    await ca.rotate_root(activate_after=dt.timedelta(minutes=10))
    old = _roots(ca)
    await ca.rotate_root(compromised=True)
    (root,) = _roots(ca)
    assert root not in old
    assert (await ca.status()).root_phase == "steady"
    clock.advance(minutes=20)
    assert not any("root" in line for line in await ca.rotate())  # nothing left to activate


async def test_root_rotation_state_survives_a_restart(
    ca: CAService, keys: SoftwareBackend, storage: Storage, clock: FakeClock
) -> None:
    await ca.rotate_root(activate_after=dt.timedelta(minutes=10))
    again = _service(keys, storage, clock)
    await again.bootstrap()
    assert (await again.status()).root_phase == "publishing"
    assert len(_roots(again)) == 2
    clock.advance(minutes=10)
    assert "activated root root-2" in await again.rotate()
    await ca.sync()  # the other replica picks the change up
    assert ca.bundle().sequence == again.bundle().sequence
    assert (await ca.status()).root_phase == "overlap"
