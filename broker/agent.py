"""The node agent's logic (no gRPC): attest once, keep its own SVID renewed, learn the entries
it may serve, hold a fresh X.509-SVID per entry (keys generated here, sent as CSRs), cache
JWT-SVIDs, and tell subscribers about every change.

Timing is pure and clock-driven: every SVID is renewed at half its life, with up to +-10 %
jitter so a fleet of agents does not renew in step; entries and the bundle are re-read every
`sync_interval`. When the broker cannot be reached the agent keeps serving what it holds until
it expires and retries with exponential backoff (1 s doubling to 60 s). An entry whose SVID
cannot be minted (refused by CA policy, a bad answer) is retried on its own backoff: it never
delays the other entries, the bundle or the agent's own renewal, and its recovery is logged.
Renewal is timed from when the SVID arrived, not from its notBefore (which the CA backdates).
`step()` does one round and says how long to wait, so tests drive it with a fake clock and no
sleeping; `health()` says whether the agent is ready or degraded, and why.

The broker is reached through `BrokerLink` (implemented over gRPC in
`broker.api.client.identity`); the Workload API (`broker.api.workload`) reads `snapshot`,
`svids_for` and `jwt_svids`.

Trust (whoever answers is not trusted for it): the agent starts from the pinned roots
(`trust_anchors`, the `--bundle` file) and the link verifies the broker against the current
roots and the broker's own serving identity on every connection. On top of that:
- every X.509-SVID, the agent's own and each workload's, must verify against the current roots
  (RFC 5280 path validation by cryptography, SPIFFE leaf profile), name the SPIFFE ID asked for
  and certify the key the agent generated; anything else is refused and never served;
- every JWT-SVID must validate against the bundle's JWT keys for the audience and ID asked for;
- a bundle change is accepted only for the pinned trust domain and only while it keeps at
  least one currently trusted, unexpired root (the roots that verified the connection it came
  over): new roots and JWT keys arrive from the authenticated broker while the old roots still
  verify it, never as a replacement of everything trusted. A refused bundle changes nothing;
- a bundle that keeps none of them (a compromised root replaced at once) is accepted only when
  one of its roots is certified by a trusted root through a cross-certificate the broker sent
  with it (`broker.agenttrust.vouched_for`);
- after a bundle change, SVIDs that no longer verify are dropped and minted again at once, the
  agent's own first (`broker.agenttrust.needs_remint`); the roots accepted are kept in the
  `TrustStore` (a file with `--trust-store`), so a restarted agent trusts them.
"""

from __future__ import annotations

import asyncio
import dataclasses
import datetime as dt
import logging
import random
import shlex
import subprocess
from collections.abc import Awaitable, Callable, Collection, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from broker.agenttrust import TrustStore, needs_remint, vouched_for
from broker.errors import InvalidArgument, PermissionDenied, Unauthenticated, Unavailable
from broker.files import write_private_file
from ca.bundle import TrustBundle
from ca.clock import Clock
from ca.errors import CAError
from ca.jwtsvid import validate_jwt_svid
from ca.x509svid import spiffe_id_of, trust_domain_of_roots, verify_chain

__all__ = [
    "Agent",
    "AgentEntry",
    "AgentSVID",
    "BrokerLink",
    "JWTResult",
    "Snapshot",
    "SyncResult",
    "WorkloadSVID",
    "renew_at",
]

log = logging.getLogger("broker.agent")

JITTER = 0.10
BACKOFF_MIN = 1.0
BACKOFF_MAX = 60.0
JWT_CACHE_MAX = 4096


@dataclass(frozen=True)
class AgentEntry:
    id: str
    spiffe_id: str
    selectors: frozenset[str]
    dns_names: tuple[str, ...] = ()


@dataclass(frozen=True)
class AgentSVID:
    spiffe_id: str
    chain_der: tuple[bytes, ...]  # leaf first
    expires_at: dt.datetime
    not_before: dt.datetime


@dataclass(frozen=True)
class SyncResult:
    entries: list[AgentEntry]
    trust_domain: str
    bundle_jwks: bytes
    bundle_sequence: int
    crl: tuple[bytes, ...] = ()
    root_cross: tuple[bytes, ...] = ()  # cross-certificates between roots (DER)


@dataclass(frozen=True)
class JWTResult:
    spiffe_id: str
    token: str
    expires_at: dt.datetime


@dataclass(frozen=True)
class WorkloadSVID:
    entry_id: str
    spiffe_id: str
    chain_der: tuple[bytes, ...]
    key_der: bytes  # PKCS#8
    not_before: dt.datetime
    expires_at: dt.datetime
    renew_at: dt.datetime


class BrokerLink(Protocol):
    """What the agent needs from the broker. Blocking calls (run off the event loop); any
    failure raises a `broker.errors.BrokerError` (Unavailable when unreachable)."""

    def attest(self, csr_der: bytes) -> AgentSVID:
        """Attest with the bootstrap credential (join token or JWT) the link was built with."""
        ...

    def use_identity(self, chain_pem: bytes, key_pem: bytes) -> None:
        """Authenticate later calls with this SVID (mTLS)."""
        ...

    def use_roots(self, roots_pem: bytes) -> None:
        """Verify the broker against these roots from now on (after a bundle change)."""
        ...

    def renew(self, csr_der: bytes) -> AgentSVID: ...

    def sync(self) -> SyncResult: ...

    def mint_x509(self, entry_id: str, csr_der: bytes) -> AgentSVID: ...

    def mint_jwt(self, entry_id: str, audience: Sequence[str]) -> JWTResult: ...

    def close(self) -> None: ...


@dataclass(frozen=True)
class Snapshot:
    """Everything the Workload API serves, swapped atomically on each change."""

    version: int = 0
    trust_domain: str = ""
    bundle: TrustBundle | None = None
    bundle_sequence: int = -1
    entries: tuple[AgentEntry, ...] = ()
    svids: Mapping[str, WorkloadSVID] = field(default_factory=dict)

    bundle_der: bytes = b""  # concatenated DER of the X.509 authorities
    crl: tuple[bytes, ...] = ()  # DER CRLs of the denied serials, as the broker published them
    jwt_bundle_json: bytes = b'{"keys":[]}'  # the JWT authorities as a plain JWKS

    def with_bundle(self, bundle: TrustBundle, sequence: int) -> Snapshot:
        """A copy with a new bundle and its serialized forms (computed once, served often)."""
        return dataclasses.replace(
            self,
            bundle=bundle,
            bundle_sequence=sequence,
            bundle_der=bundle.x509_der_concat(),
            jwt_bundle_json=bundle.to_jwt_jwks_json(),
        )


def renew_at(not_before: dt.datetime, expires_at: dt.datetime, rng: random.Random) -> dt.datetime:
    """Half-life, +-10 % jitter of the half: between 45 % and 55 % of the lifetime."""
    life = expires_at - not_before
    return not_before + (life / 2) * (1 + rng.uniform(-JITTER, JITTER))


def _new_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _csr(key: ec.EllipticCurvePrivateKey) -> bytes:
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([]))
        .sign(key, hashes.SHA256())
    )
    return csr.public_bytes(serialization.Encoding.DER)


def _pkcs8(key: ec.EllipticCurvePrivateKey, encoding: serialization.Encoding) -> bytes:
    return key.private_bytes(
        encoding, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def _pem_chain(chain_der: Sequence[bytes]) -> bytes:
    return b"".join(
        x509.load_der_x509_certificate(c).public_bytes(serialization.Encoding.PEM)
        for c in chain_der
    )


def matches(entry: AgentEntry, selectors: Collection[str]) -> bool:
    """An entry matches a caller holding every one of the entry's selectors."""
    return bool(entry.selectors) and entry.selectors <= frozenset(selectors)


@dataclass
class FileDelivery:
    """Write svid.pem, key.pem (0600) and bundle.pem for one identity into `directory`, each
    atomically (temp file + rename), then run `on_rotate` (a shell-free argv split)."""

    directory: Path
    selectors: frozenset[str]  # whose SVID to write: the agent process's own
    on_rotate: str | None = None
    written_serial: bytes = b""
    on_written: Callable[[], None] | None = None  # e.g. refresh secret files as the new SVID

    def deliver(self, snapshot: Snapshot) -> bool:
        chosen = sorted(
            (s for s in snapshot.svids.values() if self._wanted(snapshot, s.entry_id)),
            key=lambda s: s.spiffe_id,
        )
        if not chosen or snapshot.bundle is None:
            return False
        svid = chosen[0]
        marker = svid.chain_der[0] + snapshot.bundle_der
        if marker == self.written_serial:
            return False
        self.directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        key = serialization.load_der_private_key(svid.key_der, password=None)
        assert isinstance(key, ec.EllipticCurvePrivateKey)
        write_private_file(self.directory / "key.pem", _pkcs8(key, serialization.Encoding.PEM))
        write_private_file(self.directory / "svid.pem", _pem_chain(svid.chain_der), 0o644)
        write_private_file(self.directory / "bundle.pem", snapshot.bundle.to_pem(), 0o644)
        self.written_serial = marker
        if self.on_written is not None:
            self.on_written()
        if self.on_rotate:
            result = subprocess.run(shlex.split(self.on_rotate), check=False, timeout=60)
            if result.returncode != 0:
                log.warning("--on-rotate exited with status %d", result.returncode)
        return True

    def _wanted(self, snapshot: Snapshot, entry_id: str) -> bool:
        return any(e.id == entry_id and matches(e, self.selectors) for e in snapshot.entries)


class Agent:
    def __init__(
        self,
        link: BrokerLink,
        clock: Clock,
        *,
        trust_anchors: Sequence[x509.Certificate],
        sync_interval: float = 5.0,
        rng: random.Random | None = None,
        delivery: FileDelivery | None = None,
        blocking: Callable[..., Awaitable[Any]] | None = None,
        trust_store: TrustStore | None = None,
    ) -> None:
        self._link = link
        self._trust_store = trust_store
        self._clock = clock
        self._sync_interval = dt.timedelta(seconds=sync_interval)
        self._rng = rng or random.Random()  # noqa: S311 (jitter, not a secret)
        self._delivery = delivery
        self._blocking = blocking or asyncio.to_thread
        self._snapshot = Snapshot()
        self._changed = asyncio.Condition()
        self._agent: AgentSVID | None = None
        self._agent_renew_at: dt.datetime | None = None
        self._next_sync = clock.now()
        self._failures = 0
        self._retry_at = clock.now()
        self._last_error = ""
        # Entries whose SVID could not be minted: failures, next try, last error.
        self._entry_failures: dict[str, int] = {}
        self._entry_retry_at: dict[str, dt.datetime] = {}
        self._entry_errors: dict[str, str] = {}
        self._jwt_cache: dict[tuple[str, tuple[str, ...]], tuple[JWTResult, dt.datetime]] = {}
        anchors = tuple(trust_anchors)
        try:
            self._trust_domain = trust_domain_of_roots(anchors).name
        except CAError as exc:
            raise InvalidArgument(f"the pinned bundle is not usable: {exc}") from None
        self._anchors = anchors
        self.ready = asyncio.Event()
        # The sync stream (`broker.agentstream`): set once attested; while the stream is up
        # the broker pushes syncs and the agent does not poll. Rounds and pushed syncs take
        # turns (`_round`).
        self.ready_to_sync = asyncio.Event()
        self._streaming = False
        self._round = asyncio.Lock()

    # -- what the Workload API reads ------------------------------------------------------

    @property
    def snapshot(self) -> Snapshot:
        return self._snapshot

    @property
    def clock(self) -> Clock:
        return self._clock

    @property
    def agent_id(self) -> str | None:
        return self._agent.spiffe_id if self._agent else None

    async def wait_change(self, version: int) -> Snapshot:
        """Return once the snapshot's version differs from `version`."""
        async with self._changed:
            await self._changed.wait_for(lambda: self._snapshot.version != version)
            return self._snapshot

    def svids_for(
        self, selectors: Collection[str], snapshot: Snapshot | None = None
    ) -> list[WorkloadSVID]:
        """The valid SVIDs of the entries matching `selectors`; PermissionDenied when no
        entry matches, Unavailable when entries match but nothing valid is held."""
        snap = snapshot or self._snapshot
        wanted = [e for e in snap.entries if matches(e, selectors)]
        if not wanted:
            if self._agent is None or snap.bundle is None:
                raise Unavailable("the agent has not attested to the broker yet")
            raise PermissionDenied("no registration entry matches this caller")
        now = self._clock.now()
        held = [snap.svids[e.id] for e in wanted if e.id in snap.svids]
        valid = [s for s in held if s.expires_at > now]
        if not valid:
            raise Unavailable("the agent holds no valid SVID for this caller yet")
        return sorted(valid, key=lambda s: s.spiffe_id)

    async def jwt_svids(
        self, selectors: Collection[str], audience: Sequence[str], spiffe_id: str = ""
    ) -> list[JWTResult]:
        """JWT-SVIDs for the caller's entries (or the one named), from the cache while they
        are in the first half of their life."""
        snap = self._snapshot
        wanted = [e for e in snap.entries if matches(e, selectors)]
        if not wanted:
            if self._agent is None:
                raise Unavailable("the agent has not attested to the broker yet")
            raise PermissionDenied("no registration entry matches this caller")
        if spiffe_id:
            wanted = [e for e in wanted if e.spiffe_id == spiffe_id]
            if not wanted:
                raise PermissionDenied(f"this caller is not entitled to {spiffe_id[:200]}")
        key_aud = tuple(sorted(audience))
        now = self._clock.now()
        out: list[JWTResult] = []
        for entry in sorted(wanted, key=lambda e: e.spiffe_id):
            cached = self._jwt_cache.get((entry.id, key_aud))
            if cached is not None and cached[1] > now:
                out.append(cached[0])
                continue
            try:
                issued = await self._blocking(self._link.mint_jwt, entry.id, list(audience))
                self._verify_jwt(issued, entry.spiffe_id, audience)
            except Unavailable:
                if cached is not None and cached[0].expires_at > now:
                    out.append(cached[0])  # broker down: serve it while it is still valid
                    continue
                raise
            if len(self._jwt_cache) >= JWT_CACHE_MAX:
                self._jwt_cache.clear()
            minted_at = self._clock.now()
            self._jwt_cache[(entry.id, key_aud)] = (
                issued,
                minted_at + (issued.expires_at - minted_at) / 2,
            )
            out.append(issued)
        return out

    def _verify_jwt(self, issued: JWTResult, spiffe_id: str, audience: Sequence[str]) -> None:
        """Unauthenticated unless the broker's JWT-SVID validates against the bundle's JWT
        keys for every audience asked for and names `spiffe_id`."""
        bundle = self._snapshot.bundle
        if bundle is None:
            raise Unavailable("the agent has no trust bundle yet")
        try:
            for aud in audience:
                claims = validate_jwt_svid(
                    issued.token,
                    aud,
                    bundle.jwt_authorities,
                    self._clock.now(),
                    trust_domain=self._trust_domain,
                )
        except CAError as exc:
            raise Unauthenticated(
                f"refusing the JWT-SVID for {spiffe_id}: it does not validate against the "
                f"trusted bundle ({exc})"
            ) from None
        if not audience or claims.get("sub") != spiffe_id or issued.spiffe_id != spiffe_id:
            raise Unauthenticated(f"refusing the JWT-SVID for {spiffe_id}: wrong subject")

    def validate_jwt(self, token: str, audience: str) -> tuple[str, dict[str, Any]]:
        """Validate a JWT-SVID against the trust bundle's JWT keys; returns (sub, claims)."""
        bundle = self._snapshot.bundle
        if bundle is None:
            raise Unavailable("the agent has no trust bundle yet")
        claims = validate_jwt_svid(
            token,
            audience,
            bundle.jwt_authorities,
            self._clock.now(),
            trust_domain=bundle.trust_domain,
        )
        return str(claims["sub"]), claims

    # -- trust ------------------------------------------------------------------------------

    @property
    def trust_anchors(self) -> tuple[x509.Certificate, ...]:
        """The X.509 roots the agent currently trusts (the pinned ones until a change)."""
        return self._anchors

    def _verify_svid(
        self,
        issued: AgentSVID,
        key: ec.EllipticCurvePrivateKey,
        expected_id: str | None,
    ) -> None:
        """Unauthenticated unless `issued` verifies against the trusted roots as an X509-SVID
        of `expected_id` (any ID of the trust domain when None) for `key`."""
        what = expected_id or "the agent"
        try:
            certs = [x509.load_der_x509_certificate(c) for c in issued.chain_der]
        except ValueError:
            raise Unauthenticated(f"the SVID for {what} from the broker is not DER") from None
        if not certs:
            raise Unauthenticated(f"the broker returned an empty chain for {what}")
        leaf = certs[0]
        try:
            verify_chain(
                leaf, certs[1:], self._anchors, self._clock.now(), trust_domain=self._trust_domain
            )
            sid = spiffe_id_of(leaf).id_string
        except CAError as exc:
            raise Unauthenticated(
                f"refusing the SVID for {what}: it does not verify against the trusted "
                f"bundle ({exc})"
            ) from None
        if sid != issued.spiffe_id or (expected_id is not None and sid != expected_id):
            raise Unauthenticated(f"refusing the SVID for {what}: it names {sid[:200]}")
        spki = serialization.PublicFormat.SubjectPublicKeyInfo
        der = serialization.Encoding.DER
        if leaf.public_key().public_bytes(der, spki) != key.public_key().public_bytes(der, spki):
            raise Unauthenticated(f"refusing the SVID for {what}: it is not for the agent's key")

    def _still_verifies(self, svid: WorkloadSVID | AgentSVID) -> bool:
        return not needs_remint(
            svid.chain_der, self._anchors, self._clock.now(), self._trust_domain
        )

    def _check_bundle(
        self, trust_domain: str, bundle: TrustBundle, cross: Sequence[bytes] = ()
    ) -> None:
        """Unauthenticated unless `bundle` may replace the current trust (module docstring)."""
        if trust_domain != self._trust_domain:
            raise Unauthenticated(
                f"refusing a bundle for trust domain {trust_domain[:100]!r}; the agent's pinned "
                f"bundle is for {self._trust_domain!r}"
            )
        roots = tuple(bundle.x509_authorities)
        if not roots:
            raise Unauthenticated("refusing a bundle without X.509 roots")
        now = self._clock.now()
        for root in roots:
            try:
                root.verify_directly_issued_by(root)
                td = trust_domain_of_roots([root]).name
                ca = root.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
            except (CAError, ValueError, TypeError, x509.ExtensionNotFound, InvalidSignature):
                raise Unauthenticated(
                    f"refusing a bundle whose root {root.subject.rfc4514_string()[:100]!r} is "
                    "not a self-signed CA of this trust domain"
                ) from None
            if td != self._trust_domain or not ca:
                raise Unauthenticated(
                    f"refusing a bundle whose root {root.subject.rfc4514_string()[:100]!r} is "
                    "not a self-signed CA of this trust domain"
                )
        kept = [
            r
            for r in roots
            if r in self._anchors and r.not_valid_before_utc <= now < r.not_valid_after_utc
        ]
        if not kept and not vouched_for(roots, cross, self._anchors, now):
            raise Unauthenticated(
                "refusing a bundle that keeps none of the roots the agent trusts: new roots are "
                "accepted only while a trusted root still verifies the broker"
            )

    # -- the loop ---------------------------------------------------------------------------

    async def run(self, sleep: Callable[[float], Awaitable[Any]] = asyncio.sleep) -> None:
        """Attest, then keep everything fresh until cancelled."""
        while True:
            await sleep(await self.step())

    # -- the sync stream (broker.agentstream) -------------------------------------------------

    @property
    def sync_interval(self) -> float:
        return self._sync_interval.total_seconds()

    @property
    def identity_serial(self) -> bytes:
        """The agent's current SVID (leaf DER): changes when it renews (a new connection)."""
        return self._agent.chain_der[0] if self._agent is not None else b""

    def stream_up(self, up: bool) -> None:
        """The sync stream is up (no polling) or down (poll now, then every interval)."""
        if self._streaming and not up:
            self._next_sync = self._clock.now()
        self._streaming = up

    async def pushed(self, result: SyncResult) -> None:
        """Apply a sync the broker pushed, exactly as a polled one."""
        async with self._round:
            await self._sync(result)

    async def step(self) -> float:
        """One round: attest or renew the agent's SVID, sync, renew due workload SVIDs.
        Returns the seconds until the next round is due."""
        async with self._round:
            return await self._step()

    async def _step(self) -> float:
        now = self._clock.now()
        if now < self._retry_at:
            return (self._retry_at - now).total_seconds()
        try:
            if self._agent is None or now >= self._agent.expires_at:
                await self._attest()  # first start, or the SVID ran out (e.g. a long outage)
            elif self._agent_renew_at is not None and now >= self._agent_renew_at:
                await self._renew_agent()
            if self._clock.now() >= self._next_sync and not self._streaming:
                await self._sync()
            await self._renew_workloads()
            if self._failures:
                log.info(
                    "agent round succeeded again after %d failed round(s)",
                    self._failures,
                    extra={"failed_rounds": self._failures},
                )
            self._failures = 0
            self._last_error = ""
        except Exception as exc:  # an outage or a refusal: keep serving, retry with backoff
            self._failures += 1
            self._last_error = str(exc)
            delay = min(BACKOFF_MAX, BACKOFF_MIN * 2.0 ** (self._failures - 1))
            self._retry_at = self._clock.now() + dt.timedelta(seconds=delay)
            log.warning("agent round failed (retry in %.0f s): %s", delay, exc)
            self._prune()
            return float(delay)
        self._prune()
        return max(0.05, min(self._due_in(), self._sync_interval.total_seconds()))

    def health(self) -> tuple[str, list[str]]:
        """("ready" | "degraded" | "starting", reasons): ready when the agent holds a valid
        SVID of its own and one for every entry and nothing is failing; degraded (still
        serving what it holds) with one reason per failing round or entry."""
        now = self._clock.now()
        reasons: list[str] = []
        if self._failures:
            reasons.append(f"broker rounds failing ({self._failures}): {self._last_error}")
        for entry_id in sorted(self._entry_errors):
            reasons.append(f"entry {entry_id}: {self._entry_errors[entry_id]}")
        missing = [e.id for e in self._snapshot.entries if e.id not in self._snapshot.svids]
        for entry_id in missing:
            if entry_id not in self._entry_errors:
                reasons.append(f"entry {entry_id}: no SVID yet")
        if self._agent is None or now >= self._agent.expires_at:
            return "starting" if self._snapshot.bundle is None else "degraded", reasons or [
                "not attested"
            ]
        return ("degraded" if reasons else "ready"), reasons

    def _due_in(self) -> float:
        now = self._clock.now()
        dues = [self._next_sync]
        if self._agent_renew_at is not None:
            dues.append(self._agent_renew_at)
        svids = self._snapshot.svids
        for entry in self._snapshot.entries:
            due = svids[entry.id].renew_at if entry.id in svids else now
            retry = self._entry_retry_at.get(entry.id)
            dues.append(due if retry is None else max(due, retry))
        return max(0.0, (min(dues) - now).total_seconds())

    async def _attest(self) -> None:
        key = _new_key()
        issued = await self._blocking(self._link.attest, _csr(key))
        self._verify_svid(issued, key, None)
        self._set_agent(issued, key)
        log.info("attested as %s until %s", issued.spiffe_id, issued.expires_at.isoformat())

    async def _renew_agent(self) -> None:
        key = _new_key()
        issued = await self._blocking(self._link.renew, _csr(key))
        self._verify_svid(issued, key, self._agent.spiffe_id if self._agent else None)
        self._set_agent(issued, key)
        log.info("renewed the agent SVID until %s", issued.expires_at.isoformat())

    def _set_agent(self, issued: AgentSVID, key: ec.EllipticCurvePrivateKey) -> None:
        self._link.use_identity(
            _pem_chain(issued.chain_der), _pkcs8(key, serialization.Encoding.PEM)
        )
        self._agent = issued
        # From its arrival, not its notBefore: the CA backdates notBefore (clock skew), which
        # for a short SVID would put half-life in the past and renew it at every round.
        start = max(issued.not_before, self._clock.now())
        self._agent_renew_at = renew_at(start, issued.expires_at, self._rng)
        self.ready_to_sync.set()

    async def _sync(self, pushed: SyncResult | None = None) -> None:
        result = pushed if pushed is not None else await self._blocking(self._link.sync)
        self._next_sync = self._clock.now() + self._sync_interval
        snap = self._snapshot
        bundle = snap.bundle
        if result.bundle_sequence != snap.bundle_sequence or bundle is None:
            try:
                candidate = TrustBundle.from_jwks(result.trust_domain, result.bundle_jwks)
            except CAError as exc:
                raise Unauthenticated(f"refusing the broker's bundle: {exc}") from None
            self._check_bundle(result.trust_domain, candidate, result.root_cross)
            bundle = candidate
        entries = tuple(sorted(result.entries, key=lambda e: e.id))
        if bundle is snap.bundle and entries == snap.entries and result.crl == snap.crl:
            return
        keep = {e.id for e in entries}
        # An entry whose definition changed gets a new SVID.
        changed = {e.id for e in entries if e not in snap.entries}
        svids = {k: v for k, v in snap.svids.items() if k in keep and k not in changed}
        self._jwt_cache = {
            k: v for k, v in self._jwt_cache.items() if k[0] in keep and k[0] not in changed
        }
        if bundle is not snap.bundle:
            roots = tuple(bundle.x509_authorities)
            if roots != self._anchors:
                self._link.use_roots(bundle.to_pem())
                self._anchors = roots
                if self._trust_store is not None:
                    self._trust_store.replace(roots)
                # Every SVID served must verify against the bundle served with it.
                svids = {k: v for k, v in svids.items() if self._still_verifies(v)}
                if self._agent is not None and not self._still_verifies(self._agent):
                    self._agent_renew_at = self._clock.now()  # its own identity first
            old_keys = snap.bundle.jwt_authorities if snap.bundle is not None else {}
            if any(bundle.jwt_authorities.get(kid) != key for kid, key in old_keys.items()):
                self._jwt_cache.clear()  # a JWT key left the bundle: mint (and check) again
        updated = dataclasses.replace(
            snap, trust_domain=result.trust_domain, entries=entries, svids=svids, crl=result.crl
        )
        if bundle is not snap.bundle:
            updated = updated.with_bundle(bundle, result.bundle_sequence)
        await self._publish(updated)
        if self._agent_renew_at is not None and self._clock.now() >= self._agent_renew_at:
            await self._renew_agent()  # before minting for the entries with it

    async def _renew_workloads(self) -> None:
        snap = self._snapshot
        now = self._clock.now()
        present = {e.id for e in snap.entries}
        for gone in [k for k in self._entry_failures if k not in present]:
            self._forget_failure(gone)
        due = [
            e
            for e in snap.entries
            if (e.id not in snap.svids or snap.svids[e.id].renew_at <= now)
            and self._entry_retry_at.get(e.id, now) <= now
        ]
        if not due:
            return
        svids = dict(snap.svids)
        try:
            for entry in due:
                try:
                    svids[entry.id] = await self._mint(entry)
                except Exception as exc:  # this entry only: the others and the bundle go on
                    self._entry_failed(entry, exc)
                    continue
                if entry.id in self._entry_failures:
                    log.info(
                        "entry %s (%s): SVID minted again after %d failure(s)",
                        entry.id,
                        entry.spiffe_id,
                        self._entry_failures[entry.id],
                        extra={"entry_id": entry.id, "spiffe_id": entry.spiffe_id},
                    )
                    self._forget_failure(entry.id)
        finally:
            if svids != snap.svids:
                await self._publish(dataclasses.replace(self._snapshot, svids=svids))

    async def _mint(self, entry: AgentEntry) -> WorkloadSVID:
        key = _new_key()
        issued: AgentSVID = await self._blocking(self._link.mint_x509, entry.id, _csr(key))
        arrived = self._clock.now()
        self._verify_svid(issued, key, entry.spiffe_id)
        return WorkloadSVID(
            entry_id=entry.id,
            spiffe_id=issued.spiffe_id,
            chain_der=issued.chain_der,
            key_der=_pkcs8(key, serialization.Encoding.DER),
            not_before=issued.not_before,
            expires_at=issued.expires_at,
            renew_at=renew_at(max(issued.not_before, arrived), issued.expires_at, self._rng),
        )

    def _entry_failed(self, entry: AgentEntry, exc: Exception) -> None:
        failures = self._entry_failures.get(entry.id, 0) + 1
        delay = min(BACKOFF_MAX, BACKOFF_MIN * 2.0 ** (failures - 1))
        self._entry_failures[entry.id] = failures
        self._entry_retry_at[entry.id] = self._clock.now() + dt.timedelta(seconds=delay)
        self._entry_errors[entry.id] = str(exc)
        log.warning(
            "entry %s (%s): minting its SVID failed (retry in %.0f s): %s",
            entry.id,
            entry.spiffe_id,
            delay,
            exc,
            extra={"entry_id": entry.id, "spiffe_id": entry.spiffe_id},
        )

    def _forget_failure(self, entry_id: str) -> None:
        self._entry_failures.pop(entry_id, None)
        self._entry_retry_at.pop(entry_id, None)
        self._entry_errors.pop(entry_id, None)

    def _prune(self) -> None:
        """Drop SVIDs that have expired (they must never be served)."""
        now = self._clock.now()
        snap = self._snapshot
        alive = {k: v for k, v in snap.svids.items() if v.expires_at > now}
        if len(alive) != len(snap.svids):
            self._snapshot = dataclasses.replace(snap, svids=alive, version=snap.version + 1)
            asyncio.get_running_loop().create_task(self._notify())

    async def _notify(self) -> None:
        async with self._changed:
            self._changed.notify_all()

    async def _publish(self, snapshot: Snapshot) -> None:
        snapshot = dataclasses.replace(snapshot, version=self._snapshot.version + 1)
        self._snapshot = snapshot
        await self._notify()
        if snapshot.svids and snapshot.bundle is not None:
            self.ready.set()
        if self._delivery is not None:
            try:
                await self._blocking(self._delivery.deliver, snapshot)
            except (OSError, subprocess.SubprocessError) as exc:
                log.warning("writing the SVID files failed: %s", exc)
