"""ca.rootrotation: cross-certificates and the journal checks of the root planner."""

from __future__ import annotations

import datetime as dt

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec

from ca.errors import CAStateError
from ca.rootrotation import RootView, cross_sign, phase_of, plan_roots, signed_by
from ca.spiffeid import SpiffeId
from ca.x509svid import LeafIssuer, build_intermediate, build_root, verify_chain

TD = "example.org"
NOW = dt.datetime(2026, 3, 1, tzinfo=dt.UTC)


def _root(name: str, path_length: int = 2) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    key = ec.generate_private_key(ec.SECP256R1())
    return key, build_root(
        key, TD, NOW, dt.timedelta(days=30), subject_cn=name, path_length=path_length
    )


def test_a_cross_certificate_carries_the_subject_root_under_the_issuer_root() -> None:
    old_key, old = _root("old")
    new_key, new = _root("new")
    cross = cross_sign(old_key, old, new)
    assert cross.subject == new.subject and cross.issuer == old.subject
    assert cross.public_key() == new.public_key()
    assert signed_by(cross, old) and not signed_by(cross, new)
    assert cross.not_valid_after_utc <= min(old.not_valid_after_utc, new.not_valid_after_utc)
    capped = cross_sign(old_key, old, new, NOW + dt.timedelta(days=1))
    assert capped.not_valid_after_utc == NOW + dt.timedelta(days=1)
    # A leaf under the new root verifies against the old root alone through it.
    issuing_key = ec.generate_private_key(ec.SECP256R1())
    issuing = build_intermediate(
        new_key, new, issuing_key.public_key(), TD, NOW, dt.timedelta(days=1)
    )
    leaf = LeafIssuer(issuing_key, issuing).issue(
        ec.generate_private_key(ec.SECP256R1()).public_key(),
        SpiffeId.parse(f"spiffe://{TD}/a/b/c"),
        NOW,
        dt.timedelta(hours=1),
    )
    verify_chain(leaf, [issuing, cross], [old], NOW, trust_domain=TD)


def test_cross_signing_with_a_key_that_is_not_the_issuers_is_refused() -> None:
    _, old = _root("old")
    other_key, _ = _root("other")
    _, new = _root("new")
    with pytest.raises(CAStateError, match="does not match"):
        cross_sign(other_key, old, new)


def test_two_prepared_roots_or_a_prepared_root_without_a_time_are_refused() -> None:
    two = [RootView("root-2", "prepared", NOW), RootView("root-3", "prepared", NOW)]
    with pytest.raises(CAStateError, match="2 prepared roots"):
        phase_of(two)
    with pytest.raises(CAStateError, match="no activation time"):
        plan_roots(NOW, [RootView("root-1", "active"), RootView("root-2", "prepared")])
