"""Access control: the Rego policy in force, just-in-time grants, two-party approvals and
break-glass credentials, behind the one `broker.policy.Policy` interface.

`AccessControl.decide` builds the policy input (the caller with its parsed identity and the
grants, approvals and break-glass credential in force, the action, the resource with its
attributes, the request context, and the built-in rules' own verdict), evaluates the Rego
policy and returns the decision and the rule that made it. Decisions are cached by their full
input; the cache is dropped whenever the policy, a grant, an approval or a break-glass
credential changes, here or in another worker (`sync` polls the storage counter).

Whatever the Rego policy says, one invariant is enforced here too: reading or rotating a
prod + pii resource needs its owning service, an approval by a second operator, or a
break-glass credential (which itself needed one); and so does handing out a production
identity, directly (svid/jwt mint) or by proxy (a join token, a registration entry, an
attestor whose template can yield one: `TWO_PERSON_MINT_ACTIONS`). Approvals and break-glass
credentials are single use: the decision that uses one spends it in memory at once and in
storage right after (compare-and-set); `settle` lets the request pipeline wait for that write
before answering, so a use that lost the race against another worker is refused.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import hashlib
import json
import logging
import secrets
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Final, Protocol

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from broker.errors import FailedPrecondition, InvalidArgument, NotFound, PermissionDenied
from broker.policy import Action, Authorize, Caller, Decision, DefaultPolicy, Policy
from broker.rego import InvalidRegoPolicy, RegoEngine, default_modules
from broker.storage.access import (
    AccessRepository,
    ApprovalRecord,
    BreakGlassRecord,
    GrantRecord,
)
from broker.storage.interface import PolicyRepository
from ca.clock import Clock
from ca.spiffeid import SpiffeId

__all__ = [
    "APPROVAL_TTL",
    "GRANTABLE_ACTIONS",
    "MAX_BREAKGLASS_TTL",
    "MAX_GRANT_TTL",
    "POLICY_NAME",
    "PROD_ENVIRONMENT",
    "TWO_PERSON_ACTIONS",
    "TWO_PERSON_MINT_ACTIONS",
    "AccessControl",
    "BreakGlassCredential",
    "BreakGlassMinter",
    "RegoPolicyView",
]

log = logging.getLogger(__name__)

POLICY_NAME: Final = "rego"
MAX_GRANT_TTL: Final = dt.timedelta(hours=8)
MAX_BREAKGLASS_TTL: Final = dt.timedelta(hours=8)
APPROVAL_TTL: Final = dt.timedelta(hours=1)
TWO_PERSON_ACTIONS: Final = frozenset({"secrets.get", "secrets.rotate", "db.creds"})
# Minting a production identity (directly, or by proxy: a join token bound to it, a registration
# entry for it, an attestor whose template can yield it) is the same power as reading its data:
# an operator needs a second person's approval for it (`_two_person`).
TWO_PERSON_MINT_ACTIONS: Final = frozenset(
    {"svid.mint", "jwt.mint", "token.create", "entry.admin", "attestor.admin"}
)
# The layout environment whose identities can own prod data (the resource attribute
# "environment" of an identity, see broker.api.server.attributes.identity_attributes).
PROD_ENVIRONMENT: Final = "prod"
_MAX_TEXT: Final = 1024
_CACHE_SIZE: Final = 65536
_USE_MEMORY_SECONDS: Final = 300.0
# Deny rules reported first when several match (the most specific reason wins).
_DENY_ORDER: Final = (
    "breakglass-spent",
    "breakglass-scope",
    "tenant-isolation",
    "control-plane",
    "prod-only",
    "environment",
    "cross-service",
    "namespace",
    "two-person",
    "owner",
    "self-mint",
)
# Allow rules preferred when several match: a grant is reported (and audited as used) only
# when nothing else allows the request.
_ALLOW_ORDER: Final = ("operator", "owner", "holder", "self-mint", "authenticated", "break-glass")


@dataclass(frozen=True)
class RegoPolicyView:
    version: int  # 0: the shipped default, never set
    modules: Mapping[str, str]
    author: str
    updated_at: dt.datetime


@dataclass
class _State:
    grants: dict[str, list[GrantRecord]] = field(default_factory=dict)  # by grantee
    approvals: dict[str, list[ApprovalRecord]] = field(default_factory=dict)  # by requester
    breakglass: dict[str, BreakGlassRecord] = field(default_factory=dict)  # by SPIFFE ID


def _sha256(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def _covers(pattern: str, resource: Mapping[str, Any]) -> bool:
    """Whether a grant/approval/break-glass `pattern` covers the policy input's resource: `*`,
    the exact name, the exact reference (or its SHA-256, the name secrets go by), or a
    trailing-`*` prefix of the real name (the reference when there is one). A wildcard never
    matches the hex digest that stands in for a reference (`1d*` covers no secret)."""
    name = str(resource.get("name", ""))
    reference = str(resource.get("reference", ""))
    if pattern == "*" or pattern in (name, reference) or _sha256(pattern) == name:
        return True
    return pattern.endswith("*") and (reference or name).startswith(pattern[:-1])


# Grants name one action: `*` would be a standing broad grant (the standard allows none), and
# an unknown name would be accepted and grant nothing.
GRANTABLE_ACTIONS: Final = frozenset(
    value for key, value in vars(Action).items() if key.isupper() and isinstance(value, str)
)


def _check_text(value: str, what: str, *, required: bool = True) -> str:
    value = value.strip()
    if required and not value:
        raise InvalidArgument(f"{what} is required")
    if len(value) > _MAX_TEXT or not value.isprintable():
        raise InvalidArgument(f"{what} must be printable text of at most {_MAX_TEXT} characters")
    return value


def _new_id(prefix: str) -> str:
    return f"{prefix}-{secrets.token_hex(8)}"


def _normalise(attributes: Mapping[str, str]) -> dict[str, str]:
    out = {str(k): str(v) for k, v in attributes.items()}
    for alias in ("data-classification", "data_classification"):
        if alias in out and "classification" not in out:
            out["classification"] = out[alias]
    return out


class BreakGlassMinter(Protocol):
    """What issuing a break-glass credential needs from the CA (`broker.authority.CAService`):
    a certificate for a broker-internal identity, and the trust bundle to hand out with it."""

    def issue_internal(
        self, spiffe_id: SpiffeId, public_key: Any, ttl: dt.timedelta
    ) -> tuple[x509.Certificate, x509.Certificate]: ...

    def trust_bundle_pem(self) -> bytes: ...


@dataclass(frozen=True)
class BreakGlassCredential:
    """A break-glass record with its credential: the certificate chain (leaf, issuing CA) and
    the private key (DER, PKCS#8; shown once, never stored), and the trust bundle's roots."""

    record: BreakGlassRecord
    cert_chain_der: Sequence[bytes]
    private_key_der: bytes
    bundle_der: Sequence[bytes]


class AccessControl:
    """The broker's `Policy`: Rego plus grants, approvals and break-glass. Build with the access
    repository, the policy repository (Rego versions are stored as policy "rego"), the clock, the
    trust domain and the operator SPIFFE IDs; call `load()` before serving."""

    def __init__(
        self,
        repository: AccessRepository,
        policies: PolicyRepository,
        clock: Clock,
        *,
        trust_domain: str,
        operators: Iterable[str],
        builtin: Policy | None = None,
        cache_size: int = _CACHE_SIZE,
        people_log_in: bool = False,
    ) -> None:
        # With operator login configured, approvals and break-glass credentials count people:
        # only a person who logged in with MFA (`broker login`) may approve or take one, not a
        # configured bootstrap identity (whoever holds that certificate file).
        self._people_log_in = people_log_in
        self._repo = repository
        self._policies = policies
        self._clock = clock
        self._td = trust_domain
        self._operators = frozenset(operators)
        self._builtin: Policy = builtin if builtin is not None else DefaultPolicy(self._operators)
        self._breakglass_prefix = f"spiffe://{trust_domain}/broker/breakglass/"
        self._engine = RegoEngine(default_modules())
        self._view = RegoPolicyView(0, self._engine.modules, "built-in default", clock.now())
        self._state = _State()
        self._version = -1
        self._cache: dict[tuple[Any, ...], tuple[Decision, dt.datetime]] = {}
        self._cache_size = cache_size
        self._spent: set[str] = set()  # approval / break-glass ids used since the last load
        # approval / break-glass id -> (the task recording its use in storage, True when the
        # use is ours; when it started, on the monotonic clock)
        self._uses: dict[str, tuple[asyncio.Task[bool], float]] = {}
        self.cache_hits = 0
        self.cache_misses = 0

    # -- lifecycle ---------------------------------------------------------------------------

    async def load(self) -> None:
        """Read the Rego policy in force and the grants, approvals and break-glass credentials
        in force from storage; drop the decision cache."""
        version = await self._repo.access_version()
        now = self._clock.now()
        current = await self._policies.current_policy(POLICY_NAME)
        if current is not None and current.version != self._view.version:
            modules = json.loads(current.document)["modules"]
            try:
                self._engine = RegoEngine(modules)
            except InvalidRegoPolicy:
                # Stored only after it compiled here; a newer regopy refusing it keeps the
                # previous policy rather than opening or closing everything.
                log.exception("stored Rego policy version %s no longer compiles", current.version)
            else:
                self._view = RegoPolicyView(
                    current.version, modules, current.author, current.created_at
                )
        state = _State()
        for grant in await self._repo.list_grants(active_at=now):
            state.grants.setdefault(grant.grantee, []).append(grant)
        for approval in await self._repo.list_approvals(active_at=now):
            if approval.approved_by is not None:
                state.approvals.setdefault(approval.requester, []).append(approval)
        for record in await self._repo.list_breakglass(active_at=now):
            state.breakglass[record.spiffe_id] = record
        self._state = state
        # Uses stay known until `settle` has surely read them (a request settles within its
        # own lifetime); then they are no longer in force in storage either (or their write
        # failed, the answer was withheld, and they are usable again).
        horizon = self._clock.monotonic() - _USE_MEMORY_SECONDS
        self._uses = {
            k: (task, started)
            for k, (task, started) in self._uses.items()
            if not task.done() or started > horizon
        }
        self._spent = {s for s in self._spent if s in self._uses}
        self._version = version
        self._cache.clear()

    async def sync(self) -> None:
        """Pick up changes made through another worker or replica (one small read)."""
        if await self._repo.access_version() != self._version:
            await self.load()

    async def flush(self) -> None:
        """Wait until every approval and break-glass use is written to storage."""
        await asyncio.gather(*(task for task, _ in self._uses.values()), return_exceptions=True)

    async def settle(self, decision: Decision) -> bool:
        """For a decision that spent an approval or a break-glass credential: wait until the
        use is recorded in storage. False when another worker or replica used it first, or
        the write failed: the request pipeline then withholds the answer, so a single-use
        permission serves one request across every process."""
        ids = [decision.flags.get("approval", "")]
        if decision.rule == "break-glass":
            ids.append(decision.flags.get("breakglass", ""))
        for spent_id in filter(None, ids):
            use = self._uses.get(spent_id)
            if use is None:
                continue  # not spent by a decision of this process
            try:
                if not await asyncio.shield(use[0]):
                    return False
            except Exception:
                log.exception("recording the use of %s failed", spent_id)
                return False
        return True

    # -- the decision ------------------------------------------------------------------------

    def policy_input(
        self,
        caller: Caller,
        action: str,
        resource: str,
        attributes: Mapping[str, str] | None = None,
        context: Mapping[str, str] | None = None,
    ) -> dict[str, Any]:
        """The Rego input document for one request (what `broker policy test` evaluates)."""
        now = self._clock.now()
        context = context or {}
        who = caller.spiffe_id
        # An SVID an operator minted for another ID acts as that operator for the two-person
        # rule: the approvals that count are the operator's (approved by someone else), never
        # ones the minted identity asked for itself.
        approver_of = caller.minted_by or who
        doc_caller: dict[str, Any] = {
            "id": who,
            "operator": caller.is_operator,
            "roles": sorted(caller.roles),
            "subject": caller.subject,
            "attestation": "x509-svid",  # callers of the main port present an X.509-SVID
            "grants": [
                {
                    "id": g.id,
                    "action": g.action,
                    "resource": g.resource,
                    "resource_sha256": _sha256(g.resource),
                    "expires_at": g.expires_at.isoformat(timespec="seconds"),
                }
                for g in self._state.grants.get(who, ())
                if g.in_force(now)
            ],
            "approvals": [
                {
                    "id": a.id,
                    "action": a.action,
                    "resource": a.resource,
                    "resource_sha256": _sha256(a.resource),
                    "approved_by": a.approved_by or "",
                }
                for a in self._state.approvals.get(approver_of, ())
                if a.in_force(now) and a.id not in self._spent and a.approved_by != approver_of
            ],
        }
        if caller.minted_by:
            doc_caller["minted_by"] = caller.minted_by
        if who.startswith(self._breakglass_prefix):
            record = self._state.breakglass.get(who)
            doc_caller["breakglass"] = {
                "id": record.id if record else who.rsplit("/", 1)[-1],
                "action": record.action if record else "",
                "resource": record.resource if record else "",
                "resource_sha256": _sha256(record.resource) if record else "",
                "operator": record.operator if record else "",
                "active": bool(record and record.in_force(now) and record.id not in self._spent),
            }
        else:
            doc_caller.update(caller.attributes)
        builtin = self._builtin.decide(
            caller, action, resource, attributes=attributes, context=context
        )
        return {
            "action": action,
            "caller": doc_caller,
            "resource": {**_normalise(attributes or {}), "name": resource},
            "context": {
                "time": now.strftime("%Y-%m-%dT%H:%MZ"),
                "justification": str(context.get("justification", "")),
                "ticket": str(context.get("ticket", "")),
            },
            "builtin": {
                "allowed": builtin.allowed,
                "rule": builtin.rule,
                "reason": builtin.reason,
            },
            "trust_domain": self._td,
        }

    def decide(
        self,
        caller: Caller,
        action: str,
        resource: str,
        *,
        attributes: Mapping[str, str] | None = None,
        context: Mapping[str, str] | None = None,
    ) -> Decision:
        now = self._clock.now()
        context = context or {}
        # Everything the input is made of: the request itself and the minute (the input's
        # time); the grants, approvals and break-glass state are dropped with the cache when
        # they change, and an entry lapses when the first of them it relied on expires.
        key = (
            caller.spiffe_id,
            caller.is_operator,
            caller.minted_by,
            caller.roles,
            caller.subject,
            frozenset(caller.attributes.items()),
            action,
            resource,
            frozenset(attributes.items()) if attributes else frozenset(),
            context.get("justification", ""),
            context.get("ticket", ""),
            int(now.timestamp()) // 60,
        )
        hit = self._cache.get(key)
        if hit is not None and now < hit[1]:
            self.cache_hits += 1
            decision = hit[0]
        else:
            self.cache_misses += 1
            document = self.policy_input(caller, action, resource, attributes, context)
            decision = self.evaluate(document)
            if len(self._cache) >= self._cache_size:
                self._cache.clear()
            self._cache[key] = (decision, self._lapses(caller.minted_by or caller.spiffe_id, now))
        if decision.allowed:
            # Every request with a break-glass credential is flagged; only the one its
            # break-glass rule allowed spends it (not, say, fetching the trust bundle).
            if decision.rule == "break-glass" and decision.flags.get("breakglass"):
                self._spend("breakglass", decision.flags["breakglass"])
            if decision.flags.get("approval"):
                self._spend("approval", decision.flags["approval"])
        return decision

    def _lapses(self, who: str, now: dt.datetime) -> dt.datetime:
        """When the first grant, approval or break-glass credential of `who` in force now
        expires (a cached decision that saw it lapses then)."""
        ends = [g.expires_at for g in self._state.grants.get(who, ()) if g.in_force(now)]
        ends += [a.expires_at for a in self._state.approvals.get(who, ()) if a.in_force(now)]
        record = self._state.breakglass.get(who)
        if record is not None and record.in_force(now):
            ends.append(record.expires_at)
        return min(ends, default=dt.datetime.max.replace(tzinfo=dt.UTC))

    def evaluate(self, document: Mapping[str, Any], engine: RegoEngine | None = None) -> Decision:
        """Evaluate one input with the policy in force (or `engine`); fails closed."""
        try:
            result = (engine or self._engine).evaluate(document)
        except InvalidRegoPolicy as exc:
            return Decision(False, f"the policy failed on this request: {exc}", "policy-error")
        decision = _verdict(result.allow, result.deny, document)
        return _two_person(decision, document)

    def _spend(self, kind: str, spent_id: str) -> None:
        """Single use: forget it here at once, record the use in storage right after."""
        if spent_id in self._spent:
            return
        self._spent.add(spent_id)
        self._cache.clear()
        now = self._clock.now()

        async def persist() -> bool:
            if kind == "approval":
                ok = await self._repo.consume_approval(spent_id, now)
            else:
                ok = await self._repo.use_breakglass(spent_id, now)
            if not ok:
                log.warning("%s %s was already used or revoked elsewhere", kind, spent_id)
            return ok

        task = asyncio.get_running_loop().create_task(persist(), name=spent_id)
        self._uses[spent_id] = (task, self._clock.monotonic())

    # -- the Rego policy ---------------------------------------------------------------------

    def policy(self) -> RegoPolicyView:
        return self._view

    async def set_policy(self, modules: Mapping[str, str], author: Caller) -> int:
        """Compile and check `modules`, then store them as the next version. A policy that does
        not compile (or fails on a sample input) raises InvalidRegoPolicy and changes nothing."""
        engine = RegoEngine(modules)
        document = json.dumps({"modules": engine.modules}, sort_keys=True)
        stored = await self._policies.put_policy(
            POLICY_NAME, document, author.spiffe_id, self._clock.now()
        )
        await self._repo.bump_access_version()
        self._engine = engine
        self._view = RegoPolicyView(
            stored.version, engine.modules, author.spiffe_id, stored.created_at
        )
        self._cache.clear()
        return stored.version

    def test(
        self, document: Mapping[str, Any], modules: Mapping[str, str] | None = None
    ) -> Decision:
        """Evaluate a full input document with the policy in force, or with candidate
        `modules` (compiled but not stored). Spends nothing."""
        if not isinstance(document, Mapping) or not isinstance(document.get("action"), str):
            raise InvalidArgument("the test input must be an object with an 'action' string")
        engine = RegoEngine(modules) if modules else None
        return self.evaluate(document, engine)

    def test_request(
        self, caller: Caller, action: str, resource: str, attributes: Mapping[str, str]
    ) -> tuple[Decision, dict[str, Any]]:
        document = self.policy_input(caller, action, resource, attributes, {})
        return self.evaluate(document), document

    # -- grants ------------------------------------------------------------------------------

    async def create_grant(
        self,
        by: Caller,
        grantee: str,
        action: str,
        resource: str,
        ttl: dt.timedelta,
        justification: str,
    ) -> GrantRecord:
        """A grant for at most MAX_GRANT_TTL. Raises InvalidArgument on bad input."""
        justification = _check_text(justification, "a justification")
        grantee = _check_text(grantee, "--to (the grantee's SPIFFE ID)")
        if not grantee.startswith(f"spiffe://{self._td}/"):
            raise InvalidArgument(f"grantee {grantee} is not in trust domain {self._td}")
        action = _check_text(action, "--action")
        if action == "*" or action not in GRANTABLE_ACTIONS:
            raise InvalidArgument(
                f"--action {action!r} is not one action: a grant names exactly one, e.g. "
                "secrets.get, secrets.rotate or db.creds (create one grant per action; '*' "
                "is refused because grants are narrow and time-bound)"
            )
        resource = _check_text(resource, "--resource")
        if ttl <= dt.timedelta(0):
            raise InvalidArgument("a grant's ttl must be positive")
        if ttl > MAX_GRANT_TTL:
            raise InvalidArgument(
                f"a grant may last at most {_hours(MAX_GRANT_TTL)}; asked for {_hours(ttl)}"
            )
        now = self._clock.now()
        grant = GrantRecord(
            _new_id("grant"),
            grantee,
            action,
            resource,
            justification,
            by.spiffe_id,
            now,
            now + ttl,
        )
        await self._repo.insert_grant(grant)
        await self.load()
        return grant

    async def list_grants(self, *, include_inactive: bool = False) -> list[GrantRecord]:
        return await self._repo.list_grants(None if include_inactive else self._clock.now())

    async def revoke_grant(self, grant_id: str, by: Caller) -> GrantRecord:
        if not await self._repo.revoke_grant(grant_id, by.spiffe_id, self._clock.now()):
            existing = await self._repo.get_grant(grant_id)
            if existing is None:
                raise NotFound(f"no grant {grant_id}")
            raise FailedPrecondition(f"grant {grant_id} is already revoked")
        await self.load()
        revoked = await self._repo.get_grant(grant_id)
        assert revoked is not None
        return revoked

    # -- approvals ---------------------------------------------------------------------------

    async def request_approval(
        self, by: Caller, action: str, resource: str, justification: str
    ) -> ApprovalRecord:
        now = self._clock.now()
        approval = ApprovalRecord(
            _new_id("approval"),
            by.spiffe_id,
            _check_text(action, "--action"),
            _check_text(resource, "--resource"),
            _check_text(justification, "a justification"),
            now,
            now + APPROVAL_TTL,
        )
        await self._repo.insert_approval(approval)
        return approval

    async def approve(self, approval_id: str, by: Caller) -> ApprovalRecord:
        """A second operator approves. Refused for the requester itself, for non-operators, and
        for an approval that is already approved, used or expired."""
        if not by.is_operator:
            raise PermissionDenied("only an operator may approve")
        if self._people_log_in and not by.subject:
            raise PermissionDenied(
                "approvals count people: only a person logged in with MFA (broker login) may "
                "approve"
            )
        existing = await self._repo.get_approval(approval_id)
        if existing is None:
            raise NotFound(f"no approval {approval_id}")
        if existing.requester == by.spiffe_id:
            raise PermissionDenied(
                f"{by.spiffe_id} requested approval {approval_id} and cannot approve it: "
                "a second operator must"
            )
        now = self._clock.now()
        if not await self._repo.approve(approval_id, by.spiffe_id, now):
            state = existing.state(now)
            raise FailedPrecondition(f"approval {approval_id} is {state}, not pending")
        await self.load()
        approved = await self._repo.get_approval(approval_id)
        assert approved is not None
        return approved

    async def list_approvals(self, *, include_inactive: bool = False) -> list[ApprovalRecord]:
        return await self._repo.list_approvals(None if include_inactive else self._clock.now())

    # -- break-glass -------------------------------------------------------------------------

    def breakglass_id(self, record_id: str) -> str:
        return f"{self._breakglass_prefix}{record_id}"

    async def issue_breakglass_credential(
        self,
        by: Caller,
        approval_id: str,
        ttl: dt.timedelta,
        authorize: Authorize,
        ca: BreakGlassMinter,
    ) -> BreakGlassCredential:
        """`issue_breakglass` for the request path, with the credential minted by `ca`.
        Decided through `authorize` once the approval is loaded (its requester among the
        attributes); an absent approval is decided as one nobody asked for, so a caller who
        may not take break-glass credentials is refused the same way, and one who may learns
        that it is absent (NotFound, after the checks on the caller and the TTL)."""
        approval = await self._repo.get_approval(approval_id)
        authorize(approval_id[:64], {"requester": approval.requester if approval else ""})
        record = await self._issue_breakglass(by, approval_id, ttl, approval)
        key = ec.generate_private_key(ec.SECP256R1())
        leaf, issuer = ca.issue_internal(
            SpiffeId.parse(record.spiffe_id),
            key.public_key(),
            record.expires_at - self._clock.now(),
        )
        der = serialization.Encoding.DER
        roots = x509.load_pem_x509_certificates(ca.trust_bundle_pem())
        return BreakGlassCredential(
            record,
            [leaf.public_bytes(der), issuer.public_bytes(der)],
            key.private_bytes(der, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()),
            [r.public_bytes(der) for r in roots],
        )

    async def issue_breakglass(
        self, by: Caller, approval_id: str, ttl: dt.timedelta
    ) -> BreakGlassRecord:
        """Turn `by`'s approved request (action, resource) into a single-use break-glass record
        valid for at most MAX_BREAKGLASS_TTL; the approval is spent. The caller mints the
        credential for `record.spiffe_id` (`issue_breakglass_credential` does both)."""
        return await self._issue_breakglass(
            by, approval_id, ttl, await self._repo.get_approval(approval_id)
        )

    async def _issue_breakglass(
        self, by: Caller, approval_id: str, ttl: dt.timedelta, approval: ApprovalRecord | None
    ) -> BreakGlassRecord:
        if not by.is_operator:
            raise PermissionDenied("break-glass credentials are for operators")
        if self._people_log_in and not by.subject:
            raise PermissionDenied(
                "break-glass credentials are issued only to a person logged in with MFA "
                "(broker login), so that every use names them"
            )
        if ttl <= dt.timedelta(0) or ttl > MAX_BREAKGLASS_TTL:
            raise InvalidArgument(
                f"a break-glass credential lasts more than 0 and at most "
                f"{_hours(MAX_BREAKGLASS_TTL)}; asked for {_hours(ttl)}"
            )
        if approval is None:
            raise NotFound(f"no approval {approval_id}")
        if approval.requester != by.spiffe_id:
            raise PermissionDenied(f"approval {approval_id} was requested by someone else")
        now = self._clock.now()
        if not approval.in_force(now):
            raise FailedPrecondition(
                f"approval {approval_id} is {approval.state(now)}; break-glass needs an "
                "approved, unused approval"
            )
        record_id = _new_id("bg")
        record = BreakGlassRecord(
            record_id,
            by.spiffe_id,
            approval_id,
            self.breakglass_id(record_id),
            approval.action,
            approval.resource,
            now,
            now + ttl,
        )
        if not await self._repo.insert_breakglass(record):
            raise FailedPrecondition(f"approval {approval_id} was used or expired meanwhile")
        await self.load()
        return record

    async def list_breakglass(self, *, include_inactive: bool = False) -> list[BreakGlassRecord]:
        return await self._repo.list_breakglass(None if include_inactive else self._clock.now())

    async def revoke_breakglass(self, record_id: str) -> BreakGlassRecord:
        if not await self._repo.revoke_breakglass(record_id, self._clock.now()):
            if await self._repo.get_breakglass(record_id) is None:
                raise NotFound(f"no break-glass credential {record_id}")
            raise FailedPrecondition(f"break-glass credential {record_id} is already revoked")
        await self.load()
        record = await self._repo.get_breakglass(record_id)
        assert record is not None
        return record


def _hours(value: dt.timedelta) -> str:
    seconds = int(value.total_seconds())
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return "".join(f"{n}{u}" for n, u in ((h, "h"), (m, "m"), (s, "s")) if n) or "0s"


def _first(items: Iterable[Mapping[str, Any]], order: tuple[str, ...]) -> Mapping[str, Any]:
    ranked = sorted(
        items,
        key=lambda v: (
            order.index(v["rule"]) if v["rule"] in order else len(order),
            str(v.get("rule")),
            str(v.get("reason", "")),
        ),
    )
    return ranked[0]


def _flags(verdict: Mapping[str, Any]) -> dict[str, str]:
    return {k: str(v) for k, v in verdict.items() if k not in ("rule", "reason") and v is not None}


def _verdict(
    allow: tuple[Mapping[str, Any], ...],
    deny: tuple[Mapping[str, Any], ...],
    document: Mapping[str, Any],
) -> Decision:
    breakglass = document["caller"].get("breakglass")
    flags = {"breakglass": breakglass["id"]} if breakglass else {}
    if breakglass and breakglass.get("operator"):
        # Whose credential it is, in every event a break-glass request writes.
        flags["breakglass_operator"] = str(breakglass["operator"])
    if deny:
        first = _first(deny, _DENY_ORDER)
        return Decision(False, str(first.get("reason", "")), str(first["rule"]), flags)
    if allow:
        first = _first(allow, _ALLOW_ORDER)
        return Decision(
            True, str(first.get("reason", "")), str(first["rule"]), flags | _flags(first)
        )
    builtin = document.get("builtin") or {}
    if not builtin.get("allowed", True) and builtin.get("reason"):
        return Decision(False, str(builtin["reason"]), str(builtin.get("rule", "")), flags)
    return Decision(
        False, f"no rule of the policy allows {document['action']}", "default-deny", flags
    )


def _two_person_mint(decision: Decision, document: Mapping[str, Any]) -> Decision:
    """Anyone but the identity itself (an operator, or whoever a custom Rego policy lets mint
    other IDs) minting a production identity (any ID whose environment is prod: only those can
    own prod data) needs an approval of (action, resource) by a second operator, or a
    break-glass credential for exactly that. By proxy too: a join token bound to it
    (`token.create`), a registration entry for it (`entry.admin`: its parent agent gets it), an
    attestor whose template can yield it (`attestor.admin`: whoever holds its keys gets it);
    the servicer names such a request's resource with environment "prod"."""
    caller, resource = document["caller"], document["resource"]
    if resource.get("environment") != PROD_ENVIRONMENT:
        return decision
    name = str(resource.get("name", ""))
    if name == caller.get("id"):
        return decision
    breakglass = caller.get("breakglass")
    if (
        breakglass
        and breakglass.get("active")
        and breakglass.get("action") in (document["action"], "*")
        and _covers(str(breakglass.get("resource", "")), resource)
    ):
        return decision
    for approval in caller.get("approvals", ()):
        if approval["action"] == document["action"] and _covers(approval["resource"], resource):
            flags = dict(decision.flags) | {"approval": approval["id"]}
            return Decision(True, decision.reason, decision.rule, flags)
    if document["action"] == "entry.admin":
        what = (
            f"a registration entry for the production identity {name} hands that identity to "
            "the entry's parent agent, which"
        )
    elif document["action"] == "attestor.admin":
        what = (
            f"an attestor whose template ({str(resource.get('template', ''))[:200]}) can yield "
            "production identities hands them to whoever holds its signing keys, which"
        )
    else:
        what = f"minting the production identity {name}"
    return Decision(
        False,
        f"{what} is the same power as reading its data: it needs an approval by a second "
        f"operator (broker approval request --action {document['action']} --resource {name})",
        "two-person",
        decision.flags,
    )


def _two_person(decision: Decision, document: Mapping[str, Any]) -> Decision:
    """The invariant no Rego policy can lift: prod + pii needs the owner or two people, and so
    does an operator minting a prod identity. An SVID an operator minted is never the owner."""
    if decision.allowed and document["action"] in TWO_PERSON_MINT_ACTIONS:
        return _two_person_mint(decision, document)
    if not decision.allowed or document["action"] not in TWO_PERSON_ACTIONS:
        return decision
    resource = document["resource"]
    if resource.get("environment") != "prod" or resource.get("classification") != "pii":
        return decision
    if document["action"] == "secrets.rotate" and resource.get("on_schedule") == "true":
        return decision  # rotating a secret that is due is routine; off schedule needs two
    caller = document["caller"]
    if (
        not caller.get("operator")
        and not caller.get("minted_by")
        and "breakglass" not in caller
        and caller.get("service")
        and caller.get("service") == resource.get("owner")
        and caller.get("tenant") == resource.get("tenant")
        and caller.get("environment") == resource.get("environment")
    ):
        return decision  # the owning service
    breakglass = caller.get("breakglass")
    if (
        breakglass
        and breakglass.get("active")
        and breakglass.get("action") in (document["action"], "*")
        and _covers(str(breakglass.get("resource", "")), resource)
    ):
        return decision
    for approval in caller.get("approvals", ()):
        if approval["action"] == document["action"] and _covers(approval["resource"], resource):
            flags = dict(decision.flags) | {"approval": approval["id"]}
            return Decision(True, decision.reason, decision.rule, flags)
    return Decision(
        False,
        f"{document['action']} on a prod pii resource by anyone but its owning service needs "
        "an approval by a second operator (broker approval request)",
        "two-person",
        decision.flags,
    )
