"""Root CA rotation: the phases, the pure planner that moves between them, and cross-signing.

A planned rotation goes through three phases, each visible in `broker ca status`:

- **steady**: one root, active. Issuing generations are signed by it.
- **publishing** (`broker ca rotate --root`): a new root is *prepared*. It is published in the
  trust bundle next to the old one (spiffe_sequence bumped) and has signed nothing; the old root
  still signs the issuing CAs. A cross-certificate (the new root's key certified by the old
  root) lets a relying party that holds only the old root verify chains under the new one.
  This phase lasts `activate_at - prepared_at` (by default the bundle's refresh hint), so every
  relying party that refreshes its bundle on that hint has both roots before the first
  signature.
- **overlap**: the new root is *active* and the old one *retired*. The first plan after
  `activate_at` activates the new root, retires the old, and moves the issuing CAs under the
  new root (a new generation is prepared and activated at once; the old one retires and a
  prepared one under the old root is dropped unused). Both roots stay in the bundle. The old
  root is certified by the new one too (the second cross-certificate).
- back to **steady** once every issuing generation signed by the old root has expired (so has
  every SVID: leaves never outlive their issuer): the old root is *expired*, dropped from the
  bundle, and its key destroyed.

The emergency path (`--root --compromised`) is not planned here: it replaces every root at
once (see `broker.authority.manager`).

`plan_roots` is pure and idempotent, like `ca.rotation.plan`; the caller applies its actions
as compare-and-set transitions under the rotation lease.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import enum
from collections.abc import Sequence

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from ca.clock import utc
from ca.errors import CAStateError
from ca.x509svid import _hash_for

__all__ = [
    "ActivateRoot",
    "ExpireRoot",
    "RootAction",
    "RootPhase",
    "RootView",
    "cross_sign",
    "phase_of",
    "plan_roots",
    "signed_by",
]


class RootPhase(enum.StrEnum):
    STEADY = "steady"
    PUBLISHING = "publishing"
    OVERLAP = "overlap"


@dataclasses.dataclass(frozen=True, slots=True)
class RootView:
    """What the planner needs about one root. `activate_at` is set for a prepared root;
    `open_issuing` counts the issuing generations it signed that have not expired yet."""

    id: str
    state: str
    activate_at: dt.datetime | None = None
    open_issuing: int = 0


@dataclasses.dataclass(frozen=True, slots=True)
class ActivateRoot:
    """Make the prepared root active, retire the active one, move issuing CAs under it."""

    id: str
    retire: str | None


@dataclasses.dataclass(frozen=True, slots=True)
class ExpireRoot:
    """Nothing the retired root signed is still valid: drop it from the bundle."""

    id: str


RootAction = ActivateRoot | ExpireRoot


def _one(roots: Sequence[RootView], state: str) -> RootView | None:
    found = [r for r in roots if r.state == state]
    if len(found) > 1:
        raise CAStateError(
            f"CA journal has {len(found)} {state} roots ({', '.join(r.id for r in found)}); "
            "at most one is allowed"
        )
    return found[0] if found else None


def phase_of(roots: Sequence[RootView]) -> RootPhase:
    if _one(roots, "prepared") is not None:
        return RootPhase.PUBLISHING
    if any(r.state == "retired" for r in roots):
        return RootPhase.OVERLAP
    return RootPhase.STEADY


def plan_roots(now: dt.datetime, roots: Sequence[RootView]) -> list[RootAction]:
    """The root transitions due at `now`, in order. [] means nothing to do."""
    now = utc(now)
    actions: list[RootAction] = []
    prepared = _one(roots, "prepared")
    active = _one(roots, "active")
    if prepared is not None:
        if prepared.activate_at is None:
            raise CAStateError(f"prepared root {prepared.id} has no activation time")
        if now >= utc(prepared.activate_at):
            actions.append(ActivateRoot(prepared.id, active.id if active is not None else None))
    for root in roots:
        if root.state == "retired" and root.open_issuing == 0:
            actions.append(ExpireRoot(root.id))
    return actions


def signed_by(cert: x509.Certificate, issuer: x509.Certificate) -> bool:
    """Whether `cert` was issued by `issuer` (name and signature)."""
    try:
        cert.verify_directly_issued_by(issuer)
    except (ValueError, TypeError, InvalidSignature):
        return False
    return True


def cross_sign(
    issuer_signer: ec.EllipticCurvePrivateKey,
    issuer_cert: x509.Certificate,
    subject_cert: x509.Certificate,
    not_after: dt.datetime | None = None,
) -> x509.Certificate:
    """A cross-certificate: `subject_cert`'s name, key and extensions (SKI, CA constraints,
    SAN), issued by `issuer_cert` and signed with its key. A chain `... -> subject root` then
    also verifies as `... -> cross -> issuer root`, provided the issuer root's path length
    allows one more CA below it (roots made by the broker allow two).

    Validity: the subject's, cut to the issuer's (and to `not_after` when given)."""
    if issuer_signer.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    ) != issuer_cert.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    ):
        raise CAStateError("the cross-signing key does not match the issuing root certificate")
    ends = [subject_cert.not_valid_after_utc, issuer_cert.not_valid_after_utc]
    if not_after is not None:
        ends.append(utc(not_after))
    start = max(subject_cert.not_valid_before_utc, issuer_cert.not_valid_before_utc)
    end = min(ends)
    if end <= start:
        raise CAStateError("the two roots' validity periods do not overlap")
    try:
        issuer_ski = issuer_cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier)
        aki = x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(issuer_ski.value)
    except x509.ExtensionNotFound:
        aki = x509.AuthorityKeyIdentifier.from_issuer_public_key(
            issuer_cert.public_key()  # type: ignore[arg-type]
        )
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject_cert.subject)
        .issuer_name(issuer_cert.subject)
        .public_key(subject_cert.public_key())  # type: ignore[arg-type]
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(end)
    )
    for ext in subject_cert.extensions:
        if isinstance(ext.value, x509.AuthorityKeyIdentifier):
            continue
        builder = builder.add_extension(ext.value, critical=ext.critical)
    builder = builder.add_extension(aki, critical=False)
    return builder.sign(issuer_signer, _hash_for(issuer_signer))
