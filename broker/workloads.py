"""Workload identity on the broker side: join tokens, JWT attestors, registration entries, the
denylist, and the SVIDs agents get for themselves and for the entries they serve.

An agent's identity is the SPIFFE ID its join token was bound to, or the one its attestor's
template makes from the JWT's claims. An entry names its parent (the agent allowed to serve it);
the agent sends CSRs for keys it generated, so workload keys never exist on the broker. CA
policy bounds every SVID minted here (TTL, DNS names), as for any other mint.
"""

from __future__ import annotations

import datetime as dt
import json
import re
import uuid
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass

from broker.attestation import (
    JwtAttestor,
    hash_token,
    new_join_token,
    replay_key,
    token_expiry,
    unverified_issuer,
)
from broker.authority import CAService, IssuedJWT, IssuedX509
from broker.errors import (
    AlreadyExists,
    InvalidArgument,
    NotFound,
    PermissionDenied,
    Unauthenticated,
)
from broker.policy import Authorize, Caller, decide_absent, opaque_refusals
from broker.storage.identity import (
    AttestorRecord,
    DenyRecord,
    EntryRecord,
    IdentityRepository,
    JoinTokenRecord,
)
from broker.syncfeed import SyncFeed
from ca.clock import Clock
from ca.errors import CAError
from ca.spiffeid import SpiffeId

__all__ = [
    "ENTRY_REFUSAL",
    "AgentSync",
    "AuthorizeAttestor",
    "AuthorizeEntry",
    "Denylist",
    "IdentityService",
    "check_selector",
]

# The request pipeline's decision on a validated entry or attestor, made before anything is
# stored (a prod identity by proxy needs a second operator's approval, single use: the use is
# recorded before the change). Raises PermissionDenied.
AuthorizeEntry = Callable[["EntryRecord"], Awaitable[None]]
AuthorizeAttestor = Callable[["AttestorRecord"], Awaitable[None]]

DEFAULT_TOKEN_TTL = dt.timedelta(minutes=10)
MAX_TOKEN_TTL = dt.timedelta(hours=24)
# An entry's SVIDs live at least this long: the agent renews at half-life, and a few seconds'
# SVIDs would have it minting all the time.
MIN_ENTRY_SVID_TTL_SECONDS = 30
MAX_SELECTORS = 16
MAX_DNS = 32
_SELECTOR_KEYS = {
    "uid": r"\d{1,10}",
    "gid": r"\d{1,10}",
    "user": r"[^:\s]{1,64}",
    "group": r"[^:\s]{1,64}",
}
_SERIAL = re.compile(r"^[0-9a-f]{1,40}$")

# What an agent is told when it may not mint for an entry, whether or not the entry exists.
ENTRY_REFUSAL = "this agent is not the parent of that registration entry"


def check_selector(selector: str) -> str:
    """`unix:uid:N`, `unix:gid:N`, `unix:user:NAME` or `unix:group:NAME`; InvalidArgument."""
    parts = selector.split(":", 2)
    if len(parts) != 3 or parts[0] != "unix" or parts[1] not in _SELECTOR_KEYS:
        raise InvalidArgument(
            f"selector {selector[:80]!r} is not one of unix:uid:N, unix:gid:N, unix:user:NAME, "
            "unix:group:NAME"
        )
    if not re.fullmatch(_SELECTOR_KEYS[parts[1]], parts[2]):
        raise InvalidArgument(f"selector {selector[:80]!r} has an invalid value")
    return selector


class Denylist:
    """The denylist in memory, for the request path (`Authenticator`): a set lookup per call.
    Refreshed from storage every few seconds (`IdentityService.refresh_denylist`) and at once
    for denials made through this process."""

    def __init__(self) -> None:
        self._ids: frozenset[str] = frozenset()
        self._serials: frozenset[str] = frozenset()
        self._serial_records: tuple[DenyRecord, ...] = ()

    def replace(self, records: Sequence[DenyRecord]) -> None:
        self._ids = frozenset(r.value for r in records if r.kind == "spiffe_id")
        self._serials = frozenset(r.value for r in records if r.kind == "serial")
        self._serial_records = tuple(r for r in records if r.kind == "serial")

    def add(self, record: DenyRecord) -> None:
        if record.kind == "spiffe_id":
            self._ids = self._ids | {record.value}
        elif record.value not in self._serials:
            self._serials = self._serials | {record.value}
            self._serial_records = (*self._serial_records, record)

    @property
    def blocked_ids(self) -> frozenset[str]:
        return self._ids

    @property
    def serial_records(self) -> tuple[DenyRecord, ...]:
        """The denied serials with when they were denied (what the CRLs list)."""
        return self._serial_records

    def blocks(self, spiffe_id: str, serial: str | None) -> bool:
        return spiffe_id in self._ids or (serial is not None and serial in self._serials)


@dataclass(frozen=True)
class AgentSync:
    entries: list[EntryRecord]
    trust_domain: str
    bundle_jwks: bytes
    bundle_sequence: int
    crl: tuple[bytes, ...] = ()  # DER CRLs of the denied serials, one per issuing CA
    root_cross: tuple[bytes, ...] = ()  # DER cross-certificates between roots


class IdentityService:
    def __init__(
        self,
        ca: CAService,
        store: IdentityRepository,
        clock: Clock,
        feed: SyncFeed | None = None,
    ) -> None:
        self._ca = ca
        self._store = store
        self._clock = clock
        self.denylist = Denylist()
        # Wakes the agents' sync streams when an entry or the denylist changes here.
        self.feed = feed or SyncFeed()

    async def sync_fingerprint(self) -> tuple[object, ...]:
        """What another replica's change would move (`broker.syncfeed`): the bundle sequence,
        the denylist (both as last re-read) and one aggregate over the entries."""
        return (
            self._ca.bundle().sequence,
            len(self.denylist.serial_records),
            self.denylist.blocked_ids,
            await self._store.entries_version(),
        )

    async def refresh_denylist(self) -> None:
        self.denylist.replace(await self._store.list_denied())

    @property
    def trust_domain(self) -> str:
        return self._ca.trust_domain

    def _workload_id(self, text: str, what: str) -> str:
        try:
            sid = SpiffeId.parse(text).require_member_of(self.trust_domain).require_workload()
        except CAError as exc:
            raise InvalidArgument(f"{what}: {exc}") from None
        if sid.path == "/broker" or sid.path.startswith("/broker/"):
            raise InvalidArgument(f"{what}: spiffe://{self.trust_domain}/broker/... is reserved")
        return sid.id_string

    # -- join tokens and attestation --------------------------------------------------------

    async def create_join_token(
        self, spiffe_id: str, ttl: dt.timedelta | None
    ) -> tuple[str, str, dt.datetime]:
        """A one-time token bound to `spiffe_id`; returns (token, id, expiry). Only the hash
        is stored."""
        sid = self._workload_id(spiffe_id, "join token SPIFFE ID")
        ttl = DEFAULT_TOKEN_TTL if ttl is None else ttl
        if not dt.timedelta(0) < ttl <= MAX_TOKEN_TTL:
            raise InvalidArgument("join token TTL must be positive and at most 24h")
        token = new_join_token()
        now = self._clock.now()
        await self._store.insert_join_token(JoinTokenRecord(hash_token(token), sid, now, now + ttl))
        return token, sid, now + ttl

    async def attest_join_token(self, token: str, csr: bytes, caller: Caller) -> IssuedX509:
        """Consume the token and issue the agent's SVID for `csr`. Raises Unauthenticated for
        an unknown, expired or used token (one message for all three)."""
        if not csr:
            raise InvalidArgument("attestation needs a CSR for the agent's key")
        if not isinstance(token, str) or not 0 < len(token) <= 256:
            raise Unauthenticated("join token is unknown, expired or already used")
        spiffe_id = await self._store.consume_join_token(hash_token(token), self._clock.now())
        if spiffe_id is None:
            raise Unauthenticated("join token is unknown, expired or already used")
        return await self._issue_agent(spiffe_id, csr, caller)

    async def attest_jwt(self, token: str, csr: bytes, caller: Caller) -> IssuedX509:
        if not csr:
            raise InvalidArgument("attestation needs a CSR for the agent's key")
        issuer = unverified_issuer(token)
        record = await self._store.attestor_for_issuer(issuer)
        if record is None:
            raise Unauthenticated("attestation JWT issuer is not a registered attestor")
        attestor = self._attestor(record)
        now = self._clock.now()
        claims = attestor.verify(token, now)
        spiffe_id = attestor.spiffe_id_for(claims)
        # Single use, like a join token: (issuer, jti) is recorded until the token expires, in
        # storage, so a replay is refused by every worker and replica.
        if not await self._store.use_attestation_jwt(
            record.issuer, replay_key(token, claims), token_expiry(claims), now
        ):
            raise Unauthenticated("attestation JWT was already used (replay refused)")
        return await self._issue_agent(spiffe_id, csr, caller)

    async def _issue_agent(self, spiffe_id: str, csr: bytes, caller: Caller) -> IssuedX509:
        if await self._store.is_denied(spiffe_id, None):
            raise PermissionDenied(f"{spiffe_id} is on the denylist")
        return await self._ca.mint_x509(
            spiffe_id, ttl=None, csr=csr, key_type=None, dns_names=(), caller=caller
        )

    async def renew(self, caller: Caller, serial: str, csr: bytes) -> IssuedX509:
        """A new SVID for the caller's own ID (the mTLS certificate proves it)."""
        if not csr:
            raise InvalidArgument("renewal needs a CSR")
        await self.check_allowed(caller.spiffe_id, serial, _ancestors(caller))
        return await self._ca.mint_x509(
            caller.spiffe_id,
            ttl=None,
            csr=csr,
            key_type=None,
            dns_names=(),
            caller=caller,
            renewal=True,
        )

    async def check_allowed(
        self, spiffe_id: str, serial: str | None, ancestors: Sequence[str] = ()
    ) -> None:
        """PermissionDenied when the ID, the certificate serial or the serial of a certificate
        it was minted through (`ancestors`, from its lineage) is on the denylist."""
        if await self._store.is_denied(spiffe_id, serial):
            raise PermissionDenied(f"{spiffe_id} (or its certificate) is on the denylist")
        for ancestor in ancestors:
            if await self._store.is_denied(spiffe_id, ancestor):
                raise PermissionDenied(
                    f"{spiffe_id}: a certificate it was minted through is on the denylist"
                )

    # -- attestors --------------------------------------------------------------------------

    def _attestor(self, record: AttestorRecord) -> JwtAttestor:
        return JwtAttestor.build(
            name=record.name,
            issuer=record.issuer,
            audience=record.audience,
            jwks_json=record.jwks,
            template=record.template,
            algorithms=record.algorithms,
            trust_domain=self.trust_domain,
        )

    async def add_attestor(
        self,
        name: str,
        issuer: str,
        audience: str,
        jwks_json: str,
        template: str,
        algorithms: Sequence[str],
        authorize: AuthorizeAttestor | None = None,
    ) -> AttestorRecord:
        """Validate and store an attestor; InvalidArgument names what is wrong. `authorize`
        decides the validated record before it is stored (PermissionDenied stores nothing)."""
        attestor = JwtAttestor.build(
            name=name,
            issuer=issuer,
            audience=audience,
            jwks_json=jwks_json,
            template=template,
            algorithms=algorithms,
            trust_domain=self.trust_domain,
        )
        record = AttestorRecord(
            name=attestor.name,
            issuer=issuer,
            audience=audience,
            jwks=json.dumps(json.loads(jwks_json), sort_keys=True),
            template=template,
            algorithms=attestor.algorithms,
            created_at=self._clock.now(),
        )
        if authorize is not None:
            await authorize(record)
        await self._store.insert_attestor(record)
        return record

    async def list_attestors(self) -> list[AttestorRecord]:
        return await self._store.list_attestors()

    async def remove_attestor(self, name: str) -> None:
        if not await self._store.delete_attestor(name):
            raise NotFound(f"no attestor named {name[:80]!r}")

    # -- registration entries ---------------------------------------------------------------

    async def create_entry(
        self,
        *,
        spiffe_id: str,
        parent_id: str,
        selectors: Sequence[str],
        x509_ttl: int,
        jwt_ttl: int,
        dns_names: Sequence[str],
        authorize: AuthorizeEntry | None = None,
    ) -> EntryRecord:
        """Validate and store a registration entry; InvalidArgument names what is wrong.
        `authorize` decides the validated record before it is stored (PermissionDenied stores
        nothing)."""
        sid = self._workload_id(spiffe_id, "entry SPIFFE ID")
        parent = self._workload_id(parent_id, "entry parent ID")
        if not selectors:
            raise InvalidArgument("an entry needs at least one selector (e.g. unix:uid:1000)")
        if len(selectors) > MAX_SELECTORS:
            raise InvalidArgument(f"at most {MAX_SELECTORS} selectors")
        chosen = tuple(sorted({check_selector(s) for s in selectors}))
        if x509_ttl < 0 or jwt_ttl < 0:
            raise InvalidArgument("TTLs must not be negative")
        for kind, ttl in (("X.509", x509_ttl), ("JWT", jwt_ttl)):
            if 0 < ttl < MIN_ENTRY_SVID_TTL_SECONDS:
                raise InvalidArgument(
                    f"the {kind} SVID TTL of an entry must be at least "
                    f"{MIN_ENTRY_SVID_TTL_SECONDS}s (the agent renews at half-life; 0 takes "
                    "the CA policy's default)"
                )
        if len(dns_names) > MAX_DNS:
            raise InvalidArgument(f"at most {MAX_DNS} DNS names")
        self._ca.check_entry_issuable(
            sid,
            dt.timedelta(seconds=x509_ttl) if x509_ttl else None,
            dt.timedelta(seconds=jwt_ttl) if jwt_ttl else None,
            dns_names,
        )
        record = EntryRecord(
            id=uuid.uuid4().hex,
            spiffe_id=sid,
            parent_id=parent,
            selectors=chosen,
            x509_ttl=x509_ttl,
            jwt_ttl=jwt_ttl,
            dns_names=tuple(dns_names),
            created_at=self._clock.now(),
        )
        if authorize is not None:
            await authorize(record)
        for existing in await self._store.list_entries(parent):
            if _same_entry(existing, record):
                raise AlreadyExists(
                    f"an identical registration entry exists: {existing.id} (same SPIFFE ID, "
                    "parent, selectors, TTLs and DNS names)"
                )
        await self._store.insert_entry(record)
        self.feed.changed()
        return record

    async def get_entry(self, entry_id: str) -> EntryRecord:
        entry = await self._store.get_entry(entry_id) if entry_id else None
        if entry is None:
            raise NotFound(f"no registration entry {entry_id[:80]!r}")
        return entry

    async def list_entries(self, parent_id: str | None = None) -> list[EntryRecord]:
        return await self._store.list_entries(parent_id or None)

    async def delete_entry(self, entry_id: str) -> None:
        if not await self._store.delete_entry(entry_id):
            raise NotFound(f"no registration entry {entry_id[:80]!r}")
        self.feed.changed()

    # -- denylist ---------------------------------------------------------------------------

    async def deny(self, target: str) -> DenyRecord:
        """Deny a SPIFFE ID or a serial (hex). Idempotent."""
        text = target.strip()
        if text.startswith("spiffe://"):
            try:
                kind, value = "spiffe_id", SpiffeId.parse(text).id_string
            except CAError as exc:
                raise InvalidArgument(str(exc)) from None
        else:
            value = text.lower().removeprefix("0x").replace(":", "").lstrip("0") or "0"
            if not _SERIAL.match(value):
                raise InvalidArgument("give a SPIFFE ID or a certificate serial in hex")
            kind = "serial"
        record = DenyRecord(kind, value, self._clock.now())
        await self._store.deny(record)
        self.denylist.add(record)
        self.feed.changed()
        return record

    # -- agents -----------------------------------------------------------------------------

    async def sync(self, agent: Caller, serial: str | None) -> AgentSync:
        await self.check_allowed(agent.spiffe_id, serial, _ancestors(agent))
        bundle = self._ca.bundle()
        return AgentSync(
            entries=await self._store.list_entries(agent.spiffe_id),
            trust_domain=self.trust_domain,
            bundle_jwks=bundle.jwks,
            bundle_sequence=bundle.sequence,
            crl=self._ca.crls(self.denylist.serial_records),
            root_cross=self._ca.root_cross_certificates(),
        )

    async def authorized_entry(
        self, entry_id: str, agent: Caller, authorize: Authorize
    ) -> EntryRecord:
        """Entry `entry_id`, once `authorize` allowed `agent` to mint for it (as its parent).
        An unknown entry is decided as one with no parent: an agent is refused exactly as for
        another agent's entry (same code, same message), so entry IDs cannot be probed; an
        operator learns that it is absent (NotFound)."""
        authorize = opaque_refusals(authorize, agent, ENTRY_REFUSAL)
        entry = await self._store.get_entry(entry_id) if entry_id else None
        if entry is None:
            absent = NotFound(f"no registration entry {entry_id[:80]!r}")
            decide_absent(authorize, entry_id[:64], {"parent": ""}, absent)
        authorize(entry.id, {"parent": entry.parent_id})
        return entry

    async def mint_entry_x509(
        self, entry_id: str, csr: bytes, agent: Caller, authorize: Authorize, serial: str | None
    ) -> IssuedX509:
        """An X.509-SVID for entry `entry_id`, if `authorize` allows `agent` (its parent; see
        `authorized_entry`). PermissionDenied when the agent (its ID, certificate or lineage)
        or the entry's own SPIFFE ID is denied."""
        entry = await self.authorized_entry(entry_id, agent, authorize)
        await self.check_allowed(agent.spiffe_id, serial, _ancestors(agent))
        await self._check_entry_allowed(entry)
        if not csr:
            raise InvalidArgument("the agent must send a CSR (workload keys stay on the agent)")
        ttl = dt.timedelta(seconds=entry.x509_ttl) if entry.x509_ttl else None
        return await self._ca.mint_x509(
            entry.spiffe_id,
            ttl=ttl,
            csr=csr,
            key_type=None,
            dns_names=entry.dns_names,
            caller=agent,
        )

    async def mint_entry_jwt(
        self,
        entry_id: str,
        audience: Sequence[str],
        agent: Caller,
        authorize: Authorize,
        serial: str | None,
    ) -> IssuedJWT:
        """A JWT-SVID for entry `entry_id`, as `mint_entry_x509`."""
        entry = await self.authorized_entry(entry_id, agent, authorize)
        await self.check_allowed(agent.spiffe_id, serial, _ancestors(agent))
        await self._check_entry_allowed(entry)
        ttl = dt.timedelta(seconds=entry.jwt_ttl) if entry.jwt_ttl else None
        return await self._ca.mint_jwt(entry.spiffe_id, audience, ttl=ttl, caller=agent)

    async def _check_entry_allowed(self, entry: EntryRecord) -> None:
        """The entry's own SPIFFE ID on the denylist: its agent gets nothing for it."""
        if self.denylist.blocks(entry.spiffe_id, None) or await self._store.is_denied(
            entry.spiffe_id, None
        ):
            raise PermissionDenied(f"{entry.spiffe_id} is on the denylist")


def _same_entry(a: EntryRecord, b: EntryRecord) -> bool:
    return (a.spiffe_id, a.parent_id, tuple(sorted(a.selectors)), a.x509_ttl, a.jwt_ttl) == (
        b.spiffe_id,
        b.parent_id,
        tuple(sorted(b.selectors)),
        b.x509_ttl,
        b.jwt_ttl,
    ) and sorted(a.dns_names) == sorted(b.dns_names)


def _ancestors(caller: Caller) -> tuple[str, ...]:
    return caller.lineage.ancestors if caller.lineage is not None else ()
