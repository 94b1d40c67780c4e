"""The CA as a service: bootstrap, rotation, issuance, the trust bundle, status and CA policy.

Keys live in the key backend; certificates and states live in the CA journal (storage); this
module holds a read-mostly snapshot of both for the request path and rebuilds it whenever the
journal changes (on rotation, or when another replica rotated). Short-lived SVIDs are never
stored: their serial, ID and expiry go into the audit event of the request that minted them.

The X.509 bundle holds the root(s); an issuing CA generation pairs an intermediate with a JWT
signing key. A generation is prepared (its JWT key published in the bundle) well before it
signs, and stays published after retirement until the last SVID it signed has expired.
"""

from __future__ import annotations

import asyncio
import dataclasses
import datetime as dt
import functools
import ipaddress
import json
import logging
import secrets
import time
from collections.abc import Sequence
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from broker import metrics
from broker.errors import InvalidArgument
from broker.policy import Caller
from broker.storage.interface import AuthorityRecord, PolicyVersion, Storage
from ca import jwtsvid, rotation
from ca.bundle import TrustBundle
from ca.clock import Clock
from ca.csr import parse_csr
from ca.errors import CAError, CAStateError, InvalidPolicy, PolicyViolation
from ca.keys import KeyBackend, KeyKind, key_destroyer
from ca.keys.executor import token_call
from ca.keys.uri import key_uri
from ca.policy import CAPolicy, is_reserved_dns_name
from ca.spiffeid import SpiffeId
from ca.x509svid import LeafIssuer, Lineage, build_intermediate, build_root

__all__ = [
    "AuthorityView",
    "BundleView",
    "CAService",
    "CAServiceConfig",
    "CAStatus",
    "IssuedJWT",
    "IssuedX509",
]

log = logging.getLogger(__name__)

ROTATION_LEASE = "ca-rotation"
BUNDLE_COUNTER = "bundle_sequence"
JOURNAL_COUNTER = "ca_journal"  # bumped on every change of the CA journal
POLICY_NAME = "ca"
RESERVED_PREFIX = "/broker"  # the broker's own identities (server, operators)
_CURVES: dict[str, ec.EllipticCurve] = {"ec-p256": ec.SECP256R1(), "ec-p384": ec.SECP384R1()}
_KINDS = {"ec-p256": KeyKind.EC_P256, "ec-p384": KeyKind.EC_P384}
_MAX_AUDIENCES = 16
_MAX_AUDIENCE_LEN = 1024
_MAX_DNS = 32
IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


def _cn(text: str) -> str:
    """Common names are limited to 64 characters (RFC 5280 ub-common-name)."""
    return text if len(text) <= 64 else text[:61] + "..."


@dataclasses.dataclass(frozen=True)
class CAServiceConfig:
    trust_domain: str
    backend_uri: str
    key_type: str = "ec-p256"
    root_ttl: dt.timedelta = dt.timedelta(days=3650)
    issuing_ttl: dt.timedelta = dt.timedelta(days=7)
    backdate: dt.timedelta = dt.timedelta(seconds=30)
    bundle_refresh_hint: dt.timedelta = dt.timedelta(minutes=5)
    max_csr_bytes: int = 16384
    # The broker's own server names (DNS SANs of its serving certificate): never issued to a
    # workload, whatever CA policy says, so no workload SVID can pose as the broker.
    server_names: tuple[str, ...] = ()


@dataclasses.dataclass(frozen=True)
class IssuedX509:
    spiffe_id: str
    chain_der: list[bytes]
    private_key_der: bytes | None
    bundle_der: list[bytes]
    expires_at: dt.datetime
    serial: str


@dataclasses.dataclass(frozen=True)
class IssuedJWT:
    spiffe_id: str
    token: str
    expires_at: dt.datetime
    kid: str


@dataclasses.dataclass(frozen=True)
class BundleView:
    trust_domain: str
    jwks: bytes
    pem: str
    sequence: int
    x509_authorities: tuple[x509.Certificate, ...]


@dataclasses.dataclass(frozen=True)
class AuthorityView:
    id: str
    kind: str
    generation: int
    state: str
    not_before: dt.datetime
    not_after: dt.datetime
    activated_at: dt.datetime | None
    retired_at: dt.datetime | None
    key_uri: str
    jwt_kid: str | None
    subject: str
    fingerprint_sha256: str
    serial: str


@dataclasses.dataclass(frozen=True)
class CAStatus:
    trust_domain: str
    authorities: list[AuthorityView]
    key_backend: str
    bundle_sequence: int
    policy_version: int
    storage: str


@dataclasses.dataclass(frozen=True)
class _Snapshot:
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


class CAService:
    def __init__(
        self, config: CAServiceConfig, keys: KeyBackend, storage: Storage, clock: Clock
    ) -> None:
        self._cfg = config
        self._keys = keys
        self._storage = storage
        self._clock = clock
        self._td = SpiffeId.parse(f"spiffe://{config.trust_domain}").trust_domain
        self._snapshot: _Snapshot | None = None
        self._journal_seen: str | None = None
        self._rotate_lock = asyncio.Lock()
        self._owner = secrets.token_hex(8)
        self._schedule = rotation.RotationSchedule(ca_ttl=config.issuing_ttl)
        # The built-in policy never allows SVIDs that the rotation schedule cannot honour.
        self._policy = CAPolicy.default(self._td, x509_max_ttl=self._schedule.max_safe_svid_ttl())
        self._policy_version = PolicyVersion(0, "", "built-in default", clock.now())

    # -- lifecycle --------------------------------------------------------------------------

    @property
    def trust_domain(self) -> str:
        return self._td

    async def bootstrap(self) -> None:
        """Create the root and the first issuing generation on first start; otherwise load
        them. Safe to call on every start and from several replicas."""
        records = await self._storage.list_authorities()
        if not any(r.kind == "root" for r in records):
            await self._create_root()
        await self._load_policy()
        await self.rotate(force=False)
        if self._snapshot is None:
            await self.reload()

    async def _create_root(self) -> None:
        now = self._clock.now()
        label = f"broker-root-{secrets.token_hex(4)}"
        self._keys.create_key(label, _KINDS[self._cfg.key_type])
        cert = build_root(
            self._keys.signer(label),
            self._td,
            now,
            self._cfg.root_ttl,
            subject_cn=_cn(f"{self._td} root CA"),
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
        self._snapshot = _Snapshot(
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

    def _snap(self) -> _Snapshot:
        if self._snapshot is None:
            raise CAStateError("the CA is not ready yet")
        return self._snapshot

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
                    max_svid_ttl=self._policy.max_x509_ttl(),
                    max_jwt_ttl=self._policy.max_jwt_ttl(),
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
        kind = _KINDS[self._cfg.key_type]
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
            subject_cn=_cn(f"{self._td} issuing CA {generation}"),
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

    # -- issuance ---------------------------------------------------------------------------

    def _check_id(self, spiffe_id: str) -> SpiffeId:
        try:
            sid = SpiffeId.parse(spiffe_id).require_member_of(self._td).require_workload()
        except CAError as exc:
            raise InvalidArgument(str(exc)) from exc
        if sid.path == RESERVED_PREFIX or sid.path.startswith(RESERVED_PREFIX + "/"):
            raise PolicyViolation(
                f"spiffe://{self._td}{RESERVED_PREFIX}/... is reserved for the broker's own "
                "identities and cannot be minted"
            )
        return sid

    @staticmethod
    def lineage_for(sid: SpiffeId, caller: Caller, *, renewal: bool = False) -> Lineage | None:
        """The lineage of an SVID for `sid` minted through the caller's certificate.

        - An operator minting another ID: marked `minted_by` the operator, so that requests made
          with it count as the operator's own (two-person rule).
        - A caller minting its own ID (self-mint): the caller's serial is recorded, so denying
          it denies the child, and the child never outlives the caller's certificate (nor the
          cap the caller itself inherited).
        - Renewal (`renewal=True`, an agent's own ID): recorded like a self-mint, without a new
          cap, but an inherited cap still holds (renewal cannot extend a self-minted chain).
        - Anything else (attestation, an agent minting for the entries it serves): None.
        """
        if not caller.serial:
            return None
        parent = caller.lineage if caller.lineage is not None else Lineage()
        if caller.is_operator and sid.id_string != caller.spiffe_id:
            return Lineage(minted_by=caller.spiffe_id, ancestors=(caller.serial,))
        if sid.id_string != caller.spiffe_id:
            return None
        return parent.child(caller.serial, capped_until=None if renewal else caller.not_after)

    async def mint_x509(
        self,
        spiffe_id: str,
        *,
        ttl: dt.timedelta | None,
        csr: bytes | None,
        key_type: str | None,
        dns_names: Sequence[str],
        caller: Caller,
        renewal: bool = False,
    ) -> IssuedX509:
        """Issue an X.509-SVID from a CSR, or with a broker-generated key returned once.

        The SVID carries the lineage `lineage_for` gives (self-minted SVIDs end no later than
        the caller's certificate; `renewal` is an agent renewing its own SVID).
        Raises InvalidArgument / InvalidCSR / InvalidTTL for malformed input and
        PolicyViolation when CA policy does not allow the ID, TTL or key type."""
        sid = self._check_id(spiffe_id)
        if len(dns_names) > _MAX_DNS:
            raise InvalidArgument(f"at most {_MAX_DNS} DNS names may be requested")
        private_der: bytes | None = None
        if csr is not None:
            if key_type:
                raise InvalidArgument("key_type applies only to broker-generated keys, not CSRs")
            info = parse_csr(csr, max_bytes=self._cfg.max_csr_bytes)
            public_key: Any = info.public_key
            kt = info.key_type
        else:
            kt = key_type or "ec-p256"
            if kt not in _CURVES:
                raise InvalidArgument(
                    f"key type {kt!r} cannot be generated; use ec-p256 or ec-p384"
                )
            public_key = None
        lifetime = self._policy.resolve_x509(sid, ttl, kt)
        self._policy.check_dns_names(sid, dns_names, reserved=self._cfg.server_names)
        if public_key is None:
            key = ec.generate_private_key(_CURVES[kt])
            public_key = key.public_key()
            private_der = key.private_bytes(
                serialization.Encoding.DER,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
        snap = self._snap()
        # The signature is the token's work: on the key backend's executor, off the loop.
        cert = await token_call(
            self._keys,
            functools.partial(
                snap.issuer.issue,
                public_key,
                sid,
                self._clock.now(),
                lifetime,
                dns_names=dns_names,
                backdate=self._cfg.backdate,
                lineage=self.lineage_for(sid, caller, renewal=renewal),
            ),
        )
        leaf_der = cert.public_bytes(serialization.Encoding.DER)
        return IssuedX509(
            spiffe_id=sid.id_string,
            chain_der=[leaf_der, snap.issuing_der],
            private_key_der=private_der,
            bundle_der=list(snap.root_der),
            expires_at=cert.not_valid_after_utc,
            serial=format(cert.serial_number, "x"),
        )

    def check_dns_names_issuable(self, dns_names: Sequence[str]) -> None:
        """PolicyViolation if a DNS name is one of the broker's own server names (checked when
        an entry is created, so a refused entry is never stored)."""
        for name in dns_names:
            if isinstance(name, str) and is_reserved_dns_name(name, self._cfg.server_names):
                raise PolicyViolation(
                    f"DNS name {name[:80]!r} is one of the broker's own server names; it is "
                    "never issued to anything but the broker"
                )

    def issue_internal(
        self,
        spiffe_id: SpiffeId,
        public_key: Any,
        ttl: dt.timedelta,
        dns_names: Sequence[str] = (),
        ip_addresses: Sequence[IPAddress] = (),
    ) -> tuple[x509.Certificate, x509.Certificate]:
        """Issue the broker's own identities (serving certificate, operator identity), which
        live under the reserved path and bypass CA policy. Returns (leaf, issuing CA cert)."""
        snap = self._snap()
        cert = snap.issuer.issue(
            public_key,
            spiffe_id,
            self._clock.now(),
            ttl,
            dns_names=dns_names,
            backdate=self._cfg.backdate,
            ip_addresses=ip_addresses,
        )
        return cert, snap.issuing_cert

    def issue_operator_svid(
        self,
        spiffe_id: SpiffeId,
        csr: bytes,
        ttl: dt.timedelta,
        login_extension: x509.ExtensionType,
    ) -> IssuedX509:
        """The one path that issues operator identities (spiffe://<td>/broker/operator/...):
        called by `broker.operators` after a verified login, never reached by the mint RPCs
        or registration entries. The CSR's proof of possession is checked; `login_extension`
        (who logged in, with which roles) is written into the certificate. Raises InvalidCSR
        for a bad CSR, InvalidArgument for an ID outside the operator prefix."""
        prefix = f"spiffe://{self._cfg.trust_domain}/broker/operator/"
        if not spiffe_id.id_string.startswith(prefix) or spiffe_id.path.count("/") != 3:
            raise InvalidArgument(f"{spiffe_id} is not an operator identity")
        info = parse_csr(csr, max_bytes=self._cfg.max_csr_bytes)
        snap = self._snap()
        cert = snap.issuer.issue(
            info.public_key,
            spiffe_id,
            self._clock.now(),
            ttl,
            backdate=self._cfg.backdate,
            extra_extensions=(login_extension,),
        )
        return IssuedX509(
            spiffe_id=spiffe_id.id_string,
            chain_der=[cert.public_bytes(serialization.Encoding.DER), snap.issuing_der],
            private_key_der=None,
            bundle_der=list(snap.root_der),
            expires_at=cert.not_valid_after_utc,
            serial=format(cert.serial_number, "x"),
        )

    async def mint_jwt(
        self,
        spiffe_id: str,
        audience: Sequence[str],
        *,
        ttl: dt.timedelta | None,
        caller: Caller,
    ) -> IssuedJWT:
        sid = self._check_id(spiffe_id)
        if not audience:
            raise InvalidArgument("at least one audience is required for a JWT-SVID")
        if len(audience) > _MAX_AUDIENCES:
            raise InvalidArgument(f"at most {_MAX_AUDIENCES} audiences may be requested")
        for aud in audience:
            if not aud or len(aud) > _MAX_AUDIENCE_LEN or not aud.isprintable():
                raise InvalidArgument(
                    f"audience values must be 1 to {_MAX_AUDIENCE_LEN} printable characters"
                )
        lifetime = self._policy.resolve_jwt(sid, ttl)
        snap = self._snap()
        now = self._clock.now()
        lineage = self.lineage_for(sid, caller)
        if lineage is not None and lineage.capped_until is not None:
            # A self-minted JWT-SVID ends no later than the certificate it was minted through.
            remaining = lineage.capped_until - now
            if remaining < dt.timedelta(seconds=1):
                raise PolicyViolation("the caller's certificate expires too soon to mint through")
            lifetime = min(lifetime, remaining)
        svid = await token_call(
            self._keys,
            functools.partial(
                jwtsvid.mint_jwt_svid,
                snap.jwt_signer,
                sid,
                list(audience),
                now,
                lifetime,
                kid=snap.jwt_kid,
            ),
        )
        return IssuedJWT(sid.id_string, svid.token, svid.expires_at, snap.jwt_kid)

    # -- reading ----------------------------------------------------------------------------

    def bundle(self) -> BundleView:
        return self._snap().bundle

    def trust_bundle_pem(self) -> bytes:
        return self._snap().bundle.pem.encode()

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
            policy_version=self._policy_version.version,
            storage=self._storage.dialect,
        )

    # -- CA policy --------------------------------------------------------------------------

    async def _load_policy(self) -> None:
        current = await self._storage.current_policy(POLICY_NAME)
        if current is not None:
            self._policy = CAPolicy.from_document(json.loads(current.document))
            self._policy_version = current
        else:
            doc = json.dumps(self._policy.to_document(), sort_keys=True)
            self._policy_version = PolicyVersion(0, doc, "built-in default", self._clock.now())

    def policy_document(self) -> PolicyVersion:
        return self._policy_version

    async def set_policy(self, document_json: str, caller: Caller) -> int:
        """Validate the whole document, then store it as a new version. Nothing changes when
        it is refused. Refused too when its maximum TTLs do not fit the rotation schedule."""
        try:
            doc = json.loads(document_json)
        except json.JSONDecodeError as exc:
            raise InvalidPolicy(
                f"CA policy is not valid JSON: {exc.msg} at line {exc.lineno}"
            ) from None
        if not isinstance(doc, dict):
            raise InvalidPolicy("CA policy must be a JSON object with a 'rules' list")
        policy = CAPolicy.from_document(doc)
        rotation.check_max_svid_ttl(self._schedule, policy.max_x509_ttl())
        canonical = json.dumps(policy.to_document(), sort_keys=True)
        stored = await self._storage.put_policy(
            POLICY_NAME, canonical, caller.spiffe_id, self._clock.now()
        )
        self._policy = CAPolicy.from_document(json.loads(stored.document))
        self._policy_version = stored
        return stored.version

    async def sync(self) -> None:
        """Pick up what another process or replica changed: a rotation (the CA journal's
        counter moved) or a new CA policy. Two small reads; called every few seconds."""
        journal = await self._storage.get_meta(JOURNAL_COUNTER)
        if journal != self._journal_seen:
            await self.reload()
            self._journal_seen = journal
        await self.refresh_policy()

    async def refresh_policy(self) -> None:
        """Pick up a policy set through another replica."""
        current = await self._storage.current_policy(POLICY_NAME)
        if current is not None and current.version != self._policy_version.version:
            self._policy = CAPolicy.from_document(json.loads(current.document))
            self._policy_version = current
