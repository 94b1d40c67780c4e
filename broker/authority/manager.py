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
import base64
import dataclasses
import datetime as dt
import json
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
from broker.errors import FailedPrecondition
from broker.storage.interface import (
    AuthorityRecord,
    AuthorityRepository,
    LockRepository,
    MetaRepository,
)
from ca import jwtsvid, rootrotation, rotation
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
ROOT_ACTIVATE_AT = "root_activate_at"  # "<root id> <ISO time>": when a prepared root activates
ROOT_CROSS = "root_cross"  # JSON list of cross-certificates between roots
# After a compromised-root rotation: the replaced issuing CAs' key ids (refused for good, except
# that agents may sync and renew their own SVID until the grace ends) and the replaced roots.
ROOT_REPLACED = "root_replaced"
DEFAULT_AGENT_GRACE = dt.timedelta(minutes=10)
ROOT_PATH_LENGTH = 2  # root -> cross-certificate -> issuing CA -> leaf
_PUBLISHED_ROOT_STATES = ("prepared", "active", "retired")
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
    # Cross-certificates appended to chains issued now (the active root certified by an older
    # root), so a relying party holding only the older root verifies them too.
    chain_extra: tuple[bytes, ...] = ()
    # Every cross-certificate still valid (sent to agents with the bundle).
    cross_der: tuple[bytes, ...] = ()
    # What the broker's serving chain carries: the active root certified by any older root,
    # also one replaced as compromised (so agents still trusting it can reach the broker).
    serving_extra: tuple[bytes, ...] = ()
    # After a compromised-root rotation (see ROOT_REPLACED).
    replaced: Replaced | None = None


@dataclasses.dataclass(frozen=True)
class Replaced:
    """What a compromised-root rotation replaced: the issuing CAs' key identifiers (SKI) and
    the roots, and until when agents may still renew with an SVID issued under them."""

    issuer_key_ids: frozenset[bytes]
    roots_pem: bytes
    grace_until: dt.datetime


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
            await self._storage.insert_authority(
                self._new_root(1, "active", self._clock.now(), records)
            )
            await self._bump_bundle()
            log.info("created root CA for %s", self._td)
        await self.rotate(force=False)
        if self._snapshot is None:
            await self.reload()

    def _new_root(
        self, generation: int, state: str, now: dt.datetime, records: Sequence[AuthorityRecord]
    ) -> AuthorityRecord:
        """A new root key in the key backend and its self-signed certificate (not stored)."""
        label = f"broker-root-{secrets.token_hex(4)}"
        self._keys.create_key(label, KINDS[self._cfg.key_type])
        name = f"{self._td} root CA" if generation == 1 else f"{self._td} root CA {generation}"
        cert = build_root(
            self._keys.signer(label),
            self._td,
            now,
            self._cfg.root_ttl,
            subject_cn=common_name(name),
            backdate=self._cfg.backdate,
            path_length=ROOT_PATH_LENGTH,
        )
        return AuthorityRecord(
            id=f"root-{generation}",
            kind="root",
            generation=generation,
            state=state,
            key_label=label,
            cert_der=cert.public_bytes(serialization.Encoding.DER),
            jwt_key_label=None,
            jwt_kid=None,
            created_at=now,
            not_before=cert.not_valid_before_utc,
            not_after=cert.not_valid_after_utc,
            activated_at=now if state == "active" else None,
        )

    async def reload(self) -> None:
        """Rebuild the request-path snapshot from the CA journal."""
        records = tuple(await self._storage.list_authorities())
        published = sorted(
            (r for r in records if r.kind == "root" and r.state in _PUBLISHED_ROOT_STATES),
            key=lambda r: r.generation,
        )
        roots = tuple(x509.load_der_x509_certificate(r.cert_der) for r in published)
        active = [r for r in records if r.kind == "issuing" and r.state == "active"]
        if not roots or not active:
            raise CAStateError("the CA has no active root or issuing CA yet")
        active_root = next((r.id for r in published if r.state == "active"), None)
        published_ids = {r.id for r in published}
        now = self._clock.now()
        cross = [
            (entry, cert)
            for entry, cert in await self._cross_entries()
            if cert.not_valid_before_utc <= now < cert.not_valid_after_utc
        ]
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
            chain_extra=tuple(
                base64.b64decode(e["der"])
                for e, _ in cross
                if e["subject"] == active_root and e["issuer"] in published_ids
            ),
            serving_extra=tuple(
                base64.b64decode(e["der"]) for e, _ in cross if e["subject"] == active_root
            ),
            cross_der=tuple(base64.b64decode(e["der"]) for e, _ in cross),
            replaced=await self._replaced(),
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
                root_done = await self._apply_roots(await self._storage.list_authorities(), now)
                activated = any(line.startswith("activated root") for line in root_done)
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
                    force=force or activated,
                )
                issuing_done = await self._apply(actions, records, now)
                if issuing_done:  # an issuing CA expired: its root may be free to go now
                    root_done += await self._apply_roots(
                        await self._storage.list_authorities(), now
                    )
                done = root_done + issuing_done
                if root_done:
                    await self._bump_journal()
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
            await self._bump_journal()
        return done

    async def _bump_journal(self) -> None:
        value = await self._storage.increment_counter(JOURNAL_COUNTER)
        await self._storage.set_meta(JOURNAL_COUNTER, str(value))

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

    # -- root rotation (ca.rootrotation has the phases) ----------------------------------------

    def _issuing_under(
        self, records: Sequence[AuthorityRecord]
    ) -> dict[str, list[AuthorityRecord]]:
        """Root id -> the issuing generations its key signed."""
        root_certs = [
            (r.id, x509.load_der_x509_certificate(r.cert_der)) for r in records if r.kind == "root"
        ]
        out: dict[str, list[AuthorityRecord]] = {rid: [] for rid, _ in root_certs}
        for r in records:
            if r.kind != "issuing":
                continue
            cert = x509.load_der_x509_certificate(r.cert_der)
            for rid, root in root_certs:
                if rootrotation.signed_by(cert, root):
                    out[rid].append(r)
                    break
        return out

    async def _root_views(self, records: Sequence[AuthorityRecord]) -> list[rootrotation.RootView]:
        under = self._issuing_under(records)
        activate_at = await self._activate_at()
        return [
            rootrotation.RootView(
                id=r.id,
                state=str(r.state),
                activate_at=activate_at.get(r.id),
                open_issuing=sum(1 for i in under.get(r.id, []) if str(i.state) != "expired"),
            )
            for r in records
            if r.kind == "root"
        ]

    async def _activate_at(self) -> dict[str, dt.datetime]:
        raw = await self._storage.get_meta(ROOT_ACTIVATE_AT)
        if not raw:
            return {}
        root_id, _, when = raw.partition(" ")
        return {root_id: dt.datetime.fromisoformat(when)}

    async def _cross_entries(self) -> list[tuple[dict[str, str], x509.Certificate]]:
        raw = await self._storage.get_meta(ROOT_CROSS)
        entries = json.loads(raw) if raw else []
        return [(e, x509.load_der_x509_certificate(base64.b64decode(e["der"]))) for e in entries]

    async def _add_cross(
        self, issuer: AuthorityRecord, subject: AuthorityRecord, not_after: dt.datetime | None
    ) -> None:
        cert = rootrotation.cross_sign(
            self._keys.signer(issuer.key_label),
            x509.load_der_x509_certificate(issuer.cert_der),
            x509.load_der_x509_certificate(subject.cert_der),
            not_after,
        )
        entries = [e for e, _ in await self._cross_entries()]
        entries.append(
            {
                "subject": subject.id,
                "issuer": issuer.id,
                "der": base64.b64encode(cert.public_bytes(serialization.Encoding.DER)).decode(),
            }
        )
        await self._storage.set_meta(ROOT_CROSS, json.dumps(entries))

    async def _drop_cross(self, root_id: str) -> None:
        entries = [e for e, _ in await self._cross_entries()]
        kept = [e for e in entries if root_id not in (e["subject"], e["issuer"])]
        if kept != entries:
            await self._storage.set_meta(ROOT_CROSS, json.dumps(kept))

    async def _apply_roots(self, records: Sequence[AuthorityRecord], now: dt.datetime) -> list[str]:
        """Apply the root plan (`ca.rootrotation.plan_roots`); the caller holds the lease and
        moves the issuing CAs under a newly activated root right after."""
        done: list[str] = []
        by_id = {r.id: r for r in records}
        under = self._issuing_under(records)
        for action in rootrotation.plan_roots(now, await self._root_views(records)):
            if isinstance(action, rootrotation.ActivateRoot):
                if not await self._storage.transition_authority(
                    action.id, from_state="prepared", to_state="active", at=now
                ):
                    continue
                done.append(f"activated root {action.id}")
                await self._storage.set_meta(ROOT_ACTIVATE_AT, "")
                if action.retire is not None and await self._storage.transition_authority(
                    action.retire, from_state="active", to_state="retired", at=now
                ):
                    done.append(f"retired root {action.retire}")
                    # The new root certifies the old one too, now that it may sign.
                    await self._add_cross(by_id[action.id], by_id[action.retire], None)
                    for gen in under.get(action.retire, []):
                        if str(
                            gen.state
                        ) == "prepared" and await self._storage.transition_authority(
                            gen.id, from_state="prepared", to_state="expired", at=now
                        ):
                            done.append(f"expired {gen.id} (prepared under the old root)")
                            self._destroy_keys(gen.id, records)
                await self._bump_bundle()
            elif isinstance(action, rootrotation.ExpireRoot):
                if await self._storage.transition_authority(
                    action.id, from_state="retired", to_state="expired", at=now
                ):
                    done.append(f"expired root {action.id}")
                    await self._drop_cross(action.id)
                    self._destroy_keys(action.id, records)
                    await self._bump_bundle()
        return done

    async def _replaced(self) -> Replaced | None:
        raw = await self._storage.get_meta(ROOT_REPLACED)
        if not raw:
            return None
        doc = json.loads(raw)
        return Replaced(
            issuer_key_ids=frozenset(bytes.fromhex(k) for k in doc["issuer_key_ids"]),
            roots_pem=doc["roots_pem"].encode(),
            grace_until=dt.datetime.fromisoformat(doc["grace_until"]),
        )

    async def _record_replaced(
        self,
        issuing: Sequence[AuthorityRecord],
        roots: Sequence[AuthorityRecord],
        grace_until: dt.datetime,
    ) -> None:
        previous = await self._replaced()
        kids = set(previous.issuer_key_ids) if previous is not None else set()
        for record in issuing:
            cert = x509.load_der_x509_certificate(record.cert_der)
            kids.add(x509.SubjectKeyIdentifier.from_public_key(cert.public_key()).digest)  # type: ignore[arg-type]
        pem = b"".join(
            x509.load_der_x509_certificate(r.cert_der).public_bytes(serialization.Encoding.PEM)
            for r in roots
        )
        doc = {
            "issuer_key_ids": sorted(k.hex() for k in kids),
            "roots_pem": pem.decode(),
            "grace_until": grace_until.isoformat(),
        }
        await self._storage.set_meta(ROOT_REPLACED, json.dumps(doc))

    async def rotate_root(
        self,
        *,
        compromised: bool = False,
        activate_after: dt.timedelta | None = None,
        agent_grace: dt.timedelta | None = None,
    ) -> list[str]:
        """Start a planned root rotation (publish a new root now, activate it after
        `activate_after`, by default the bundle's refresh hint), or, `compromised`, replace
        every root at once. FailedPrecondition while another rotation runs or (planned only)
        while a root rotation is still in progress."""
        started, outcome = time.perf_counter(), "error"
        try:
            done = await self._rotate_root(compromised, activate_after, agent_grace)
            outcome = "rotated"
            return done
        finally:
            metrics.observe_rotation(
                "root-compromised" if compromised else "root",
                outcome,
                time.perf_counter() - started,
            )

    async def _rotate_root(
        self,
        compromised: bool,
        activate_after: dt.timedelta | None,
        agent_grace: dt.timedelta | None,
    ) -> list[str]:
        if activate_after is not None and activate_after < dt.timedelta(0):
            raise FailedPrecondition("--activate-after must not be negative")
        if agent_grace is not None and not dt.timedelta(0) <= agent_grace <= dt.timedelta(days=1):
            raise FailedPrecondition("--agent-grace must be between 0s and 24h")
        async with self._rotate_lock:
            now = self._clock.now()
            if not await self._storage.try_lease(ROTATION_LEASE, self._owner, 60.0, now):
                raise FailedPrecondition(
                    "another CA rotation is running right now (on this or another replica); "
                    "try again when it has finished"
                )
            try:
                records = await self._storage.list_authorities()
                if compromised:
                    grace = DEFAULT_AGENT_GRACE if agent_grace is None else agent_grace
                    done = await self._replace_roots(records, now, now + grace)
                else:
                    phase = rootrotation.phase_of(await self._root_views(records))
                    if phase is not rootrotation.RootPhase.STEADY:
                        raise FailedPrecondition(
                            f"a root rotation is already in progress (phase {phase.value}); it "
                            "completes on its own (see `broker ca status`); if a root key is "
                            "compromised use `broker ca rotate --root --compromised`"
                        )
                    delay = (
                        self._cfg.bundle_refresh_hint if activate_after is None else activate_after
                    )
                    done = await self._prepare_root(records, now, now + delay)
                await self._bump_journal()
            finally:
                await self._storage.release_lease(ROTATION_LEASE, self._owner)
            await self.reload()
            self._journal_seen = await self._storage.get_meta(JOURNAL_COUNTER)
            for line in done:
                log.warning("CA root rotation: %s", line)
            return done

    async def _prepare_root(
        self, records: Sequence[AuthorityRecord], now: dt.datetime, activate_at: dt.datetime
    ) -> list[str]:
        active = next(r for r in records if r.kind == "root" and r.state == "active")
        generation = 1 + max(r.generation for r in records if r.kind == "root")
        new = self._new_root(generation, "prepared", now, records)
        await self._storage.insert_authority(new)
        await self._add_cross(active, new, None)  # the old root vouches for the new one
        await self._storage.set_meta(ROOT_ACTIVATE_AT, f"{new.id} {activate_at.isoformat()}")
        await self._bump_bundle()  # both roots published before the new one signs anything
        return [
            f"prepared root {new.id} (published in the bundle next to {active.id}; "
            f"activates at {activate_at.isoformat()})"
        ]

    async def _replace_roots(
        self, records: Sequence[AuthorityRecord], now: dt.datetime, grace_until: dt.datetime
    ) -> list[str]:
        """The emergency path: a new active root; every other root and every issuing CA they
        signed out of the bundle at once (keys destroyed); a new issuing CA under the new root.
        The new root is cross-certified by each old root for a short while (the issuing CA
        TTL), so agents that still trust only an old root can reach the broker and learn the
        new bundle."""
        done: list[str] = []
        generation = 1 + max(r.generation for r in records if r.kind == "root")
        new = self._new_root(generation, "active", now, records)
        await self._storage.insert_authority(new)
        done.append(f"created root {new.id} (active at once)")
        await self._storage.set_meta(ROOT_ACTIVATE_AT, "")
        old_roots = [r for r in records if r.kind == "root" and str(r.state) != "expired"]
        for root in old_roots:
            await self._add_cross(root, new, now + self._cfg.issuing_ttl)
            if await self._storage.transition_authority(
                root.id, from_state=str(root.state), to_state="expired", at=now
            ):
                done.append(f"removed root {root.id} from the bundle")
        for gen in (r for r in records if r.kind == "issuing" and str(r.state) != "expired"):
            if await self._storage.transition_authority(
                gen.id, from_state=str(gen.state), to_state="expired", at=now
            ):
                done.append(f"removed {gen.id}")
        await self._record_replaced(
            [r for r in records if r.kind == "issuing" and str(r.state) != "expired"],
            old_roots,
            grace_until,
        )
        if grace_until > now:
            done.append(
                f"agents may renew their own SVIDs issued under the old roots until "
                f"{grace_until.isoformat()}; nothing else accepts them"
            )
        for gone in [*old_roots, *(r for r in records if r.kind == "issuing")]:
            if str(gone.state) != "expired":
                self._destroy_keys(gone.id, records)
        # Drop cross-certificates that vouch for the old roots (they must not be trusted).
        entries = [e for e, _ in await self._cross_entries() if e["subject"] == new.id]
        await self._storage.set_meta(ROOT_CROSS, json.dumps(entries))
        fresh = await self._storage.list_authorities()
        actions = rotation.plan(
            now,
            [],
            self._schedule,
            max_svid_ttl=self._current_policy().max_x509_ttl(),
            max_jwt_ttl=self._current_policy().max_jwt_ttl(),
        )
        done += await self._apply(actions, fresh, now)
        await self._bump_bundle()
        return done

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
        phase, until = await self._root_phase(records)
        return CAStatus(
            trust_domain=self._td,
            authorities=views,
            root_phase=phase.value,
            root_phase_until=until,
            key_backend=self._keys.description,
            bundle_sequence=await self._bundle_sequence(),
            policy_version=self._policy_version(),
            storage=self._storage.dialect,
        )

    async def _root_phase(
        self, records: Sequence[AuthorityRecord]
    ) -> tuple[rootrotation.RootPhase, dt.datetime | None]:
        """The root rotation's phase and when it is expected to end (None in steady state):
        the prepared root's activation, or when the last issuing CA under the retired root
        (and every JWT it signed) has expired."""
        roots = await self._root_views(records)
        phase = rootrotation.phase_of(roots)
        if phase is rootrotation.RootPhase.PUBLISHING:
            return phase, next(r.activate_at for r in roots if r.state == "prepared")
        if phase is rootrotation.RootPhase.OVERLAP:
            under = self._issuing_under(records)
            jwt_ttl = self._current_policy().max_jwt_ttl()
            ends = [
                max(g.not_after, (g.retired_at or g.not_after) + jwt_ttl)
                for r in roots
                if r.state == "retired"
                for g in under.get(r.id, [])
                if str(g.state) != "expired"
            ]
            return phase, max(ends) if ends else None
        return phase, None
