"""Management of the CA's authorities: the root, the issuing generations and their rotation
(`ca.rotation` decides, this applies), the trust bundle's sequence, and the read-mostly
snapshot of it all that the request path issues from.

Keys live in the key backend; certificates and states live in the CA journal (storage). The
snapshot is rebuilt whenever the journal changes (on rotation, or when another replica
rotated: `sync`). Rotation runs only on the replica holding the rotation lease, and applies
each transition on its own (compare-and-set), see `ca.rotation`.

The manager declares the storage it uses (`AuthorityStore`): the CA journal, two counters in
the meta table and the rotation lease, nothing else.
"""

from __future__ import annotations

import asyncio
import dataclasses
import datetime as dt
import logging
import secrets
import time
from collections.abc import Callable, Sequence
from typing import Protocol

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from broker import metrics
from broker.authority.views import AuthorityView, BundleView, CAServiceConfig, CAStatus
from broker.storage.interface import (
    AuthorityRecord,
    AuthorityRepository,
    LockRepository,
    MetaRepository,
)
from ca import jwtsvid, rotation
from ca.bundle import TrustBundle
from ca.clock import Clock
from ca.errors import CAStateError
from ca.keys import KeyBackend, KeyKind, key_destroyer
from ca.keys.uri import key_uri
from ca.policy import CAPolicy
from ca.x509svid import LeafIssuer, build_intermediate, build_root

__all__ = ["KINDS", "AuthorityManager", "AuthorityStore", "Snapshot", "common_name"]

log = logging.getLogger(__name__)

ROTATION_LEASE = "ca-rotation"
BUNDLE_COUNTER = "bundle_sequence"
JOURNAL_COUNTER = "ca_journal"  # bumped on every change of the CA journal
KINDS = {"ec-p256": KeyKind.EC_P256, "ec-p384": KeyKind.EC_P384}


class AuthorityStore(AuthorityRepository, MetaRepository, LockRepository, Protocol):
    """What the manager needs from storage: the CA journal, counters and meta values, the
    rotation lease, and the dialect's name (for status)."""

    @property
    def dialect(self) -> str: ...


def common_name(text: str) -> str:
    """Common names are limited to 64 characters (RFC 5280 ub-common-name)."""
    return text if len(text) <= 64 else text[:61] + "..."


@dataclasses.dataclass(frozen=True)
class Snapshot:
    """Everything the request path needs, swapped atomically."""

    records: tuple[AuthorityRecord, ...]
    roots: tuple[x509.Certificate, ...]
    issuing_cert: x509.Certificate
    issuer: LeafIssuer
    jwt_signer: ec.EllipticCurvePrivateKey
    jwt_kid: str
    bundle: BundleView
    root_der: tuple[bytes, ...]
    issuing_der: bytes


class AuthorityManager:
    """The CA's authorities over an `AuthorityStore`. `policy` gives the CA policy in force
    (rotation never plans SVIDs longer than it allows)."""

    def __init__(
        self,
        config: CAServiceConfig,
        keys: KeyBackend,
        store: AuthorityStore,
        clock: Clock,
        *,
        trust_domain: str,
        schedule: rotation.RotationSchedule,
        policy: Callable[[], CAPolicy],
        policy_version: Callable[[], int],
    ) -> None:
        self._cfg = config
        self._keys = keys
        self._storage = store
        self._clock = clock
        self._td = trust_domain
        self._schedule = schedule
        self._current_policy = policy
        self._policy_version = policy_version
        self._snapshot: Snapshot | None = None
        self._journal_seen: str | None = None
        self._rotate_lock = asyncio.Lock()
        self._owner = secrets.token_hex(8)

    async def bootstrap(self) -> None:
        """Create the root and the first issuing generation on first start; otherwise load
        them. Safe to call on every start and from several replicas."""
        records = await self._storage.list_authorities()
        if not any(r.kind == "root" for r in records):
            await self._create_root()
        await self.rotate(force=False)
        if self._snapshot is None:
            await self.reload()

    async def _create_root(self) -> None:
        now = self._clock.now()
        label = f"broker-root-{secrets.token_hex(4)}"
        self._keys.create_key(label, KINDS[self._cfg.key_type])
        cert = build_root(
            self._keys.signer(label),
            self._td,
            now,
            self._cfg.root_ttl,
            subject_cn=common_name(f"{self._td} root CA"),
            backdate=self._cfg.backdate,
        )
        await self._storage.insert_authority(
            AuthorityRecord(
                id="root-1",
                kind="root",
                generation=1,
                state="active",
                key_label=label,
                cert_der=cert.public_bytes(serialization.Encoding.DER),
                jwt_key_label=None,
                jwt_kid=None,
                created_at=now,
                not_before=cert.not_valid_before_utc,
                not_after=cert.not_valid_after_utc,
                activated_at=now,
            )
        )
        await self._bump_bundle()
        log.info("created root CA for %s", self._td)

    async def reload(self) -> None:
        """Rebuild the request-path snapshot from the CA journal."""
        records = tuple(await self._storage.list_authorities())
        roots = tuple(
            x509.load_der_x509_certificate(r.cert_der)
            for r in records
            if r.kind == "root" and r.state == "active"
        )
        active = [r for r in records if r.kind == "issuing" and r.state == "active"]
        if not roots or not active:
            raise CAStateError("the CA has no active root or issuing CA yet")
        current = max(active, key=lambda r: r.generation)
        assert current.jwt_key_label is not None and current.jwt_kid is not None
        jwt_keys = {
            r.jwt_kid: self._keys.public_key(r.jwt_key_label)
            for r in records
            if r.kind == "issuing"
            and r.state in ("prepared", "active", "retired")
            and r.jwt_kid
            and r.jwt_key_label
        }
        sequence = await self._bundle_sequence()
        if sequence == 0:
            sequence = await self._bump_bundle()
        bundle = TrustBundle(
            trust_domain=self._td,
            x509_authorities=list(roots),
            jwt_authorities=jwt_keys,
            sequence=sequence,
            refresh_hint_seconds=int(self._cfg.bundle_refresh_hint.total_seconds()),
        )
        issuing_cert = x509.load_der_x509_certificate(current.cert_der)
        self._snapshot = Snapshot(
            records=records,
            roots=roots,
            issuing_cert=issuing_cert,
            issuer=LeafIssuer(self._keys.signer(current.key_label), issuing_cert),
            jwt_signer=self._keys.signer(current.jwt_key_label),
            jwt_kid=current.jwt_kid,
            bundle=BundleView(
                trust_domain=self._td,
                jwks=bundle.to_jwks_json(),
                pem=bundle.to_pem().decode(),
                sequence=sequence,
                x509_authorities=roots,
            ),
            root_der=tuple(c.public_bytes(serialization.Encoding.DER) for c in roots),
            issuing_der=current.cert_der,
        )

    def snapshot(self) -> Snapshot:
        """The request path's view; CAStateError before the first load."""
        if self._snapshot is None:
            raise CAStateError("the CA is not ready yet")
        return self._snapshot

    async def sync_journal(self) -> None:
        """Reload when another process or replica changed the CA journal (its counter moved)."""
        journal = await self._storage.get_meta(JOURNAL_COUNTER)
        if journal != self._journal_seen:
            await self.reload()
            self._journal_seen = journal

    # -- rotation ---------------------------------------------------------------------------

    async def rotate(self, force: bool = False) -> list[str]:
        """Apply the rotation schedule (or force one). Only the holder of the rotation lease
        acts; other replicas just reload. Returns what was done, e.g. ["prepared issuing-2"].
        Each run is measured (broker_ca_rotation_duration_seconds: rotated, noop or error)."""
        started, outcome = time.perf_counter(), "error"
        try:
            done = await self._rotate(force)
            outcome = "rotated" if done else "noop"
            return done
        finally:
            metrics.observe_rotation(
                "forced" if force else "schedule", outcome, time.perf_counter() - started
            )

    async def _rotate(self, force: bool) -> list[str]:
        async with self._rotate_lock:
            now = self._clock.now()
            if not await self._storage.try_lease(ROTATION_LEASE, self._owner, 60.0, now):
                await self.reload()
                return []
            try:
                records = await self._storage.list_authorities()
                views = [
                    rotation.GenerationView(
                        id=r.id,
                        state=rotation.GenerationState(r.state),
                        not_before=r.not_before,
                        not_after=r.not_after,
                        activated_at=r.activated_at,
                        retired_at=r.retired_at,
                    )
                    for r in records
                    if r.kind == "issuing"
                ]
                actions = rotation.plan(
                    now,
                    views,
                    self._schedule,
                    max_svid_ttl=self._current_policy().max_x509_ttl(),
                    max_jwt_ttl=self._current_policy().max_jwt_ttl(),
                    force=force,
                )
                done = await self._apply(actions, records, now)
            finally:
                await self._storage.release_lease(ROTATION_LEASE, self._owner)
            if done or self._snapshot is None or self._journal_changed(records):
                await self.reload()
            for line in done:
                log.info("CA rotation: %s", line)
            return done

    def _journal_changed(self, records: Sequence[AuthorityRecord]) -> bool:
        return self._snapshot is None or tuple(records) != self._snapshot.records

    async def _apply(
        self,
        actions: Sequence[rotation.Action],
        records: Sequence[AuthorityRecord],
        now: dt.datetime,
    ) -> list[str]:
        done: list[str] = []
        prepared_id: str | None = None
        bundle_changed = False
        for action in actions:
            if isinstance(action, rotation.Prepare):
                prepared_id = await self._prepare(records, now)
                done.append(f"prepared {prepared_id}")
                bundle_changed = True
            elif isinstance(action, rotation.Activate):
                target = action.id or prepared_id
                assert target is not None
                if await self._storage.transition_authority(
                    target, from_state="prepared", to_state="active", at=now
                ):
                    done.append(f"activated {target}")
            elif isinstance(action, rotation.Retire):
                if await self._storage.transition_authority(
                    action.id, from_state="active", to_state="retired", at=now
                ):
                    done.append(f"retired {action.id}")
            elif isinstance(action, rotation.Expire):
                if await self._storage.transition_authority(
                    action.id, from_state="retired", to_state="expired", at=now
                ):
                    done.append(f"expired {action.id}")
                    bundle_changed = True
                    self._destroy_keys(action.id, records)
        if bundle_changed:
            await self._bump_bundle()
        if done:
            value = await self._storage.increment_counter(JOURNAL_COUNTER)
            await self._storage.set_meta(JOURNAL_COUNTER, str(value))
        return done

    async def _bump_bundle(self) -> int:
        """Increase spiffe_sequence: every change of the bundle's content gets a new number."""
        value = await self._storage.increment_counter(BUNDLE_COUNTER)
        await self._storage.set_meta(BUNDLE_COUNTER, str(value))
        return value

    async def _bundle_sequence(self) -> int:
        return int(await self._storage.get_meta(BUNDLE_COUNTER) or 0)

    async def _prepare(self, records: Sequence[AuthorityRecord], now: dt.datetime) -> str:
        root = next(r for r in records if r.kind == "root" and r.state == "active")
        generation = 1 + max((r.generation for r in records if r.kind == "issuing"), default=0)
        suffix = secrets.token_hex(4)
        key_label = f"broker-issuing-{generation}-{suffix}"
        jwt_label = f"broker-jwt-{generation}-{suffix}"
        kind = KINDS[self._cfg.key_type]
        self._keys.create_key(key_label, kind)
        self._keys.create_key(jwt_label, kind)
        root_cert = x509.load_der_x509_certificate(root.cert_der)
        cert = build_intermediate(
            self._keys.signer(root.key_label),
            root_cert,
            self._keys.public_key(key_label),
            self._td,
            now,
            self._cfg.issuing_ttl,
            subject_cn=common_name(f"{self._td} issuing CA {generation}"),
            backdate=self._cfg.backdate,
        )
        record = AuthorityRecord(
            id=f"issuing-{generation}",
            kind="issuing",
            generation=generation,
            state="prepared",
            key_label=key_label,
            cert_der=cert.public_bytes(serialization.Encoding.DER),
            jwt_key_label=jwt_label,
            jwt_kid=jwtsvid.jwt_kid(self._keys.public_key(jwt_label)),
            created_at=now,
            not_before=cert.not_valid_before_utc,
            not_after=cert.not_valid_after_utc,
        )
        await self._storage.insert_authority(record)
        return record.id

    def _destroy_keys(self, authority_id: str, records: Sequence[AuthorityRecord]) -> None:
        keys = key_destroyer(self._keys)
        for r in records:
            if r.id == authority_id:
                keys.destroy_key(r.key_label)
                if r.jwt_key_label:
                    keys.destroy_key(r.jwt_key_label)

    async def status(self) -> CAStatus:
        records = await self._storage.list_authorities()
        views = []
        for r in records:
            cert = x509.load_der_x509_certificate(r.cert_der)
            views.append(
                AuthorityView(
                    id=r.id,
                    kind=r.kind,
                    generation=r.generation,
                    state=r.state,
                    not_before=r.not_before,
                    not_after=r.not_after,
                    activated_at=r.activated_at,
                    retired_at=r.retired_at,
                    key_uri=key_uri(self._cfg.backend_uri, r.key_label),
                    jwt_kid=r.jwt_kid,
                    subject=cert.subject.rfc4514_string(),
                    fingerprint_sha256=cert.fingerprint(hashes.SHA256()).hex(),
                    serial=format(cert.serial_number, "x"),
                )
            )
        return CAStatus(
            trust_domain=self._td,
            authorities=views,
            key_backend=self._keys.description,
            bundle_sequence=await self._bundle_sequence(),
            policy_version=self._policy_version(),
            storage=self._storage.dialect,
        )
